"""LoRA: finetune a frozen GPT through small low-rank adapters (Hu et al. 2021, arXiv:2106.09685).

Full finetuning updates every weight W (d_out x d_in) and keeps gradients and two AdamW
moments for each of them. LoRA freezes W and learns the update as a product of two thin
matrices, W' = W + (alpha / r) * B @ A with A (r x d_in), B (d_out x r) and r << d_in:

    y = base(x) + B(A(dropout(x))) * scaling

A starts as nn.Linear's default (Kaiming-uniform, a = sqrt(5)), B starts at zero, so at
step 0 the adapted model is exactly the base model and the first gradient flows into B.
scaling = alpha / r (the paper), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732), which
keeps the update's size from shrinking as r grows. The math, init and dtype handling are
those of Hugging Face PEFT's `lora.Linear`, checked against it in tests/test_lora.py.

Because the update is a matrix of W's shape, it can be merged (W += scaling * B @ A) for
inference at zero extra cost; the adapter alone (A and B of every wrapped layer) is a file
of kilobytes to megabytes that applies on top of the base it was trained on.

This file: `LoRALinear` (wraps nn.Linear or any module with in_features/out_features and a
forward, e.g. qlora_nf4.Linear4bit), `apply_lora` (wrap + freeze; by default every attention
and MLP projection: GPT-2's c_attn/c_proj/c_fc, the Llama family's q/k/v/o_proj and
gate/up/down_proj), adapter save/load (`load_lora` also reads a PEFT adapter folder),
`merge_lora` (back to a plain GPT), `disable_adapters` (the base model, e.g. DPO's
reference), and `finetune`, the training loop qlora_nf4.py reuses on a 4-bit base. Loss is
on every token for a text file and only on the response tokens for an instruction .jsonl
({"prompt": ..., "response": ...} per line).

Run:
  python lora.py --init_from out/ckpt.pt --data data.txt            # a nanollm checkpoint
  python lora.py --init_from gpt2 --data chat.jsonl --merge True    # GPT-2, + merged ckpt
  python lora.py --init_from path/to/hf_folder --data data.txt     # e.g. a Llama (HF folder)
  -> out-lora/adapter.pt (the adapter), out-lora/metrics.jsonl, with --merge True also
     out-lora/ckpt_merged.pt (a plain checkpoint: python sample.py reads it)
  lora.load_lora(model, "out-lora/adapter.pt") or a PEFT folder (PeftModel.save_pretrained's)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import common
from common import NanoError, cli
import data
import gpt
import hf_io
import tokenizer

# ----------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """y = base(x) + lora_B(lora_A(dropout(x))) * scaling, with base frozen."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise TypeError(f"LoRALinear needs a base with in_features/out_features, got {type(base).__name__}")
        if not r > 0:
            raise NanoError(f"LoRA rank r must be positive (got {r})")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # A and B live where the base lives; in the base weight's dtype when that is a float
        # (PEFT does the same), float32 when the base stores something else (NF4 bytes).
        tensors = list(base.parameters()) + list(base.buffers())
        device = tensors[0].device if tensors else None
        weight = getattr(base, "weight", None)
        if dtype is None:
            dtype = weight.dtype if torch.is_tensor(weight) and weight.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # = nn.Linear's default
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts as the base model
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)
        self.train(base.training)  # a wrapped eval-mode model stays in eval mode (no dropout)
        self.merged = False
        self.enabled = True
        self._unmerged_weight = None  # the exact base weight while merged (see merge)

    def forward(self, x):
        result = self.base(x)
        if self.merged or not self.enabled:
            return result
        # The adapter runs in its own dtype (x cast like PEFT does); the sum goes back to
        # the dtype the base produced.
        lora_x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(self.dropout(lora_x))) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32 (out_features, in_features): the update LoRA learned."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _float_weight(self) -> torch.Tensor:
        w = getattr(self.base, "weight", None)
        if not (torch.is_tensor(w) and w.is_floating_point()):
            raise TypeError(f"cannot merge LoRA into a {type(self.base).__name__}: it has no float weight "
                            "(dequantize the base into an nn.Linear first)")
        return w

    def merge(self):
        """W <- W + scaling * B @ A (computed in fp32, cast back to W's dtype); forward then
        runs only the base. The exact old W is kept for unmerge: subtracting the delta again
        is not exact in floating point ((w + d) - d != w for ~14% of the entries of a random
        768x768 fp32 GPT-2-sized weight), so unmerge restores the kept tensor instead."""
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled LoRA layer (enable the adapters first)")
        w = self._float_weight()
        self._unmerged_weight = w.data
        w.data = (w.data.float() + self.delta_weight()).to(w.dtype)
        self.merged = True

    def unmerge(self):
        """Restore the base weight bit-exactly."""
        if not self.merged:
            return
        self._float_weight().data = self._unmerged_weight
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------
# Model-level helpers

