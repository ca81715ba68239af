"""Peak memory of lm_head + cross-entropy + backward, naive (the (N, V) logits exist) or chunked
(gpt.chunked_cross_entropy), as this process's peak-RSS growth in bytes. Used by `python -m bench loss`.

Run: python -m bench.children.loss naive|chunked N V C"""

import sys

import torch

import gpt
from bench.util import status_kib

mode, N, V, C = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
x = torch.randn(N, C, requires_grad=True)
w = torch.randn(V, C, requires_grad=True)
t = torch.randint(0, V, (N,))

# warm-up on 8 rows: torch.func's first use imports modules, which must not count as the loss's memory
small = x[:8].detach().requires_grad_(), w[:64].detach().requires_grad_()
gpt.chunked_cross_entropy(*small, t[:8] % 64, chunk_size=4).backward()
torch.nn.functional.cross_entropy(small[0] @ small[1].t(), t[:8] % 64).backward()
# reset this process's own high-water mark once the inputs exist (bench.util.status_kib says why)
open("/proc/self/clear_refs", "w").write("5")
before = status_kib("VmRSS")
if mode == "naive":
    loss = torch.nn.functional.cross_entropy(x @ w.t(), t)
else:
    loss = gpt.chunked_cross_entropy(x, w, t, chunk_size=1024)
loss.backward()
print((status_kib("VmHWM") - before) * 1024)
