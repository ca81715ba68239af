"""LoRA: finetune a frozen GPT through small low-rank adapters (Hu et al. 2021, arXiv:2106.09685).

LoRA freezes every weight W (d_out x d_in) and learns its update as a product of two thin
matrices, W' = W + scaling * B @ A with A (r x d_in), B (d_out x r) and r << d_in, so only
A and B need gradients and AdamW state:

    y = base(x) + B(A(dropout(x))) * scaling,    scaling = alpha / r

A starts as nn.Linear's default (Kaiming-uniform), B at zero: at step 0 the adapted model is
exactly the base model. rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r),
so the update does not shrink as r grows. Math, init and dtypes are Hugging Face PEFT's
`lora.Linear`, checked against it in tests/test_lora.py. B @ A has W's shape, so it merges into
W for inference at no cost (`merge_lora`); the adapter alone is a file of kilobytes to megabytes
(`save_lora`; `load_lora` also reads a PEFT folder). The training loop is finetune.py's.

Run (finetune.py's CLI, the same options):
  python lora.py --init_from out/ckpt.pt --data data.txt          # -> out-lora/adapter.pt
  python lora.py --init_from gpt2 --data chat.jsonl --merge True  # + out-lora/ckpt_merged.pt
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn

import common
from common import NanoError
import gpt
import hf_io

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
        self.base, self.r, self.alpha, self.use_rslora = base, r, alpha, use_rslora
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # A and B live on the base's device, in its weight's dtype if a float (as PEFT), else fp32 (NF4)
        tensors, weight = list(base.parameters()) + list(base.buffers()), getattr(base, "weight", None)
        device = tensors[0].device if tensors else None
        if dtype is None:
            dtype = weight.dtype if torch.is_tensor(weight) and weight.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # = nn.Linear's default
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts as the base model
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.requires_grad_(False)
        self.train(base.training)  # a wrapped eval-mode model stays in eval mode (no dropout)
        self.merged, self.enabled = False, True
        self._unmerged_weight = None  # the exact base weight while merged (see merge)

    def forward(self, x):
        result = self.base(x)
        if self.merged or not self.enabled:
            return result
        lora_x = x.to(self.lora_A.weight.dtype)  # the adapter runs in its own dtype (as in PEFT)
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
        """W <- W + scaling * B @ A (in fp32, cast back to W's dtype); forward then runs only the
        base. The old W is kept for unmerge: subtracting the delta is not exact in floating point
        ((w + d) - d != w for ~14% of the entries of a random 768x768 fp32 weight)."""
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
        if self.merged:
            self._float_weight().data = self._unmerged_weight
            self._unmerged_weight, self.merged = None, False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------
# A whole model: which layers, wrap, switch off, merge

# What LoRA adapts by default: every attention and MLP projection. GPT-2 fuses q, k, v into c_attn;
# the Llama family (Hugging Face's names) keeps them apart and has a gated MLP. Never the head (apply_lora).
DEFAULT_TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc"),
                   "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


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
    """Wrap every Linear-like module whose attribute name is in `targets` (default_targets if None)
    with a LoRALinear, freeze everything else, record the config on the model; in place."""
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
    model.requires_grad_(False)
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
    """Fold every adapter into its base weight and put the plain base layer back, in place (PEFT's
    merge_and_unload): an ordinary GPT again, for gpt.save_checkpoint and sample.py."""
    for _, layer in lora_layers(model):
        layer._float_weight()  # fail before touching anything if some base cannot merge
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                child._unmerged_weight = None  # no way back: drop the copy
                setattr(parent, name, child.base)
    model.requires_grad_(True)
    for attr in ("lora_config", "lora_base"):  # plain attributes, set by apply_lora and load_lora
        model.__dict__.pop(attr, None)
    return model


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
        return hf_io.read_peft_adapter(path)
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


def load_lora(model: nn.Module, path) -> nn.Module:
    """Load an adapter into `model`: a lora.py adapter file or a PEFT adapter folder. A plain
    base GPT is wrapped first with the adapter's LoRA config; one with adapters must match it."""
    sd = read_adapter(path)
    config = sd["lora_config"]

    def key(c):  # PEFT writes alpha 16 where we write 16.0, and targets in any order
        return c.get("r"), float(c.get("alpha", 0)), bool(c.get("use_rslora")), sorted(c.get("targets") or [])
    if lora_layers(model) and key(model.lora_config) != key(config):
        raise NanoError(f"adapter {path} has LoRA config {config} but the model has {model.lora_config} "
                        "(load it into a model without adapters)")
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    ranks = {v.shape[0] if k.endswith("lora_A.weight") else v.shape[-1] for k, v in tensors.items()}
    if ranks != {config.get("r")}:  # before any allocation: a lying config must not size the layers
        raise NanoError(f"adapter {path} says r={config.get('r')} but its tensors have rank(s) {sorted(ranks)[:3]} "
                        "(a damaged adapter: save it again)")
    if not lora_layers(model):
        try:
            apply_lora(model, **config)
        except (TypeError, ValueError) as e:
            raise NanoError(f"cannot apply the LoRA config of {path}: {e}") from None
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


if __name__ == "__main__":  # `python lora.py --data ...` trains adapters: finetune.py's CLI
    import runpy

    runpy.run_module("finetune", run_name="__main__")
