"""loss: peak memory of lm_head + cross-entropy + backward, naive (the (N, V) logits exist) vs
gpt.chunked_cross_entropy. On CUDA measured in this process; on CPU each mode runs in a fresh
process (bench/children/loss.py: peak-RSS growth), median of 3.

Run: python -m bench loss [--quick]"""

from __future__ import annotations

import statistics

import torch

import gpt

from .util import row, run_child


# Time, not printed here: the chunked loss recomputes the logits in backward, measured on CPU at
# 1.4x the plain head + loss time at V=50257 and 2.4x at V=65; on nanoGPT's CPU config (65
# characters) 1.09x its step time, 1.02x once gpt.py ran the plain loss below 2^24 logits.
def bench_loss(quick: bool):
    N, V, C = (64, 256, 32) if quick else (8192, 50304, 768)
    peaks = {}
    for mode in ("naive", "chunked"):
        if torch.cuda.is_available():
            x = torch.randn(N, C, device="cuda", requires_grad=True)
            w = torch.randn(V, C, device="cuda", requires_grad=True)
            t = torch.randint(0, V, (N,), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = torch.nn.functional.cross_entropy(x @ w.t(), t) if mode == "naive" else gpt.chunked_cross_entropy(x, w, t)
            loss.backward()
            peaks[mode] = torch.cuda.max_memory_allocated() - base
            del x, w, t, loss
        else:  # a fresh process per mode and run: peak RSS growth during loss + backward, median of 3
            runs = [run_child("loss", mode, N, V, C) for _ in range(1 if quick else 3)]
            peaks[mode] = statistics.median(int(out) for out in runs)
        row("loss", f"{mode} lm_head+CE+backward peak memory (N={N}, V={V}, C={C})", f"{peaks[mode] / 2**20:,.0f} MiB")
    row("loss", "chunked / naive peak memory (goal <= 0.50x)", f"{peaks['chunked'] / max(peaks['naive'], 1):.2f}x")