# What LoRA adapts by default: every attention and MLP projection, under the names each
# architecture gives them. GPT-2 fuses q, k, v into c_attn; the Llama family (Hugging Face's
# names) keeps them apart and has a gated MLP. The head is never a target (see apply_lora).
DEFAULT_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def lora_layers(model: nn.Module):
    """(name, LoRALinear) for every adapter in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def linear_names(model: nn.Module) -> list[str]:
    """Attribute names of the model's Linear-like modules: what `targets` can name."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and hasattr(m, "in_features") and n.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "base")})


def default_targets(model: nn.Module) -> tuple:
    """The model's attention and MLP projections, by the names in DEFAULT_TARGETS."""
    present = set(linear_names(model))
    targets = tuple(t for names in DEFAULT_TARGETS.values() for t in names if t in present)
    if not targets:
        raise NanoError(f"no attention or MLP projection with a known name in this model (its Linear "
                        f"layers: {', '.join(sorted(present)) or 'none'}; name the targets explicitly)")
    return targets


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=None, use_rslora: bool = False, dtype=None) -> nn.Module:
    """Wrap every Linear-like module whose attribute name is in `targets` (default: all
    attention and MLP projections, `default_targets`) with a LoRALinear, freeze everything
    else, record the config on the model. Modifies and returns `model`."""
    if lora_layers(model):
        raise NanoError("model already has LoRA adapters (apply_lora once per model)")
    if not r > 0:
        raise NanoError(f"LoRA rank r must be positive (got {r})")
    targets = default_targets(model) if targets is None else tuple(targets)
    if "lm_head" in targets and isinstance(model, gpt.GPT):
        # GPT's loss multiplies by lm_head.weight directly (and it is tied to wte): an adapter
        # there would be skipped by the loss, so refuse rather than train nothing.
        raise NanoError("lm_head cannot take a LoRA adapter (GPT's loss uses its weight directly; leave it out)")
    found = [(parent, name, child) for parent in list(model.modules())
             for name, child in list(parent.named_children()) if name in targets and hasattr(child, "in_features")]
    unmatched = [t for t in targets if t not in {name for _, name, _ in found}]
    if unmatched or not targets:
        raise NanoError(f"no Linear named {', '.join(unmatched) or '(none given)'} in this model to wrap with "
                        f"LoRA (its Linear layers: {', '.join(linear_names(model))})")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, r, alpha, dropout, use_rslora, dtype))
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets), use_rslora=use_rslora)
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool):
    """Switch every adapter on or off; off, the model computes exactly the base model."""
    for name, layer in lora_layers(model):
        if layer.merged and not enabled:
            raise RuntimeError(f"{name} is merged, its adapter cannot be switched off (unmerge it first)")
        layer.enabled = enabled


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """with disable_adapters(model): ... runs the base model (e.g. the reference model of DPO)."""
    previous = [(layer, layer.enabled) for _, layer in lora_layers(model)]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for layer, enabled in previous:
            layer.enabled = enabled


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layer back: the result
    is an ordinary GPT (gpt.save_checkpoint writes it, sample.py reads it). In place, like
    PEFT's merge_and_unload; the LoRA model is gone afterwards."""
    for name, layer in lora_layers(model):
        layer._float_weight()  # fail before touching anything if some base cannot merge
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                child._unmerged_weight = None  # no way back: drop the copy
                setattr(parent, name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    for attr in ("lora_config", "lora_base"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def count_params(model: nn.Module):
    """(trainable, total), each shared tensor (the tied embedding) counted once."""
    params = list(model.parameters())  # parameters() already yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------
# Adapter files: lora.py's own, and PEFT's


def lora_state_dict(model: nn.Module, base: str | None = None) -> dict:
    """The adapter alone: {"<module>.lora_A.weight": A, "<module>.lora_B.weight": B, ...,
    "lora_config": {...}, "base": what it applies to (checkpoint path or "gpt2" name)}."""
    raw = getattr(model, "_orig_mod", model)
    if not lora_layers(raw):
        raise NanoError("model has no LoRA adapters (call apply_lora first)")
    sd = {k: v.detach().cpu().clone() for k, v in gpt.clean_state_dict(raw).items() if ".lora_" in k}
    sd["lora_config"] = dict(raw.lora_config)
    sd["base"] = base if base is not None else getattr(raw, "lora_base", None)
    return sd


def save_lora(path, model: nn.Module, base: str | None = None):
    common.atomic_save(lora_state_dict(model, base), path)


def read_adapter(path) -> dict:
    """An adapter as lora_state_dict's dict, from a lora.py file or a PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        return read_peft_adapter(path)
    if not path.is_file():
        raise NanoError(f"adapter file {path} not found (train one with lora.py, or give a PEFT adapter folder)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # data only: no code runs
    except Exception as e:  # a truncated or foreign file: pickle, zip or unpickler errors
        raise NanoError(f"{path} is not a readable adapter file ({e.__class__.__name__})") from None
    if not isinstance(sd, dict) or "lora_config" not in sd:
        raise NanoError(f"{path} is not a LoRA adapter (no 'lora_config'; a full checkpoint "
                        "loads with gpt.load_checkpoint)")
    return sd


# PEFT (Hugging Face's adapter library) stores the same A (r, in) and B (out, r) per layer,
# also for GPT-2's Conv1D layers, under "base_model.model.<module>.lora_A.weight" in
# adapter_model.safetensors, and its config in adapter_config.json (lora_alpha for alpha).
# Options of PEFT's that change the computation and lora.py does not have are refused.
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
    for name, tensor in hf_io.read_safetensors(weights).items():
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


def _same_config(a: dict, b: dict) -> bool:
    """Same adapter shapes and scaling (PEFT writes alpha 16 where we write 16.0; targets in any order)."""
    def key(c):
        return c.get("r"), float(c.get("alpha", 0)), bool(c.get("use_rslora")), sorted(c.get("targets") or [])
    return key(a) == key(b)


def load_lora(model: nn.Module, path) -> nn.Module:
    """Load an adapter into `model`: a lora.py adapter file or a PEFT adapter folder. A plain
    base GPT is wrapped first with the adapter's LoRA config; a model that already has
    adapters must have the same config."""
    sd = read_adapter(path)
    config = sd["lora_config"]
    if lora_layers(model):
        if not _same_config(model.lora_config, config):
            raise NanoError(f"adapter {path} has LoRA config {config} but the model has {model.lora_config} "
                            "(load it into a model without adapters)")
    else:
        try:
            apply_lora(model, **config)
        except (TypeError, ValueError) as e:
            raise NanoError(f"cannot apply the LoRA config of {path}: {e}") from None
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    params = {k: v for k, v in gpt.clean_state_dict(model).items() if ".lora_" in k}
    # a PEFT adapter names modules as Hugging Face does (model.layers.3.self_attn.q_proj);
    # hf_io.from_hf_name spells them as ours and leaves our own names as they are
    arch = model.config.arch if isinstance(model, gpt.GPT) else None
    mapping = {k: hf_io.from_hf_name(k, arch) if arch else k for k in tensors}
    mapping = {k: ours for k, ours in mapping.items() if ours in params}
    missing, unexpected = params.keys() - set(mapping.values()), tensors.keys() - mapping.keys()
    if missing or unexpected:
        raise NanoError(f"adapter {path} does not fit this model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}; was it trained on another architecture?)")
    for k, ours in mapping.items():
        if tensors[k].shape != params[ours].shape:
            raise NanoError(f"adapter tensor {k} has shape {tuple(tensors[k].shape)} but the model "
                            f"expects {tuple(params[ours].shape)} (the adapter was trained on a different base)")
    with torch.no_grad():
        for k, ours in mapping.items():
            params[ours].copy_(tensors[k])
    model.lora_base = sd.get("base")
    return model


# ----------------------------------------------------------------------------------------
# Finetuning: config, data, the loop (qlora_nf4.py runs the same loop on a 4-bit base)


@dataclass
class FinetuneConfig:
    init_from: str = field(default="out/ckpt.pt", metadata={
        "help": "base: a checkpoint, a Hugging Face folder or hub name, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl"})
    data: str = field(default="", metadata={
        "help": "a text file (loss on every token) or a .jsonl of {prompt, response} (loss on the response)"})
    out_dir: str = field(default="out-lora", metadata={
        "help": "adapter.pt, metrics.jsonl (and ckpt_merged.pt) go here"})
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling = alpha / r (alpha / sqrt(r) with rsLoRA)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input, in [0, 1)"})
    targets: str = field(default="auto", metadata={
        "help": "comma-separated Linear names to adapt (auto: every attention and MLP projection)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilized scaling alpha / sqrt(r)"})
    block_size: int = field(default=0, metadata={"help": "tokens per sequence (0: the model's block_size)"})
    batch_size: int = 8
    grad_accum: int = 1
    max_iters: int = 200
    learning_rate: float = 3e-4
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at learning_rate * this"})
    warmup_iters: int = 10
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "clip the adapters' gradient norm to this (0: off)"})
    val_fraction: float = field(default=0.1, metadata={"help": "held-out share of the data for val loss, in [0, 1)"})
    eval_interval: int = 50
    eval_iters: int = 10
    log_interval: int = 10
    merge: bool = field(default=False, metadata={"help": "also write out_dir/ckpt_merged.pt (a plain checkpoint)"})
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "autocast dtype: auto, float32, bfloat16, float16"})
    seed: int = 1337


def check_config(cfg: FinetuneConfig):
    """Every option that can be checked without the model, before anything is loaded."""
    common.check_options(cfg, positive=("r", "alpha", "batch_size", "grad_accum", "max_iters", "learning_rate",
                                        "eval_interval", "eval_iters", "log_interval"),
                         non_negative=("block_size", "warmup_iters", "weight_decay", "grad_clip"),
                         ranges={"min_lr_ratio": (0.0, 1.0)})
    for name in ("lora_dropout", "val_fraction"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise NanoError(f"--{name} must be in [0, 1) (got {getattr(cfg, name)})")
    if not cfg.data or not Path(cfg.data).is_file():
        raise NanoError(f"--data {cfg.data!r} not found (a text file or a prompt/response .jsonl)")
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir, ("adapter.pt", "metrics.jsonl") + (("ckpt_merged.pt",) if cfg.merge else ()))
    if cfg.merge and (out_dir / "ckpt_merged.pt").resolve() == Path(cfg.init_from).resolve():
        raise NanoError(f"--merge would overwrite the base {cfg.init_from} (choose another --out_dir)")


def check_out_dir(out_dir: Path, files=()):
    """Before the work: out_dir is a folder or can be made one, and no file to be written in
    it is a folder (else the run would fail at its very end)."""
    for folder in (out_dir, *out_dir.parents):  # the nearest one that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == out_dir else f"is below the file {folder}"
                raise NanoError(f"--out_dir {out_dir} {where} (choose a folder)")
            break
    for name in files:
        if (out_dir / name).is_dir():
            raise NanoError(f"{out_dir / name} is a folder, but {name} is written there (remove it or "
                            "choose another --out_dir)")


def load_base(init_from: str, device: str, dtype=torch.float32):
    """(model, tokenizer spec, what to record as the adapter's base): a nanollm checkpoint,
    else a Hugging Face folder, hub name or GPT-2 size (gpt.load_pretrained) in `dtype`
    (None: the checkpoint's own, e.g. bf16 weights that QLoRA quantizes anyway)."""
    if Path(init_from).is_file() or Path(init_from).suffix in (".pt", ".pth"):
        model, spec = gpt.load_checkpoint(init_from, device)  # a missing .pt: "not found"
    else:
        model, spec = gpt.load_pretrained(init_from, dtype=dtype)
    return model.to(device), spec, init_from


def load_text(path: Path, tok, val_fraction: float, block_size: int):
    """Plain text: every token is a target; the last val_fraction of the tokens is val."""
    ids = torch.tensor(tok.encode(data.read_text_file(path)), dtype=torch.long)
    n_val = int(len(ids) * val_fraction)
    train, val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    if len(train) < block_size + 1:
        raise NanoError(f"{path} has {len(train)} training tokens, fewer than block_size + 1 = "
                        f"{block_size + 1} (use a longer text or a smaller --block_size)")
    if len(val) < block_size + 1:
        val = train  # too little to hold out: report the training loss as val
    return train, val


def load_jsonl(path: Path, tok, val_fraction: float, block_size: int):
    """Instruction data: one {"prompt": str, "response": str} per line. Returns lists of
    (input ids, targets) with targets -1 on the prompt, so only the response is learned."""
    examples, truncated = [], 0
    for lineno, line in enumerate(data.read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoError(f"{path} line {lineno} is not JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise NanoError(f"{path} line {lineno} needs string fields 'prompt' and 'response'")
        prompt, response = tok.encode(row["prompt"]), tok.encode(row["response"])
        if tok.eot_id is not None:
            response = response + [tok.eot_id]  # learn to stop after the response
        ids = prompt + response
        if len(ids) > block_size + 1:
            ids, truncated = ids[:block_size + 1], truncated + 1
        # token t predicts token t+1; it is a target only if token t+1 belongs to the response
        targets = [t if i + 1 >= len(prompt) else -1 for i, t in enumerate(ids[1:])]
        if all(t == -1 for t in targets):
            continue  # the prompt alone fills the block: nothing to learn from this example
        examples.append((ids[:-1], targets))
    if not examples:
        raise NanoError(f"{path} has no usable prompt/response example (empty, or prompts longer "
                        f"than block_size {block_size})")
    if truncated:
        print(f"note: {truncated} examples truncated to block_size + 1 = {block_size + 1} tokens")
    n_val = int(len(examples) * val_fraction)
    train, val = examples[:len(examples) - n_val], examples[len(examples) - n_val:]
    return train, (val or train)


def text_batch(ids, batch_size, block_size, generator, device):
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    xy = torch.stack([ids[s:s + block_size + 1] for s in starts.tolist()])  # (B, T+1)
    return xy[:, :-1].to(device), xy[:, 1:].to(device)


def jsonl_batch(examples, batch_size, block_size, generator, device):
    picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
    T = max(len(examples[i][0]) for i in picks)
    x = torch.zeros(batch_size, T, dtype=torch.long)  # right padding: causal attention never
    y = torch.full((batch_size, T), -1, dtype=torch.long)  # lets a real token see it
    for row, i in enumerate(picks):
        ids, targets = examples[i]
        x[row, :len(ids)], y[row, :len(targets)] = torch.tensor(ids), torch.tensor(targets)
    return x.to(device), y.to(device)


@dataclass
class FinetuneData:
    """The tokenized --data: train and val rows and the sequence length to draw them at."""
    train: object  # text: a 1-D tensor of token ids; .jsonl: a list of (ids, targets)
    val: object
    block_size: int
    instruct: bool  # .jsonl prompt/response pairs (loss on the response only)

    def get_batch(self, split: str, batch_size: int, generator, device):
        draw = jsonl_batch if self.instruct else text_batch
        return draw(self.train if split == "train" else self.val, batch_size, self.block_size, generator, device)


def load_finetune_data(model: nn.Module, tokenizer, cfg: FinetuneConfig) -> FinetuneData:
    """Check --data and --block_size against the model and tokenize the data."""
    block_size = cfg.block_size or model.config.block_size
    if not 0 < block_size <= model.config.block_size:
        raise NanoError(f"--block_size {block_size} must be in 1..{model.config.block_size} (the model's)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise NanoError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                        f"{model.config.vocab_size} (a checkpoint with another tokenizer?)")
    path = Path(cfg.data)
    instruct = path.suffix == ".jsonl"
    train, val = (load_jsonl if instruct else load_text)(path, tokenizer, cfg.val_fraction, block_size)
    return FinetuneData(train, val, block_size, instruct)


def add_adapters(model: nn.Module, cfg: FinetuneConfig, base: str) -> nn.Module:
    """apply_lora with the CLI's options (--targets auto: default_targets), and say what trains."""
    names = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    try:
        apply_lora(model, cfg.r, cfg.alpha, cfg.lora_dropout, None if names in ([], ["auto"]) else names, cfg.use_rslora)
    except NanoError as e:
        raise NanoError(f"--targets {cfg.targets}: {e}") from None
    model.lora_base = base  # recorded in the adapter file: what it applies to
    trainable, _ = count_params(model)
    print(f"LoRA r={cfg.r} on {', '.join(model.lora_config['targets'])}: {trainable:,} trainable params")
    return model


@torch.no_grad()
def estimate_val_loss(model, dataset: FinetuneData, cfg, device, dtype) -> float:
    """Mean loss over eval_iters val batches: the same batches every time (a fixed seed)."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = dataset.get_batch("val", cfg.batch_size, generator, device)
        with common.autocast(device, dtype):
            losses.append(model(x, targets=y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def train_step(model, optimizer, params, dataset: FinetuneData, cfg, lr, generator, device, dtype):
    """One optimizer step over grad_accum micro-batches. Returns (mean loss, tokens seen)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = 0.0, 0
    for _ in range(cfg.grad_accum):
        x, y = dataset.get_batch("train", cfg.batch_size, generator, device)
        with common.autocast(device, dtype):
            _, loss = model(x, targets=y)
        (loss / cfg.grad_accum).backward()
        loss_sum, tokens = loss_sum + loss.item(), tokens + x.numel()
    if cfg.grad_clip > 0:  # 0 is off; check_config refuses a negative value (it would ascend)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / cfg.grad_accum, tokens


def finetune(model: nn.Module, tokenizer, cfg: FinetuneConfig, out_dir, dataset: FinetuneData | None = None,
             adapter_extra: dict | None = None) -> float:
    """Train the parameters of `model` that require grad (its adapters) on cfg.data: AdamW,
    warmup + cosine LR (common.cosine_lr), val loss every eval_interval steps, progress with
    tokens/s and ETA, one metrics.jsonl row per step, and out_dir/adapter.pt written
    atomically at every evaluation (adapter_extra's entries added, e.g. how a 4-bit base
    was quantized). `dataset`: load_finetune_data's, when the caller checked the data
    before slow work of its own. Returns the last val loss."""
    check_config(cfg)
    dataset = dataset or load_finetune_data(model, tokenizer, cfg)
    device = str(next(model.parameters()).device)
    dtype = common.pick_dtype(device, cfg.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NanoError("the model has no trainable parameters (call apply_lora first)")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_path = out_dir / "adapter.pt"
    if "cuda" in device:
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    with open(out_dir / "metrics.jsonl", "w") as metrics:
        val_loss = estimate_val_loss(model, dataset, cfg, device, dtype)
        print(f"step 0: val loss {val_loss:.4f} (the base model: B = 0)")
        metrics.write(json.dumps({"iter": 0, "val_loss": val_loss}) + "\n")
        t_start = t_last = time.time()
        tokens = tokens_last = 0
        for step in range(1, cfg.max_iters + 1):
            lr = common.cosine_lr(step - 1, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio,
                                  cfg.warmup_iters, cfg.max_iters)
            loss, n = train_step(model, optimizer, params, dataset, cfg, lr, generator, device, dtype)
            tokens += n
            row = {"iter": step, "loss": loss, "lr": lr, "tokens": tokens}
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                now = time.time()
                row["tok_per_s"] = (tokens - tokens_last) / (now - t_last)
                eta = (now - t_start) / step * (cfg.max_iters - step)
                print(f"step {step}/{cfg.max_iters}: loss {loss:.4f}, lr {lr:.2e}, "
                      f"{row['tok_per_s']:,.0f} tok/s, ETA {eta:.0f}s")
                t_last, tokens_last = now, tokens
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                row["val_loss"] = val_loss = estimate_val_loss(model, dataset, cfg, device, dtype)
                print(f"step {step}: val loss {val_loss:.4f}")
                common.atomic_save({**lora_state_dict(model), **(adapter_extra or {})}, adapter_path)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
    print(f"peak memory: {common.peak_memory_mib(device):,.0f} MiB "
          f"({'CUDA max allocated' if 'cuda' in device else 'peak RSS of the process'})")
    print(f"saved adapter ({adapter_path.stat().st_size / 1024:,.1f} KiB) to {adapter_path}; "
          f"apply it to {getattr(model, 'lora_base', None)} with lora.load_lora")
    return val_loss


@cli
def main(argv=None):
    cfg = common.parse_config(FinetuneConfig, argv, __doc__)
    check_config(cfg)  # every option, before anything is loaded
    device = common.pick_device(cfg.device)
    common.pick_dtype(device, cfg.dtype)
    common.set_seed(cfg.seed)
    model, spec, base = load_base(cfg.init_from, device)
    tok = tokenizer.load_tokenizer(spec)
    dataset = load_finetune_data(model, tok, cfg)
    frozen = count_params(model)[1]
    add_adapters(model, cfg, base)
    print(f"base {base}: {frozen:,} frozen params")
    val_loss = finetune(model, tok, cfg, cfg.out_dir, dataset)
    if cfg.merge:
        merged_path = Path(cfg.out_dir) / "ckpt_merged.pt"
        gpt.save_checkpoint(merged_path, merge_lora(model), spec, step=cfg.max_iters)
        print(f"saved merged checkpoint to {merged_path}")
    return val_loss


if __name__ == "__main__":
    main()
