"""Hugging Face model folders: what gpt.py needs to read (and export.py to write) them.

A folder holds config.json (the architecture), one or more safetensors shards (the weights,
listed by model.safetensors.index.json when sharded) and usually tokenizer.json. Here:
- config.json -> gpt.GPTConfig's fields (GPT-2, Llama 3, Mistral, Qwen2/3: sliding windows, attention
  biases, the rope types linear/dynamic/llama3/yarn and their frequencies, rope_inv_freq), and the
  fields of a bare GPT-2 state dict read off its tensor shapes;
- tensor names both ways (GPT-2's Conv1D weights are transposed against nn.Linear's; the Llama
  family's containers are renamed), and the plan that checks every name and shape before a
  weight is read;
- safetensors: the format is an 8-byte header length, a JSON header, the raw bytes; read
  (every offset checked first) and written here, streamed tensor by tensor;
- hub downloads (requests; HF_TOKEN for gated models) into ~/.cache/nanollm;
- PEFT adapter folders (adapter_config.json + adapter_model.safetensors) as lora.py's dict.

gpt.py builds the (meta-device) model and load_folder fills it (gpt.load_pretrained). Imports `common` only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from pathlib import Path

import torch
import torch.nn as nn

from common import NanoError, atomic_write, download, nanollm_cache

HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def hf_config_fields(hf: dict) -> dict:
    """gpt.GPTConfig's fields from a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise NanoError(f"model_type {kind!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)})")
    if kind == "gpt2":
        gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}.get(hf.get("activation_function", "gelu_new"))
        if gelu is None:
            raise NanoError(f"gpt2 config.json with activation_function {hf['activation_function']!r} is not supported "
                            "(gelu_new or gelu)")
        return dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                    n_head=hf["n_head"], n_embd=hf["n_embd"], mlp_hidden=hf.get("n_inner") or 0,
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), gelu=gelu)
    unsupported = [what for what, bad in (
        (f"hidden_act {hf.get('hidden_act')!r}", hf.get("hidden_act", "silu") != "silu"),
        ("mlp_bias without attention_bias", hf.get("mlp_bias", False) and not hf.get("attention_bias", False)),
        (f"partial_rotary_factor {hf.get('partial_rotary_factor')}", hf.get("partial_rotary_factor", 1.0) != 1.0)) if bad]
    if unsupported:
        raise NanoError(f"{kind} config.json with {unsupported[0]} is not supported (only what Llama 3, "
                        "Mistral, Qwen2/3 use)")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    return dict(**rope_fields(hf), sliding_window=sliding_window(hf), arch="llama", vocab_size=hf["vocab_size"],
                n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim") or 0,
                bias=attention_bias and mlp_bias, attn_bias=attention_bias and not mlp_bias and kind != "qwen2",
                qkv_bias=kind == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False), qk_norm=kind == "qwen3")


ROPE_TYPES = ("default", "llama3", "linear", "dynamic", "yarn")


