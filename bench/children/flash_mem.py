"""Peak memory of causal attention forward + backward on CPU, naive (the (T, T) scores and
probabilities exist) or tiled (flash_attention_reference), as this process's peak-RSS growth in
bytes. Used by `python -m bench flash`.

Run: python -m bench.children.flash_mem naive|tiled B H T D"""

import sys

import torch

import flash_attention as fa
from bench.util import status_kib

impl, B, H, T, D = sys.argv[1], *map(int, sys.argv[2:])

attend = fa.naive_attention if impl == "naive" else fa.flash_attention_reference
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
do = torch.randn(B, H, T, D)
small = [t[:, :, :256].detach().requires_grad_() for t in (q, k, v)]  # warm torch's pools and kernels first
attend(*small, causal=True).backward(do[:, :, :256])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (Linux >= 4.0)
before = status_kib("VmRSS")
attend(q, k, v, causal=True).backward(do)
print((status_kib("VmHWM") - before) * 1024)
