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
forward, e.g. qlora_nf4.Linear4bit), `apply_lora` (wrap + freeze), adapter save/load,
`merge_lora` (back to a plain GPT), `disable_adapters` (the base model, e.g. DPO's
reference), and a finetune CLI. Loss is on every token for a text file and only on the
response tokens for an instruction .jsonl ({"prompt": ..., "response": ...} per line).

Run:
  python lora.py --init_from out/ckpt.pt --data data.txt            # a nanollm checkpoint
  python lora.py --init_from gpt2 --data chat.jsonl --merge True    # GPT-2, + merged ckpt
  -> out-lora/adapter.pt (the adapter), out-lora/metrics.jsonl, with --merge True also
     out-lora/ckpt_merged.pt (a plain checkpoint: python sample.py reads it)
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import common
from common import NanoError, cli
import data
import gpt

# ----------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """y = base(x) + lora_B(lora_A(dropout(x))) * scaling, with base frozen."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise TypeError(f"LoRALinear needs a base with in_features/out_features, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive (got {r})")
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


def lora_layers(model: nn.Module):
    """(name, LoRALinear) for every adapter in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=("c_attn", "c_proj", "c_fc"), use_rslora: bool = False, dtype=None) -> nn.Module:
    """Wrap every Linear-like module whose attribute name is in `targets` with a LoRALinear,
    freeze everything else, record the config on the model. Modifies and returns `model`."""
    if lora_layers(model):
        raise ValueError("model already has LoRA adapters (apply_lora once per model)")
    targets = tuple(targets)
    if "lm_head" in targets and isinstance(model, gpt.GPT):
        # GPT's loss multiplies by lm_head.weight directly (and it is tied to wte): an adapter
        # there would be skipped by the loss, so refuse rather than train nothing.
        raise ValueError("lm_head cannot take a LoRA adapter (GPT's loss uses its weight directly)")
    found = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and (isinstance(child, nn.Linear) or hasattr(child, "in_features")):
                found.append((parent, name, child))
    if not found:
        raise ValueError(f"no module named one of {targets} found to wrap with LoRA")
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


def lora_state_dict(model: nn.Module, base: str | None = None) -> dict:
    """The adapter alone: {"<module>.lora_A.weight": A, "<module>.lora_B.weight": B, ...,
    "lora_config": {...}, "base": what it applies to (checkpoint path or "gpt2" name)}."""
    raw = getattr(model, "_orig_mod", model)
    if not lora_layers(raw):
        raise ValueError("model has no LoRA adapters (call apply_lora first)")
    sd = {k: v.detach().cpu().clone() for k, v in gpt.clean_state_dict(raw).items() if ".lora_" in k}
    sd["lora_config"] = dict(raw.lora_config)
    sd["base"] = base if base is not None else getattr(raw, "lora_base", None)
    return sd


def save_lora(path, model: nn.Module, base: str | None = None):
    gpt.atomic_save(lora_state_dict(model, base), path)


def load_lora(model: nn.Module, path) -> nn.Module:
    """Load an adapter file into `model`: a plain base GPT is wrapped first with the file's
    LoRA config; a model that already has adapters must have the same config."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"adapter file {path} not found (train one with lora.py or check the path)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NanoError(f"{path} is not a readable adapter file ({e.__class__.__name__})") from None
    if not isinstance(sd, dict) or "lora_config" not in sd:
        raise NanoError(f"{path} is not a LoRA adapter (no 'lora_config'; a full checkpoint "
                         "loads with gpt.load_checkpoint)")
    config = sd["lora_config"]
    if lora_layers(model):
        ours = {k: model.lora_config.get(k) for k in ("r", "alpha", "use_rslora", "targets")}
        theirs = {k: config.get(k) for k in ours}
        if ours != theirs:
            raise NanoError(f"adapter {path} has LoRA config {theirs} but the model has {ours} "
                             "(load it into a model without adapters)")
    else:
        try:
            apply_lora(model, **config)
        except (TypeError, ValueError) as e:
            raise NanoError(f"cannot apply the LoRA config of {path} ({e})") from None
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    params = {k: v for k, v in gpt.clean_state_dict(model).items() if ".lora_" in k}
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing or unexpected:
        raise NanoError(f"adapter {path} does not fit this model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}; was it trained on another architecture?)")
    for k, p in params.items():
        if tensors[k].shape != p.shape:
            raise NanoError(f"adapter tensor {k} has shape {tuple(tensors[k].shape)} but the model "
                             f"expects {tuple(p.shape)} (the adapter was trained on a different base)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    model.lora_base = sd.get("base")
    return model


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
# Finetune CLI


@dataclass
class FinetuneConfig:
    init_from: str = field(default="out/ckpt.pt", metadata={
        "help": "base: a checkpoint path, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl"})
    data: str = field(default="", metadata={
        "help": "a text file (loss on every token) or a .jsonl of {prompt, response} (loss on the response)"})
    out_dir: str = field(default="out-lora", metadata={
        "help": "adapter.pt, metrics.jsonl (and ckpt_merged.pt) go here"})
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling = alpha / r (alpha / sqrt(r) with rsLoRA)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    targets: str = field(default="c_attn,c_proj,c_fc", metadata={"help": "comma-separated Linear names to adapt"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilized scaling alpha / sqrt(r)"})
    block_size: int = field(default=0, metadata={"help": "tokens per sequence (0: the model's block_size)"})
    batch_size: int = 8
    grad_accum: int = 1
    max_iters: int = 200
    learning_rate: float = 3e-4
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at learning_rate * this"})
    warmup_iters: int = 10
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "clip the adapters' gradient norm (0: off)"})
    val_fraction: float = field(default=0.1, metadata={"help": "held-out share of the data for val loss"})
    eval_interval: int = 50
    eval_iters: int = 10
    log_interval: int = 10
    merge: bool = field(default=False, metadata={"help": "also write out_dir/ckpt_merged.pt (a plain checkpoint)"})
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "autocast dtype: auto, float32, bfloat16, float16"})
    seed: int = 1337


