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
  python train.py --dataset shakespeare --init_from gpt2 --max_iters 200   # finetune real GPT-2
  python train.py --dataset text:my.txt --train_tokenizer 4096             # own BPE on own text
  torchrun --nproc_per_node=8 train.py --dataset fineweb_edu --preset gpt2_124m
Options keep nanoGPT's names (python train.py --help); booleans take a value: --compile False.
"""

from __future__ import annotations

import json
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


@dataclass
class TrainConfig:
    # data
    dataset: str = field(default="shakespeare_char", metadata={"help": "shakespeare_char | shakespeare | fineweb_edu | text:<path>"})
    input: str = field(default="", metadata={"help": "local copy of the raw text instead of downloading it"})
    data_root: str = "data"
    tokenizer: str = field(default="", metadata={"help": "tokenizer spec for text: datasets (gpt2, char:..., or a bpe.py file)"})
    train_tokenizer: int = field(default=0, metadata={"help": "train a bpe.py tokenizer of this vocab size on the text first"})
    # model
    preset: str = field(default="auto", metadata={"help": "auto (cpu on CPU, gpu on CUDA) | cpu | gpu | gpt2_124m | none: "
                                                          "defaults for the options not given on the command line"})
    init_from: str = field(default="scratch", metadata={"help": "scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt.pt (same as --init_from resume)"})
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm to this (0 = off)"})
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    always_save_checkpoint: bool = field(default=False, metadata={"help": "save at every eval, not only on a better val loss"})
    eval_hellaswag_every: int = field(default=0, metadata={"help": "run HellaSwag (eval_hellaswag.py) every N iters (0 = never)"})
    hellaswag_data: str = field(default="", metadata={"help": "local hellaswag_val.jsonl for --eval_hellaswag_every"})
    hellaswag_limit: int = 200
    out_dir: str = "out"
    sample_tokens: int = field(default=300, metadata={"help": "characters/tokens to sample at the end (0 = none)"})
    wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases if the package is installed"})
    # system
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    compile: bool = False
    peak_flops: float = field(default=0.0, metadata={"help": "device peak FLOP/s for MFU (0 = datasheet table for A100/H100/H200)"})
    seed: int = 1337


# Defaults by situation; a preset only fills options the user did not pass.
PRESETS = {
    # nanoGPT's CPU shakespeare_char run: ~2 min on a laptop, val loss ~1.88
    "cpu": {},
    # nanoGPT's GPU shakespeare_char run: a 10.7M-parameter "baby GPT", val loss ~1.47
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                max_iters=5000, lr_decay_iters=5000, compile=True, eval_iters=200),
    # GPT-2 124M on FineWeb-Edu, build-nanogpt's recipe: 0.5M tokens per step
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16,
                      gradient_accumulation_steps=32, max_iters=19073, lr_decay_iters=19073,
                      learning_rate=6e-4, min_lr=6e-5, warmup_iters=715, beta2=0.95,
                      eval_interval=250, eval_iters=20, compile=True),
}


def get_lr(it, cfg: TrainConfig):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    return common.cosine_lr(it, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)


def parse_args(argv):
    cfg = common.parse_config(TrainConfig, argv, __doc__)
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    preset = cfg.preset
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
    if preset != "none":
        if preset not in PRESETS:
            raise NanoError(f"unknown preset {preset!r} (auto, cpu, gpu, gpt2_124m, none)")
        for name, value in PRESETS[preset].items():
            if name not in given:
                setattr(cfg, name, value)
    if cfg.resume:
        cfg.init_from = "resume"
    return cfg


def prepare_data(cfg: TrainConfig, master: bool):
    """Tokenize the dataset once (rank 0) and return its folder."""
    tokenizer = cfg.tokenizer or None
    if cfg.init_from.startswith("gpt2") and cfg.dataset == "shakespeare_char":
        raise NanoError("GPT-2 weights need GPT-2 tokens (use --dataset shakespeare or text:<path>)")
    if cfg.train_tokenizer:
        if not cfg.dataset.startswith("text:"):
            raise NanoError("--train_tokenizer needs --dataset text:<path>")
        import bpe  # only this option needs the tokenizer trainer

        src = cfg.dataset[len("text:"):]
        tok_path = Path(cfg.data_root) / f"bpe_{Path(src).stem}_{cfg.train_tokenizer}.bpe"
        if master and not tok_path.exists():
            vocab, merges = bpe.train_bpe(src, cfg.train_tokenizer, special_tokens=("<|endoftext|>",))
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            bpe.Tokenizer(vocab, merges, ("<|endoftext|>",)).save(tok_path)
        tokenizer = str(tok_path.resolve())  # the checkpoint records it: a path that works from any folder
    if master:
        return data.prepare_dataset(cfg.dataset, cfg.input or None, tokenizer, cfg.data_root)
    return None


@torch.no_grad()
def estimate_loss(model, bins, cfg, device, ctx):
    """Mean loss over eval_iters batches per split. The batches come from their own
    generator seeded by the step, so evaluation never moves the training data position."""
    model.eval()
    out = {}
    for split, data in bins.items():
        g = torch.Generator().manual_seed(cfg.seed + 1)  # the same eval batches every time: comparable numbers
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = data.get_batch(cfg.batch_size, cfg.block_size, g, device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


@cli
def main(argv=None):
    cfg = parse_args(argv)
    # --- distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{local_rank}" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        if cfg.gradient_accumulation_steps % world:
            raise NanoError(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} "
                             f"is not divisible by the world size {world}")
        cfg.gradient_accumulation_steps //= world  # each rank does its share of the micro-steps
    else:
        rank, world, device = 0, 1, common.pick_device(cfg.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device_type = device.split(":")[0]
    dtype = common.pick_dtype(device, cfg.dtype)
    ctx = common.autocast(device, dtype)
    torch.manual_seed(cfg.seed + rank)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"

    # --- checkpoint to resume from: read first, so a bad path fails before any work
    ckpt = gpt.read_checkpoint(ckpt_path, device) if cfg.init_from == "resume" else None
    if ckpt is not None:
        if "optimizer" not in ckpt:
            raise NanoError(f"{ckpt_path} has no optimizer state (not a train.py checkpoint)")
        cfg.block_size = ckpt["config"]["block_size"]  # the model's shape comes from the checkpoint

    # --- data
    data_dir = prepare_data(cfg, master)
    if ddp:
        dist.barrier()  # the others wait while rank 0 tokenizes
        data_dir = prepare_data(cfg, True) if not master else data_dir
    meta = data.read_meta(data_dir)
    bins = {"train": data.TokenBins(data_dir, "train"), "val": data.TokenBins(data_dir, "val")}

    # --- model
    if cfg.init_from.startswith("gpt2"):
        model = gpt.GPT.from_pretrained(cfg.init_from)
        model.crop_block_size(min(cfg.block_size, model.config.block_size))
        tokenizer_spec = "gpt2"
    elif ckpt is not None:
        model = gpt.model_from_checkpoint(ckpt, ckpt_path)
        tokenizer_spec = ckpt.get("tokenizer")
    else:
        model = gpt.GPT(gpt.GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
        tokenizer_spec = meta["tokenizer"]
    if tokenizer_spec != meta["tokenizer"]:
        raise NanoError(f"the model uses tokenizer {tokenizer_spec!r}, the data {meta['tokenizer']!r} "
                         "(prepare the data with the model's tokenizer)")
    if meta["vocab_size"] > model.config.vocab_size:
        raise NanoError(f"the data has {meta['vocab_size']} token ids, the model only "
                         f"{model.config.vocab_size} (use a matching dataset or tokenizer)")
    if cfg.block_size > model.config.block_size:
        raise NanoError(f"block_size {cfg.block_size} exceeds the model's {model.config.block_size}")
    model.to(device)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
        f"device {device}, dtype {str(dtype).removeprefix('torch.')}, world size {world}")

    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["step"], ckpt["best_val_loss"]
        # dropout's randomness (rank 0's under DDP); RNG states are CPU byte tensors, whatever
        # device the checkpoint was mapped to
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if device_type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
        log(f"resumed from {ckpt_path} at iter {iter_num} (best val loss {best_val_loss:.4f})")
        ckpt = None  # free the memory
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)

    hellaswag = None
    if cfg.eval_hellaswag_every:
        import eval_hellaswag  # only this option needs it

        if master and not cfg.hellaswag_data:
            eval_hellaswag.download("val")
        if ddp:
            dist.barrier()  # rank 0 downloads, the others wait, then every rank scores its share
        hellaswag = eval_hellaswag.load_examples(cfg.hellaswag_data or eval_hellaswag.download("val"), cfg.hellaswag_limit)
        hellaswag_tok = data.load_tokenizer(tokenizer_spec)
    wandb_run = None
    if cfg.wandb and master:
        try:
            import wandb

            wandb_run = wandb.init(project="nanollm", config=asdict(cfg))
        except ImportError:
            log("wandb is not installed; logging to metrics.jsonl only")
    peak_flops = common.device_peak_flops(device, dtype, cfg.peak_flops)
    tokens_per_iter = cfg.gradient_accumulation_steps * world * cfg.batch_size * cfg.block_size
    log(f"tokens per iteration: {tokens_per_iter:,}")
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    # a resumed run continues the file, a new run starts it afresh
    metrics = open(out_dir / "metrics.jsonl", "a" if cfg.init_from == "resume" else "w") if master else None

    def write_metrics(row):
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if wandb_run is not None:
                wandb_run.log(row, step=row["iter"])

    def train_batch(it, micro_step):
        # Each micro-batch has its own seed, from (iter, its index among all ranks' micro-batches),
        # so the data position is just the iteration: a resume draws exactly the batches it would
        # have drawn, and N ranks together draw the batches one process draws with N times the
        # accumulation steps.
        global_micro_step = rank * cfg.gradient_accumulation_steps + micro_step
        g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + it) * 1_000_003 + global_micro_step) % 2**63)
        return bins["train"].get_batch(cfg.batch_size, cfg.block_size, g, device)

    # --- the loop
    start_iter = iter_num
    x, y = train_batch(iter_num, 0)
    t0 = time.time()
    step_times = []
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % cfg.eval_interval == 0 and master and (iter_num != start_iter or start_iter == 0):
            losses = estimate_loss(raw_model, bins, cfg, device, ctx)
            log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            write_metrics({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
            if iter_num > 0 and (losses["val"] < best_val_loss or cfg.always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses["val"])
                gpt.save_checkpoint(ckpt_path, raw_model, tokenizer_spec, step=iter_num,
                                    optimizer=optimizer.state_dict(), best_val_loss=best_val_loss,
                                    train_config=asdict(cfg), torch_rng=torch.get_rng_state(),
                                    cuda_rng=torch.cuda.get_rng_state() if device_type == "cuda" else None)
                log(f"saved checkpoint to {ckpt_path}")
        if hellaswag is not None and iter_num % cfg.eval_hellaswag_every == 0:
            res = eval_hellaswag.evaluate(raw_model, hellaswag_tok, hellaswag, "completion", device=device, dtype=dtype)
            log(f"iter {iter_num}: hellaswag acc {res['acc']:.4f}, acc_norm {res['acc_norm']:.4f} ({res['n']} examples)")
            write_metrics({"iter": iter_num, "hellaswag_acc": res["acc"], "hellaswag_acc_norm": res["acc_norm"]})
        if iter_num >= cfg.max_iters:
            break

        # gradient accumulation: micro-batches add their gradients, DDP syncs only on the last one
        for micro_step in range(cfg.gradient_accumulation_steps):
            if ddp:
                model.require_backward_grad_sync = micro_step == cfg.gradient_accumulation_steps - 1
            with ctx:
                _, loss = model(x, y)
                loss = loss / cfg.gradient_accumulation_steps
            # draw the next micro-batch while the device still works on this one (async on CUDA)
            last = micro_step == cfg.gradient_accumulation_steps - 1
            x, y = train_batch(iter_num + last, 0 if last else micro_step + 1)
            scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        iter_num += 1
        if iter_num - start_iter > 1:  # the first step includes compilation and warm-up
            step_times.append(dt)
        if iter_num % cfg.log_interval == 0 and master:
            lossf = loss.item() * cfg.gradient_accumulation_steps
            mfu = raw_model.estimate_mfu(cfg.batch_size * cfg.gradient_accumulation_steps, dt, peak_flops)  # per GPU
            recent = sorted(step_times[-50:]) or [dt]
            eta = recent[len(recent) // 2] * (cfg.max_iters - iter_num)
            log(f"iter {iter_num}/{cfg.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.1f}%" if mfu else "")
                + f", eta {eta / 60:.1f} min")
            write_metrics({"iter": iter_num, "loss": lossf, "lr": lr, "ms_per_step": dt * 1000,
                           "tokens_per_s": tokens_per_iter / dt, "mfu": mfu})

    if master and step_times:
        med = sorted(step_times)[len(step_times) // 2]
        log(f"done: {iter_num} iters, median {med * 1000:.1f} ms/iter, {tokens_per_iter / med:,.0f} tok/s")
    if master and cfg.sample_tokens:
        tok = data.load_tokenizer(tokenizer_spec)
        start = torch.full((1, 1), tok.eot_id if tok.eot_id is not None else tok.encode("\n")[0], device=device)
        raw_model.eval()
        with ctx:
            out = raw_model.generate(start, cfg.sample_tokens, temperature=0.8, top_k=200)
        log("--- sample ---\n" + tok.decode(out[0, 1:].tolist()))
    if metrics is not None:
        metrics.close()
    if ddp:
        dist.destroy_process_group()
    return {"iter": iter_num, "best_val_loss": best_val_loss}


if __name__ == "__main__":
    main()
