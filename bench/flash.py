"""flash: flash_attention.py. CPU: peak memory of causal attention forward + backward, naive vs the
tiled reference (each in a fresh process, bench/children/flash_mem.py), and their time. GPU (part
of `python -m bench gpu`): TFLOP/s of the Triton kernels vs PyTorch's FlashAttention backend.

Run: python -m bench flash [--quick]"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import flash_attention as fa

from .util import row, run_child


def bench_flash(quick: bool):
    """CPU: peak memory of causal attention forward+backward, naive (the (T, T) scores and
    probabilities exist, and P is kept for backward) vs the tiled reference of
    flash_attention.py (tiles of 128 x 128 only), each in a fresh process (peak RSS growth,
    VmHWM reset after a warm-up); then, at the shorter length, the time of both (interleaved
    repeats in this process)."""
    B, H, D = 1, (2 if quick else 8), 64
    sizes, repeat = ((512,), 1) if quick else ((2048, 4096), 3)
    for T in sizes:
        peaks = {}
        for impl in ("naive", "tiled"):
            runs = [run_child("flash_mem", impl, B, H, T, D) for _ in range(1 if quick else 3)]
            peaks[impl] = statistics.median(int(r) for r in runs)
        scores = B * H * T * T * 4  # one fp32 (T, T) matrix per head
        row("flash", f"causal attention fwd+bwd peak memory, naive (B={B}, H={H}, T={T}, D={D})",
            f"{peaks['naive'] / 2**20:,.0f} MiB")
        row("flash", "  tiled reference (flash_attention_reference, tiles 128)", f"{peaks['tiled'] / 2**20:,.0f} MiB")
        row("flash", "  tiled / naive peak memory", f"{peaks['tiled'] / max(peaks['naive'], 1):.3f}x")
        row("flash", "  one (T, T) fp32 score matrix, which the tiled version never builds",
            f"{scores / 2**20:,.0f} MiB")

        if T != sizes[0]:  # the time at the shorter length says enough (the tiled loops are Python)
            continue
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D)
        times = {"naive": [], "tiled": []}
        for _ in range(repeat + 1):  # the first round warms up and is dropped
            for impl, attend in (("naive", fa.naive_attention), ("tiled", fa.flash_attention_reference)):
                t0 = time.perf_counter()
                torch.autograd.grad(attend(q, k, v, causal=True), (q, k, v), do)
                times[impl].append((time.perf_counter() - t0) * 1000)
        naive_ms, tiled_ms = (statistics.median(times[i][1:]) for i in ("naive", "tiled"))
        row("flash", f"  fwd+bwd time naive / tiled (CPU, {torch.get_num_threads()} threads)",
            f"{naive_ms:,.0f} / {tiled_ms:,.0f} ms = {naive_ms / tiled_ms:.2f}x")


def bench_flash_gpu(quick: bool):
    """GPU: causal forward and forward+backward TFLOP/s of the Triton kernels vs PyTorch's
    F.scaled_dot_product_attention restricted to its FlashAttention backend, bf16, 16k tokens
    per batch and model width 2048 (B = 16384 / T, H = 2048 / D), as in the FlashAttention-2
    paper. FLOPs: forward 4 B H T^2 D / 2 (causal), backward 2.5x the forward (five matmuls
    to two). Medians of interleaved repeats timed with CUDA events."""
    if not torch.cuda.is_available():
        row("flash", "GPU TFLOP/s vs SDPA", "skipped (no CUDA)")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def ms_of(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    tokens, width, repeat = (4096, 1024, 3) if quick else (16384, 2048, 10)
    lengths = (1024, 2048) if quick else (1024, 2048, 4096, 8192, 16384)
    for D in (64, 128):
        # correctness on the GPU first: both against fp32 math attention
        q, k, v = (torch.randn(2, 8, 1000, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        exact = fa.naive_attention(q.float(), k.float(), v.float(), causal=True)
        errs = [((attend(q, k, v, True).float() - exact).abs().max() / exact.abs().max()).item()
                for attend in (fa.flash_attention, sdpa)]
        row("flash", f"GPU bf16 D={D} T=1000 max error / max value: ours, SDPA", f"{errs[0]:.1e}, {errs[1]:.1e}")
        for T in lengths:
            B, H = max(1, tokens // T), width // D
            qkv = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
            do = torch.randn_like(qkv[0])
            fwd_flops = 4 * B * H * T * T * D / 2
            cases = {}
            for name, attend in (("ours", fa.flash_attention), ("sdpa", sdpa)):
                cases[name, "fwd"] = lambda attend=attend, qkv=qkv: attend(*qkv, True)
                cases[name, "fwd+bwd"] = lambda attend=attend, qkv=qkv, do=do: torch.autograd.grad(
                    attend(*qkv, True), qkv, do)
            for fn in cases.values():  # warm-up: compiles the kernels
                fn()
            times = {key: [] for key in cases}
            for _ in range(repeat):
                for key, fn in cases.items():
                    times[key].append(ms_of(fn))
            for what, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
                ours, theirs = (flops / (statistics.median(times[name, what]) / 1e3) / 1e12
                                for name in ("ours", "sdpa"))
                row("flash", f"GPU bf16 causal D={D} T={T} B={B} H={H} {what} TFLOP/s ours / SDPA",
                    f"{ours:.0f} / {theirs:.0f} = {ours / theirs:.2f}x")
