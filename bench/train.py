"""train: train.py's step time and MFU, GPT-2 block vs Llama block on nanoGPT's CPU config, and
(with --nanogpt PATH) train.py side by side with a karpathy/nanoGPT checkout (bench/nanogpt.py).

Run: python -m bench train [--quick] [--nanogpt PATH]"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

import common
import gpt
import train
from common import median_ms

from .nanogpt import bench_nanogpt
from .util import NANOGPT_CPU_RUN, SEEDS, prepare_char_data, row, run_jobs, trainpy_job, trainpy_result


def cpu_peak_flops(n=1024, repeat=5):
    """What this CPU really reaches on an fp32 matmul: the peak used for MFU on CPU,
    where no datasheet figure applies."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / (median_ms(lambda: a @ b, repeat=repeat) / 1000)


def bench_train(quick: bool, nanogpt: str = ""):
    """train.py: the GPT-2 124M step and MFU; GPT-2 block vs Llama block on nanoGPT's CPU
    config; with --nanogpt PATH, side by side with that karpathy/nanoGPT checkout, eager and
    compiled."""
    bench_train_step(quick)
    bench_arch(quick)
    if nanogpt:
        bench_nanogpt(quick, nanogpt)
        bench_nanogpt(quick, nanogpt, compile=True)


def bench_train_step(quick: bool):
    device = common.pick_device("auto")
    dtype = common.pick_dtype(device, "auto")
    peak = common.device_peak_flops(device, dtype) or cpu_peak_flops(256 if quick else 1024)
    shapes = {"tiny (4L/4H/128, T=64, B=12)": (gpt.GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128), 12),
              "gpt2-124M (T=256, B=2)" if device == "cpu" else "gpt2-124M (T=1024, B=8)":
                  (gpt.GPTConfig(block_size=256 if device == "cpu" else 1024), 2 if device == "cpu" else 8)}
    if quick:
        shapes = {"tiny (2L/2H/32, T=32, B=4)": (gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32), 4)}
    for name, (cfg, batch) in shapes.items():
        model = gpt.GPT(cfg).to(device)
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)

        def step():
            with common.autocast(device, dtype):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = median_ms(step, repeat=3 if quick else 7)
        tokens = batch * cfg.block_size
        row("train", f"{name}: step", f"{ms:.1f} ms, {tokens / ms * 1000:,.0f} tok/s")
        row("train", f"{name}: MFU vs {peak / 1e12:.2f} TFLOP/s peak", f"{model.estimate_mfu(batch, ms / 1000, peak) * 100:.1f}%")


def bench_arch(quick: bool):
    """train.py --arch gpt2 vs --arch llama on nanoGPT's CPU config, interleaved seed by seed.
    Llama's SwiGLU gets round(8/3 * n_embd) hidden units: three matrices of that width hold
    about the parameters of GPT-2's two of 4 * n_embd (both counts printed)."""
    n_embd = 128
    archs = {"gpt2": [], "llama": ["--arch", "llama", "--mlp_hidden", str(round(8 * n_embd / 3))]}
    seeds, extra = (SEEDS[:1], ["--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1"]) if quick else (SEEDS, [])
    results = {a: {"val": [], "ms": []} for a in archs}
    with tempfile.TemporaryDirectory() as tmp:
        prepare_char_data(Path(tmp))
        runs = [(arch, seed) for seed in seeds for arch in archs]  # interleaved: drift hits both alike
        run_jobs([trainpy_job(archs[a] + extra + ["--seed", str(seed)], Path(tmp) / f"{a}{seed}", Path(tmp))
                  for a, seed in runs])
        for arch, seed in runs:
            val, ms = trainpy_result(Path(tmp) / f"{arch}{seed}")
            results[arch]["val"].append(val)
            results[arch]["ms"].append(ms)
    for arch, args in archs.items():
        cfg = train.model_config(train.parse_args(NANOGPT_CPU_RUN + args)[0], vocab_size=65)
        params = sum(p.numel() for p in gpt.GPT(cfg).parameters())
        r = results[arch]
        row("train", f"--arch {arch} ({params:,} params): final val loss, median of {len(seeds)} seeds",
            f"{statistics.median(r['val']):.4f} ({', '.join(f'{v:.4f}' for v in r['val'])})")
        row("train", f"--arch {arch}: ms/iter, median of the runs' medians",
            f"{statistics.median(r['ms']):.1f} ms ({', '.join(f'{v:.1f}' for v in r['ms'])})")
    ratio = statistics.median(results["llama"]["ms"]) / statistics.median(results["gpt2"]["ms"])
    row("train", "--arch llama / gpt2 ms/iter", f"{ratio:.2f}x")
