"""fsdp2: what one rank of fsdp2_train.py holds, full vs QLoRA, at 1 and 2 ranks; and the CPU step
time of 2 ranks (torchrun, gloo) vs 1 process vs a plain step without torch.distributed.

Run: python -m bench fsdp2 [--quick]"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import data
import fsdp2_train
import gpt
from common import median_ms

from .util import ROOT, SHARED_DATA, row


def shakespeare_text() -> str:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        path = data.download(data.SHAKESPEARE_URL, ROOT / "data" / "tinyshakespeare.txt")
    return path.read_text()


def bench_fsdp2(quick: bool) -> None:
    """fsdp2_train.py: what one rank holds, full vs QLoRA, and CPU step time 2 ranks vs 1.

    Bytes: counted on the real model fsdp2_train builds (GPT-2-124M shape; quick: a tiny
    one; QLoRA really quantized to NF4), cut the way FSDP2 cuts every parameter (dim 0 in
    torch.chunk pieces; rank 0 holds the largest piece, tests/test_fsdp2_train.py checks the
    rule on real shards). Per rank: parameter shards, gradient shards + AdamW's two moments
    (fp32, trainable parameters only), and the replicated buffers (NF4 fp32 scales).
    Step time: the tiny config through fsdp2_train.py on CPU/gloo, global batch 8, median
    ms/step from metrics.jsonl (first 3 steps dropped), 1 process vs torchrun with 2 ranks,
    one thread per process (a rank per core), and a plain GPT + AdamW step without
    torch.distributed. quick: the byte counts on a tiny shape only."""
    rank_bytes(quick)
    if not quick:  # the step timings launch training runs: too slow for a smoke test
        step_times()


def rank_bytes(quick: bool) -> None:
    """Bytes per rank, full vs QLoRA, 1 and 2 ranks (see bench_fsdp2)."""
    shape = (["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64"] if quick else
             ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"])
    name = "tiny 2L/64" if quick else "gpt2-124M"
    vocab = 512 if quick else 50304

    def rank0_bytes(model, world):
        params = train_state = 0
        for p in model.parameters():
            rows = -(-p.shape[0] // world)  # torch.chunk: the first piece is the largest
            local = rows * (p.numel() // p.shape[0])
            params += local * p.element_size()
            if p.requires_grad:
                train_state += local * 4 * 3  # fp32 gradient + exp_avg + exp_avg_sq
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return params, train_state, buffers

    MiB = 2**20
    totals = {}
    for mode in ("full", "qlora"):
        cfg, _ = fsdp2_train.parse_args(shape + ["--mode", mode])
        if mode == "full":
            with torch.device("meta"):  # shapes are all it takes
                model, _ = fsdp2_train.build_model(cfg, vocab, "cpu", torch.float32)
        else:
            model, _ = fsdp2_train.build_model(cfg, vocab, "cpu", torch.float32)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for world in (1, 2):
            params, train_state, buffers = rank0_bytes(model, world)
            totals[mode, world] = params + train_state + buffers
            row("fsdp2", f"{name} {mode} ({trainable / 1e6:.2f}M trainable), {world} rank{'s' if world > 1 else ''}: per rank",
                f"{totals[mode, world] / MiB:,.1f} MiB (params {params / MiB:,.1f} + grads/AdamW "
                f"{train_state / MiB:,.1f} + replicated {buffers / MiB:,.2f})")
        # the largest transient: one block gathered for its forward (bf16 floats on a GPU)
        block = model.transformer.h[0]
        gathered = sum(p.numel() * (2 if p.is_floating_point() else p.element_size()) for p in block.parameters())
        row("fsdp2", f"{name} {mode}: one block all-gathered (bf16 floats, any world size)", f"{gathered / MiB:,.2f} MiB")
        del model
    for world in (1, 2):
        row("fsdp2", f"{name} per-rank bytes, full / qlora, {world} rank{'s' if world > 1 else ''}",
            f"{totals['full', world] / totals['qlora', world]:.2f}x")
    row("fsdp2", f"{name} per-rank bytes, 1 rank / 2 ranks (full; qlora)",
        f"{totals['full', 1] / totals['full', 2]:.2f}x; {totals['qlora', 1] / totals['qlora', 2]:.2f}x")


def step_times() -> None:
    """CPU step time of the tiny config: 1 process, torchrun with 2 ranks, a plain step (see bench_fsdp2)."""
    tiny = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
            "--max_iters", "40", "--eval_interval", "100000", "--eval_iters", "1", "--log_interval", "1",
            "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "shakespeare.txt"
        src.write_text(shakespeare_text()[:200_000])
        data_root = tmp / "data"
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            data.prepare_dataset("shakespeare_char", input=src, data_root=data_root)

        def median_step_ms(out_dir):
            rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
            times = sorted(r["ms_per_step"] for r in rows if "loss" in r and r["iter"] > 3)
            return times[len(times) // 2]

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # in-process: a 1-rank group
            fsdp2_train.main(tiny + ["--data_root", str(data_root), "--out_dir", str(tmp / "one")])
        one = median_step_ms(tmp / "one")
        row("fsdp2", "tiny 2L/32 B=8 CPU: 1 process (FSDP2 on 1 rank, 1 thread)", f"{one:.1f} ms/step")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "fsdp2_train.py"), *tiny, "--data_root", str(data_root),
                        "--out_dir", str(tmp / "two")], env=env, check=True, capture_output=True)
        two = median_step_ms(tmp / "two")
        row("fsdp2", "tiny 2L/32 B=8 CPU: torchrun 2 ranks gloo (1 thread each)", f"{two:.1f} ms/step")
        row("fsdp2", "tiny 2L/32 B=8 CPU: 2-rank step time / 1-process", f"{two / one:.2f}x")

        # the same step without any torch.distributed: what FSDP2's hooks and DTensors cost here
        model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=data.read_meta(data_root / "shakespeare_char")["vocab_size"],
                                      n_layer=2, n_head=2, n_embd=32))
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        bins = data.TokenBins(data_root / "shakespeare_char", "train")
        g = torch.Generator().manual_seed(0)

        def plain_step():
            x, y = bins.get_batch(8, 32, g)
            model(x, y)[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        plain = median_ms(plain_step, repeat=30, warmup=2)
        torch.set_num_threads(threads)
        row("fsdp2", "tiny 2L/32 B=8 CPU: plain GPT + AdamW step, no FSDP (1 thread)", f"{plain:.1f} ms/step")
        row("fsdp2", "tiny 2L/32 B=8 CPU: FSDP2 1-rank step / plain step", f"{one / plain:.2f}x")