def load_base(init_from: str, device: str):
    """(model, tokenizer spec, what to record as the adapter's base)."""
    if init_from.startswith("gpt2") and not Path(init_from).is_file():
        if init_from not in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
            raise NanoError(f"unknown pretrained model {init_from!r} (gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
        return gpt.GPT.from_pretrained(init_from).to(device), "gpt2", init_from
    model, spec = gpt.load_checkpoint(init_from, device)
    return model, spec, init_from


def load_text(path: Path, tok, val_fraction: float, block_size: int):
    """Plain text: every token is a target; the last val_fraction of the tokens is val."""
    ids = torch.tensor(tok.encode(path.read_text(encoding="utf-8")), dtype=torch.long)
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
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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


def peak_memory_mb(device: str) -> float:
    if "cuda" in device:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # Unix only; imported here so the rest of the file runs anywhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS of this process
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


@cli
def main(argv=None):
    cfg = common.parse_config(FinetuneConfig, argv, __doc__)
    # --- check the input before any long work
    data_path = Path(cfg.data)
    if not cfg.data or not data_path.is_file():
        raise NanoError(f"--data {cfg.data!r} not found (a text file or a prompt/response .jsonl)")
    for name in ("r", "batch_size", "grad_accum", "max_iters", "eval_iters", "log_interval", "eval_interval"):
        if getattr(cfg, name) <= 0:
            raise NanoError(f"--{name} must be positive (got {getattr(cfg, name)})")
    if not 0.0 <= cfg.lora_dropout < 1.0 or not 0.0 <= cfg.val_fraction < 1.0:
        raise NanoError("--lora_dropout and --val_fraction must be in [0, 1)")
    targets = tuple(t.strip() for t in cfg.targets.split(",") if t.strip())
    out_dir = Path(cfg.out_dir)
    merged_path = out_dir / "ckpt_merged.pt"
    if cfg.merge and merged_path.resolve() == Path(cfg.init_from).resolve():
        raise NanoError(f"--merge would overwrite the base {cfg.init_from} (choose another --out_dir)")
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)
    common.set_seed(cfg.seed)

    model, spec, base = load_base(cfg.init_from, device)
    block_size = cfg.block_size or model.config.block_size
    if not 0 < block_size <= model.config.block_size:
        raise NanoError(f"--block_size {block_size} must be in 1..{model.config.block_size} (the model's)")
    tok = data.load_tokenizer(spec)
    instruct = data_path.suffix == ".jsonl"
    load = load_jsonl if instruct else load_text
    train_data, val_data = load(data_path, tok, cfg.val_fraction, block_size)
    get_batch = jsonl_batch if instruct else text_batch

    try:
        apply_lora(model, cfg.r, cfg.alpha, cfg.lora_dropout, targets, cfg.use_rslora)
    except ValueError as e:
        raise NanoError(f"{e} (check --targets)") from None
    trainable, total = count_params(model)
    print(f"base {base}: {total - trainable:,} frozen params; LoRA r={cfg.r} on {', '.join(targets)}: "
          f"{trainable:,} trainable ({100 * trainable / total:.3f}% of {total:,})")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

    def lr_at(it):  # linear warmup, then cosine decay to min_lr_ratio * learning_rate
        if it < cfg.warmup_iters:
            return cfg.learning_rate * (it + 1) / cfg.warmup_iters
        progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.learning_rate * ratio

    gen_train = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def estimate_val_loss():
        model.eval()
        gen_val = torch.Generator().manual_seed(cfg.seed + 1)  # the same val batches every time
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(val_data, cfg.batch_size, block_size, gen_val, device)
            with common.autocast(device, dtype):
                losses.append(model(x, targets=y)[1].item())
        model.train()
        return sum(losses) / len(losses)

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / "metrics.jsonl", "w")
    if "cuda" in device:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    val_loss = estimate_val_loss()
    print(f"step 0: val loss {val_loss:.4f} (the base model: B = 0)")
    metrics.write(json.dumps({"step": 0, "val_loss": val_loss}) + "\n")
    t_start, t_last, tokens_since = time.time(), time.time(), 0
    for step in range(1, cfg.max_iters + 1):
        lr = lr_at(step - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = get_batch(train_data, cfg.batch_size, block_size, gen_train, device)
            with common.autocast(device, dtype):
                _, loss = model(x, targets=y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            tokens_since += x.numel()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "loss": loss_sum / cfg.grad_accum, "lr": lr}
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            now = time.time()
            tok_s = tokens_since / (now - t_last)
            eta = (now - t_start) / step * (cfg.max_iters - step)
            print(f"step {step}/{cfg.max_iters}: loss {record['loss']:.4f}, lr {lr:.2e}, "
                  f"{tok_s:,.0f} tok/s, ETA {eta:.0f}s")
            record["tokens_per_s"] = tok_s
            t_last, tokens_since = now, 0
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            record["val_loss"] = val_loss = estimate_val_loss()
            print(f"step {step}: val loss {val_loss:.4f}")
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    metrics.close()
    print(f"peak memory: {peak_memory_mb(device):,.0f} MiB "
          f"({'CUDA max allocated' if 'cuda' in device else 'peak RSS of the process'})")

    adapter_path = out_dir / "adapter.pt"
    save_lora(adapter_path, model, base)
    print(f"saved adapter ({adapter_path.stat().st_size / 1024:,.1f} KiB) to {adapter_path}; "
          f"apply it to {base} with lora.load_lora")
    if cfg.merge:
        gpt.save_checkpoint(merged_path, merge_lora(model), spec, step=cfg.max_iters)
        print(f"saved merged checkpoint to {merged_path}")
    return val_loss


if __name__ == "__main__":
    main()