def rope_fields(hf: dict) -> dict:
    """block_size and the rope_* fields of GPTConfig from config.json's rope_parameters (5.x) or
    rope_scaling (4.x). block_size is the context the scaled model is meant for: linear and dynamic
    configs keep max_position_embeddings at the pretraining length and stretch it by the factor
    (dynamic's original context is max_position_embeddings, as transformers computes it); yarn and
    llama3 name original_max_position_embeddings and reach at least factor times it."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind, max_pos = rope.get("rope_type", rope.get("type", "default")), hf.get("max_position_embeddings", 2048)
    fields = dict(block_size=max_pos, rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind not in ROPE_TYPES:
        raise NanoError(f"config.json with rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return fields
    orig = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    factor = rope.get("factor") or max_pos / orig  # yarn may leave it out
    fields.update(rope_type=kind, rope_scaling=factor, rope_original_max_position=orig)
    if kind in ("linear", "dynamic"):
        fields.update(block_size=int(max_pos * factor), rope_original_max_position=max_pos)
    elif kind == "llama3":
        fields.update(rope_low_freq_factor=rope["low_freq_factor"], rope_high_freq_factor=rope["high_freq_factor"])
    else:  # yarn: attention_factor given, or 0.1 ln(factor) + 1 (with mscale/mscale_all_dim: a ratio of two)
        def mscale(m=1.0):
            return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
        mscales = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = rope.get("attention_factor") or (mscale(mscales[0]) / mscale(mscales[1]) if all(mscales) else mscale())
        fields.update(block_size=max(max_pos, int(orig * factor)), rope_attention_factor=attention,
                      rope_low_freq_factor=rope.get("beta_slow") or 1.0, rope_high_freq_factor=rope.get("beta_fast") or 32.0,
                      rope_truncate=rope.get("truncate", True))
    return fields


def sliding_window(hf: dict) -> int:
    """GPTConfig.sliding_window: Mistral's sliding_window (every layer), Qwen2/3's with use_sliding_window
    on the layers from max_window_layers on (or as layer_types lists them). Only all or none: 0 = none."""
    window, n = hf.get("sliding_window") or 0, hf["num_hidden_layers"]
    if hf.get("model_type") != "mistral" and not hf.get("use_sliding_window", False):
        window = 0
    first = 0 if hf.get("model_type") == "mistral" else hf.get("max_window_layers", 0)
    types = hf.get("layer_types") or ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)]
    sliding = sum(t == "sliding_attention" for t in types)
    if set(types) - {"sliding_attention", "full_attention"} or 0 < sliding < n:
        raise NanoError(f"config.json with a sliding window on {sliding} of {n} layers is not supported "
                        "(only on all layers or none: set max_window_layers 0, or use_sliding_window false)")
    return window if sliding else 0


def rope_inv_freq(config, seq_len):
    """RoPE's inverse frequencies (head_dim / 2,) for a gpt.GPTConfig: pair i turns theta^(-2i/head_dim)
    radians per position, and rope_scaling stretches that past the pretraining context as the rope
    types of Hugging Face configs do (transformers' modeling_rope_utils, same formulas and order):
    - linear (Chen et al. 2023, arXiv:2306.15595): every frequency / factor (positions squeezed);
    - dynamic (NTK-aware): once the sequence (seq_len, a tensor: largest position + 1) is longer than
      the original context, a larger base: the fast channels barely change, the slow ones interpolate;
    - llama3 and yarn (Peng et al. 2023, arXiv:2309.00071): channels that turn many times per original
      context are kept, those that turn less than once are divided by the factor, blended in between
      (llama3: linearly in turns; yarn: linearly in channel index, and gpt.rope_angles scales cos and
      sin by rope_attention_factor)."""
    c, hd = config, config.head_dim
    exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=seq_len.device).float() / hd
    freqs = c.rope_theta ** exponent
    inv_freq, factor, orig = 1.0 / freqs, c.rope_scaling, c.rope_original_max_position
    if not factor or c.rope_type == "linear":
        return inv_freq / (factor or 1.0)
    if c.rope_type == "dynamic":  # seq_len <= orig: plain RoPE; longer: base * (factor * seq_len / orig - factor + 1)^(hd/(hd-2))
        base = c.rope_theta * (factor * seq_len.clamp(min=orig) / orig - (factor - 1)) ** (hd / (hd - 2))
        return 1.0 / base ** exponent
    if c.rope_type == "llama3":
        turns = orig * inv_freq / (2 * math.pi)  # turns per pretraining context
        keep = ((turns - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)).clamp(0, 1)
        return (1 - keep) * inv_freq / factor + keep * inv_freq
    # yarn: the (fractional) channel turning beta times per original context, for beta_fast, beta_slow
    low, high = (hd * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(c.rope_theta))
                 for beta in (c.rope_high_freq_factor, c.rope_low_freq_factor))
    low, high = (math.floor(low), math.ceil(high)) if c.rope_truncate else (low, high)
    low, high = max(low, 0), min(high, hd - 1)
    keep = 1 - ((torch.arange(hd // 2, device=seq_len.device).float() - low) / ((high - low) or 0.001)).clamp(0, 1)
    return 1.0 / (factor * freqs) * (1 - keep) + inv_freq * keep  # (transformers' order of operations)


def gpt2_config_fields(shapes: dict) -> dict:
    """GPTConfig's fields read off a GPT-2 state dict's tensor shapes (names without "transformer.")."""
    if "wte.weight" not in shapes:
        raise NanoError("not a GPT-2 state dict (no wte.weight; pass the config of another model)")
    vocab_size, n_embd = shapes["wte.weight"]
    if n_embd % 64:  # the weights do not say how many heads; every released GPT-2 has 64-dim heads
        raise NanoError(f"n_embd {n_embd} is not a multiple of 64: pass a GPTConfig with n_head")
    return dict(block_size=shapes["wpe.weight"][0], vocab_size=vocab_size, n_embd=n_embd, n_head=n_embd // 64,
                n_layer=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("h.")), bias="ln_f.bias" in shapes)


# Hugging Face's GPT-2 stores these projections as Conv1D, weight (in, out): transposed
# relative to nn.Linear's (out, in) whenever weights cross between the two
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Llama's family, HF -> ours: the containers and block norms are renamed (so every script
# finds transformer.h[i].attn, .mlp, .ln_1); the projections keep HF's names
HF_LLAMA_NAMES = (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."),
                  ("model.norm.", "transformer.ln_f."), (".self_attn.", ".attn."),
                  (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."))


def from_hf_name(name: str, arch: str) -> str:
    if arch == "gpt2":
        return name if name == "lm_head.weight" else "transformer." + name.removeprefix("transformer.")
    for theirs, ours in HF_LLAMA_NAMES:
        name = name.replace(theirs, ours)
    return name


def to_hf_name(name: str, arch: str) -> str:
    """One of our tensor names in Hugging Face's spelling (e.g. for PEFT adapters)."""
    for theirs, ours in HF_LLAMA_NAMES if arch != "gpt2" else ():
        name = name.replace(ours, theirs)
    return name


def fill(model, key: str, tensor):
    """Put a loaded tensor in place of parameter `key` (GPT-2's Conv1D weights transposed)."""
    if model.config.arch == "gpt2" and key.endswith(HF_CONV1D_WEIGHTS):
        tensor = tensor.t().contiguous()
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))


