"""Peak memory and wall time of the knowledge-distillation loss + backward, naive (both models'
full (N, V) logits, distill.naive_kd_loss) or chunked (distill.kd_loss): peak-RSS growth (VmHWM
after /proc/self/clear_refs reset it, minus VmRSS with the inputs in place) on CPU, peak
allocated memory on CUDA. One measurement per fresh process, so one mode's freed memory never
serves the other's peak. Prints one JSON line. Used by `python -m bench research`.

Run: python -m bench.children.kd naive|chunked N V C_s C_t chunk"""

import json
import sys
import time

import torch

import distill
from bench.util import status_kib

mode, N, V, C_s, C_t, chunk = sys.argv[1], *map(int, sys.argv[2:7])
device = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=device).manual_seed(0)
x = torch.randn(N, C_s, device=device, generator=g, requires_grad=True)
w = (0.02 * torch.randn(V, C_s, device=device, generator=g)).requires_grad_(True)
h_t = torch.randn(N, C_t, device=device, generator=g)
w_t = 0.02 * torch.randn(V, C_t, device=device, generator=g)
y = torch.randint(0, V, (N,), device=device, generator=g)
y[::7] = -1  # some rows without a target, as after padding


def run(x, w, y, h_t, w_t):
    if mode == "naive":
        loss = distill.naive_kd_loss(x @ w.t(), y, h_t @ w_t.t(), tau=2.0, alpha=0.5)
    else:
        loss = distill.kd_loss(x, w, y, h_t, w_t, tau=2.0, alpha=0.5, chunk_size=chunk)
    loss.backward()


# warm-up on 4 rows and 64 tokens: imports (torch.func's first use), kernels; small enough that
# no allocator cache it leaves can serve the measured run
run(x[:4].detach().requires_grad_(True), w[:64].detach().requires_grad_(True), y[:4] % 64, h_t[:4], w_t[:64])
if device == "cuda":
    run(x, w, y, h_t, w_t)  # the CUDA allocator caches anyway: warm it fully
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    run(x, w, y, h_t, w_t)
    torch.cuda.synchronize()
    ms, peak = (time.perf_counter() - t0) * 1000, torch.cuda.max_memory_allocated() - base
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset this process's peak-RSS mark
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    run(x, w, y, h_t, w_t)
    ms, peak = (time.perf_counter() - t0) * 1000, (status_kib("VmHWM") - before) * 1024
print(json.dumps({"ms": ms, "peak": peak, "device": device}))
