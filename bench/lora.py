"""lora: LoRA against a full finetune on one model: trainable parameters, gradient + AdamW state,
the file written (checkpoint vs adapter alone), step time and, on CUDA, peak memory.

Run: python -m bench lora [--quick]"""

from __future__ import annotations

import io

import torch

import common
import gpt
import lora
from common import median_ms

from .util import row


def bench_lora(quick: bool):
    device = common.pick_device("auto")
    dtype = common.pick_dtype(device, "auto")
    if quick:
        name, cfg, batch = "tiny (2L/2H/32, T=32, B=4)", gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32), 4
    elif device == "cpu":
        name, cfg, batch = "gpt2-124M (T=256, B=2)", gpt.GPTConfig(block_size=256), 2
    else:
        name, cfg, batch = "gpt2-124M (T=1024, B=8)", gpt.GPTConfig(block_size=1024), 8
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]

    results = {}
    for mode in ("full", "lora"):
        torch.manual_seed(0)
        model = gpt.GPT(cfg).to(device)
        if mode == "lora":
            lora.apply_lora(model, r=8, alpha=16)  # c_attn, c_proj, c_fc of every block
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with common.autocast(device, dtype):
                _, loss = model(x, targets=y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if "cuda" in device:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, repeat=3, warmup=1)
        peak = torch.cuda.max_memory_allocated() / 2**20 if "cuda" in device else None
        trainable = sum(p.numel() for p in params)
        buf = io.BytesIO()
        torch.save(lora.lora_state_dict(model, "bench") if mode == "lora" else model.state_dict(), buf)
        results[mode] = dict(ms=ms, peak=peak, trainable=trainable, file=buf.tell())

    full, ada = results["full"], results["lora"]
    row("lora", f"trainable params, {name}: full / LoRA r=8", f"{full['trainable']:,} / {ada['trainable']:,} "
        f"= {full['trainable'] / ada['trainable']:.0f}x")
    # grads + AdamW's two moments, fp32: 12 bytes per trainable parameter
    row("lora", "grad + AdamW state (fp32): full / LoRA", f"{12 * full['trainable'] / 2**20:,.1f} MiB / "
        f"{12 * ada['trainable'] / 2**20:,.2f} MiB")
    row("lora", "file written: checkpoint / adapter alone", f"{full['file'] / 2**20:,.1f} MiB / "
        f"{ada['file'] / 2**10:,.0f} KiB = {full['file'] / ada['file']:.0f}x")
    row("lora", f"train step ({device}, {str(dtype).replace('torch.', '')}): full / LoRA",
        f"{full['ms']:.1f} ms / {ada['ms']:.1f} ms = {full['ms'] / ada['ms']:.2f}x")
    if full["peak"] is not None:
        row("lora", "peak CUDA memory of a train step: full / LoRA",
            f"{full['peak']:,.0f} MiB / {ada['peak']:,.0f} MiB = {full['peak'] / ada['peak']:.2f}x")
