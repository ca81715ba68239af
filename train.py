"""Pretraining a GPT: the loop every other idea in nanollm starts from.

Next-token prediction on a stream of tokens (Radford et al. 2018/2019), trained the way
nanoGPT trains it: AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on the
matrices only, a linear warmup then cosine decay of the learning rate, gradient
accumulation to reach a large batch on small devices, gradient clipping, bf16 autocast on
GPUs, torch.compile, and data parallelism (DDP) under torchrun. Checkpoints hold
everything a bit-exact resume needs: weights, optimizer moments, step, RNG states and
the data sampler's position.

Run:
  python train.py                                  # Tiny Shakespeare, character model, minutes on a CPU
  python train.py --arch llama --n_kv_head 2       # the same with Llama's block (RMSNorm, RoPE, SwiGLU, GQA)
  python train.py --dataset shakespeare --init_from gpt2 --max_iters 200   # finetune real GPT-2
  python train.py --dataset text:my.txt --train_tokenizer 4096             # own BPE on own text
  torchrun --nproc_per_node=8 train.py --dataset fineweb_edu --preset gpt2_124m
Options keep nanoGPT's names (python train.py --help); booleans take a value: --compile False.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from common import NanoError, cli
import data
import gpt
import hf_io
import tokenizer


@dataclass
class TrainConfig(common.TrainingConfig):  # nanoGPT's options (common.py), and these
    # data
    tokenizer: str = field(default="", metadata={"help": "tokenizer spec for text: datasets (gpt2, char:..., or a bpe.py file)"})
    train_tokenizer: int = field(default=0, metadata={"help": "train a bpe.py tokenizer of this vocab size on the text first"})
    # model
    preset: str = field(default="auto", metadata={"help": "auto (cpu on CPU, gpu on CUDA) | cpu | gpu | gpt2_124m | none: "
                                                          "defaults for the options not given on the command line"})
    arch: str = field(default="gpt2", metadata={"help": "gpt2 (LayerNorm, learned positions, GELU MLP, biases) | llama "
                                                        "(RMSNorm, RoPE, SwiGLU MLP, no biases), from scratch"})
    n_kv_head: int = field(default=0, metadata={"help": "key/value heads, each shared by n_head / n_kv_head query heads "
                                                         "(GQA; 0 = n_head, 1 = MQA)"})
    mlp_hidden: int = field(default=0, metadata={"help": "MLP hidden units (0 = 4 * n_embd for gpt2, "
                                                          "8/3 * n_embd rounded up to 64 for llama's SwiGLU)"})
    bias: bool = field(default=True, metadata={"help": "biases in Linears and norms (--arch llama: False unless given)"})
    gelu: str = field(default="exact", metadata={"help": "gpt2's MLP activation: exact (erf, as nanoGPT; on CPU half the "
                                                         "time of tanh) | tanh (GPT-2's approximation, as its weights)"})
    attn_impl: str = field(default="sdpa", metadata={"help": "sdpa (PyTorch's fused kernel) | naive (softmax attention "
                                                             "written out) | flash (flash_attention.py), from scratch"})
    qk_norm: bool = field(default=False, metadata={"help": "RMSNorm on each head's queries and keys (speedrun lever)"})
    tie_embeddings: bool = field(default=True, metadata={"help": "the head is the token embedding (False: untied head)"})
    zero_init: bool = field(default=False, metadata={"help": "zero the residual output projections (and an untied head) "
                                                             "at init, as modded-nanogpt"})
    # optimisation: the speedrun's levers
    optimizer: str = field(default="adamw", metadata={"help": "adamw | muon (Newton-Schulz orthogonalised momentum for "
                                                              "hidden matrices, AdamW for the rest)"})
    muon_lr: float = field(default=0.02, metadata={"help": "--optimizer muon: the matrices' learning rate"})
    muon_momentum: float = 0.95
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine (nanoGPT's) | wsd (warmup-stable-decay) | constant"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warmup as a fraction of max_iters (0: warmup_iters)"})
    cooldown_ratio: float = field(default=0.2, metadata={"help": "wsd: the cooldown's fraction of lr_decay_iters"})
    cooldown: str = field(default="linear", metadata={"help": "wsd's cooldown shape: linear | 1-sqrt"})
    grad_checkpoint: bool = field(default=False, metadata={"help": "recompute each block's activations in backward "
                                                                   "(torch.utils.checkpoint): less memory, more time"})
    eval_full_val: bool = field(default=False, metadata={"help": "score the whole val split (every block_size window "
                                                                 "side by side) instead of eval_iters random batches"})
    # evaluation, logging
    eval_hellaswag_every: int = field(default=0, metadata={"help": "run HellaSwag (eval_hellaswag.py) every N iters (0 = never)"})
    hellaswag_data: str = field(default="", metadata={"help": "local hellaswag_val.jsonl for --eval_hellaswag_every"})
    hellaswag_limit: int = 200
    sample_tokens: int = field(default=300, metadata={"help": "characters/tokens to sample at the end (0 = none)"})
    # system
    compile: bool = False


# Defaults by situation; a preset only fills options the user did not pass.
PRESETS = {
    # nanoGPT's CPU shakespeare_char run: ~2 min on a laptop, val loss ~1.88
    "cpu": {},
    # nanoGPT's GPU shakespeare_char run: a 10.7M-parameter "baby GPT", val loss ~1.47
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                max_iters=5000, lr_decay_iters=5000, compile=True, eval_iters=200),
    # karpathy/nanoGPT's own CPU run, exactly (its README's line: no biases, fp32, 20 eval batches)
    "nanogpt": dict(bias=False, dtype="float32", dropout=0.0, eval_iters=20, log_interval=1),
    # the speedrun (bench speedrun): nanoGPT's CPU data and model size class, a third of its time,
    # with the levers that pay at this size: Llama's block (RoPE, RMSNorm, SwiGLU) + QK-norm, an
    # untied head, zero-init projections, Muon, WSD with a 1-sqrt cooldown; the whole val split scored
    "speedrun": dict(arch="llama", qk_norm=True, tie_embeddings=False, zero_init=True, optimizer="muon",
                     muon_lr=0.05, learning_rate=3e-3, min_lr=0.0, lr_schedule="wsd", cooldown="1-sqrt",
                     cooldown_ratio=0.4, warmup_ratio=0.05, max_iters=350, lr_decay_iters=350, eval_interval=25,
                     eval_full_val=True, weight_decay=0.0),
    # GPT-2 124M on FineWeb-Edu, build-nanogpt's recipe: 0.5M tokens per step
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16,
                      gradient_accumulation_steps=32, max_iters=19073, lr_decay_iters=19073,
                      learning_rate=6e-4, min_lr=6e-5, warmup_iters=715, beta2=0.95,
                      eval_interval=250, eval_iters=20, compile=True),
}


def get_lr(it, cfg: TrainConfig):
    """The schedule's learning rate at step it: nanoGPT's warmup + cosine by default (common.py)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    return common.schedule_lr(it, cfg.lr_schedule, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters,
                              round(cfg.cooldown_ratio * cfg.lr_decay_iters), cfg.cooldown)


