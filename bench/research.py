"""research: distill.py's chunked knowledge-distillation loss against the naive one (both models'
full logits): peak memory and time of loss + backward, each run in a fresh process
(bench/children/kd.py).

Run: python -m bench research [--quick]"""

from __future__ import annotations

import json
import statistics

import torch

from .util import row, run_child


def bench_research(quick: bool) -> None:
    """distill.py: peak memory and time of the KD loss + backward, chunked (1024 rows at a time,
    teacher logits made per chunk under no_grad) against naive (both models' full (N, V)
    logits, F.kl_div), at GPT-2's vocabulary V = 50257, a GPT-2-small teacher (C_t = 768)
    and a half-width student (C_s = 384). N = 4096 rows (CPU) or 16384 (GPU: 16 x 1024).
    Medians of interleaved runs (naive, chunked, naive, ...), each in a fresh process."""
    cuda = torch.cuda.is_available()
    N, V, C_s, C_t, chunk = (512, 4096, 64, 128, 128) if quick else (16384 if cuda else 4096, 50257, 384, 768, 1024)
    repeats = 1 if quick else 3
    res = {"naive": [], "chunked": []}
    for _ in range(repeats):
        for mode in res:
            res[mode].append(json.loads(run_child("kd", mode, N, V, C_s, C_t, chunk)))
    dev = res["naive"][0]["device"]
    peak = {m: statistics.median(r["peak"] for r in rs) for m, rs in res.items()}
    ms = {m: statistics.median(r["ms"] for r in rs) for m, rs in res.items()}
    shape = f"N={N}, V={V}, C_s={C_s}, C_t={C_t}"
    logits_mib = N * V * 4 / 2**20
    for m in res:
        row("research", f"KD loss+backward {m} ({shape}, {dev})", f"{peak[m] / 2**20:,.0f} MiB peak, {ms[m]:,.0f} ms")
    row("research", "one (N, V) fp32 logits tensor for comparison", f"{logits_mib:,.0f} MiB")
    row("research", "KD peak memory chunked / naive", f"{peak['chunked'] / max(peak['naive'], 1):.2f}x")
    row("research", "KD time chunked / naive (backward recomputes each chunk)", f"{ms['chunked'] / ms['naive']:.2f}x")
