"""Export a nanollm checkpoint to the ecosystem's formats: Hugging Face, GGUF (llama.cpp), PEFT.

A checkpoint of this repo is a torch.save dict only nanollm reads. Each format below is the
same weights under the names, layouts and metadata another tool expects, and each is checked
in tests/test_export.py by the library that owns it:

- Hugging Face (`--to hf DIR`): config.json in the architecture's own schema (GPT-2 as
  GPT2LMHeadModel; the Llama family as LlamaForCausalLM, Qwen2ForCausalLM or
  Qwen3ForCausalLM), model.safetensors (GPT.to_hf_state_dict: HF's GPT-2 keeps its
  projections as Conv1D, weight (in, out), so they are transposed back), and the
  tokenizer: tokenizer.json (+ GPT-2's vocab.json and merges.txt) for a byte-level BPE
  ("gpt2", a bpe.py file, a tokenizer.json), a small tokenizer.json for characters.
  transformers' AutoModelForCausalLM and AutoTokenizer load the folder, and so does
  gpt.load_pretrained.
- GGUF v3 (`--to gguf FILE`), the one-file format of llama.cpp and Ollama: a header, typed
  metadata (the architecture's hyperparameters, the tokenizer as tokenizer.ggml.*), tensor
  infos, then aligned tensor data in F32, F16, Q8_0 (8-bit blocks: quantize_q8_0), Q4_0 or
  Q4_K (4-bit blocks: quantize_q4_0, quantize_q4_k; quantize.py teaches the idea). The
  names, tensor layouts (Llama's q/k rows reordered for llama.cpp's RoPE) and metadata keys
  are those of llama.cpp's own converter, convert_hf_to_gguf.py, and the bytes equal what
  gguf-py's GGUFWriter writes of them; the writer here is ~100 lines.
- PEFT (`--to peft DIR`): a LoRA adapter of lora.py as adapter_config.json +
  adapter_model.safetensors with PEFT's key names (base_model.model.<HF module>.lora_A.weight),
  so `PeftModel.from_pretrained(AutoModelForCausalLM..., DIR)` applies it to the HF export of its base.

Run:
  python export.py --ckpt out/ckpt.pt --to hf out-hf
  python export.py --ckpt out/ckpt.pt --to gguf out/model.gguf --gguf_type q8_0
  python export.py --adapter out-lora/adapter.pt --to peft out-peft
  python export.py --ckpt out/ckpt.pt --adapter out-lora/adapter.pt --to hf out-merged  (LoRA merged in)
  python export.py --ckpt out/ckpt.pt --to torch_export out/model.pt2   (then: python examples/run_exported.py out/model.pt2)
  python export.py --ckpt out/ckpt.pt --to onnx out/model.onnx          (inference without nanollm: see the end of this file)
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bpe
import gpt
import hf_io
import lora
import tokenizer
from common import NanoError, atomic_write, cli, parse_config, remove_stale_temps, stale_temps

# ----------------------------------------------------------------------------------------
# GGUF v3 (github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian:
#
#   b"GGUF" | version u32 = 3 | tensor count u64 | metadata count u64
#   metadata, one after the other: key (string) | value type u32 | value
#   tensor infos: name (string) | n_dims u32 | dims u64 each | ggml type u32 | data offset u64
#   zero padding to the alignment (32), then the tensor data, each tensor at its offset
#
# A string is its UTF-8 length u64 + bytes; an array is element type u32 + count u64 +
# elements. dims are ggml's order, fastest-varying first: a torch (rows, cols) weight is
# written (cols, rows), its bytes unchanged (row-major either way).

GGUF_VERSION, GGUF_ALIGNMENT = 3, 32
# metadata value types (gguf_type)
U8, I8, U16, I16, U32, I32, F32_VALUE, BOOL, STRING, ARRAY, U64, I64, F64_VALUE = range(13)
_SCALAR_FORMAT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32_VALUE: "<f",
                  BOOL: "<?", U64: "<Q", I64: "<q", F64_VALUE: "<d"}
# tensor types (ggml_type) and what general.file_type (llama_ftype) calls a file of mostly that type
# (q4_k: every 2-D weight Q4_K, llama.cpp's MOSTLY_Q4_K_S; its Q4_K_M mixes in Q6_K tensors)
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_Q4_K = 0, 1, 2, 8, 12
GGUF_TYPES = {"f32": (GGML_F32, 0), "f16": (GGML_F16, 1), "q8_0": (GGML_Q8_0, 7), "q4_0": (GGML_Q4_0, 2),
              "q4_k": (GGML_Q4_K, 14)}
Q8_0_BLOCK, Q4_0_BLOCK, QK_K = 32, 32, 256
BLOCKS = {GGML_Q8_0: (Q8_0_BLOCK, 34), GGML_Q4_0: (Q4_0_BLOCK, 18), GGML_Q4_K: (QK_K, 144)}  # weights, bytes


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(kind: int, value) -> bytes:
    """One typed metadata value: (STRING, "gpt2"), (U32, 12), (ARRAY, (I32, [1, 1, 3]))."""
    if kind == STRING:
        return _gguf_string(value)
    if kind == ARRAY:
        item_kind, items = value
        if item_kind in _SCALAR_FORMAT:  # one pack call for the whole array (50k token types)
            body = struct.pack(f"<{len(items)}{_SCALAR_FORMAT[item_kind][1]}", *items)
        else:
            body = b"".join(_gguf_value(item_kind, x) for x in items)
        return struct.pack("<IQ", item_kind, len(items)) + body
    return struct.pack(_SCALAR_FORMAT[kind], value)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0, ggml's 8-bit format: every row is cut into blocks of 32 consecutive weights;
    a block is stored as one fp16 scale d = max|x| / 127 followed by 32 int8 values
    q = round(x / d), so x ~ d * q: 34 bytes per 32 weights (8.5 bits per weight) and an
    error of at most d / 2 per weight (plus the fp16 rounding of d), relative to the
    block's own largest weight, so an outlier costs precision only within its block.
    Rounding is half away from zero (C's roundf) with the scale's fp32 reciprocal, as
    ggml's quantize_row_q8_0_ref, so the bytes are llama.cpp's own.
    x: (..., K) with K % 32 == 0 -> uint8 (n_blocks, 34), blocks in row-major order."""
    if x.shape[-1] % Q8_0_BLOCK:
        raise NanoError(f"Q8_0 needs rows of a multiple of {Q8_0_BLOCK} values (got {x.shape[-1]}; use f16)")
    blocks = x.detach().float().reshape(-1, Q8_0_BLOCK)
    out = torch.empty(blocks.shape[0], 2 + Q8_0_BLOCK, dtype=torch.uint8)
    for start in range(0, blocks.shape[0], 1 << 15):  # 4 MiB at a time: the temporaries stay in cache
        b = blocks[start:start + (1 << 15)]
        d = b.abs().amax(dim=1, keepdim=True) / 127
        scaled = b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        # |scaled| rounded half up as floor(a) + floor(2 * (a - floor(a))), exactly gguf-py's np_roundf
        magnitude = scaled.abs()
        whole = magnitude.floor()
        q = magnitude.sub_(whole).mul_(2).floor_().add_(whole).copysign_(scaled)
        out[start:start + len(b), :2] = d.half().view(torch.uint8)  # the fp16 scale's two bytes
        out[start:start + len(b), 2:] = q.to(torch.int8).view(torch.uint8)
    return out


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0, ggml's plain 4-bit format: blocks of 32 consecutive weights, each an fp16 scale
    d = m / -8 (m: the block's value of largest magnitude, sign kept) and 32 codes q in 0..15,
    x ~ d * (q - 8), two codes a byte (weight j low nibble, weight j + 16 high): 18 bytes per
    32 weights (4.5 bits). The extreme value lands exactly on code 0; the other end of the
    range, one step short, is clamped to 15. q = trunc(x / d + 8.5) with the scale's fp32
    reciprocal, as ggml's quantize_row_q4_0_ref and gguf-py, so the bytes are llama.cpp's.
    x: (..., K) with K % 32 == 0 -> uint8 (n_blocks, 18), blocks in row-major order."""
    if x.shape[-1] % Q4_0_BLOCK:
        raise NanoError(f"Q4_0 needs rows of a multiple of {Q4_0_BLOCK} values (got {x.shape[-1]}; use f16)")
    blocks = x.detach().float().reshape(-1, Q4_0_BLOCK)
    out = torch.empty(blocks.shape[0], 2 + Q4_0_BLOCK // 2, dtype=torch.uint8)
    for start in range(0, blocks.shape[0], 1 << 15):
        b = blocks[start:start + (1 << 15)]
        d = b.gather(1, b.abs().argmax(dim=1, keepdim=True)) / -8  # argmax: the first of equal maxima
        q = (b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d) + 8.5).trunc_().clamp_(max=15).to(torch.uint8)
        out[start:start + len(b), :2] = d.half().view(torch.uint8)
        out[start:start + len(b), 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out


def fit_scale_min(x: torch.Tensor, weights: torch.Tensor, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    """ggml's make_qkx2_quants for rows of x (n, 32): x ~ scale * L - m with codes L in 0..nmax.
    Start from the row's [min(x, 0), max x]; then try 21 slightly stretched grids, and for each
    the least-squares scale and offset of the resulting codes (weighted by `weights`); keep the
    best (a later grid starts from the best offset so far, as ggml's loop does). A flat row gets
    scale 0 and L = 0. Returns (scale (n,), m (n,) >= 0, L (n, 32))."""
    lo, hi = x.amin(1).clamp(max=0), x.amax(1)
    flat = hi == lo
    sum_w, sum_x = weights.sum(1), (weights * x).sum(1)

    def codes(iscale, lo):
        return torch.round(iscale[:, None] * (x - lo[:, None])).clamp_(0, nmax)

    scale = (hi - lo) / nmax
    L = codes(nmax / (hi - lo).where(~flat, 1.0), lo)
    best = (weights * (scale[:, None] * L + lo[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):
        aux = codes((rmin + rdelta * step + nmax) / (hi - lo).where(hi > lo, 1.0), lo)
        sum_l, sum_l2, sum_xl = (weights * aux).sum(1), (weights * aux * aux).sum(1), (weights * aux * x).sum(1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # the offset may only lower the grid: else fit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = (weights * (this_scale[:, None] * aux + this_min[:, None] - x) ** 2).sum(1)
        better = (D > 0) & (err < best) & ~flat
        L, best = torch.where(better[:, None], aux, L), torch.where(better, err, best)
        scale, lo = torch.where(better, this_scale, scale), torch.where(better, this_min, lo)
    return scale.where(~flat, 0.0), -lo, L.where(~flat[:, None], 0.0)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """Q4_K, llama.cpp's k-quant 4-bit format: super-blocks of 256 weights = 8 sub-blocks of 32.
    A sub-block has its own scale and offset, x ~ d * sc * q - dmin * m, with q in 0..15 and
    sc, m 6-bit integers relative to the super-block's fp16 d and dmin: 144 bytes per 256
    weights (4.5 bits), layout d | dmin | 12 bytes of packed (sc, m) | 128 bytes of codes (each
    64 weights: the first 32 in the low nibbles, the next 32 in the high). Scales and offsets
    are fitted per sub-block as ggml's quantize_row_q4_K_ref (fit_scale_min, weights
    mean-square + |x|), then rounded to 6 bits, and the codes recomputed against the rounded
    ones. x: (..., K) with K % 256 == 0 -> uint8 (n_superblocks, 144)."""
    if x.shape[-1] % QK_K:
        raise NanoError(f"Q4_K needs rows of a multiple of {QK_K} values (got {x.shape[-1]}; use q4_0)")
    sub = x.detach().float().reshape(-1, 32)
    weights = sub.pow(2).mean(1, keepdim=True).sqrt() + sub.abs()
    scale, m, L = fit_scale_min(sub, weights)
    scale, m, L = scale.view(-1, 8), m.view(-1, 8), L.view(-1, 8, 32)
    max_scale, max_min = scale.amax(1, keepdim=True), m.amax(1, keepdim=True)
    ls = torch.round(scale * torch.where(max_scale > 0, 63 / max_scale, 0.0)).clamp(max=63)
    lm = torch.round(m * torch.where(max_min > 0, 63 / max_min, 0.0)).clamp(max=63)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()
    step = (d.float() * ls)[..., None]  # codes again, against the scales as stored
    fresh = torch.round((sub.view(-1, 8, 32) + (dmin.float() * lm)[..., None]) / step.where(step != 0, 1.0)).clamp(0, 15)
    L = torch.where(step != 0, fresh, L).to(torch.uint8)
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    packed = torch.cat([ls[:, :4] | (ls[:, 4:] >> 4 << 6), lm[:, :4] | (lm[:, 4:] >> 4 << 6),
                        (ls[:, 4:] & 0xF) | (lm[:, 4:] << 4)], dim=1)  # 12 bytes: gguf-py's get_scale_min
    L = L.view(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), packed, qs], dim=1)


QUANTIZERS = {GGML_Q8_0: quantize_q8_0, GGML_Q4_0: quantize_q4_0, GGML_Q4_K: quantize_q4_k}


def tensor_bytes(t: torch.Tensor, ggml_type: int):
    """The tensor's data as ggml stores it: a uint8 numpy array (a buffer, no extra copy)."""
    if ggml_type == GGML_F32:
        out = t.detach().float()
    elif ggml_type == GGML_F16:
        out = t.detach().half()
    else:
        out = QUANTIZERS[ggml_type](t)
    return out.contiguous().cpu().view(torch.uint8).numpy().reshape(-1)


def _nbytes(shape, ggml_type: int) -> int:
    n = math.prod(shape)
    if ggml_type in BLOCKS:
        size, nbytes = BLOCKS[ggml_type]
        return n // size * nbytes
    return {GGML_F32: 4 * n, GGML_F16: 2 * n}[ggml_type]


def write_gguf(path, metadata: dict, tensors: list[tuple[str, torch.Tensor, int]]):
    """metadata: {key: (value type, value)}; tensors: [(name, tensor, ggml type)] in file
    order. Written to a temp file, then renamed; tensor data is streamed one at a time."""
    def aligned(n):
        return n + (-n % GGUF_ALIGNMENT)

    header = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, (kind, value) in metadata.items():
        header += [_gguf_string(key), struct.pack("<I", kind), _gguf_value(kind, value)]
    offset = 0
    for name, t, ggml_type in tensors:
        dims = list(reversed(t.shape))  # ggml order: fastest-varying dimension first
        header += [_gguf_string(name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                   struct.pack("<IQ", ggml_type, offset)]
        offset = aligned(offset + _nbytes(t.shape, ggml_type))
    head = b"".join(header)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(head + b"\0" * (aligned(len(head)) - len(head)))
            for name, t, ggml_type in tensors:
                blob = tensor_bytes(t, ggml_type)
                f.write(blob)
                f.write(b"\0" * (aligned(len(blob)) - len(blob)))

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------
# The architectures: which Hugging Face and llama.cpp model each GPTConfig is


def hf_model_type(config: gpt.GPTConfig) -> str:
    """gpt2, llama, qwen2 (biases on q, k, v only) or qwen3 (QK-norm): the Hugging Face
    model_type whose config.json describes this GPTConfig, or a one-line error."""
    c = config
    if c.arch == "gpt2":
        if c.norm != "layernorm" or c.rope_theta or c.n_kv_head != c.n_head or c.qk_norm or c.qkv_bias \
                or c.head_dim != c.n_embd // c.n_head:
            raise NanoError("a GPT-2 block with Llama switches (RMSNorm, RoPE, GQA, QK-norm, qkv_bias or "
                            "head_dim) has no Hugging Face or llama.cpp architecture (use arch 'llama')")
        return "gpt2"
    if c.norm != "rmsnorm" or not c.rope_theta:
        raise NanoError("a Llama block needs norm 'rmsnorm' and rope_theta > 0 to be exported (LlamaForCausalLM has both)")
    if c.qk_norm:
        if c.bias or c.qkv_bias:
            raise NanoError("QK-norm with biases has no Hugging Face architecture (Qwen3 has no biases)")
        return "qwen3"
    if c.qkv_bias:
        return "qwen2"  # Qwen2: biases on q, k and v, none elsewhere
    if c.sliding_window:
        return "mistral"  # Llama's block and names with a sliding window
    return "llama"  # bias=True: Llama's attention_bias and mlp_bias


HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}


def hf_config(model: gpt.GPT, eot_id, dtype: str = "float32") -> dict:
    """config.json in the architecture's own schema (the inverse of hf_io.hf_config_fields)."""
    c, kind = model.config, hf_model_type(model.config)
    common = {"architectures": [HF_ARCHITECTURES[kind]], "model_type": kind, "vocab_size": c.vocab_size,
              "tie_word_embeddings": c.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
              "torch_dtype": dtype}
    if kind == "gpt2":
        return common | {
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": c.mlp_hidden or None, "activation_function": {"tanh": "gelu_new", "exact": "gelu"}[c.gelu],
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "layer_norm_epsilon": c.norm_eps, "initializer_range": 0.02, "scale_attn_weights": True}
    rope_scaling, max_positions = rope_config(c)
    out = common | {
        "hidden_size": c.n_embd, "intermediate_size": model.transformer.h[0].mlp.gate_proj.out_features,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": max_positions,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": rope_scaling,
        "attention_dropout": c.dropout, "initializer_range": 0.02}
    if kind == "llama":
        out |= {"attention_bias": c.bias or c.attn_bias, "mlp_bias": c.bias}
    if kind == "mistral":
        if c.bias or c.attn_bias:
            raise NanoError("Mistral has no biases (drop bias/attn_bias, or the sliding window)")
        out |= {"sliding_window": c.sliding_window}
    if kind in ("qwen2", "qwen3"):  # max_window_layers 0: the window (if any) on every layer
        out |= {"use_sliding_window": bool(c.sliding_window), "sliding_window": c.sliding_window or None,
                "max_window_layers": 0 if c.sliding_window else c.n_layer}
    if kind == "qwen3":
        out |= {"attention_bias": c.attn_bias}
    return out


def rope_config(c: gpt.GPTConfig) -> tuple[dict | None, int]:
    """(rope_scaling, max_position_embeddings) of config.json: the inverse of hf_io.rope_fields
    (linear and dynamic name the pretraining length, the others the scaled context)."""
    if not c.rope_scaling:
        return None, c.block_size
    scaling = {"rope_type": c.rope_type, "factor": c.rope_scaling}
    if c.rope_type in ("linear", "dynamic"):
        return scaling, c.rope_original_max_position
    scaling["original_max_position_embeddings"] = c.rope_original_max_position
    if c.rope_type == "llama3":
        scaling |= {"low_freq_factor": c.rope_low_freq_factor, "high_freq_factor": c.rope_high_freq_factor}
    else:  # yarn
        scaling |= {"beta_slow": c.rope_low_freq_factor, "beta_fast": c.rope_high_freq_factor,
                    "attention_factor": c.rope_attention_factor, "truncate": c.rope_truncate}
    return scaling, c.block_size


def hf_state_dict(model: gpt.GPT) -> dict:
    """The Hugging Face model's tensors (gpt.GPT.to_hf_state_dict). HF's GPT-2 always has
    biases: a bias=False GPT-2 gets zero ones (the same function). A tied head is left out,
    as save_pretrained does."""
    sd = model.to_hf_state_dict()
    if model.config.arch == "gpt2" and not model.config.bias:
        for name, t in list(sd.items()):
            if name.endswith(".weight") and not name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
                # Conv1D (in, out) and LayerNorm (C,) biases have the size of the output
                sd.setdefault(name[:-len("weight")] + "bias", torch.zeros(t.shape[-1], dtype=t.dtype))
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# ----------------------------------------------------------------------------------------
# Hugging Face names -> llama.cpp names (gguf-py's tensor_mapping.py). GGUF is written from
# the HF state dict, as llama.cpp's converter reads it, so a table per family is all the
# naming there is. llama.cpp's arch: gpt2, llama, qwen2, qwen3 (the HF model_type).

_LAYER = r"model\.layers\.(\d+)\."
GGUF_NAMES = {
    "gpt2": [
        (r"transformer\.wte\.weight", "token_embd.weight"),
        (r"transformer\.wpe\.weight", "position_embd.weight"),
        (r"transformer\.h\.(\d+)\.ln_1\.(weight|bias)", r"blk.\1.attn_norm.\2"),
        (r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blk.\1.attn_qkv.\2"),
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
        (r"transformer\.h\.(\d+)\.ln_2\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
        (r"transformer\.h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blk.\1.ffn_up.\2"),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
        (r"transformer\.ln_f\.(weight|bias)", r"output_norm.\1"),
        (r"lm_head\.weight", "output.weight"),
    ],
    "llama": [  # also qwen2 and qwen3
        (r"model\.embed_tokens\.weight", "token_embd.weight"),
        (_LAYER + r"input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
        (_LAYER + r"self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
        (_LAYER + r"self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
        (_LAYER + r"self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
        (_LAYER + r"self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
        (_LAYER + r"self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
        (_LAYER + r"self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
        (_LAYER + r"post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
        (_LAYER + r"mlp\.gate_proj\.(weight|bias)", r"blk.\1.ffn_gate.\2"),
        (_LAYER + r"mlp\.up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"),
        (_LAYER + r"mlp\.down_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
        (r"model\.norm\.weight", "output_norm.weight"),
        (r"lm_head\.weight", "output.weight"),
    ],
}


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's Llama rotates channel i of a head with channel i + head_dim/2; llama.cpp's
    "llama" architecture (as Meta's original code) rotates channels 2i and 2i+1. Reordering
    the rows of q_proj and k_proj (weights and biases) per head, [0, hd/2, 1, hd/2+1, ...],
    makes the same model: the converter's `permute`. Qwen2/3 in llama.cpp rotate as HF does."""
    # (heads * hd, ...) -> (heads, 2 halves, hd/2, ...) -> (heads, hd/2, 2, ...): pairs side by side
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor_type(gguf_name: str, t: torch.Tensor, wanted: int) -> int:
    """The converter's rule: 1-D tensors (norms, biases) and the position embedding stay F32;
    a quantized tensor whose rows do not split into its blocks falls back: Q4_K (256) to Q4_0
    (llama.cpp's quantizer picks Q5_0 there; Q4_0 keeps the bits), Q4_0 and Q8_0 (32) to F16."""
    if t.dim() <= 1 or gguf_name.endswith("_norm.weight") or gguf_name.startswith("position_embd"):
        return GGML_F32
    if wanted == GGML_Q4_K and t.shape[-1] % QK_K:
        wanted = GGML_Q4_0
    if wanted in BLOCKS and t.shape[-1] % BLOCKS[wanted][0]:
        return GGML_F16
    return wanted


def llama3_rope_factors(c: gpt.GPTConfig) -> torch.Tensor:
    """rope_freqs.weight, llama.cpp's form of Llama 3.1's rope scaling: per rotation
    frequency, the factor its wavelength is stretched by (1 fast, rope_scaling slow)."""
    hd = c.head_dim
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    wavelen = 2 * math.pi / freqs
    smooth = (c.rope_original_max_position / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    blended = 1 / ((1 - smooth) / c.rope_scaling + smooth)
    return torch.where(wavelen < c.rope_original_max_position / c.rope_high_freq_factor, torch.ones_like(freqs),
                       torch.where(wavelen > c.rope_original_max_position / c.rope_low_freq_factor,
                                   torch.full_like(freqs, c.rope_scaling), blended))


def gguf_tensors(model: gpt.GPT, wanted: int) -> list[tuple[str, torch.Tensor, int]]:
    """(GGUF name, tensor, ggml type) of every tensor, in the HF state dict's order."""
    c, kind = model.config, hf_model_type(model.config)
    table = [(re.compile(pattern), new) for pattern, new in GGUF_NAMES["gpt2" if kind == "gpt2" else "llama"]]
    out = []
    if c.rope_scaling and c.rope_type != "llama3" or c.sliding_window:
        raise NanoError("GGUF export writes Llama 3.1's rope scaling and no sliding window (this model has "
                        f"{'a sliding window' if c.sliding_window else repr(c.rope_type) + ' rope scaling'}; export --to hf)")
    if c.rope_scaling:
        out.append(("rope_freqs.weight", llama3_rope_factors(c), GGML_F32))
    for name, t in hf_state_dict(model).items():
        gguf_name = next((pattern.sub(new, name) for pattern, new in table if pattern.fullmatch(name)), None)
        if gguf_name is None:
            raise NanoError(f"no GGUF name for tensor {name!r} of a {kind} model (export supports gpt2 and the llama family)")
        if kind == "gpt2" and name.endswith(hf_io.HF_CONV1D_WEIGHTS):
            t = t.t()  # Conv1D (in, out) -> (out, in), as the converter does
        if kind == "llama" and ".q_proj." in name:
            t = interleave_rope_rows(t, c.n_head)
        if kind == "llama" and ".k_proj." in name:
            t = interleave_rope_rows(t, c.n_kv_head)
        out.append((gguf_name, t, gguf_tensor_type(gguf_name, t, wanted)))
    return out


def gguf_metadata(config: gpt.GPTConfig, name: str, file_type: int, ffn_hidden: int) -> dict:
    """general.* and the architecture's hyperparameters, under the keys llama.cpp reads."""
    c, arch = config, hf_model_type(config)
    meta = {"general.architecture": (STRING, arch), "general.name": (STRING, name),
            "general.file_type": (U32, file_type), "general.quantization_version": (U32, 2)}
    hparams = {"context_length": c.block_size, "embedding_length": c.n_embd, "feed_forward_length": ffn_hidden,
               "block_count": c.n_layer, "attention.head_count": c.n_head}
    meta |= {f"{arch}.{k}": (U32, v) for k, v in hparams.items()}
    if arch == "gpt2":
        return meta | {"gpt2.attention.layer_norm_epsilon": (F32_VALUE, c.norm_eps)}
    return meta | {f"{arch}.attention.head_count_kv": (U32, c.n_kv_head),
                   f"{arch}.attention.key_length": (U32, c.head_dim),
                   f"{arch}.attention.value_length": (U32, c.head_dim),
                   f"{arch}.attention.layer_norm_rms_epsilon": (F32_VALUE, c.norm_eps),
                   f"{arch}.rope.freq_base": (F32_VALUE, c.rope_theta),
                   f"{arch}.rope.dimension_count": (U32, c.head_dim),
                   f"{arch}.vocab_size": (U32, c.vocab_size)}


# ----------------------------------------------------------------------------------------
# Tokenizers: a byte-level BPE ("gpt2", a bpe.py file, a tokenizer.json) or characters


@functools.lru_cache(maxsize=4)  # building GPT-2's 50k merges takes a second: once per spec
def byte_bpe(spec: str) -> bpe.Tokenizer | None:
    """The tokenizer spec as a bpe.Tokenizer (vocab, merges, specials), None for characters; a
    "chat:" spec's base tokenizer (its chat tokens are in tokenizer_json)."""
    if spec is None:
        raise NanoError("the checkpoint records no tokenizer (save it with a tokenizer spec, e.g. 'gpt2')")
    spec = tokenizer.base_spec(spec)
    if spec.startswith("char:"):
        return None
    if spec == "gpt2":  # the GPT-2 files that ship in assets/
        return tokenizer.bpe_from_gpt2_files(tokenizer.GPT2_VOCAB_BPE, tokenizer.GPT2_ENCODER_JSON)
    tok = tokenizer.load_bpe(spec)
    return tok if isinstance(tok, bpe.Tokenizer) else None  # SentencePiece-style: its tokenizer.json as it is


@functools.lru_cache(maxsize=4)
def tokenizer_json(spec: str) -> dict:
    """Hugging Face's tokenizer.json of a spec: a tokenizer.json spec as it is; a byte-level
    BPE from bpe.Tokenizer.to_tokenizer_json; characters as a BPE whose vocabulary is the
    alphabet and which has no merges (every character one token), decoded by concatenation;
    a "chat:" spec as its base with sft.py's four chat tokens added (special, ids after the base's)."""
    if spec.startswith(tokenizer.CHAT_PREFIX):
        hf = json.loads(json.dumps(tokenizer_json(tokenizer.base_spec(spec))))  # a copy
        chat = tokenizer.load_tokenizer(spec)
        hf["added_tokens"] = hf.get("added_tokens") or []
        hf["added_tokens"] += [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True} for s, i in chat.special.items()]
        return hf
    if spec.endswith(".json"):
        return json.loads(Path(spec).read_text(encoding="utf-8"))
    tok = byte_bpe(spec)
    if tok is not None:
        return tokenizer.to_tokenizer_json(tok)
    alphabet = spec[len("char:"):]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {ch: i for i, ch in enumerate(alphabet)}, "merges": []}}


@functools.lru_cache(maxsize=4)
def chat_of(spec: str):
    """(chat_template, the token string that ends a turn, the ids that end a reply) of a chat
    model's spec: sft.py's "chat:" tokens (tokenizer.NANOLLM_CHAT_TEMPLATE, <|end|>), or the
    template beside a tokenizer.json; None for a base model."""
    if spec.startswith(tokenizer.CHAT_PREFIX):
        tok = tokenizer.load_tokenizer(spec)
        return tokenizer.nanollm_chat_template(tok), "<|end|>", (tok.end_id,)
    template = tokenizer.HFChatTemplate.find(spec)
    if template is None:
        return None
    return template.source, template.eos_token, tuple(tokenizer.stop_ids(tokenizer.load_tokenizer(spec), template))


def _merge_strings(merges) -> list[str]:
    """tokenizer.json writes a merge as "left right" or as ["left", "right"]."""
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_hf_tokenizer(folder: Path, spec: str, block_size: int, eot_id):
    """tokenizer.json, tokenizer_config.json (with a chat model's chat_template, its eos the
    token that ends a turn), and for a byte-level BPE GPT-2's vocab.json and merges.txt."""
    hf = tokenizer_json(spec)
    _write_json(folder / "tokenizer.json", hf, indent=None)  # megabytes: one line
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False}  # decode gives exactly what the tokens spell
    if byte_bpe(spec) is not None:  # byte-level BPE: GPT-2's two files as well, for its slow tokenizer
        added = {t["content"]: t["id"] for t in hf.get("added_tokens", [])}
        _write_json(folder / "vocab.json", hf["model"]["vocab"] | added, indent=None)
        merges = "\n".join(["#version: 0.2"] + _merge_strings(hf["model"]["merges"]))
        (folder / "merges.txt").write_text(merges + "\n", encoding="utf-8")
        config |= {"tokenizer_class": "GPT2Tokenizer" if spec == "gpt2" else "PreTrainedTokenizerFast",
                   "add_prefix_space": False}
    if eot_id is not None:
        end = next((t["content"] for t in hf.get("added_tokens", []) if t["id"] == eot_id), None)
        if end is not None:
            config |= {"bos_token": end, "eos_token": end} | ({"unk_token": end} if spec == "gpt2" else {})
    if (chat := chat_of(spec)) is not None:
        config |= {"chat_template": chat[0], "eos_token": chat[1]}
    _write_json(folder / "tokenizer_config.json", config)


# llama.cpp splits text with one of a fixed set of named pre-tokenizers (llama-vocab.cpp,
# these four with the regexes it uses); a GGUF file names the one that splits as its
# tokenizer does. The converter picks it by hashing the ids of a probe text; here the
# pieces of a probe text are compared.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_SPLIT = (r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA_CPP_PRE = {"gpt-2": [_GPT2_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
                 "qwen2": [_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")], "smollm": [r"\p{N}", _GPT2_SPLIT]}
_PROBE = ("Hello, World! It's  we'VE 12345 678\n\n\tx = f(a[1]) + 0.5;  \r\n  done...   Ünïcödé 日本語 "
          "émigré 👋🏽  ?!  'll 3.14159   \n")


def _pieces(steps, text: str):
    pieces = [text]
    for step in steps:
        if step == bpe.PREFIX_SPACE:
            return None  # a space prefix: none of llama.cpp's BPE pre-tokenizers adds one
        pieces = [q for p in pieces for q in bpe.split_isolated(bpe.compile_pattern(step), p)]
    return pieces


def llama_cpp_pre(tok: bpe.Tokenizer) -> str:
    ours = _pieces(tok.pre_tokenizer or (tok.pattern,), _PROBE)
    for name, steps in LLAMA_CPP_PRE.items():
        if ours is not None and _pieces(steps, _PROBE) == ours:
            return name
    raise NanoError(f"llama.cpp has no pre-tokenizer that splits text as this tokenizer does (it knows "
                    f"{', '.join(LLAMA_CPP_PRE)} here: GPT-2's or GPT-4's split pattern, Llama 3, Qwen2, SmolLM)")


def gguf_tokenizer(spec: str, n_vocab: int) -> dict:
    """tokenizer.ggml.*: llama.cpp's "gpt2" tokenizer model is byte-level BPE. Tokens are
    written in the byte alphabet (tokenizer.json's spelling), each with a type (1 normal,
    3 control, 4 user-defined, 5 unused), the list padded with [PAD<i>] up to the
    embedding's rows, as the converter does. A character tokenizer becomes a byte-level
    BPE without merges, which is exact when every character is one byte (ASCII)."""
    base = tokenizer.base_spec(spec)
    if base.startswith("char:"):
        alphabet = base[len("char:"):]
        if not alphabet.isascii():
            raise NanoError("GGUF has no character tokenizer and this alphabet is not ASCII (only an "
                            "ASCII alphabet maps onto llama.cpp's byte-level tokenizer; export --to hf instead)")
        table = tokenizer.bytes_to_unicode()
        by_id, types, merges, pre, eot_id = {i: table[ord(ch)] for i, ch in enumerate(alphabet)}, {}, [], "gpt-2", None
        for t in tokenizer_json(spec)["added_tokens"]:  # a chat model's chat tokens
            by_id[t["id"]], types[t["id"]] = t["content"], 3
    else:
        tok, hf = byte_bpe(spec), tokenizer_json(spec)
        if tok is None:
            raise NanoError("GGUF export of a SentencePiece-style tokenizer is not supported yet (export --to hf)")
        pre = llama_cpp_pre(tok)
        by_id = {i: t for t, i in hf["model"]["vocab"].items()}
        types = {}
        for t in hf.get("added_tokens", []):
            by_id[t["id"]], types[t["id"]] = t["content"], 3 if t.get("special") else 4
        merges, eot_id = _merge_strings(hf["model"]["merges"]), tok.eot_id
    if max(by_id) >= n_vocab:
        raise NanoError(f"the tokenizer has ids up to {max(by_id)}, the model only {n_vocab} rows")
    meta = {"tokenizer.ggml.model": (STRING, "gpt2"), "tokenizer.ggml.pre": (STRING, pre),
            "tokenizer.ggml.tokens": (ARRAY, (STRING, [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)])),
            "tokenizer.ggml.token_type": (ARRAY, (I32, [types.get(i, 1 if i in by_id else 5) for i in range(n_vocab)])),
            "tokenizer.ggml.merges": (ARRAY, (STRING, merges)),  # llama.cpp needs the key, even empty
            "tokenizer.ggml.add_bos_token": (BOOL, False)}  # nanollm encodes text without a BOS
    if eot_id is not None:
        meta |= {"tokenizer.ggml.bos_token_id": (U32, eot_id), "tokenizer.ggml.eos_token_id": (U32, eot_id)}
    if (chat := chat_of(spec)) is not None:  # llama.cpp reads the template and stops at the end of a turn
        meta |= {"tokenizer.chat_template": (STRING, chat[0]), "tokenizer.ggml.eos_token_id": (U32, chat[2][0]),
                 "tokenizer.ggml.eot_token_id": (U32, chat[2][0])}
    return meta


# ----------------------------------------------------------------------------------------
# The three exports


def eot_of(spec: str):
    """The base tokenizer's end-of-text id (a "chat:" spec's base), or None."""
    tok = byte_bpe(spec)
    if tok is None and spec.endswith(".json"):
        tok = tokenizer.load_bpe(spec)  # SentencePiece-style: </s>, <eos>
    return None if tok is None else tok.eot_id


def export_hf(model: gpt.GPT, spec: str, folder: Path, dtype=torch.float32):
    """config.json, model.safetensors, the tokenizer files; a chat model's eos (config.json and
    generation_config.json) is the token that ends a turn, as in the chat models of the hub."""
    config = hf_config(model, eot_of(spec), str(dtype).removeprefix("torch."))
    if (chat := chat_of(spec)) is not None:
        stops = list(chat[2])
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
        _write_json(folder / "generation_config.json", {"bos_token_id": config["bos_token_id"],
                                                        "eos_token_id": config["eos_token_id"]})
    hf_io.write_safetensors(folder / "model.safetensors", {k: v.to(dtype) for k, v in hf_state_dict(model).items()})
    _write_json(folder / "config.json", config)
    write_hf_tokenizer(folder, spec, model.config.block_size, eot_of(spec))


def export_gguf(model: gpt.GPT, spec: str, path: Path, gguf_type: str, name: str):
    if gguf_type not in GGUF_TYPES:
        raise NanoError(f"unknown --gguf_type {gguf_type!r} ({', '.join(GGUF_TYPES)})")
    ggml_type, file_type = GGUF_TYPES[gguf_type]
    if model.config.arch == "gpt2" and model.config.gelu == "exact":  # train.py's default from scratch
        print("note: llama.cpp runs GPT-2's GELU as the tanh approximation; this model was trained with the exact "
              "one (each activation off by at most 5e-4)")
    mlp = model.transformer.h[0].mlp
    ffn_hidden = (mlp.c_fc if model.config.arch == "gpt2" else mlp.up_proj).out_features
    metadata = gguf_metadata(model.config, name, file_type, ffn_hidden) | gguf_tokenizer(spec, model.config.vocab_size)
    write_gguf(path, metadata, gguf_tensors(model, ggml_type))


def adapter_arch(adapter: dict) -> str:
    """GPT-2's fused projections (c_attn, c_proj, c_fc) or the Llama family's (q_proj, ...)."""
    modules = {k.rsplit(".", 3)[-3] for k in adapter if torch.is_tensor(adapter[k])}
    return "gpt2" if modules & {"c_attn", "c_proj", "c_fc"} else "llama"


def peft_state_dict(adapter: dict) -> dict:
    """lora.py's "<module>.lora_A.weight" -> PEFT's "base_model.model.<HF module>.lora_A.weight".
    A (r, in) and B (out, r) keep their shapes: PEFT's LoRA stores them as nn.Linear weights,
    also on GPT-2's Conv1D layers."""
    arch = adapter_arch(adapter)
    return {hf_io.PEFT_PREFIX + hf_io.to_hf_name(k, arch): v.contiguous() for k, v in adapter.items() if torch.is_tensor(v)}


def peft_config(adapter: dict) -> dict:
    cfg, base = adapter["lora_config"], adapter.get("base") or ""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["alpha"],
            "lora_dropout": cfg.get("dropout", 0.0), "target_modules": sorted(cfg["targets"]),
            "use_rslora": cfg.get("use_rslora", False), "bias": "none",
            "fan_in_fan_out": adapter_arch(adapter) == "gpt2",  # HF GPT-2's Conv1D weights are (in, out)
            "base_model_name_or_path": "openai-community/" + base if base in hf_io.GPT2_SIZES else base,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}


def export_peft(adapter: dict, folder: Path):
    hf_io.write_safetensors(folder / "adapter_model.safetensors", peft_state_dict(adapter))
    _write_json(folder / "adapter_config.json", peft_config(adapter))


# ----------------------------------------------------------------------------------------
# Plumbing: loading, atomic output, CLI


def _write_json(path: Path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def load_model(ckpt_path: str, adapter_path: str = ""):
    """(model, tokenizer spec) from a checkpoint, with a lora.py or PEFT adapter merged in if given."""
    ckpt = gpt.read_checkpoint(ckpt_path)  # NanoError for a missing or foreign file
    if "moe" in ckpt:
        raise NanoError(f"{ckpt_path} is a mixture-of-experts model (moe.py); the GPT-2 and Llama "
                        "architectures of HF and llama.cpp have no experts, so it cannot be exported")
    model = gpt.model_from_checkpoint(ckpt, ckpt_path)
    hf_model_type(model.config)  # a config no format describes: say so before anything is written
    if adapter_path:
        lora.merge_lora(lora.load_lora(model, adapter_path))
    return model.eval(), ckpt.get("tokenizer")


# What an export writes into its folder; --force replaces a folder only if it holds nothing else,
# so a mistyped output (the run folder, the home folder) can never delete a user's files.
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt", "adapter_config.json", "adapter_model.safetensors"}


def check_output(out: Path, force: bool, is_dir: bool, sources=()):
    """Before any work: `out` may be written (new, an empty folder, or --force over an earlier export)."""
    resolved = out.resolve()
    for source in sources:  # the checkpoint or adapter being exported must survive the export
        if source and (resolved == Path(source).resolve() or resolved in Path(source).resolve().parents):
            raise NanoError(f"{out} holds the input {source} (write the export elsewhere)")
    if not out.exists():
        return
    if out.is_dir() != is_dir:
        raise NanoError(f"{out} exists and is a {'file' if is_dir else 'folder'} (choose another output)")
    if (not is_dir or any(out.iterdir())) and not force:
        raise NanoError(f"{out} exists and is not empty (pass --force to replace it)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES or not p.is_file()) if is_dir else []
    if foreign:
        raise NanoError(f"{out} holds files an export does not write ({', '.join(foreign[:3])}{', ...' * (len(foreign) > 3)}); "
                        "--force replaces only an earlier export (choose a new folder)")


def finish_interrupted_swap(out: Path):
    """A kill between write_folder's two renames leaves no `out`, only `.out.old<PID>` (the old
    export) and `.out.tmp<PID>` (the new one, complete: the swap starts after writing). Finish it."""
    stale = dict((p.name, p) for p, _ in stale_temps(out, tags=("tmp", "old")))
    for name, path in stale.items():
        if not out.exists() and ".old" in name[len(out.name) + 1:]:
            new = stale.get(name.replace(f"{out.name}.old", f"{out.name}.tmp", 1))
            os.replace(new if new is not None and new.exists() else path, out)
            print(f"finished the export into {out} that an interrupted run left half-swapped")
    remove_stale_temps(out, tags=("tmp", "old"))


def write_folder(out: Path, write):
    """write(tmp) fills a temp folder beside `out`, then the old folder is renamed aside and the
    new one in: a kill at any moment leaves the old folder or the new one (or both renamed aside,
    which the next run finishes), never a half-written one."""
    out = out.resolve()  # `.` has no name to put a temp folder beside
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{tag}{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class ExportConfig:
    ckpt: str = field(default="out/ckpt.pt", metadata={"help": "checkpoint to export (train.py, lora.py --merge, ...)"})
    to: str = field(default="hf", metadata={"help": "hf | gguf | peft | torch_export | onnx"})
    out: str = field(default="", metadata={"help": "output folder (hf, peft) or .gguf file; also accepted as the word after --to"})
    adapter: str = field(default="", metadata={"help": "a lora.py adapter.pt (or PEFT folder): --to peft exports it; with hf/gguf it is merged into --ckpt first"})
    gguf_type: str = field(default="f16", metadata={"help": "f32 | f16 | q8_0 | q4_0 | q4_k: type of the 2-D weights (1-D ones stay f32, as llama.cpp's converter)"})
    dtype: str = field(default="float32", metadata={"help": "hf: dtype of model.safetensors (float32, bfloat16, float16)"})
    name: str = field(default="", metadata={"help": "gguf: general.name ('': the checkpoint's file name)"})
    force: bool = field(default=False, metadata={"help": "replace an existing output"})


FORMATS = ("hf", "gguf", "peft", "torch_export", "onnx")
FILE_FORMATS = ("gguf", "torch_export", "onnx")  # one file each; the others write a folder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _output_after_to(argv: list[str]) -> list[str]:
    """`--to hf DIR` is `--to hf --out DIR`: the word after the format names the output."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        at = i + 1 if arg.startswith("--to=") else i + 2 if arg == "--to" else None
        if at is not None and at < len(argv) and not argv[at].startswith("-"):
            return argv[:at] + ["--out", argv[at]] + argv[at + 1:]
    return argv


@cli
def main(argv=None):
    argv = _output_after_to(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(ExportConfig, argv, __doc__)
    if cfg.to not in FORMATS:
        raise NanoError(f"unknown --to {cfg.to!r} (choose one of {', '.join(FORMATS)})")
    if not cfg.out:
        raise NanoError(f"no output given (python export.py --to {cfg.to} OUTPUT)")
    if cfg.to == "gguf" and cfg.gguf_type not in GGUF_TYPES:
        raise NanoError(f"unknown --gguf_type {cfg.gguf_type!r} ({', '.join(GGUF_TYPES)})")
    if cfg.dtype not in DTYPES:
        raise NanoError(f"unknown --dtype {cfg.dtype!r} ({', '.join(DTYPES)})")
    if cfg.to == "peft" and not cfg.adapter:
        raise NanoError("--to peft exports a LoRA adapter (pass --adapter out-lora/adapter.pt)")
    out = Path(cfg.out)
    if cfg.to not in FILE_FORMATS:
        finish_interrupted_swap(out.resolve())  # first: the folder a kill left renamed aside is the user's
    check_output(out, cfg.force, is_dir=cfg.to not in FILE_FORMATS, sources=(cfg.ckpt if cfg.to != "peft" else "", cfg.adapter))
    t0 = time.perf_counter()
    if cfg.to == "peft":
        adapter = lora.read_adapter(cfg.adapter)
        write_folder(out, lambda tmp: export_peft(adapter, tmp))
    else:
        model, spec = load_model(cfg.ckpt, cfg.adapter)
        if cfg.to in ("torch_export", "onnx"):
            runner_tokenizer(spec)  # tokenizer problems are one-line errors before the slow tracing
            out.parent.mkdir(parents=True, exist_ok=True)
            (export_torch if cfg.to == "torch_export" else export_onnx)(model, spec, out)
        elif cfg.to == "gguf":  # tokenizer problems are one-line errors before anything is written
            gguf_tokenizer(spec, model.config.vocab_size)
            out.parent.mkdir(parents=True, exist_ok=True)  # write_gguf writes a temp file and renames it
            export_gguf(model, spec, out, cfg.gguf_type, cfg.name or Path(cfg.ckpt).stem)
        else:
            tokenizer_json(spec)
            write_folder(out, lambda tmp: export_hf(model, spec, tmp, DTYPES[cfg.dtype]))
    size = folder_bytes(out)
    print(f"wrote {out} ({cfg.to}, {size / 2**20:,.1f} MiB)" if size >= 2**20 else f"wrote {out} ({cfg.to}, "
          f"{size / 2**10:,.1f} KiB)", f"in {time.perf_counter() - t0:.1f} s")
    return out



# ----------------------------------------------------------------------------------------
# Inference without nanollm: torch.export (`--to torch_export FILE.pt2`) and ONNX (`--to onnx FILE.onnx`)
#
# The model becomes one pure function, gpt-fast's prefill/decode step with a static cache:
#   step(idx (1, T), input_pos (T,), k_cache, v_cache) -> (logits (1, T, V), k_cache, v_cache)
# with caches (n_layer, 1, n_kv_head, block_size, head_dim), zeros at first, handed in and back
# (ONNX graphs keep no state). Prefill is a step over the prompt (input_pos = 0..T-1), decode a step
# over one token (input_pos = [p]): gpt.py's attention writes the new keys and values into slots
# input_pos and lets each query see the slots up to its position. The .pt2 holds two exported
# programs, "prefill" (T dynamic, 2..block_size) and "decode" (T = 1, every shape static); the .onnx
# one graph with T dynamic. Both carry the config and the tokenizer (`runner_tokenizer`), so
# examples/run_exported.py generates text from either with only torch or onnxruntime installed.


class OutOfPlaceCache:
    """One layer's slice of the stacked caches: sample.KVCache's `update`, written out of place."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, input_pos, k, v):
        self.k, self.v = self.k.index_copy(2, input_pos, k), self.v.index_copy(2, input_pos, v)
        return self.k, self.v


class ExportStep(torch.nn.Module):
    def __init__(self, model: gpt.GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, input_pos, k_cache, v_cache):
        layers = [OutOfPlaceCache(k, v) for k, v in zip(k_cache.unbind(0), v_cache.unbind(0))]
        logits, _ = self.model(idx, kv_cache=layers, input_pos=input_pos)
        return logits, torch.stack([c.k for c in layers]), torch.stack([c.v for c in layers])


def step_inputs(config: gpt.GPTConfig, T: int):
    """Example inputs of step: T tokens at positions 0..T-1 and empty caches."""
    shape = (config.n_layer, 1, config.n_kv_head, config.block_size, config.head_dim)
    return torch.zeros(1, T, dtype=torch.long), torch.arange(T), torch.zeros(shape), torch.zeros(shape)


def exportable(model: gpt.GPT) -> ExportStep:
    """The model as step, fp32 and in eval mode; attention as SDPA (flash's Triton kernel is not traceable)."""
    model = model.float().eval()
    for block in model.transformer.h:
        if block.attn.attn_impl == "flash":
            block.attn.attn_impl = "sdpa"
    return ExportStep(model).eval()


def torch_export_programs(model: gpt.GPT) -> dict:
    """{"prefill": T dynamic, "decode": T = 1}: torch.export's ExportedPrograms of step."""
    step, c = exportable(model), model.config
    if c.block_size < 2:
        raise NanoError(f"block_size {c.block_size} leaves no room for a prompt and a new token (export a longer model)")
    T = torch.export.Dim("T", min=2, max=c.block_size)
    with torch.no_grad():
        prefill = torch.export.export(step, step_inputs(c, 2), dynamic_shapes=({1: T}, {0: T}, None, None))
        decode = torch.export.export(step, step_inputs(c, 1))
    return {"prefill": prefill, "decode": decode}


def runner_tokenizer(spec: str) -> dict:
    """What a runner without nanollm needs to encode and decode: the alphabet of a character
    tokenizer, or a byte-level BPE's token bytes (hex, by id), merges (by priority) and stop id."""
    tok = byte_bpe(spec)
    if tok is None:
        return {"kind": "char", "alphabet": spec[len("char:"):]}
    if tok.special_tokens and len(tok.special_tokens) > 1 or getattr(tok, "added_tokens", None):
        raise NanoError("a tokenizer with chat or added tokens cannot go into the exported file (export --to hf instead)")
    return {"kind": "bpe", "vocab": [tok.vocab[i].hex() for i in range(len(tok.vocab))],
            "merges": [[a.hex(), b.hex()] for a, b in tok.merges], "eot_id": eot_of(spec)}


def export_metadata(model: gpt.GPT, spec: str) -> str:
    c = model.config
    return json.dumps({"format": "nanollm step", "block_size": c.block_size, "n_layer": c.n_layer,
                       "n_kv_head": c.n_kv_head, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
                       "tokenizer": runner_tokenizer(spec)})


def export_torch(model: gpt.GPT, spec: str, path: Path):
    from torch.export.pt2_archive._package import package_pt2  # the .pt2 archive: several programs, one file

    programs, meta = torch_export_programs(model), export_metadata(model, spec)

    def write(tmp):
        with open(tmp, "wb") as f:
            package_pt2(f, exported_programs=programs, extra_files={"nanollm.json": meta})

    atomic_write(path, write)


def export_onnx(model: gpt.GPT, spec: str, path: Path):
    """One ONNX graph of step, T dynamic; the weights inside the file (protobuf's 2 GiB at most)."""
    for module in ("onnx", "onnxscript"):  # torch.onnx's exporter needs both
        try:
            __import__(module)
        except ImportError:
            raise NanoError(f"--to onnx needs the {module} package (pip install onnx onnxscript)") from None
    import onnx

    if sum(p.numel() for p in model.parameters()) * 4 >= 2**31:
        raise NanoError("the model is over ONNX's 2 GiB single-file limit in fp32 (export --to torch_export instead)")
    step, c, meta = exportable(model), model.config, export_metadata(model, spec)
    T = torch.export.Dim("T", min=1, max=c.block_size)
    import logging  # the exporter warns about every torchvision op it cannot register: not ours
    import warnings

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    def write(tmp):
        with torch.no_grad(), warnings.catch_warnings():  # two notes of the exporter's own, not ours
            warnings.filterwarnings("ignore", message=r"(?s).*(The axis name|isinstance\(treespec)")
            program = torch.onnx.export(step, step_inputs(c, 2), dynamo=True, dynamic_shapes=({1: T}, {0: T}, None, None),
                                        input_names=["idx", "input_pos", "k_cache", "v_cache"],
                                        output_names=["logits", "k_cache_out", "v_cache_out"], verbose=False)
        proto = program.model_proto
        proto.metadata_props.add(key="nanollm", value=meta)
        onnx.save(proto, tmp)

    atomic_write(path, write)

if __name__ == "__main__":
    main()