def hf_plan(model, shapes: dict, where="the state dict") -> dict:
    """{HF name: our name} of every tensor to load, after checking names and shapes against
    the model: one-line NanoError for a foreign, mis-shaped or missing tensor."""
    arch, ours, plan = model.config.arch, dict(model.named_parameters()), {}
    for name, shape in shapes.items():
        key = from_hf_name(name, arch)
        if name.endswith((".attn.bias", ".attn.masked_bias")) and key not in ours:
            continue  # causal-mask buffers of old HF GPT-2 versions
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # the same matrix as the token embedding
        if key not in ours:
            raise NanoError(f"unexpected tensor {name!r} in {where} (not a {arch} model of this config)")
        want = tuple(ours[key].shape)[::-1] if arch == "gpt2" and key.endswith(HF_CONV1D_WEIGHTS) \
            else tuple(ours[key].shape)
        if tuple(shape) != want:
            raise NanoError(f"{name} in {where} has shape {tuple(shape)}, the config wants {want} "
                            "(weights of another model size?)")
        plan[name] = key
    missing = sorted(set(ours) - set(plan.values()))
    if missing:
        raise NanoError(f"{where} lacks {len(missing)} tensors, e.g. {to_hf_name(missing[0], arch)} "
                        "(a shard missing, or weights of another model)")
    return plan


def fill_from_state_dict(empty_model, sd: dict, dtype=None, gpt2=False):
    """empty_model(fields) (a meta-device model) filled with a copy of a Hugging Face state dict, names and
    shapes checked first; gpt2: the fields of a GPT-2 state dict, read off its tensor shapes."""
    if gpt2:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    model = empty_model(gpt2_config_fields({k: v.shape for k, v in sd.items()}) if gpt2 else None)
    for name, key in hf_plan(model, {k: v.shape for k, v in sd.items()}).items():
        fill(model, key, sd[name].to(dtype or sd[name].dtype, copy=True))
    return model.tie_weights()


def to_hf_state_dict(sd: dict, arch: str) -> dict:
    """Our state dict in Hugging Face's names (GPT-2's Conv1D weights transposed back to (in, out));
    a tied lm_head.weight is included, as HF's state_dict() has it."""
    return {to_hf_name(k, arch): v.t().contiguous() if arch == "gpt2" and k.endswith(HF_CONV1D_WEIGHTS) else v
            for k, v in sd.items()}