# ----------------------------------------------------------------------------------------
# Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon): SGD momentum whose update of
# each hidden weight matrix is replaced by the nearest semi-orthogonal matrix U V^T (G = U S V^T),
# so every direction of the update moves at the same rate; AdamW for the rest.


def newton_schulz(G, steps=5, dtype=torch.bfloat16, eps=1e-7):
    """~U V^T of G (..., m, n) without an SVD: scale G so its singular values are <= 1, then
    iterate the odd quintic X <- a X + b (X X^T) X + c (X X^T)^2 X, which pushes every singular
    value towards ~1 (coefficients chosen for the steepest slope at 0: the result's singular
    values lie in about [0.7, 1.2], not exactly 1, which trains as well). Matmuls in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # X X^T is the smaller Gram matrix this way round
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius norm >= the largest singular value
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Groups with use_muon=True (lr, momentum, weight_decay, split): Nesterov momentum, then
    orthogonalised, scaled by sqrt(max(1, rows / cols)). A fused q|k|v matrix (split=3) is three
    matrices, each orthogonalised on its own. Other groups (lr, betas, eps, weight_decay): AdamW."""

    def __init__(self, param_groups):
        super().__init__(param_groups, {})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                updates = self.muon_updates(params, group)
            else:
                updates = [self.adamw_update(p, self.state[p], group) for p in params]
            for p, update in zip(params, updates):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.view_as(p).to(p.dtype), alpha=-group["lr"])

    def muon_updates(self, params, group):
        moments = []
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - group["momentum"])  # momentum, then Nesterov's look-ahead
            moments.append(p.grad.lerp(buf, group["momentum"]).view(group["split"], -1, p.size(-1)))
        updates = [None] * len(params)
        for shape in {g.shape for g in moments}:  # matrices of one shape: one batched iteration
            idx = [i for i, g in enumerate(moments) if g.shape == shape]
            ortho = newton_schulz(torch.stack([moments[i] for i in idx])) * max(1, shape[-2] / shape[-1]) ** 0.5
            for i, u in zip(idx, ortho):
                updates[i] = u
        return updates

    @staticmethod
    def adamw_update(p, state, group):  # as torch.optim.AdamW computes it
        state["step"] = step = state.get("step", 0) + 1
        m, v = state.setdefault("exp_avg", torch.zeros_like(p)), state.setdefault("exp_avg_sq", torch.zeros_like(p))
        (b1, b2), eps = group["betas"], group["eps"]
        m.lerp_(p.grad, 1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        return m / (1 - b1**step) / (v.sqrt() / math.sqrt(1 - b2**step) + eps)


def muon_optimizer(model, cfg: TrainConfig):
    """Muon for the 2-D weights inside the blocks (learning rate muon_lr); AdamW (nanoGPT's
    settings) for the embeddings, the head, norm gains and biases, whose updates are not
    matrices acting on hidden states."""
    hidden = {n: p for n, p in model.transformer.h.named_parameters() if p.dim() == 2}
    rest = [p for p in model.parameters() if all(p is not q for q in hidden.values())]
    adamw = dict(use_muon=False, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    muon = dict(use_muon=True, lr=cfg.muon_lr, lr_scale=cfg.muon_lr / cfg.learning_rate,
                momentum=cfg.muon_momentum, weight_decay=0.0)
    fused = {n for n, p in hidden.items() if n.endswith("c_attn.weight") and p.size(0) == 3 * p.size(1)}  # q|k|v
    groups = [dict(muon, params=[p for n, p in hidden.items() if n in fused], split=3),
              dict(muon, params=[p for n, p in hidden.items() if n not in fused], split=1),
              dict(adamw, params=[p for p in rest if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(adamw, params=[p for p in rest if p.dim() < 2], weight_decay=0.0)]
    return Muon([g for g in groups if g["params"]])


def parse_args(argv):
    """The config, with the preset's defaults for the options not given; returns (cfg, given)."""
    cfg = common.parse_config(TrainConfig, argv, __doc__)
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    preset = cfg.preset
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
    if preset != "none":
        if preset not in PRESETS:
            raise NanoError(f"unknown preset {preset!r} (auto, {', '.join(PRESETS)}, none)")
        for name, value in PRESETS[preset].items():
            if name not in given:
                setattr(cfg, name, value)
        if "max_iters" in given and "lr_decay_iters" not in given and "lr_decay_iters" in PRESETS[preset]:
            cfg.lr_decay_iters = cfg.max_iters  # a longer or shorter run of the preset: the schedule follows
    for name, allowed in (("arch", ("gpt2", "llama")), ("gelu", ("exact", "tanh", "relu2")),
                          ("attn_impl", ("sdpa", "naive", "flash")), ("optimizer", ("adamw", "muon")),
                          ("lr_schedule", common.LR_SCHEDULES), ("cooldown", ("linear", "1-sqrt"))):
        if getattr(cfg, name) not in allowed:
            raise NanoError(f"unknown --{name} {getattr(cfg, name)!r} ({' or '.join(allowed)})")
    if cfg.arch == "llama" and "bias" not in given:
        cfg.bias = False  # Llama has no biases
    if cfg.resume:
        cfg.init_from = "resume"
    common.check_options(
        cfg, positive=("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                       "learning_rate", "lr_decay_iters", "eval_interval", "eval_iters", "log_interval", "muon_lr"),
        non_negative=("n_kv_head", "mlp_hidden", "max_iters", "min_lr", "warmup_iters", "weight_decay", "grad_clip",
                      "eval_hellaswag_every", "hellaswag_limit", "sample_tokens", "train_tokenizer", "peak_flops"),
        ranges={"dropout": (0.0, 0.99), "beta1": (0.0, 0.9999), "beta2": (0.0, 0.9999), "muon_momentum": (0.0, 0.9999),
                "warmup_ratio": (0.0, 1.0), "cooldown_ratio": (0.0, 1.0)})
    if cfg.warmup_ratio:
        cfg.warmup_iters = round(cfg.warmup_ratio * cfg.max_iters)
    if not (cfg.init_from in ("scratch", "resume") or cfg.init_from in hf_io.GPT2_SIZES
            or Path(cfg.init_from).exists()):
        raise NanoError(f"unknown --init_from {cfg.init_from!r} (scratch, resume, "
                        f"{', '.join(hf_io.GPT2_SIZES)}, or a checkpoint file)")
    if cfg.init_from == "scratch":
        model_config(cfg, vocab_size=1)  # a shape the model refuses (n_head vs n_embd, n_kv_head) fails now
    return cfg, given


def model_config(cfg: TrainConfig, vocab_size):
    """The model trained from scratch: GPT-2's block, or Llama's (gpt.llama_config's switches)."""
    shape = dict(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, mlp_hidden=cfg.mlp_hidden, dropout=cfg.dropout,
                 bias=cfg.bias, attn_impl=cfg.attn_impl, qk_norm=cfg.qk_norm, tie_embeddings=cfg.tie_embeddings)
    if cfg.arch == "llama":  # SwiGLU, unless ReLU² is asked for
        return gpt.llama_config(**shape, **({"gelu": "relu2"} if cfg.gelu == "relu2" else {}))
    return gpt.GPTConfig(**shape, gelu=cfg.gelu)


def prepare_data(cfg: TrainConfig):
    """Tokenize the dataset once (under torchrun: rank 0 first, the others reuse it); its folder."""
    tokenizer = cfg.tokenizer or None
    if cfg.init_from in hf_io.GPT2_SIZES and cfg.dataset == "shakespeare_char":
        raise NanoError("GPT-2 weights need GPT-2 tokens (use --dataset shakespeare or text:<path>)")
    if cfg.train_tokenizer:
        if not cfg.dataset.startswith("text:"):
            raise NanoError("--train_tokenizer needs --dataset text:<path>")
        import hashlib

        import bpe  # only this option needs the tokenizer trainer
        from tokenizer import save_bpe  # (`tokenizer` is a local name here)

        src = Path(cfg.dataset[len("text:"):])
        if not src.is_file():
            raise NanoError(f"input file {src} not found (check the text: path)")
        text = data.read_text_file(src, "--dataset text:")
        # keyed by the text's content: another corpus of the same file name gets its own merges
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        tok_path = Path(cfg.data_root) / f"bpe_{src.stem}_{cfg.train_tokenizer}_{digest}.bpe"
        if not tok_path.exists():  # trained on the train split alone: the held-out text must not shape the merges
            train_text = text[:int(len(text) * (1 - data.VAL_FRACTION))]  # prepare_dataset's split
            vocab, merges = bpe.train_bpe(train_text, cfg.train_tokenizer, special_tokens=("<|endoftext|>",))
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            save_bpe(bpe.Tokenizer(vocab, merges, ("<|endoftext|>",)), tok_path)
        tokenizer = str(tok_path.resolve())  # the checkpoint records it: a path that works from any folder
    return data.prepare_dataset(cfg.dataset, cfg.input or None, tokenizer, cfg.data_root)


@torch.no_grad()
def whole_split_loss(model, bins, block_size, device="cpu", rows=256):
    """Mean loss over every non-overlapping block_size window of a split (all its shards), in the
    model's own precision: the score without the noise of random batches (a small val split:
    Shakespeare's 111,540 characters). bench scores nanoGPT's models with it too."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for shard in bins.shards:
        ids = torch.from_numpy(shard.astype("int64"))
        n = (len(ids) - 1) // block_size * block_size
        x, y = ids[:n].view(-1, block_size), ids[1:n + 1].view(-1, block_size)
        for i in range(0, len(x), rows):
            _, loss = model(x[i:i + rows].to(device), y[i:i + rows].to(device))
            total, count = total + loss.item() * y[i:i + rows].numel(), count + y[i:i + rows].numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def estimate_loss(model, bins, cfg, device, ctx):
    """Mean loss over eval_iters batches per split. The batches come from their own
    generator seeded by the step, so evaluation never moves the training data position."""
    model.eval()
    out = {}
    for split, split_bins in bins.items():
        g = torch.Generator().manual_seed(cfg.seed + 1)  # the same eval batches every time: comparable numbers
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = split_bins.get_batch(cfg.batch_size, cfg.block_size, g, device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    if cfg.eval_full_val:
        out["val"] = whole_split_loss(model, bins["val"], cfg.block_size, device)
    model.train()
    return out


# ----------------------------------------------------------------------------------------
# The loop: ~50 lines, as nanoGPT's


def train_loop(cfg, run, model, raw_model, optimizer, scaler, bins, state, write_metrics, hellaswag=None):
    """Train from state["iter"] to cfg.max_iters: evaluate and checkpoint every eval_interval,
    log every log_interval. state: {"iter", "best_val_loss"}, updated in place."""
    start_iter = iter_num = state["iter"]
    step_times, tokens_per_iter = [], cfg.gradient_accumulation_steps * run.world * cfg.batch_size * cfg.block_size
    x, y = train_batch(cfg, run, bins, iter_num, 0)
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:  # Muon's groups keep their own ratio to the schedule
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if iter_num % cfg.eval_interval == 0 and run.master and (iter_num != start_iter or start_iter == 0):
            evaluate_and_save(cfg, run, raw_model, optimizer, bins, state, iter_num, write_metrics)
        if hellaswag is not None and iter_num % cfg.eval_hellaswag_every == 0:
            hellaswag(iter_num)
        t0 = time.time()  # step times (and the eval rows' training time) leave evaluations out
        if iter_num >= cfg.max_iters:  # the same on every rank: no rank leaves the collectives early
            break

        # gradient accumulation: micro-batches add their gradients, DDP syncs only on the last one
        for micro_step in range(cfg.gradient_accumulation_steps):
            last = micro_step == cfg.gradient_accumulation_steps - 1
            if run.ddp:
                model.require_backward_grad_sync = last
            with run.ctx:
                _, loss = model(x, y)
                loss = loss / cfg.gradient_accumulation_steps
            # draw the next micro-batch while the device still works on this one (async on CUDA)
            x, y = train_batch(cfg, run, bins, iter_num + last, 0 if last else micro_step + 1)
            scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        dt = time.time() - t0
        state["train_time"] = state.get("train_time", 0.0) + dt
        iter_num += 1
        if iter_num - start_iter > 1:  # the first step includes compilation and warm-up
            step_times.append(dt)
        if iter_num % cfg.log_interval == 0 and run.master:
            lossf = loss.item() * cfg.gradient_accumulation_steps
            mfu = raw_model.estimate_mfu(cfg.batch_size * cfg.gradient_accumulation_steps, dt, run.peak_flops)
            recent = sorted(step_times[-50:]) or [dt]
            eta = recent[len(recent) // 2] * (cfg.max_iters - iter_num)
            run.log(f"iter {iter_num}/{cfg.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                    f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.1f}%" if mfu else "")
                    + f", eta {eta / 60:.1f} min")
            write_metrics({"iter": iter_num, "loss": lossf, "lr": lr, "ms_per_step": dt * 1000,
                           "tokens": iter_num * tokens_per_iter, "tokens_per_s": tokens_per_iter / dt, "mfu": mfu})
    state["iter"] = iter_num
    if run.master and step_times:
        med = sorted(step_times)[len(step_times) // 2]
        run.log(f"done: {iter_num} iters, median {med * 1000:.1f} ms/iter, {tokens_per_iter / med:,.0f} tok/s")


def train_batch(cfg, run, bins, it, micro_step):
    # Each micro-batch has its own seed, from (iter, its index among all ranks' micro-batches),
    # so the data position is just the iteration: a resume draws exactly the batches it would
    # have drawn, and N ranks together draw the batches one process draws with N times the
    # accumulation steps.
    global_micro_step = run.rank * cfg.gradient_accumulation_steps + micro_step
    g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + it) * 1_000_003 + global_micro_step) % 2**63)
    return bins["train"].get_batch(cfg.batch_size, cfg.block_size, g, run.device)


def evaluate_and_save(cfg, run, raw_model, optimizer, bins, state, iter_num, write_metrics):
    """Train and val loss (and val bits per byte); a checkpoint when val improves."""
    losses = estimate_loss(raw_model, bins, cfg, run.device, run.ctx)
    # bits per UTF-8 byte: nats per token / ln 2 x tokens per byte of the held-out text, so
    # models with different tokenizers compare
    bpb = losses["val"] / math.log(2) * run.val_tokens_per_byte if run.val_tokens_per_byte else None
    run.log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            + (f", val bpb {bpb:.4f}" if bpb else ""))
    # time_s: seconds of training so far, evaluations left out (the speedrun's clock)
    write_metrics({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb,
                   "time_s": state.get("train_time", 0.0)})
    if iter_num > 0 and (losses["val"] < state["best_val_loss"] or cfg.always_save_checkpoint):
        state["best_val_loss"] = min(state["best_val_loss"], losses["val"])
        gpt.save_checkpoint(run.ckpt_path, raw_model, run.tokenizer_spec, step=iter_num,
                            optimizer=optimizer.state_dict(), best_val_loss=state["best_val_loss"],
                            train_time=state.get("train_time", 0.0),
                            train_config=asdict(cfg), torch_rng=torch.get_rng_state(),
                            cuda_rng=torch.cuda.get_rng_state() if run.device_type == "cuda" else None)
        run.log(f"saved checkpoint to {run.ckpt_path}")


# ----------------------------------------------------------------------------------------
# Setup: processes and device, checkpoint to resume, data, model, optimizer, logs


@dataclass
class Run:
    """What the stages share about this process."""
    ddp: bool
    rank: int
    world: int
    device: str
    dtype: torch.dtype
    ctx: object
    out_dir: Path
    log: object = print
    peak_flops: float | None = None
    tokenizer_spec: str | None = None
    val_tokens_per_byte: float | None = None

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def ckpt_path(self):
        return self.out_dir / "ckpt.pt"


def setup(cfg: TrainConfig) -> Run:
    """Processes (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE), device, precision, out_dir."""
    out_dir = Path(cfg.out_dir)
    common.check_out_dir(out_dir)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{local_rank}" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
        if cfg.gradient_accumulation_steps % world:
            raise NanoError(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} "
                            f"is not divisible by the world size {world}")
        # gloo (CPU) waits a bounded time, so a rank that dies cannot hang the others for 30 min
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=None if device.startswith("cuda") else datetime.timedelta(minutes=5))
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        cfg.gradient_accumulation_steps //= world  # each rank does its share of the micro-steps
    else:
        rank, world, device = 0, 1, common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)
    units = cpu_bf16_units() if device == "cpu" and cfg.dtype == "auto" else None
    if units and cfg.n_embd >= BF16_MIN_WIDTH:
        dtype = torch.bfloat16
    if units and rank == 0:
        print(f"CPU bf16 matrix units: {units}; --dtype auto: "
              + ("bfloat16 autocast" if dtype == torch.bfloat16 else f"float32 (n_embd < {BF16_MIN_WIDTH}: bf16 does not pay)"))
    torch.manual_seed(cfg.seed + rank)
    return Run(ddp, rank, world, device, dtype, common.autocast(device, dtype), out_dir,
               log=print if rank == 0 else (lambda *a, **k: None),
               peak_flops=common.device_peak_flops(device, dtype, cfg.peak_flops))


# Where bf16 autocast beats fp32 on a CPU with bf16 matrix units (AMX, measured: a step's CPU time
# bf16 / fp32 was 1.19x at n_embd 128, T 64 and 0.62x at 256, T 128): below this width the casts
# around each small matmul cost more than the matmul saves.
BF16_MIN_WIDTH = 256


def cpu_bf16_units():
    """The CPU's bf16 matrix units from /proc/cpuinfo's flags: "AMX" (tiles: Sapphire Rapids and
    later), "AVX512-BF16" (dot products), or None (bf16 is then emulated: slower than fp32)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def checkpoint_blocks(model):
    """--grad_checkpoint (Chen et al. 2016, arXiv:1604.06174): each block keeps only its input in
    forward and recomputes its activations in backward, so activation memory holds one block's
    activations plus every block's input instead of every block's activations: ~1/3 more compute."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:  # non-reentrant: works with kwargs, no_grad and torch.compile
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def read_resume_checkpoint(cfg: TrainConfig, run: Run, given: set):
    """The checkpoint to resume from, read first so a bad path fails before any work; the
    model's shape comes from it, so a conflicting shape option is refused, not ignored."""
    if cfg.init_from != "resume":
        return None
    ckpt = gpt.read_checkpoint(run.ckpt_path, run.device)
    if "optimizer" not in ckpt:
        raise NanoError(f"{run.ckpt_path} has no optimizer state (not a train.py checkpoint)")
    saved_config = ckpt["config"]
    for name in ("arch", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "block_size", "bias", "dropout", "gelu",
                 "attn_impl", "qk_norm", "tie_embeddings"):
        saved, mine = saved_config.get(name), getattr(cfg, name)
        if name == "n_kv_head" and saved is not None:  # 0 = n_head (checkpoints saved before GPTConfig resolved it: 0)
            saved, mine = saved or saved_config["n_head"], mine or saved_config["n_head"]
        if name in given and saved is not None and mine != saved:
            raise NanoError(f"--{name} {getattr(cfg, name)} differs from the checkpoint's {saved} "
                            "(a resumed run keeps the checkpoint's model: drop the option)")
    cfg.block_size = ckpt["config"]["block_size"]
    return ckpt


def build_model(cfg: TrainConfig, run: Run, meta: dict, ckpt):
    """From scratch, from GPT-2 weights, from a checkpoint file, or resumed; checked against the data."""
    if cfg.init_from in hf_io.GPT2_SIZES:
        model = gpt.GPT.from_pretrained(cfg.init_from)
        model.crop_block_size(min(cfg.block_size, model.config.block_size))
        tokenizer_spec = "gpt2"
    elif cfg.init_from == "scratch":
        model = gpt.GPT(model_config(cfg, meta["vocab_size"]))
        tokenizer_spec = meta["tokenizer"]
        if cfg.zero_init:  # each block starts as the identity: the residual stream is the embedding
            for m in model.modules():
                if getattr(m, "RESIDUAL_SCALE_INIT", False) or (m is model.lm_head and not cfg.tie_embeddings):
                    torch.nn.init.zeros_(m.weight)
    else:  # resumed, or the weights of a checkpoint file (a fresh optimizer and step 0)
        source = run.ckpt_path if ckpt is not None else cfg.init_from
        weights = ckpt if ckpt is not None else gpt.read_checkpoint(source, run.device)
        model, tokenizer_spec = gpt.model_from_checkpoint(weights, source), weights.get("tokenizer")
        if ckpt is None:
            model.crop_block_size(min(cfg.block_size, model.config.block_size))
    if tokenizer_spec != meta["tokenizer"]:
        raise NanoError(f"the model uses tokenizer {tokenizer_spec!r}, the data {meta['tokenizer']!r} "
                        "(prepare the data with the model's tokenizer)")
    if meta["vocab_size"] > model.config.vocab_size:
        raise NanoError(f"the data has {meta['vocab_size']} token ids, the model only "
                        f"{model.config.vocab_size} (use a matching dataset or tokenizer)")
    if cfg.block_size > model.config.block_size:
        raise NanoError(f"block_size {cfg.block_size} exceeds the model's {model.config.block_size}")
    run.tokenizer_spec = tokenizer_spec
    model.to(run.device)
    run.log(f"model: {model.config.arch}, {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
            f"device {run.device}, dtype {str(run.dtype).removeprefix('torch.')}, world size {run.world}")
    return model


def build_optimizer(cfg: TrainConfig, run: Run, model, ckpt):
    """AdamW (and the fp16 loss scaler); a resumed run gets its moments, step and RNG state back."""
    if cfg.optimizer == "muon":
        optimizer = muon_optimizer(model, cfg)
    else:
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), run.device_type)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not
    scaler = torch.amp.GradScaler(run.device_type, enabled=(run.dtype == torch.float16))
    state = {"iter": 0, "best_val_loss": float("inf")}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {"iter": ckpt["step"], "best_val_loss": ckpt["best_val_loss"], "train_time": ckpt.get("train_time", 0.0)}
        # dropout's randomness (rank 0's under DDP); RNG states are CPU byte tensors, whatever
        # device the checkpoint was mapped to
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if run.device_type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
        run.log(f"resumed from {run.ckpt_path} at iter {state['iter']} (best val loss {state['best_val_loss']:.4f})")
    return optimizer, scaler, state


def open_metrics(cfg: TrainConfig, run: Run, resumed_iter: int | None):
    """metrics.jsonl (and --tracker): a new run starts it afresh; a resumed one keeps the rows up
    to its step (a killed run may have logged past its last checkpoint) and appends. Stale temp
    files of a killed save are removed."""
    if run.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for tmp in run.out_dir.glob(".ckpt.pt.tmp*"):
            tmp.unlink(missing_ok=True)
    return common.MetricsLog(run.out_dir / "metrics.jsonl", tracker=cfg.tracker, config=asdict(cfg),
                             resume_iter=resumed_iter, active=run.master)


def hellaswag_hook(cfg: TrainConfig, run: Run, raw_model, write_metrics):
    """--eval_hellaswag_every: every rank scores its share of the examples."""
    import eval_hellaswag  # only this option needs it

    with common.rank0_first():  # rank 0 downloads, the others then find the file
        examples = eval_hellaswag.load_examples(cfg.hellaswag_data or eval_hellaswag.download("val"), cfg.hellaswag_limit)
    tok = tokenizer.load_tokenizer(run.tokenizer_spec)

    def evaluate(iter_num):
        res = eval_hellaswag.evaluate(raw_model, tok, examples, "completion", device=run.device, dtype=run.dtype)
        run.log(f"iter {iter_num}: hellaswag acc {res['acc']:.4f}, acc_norm {res['acc_norm']:.4f} ({res['n']} examples)")
        write_metrics({"iter": iter_num, "hellaswag_acc": res["acc"], "hellaswag_acc_norm": res["acc_norm"]})

    return evaluate


def sample_text(cfg: TrainConfig, run: Run, raw_model):
    import sample  # sample.py's KV-cached generation, for the few lines shown at the end

    tok = tokenizer.load_tokenizer(run.tokenizer_spec)
    start = [[tok.eot_id if tok.eot_id is not None else tok.encode("\n")[0]]]
    raw_model.eval()
    with run.ctx:
        out = [int(t) for t in sample.generate(raw_model, start, cfg.sample_tokens, temperature=0.8, top_k=200,
                                               vocab_size=tok.vocab_size)]
    run.log("--- sample ---\n" + tok.decode(out))


@cli
def main(argv=None):
    cfg, given = parse_args(argv)
    run = setup(cfg)
    ckpt = read_resume_checkpoint(cfg, run, given)
    with common.rank0_first():
        data_dir = prepare_data(cfg)
    meta = data.read_meta(data_dir)
    bins = {"train": data.TokenBins(data_dir, "train"), "val": data.TokenBins(data_dir, "val")}
    if meta.get("val_bytes"):
        run.val_tokens_per_byte = meta["val_tokens"] / meta["val_bytes"]
    raw_model = build_model(cfg, run, meta, ckpt)
    optimizer, scaler, state = build_optimizer(cfg, run, raw_model, ckpt)
    ckpt = None  # free the memory
    if cfg.grad_checkpoint:
        checkpoint_blocks(raw_model)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if run.ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if run.device_type == "cuda" else None)
    metrics = open_metrics(cfg, run, state["iter"] if cfg.init_from == "resume" else None)
    write_metrics = metrics.log
    hellaswag = hellaswag_hook(cfg, run, raw_model, write_metrics) if cfg.eval_hellaswag_every else None
    run.log(f"tokens per iteration: {cfg.gradient_accumulation_steps * run.world * cfg.batch_size * cfg.block_size:,}")

    train_loop(cfg, run, model, raw_model, optimizer, scaler, bins, state, write_metrics, hellaswag)
    metrics.close()

    if run.master and cfg.sample_tokens:
        sample_text(cfg, run, raw_model)
    run.log(f"plot: python plot.py {run.out_dir / 'metrics.jsonl'}")
    if run.ddp:
        dist.destroy_process_group()
    return {"iter": state["iter"], "best_val_loss": state["best_val_loss"]}


if __name__ == "__main__":
    main()
