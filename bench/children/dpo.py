"""Peak memory and time of one DPO step (policy forward + backward over chosen and rejected,
reference forward, AdamW step) for one way of keeping the reference model: full_copy (full
finetune, a frozen copy), lora_copy (LoRA, a frozen copy) or lora_off (LoRA, the adapters
disabled). Prints one JSON line. Used by `python -m bench dpo`.

Run: python -m bench.children.dpo full_copy|lora_copy|lora_off n_layer n_head n_embd vocab T B repeat"""

import copy
import json
import sys

import torch

import common
import dpo
import gpt
import lora
from bench.util import status_kib

variant, (n_layer, n_head, n_embd, vocab, T, B, repeat) = sys.argv[1], map(int, sys.argv[2:])
device = common.pick_device("auto")
dtype = common.pick_dtype(device, "auto")
ctx = common.autocast(device, dtype)

# Warm torch's lazy runtime (thread pools, allocator caches) on a throwaway model first:
# only what a variant itself adds is counted.
warm = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8)).to(device)
warm(torch.zeros(1, 8, dtype=torch.long, device=device))[0].sum().backward()
torch.optim.AdamW(warm.parameters()).step()
del warm
torch.manual_seed(0)
if "cuda" in device:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (Linux >= 4.0)
    before = status_kib("VmRSS") * 1024
model = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)).to(device)
dpo.disable_dropout(model)
weights = sum(p.numel() * p.element_size() for p in model.parameters())  # what a copy costs
ref = None if variant == "lora_off" else copy.deepcopy(model).eval().requires_grad_(False)
if variant != "full_copy":
    lora.apply_lora(model, r=8, alpha=16)  # c_attn, c_proj, c_fc of every block
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)
# B pairs: 2B sequences of T tokens, the second half of each is the completion
idx = torch.randint(0, vocab, (2 * B, T + 1), device=device)
mask = torch.zeros(2 * B, T, dtype=torch.bool, device=device)
mask[:, T // 2:] = True
batch = (idx[:, :-1], idx[:, 1:], mask)


def step():
    c, r = dpo.concatenated_logps(model, batch, False, ctx)
    rc, rr = dpo.reference_logps(model, ref, batch, False, ctx)
    losses, _, _ = dpo.dpo_loss(c, r, rc, rr)
    losses.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


ms = common.median_ms(step, repeat=repeat, warmup=1)
peak = torch.cuda.max_memory_allocated() if "cuda" in device else status_kib("VmHWM") * 1024
print(json.dumps({"variant": variant, "ms": ms, "peak": peak - before, "weights": weights, "device": device,
                  "dtype": str(dtype).replace("torch.", "")}), flush=True)
