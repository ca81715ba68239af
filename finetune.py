"""LoRA finetuning: train a frozen model's low-rank adapters on a text file or on prompt/response pairs.

The one finetune loop: lora.py teaches the adapters (Hu et al. 2021, arXiv:2106.09685),
qlora_nf4.py the 4-bit base under them; both run this loop (`python lora.py` is this CLI), and
sft.py and dpo.py load their base with `load_base`.

Data: a text file is learned on every token (random windows of block_size + 1 tokens); a
.jsonl of {"prompt": ..., "response": ...} per line only on the response tokens (the prompt's
targets are -1, which gpt.py's loss ignores), each response followed by end-of-text when the
tokenizer has one, so the model learns to stop. The last val_fraction is held out.

The loop: AdamW on the parameters that require grad (the adapters), warmup + cosine LR
(common.cosine_lr), gradient accumulation and clipping, val loss every eval_interval steps
(the same batches every time), progress with tokens/s and ETA, one metrics.jsonl row per
step, and out_dir/adapter.pt (the adapter alone) written atomically at every evaluation.

Run:
  python finetune.py --init_from out/ckpt.pt --data data.txt            # a nanollm checkpoint
  python finetune.py --init_from gpt2 --data chat.jsonl --merge True    # GPT-2, + merged ckpt
  python finetune.py --init_from path/to/hf_folder --data data.txt     # e.g. a Llama (HF folder)
  (python lora.py takes the same options)
  -> out-lora/adapter.pt (the adapter), out-lora/metrics.jsonl, with --merge True also
     out-lora/ckpt_merged.pt (a plain checkpoint: python sample.py reads it)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import common
from common import NanoError, cli
import data
import gpt
import lora
from tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------
# Options, and the base model

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
    tracker: str = field(**common.tracker_option())
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
    common.check_out_dir(cfg.out_dir)
    out_dir = Path(cfg.out_dir)
    for name in ("adapter.pt", "metrics.jsonl") + (("ckpt_merged.pt",) if cfg.merge else ()):
        if (out_dir / name).is_dir():  # else the run would fail at its very end
            raise NanoError(f"{out_dir / name} is a folder, but {name} is written there (remove it or "
                            "choose another --out_dir)")
    if cfg.merge and (out_dir / "ckpt_merged.pt").resolve() == Path(cfg.init_from).resolve():
        raise NanoError(f"--merge would overwrite the base {cfg.init_from} (choose another --out_dir)")


def load_base(init_from: str, device: str, dtype=torch.float32):
    """(model, tokenizer spec, what to record as the adapter's base): a nanollm checkpoint,
    else a Hugging Face folder, hub name or GPT-2 size (gpt.load_pretrained) in `dtype`
    (None: the checkpoint's own, e.g. bf16 weights that QLoRA quantizes anyway)."""
    if Path(init_from).is_file() or Path(init_from).suffix in (".pt", ".pth"):
        model, spec = gpt.load_checkpoint(init_from, device)  # a missing .pt: "not found"
    else:
        model, spec = gpt.load_pretrained(init_from, dtype=dtype)
    return model.to(device), spec, init_from


# ----------------------------------------------------------------------------------------
# Data: a text file (every token a target) or prompt/response pairs (the response only)

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


# ----------------------------------------------------------------------------------------
# The loop

def count_params(model: nn.Module):
    """(trainable, total), each shared tensor (the tied embedding) counted once."""
    params = list(model.parameters())  # parameters() already yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def add_adapters(model: nn.Module, cfg: FinetuneConfig, base: str) -> nn.Module:
    """apply_lora with the CLI's options (--targets auto: default_targets), and say what trains."""
    names = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    try:
        targets = None if names in ([], ["auto"]) else names
        lora.apply_lora(model, cfg.r, cfg.alpha, cfg.lora_dropout, targets, cfg.use_rslora)
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


def train(model: nn.Module, tokenizer, cfg: FinetuneConfig, out_dir, dataset: FinetuneData | None = None,
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
    with common.MetricsLog(out_dir / "metrics.jsonl", tracker=cfg.tracker, config=asdict(cfg)) as metrics:
        val_loss = estimate_val_loss(model, dataset, cfg, device, dtype)
        print(f"step 0: val loss {val_loss:.4f} (the base model: B = 0)")
        metrics.log({"iter": 0, "val_loss": val_loss})
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
                common.atomic_save({**lora.lora_state_dict(model), **(adapter_extra or {})}, adapter_path)
            metrics.log(row)
    print(f"peak memory: {common.peak_memory_mib(device):,.0f} MiB "
          f"({'CUDA max allocated' if 'cuda' in device else 'peak RSS of the process'})")
    print(f"saved adapter ({adapter_path.stat().st_size / 1024:,.1f} KiB) to {adapter_path}; "
          f"apply it to {getattr(model, 'lora_base', None)} with lora.load_lora")
    return val_loss


# ----------------------------------------------------------------------------------------
# CLI (also `python lora.py`)

@cli
def main(argv=None):
    cfg = common.parse_config(FinetuneConfig, argv, __doc__)
    check_config(cfg)  # every option, before anything is loaded
    device = common.pick_device(cfg.device)
    common.pick_dtype(device, cfg.dtype)
    common.set_seed(cfg.seed)
    model, spec, base = load_base(cfg.init_from, device)
    tok = load_tokenizer(spec)
    dataset = load_finetune_data(model, tok, cfg)
    frozen = count_params(model)[1]
    add_adapters(model, cfg, base)
    print(f"base {base}: {frozen:,} frozen params")
    val_loss = train(model, tok, cfg, cfg.out_dir, dataset)
    if cfg.merge:
        merged_path = Path(cfg.out_dir) / "ckpt_merged.pt"
        gpt.save_checkpoint(merged_path, lora.merge_lora(model), spec, step=cfg.max_iters)
        print(f"saved merged checkpoint to {merged_path}")
    return val_loss


if __name__ == "__main__":
    main()