def load_folder(empty_model, name_or_dir: str, cache_dir=None, dtype=None):
    """(model, tokenizer spec) from a Hugging Face model folder, a hub name or a GPT-2 size:
    empty_model(GPTConfig fields) builds the model on the meta device; every name and shape is
    checked from the safetensors headers before any weight is read, then the shards are read one
    tensor at a time into it (in their dtype, or `dtype`)."""
    folder, hf_config, files, spec = hf_folder(name_or_dir, cache_dir)
    model = empty_model(hf_config_fields(hf_config))
    headers = [safetensors_header(folder / name)[0] for name in files]
    plan = hf_plan(model, {k: v["shape"] for h in headers for k, v in h.items()}, str(folder))
    for name in files:  # one shard at a time, one tensor at a time
        for key, tensor in read_safetensors(folder / name, names=plan).items():
            fill(model, plan[key], tensor.to(dtype) if dtype else tensor)
    return model.tie_weights(), spec or ("gpt2" if model.config.arch == "gpt2" else None)


def is_hub_name(name: str) -> bool:
    """"owner/name" as the hub spells a repository: not a path here, nor a checkpoint file's name."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and Path(name).suffix not in (".pt", ".pth")


def hf_folder(name_or_dir: str, cache_dir=None) -> tuple[Path, dict, list[str], str | None]:
    """(folder, its config.json as a dict, its safetensors files, tokenizer spec) of a Hugging Face
    model folder, a hub name (downloaded into ~/.cache/nanollm) or a GPT-2 size; checked before any
    weight is read. The spec is the folder's tokenizer.json, "gpt2" for the GPT-2 sizes, else None."""
    cache = Path(cache_dir) if cache_dir else nanollm_cache()
    folder, spec = Path(name_or_dir), None
    if name_or_dir in GPT2_SIZES and not folder.is_dir():
        folder, spec = download_hf(f"openai-community/{name_or_dir}", cache / name_or_dir, tokenizer=False), "gpt2"
    elif not folder.is_dir():
        if not is_hub_name(name_or_dir):
            raise NanoError(f"unknown model {name_or_dir!r} (a Hugging Face folder, a hub name like "
                            f"HuggingFaceTB/SmolLM2-135M, or one of {', '.join(GPT2_SIZES)})")
        folder = download_hf(name_or_dir, cache / name_or_dir)
    if not (folder / "config.json").is_file():
        raise NanoError(f"{folder} has no config.json (a Hugging Face model folder needs one)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoError(f"{folder / 'config.json'} is not valid JSON ({e.__class__.__name__}; download it again)") from None
    files = weight_files(folder)
    for name in files:
        if not (folder / name).is_file():
            raise NanoError(f"{folder} lacks {name} of {len(files)} weight file(s) (download it again)")
    if spec is None and (folder / "tokenizer.json").is_file():
        spec = str(folder / "tokenizer.json")
    return folder, config, files, spec


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a folder: the shards its index lists, or the one model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def download_hf(repo: str, folder: Path, tokenizer=True) -> Path:
    """config.json, the safetensors (one file or the shards its index lists) and tokenizer.json of
    a hub repository into folder; files already there are not fetched again. HF_TOKEN, when set,
    is sent for gated repositories (Llama)."""
    base = f"https://huggingface.co/{repo}/resolve/main/"
    hint = "check the name; a gated model needs HF_TOKEN set and its licence accepted"
    auth = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else None
    get = functools.partial(download, hint=hint, headers=auth)
    get(base + "config.json", folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if not (folder / "model.safetensors").is_file():
        try:
            get(base + index.name, index)
        except NanoError:  # no index: one file
            pass
    for name in weight_files(folder):
        get(base + name, folder / name)
    if tokenizer:
        try:
            get(base + "tokenizer.json", folder / "tokenizer.json")
        except NanoError:  # the weights are usable without it; gpt.load_pretrained's spec says None
            pass
    return folder


# safetensors: an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
# "data_offsets"}}, then the raw tensor bytes

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def safetensors_header(path) -> tuple[dict, int]:
    """The header {name: {"dtype", "shape", "data_offsets"}} and where the tensor bytes begin,
    checked as Hugging Face's safetensors checks it before any tensor is allocated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError, RecursionError):
            raise NanoError(f"{path} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    check_offsets(path, header, size - 8 - header_len)
    return header, 8 + header_len


def check_offsets(path, header: dict, data_bytes: int):
    """Every entry well-typed, its byte range the size its dtype and shape say, and the ranges
    tiling the data section exactly (no negative, overlapping, duplicated or outside offsets):
    a lying header is refused, not read as wrong weights."""
    spans = []
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise NanoError(f"{path}: the header entry of {name} is malformed (needs dtype, shape, data_offsets)")
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise NanoError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        itemsize = SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise NanoError(f"{path}: tensor {name} has data_offsets {offsets} for shape {shape} (corrupt file)")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:  # a gap or an overlap with the tensor before
            raise NanoError(f"{path}: tensor {name} starts at byte {begin}, not {end} (overlapping or corrupt offsets)")
        end = stop
    if end != data_bytes:
        raise NanoError(f"{path}: the tensors cover {end} of {data_bytes} data bytes (truncated or corrupt file)")


def read_safetensors(path, names=None) -> dict:
    """Every tensor of the file (or those in `names`), each read straight into its own memory."""
    header, base = safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            f.seek(base + start)
            if end > start and f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise NanoError(f"{path} is truncated at tensor {name} (download it again)")
            tensors[name] = t
    return tensors


def write_safetensors(path, tensors: dict):
    """Write tensors as one safetensors file: the header first, then each tensor's bytes
    streamed straight from its memory (no copy of the whole model is built), through a temp
    file renamed at the end."""
    dtype_names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so tensor data is 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for t in tensors.values():
                t = t.detach().cpu().contiguous()
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------
# PEFT adapter folders (lora.py reads them, export.py writes them)


# PEFT (Hugging Face's adapter library) stores the same A (r, in) and B (out, r) per layer (also for
# GPT-2's Conv1D) as "base_model.model.<module>.lora_A.weight" in adapter_model.safetensors, its config
# in adapter_config.json (lora_alpha for alpha). PEFT options that change the computation are refused.
PEFT_PREFIX = "base_model.model."
PEFT_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                    "layer_replication", "lora_bias", "trainable_token_indices", "target_parameters",
                    "alora_invocation_tokens", "use_qalora", "use_bdlora")


def read_peft_adapter(folder: Path) -> dict:
    """A PEFT LoRA adapter folder (what PeftModel.save_pretrained writes) as lora.py's dict."""
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not (config_path.is_file() and weights.is_file()):
        raise NanoError(f"{folder} is not a PEFT adapter folder (it needs adapter_config.json and "
                        "adapter_model.safetensors, as PeftModel.save_pretrained writes them)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanoError(f"{config_path} is not JSON ({e.__class__.__name__}; save the adapter again)") from None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind != "LORA":
        raise NanoError(f"{config_path} describes a {kind} adapter, not LoRA (only PEFT's LoRA loads here)")
    used = [k for k in PEFT_UNSUPPORTED if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if used:
        raise NanoError(f"{config_path} uses PEFT options lora.py does not implement: {', '.join(used)} "
                        "(train the adapter without them)")
    if not (isinstance(config.get("r"), int) and isinstance(config.get("lora_alpha"), (int, float))):
        raise NanoError(f"{config_path} lacks an integer 'r' and a numeric 'lora_alpha' (not a LoRA config)")
    sd = {}
    for name, tensor in read_safetensors(weights).items():
        if not (name.startswith(PEFT_PREFIX) and name.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise NanoError(f"{weights} holds {name!r}, not a LoRA A or B weight (PEFT names them "
                            f"{PEFT_PREFIX}<module>.lora_A.weight; other tensors are not supported)")
        sd[name.removeprefix(PEFT_PREFIX)] = tensor
    if not sd:
        raise NanoError(f"{weights} holds no LoRA weights (save the adapter again)")
    sd["lora_config"] = dict(r=config["r"], alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout") or 0.0),
                             targets=sorted({k.rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in sd}),  # module names
                             use_rslora=bool(config.get("use_rslora")))
    sd["base"] = config.get("base_model_name_or_path")
    return sd
