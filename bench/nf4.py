"""nf4: qlora_nf4.py's NF4 quantize and dequantize, the PyTorch reference on CPU; on CUDA the
Triton kernel against the reference and bitsandbytes (bandwidth vs the device's peak); and NF4 vs
bf16 bytes of GPT-2-124M's Linear weights.

Run: python -m bench nf4 [--quick]"""

from __future__ import annotations

import torch
import torch.nn as nn

import qlora_nf4
from common import median_ms

from .util import row

# HBM peaks from NVIDIA's datasheets (bytes/s), used when Triton cannot report the clock
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def _peak_bandwidth(device) -> float | None:
    try:  # memory clock (kHz) x bus width (bits), double data rate, as in Triton's tutorials
        props = qlora_nf4.triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        return 2 * props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] / 8
    except Exception:
        name = torch.cuda.get_device_name(device)
        return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def bench_nf4(quick: bool) -> None:
    S = "nf4"
    n = 256 if quick else 4096
    repeat = 3 if quick else 10
    w = torch.randn(n, n) * 0.02
    out_bytes = n * n * 2  # a bf16 weight

    # --- CPU: the plain PyTorch reference
    packed, state = qlora_nf4.quantize_nf4(w)
    ms = median_ms(lambda: qlora_nf4.quantize_nf4(w), repeat=repeat)
    q_bytes = packed.numel() + state.nbytes()
    row(S, f"quantize {n}x{n} fp32, PyTorch (cpu)", f"{ms:.1f} ms, {q_bytes / ms / 1e6:.3g} GB/s of output")
    ms = median_ms(lambda: qlora_nf4.dequantize_nf4(packed, state, torch.bfloat16), repeat=repeat)
    row(S, f"dequantize {n}x{n} -> bf16, PyTorch (cpu)", f"{ms:.1f} ms, {out_bytes / ms / 1e6:.3g} GB/s of output")

    # --- CUDA: own Triton kernel vs the PyTorch reference vs bitsandbytes
    if torch.cuda.is_available() and qlora_nf4.triton is not None:
        dev = "cuda"
        wc = (torch.randn(4096, 4096, device=dev) * 0.02).to(torch.bfloat16)
        packed, state = qlora_nf4.quantize_nf4(wc)
        mismatches = (qlora_nf4.dequantize_nf4_triton(packed, state) != qlora_nf4.dequantize_nf4(packed, state)).sum()
        row(S, "Triton == PyTorch reference, bf16 (cuda)",
            "bit-exact" if mismatches == 0 else f"{mismatches} values differ")
        moved = packed.numel() + state.nbytes() + wc.numel() * 2  # read packed + stats, write bf16
        rep = 20 if quick else 200
        t_triton = median_ms(lambda: qlora_nf4.dequantize_nf4_triton(packed, state, torch.bfloat16), repeat=rep)
        t_ref = median_ms(lambda: qlora_nf4.dequantize_nf4(packed, state, torch.bfloat16), repeat=rep)
        gbs = moved / t_triton / 1e6
        row(S, "dequantize 4096x4096 -> bf16, Triton (cuda)", f"{t_triton * 1e3:.1f} us, {gbs:.0f} GB/s moved")
        row(S, "dequantize 4096x4096 -> bf16, PyTorch ref (cuda)", f"{t_ref * 1e3:.1f} us")
        row(S, "Triton vs PyTorch reference (cuda)", f"{t_ref / t_triton:.2f}x")
        peak = _peak_bandwidth(dev)
        if peak:
            row(S, "Triton effective bandwidth vs device peak",
                f"{gbs:.0f} / {peak / 1e9:.0f} GB/s = {gbs * 1e9 / peak:.0%}")
        try:
            from bitsandbytes import functional as bnbF
        except ImportError:
            bnbF = None
        if bnbF is not None:
            bnb_packed, bnb_state = bnbF.quantize_4bit(wc, blocksize=64, quant_type="nf4", compress_statistics=True)
            t_bnb = median_ms(lambda: bnbF.dequantize_4bit(bnb_packed, bnb_state), repeat=rep)
            row(S, "dequantize 4096x4096 -> bf16, bitsandbytes (cuda)", f"{t_bnb * 1e3:.1f} us")
            row(S, "Triton vs bitsandbytes dequantize_4bit (goal >= 1.15x)", f"{t_bnb / t_triton:.2f}x")

    # --- memory: NF4 vs bf16 for the Linear weights of a GPT-2-124M-shaped model
    # (12 layers of c_attn 768->2304, c_proj 768->768, c_fc 768->3072, c_proj 3072->768;
    # the tied embedding / lm_head stays in bf16 and is left out of both sides)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    nf4 = sum(qlora_nf4.nf4_bytes(nn.ModuleList([qlora_nf4.Linear4bit(torch.randn(s) * 0.02)])) for s in shapes)
    bf16 = sum(2 * a * b for a, b in shapes)
    row(S, "GPT-2-124M Linear weights: NF4 / bf16 (incl. absmax, scales)",
        f"{12 * nf4 / 2**20:.1f} / {12 * bf16 / 2**20:.1f} MiB = {nf4 / bf16:.3f}x")
