"""dpo: peak memory and step time of one DPO step, the reference model kept as a frozen copy or as
the policy with its LoRA adapters disabled (full finetune + copy for scale); each variant in a
fresh process (bench/children/dpo.py).

Run: python -m bench dpo [--quick]"""

from __future__ import annotations

import json

import torch

from .util import row, run_child


def bench_dpo(quick: bool):
    """One DPO step (policy forward + backward over chosen and rejected, reference forward,
    AdamW step) in a fresh process per variant. Memory: on CUDA torch.cuda.max_memory_allocated;
    on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up)
    minus its RSS just before the model is built, so torch's own footprint is left out (Linux)."""
    if quick:
        name, shape = "tiny (2L/2H/32, V=512, T=32, 2 pairs)", (2, 2, 32, 512, 32, 2, 2)
    elif torch.cuda.is_available():
        name, shape = "gpt2-124M (T=1024, 4 pairs)", (12, 12, 768, 50304, 1024, 4, 5)
    else:
        name, shape = "gpt2-124M (T=128, 2 pairs)", (12, 12, 768, 50304, 128, 2, 3)
    variants = {"full_copy": "full finetune, reference = frozen copy",
                "lora_copy": "LoRA r=8, reference = frozen copy",
                "lora_off": "LoRA r=8, reference = adapters disabled"}
    res = {}
    for variant, label in variants.items():
        # a fresh process per variant: memory one variant freed would be reused by the next
        # without showing in its RSS
        r = res[variant] = json.loads(run_child("dpo", variant, *shape))
        row("dpo", f"{name}, {label}", f"{r['peak'] / 2**20:,.0f} MiB peak, {r['ms']:.0f} ms/step")
    copy_, off = res["lora_copy"], res["lora_off"]
    row("dpo", f"peak memory: LoRA frozen copy / adapters off ({off['device']}, {off['dtype']})",
        f"{copy_['peak'] / max(off['peak'], 1):.2f}x")
    row("dpo", "  memory saved by adapters off (one copy of the weights would be)",
        f"{(copy_['peak'] - off['peak']) / 2**20:,.0f} MiB ({off['weights'] / 2**20:,.0f} MiB)")
    row("dpo", "step time: LoRA frozen copy / adapters off", f"{copy_['ms'] / off['ms']:.2f}x")
    row("dpo", "peak memory: full finetune + copy / LoRA adapters off", f"{res['full_copy']['peak'] / max(off['peak'], 1):.2f}x")
