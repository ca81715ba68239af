"""Benchmarks: the figures each idea promises, measured, with ratios against baselines.

Every figure is a median of repeated runs (the machine is noisy). Ratios are printed as
`1.83x` and always say what is divided by what.

Run: python bench.py                 # every section
     python bench.py train loss      # only these sections
     python bench.py --quick         # tiny sizes: a smoke test of the benchmark code itself
     python bench.py gpu             # the CUDA check on a GPU machine (exits non-zero on a failure)
     python bench.py gpu --dry-run   # the same code paths on CPU, as the test suite runs it
`python bench.py --help` lists the sections.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT / "assets"  # the shipped offline copies (Tiny Shakespeare, GPT-2's BPE files)
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from common import NanoError, cli, median_ms  # noqa: E402  (bench's child scripts import median_ms from here too)


def row(section: str, what: str, figure: str):
    print(f"{section:<10} {what:<62} {figure}", flush=True)


def status_kib(key: str) -> int:
    """This process's VmRSS (resident now) or VmHWM (peak since the last reset, which writing "5"
    to /proc/self/clear_refs does) in KiB. getrusage's ru_maxrss would include the parent's size
    at fork time (Linux keeps it across exec): children measure their own peak with this instead."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))


def shakespeare_text() -> str:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        import common
        import data

        path = common.download(data.SHAKESPEARE_URL, ROOT / "data" / "tinyshakespeare.txt")
    return path.read_text()


def cpu_peak_flops(n=1024, repeat=5):
    """What this CPU really reaches on an fp32 matmul: the peak used for MFU on CPU,
    where no datasheet figure applies."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / (median_ms(lambda: a @ b, repeat=repeat) / 1000)


# ----------------------------------------------------------------------------------------
# train: step throughput and MFU


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
    import common
    import gpt

    device = common.pick_device("auto")
    dtype = common.pick_dtype(device, "auto")
    peak = common.device_peak_flops(device, dtype) or cpu_peak_flops()
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


NANOGPT_CPU_RUN = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--batch_size", "12",
                   "--max_iters", "2000", "--lr_decay_iters", "2000", "--learning_rate", "1e-3", "--dropout", "0.0",
                   "--eval_iters", "20", "--log_interval", "1", "--device", "cpu", "--compile", "False"]


SEEDS = (1337, 1, 2)  # one run's final val loss moves by ~+-0.01 with the seed (20 eval batches)
EVAL_INTERVAL = 250  # nanoGPT's config/train_shakespeare_char.py and train.py's default

# nanoGPT's own command line for its CPU run (its README's "on a macbook" line, sized to
# train.py's defaults); --seed is ours: bench patches the scratch copy to read it.
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def median_excluding_evals(ms_by_iter: dict) -> float:
    """Median step time over the iterations whose timing holds no evaluation (nor the first
    step's warm-up). ms_by_iter: {step index counted from 0: ms}."""
    return statistics.median(ms for it, ms in ms_by_iter.items() if it % EVAL_INTERVAL != 0)


def run_jobs(jobs: list) -> list:
    """Run [(argv, cwd)] as subprocesses one after another, in the given (interleaved) order,
    and return each one's stdout: runs started together drift apart on a busy machine, so only
    alternating sides compare fairly. Output goes to files, not pipes: a run that logs every
    iter fills a 64 KiB pipe and stops until someone reads it."""
    outputs = []
    with tempfile.TemporaryDirectory() as logs:
        for i, (argv, cwd) in enumerate(jobs):
            with open(f"{logs}/{i}.out", "w+") as out, open(f"{logs}/{i}.err", "w+") as err:
                returncode = subprocess.run(argv, cwd=cwd, stdout=out, stderr=err, text=True).returncode
                out.seek(0), err.seek(0)
                outputs.append(out.read())
                if returncode:
                    raise NanoError(f"{' '.join(map(str, argv[:2]))} failed: {err.read().strip().splitlines()[-1:]} "
                                    f"(run it alone in {cwd} to see why)")
    return outputs


def trainpy_job(args: list, out_dir: Path, data_root: Path):
    """train.py in its own process, as a user runs it: (argv, cwd)."""
    return [sys.executable, str(ROOT / "train.py"), *NANOGPT_CPU_RUN, "--input", str(SHARED_DATA / "tinyshakespeare.txt"),
            "--data_root", str(data_root), "--out_dir", str(out_dir), "--sample_tokens", "0", *args], ROOT


def trainpy_result(out_dir: Path) -> tuple[float, float]:
    """(final val loss, median ms/iter) from a train.py run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    # a metrics row "iter k" times step k - 1 (the iteration that began at iter_num = k - 1)
    ms = {r["iter"] - 1: r["ms_per_step"] for r in rows if "ms_per_step" in r}
    return [r["val_loss"] for r in rows if "val_loss" in r][-1], median_excluding_evals(ms)


def prepare_char_data(data_root: Path):
    """shakespeare_char, made once before runs start together (they would race to make it)."""
    import data

    data.prepare_dataset("shakespeare_char", SHARED_DATA / "tinyshakespeare.txt", data_root=data_root)


# ----------------------------------------------------------------------------------------
# GPT-2 block vs Llama block


def bench_arch(quick: bool):
    """train.py --arch gpt2 vs --arch llama on nanoGPT's CPU config, interleaved seed by seed.
    Llama's SwiGLU gets round(8/3 * n_embd) hidden units: three matrices of that width hold
    about the parameters of GPT-2's two of 4 * n_embd (both counts printed)."""
    import gpt
    import train

    n_embd = 128
    archs = {"gpt2": [], "llama": ["--arch", "llama", "--mlp_hidden", str(round(8 * n_embd / 3))]}
    seeds, extra = (SEEDS[:1], ["--max_iters", "20", "--eval_interval", "10"]) if quick else (SEEDS, [])
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


# ----------------------------------------------------------------------------------------
# train.py vs karpathy/nanoGPT


def prepare_nanogpt(checkout: Path, scratch: Path) -> Path:
    """A scratch copy of the user's nanoGPT checkout, patched to take --seed (it hard-codes
    1337), with data/shakespeare_char made as its prepare.py makes it (first 90% train, last
    10% val, the sorted characters as the vocabulary) from the shipped Tiny Shakespeare."""
    if not (checkout / "train.py").is_file() or not (checkout / "config" / "train_shakespeare_char.py").is_file():
        raise NanoError(f"--nanogpt {checkout} is not a nanoGPT checkout (no train.py and config/ there; "
                        "git clone https://github.com/karpathy/nanoGPT)")
    copy = scratch / "nanogpt"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*", "*.bin"))
    source = (copy / "train.py").read_text()
    seeded = "torch.manual_seed(1337 + seed_offset)"
    if source.count(seeded) != 1 or source.count("\nconfig_keys = [") != 1:
        raise NanoError(f"{checkout}/train.py is not nanoGPT's as bench knows it (no `{seeded}`; "
                        "use a checkout of karpathy/nanoGPT's master)")
    source = source.replace(seeded, "torch.manual_seed(seed + seed_offset)")
    source = source.replace("\nconfig_keys = [", "\nseed = 1337  # bench.py: the seed as an option\nconfig_keys = [")
    (copy / "train.py").write_text(source)

    import numpy as np

    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    folder = copy / "data" / "shakespeare_char"
    folder.mkdir(parents=True, exist_ok=True)
    n = int(len(text) * 0.9)
    for split, part in (("train", text[:n]), ("val", text[n:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(folder / f"{split}.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return copy


def nanogpt_result(stdout: str) -> tuple[float, float]:
    """(final val loss, median ms/iter) from nanoGPT's log. "iter 12: loss 2.9, time 31.20ms"
    times step 12 (nanoGPT evaluates at the top of a step, so an eval iteration's step holds
    the eval); "step 2000: train loss ..., val loss 1.88" is an evaluation."""
    ms = {int(m[1]): float(m[2]) for m in re.finditer(r"^iter (\d+): loss \S+, time ([\d.]+)ms", stdout, re.M)}
    vals = re.findall(r"^step \d+: train loss \S+, val loss ([\d.]+)", stdout, re.M)
    return float(vals[-1]), median_excluding_evals(ms)


NANOGPT_CPU_SHAPE = dict(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)


def char_ids(bin_path: Path) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.fromfile(bin_path, dtype=np.uint16).astype(np.int64))


def full_val_loss(state_dict: dict, val_bin: Path, gelu: str = "exact") -> float:
    """Mean loss of nanoGPT-CPU-shaped weights (either side's: the module names are the same)
    over every non-overlapping 64-character window of the val split: 111,540 scored positions,
    where the logged figure scores 20 random batches (15,360) and moves by ~+-0.01 with them."""
    import gpt

    model = gpt.GPT(gpt.GPTConfig(**NANOGPT_CPU_SHAPE, gelu=gelu))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})
    ids = char_ids(val_bin)
    n = (len(ids) - 1) // 64 * 64
    x, y = ids[:n].view(-1, 64), ids[1:n + 1].view(-1, 64)  # (windows, 64)
    with torch.no_grad():
        return model.eval()(x, y)[1].item()


def same_batches_as_nanogpt(checkout: Path, data_root: Path, steps: int) -> dict:
    """Where a final val loss gap can come from: gpt.py's model and optimizer against nanoGPT's
    model.py, started from the same weights and fed the same batches, the same LR schedule and
    clipping. Returns the largest |loss difference| over the steps, with the exact GELU (train.py's
    default, nanoGPT's: then only float rounding differs) and with GPT-2's tanh GELU, the final
    models' whole-val-split losses, and both steps profiled op by op (exact GELU)."""
    import contextlib
    import copy
    import importlib.util
    import io

    import common
    import gpt

    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    ng = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ng)
    torch.manual_seed(1337)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = ng.GPT(ng.GPTConfig(**NANOGPT_CPU_SHAPE))
    train_ids = char_ids(data_root / "shakespeare_char" / "train.bin")

    def step(model, opt):  # one AdamW step on (x, y); the loss
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    out = {}
    for gelu in ("tanh", "exact"):  # exact last: the models the profile below runs
        ref = copy.deepcopy(theirs)
        ours = gpt.GPT(gpt.GPTConfig(**NANOGPT_CPU_SHAPE, gelu=gelu))
        ours.load_state_dict(ref.state_dict())
        with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter groups
            opts = [m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu") for m in (ours, ref)]
        batches = torch.Generator().manual_seed(0)
        worst = 0.0
        for it in range(steps):
            starts = torch.randint(len(train_ids) - 65, (12,), generator=batches)
            rows = torch.stack([train_ids[i:i + 65] for i in starts.tolist()])  # (12, 65)
            x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # nanoGPT's model views them
            losses = []
            for model, opt in zip((ours, ref), opts):
                for group in opt.param_groups:
                    group["lr"] = common.cosine_lr(it, 1e-3, 1e-4, 100, steps)
                losses.append(step(model, opt))
            worst = max(worst, abs(losses[0] - losses[1]))
        val_bin = data_root / "shakespeare_char" / "val.bin"
        out[gelu] = (worst, full_val_loss(ours.state_dict(), val_bin, gelu), full_val_loss(ref.state_dict(), val_bin))
    # where a step's time goes: 50 more steps of each, profiled in alternating rounds of 10 (the
    # machine's speed drifts), self CPU time per op and step
    per_op = [{}, {}]
    for _ in range(5):
        for side, (model, opt) in enumerate(zip((ours, ref), opts)):
            with torch.profiler.profile() as prof:
                for _ in range(10):
                    step(model, opt)
            for e in prof.key_averages():
                per_op[side][e.key] = per_op[side].get(e.key, 0.0) + e.self_cpu_time_total / 50 / 1e3
    top = sorted(set(per_op[0]) | set(per_op[1]), key=lambda k: -max(per_op[0].get(k, 0), per_op[1].get(k, 0)))
    out["profile"] = [(op, per_op[0].get(op, 0.0), per_op[1].get(op, 0.0)) for op in top[:10]]
    out["profile total"] = [sum(d.values()) for d in per_op]
    return out


def bench_nanogpt(quick: bool, nanogpt: str, compile: bool = False, seeds=SEEDS):
    """train.py vs nanoGPT, alternately, the same seeds, both on nanoGPT's config (bias False,
    its default): ms/iter (goal <= 0.9x) and final val loss (goal: train.py's mean <= nanoGPT's
    + 0.005), as each logs it and, with the noise of 20 random eval batches taken out, of both
    final models scored by one function on the whole val split."""
    extra = {"max_iters": 20, "eval_interval": 10, "lr_decay_iters": 20} if quick else {}
    seeds = seeds[:1] if quick else seeds
    what = "compiled" if compile else "eager"
    res = {"train.py": {"val": [], "ms": [], "full": []}, "nanoGPT": {"val": [], "ms": [], "full": []}}
    with tempfile.TemporaryDirectory() as tmp:
        copy = prepare_nanogpt(Path(nanogpt).expanduser().resolve(), Path(tmp))
        prepare_char_data(Path(tmp))
        runs = [(side, seed) for seed in seeds for side in res]  # alternately: drift hits both alike
        jobs = []
        for side, seed in runs:  # both save the model after the last step (always_save_checkpoint)
            if side == "nanoGPT":
                jobs.append(([sys.executable, "train.py", *NANOGPT_ARGS, *(f"--{k}={v}" for k, v in extra.items()),
                              f"--seed={seed}", f"--compile={compile}", f"--out_dir={tmp}/ng{seed}",
                              "--always_save_checkpoint=True"], copy))
            else:
                args = [a for k, v in extra.items() for a in (f"--{k}", str(v))]
                jobs.append(trainpy_job(args + ["--seed", str(seed), "--compile", str(compile), "--bias", "False",
                                               "--always_save_checkpoint", "True"], Path(tmp) / f"ours{seed}", Path(tmp)))
        outputs = run_jobs(jobs)
        val_bins = {"train.py": Path(tmp) / "shakespeare_char" / "val.bin",
                    "nanoGPT": copy / "data" / "shakespeare_char" / "val.bin"}
        if val_bins["train.py"].read_bytes() != val_bins["nanoGPT"].read_bytes():
            raise NanoError("train.py's and nanoGPT's val splits differ: the comparison would not be fair")
        for (side, seed), out in zip(runs, outputs):
            val, ms = nanogpt_result(out) if side == "nanoGPT" else trainpy_result(Path(tmp) / f"ours{seed}")
            ckpt = Path(tmp) / (f"ng{seed}" if side == "nanoGPT" else f"ours{seed}") / "ckpt.pt"
            saved = torch.load(ckpt, map_location="cpu", weights_only=side == "train.py")
            gelu = saved["config"].get("gelu", "tanh") if side == "train.py" else "exact"  # nanoGPT's is exact
            res[side]["val"].append(val)
            res[side]["ms"].append(ms)
            res[side]["full"].append(full_val_loss(saved["model"], val_bins[side], gelu))
        same = None if compile else same_batches_as_nanogpt(copy, Path(tmp), 20 if quick else 200)
    for side, r in res.items():
        row("train", f"{side} {what}, nanoGPT CPU config: final val loss as logged, seeds {'/'.join(map(str, seeds))}",
            f"mean {statistics.mean(r['val']):.4f} ({', '.join(f'{v:.4f}' for v in r['val'])})")
        row("train", f"{side} {what}: final model on the whole val split, per seed",
            f"mean {statistics.mean(r['full']):.4f} ({', '.join(f'{v:.4f}' for v in r['full'])})")
        row("train", f"{side} {what}: ms/iter, median over iters (no eval iters), per seed",
            f"{statistics.median(r['ms']):.1f} ms ({', '.join(f'{v:.1f}' for v in r['ms'])})")
    ours, theirs = res["train.py"], res["nanoGPT"]
    row("train", f"train.py / nanoGPT ms/iter, {what} (goal <= 0.9x)",
        f"{statistics.median(ours['ms']) / statistics.median(theirs['ms']):.2f}x "
        f"(per seed {', '.join(f'{a / b:.2f}' for a, b in zip(ours['ms'], theirs['ms']))})")
    for key, how in (("val", "as logged"), ("full", "whole val split")):
        row("train", f"train.py - nanoGPT mean final val loss, {how}, {what} (goal <= +0.005)",
            f"{statistics.mean(ours[key]) - statistics.mean(theirs[key]):+.4f}")
    if same:
        for gelu in ("exact", "tanh"):
            worst, val_ours, val_theirs = same[gelu]
            row("train", f"gpt.py ({gelu} GELU) vs nanoGPT's model.py, same weights and batches: max |loss diff|, "
                "val diff", f"{worst:.1e}, {val_ours - val_theirs:+.1e}")
        ours_ms, theirs_ms = same["profile total"]
        row("train", "profiled step (model, backward, clip, AdamW), self CPU ms per step: gpt.py / nanoGPT",
            f"{ours_ms:.1f} / {theirs_ms:.1f}")
        for op, ours_op, theirs_op in same["profile"]:
            row("train", f"  {op}", f"{ours_op:.2f} / {theirs_op:.2f} ms")


# ----------------------------------------------------------------------------------------
# bpb: bits per byte of one model shape under four tokenizers


# nanoGPT's CPU run with a quarter of its 2000 iterations (set per run below): the GPT-2-vocabulary
# run, whose 50k-row head costs ~7x the rest of the model, took 1457 s of the section's ~32 min
# (2-6.5 s a step on 2 shared cores at load 8-18); the other three runs 1.5-3 min each.
BPB_RUN = NANOGPT_CPU_RUN + ["--log_interval", "50", "--sample_tokens", "0", "--preset", "none", "--seed", "1337"]
BPB_ITERS = 500
BPB_EVAL_ITERS = 40  # 40 x 12 x 64 = 30,720 scored val positions (20, the default, is noisier)


def bench_bpb(quick: bool) -> None:
    """Bits per UTF-8 byte of held-out Tiny Shakespeare (its last 10%, data.py's split) for one
    model shape trained with four tokenizers: characters, GPT-2's BPE, and bpe.py's BPE trained
    by train.py --train_tokenizer on the train split only (the first 90%) at vocab 512 and 4096. Same n_layer, n_head,
    n_embd, block_size, batch_size, iterations, LR schedule and seed for all, through train.py's
    CLI; val_bpb is train.py's eval figure (val loss in bits x val tokens / val bytes).
    What is equal is the transformer body and the number of token positions per step; what is
    not: the tied embedding/head grows with the vocabulary (FLOPs per token printed), and a BPE
    token spans more bytes, so the same steps read more text (bytes seen printed)."""
    import contextlib
    import io
    import json
    import tempfile

    import data
    import gpt
    import train

    src = SHARED_DATA / "tinyshakespeare.txt"
    iters, eval_iters, sizes = (20, 4, (300,)) if quick else (BPB_ITERS, BPB_EVAL_ITERS, (512, 4096))
    arg = dict(zip(BPB_RUN[::2], BPB_RUN[1::2]))
    n_layer, n_embd, T, B = (int(arg[k]) for k in ("--n_layer", "--n_embd", "--block_size", "--batch_size"))
    row("bpb", f"Tiny Shakespeare val bits/byte: {n_layer}L/{n_embd}, T={T}, B={B}, {iters} iters, CPU",
        "val_bpb | bytes/token | GFLOP/step | MB of text seen | wall")
    with tempfile.TemporaryDirectory() as tmp:
        # characters: the text's own alphabet (shakespeare_char); else the text with that tokenizer
        tokenizers = {"char (vocab 65)": ["--dataset", "shakespeare_char", "--input", str(src)]}
        for size in sizes:  # own BPE (its training time counts in the wall time)
            tokenizers[f"own BPE (vocab {size})"] = ["--dataset", f"text:{src}", "--train_tokenizer", str(size)]
        # last: the slowest run (its head is 50257 x n_embd)
        tokenizers["GPT-2 BPE (vocab 50257)"] = ["--dataset", f"text:{src}", "--tokenizer", "gpt2"]
        # one thread: this model is too small for two to help, and on a shared machine two threads
        # spin against the other jobs (measured at load ~7.5 on 2 cores: 157 vs 985 ms per char-model step)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, (name, dataset_args) in enumerate(tokenizers.items()):
                root = Path(tmp) / f"run{i}"
                argv = BPB_RUN + dataset_args + ["--data_root", str(root), "--out_dir", str(root / "out"),
                                                 "--max_iters", str(iters), "--lr_decay_iters", str(iters),
                                                 "--eval_interval", str(iters), "--eval_iters", str(eval_iters)]
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    train.main(argv)
                wall = time.perf_counter() - t0
                meta = data.read_meta(next(root.glob("*/meta.json")).parent)
                evals = [json.loads(line) for line in open(root / "out" / "metrics.jsonl")]
                bpb = [r["val_bpb"] for r in evals if "val_bpb" in r][-1]
                model = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=meta["vocab_size"], n_layer=n_layer,
                                              n_head=int(arg["--n_head"]), n_embd=n_embd))
                gflop = model.flops_per_token() * B * T / 1e9
                bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
                mb_seen = iters * B * T * meta["train_bytes"] / meta["train_tokens"] / 1e6
                row("bpb", f"  {name}", f"{bpb:.3f} | {bytes_per_token:.2f} | {gflop:.2f} | {mb_seen:.1f} | {wall:.0f} s")
        finally:
            torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# loss: peak memory of naive vs chunked lm_head + cross-entropy


_LOSS_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
import gpt
from bench import status_kib
mode, N, V, C = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
x = torch.randn(N, C, requires_grad=True)
w = torch.randn(V, C, requires_grad=True)
t = torch.randint(0, V, (N,))


# warm-up on 8 rows: torch.func's first use imports modules, which must not count as the loss's memory
small = x[:8].detach().requires_grad_(), w[:64].detach().requires_grad_()
gpt.chunked_cross_entropy(*small, t[:8] % 64, chunk_size=4).backward()
torch.nn.functional.cross_entropy(small[0] @ small[1].t(), t[:8] % 64).backward()
# reset this process's own high-water mark once the inputs exist (bench.status_kib says why)
open("/proc/self/clear_refs", "w").write("5")
before = status_kib("VmRSS")
if mode == "naive":
    loss = torch.nn.functional.cross_entropy(x @ w.t(), t)
else:
    loss = gpt.chunked_cross_entropy(x, w, t, chunk_size=1024)
loss.backward()
print((status_kib("VmHWM") - before) * 1024)
"""


def bench_loss(quick: bool):
    N, V, C = (1024, 4096, 128) if quick else (8192, 50304, 768)
    peaks = {}
    for mode in ("naive", "chunked"):
        if torch.cuda.is_available():
            import gpt

            x = torch.randn(N, C, device="cuda", requires_grad=True)
            w = torch.randn(V, C, device="cuda", requires_grad=True)
            t = torch.randint(0, V, (N,), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = torch.nn.functional.cross_entropy(x @ w.t(), t) if mode == "naive" else gpt.chunked_cross_entropy(x, w, t)
            loss.backward()
            peaks[mode] = torch.cuda.max_memory_allocated() - base
            del x, w, t, loss
        else:  # a fresh process per mode and run: peak RSS growth during loss + backward, median of 3
            runs = [subprocess.run([sys.executable, "-c", _LOSS_CHILD.format(root=str(ROOT)), mode, str(N), str(V), str(C)],
                                   capture_output=True, text=True, check=True) for _ in range(1 if quick else 3)]
            peaks[mode] = statistics.median(int(out.stdout.strip()) for out in runs)
        row("loss", f"{mode} lm_head+CE+backward peak memory (N={N}, V={V}, C={C})", f"{peaks[mode] / 2**20:,.0f} MiB")
    row("loss", "chunked / naive peak memory (goal <= 0.50x)", f"{peaks['chunked'] / max(peaks['naive'], 1):.2f}x")


# ----------------------------------------------------------------------------------------
# sample


def bench_sample(quick: bool) -> None:
    """sample.py: KV-cached decode vs recomputing the window, and vs Hugging Face's generate.

    GPT-2-124M-shaped model with random weights (quick: a tiny one), 32-token prompts,
    greedy. The uncached decode time is integrated from the measured cost of one uncached
    step at a few window lengths (the per-step cost grows ~linearly with the window), since
    running all 256 uncached steps of a 124M model would take minutes on a CPU."""
    import gpt
    import sample

    torch.manual_seed(0)
    config, name = gpt2_shape(quick)
    prompt_len, new_tokens, batches = (8, 16, (1, 2)) if quick else (32, 256, (1, 8))
    model = gpt.GPT(config).eval()

    def timed_generate(prompt, n=new_tokens):
        """(prefill_s, decode_s, tokens) of one cached greedy generation."""
        t0 = time.perf_counter()
        out, t_first = [], None
        for tok in sample.generate(model, prompt, n, temperature=0):
            out.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
        return t_first - t0, time.perf_counter() - t_first, torch.stack(out, 1)

    for batch in batches:
        prompt = torch.randint(0, config.vocab_size, (batch, prompt_len))
        timed_generate(prompt, n=4)  # warm-up (allocator, threads, the batch-1 head copy)
        runs = [timed_generate(prompt) for _ in range(1 if not quick else 2)]
        prefill_s = sorted(r[0] for r in runs)[len(runs) // 2]
        decode_s = sorted(r[1] for r in runs)[len(runs) // 2]
        steps = new_tokens - 1  # the first token comes from the prefill
        cached_tps = batch * steps / decode_s
        row("sample", f"{name} B={batch} prefill {prompt_len} tok (cached)", f"{batch * prompt_len / prefill_s:.0f} tok/s")
        row("sample", f"{name} B={batch} decode {new_tokens} tok, cached", f"{cached_tps:.1f} tok/s, {decode_s / steps * 1e3:.2f} ms/step")

        # uncached: one step = the full window through the model; time it at 3 window lengths
        head = sample.LogitsHead(model, batch_size=batch)
        lengths = [prompt_len + 1, prompt_len + new_tokens // 2, prompt_len + new_tokens - 1]
        step_ms = []
        for length in lengths:
            rows = torch.randint(0, config.vocab_size, (batch, length)).tolist()
            with torch.no_grad():
                step_ms.append(median_ms(lambda rows=rows, head=head: sample.forward_no_cache(model, rows, head),
                                          repeat=1 if not quick else 3))
        # trapezoid over the window lengths the real run would see (prompt_len+1 .. prompt_len+new_tokens-1)
        half = steps / 2
        uncached_s = (half * (step_ms[0] + step_ms[1]) / 2 + half * (step_ms[1] + step_ms[2]) / 2) / 1e3
        row("sample", f"{name} B={batch} decode {new_tokens} tok, no cache (3-length estimate)",
            f"{batch * steps / uncached_s:.1f} tok/s, {uncached_s / steps * 1e3:.2f} ms/step")
        row("sample", f"{name} B={batch} decode speed-up of the KV cache", f"{uncached_s / decode_s:.2f}x")

        try:
            import transformers  # reference only: the same weights in GPT2LMHeadModel
        except ImportError:
            continue
        hf = hf_gpt2(model, transformers)
        ours_s = prefill_s + decode_s
        attention = torch.ones_like(prompt)
        with torch.no_grad():
            hf.generate(prompt[:, :4], attention_mask=attention[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
            hf_runs = []
            for _ in range(1 if not quick else 2):
                t0 = time.perf_counter()
                hf_out = hf.generate(prompt, attention_mask=attention, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
                hf_runs.append(time.perf_counter() - t0)
        hf_s = sorted(hf_runs)[len(hf_runs) // 2]
        same = (hf_out[:, prompt_len:] == runs[0][2]).float().mean().item()
        row("sample", f"{name} B={batch} HF GPT2LMHeadModel.generate, {new_tokens} tok (same tokens: {same:.0%})",
            f"{batch * new_tokens / hf_s:.1f} tok/s")
        row("sample", f"{name} B={batch} sample.generate speed vs HF generate", f"{hf_s / ours_s:.2f}x")
    bench_decode_bound(quick)


def gpt2_shape(quick: bool):
    """(config, name) of the decode and serving benches: GPT-2 124M, or a tiny one for --quick."""
    import gpt

    if quick:
        return gpt.GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=2, n_embd=64), "tiny"
    return gpt.GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768), "124M"


def bound_products(n_params: int, k: int = 1024):
    """The decode memory bound: a step reads every weight once, so it cannot beat one 1-row fp32
    product over a (n_params / k, k) weight. Both layouts, (in, out) and (out, in): take the faster."""
    w = torch.randn(n_params // k, k)
    x_rows, x_cols = torch.randn(1, n_params // k), torch.randn(1, k)
    return (lambda: x_rows @ w), (lambda: torch.nn.functional.linear(x_cols, w))


def bench_decode_bound(quick: bool) -> None:
    """sample.py's batch-1 decode against the memory bound and against HF generate.

    The bound: a decode step reads every weight once, so it cannot beat one 1-row fp32
    product over a weight as large as the whole model (timed here, in the faster of the
    two layouts, in the same run). Ours: sample.generate on a model laid out by
    sample.decode_layout (as the CLI does on CPU), eager and with --compile's decode step;
    theirs: GPT2LMHeadModel.generate with the same weights, both greedy, 256 tokens after a
    32-token prompt (quick: a tiny model). Decode time = first new token to last (255
    steps), for HF read off a streamer. All sides run in turn in every round and the
    medians are compared, so a busy machine slows each alike."""
    import gpt
    import sample

    torch.manual_seed(0)
    config, name = gpt2_shape(quick)
    prompt_len, new_tokens, rounds = (8, 16, 3) if quick else (32, 256, 3)
    model = sample.decode_layout(gpt.GPT(config).eval())
    n_params = sum(p.numel() for p in model.parameters())
    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(b))
               for b in (1, 8)}
    steps = new_tokens - 1  # the first new token comes from the prefill

    def clocks():  # wall time, and this thread's CPU time: the machine is shared, and with one
        return time.perf_counter(), time.thread_time()  # thread CPU time leaves out the waits

    def ours(batch=1, decode_fn=None):
        """((wall, CPU) decode seconds, tokens (B, new_tokens)) of one greedy sample.generate."""
        out = []
        for tok in sample.generate(model, prompts[batch], new_tokens, temperature=0, decode_fn=decode_fn):
            out.append(tok)
            if len(out) == 1:
                first = clocks()
        return [b - a for a, b in zip(first, clocks())], torch.stack(out, 1)

    compiled = sample.compile_decode()  # inductor, as --compile

    def bound(product):
        start = clocks()
        product()
        return [b - a for a, b in zip(start, clocks())], None

    in_out, out_in = bound_products(n_params)
    sides = {"bound (in, out)": lambda: bound(in_out), "bound (out, in)": lambda: bound(out_in),
             "ours": ours, "ours --compile": lambda: ours(decode_fn=compiled), "ours B=8": lambda: ours(8)}
    try:
        import transformers  # reference only: the same weights in GPT2LMHeadModel
    except ImportError:
        transformers = None
    if transformers is not None:
        hf = hf_gpt2(model, transformers)

        class Stamps(transformers.generation.streamers.BaseStreamer):
            """The time of every put: the prompt first, then each new token."""

            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(clocks())

            def end(self):
                pass

        def theirs():
            stamps = Stamps()
            with torch.no_grad():
                out = hf.generate(prompts[1], attention_mask=torch.ones_like(prompts[1]), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=stamps)
            return [b - a for a, b in zip(stamps.times[1], stamps.times[-1])], out[:, prompt_len:]

        sides["HF generate"] = theirs

    t0 = time.perf_counter()
    ours(decode_fn=compiled)  # compiles the decode step once
    compile_s = time.perf_counter() - t0
    results = {label: [fn()] for label, fn in sides.items()}  # warm-up round, dropped below
    for _ in range(rounds):
        for label, fn in sides.items():
            results[label].append(fn())
    med = {label: statistics.median(r[0][0] for r in runs[1:]) for label, runs in results.items()}  # wall
    cpu = {label: statistics.median(r[0][1] for r in runs[1:]) for label, runs in results.items()}
    tokens = {label: runs[-1][1] for label, runs in results.items()}

    bound_s = min(med["bound (in, out)"], med["bound (out, in)"])
    bound_tps = 1 / bound_s
    bound_cpu_s = min(cpu["bound (in, out)"], cpu["bound (out, in)"])
    threads = torch.get_num_threads()

    def cpu_note(text):  # with one thread, the same ratio in thread CPU time (robust to a busy machine)
        return f" (CPU time: {text})" if threads == 1 else ""

    load = os.getloadavg()[0]
    row("sample", f"{name} decode bound: 1-row fp32 product over {n_params / 1e6:.0f}M weights ({threads} threads)",
        f"{bound_s * 1e3:.1f} ms = {bound_tps:.1f} tok/s (load average {load:.1f})")
    for label in ("ours", "ours --compile"):
        tps = steps / med[label]
        what = label.replace("ours", "decode").strip()
        row("sample", f"{name} batch 1 {what}: ours / bound",
            f"{tps:.1f} tok/s = {tps / bound_tps:.0%} of {bound_tps:.1f}"
            + cpu_note(f"{bound_cpu_s * steps / cpu[label]:.0%}"))
    if transformers is not None:
        hf_tps = steps / med["HF generate"]
        same = torch.equal(tokens["HF generate"], tokens["ours"]) and torch.equal(tokens["ours --compile"], tokens["ours"])
        row("sample", f"{name} batch 1 decode: HF GPT2LMHeadModel.generate (same tokens: {same})",
            f"{hf_tps:.1f} tok/s = {hf_tps / bound_tps:.0%} of the bound")
        for label in ("ours", "ours --compile"):
            what = label.replace("ours", "decode").strip()
            row("sample", f"{name} batch 1 {what}: ours / HF generate",
                f"{med['HF generate'] / med[label]:.2f}x" + cpu_note(f"{cpu['HF generate'] / cpu[label]:.2f}x"))
    b8_tps, b1_tps = 8 * steps / med["ours B=8"], steps / med["ours"]
    row("sample", f"{name} decode tokens/s: batch 8 / batch 1",
        f"{b8_tps:.1f} / {b1_tps:.1f} tok/s = {b8_tps / b1_tps:.2f}x" + cpu_note(f"{8 * cpu['ours'] / cpu['ours B=8']:.2f}x"))
    row("sample", f"{name} --compile: compile + first generation", f"{compile_s:.1f} s")


def hf_gpt2(model, transformers):
    """Our weights in Hugging Face's GPT2LMHeadModel (its Conv1D wants (in, out) weights)."""
    c = model.config
    hf_config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(model.to_hf_state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), (missing, unexpected)
    return hf


# ----------------------------------------------------------------------------------------
# bpe




# ----------------------------------------------------------------------------------------
# nf4


# HBM peaks from NVIDIA's datasheets (bytes/s), used when Triton cannot report the clock
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def _peak_bandwidth(device) -> float | None:
    import qlora_nf4

    try:  # memory clock (kHz) x bus width (bits), double data rate, as in Triton's tutorials
        props = qlora_nf4.triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        return 2 * props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] / 8
    except Exception:
        name = torch.cuda.get_device_name(device)
        return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def bench_nf4(quick: bool) -> None:
    import torch.nn as nn

    import qlora_nf4

    S = "nf4"
    n = 1024 if quick else 4096
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


# ----------------------------------------------------------------------------------------
# lora: trainable parameters, optimizer state, step time and adapter size, LoRA vs full finetune


def bench_lora(quick: bool):
    import io

    import common
    import gpt
    import lora

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


# ----------------------------------------------------------------------------------------
# fsdp2


def bench_fsdp2(quick: bool) -> None:
    """fsdp2_train.py: what one rank holds, full vs QLoRA, and CPU step time 2 ranks vs 1.

    Bytes: counted on the real model fsdp2_train builds (GPT-2-124M shape; quick: a tiny
    one; QLoRA really quantized to NF4), cut the way FSDP2 cuts every parameter (dim 0 in
    torch.chunk pieces; rank 0 holds the largest piece, tests/test_fsdp2_train.py checks the
    rule on real shards). Per rank: parameter shards, gradient shards + AdamW's two moments
    (fp32, trainable parameters only), and the replicated buffers (NF4 fp32 scales).
    Step time: the tiny config through fsdp2_train.py on CPU/gloo, global batch 8, median
    ms/step from metrics.jsonl (first 3 steps dropped), 1 process vs torchrun with 2 ranks,
    one thread per process (a rank per core), and a plain GPT + AdamW step without
    torch.distributed. quick: the byte counts on a tiny shape only."""
    import contextlib
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    import fsdp2_train
    import data
    import gpt

    shape = (["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64"] if quick else
             ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"])
    name = "tiny 2L/64" if quick else "gpt2-124M"
    vocab = 512 if quick else 50304

    def rank0_bytes(model, world):
        params = train_state = 0
        for p in model.parameters():
            rows = -(-p.shape[0] // world)  # torch.chunk: the first piece is the largest
            local = rows * (p.numel() // p.shape[0])
            params += local * p.element_size()
            if p.requires_grad:
                train_state += local * 4 * 3  # fp32 gradient + exp_avg + exp_avg_sq
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return params, train_state, buffers

    MiB = 2**20
    totals = {}
    for mode in ("full", "qlora"):
        cfg, _ = fsdp2_train.parse_args(shape + ["--mode", mode])
        if mode == "full":
            with torch.device("meta"):  # shapes are all it takes
                model, _ = fsdp2_train.build_model(cfg, vocab, "cpu", torch.float32)
        else:
            model, _ = fsdp2_train.build_model(cfg, vocab, "cpu", torch.float32)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for world in (1, 2):
            params, train_state, buffers = rank0_bytes(model, world)
            totals[mode, world] = params + train_state + buffers
            row("fsdp2", f"{name} {mode} ({trainable / 1e6:.2f}M trainable), {world} rank{'s' if world > 1 else ''}: per rank",
                f"{totals[mode, world] / MiB:,.1f} MiB (params {params / MiB:,.1f} + grads/AdamW "
                f"{train_state / MiB:,.1f} + replicated {buffers / MiB:,.2f})")
        # the largest transient: one block gathered for its forward (bf16 floats on a GPU)
        block = model.transformer.h[0]
        gathered = sum(p.numel() * (2 if p.is_floating_point() else p.element_size()) for p in block.parameters())
        row("fsdp2", f"{name} {mode}: one block all-gathered (bf16 floats, any world size)", f"{gathered / MiB:,.2f} MiB")
        del model
    for world in (1, 2):
        row("fsdp2", f"{name} per-rank bytes, full / qlora, {world} rank{'s' if world > 1 else ''}",
            f"{totals['full', world] / totals['qlora', world]:.2f}x")
    row("fsdp2", f"{name} per-rank bytes, 1 rank / 2 ranks (full; qlora)",
        f"{totals['full', 1] / totals['full', 2]:.2f}x; {totals['qlora', 1] / totals['qlora', 2]:.2f}x")

    if quick:
        return  # the step timings below launch training runs: too slow for a smoke test
    # --- CPU step time, tiny config
    tiny = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
            "--max_iters", "40", "--eval_interval", "100000", "--eval_iters", "1", "--log_interval", "1",
            "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "shakespeare.txt"
        src.write_text(shakespeare_text()[:200_000])
        data_root = tmp / "data"
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            data.prepare_dataset("shakespeare_char", input=src, data_root=data_root)

        def median_step_ms(out_dir):
            rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
            times = sorted(r["ms_per_step"] for r in rows if "loss" in r and r["iter"] > 3)
            return times[len(times) // 2]

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # in-process: a 1-rank group
            fsdp2_train.main(tiny + ["--data_root", str(data_root), "--out_dir", str(tmp / "one")])
        one = median_step_ms(tmp / "one")
        row("fsdp2", "tiny 2L/32 B=8 CPU: 1 process (FSDP2 on 1 rank, 1 thread)", f"{one:.1f} ms/step")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "fsdp2_train.py"), *tiny, "--data_root", str(data_root),
                        "--out_dir", str(tmp / "two")], env=env, check=True, capture_output=True)
        two = median_step_ms(tmp / "two")
        row("fsdp2", "tiny 2L/32 B=8 CPU: torchrun 2 ranks gloo (1 thread each)", f"{two:.1f} ms/step")
        row("fsdp2", "tiny 2L/32 B=8 CPU: 2-rank step time / 1-process", f"{two / one:.2f}x")

        # the same step without any torch.distributed: what FSDP2's hooks and DTensors cost here
        model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=data.read_meta(data_root / "shakespeare_char")["vocab_size"],
                                      n_layer=2, n_head=2, n_embd=32))
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        bins = data.TokenBins(data_root / "shakespeare_char", "train")
        g = torch.Generator().manual_seed(0)

        def plain_step():
            x, y = bins.get_batch(8, 32, g)
            model(x, y)[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        plain = median_ms(plain_step, repeat=30, warmup=2)
        torch.set_num_threads(threads)
        row("fsdp2", "tiny 2L/32 B=8 CPU: plain GPT + AdamW step, no FSDP (1 thread)", f"{plain:.1f} ms/step")
        row("fsdp2", "tiny 2L/32 B=8 CPU: FSDP2 1-rank step / plain step", f"{one / plain:.2f}x")


# ----------------------------------------------------------------------------------------
# dpo: peak memory and step time of a DPO step, reference = a frozen copy vs LoRA adapters off


_DPO_CHILD = """
import copy, json, sys, torch
sys.path.insert(0, {root!r})
import common, dpo, gpt, lora
from bench import median_ms, status_kib
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

ms = median_ms(step, repeat=repeat, warmup=1)
peak = torch.cuda.max_memory_allocated() if "cuda" in device else status_kib("VmHWM") * 1024
print(json.dumps({{"variant": variant, "ms": ms, "peak": peak - before, "weights": weights, "device": device,
                  "dtype": str(dtype).replace("torch.", "")}}), flush=True)
"""


def bench_dpo(quick: bool):
    """One DPO step (policy forward + backward over chosen and rejected, reference forward,
    AdamW step) in a fresh process per variant. Memory: on CUDA torch.cuda.max_memory_allocated;
    on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up)
    minus its RSS just before the model is built, so torch's own footprint is left out (Linux)."""
    import json

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
        out = subprocess.run([sys.executable, "-c", _DPO_CHILD.format(root=str(ROOT)), variant, *map(str, shape)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise NanoError(f"dpo bench child {variant} failed: {out.stderr.strip().splitlines()[-1]}")
        r = res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        row("dpo", f"{name}, {label}", f"{r['peak'] / 2**20:,.0f} MiB peak, {r['ms']:.0f} ms/step")
    copy_, off = res["lora_copy"], res["lora_off"]
    row("dpo", f"peak memory: LoRA frozen copy / adapters off ({off['device']}, {off['dtype']})",
        f"{copy_['peak'] / max(off['peak'], 1):.2f}x")
    row("dpo", "  memory saved by adapters off (one copy of the weights would be)",
        f"{(copy_['peak'] - off['peak']) / 2**20:,.0f} MiB ({off['weights'] / 2**20:,.0f} MiB)")
    row("dpo", "step time: LoRA frozen copy / adapters off", f"{copy_['ms'] / off['ms']:.2f}x")
    row("dpo", "peak memory: full finetune + copy / LoRA adapters off", f"{res['full_copy']['peak'] / max(off['peak'], 1):.2f}x")


# ----------------------------------------------------------------------------------------
# moe


def bench_moe(quick: bool) -> None:
    """moe.py: dispatch paths vs a per-expert loop (training step of one MoE layer:
    forward + backward), the GEMM-only bound, and the expert-load balance (coefficient of
    variation) after a tiny training run with the aux loss, the DeepSeek-V3 bias, or neither."""
    import contextlib
    import io
    import tempfile
    from pathlib import Path

    import data
    import moe

    section = "moe"
    bench_moe_dispatch(quick)

    # load balance after a tiny training run (same data, seed and steps for each method)
    shakespeare = data.SHAKESPEARE_PATH
    iters = 10 if quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shakespeare.txt"
        src.write_text(shakespeare.read_text()[: 100_000 if quick else None])
        for balance in ("none", "aux", "bias"):
            argv = ["--input", str(src), "--data_root", f"{tmp}/data", "--out_dir", f"{tmp}/out_{balance}",
                    "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64",
                    "--batch_size", "16", "--max_iters", str(iters), "--eval_interval", str(iters // 2),
                    "--eval_iters", "5", "--log_interval", str(iters), "--compare_dense", "False",
                    "--balance", balance, "--bias_update_rate", "0.01"]
            with contextlib.redirect_stdout(io.StringIO()):
                r = moe.main(argv)["moe"]
            row(section, f"load CV after {iters} steps, balance={balance} (E=8 k=2; 0 = even)",
                f"{r['load_cv']:.3f} (max/mean {r['max_over_mean']:.2f}, val loss {r['val_loss']:.3f})")


def _moe_inputs(E, k, T, d, device, dtype):
    """One MoE layer's inputs: fine-grained experts (hidden 4d/k, so k experts = one dense
    MLP), non-zero biases (a bias added in the wrong place shows), a random router."""
    h = 4 * d // k
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype).requires_grad_()

    x = leaf(T, d, std=1.0)
    weights = (leaf(E, h, d, std=0.02), leaf(E, h, std=0.1), leaf(E, d, h, std=0.02), leaf(E, d, std=0.1))
    router = torch.randn(d, E, generator=gen).to(device, torch.float32) * 0.1
    probs = (x.detach().float() @ router).softmax(-1)  # near-even load, as a trained router aims for
    topk_w, topk_idx = probs.topk(k, dim=-1)
    topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    return x, topk_idx, topk_w, weights


def moe_loop_baseline(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj):
    """The peer: HF Mixtral's per-expert loop. For each expert, find its (token, choice)
    slots, run it on those rows, add the weighted result back in place."""
    import moe

    out = torch.zeros_like(x)
    for e, (wf, bf, wp, bp) in enumerate(zip(w_fc, b_fc, w_proj, b_proj)):
        token, choice = torch.where(topk_idx == e)  # a host sync per expert on CUDA
        y = moe.expert_mlp(x[token], wf, bf, wp, bp) * topk_w[token, choice, None]
        out.index_add_(0, token, y)
    return out


def _grouped_mm_moe(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj):
    """dropless with torch._grouped_mm (bf16; one CUTLASS kernel per layer on sm90+): a
    peer measured on CUDA only (its meta kernel accepts bf16 alone, so it does not compile
    in fp32, and autocast does not cast its inputs)."""
    import torch.nn.functional as F

    N, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = flat.argsort(stable=True)  # (N*k,) slots grouped by expert
    expert_sorted = flat[order]
    ends = torch.bincount(flat, minlength=w_fc.shape[0]).cumsum(0).to(torch.int32)  # block ends
    xs = x[order // k]  # (N*k, d)
    h = torch._grouped_mm(xs, w_fc.mT, offs=ends) + b_fc[expert_sorted]  # (N*k, h)
    y = torch._grouped_mm(F.gelu(h, approximate="tanh"), w_proj.mT, offs=ends) + b_proj[expert_sorted]
    y = y * topk_w.reshape(-1)[order, None]
    return x.new_zeros(N, x.shape[1]).index_add_(0, order // k, y)


def _moe_dispatch_rows(section, E, k, T, d, repeat, device="cpu", dtype=torch.float32, label=""):
    """Forward+backward (and forward-only) tokens/s of one MoE layer's dispatch paths and
    the per-expert loop, interleaved; ratios are loop time / path time (> 1: path faster)."""
    import moe

    x, topk_idx, topk_w, weights = _moe_inputs(E, k, T, d, device, dtype)
    capacity = moe.expert_capacity(T, moe.MoEConfig(n_experts=E, top_k=k, capacity_factor=1.25))
    counts = torch.bincount(topk_idx.reshape(-1), minlength=E)
    paths = {
        "per-expert loop": lambda: moe_loop_baseline(x, topk_idx, topk_w, *weights),
        "dropless": lambda: moe.dropless_moe(x, topk_idx, topk_w, *weights),
        "capacity 1.25": lambda: moe.capacity_moe(x, topk_idx, topk_w, *weights, capacity)[0],
        # dropless by padding instead of sorting: every expert's block as long as the fullest
        "capacity = max load": lambda: moe.capacity_moe(x, topk_idx, topk_w, *weights, int(counts.max()))[0],
    }
    if device.startswith("cuda") and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        paths["torch._grouped_mm"] = lambda: _grouped_mm_moe(x, topk_idx, topk_w, *weights)
    # the floor: the expert GEMMs + GELU alone on inputs already grouped by expert
    grouped = [x.detach()[:n].clone().requires_grad_() for n in counts.tolist()]
    paths["expert GEMMs alone (bound)"] = lambda: torch.cat(
        [moe.expert_mlp(g, *ws) for g, ws in zip(grouped, zip(*weights))])
    leaves = (x, topk_w, *weights, *grouped)

    # equal to the loop? (the bound computes other rows, so it is not compared)
    shape = f"E={E} k={k} T={T} d={d}{' ' + label if label else ''}"
    g_out = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    params = (x, topk_w, *weights)
    ref = None
    for name in [n for n in paths if "bound" not in n]:
        try:
            y = paths[name]()
            grads = torch.autograd.grad(y, params, g_out)
        except RuntimeError as e:  # e.g. _grouped_mm on a GPU older than sm90
            row(section, f"{name} {shape}", f"unsupported: {str(e).splitlines()[0][:60]}")
            del paths[name]
            continue
        if ref is None:
            ref = (y, grads)
            continue
        diff = max((a - b).abs().max().item() for a, b in zip((y, *grads), (ref[0], *ref[1])))
        kept = "" if "capacity" not in name else f" (slots dropped: {(counts - capacity).clamp(min=0).sum().item()})"
        row(section, f"{name} == loop {shape}: max |diff| out+grads{kept}", f"{diff:.1e}")

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn, backward):
        def step():
            if backward:
                fn().float().square().mean().backward()
                for t in leaves:
                    t.grad = None
            else:
                with torch.no_grad():
                    fn()
            sync()
        return step

    for backward, what in ((True, "fwd+bwd"), (False, "forward")):
        sync()
        times = interleaved({name: timed(fn, backward) for name, fn in paths.items()}, repeat)
        for name, s in times.items():
            row(section, f"{name} {shape}: {what} tokens/s", f"{T / s:,.0f}")
        for name, s in times.items():
            if name != "per-expert loop":
                row(section, f"{name} vs per-expert loop {shape} ({what})", f"{times['per-expert loop'] / s:.2f}x")


def bench_moe_dispatch(quick: bool) -> None:
    """The CPU rows of bench_moe (its first part): the issue's shape and `python moe.py`'s,
    at the default thread count and at one thread."""
    shapes = [(8, 2, 256, 64)] if quick else [(8, 2, 4096, 512), (8, 2, 2048, 128)]
    threads = torch.get_num_threads()
    for E, k, T, d in shapes:
        for n in dict.fromkeys((threads, 1)):  # 1 thread: what a core does when others wait for it
            torch.set_num_threads(n)
            try:
                _moe_dispatch_rows("moe", E, k, T, d, 1 if quick else 7, label=f"{n} thr")
            finally:
                torch.set_num_threads(threads)


def bench_moe_gpu(quick: bool = False) -> None:
    """GPU: the same interleaved dispatch comparison on CUDA, fp32 and bf16; with --dry-run
    (no CUDA) the code paths run on CPU at a tiny shape."""
    if torch.cuda.is_available():
        device, shapes = "cuda", [(8, 2, 4096, 512)] if quick else [(8, 2, 4096, 512), (8, 2, 16384, 1024), (64, 8, 16384, 1024)]
    elif quick:
        device, shapes = "cpu", [(4, 2, 64, 32)]
    else:
        row("moe", "GPU dispatch vs per-expert loop", "skipped (no CUDA)")
        return
    for E, k, T, d in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            _moe_dispatch_rows("moe", E, k, T, d, 3 if quick else 10, device=device, dtype=dtype,
                               label=f"{device} {str(dtype).removeprefix('torch.')}")


# ----------------------------------------------------------------------------------------
# hellaswag


def bench_hellaswag(quick: bool) -> None:
    """HellaSwag scoring speed: the batched evaluator (several examples x 4 endings per padded
    forward, head only at ending positions) vs one forward per ending with full logits, on the
    GPT-2 124M shape with random weights (speed does not depend on the weights)."""
    import random

    import torch

    import eval_hellaswag as hs
    import common
    import gpt
    import tokenizer

    device = common.pick_device("auto")
    torch.manual_seed(0)
    # GPT-2 124M as from_pretrained("gpt2") builds it; quick: a tiny model, same vocabulary
    config = gpt.GPTConfig(vocab_size=50257)
    if quick:
        config = gpt.GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
    model = gpt.GPT(config).to(device).eval()
    shape = "tiny 2L/64" if quick else "gpt2-124M"
    tok = tokenizer.load_tokenizer("gpt2")

    # synthetic rows shaped like HellaSwag val: a 15-70 word context, endings of 8-30 words
    # (quick: short ones), so padding costs what it costs on the real data
    rng = random.Random(0)
    words = ("the man woman dog ball water then she he is are holds runs jumps into over a of "
             "slowly quickly kitchen street bike camera rope table paint snow").split()
    ctx_len, end_len = ((8, 16), (4, 8)) if quick else ((15, 70), (8, 30))

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    n = 1 if quick else (256 if device.startswith("cuda") else 2)
    examples = [{"ind": i, "activity_label": "Bench", "ctx_a": "", "ctx_b": "", "ctx": text(*ctx_len),
                 "endings": [text(*end_len) for _ in range(4)], "label": 0} for i in range(n)]
    batch_size = 32 if device.startswith("cuda") else 2

    def batched():
        hs.evaluate(model, tok, examples, "completion", batch_size=batch_size, device=device)

    def one_forward_per_ending():
        for example in examples:
            scores = hs.ending_logprobs_naive(model, hs.render_example(example, tok, "completion"), device)
            int(scores.argmax())

    repeat, warmup = (1, 0) if quick else ((5, 1) if device.startswith("cuda") else (2, 1))
    batched_ms = median_ms(batched, repeat=repeat, warmup=warmup)
    naive_ms = median_ms(one_forward_per_ending, repeat=repeat, warmup=warmup)
    row("hellaswag", f"{shape} batched, {batch_size} examples/forward ({device}, fp32)",
        f"{n / batched_ms * 1e3:.1f} examples/s")
    row("hellaswag", f"{shape} one forward per ending ({device}, fp32)", f"{n / naive_ms * 1e3:.1f} examples/s")
    row("hellaswag", f"{shape} batched / one-forward-per-ending throughput", f"{naive_ms / batched_ms:.2f}x")


# ----------------------------------------------------------------------------------------
# flash (from the part that teaches it)


_FLASH_MEM_CHILD = r"""
import sys
sys.path.insert(0, {root!r})
import torch
import flash_attention as fa
from bench import status_kib
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
"""

def bench_flash(quick: bool):
    """CPU: peak memory of causal attention forward+backward, naive (the (T, T) scores and
    probabilities exist, and P is kept for backward) vs the tiled reference of
    flash_attention.py (tiles of 128 x 128 only), each in a fresh process (peak RSS growth,
    VmHWM reset after a warm-up); then, at the shorter length, the time of both (interleaved
    repeats in this process)."""
    import flash_attention as fa

    B, H, D = 1, (2 if quick else 8), 64
    sizes, repeat = ((512,), 1) if quick else ((2048, 4096), 3)
    for T in sizes:
        peaks = {}
        for impl in ("naive", "tiled"):
            runs = [subprocess.run([sys.executable, "-c", _FLASH_MEM_CHILD.format(root=str(ROOT)), impl, str(B), str(H),
                                    str(T), str(D)], capture_output=True, text=True, check=True)
                    for _ in range(1 if quick else 3)]
            peaks[impl] = statistics.median(int(r.stdout.strip()) for r in runs)
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

def bench_flash_gpu(quick: bool = False):
    """GPU: causal forward and forward+backward TFLOP/s of the Triton kernels vs PyTorch's
    F.scaled_dot_product_attention restricted to its FlashAttention backend, bf16, 16k tokens
    per batch and model width 2048 (B = 16384 / T, H = 2048 / D), as in the FlashAttention-2
    paper. FLOPs: forward 4 B H T^2 D / 2 (causal), backward 2.5x the forward (five matmuls
    to two). Medians of interleaved repeats timed with CUDA events."""
    if not torch.cuda.is_available():
        row("flash", "GPU TFLOP/s vs SDPA", "skipped (no CUDA)")
        return
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flash_attention as fa

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

# ----------------------------------------------------------------------------------------
# serve (from the part that teaches it)


def bench_serve(args) -> None:
    """serve.py: 16 concurrent streamed requests of 64 new tokens on the GPT-2-124M shape
    (random weights, greedy, ignore_eos so every request runs its 64 tokens), prompts of
    8..64 tokens, all sent at once. Continuous batching (--max_batch 16: every decode step
    serves every running request) against one request at a time (--max_batch 1: the same
    engine, requests queue and run alone). Figures as a client sees them over HTTP: total
    generated tokens/s (all 16 x 64 tokens over the wall time from the first send to the
    last token), time to first token (TTFT, includes any wait in the queue) p50/p95 over
    the requests, inter-token latency p50/p95 over every gap between two streamed chunks
    (a chunk is one token, or a few where a byte-level token ends inside a character).
    Medians over interleaved repeats (batched, one-at-a-time, batched, ...). Last, the
    engine's decode step alone at 16 rows and at 1 row, interleaved step by step: the
    ceiling of the gain, which prefill (the same work either way) then dilutes."""
    import gpt
    import serve
    import tokenizer

    quick = getattr(args, "quick", args)
    torch.manual_seed(0)
    config, name = gpt2_shape(quick)
    n_requests, new_tokens, repeats = (4, 8, 1) if quick else (16, 64, 3)
    model = gpt.GPT(config).eval()
    # quick: a tiny vocabulary, any tokenizer of <= 512 ids
    tok = tokenizer.load_tokenizer("char:" + "".join(chr(32 + i) for i in range(config.vocab_size)) if quick else "gpt2")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tok.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 65, (n_requests,), generator=g)]

    def one_run(srv):
        """Send every prompt at once; per request: send time, then the time of each token."""
        port = srv.server_address[1]
        stamps = [None] * n_requests
        go = threading.Barrier(n_requests + 1)

        def client(i):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = json.dumps({"prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0, "stream": True,
                               "ignore_eos": True, "stream_options": {"include_usage": True}})
            go.wait()
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            times, n = [], 0
            for line in r:  # SSE: one "data: {...}" line per token (fewer where a token ends mid-character)
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        times.append(time.perf_counter())
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
            stamps[i] = (t0, times, n)
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_requests)]
        for t in threads:
            t.start()
        go.wait()
        for t in threads:
            t.join()
        start = min(s[0] for s in stamps)
        end = max(s[1][-1] for s in stamps)
        tokens = sum(s[2] for s in stamps)
        ttft = sorted(s[1][0] - s[0] for s in stamps)
        gaps = sorted(b - a for _, ts, _ in stamps for a, b in itertools.pairwise(ts))
        return {"tok_s": tokens / (end - start), "tokens": tokens,
                "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95)}

    servers = {"batched": serve.make_server(model, tok, max_batch=n_requests, log_requests=False),
               "one at a time": serve.make_server(model, tok, max_batch=1, max_queue=n_requests, log_requests=False)}
    for srv in servers.values():
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    results = {k: [] for k in servers}
    try:
        for srv in servers.values():  # warm-up: allocator, threads, the batch-1 head copy
            conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=600)
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompts[0], "max_tokens": 4}),
                         headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        for i in range(repeats):
            for key, srv in servers.items():
                results[key].append(one_run(srv))
                print(f"  serve run {i + 1}/{repeats} {key}: {results[key][-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        for srv in servers.values():
            srv.close()

    # the engine's decode step alone, B=16 rows vs 1 row at the same context length, the two
    # interleaved step by step (robust to a machine whose load drifts): where the gain comes from
    engine = serve.Engine(model, tok.vocab_size, max_batch=n_requests)
    length = max(len(p) for p in prompts) + new_tokens // 2
    step_ms = {1: [], n_requests: []}
    for _ in range(3 if quick else 10):
        for b, times in step_ms.items():
            tokens, pos = torch.zeros(b, 1, dtype=torch.long), torch.full((b,), length - 1)
            t0 = time.perf_counter()
            serve.decode_step(model, tokens, pos, engine._views(slice(0, b), length), engine.head)
            times.append((time.perf_counter() - t0) * 1e3)
    del engine

    med = {k: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for k, runs in results.items()}
    assert all(r["tokens"] == n_requests * new_tokens for runs in results.values() for r in runs)
    what = f"{name} {n_requests} reqs x {new_tokens} tok"
    for key, m in med.items():
        row("serve", f"{what}, {key}: total", f"{m['tok_s']:.1f} tok/s")
        row("serve", f"{what}, {key}: TTFT p50 / p95", f"{m['ttft_p50'] * 1e3:.0f} / {m['ttft_p95'] * 1e3:.0f} ms")
        row("serve", f"{what}, {key}: inter-token p50 / p95",
            f"{m['itl_p50'] * 1e3:.1f} / {m['itl_p95'] * 1e3:.1f} ms")
    row("serve", f"{what}: tok/s batched / one at a time (goal >= 4x)",
        f"{med['batched']['tok_s'] / med['one at a time']['tok_s']:.2f}x")
    one, many = statistics.median(step_ms[1]), statistics.median(step_ms[n_requests])
    row("serve", f"{name} decode step at {length} tok: 1 row / {n_requests} rows", f"{one:.1f} / {many:.1f} ms")
    row("serve", f"{name} decode step: tok/s of {n_requests} rows / 1 row", f"{n_requests * one / many:.2f}x")

def pct(sorted_values, q):
    """The q-th percentile of sorted values (nearest rank)."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]

# ----------------------------------------------------------------------------------------
# bpe (from the part that teaches it)


EOT = "<|endoftext|>"

def interleaved(fns: dict, repeat: int, clock=time.perf_counter) -> dict:
    """Median seconds of each function, the functions run in turn `repeat` times (after one
    untimed round), so a noisy machine slows every side alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}

def bench_bpe(args) -> None:
    import data

    quick = getattr(args, "quick", args)
    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    bench_bpe_encode(quick, text)
    bench_bpe_train(quick, text)

def bench_bpe_encode(quick, text):
    import tiktoken

    import bpe
    import tokenizer

    repeat = 2 if quick else 7
    enc = tiktoken.get_encoding("gpt2")
    tok = tokenizer.bpe_from_gpt2_files(tokenizer.GPT2_VOCAB_BPE, tokenizer.GPT2_ENCODER_JSON)
    curly = text.replace("'", "\u2019")  # no longer ASCII: the `regex` split
    for name, sample in (("Tiny Shakespeare (ASCII)", text), ("Tiny Shakespeare, curly ' (not ASCII)", curly)):
        sample = sample[:200_000] if quick else sample
        assert tok.encode_ordinary(sample) == enc.encode_ordinary(sample), "bpe.py and tiktoken disagree"
        mb = len(sample.encode("utf-8")) / 1e6
        for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
            s = interleaved({"tiktoken": lambda t=sample: enc.encode_ordinary(t),
                             "cold": lambda t=sample: (tok._cache.clear(), tok.encode_ordinary(t)),
                             "warm": lambda t=sample: tok.encode_ordinary(t)}, repeat, clock)
            if clock_name == "wall":
                row("bpe", f"encode GPT-2, {name}: tiktoken, 1 thread", f"{mb / s['tiktoken']:.1f} MB/s")
                row("bpe", f"encode GPT-2, {name}: bpe.py cold / warm cache",
                    f"{mb / s['cold']:.1f} / {mb / s['warm']:.1f} MB/s")
            row("bpe", f"  bpe.py time / tiktoken's, cold / warm ({clock_name}; goal <= 2.5x)",
                f"{s['cold'] / s['tiktoken']:.2f}x / {s['warm'] / s['tiktoken']:.2f}x")

    # encode_batch: documents of Tiny Shakespeare (paragraphs, ragged), all the machine's cores
    docs = [d for d in text.split("\n\n") if d][:500 if quick else None]
    n = os.cpu_count() or 1
    assert tok.encode_batch(docs[:50], num_workers=2) == enc.encode_ordinary_batch(docs[:50])
    s = interleaved({"tiktoken 1": lambda: enc.encode_ordinary_batch(docs, num_threads=1),
                     f"tiktoken {n}": lambda: enc.encode_ordinary_batch(docs, num_threads=n),
                     "bpe.py 1": lambda: (tok._cache.clear(), tok.encode_batch(docs, num_workers=1)),
                     f"bpe.py {n}": lambda: (tok._cache.clear(), tok.encode_batch(docs, num_workers=n))},
                    max(2, repeat // 2))
    row("bpe", f"encode_batch {len(docs):,} docs: tiktoken 1 / {n} threads",
        f"{s['tiktoken 1'] * 1000:.0f} / {s[f'tiktoken {n}'] * 1000:.0f} ms")
    row("bpe", f"encode_batch: bpe.py 1 process (cold) / pool of {n} (fresh workers, cold)",
        f"{s['bpe.py 1'] * 1000:.0f} / {s[f'bpe.py {n}'] * 1000:.0f} ms")
    row("bpe", f"  bpe.py pool / tiktoken threads, {n} each", f"{s[f'bpe.py {n}'] / s[f'tiktoken {n}']:.2f}x")

def hf_train(path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train([str(path)], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf

def bench_bpe_train(quick, text):
    import bpe

    try:
        import tokenizers  # noqa: F401 (test-only reference)
    except ImportError:
        row("bpe", "train: HF tokenizers not installed", "skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "shakespeare.txt"
        small.write_text(text[:200_000] if quick else text, encoding="utf-8")
        for vocab_size in (500, 10_000):
            s = interleaved({"bpe.py": lambda v=vocab_size: bpe.train_bpe_file(small, v, [EOT], num_workers=1),
                             "hf": lambda v=vocab_size: hf_train(small, v)}, 1 if quick else 5)
            vocab, merges = bpe.train_bpe_file(small, vocab_size, [EOT], num_workers=1)
            ours = bpe.Tokenizer(vocab, merges, [EOT]).encode(text)
            theirs = hf_train(small, vocab_size).encode(text).ids
            row("bpe", f"train vocab {vocab_size:,}, Tiny Shakespeare, 1 thread: bpe.py / HF tokenizers",
                f"{s['bpe.py']:.2f} / {s['hf']:.2f} s = {s['bpe.py'] / s['hf']:.2f}x")
            row("bpe", "  tokens for all of Tiny Shakespeare: bpe.py / HF", f"{len(ours):,} / {len(theirs):,}")

        # >= 50 MB: Tiny Shakespeare's paragraphs, shuffled, repeated, joined by <|endoftext|>
        paragraphs = [p for p in text.split("\n\n") if p]
        big, rng, parts, size = Path(tmp) / "big.txt", random.Random(0), [], 0
        target = 2e6 if quick else 52e6
        while size < target:
            rng.shuffle(paragraphs)
            parts.append(EOT.join(paragraphs))
            size += len(parts[-1])
        big.write_text(EOT.join(parts), encoding="utf-8")
        mb, n = big.stat().st_size / 1e6, os.cpu_count() or 1
        times = {}
        for _ in range(1 if quick else 2):  # interleaved by hand: each run is long
            for name, fn in (("bpe.py 1", lambda: bpe.train_bpe_file(big, 10_000, [EOT], num_workers=1)),
                             ("hf 1", lambda: hf_train(big, 10_000)),
                             (f"bpe.py {n}", lambda: bpe.train_bpe_file(big, 10_000, [EOT], num_workers=n))):
                t0 = time.perf_counter()
                fn()
                times.setdefault(name, []).append(time.perf_counter() - t0)
        s = {name: statistics.median(t) for name, t in times.items()}
        row("bpe", f"train vocab 10,000 on {mb:.0f} MB (repeated Shakespeare): bpe.py / HF, 1 thread",
            f"{s['bpe.py 1']:.1f} / {s['hf 1']:.1f} s = {s['bpe.py 1'] / s['hf 1']:.2f}x")
        row("bpe", f"  bpe.py with {n} counting processes", f"{s[f'bpe.py {n}']:.1f} s")

# ----------------------------------------------------------------------------------------
# export (from the part that teaches it)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

def _reference_gguf(path, metadata: dict, tensors: list):
    """gguf-py's GGUFWriter (llama.cpp's converter's writer) on the same metadata and tensors,
    quantized by gguf-py's reference quantizers: the same bytes as ours (tests/test_export.py)."""
    import gguf
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.constants import GGUFValueType as V
    from gguf.quants import quantize

    import export

    writer = gguf.GGUFWriter(path, arch=metadata["general.architecture"][1])
    for key, (kind, value) in metadata.items():
        if key != "general.architecture":
            if kind == export.ARRAY:
                writer.add_key_value(key, value[1], V(kind), sub_type=V(value[0]))
            else:
                writer.add_key_value(key, value, V(kind))
    for name, t, ggml_type in tensors:
        writer.add_tensor(name, quantize(t.detach().float().numpy(), Q(ggml_type)), raw_dtype=Q(ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

def bench_export(args) -> None:
    """export.py on random GPT-2-124M weights (nanollm's shape: vocab padded to 50304, tied
    head) with GPT-2's tokenizer, from the model in memory to files on disk:
    - hf: ours (export_hf: model.safetensors + tokenizer files) vs transformers'
      save_pretrained of the same GPT2LMHeadModel plus its tokenizer's save_pretrained;
    - gguf f32 / f16 / q8_0: ours (export_gguf: metadata with the 50k-token tokenizer,
      tensors converted and quantized in torch) vs gguf-py's GGUFWriter given the same
      metadata and tensors, quantized by gguf-py's numpy reference;
    - peft (an r=8 adapter on c_attn, c_proj, c_fc): ours (export_peft) vs PeftModel.save_pretrained.
    Wall time: median of interleaved repeats (ours, reference, ours, ...), each into a fresh
    path; the ratio is reference time / our time (> 1: ours is faster). Sizes in MiB."""
    import export
    import gpt
    import lora

    quick = getattr(args, "quick", args)
    torch.manual_seed(0)
    if quick:
        config = gpt.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
        repeats, shape = 1, "tiny"
    else:
        config = gpt.GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
        repeats, shape = 3, "124M"
    model = gpt.GPT(config).eval()
    spec = "gpt2"
    export.byte_bpe(spec)  # GPT-2's tokenizer is built once per process (cached): not timed

    import peft
    import transformers

    hf_dir = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        export.export_hf(model, spec, hf_dir)  # the reference side's inputs: the same weights in HF
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        lora.apply_lora(model, r=8, alpha=16)
        adapter = lora.lora_state_dict(model, "gpt2")
        lora.merge_lora(model)  # B = 0: the weights are unchanged
        peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(**{
            k: v for k, v in export.peft_config(adapter).items()
            if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "task_type")}))
        counter = iter(range(10**6))

        def fresh(suffix=""):
            return hf_dir.parent / f"{hf_dir.name}_{next(counter)}{suffix}"

        def ours_gguf(gguf_type):
            return lambda out: export.export_gguf(model, spec, out, gguf_type, "bench")

        def ref_gguf(gguf_type):
            def run(out):
                ggml_type, file_type = export.GGUF_TYPES[gguf_type]
                metadata = export.gguf_metadata(config, "bench", file_type, 4 * config.n_embd) | export.gguf_tokenizer(
                    spec, config.vocab_size)
                _reference_gguf(out, metadata, export.gguf_tensors(model, ggml_type))
            return run

        def mkdir_then(fn):
            def run(out):
                out.mkdir()
                fn(out)
            return run

        cases = [
            ("hf", "", mkdir_then(lambda out: export.export_hf(model, spec, out)),
             lambda out: (hf_model.save_pretrained(out), hf_tok.save_pretrained(out)), "transformers"),
            *[(f"gguf {t}", ".gguf", ours_gguf(t), ref_gguf(t), "gguf-py") for t in ("f32", "f16", "q8_0")],
            ("peft r=8", "", mkdir_then(lambda out: export.export_peft(adapter, out)),
             lambda out: peft_model.save_pretrained(out), "peft"),
        ]
        for label, suffix, ours, reference, who in cases:
            times = {"ours": [], "ref": []}
            sizes = {}
            for _ in range(repeats):
                for side, fn in (("ours", ours), ("ref", reference)):
                    out = fresh(suffix)
                    t0 = time.perf_counter()
                    fn(out)
                    times[side].append(time.perf_counter() - t0)
                    sizes[side] = _size(out)
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
            t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
            row("export", f"{shape} {label}: ours / {who}", f"{t_ours:.2f} s / {t_ref:.2f} s "
                f"({t_ref / t_ours:.2f}x), {sizes['ours'] / 2**20:,.1f} / {sizes['ref'] / 2**20:,.1f} MiB")
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)

# ----------------------------------------------------------------------------------------
# research (from the part that teaches it)


# One measurement per fresh process: peak-RSS growth (VmHWM after /proc/self/clear_refs reset
# it, minus VmRSS with the inputs in place) and wall time of KD loss + backward. A fresh process
# per run, so one mode's freed memory never serves the other's peak.
_KD_CHILD = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
import distill
from bench import status_kib
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
print(json.dumps({{"ms": ms, "peak": peak, "device": device}}))
"""

def bench_research(args) -> None:
    """distill.py: peak memory and time of the KD loss + backward, chunked (1024 rows at a time,
    teacher logits made per chunk under no_grad) against naive (both models' full (N, V)
    logits, F.kl_div), at GPT-2's vocabulary V = 50257, a GPT-2-small teacher (C_t = 768)
    and a half-width student (C_s = 384). N = 4096 rows (CPU) or 16384 (GPU: 16 x 1024).
    Medians of interleaved runs (naive, chunked, naive, ...), each in a fresh process."""
    quick = getattr(args, "quick", args)
    cuda = torch.cuda.is_available()
    N, V, C_s, C_t, chunk = (512, 4096, 64, 128, 128) if quick else (16384 if cuda else 4096, 50257, 384, 768, 1024)
    repeats = 1 if quick else 3
    res = {"naive": [], "chunked": []}
    for _ in range(repeats):
        for mode in res:
            out = subprocess.run([sys.executable, "-c", _KD_CHILD.format(root=str(ROOT)), mode,
                                  str(N), str(V), str(C_s), str(C_t), str(chunk)],
                                 capture_output=True, text=True, check=True)
            res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
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

# ----------------------------------------------------------------------------------------
# sft (from the part that teaches it)


def bench_sft(quick: bool) -> None:
    bench_sft_packing(quick)
    bench_sft_builtin(quick)


def bench_sft_packing(quick: bool) -> None:
    """sft.py's two batch layouts on the same conversations: packed rows of T tokens with a
    block-diagonal mask, or one conversation per row padded to the batch's longest. The
    conversations are Tiny Shakespeare passages in the chat template (GPT-2 BPE + the four
    chat tokens), 1-3 exchanges of user and assistant turns whose lengths are drawn
    log-normally (median T/8 tokens, a tail up to T/2), the raggedness of real chat data;
    longer conversations are cut at T. A training step is forward + backward + AdamW: on a GPU
    the GPT-2 124M shape at T = 1024, B = 8 rows; on a CPU a 4-layer 256-wide GPT (with
    GPT-2's 50k vocabulary) at T = 256, B = 4. Figures: real (non-pad) tokens/s, the share of computed
    positions that carry loss, and that hold a real token; medians over interleaved repeats
    (packed, padded, packed, ...), both layouts from one run, with the slowest and fastest
    repeat beside the median (this machine is shared: the spread says how far to trust a ratio)."""
    import common
    import data
    import gpt
    import sft
    import tokenizer

    device = common.pick_device("auto")
    dtype = common.pick_dtype(device, "auto")
    if quick:
        T, batch_size, shape, repeat, steps = 64, 4, (2, 2, 64), 2, 2
    elif device == "cpu":
        T, batch_size, shape, repeat, steps = 256, 4, (4, 4, 256), 5, 2
    else:  # the GPT-2 124M shape
        T, batch_size, shape, repeat, steps = 1024, 8, (12, 12, 768), 5, 3
    tok = sft.ChatTokenizer(tokenizer.load_tokenizer("gpt2"))
    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    rng = random.Random(0)

    def passage():  # a log-normal number of GPT-2 tokens of Shakespeare (median T / 8), as text
        n = max(1, min(T // 2, int(rng.lognormvariate(math.log(T / 8), 1.0))))
        start = rng.randrange(len(text) - 8 * n)
        return tok.base.decode(tok.base.encode(text[start:start + 8 * n])[:n]).strip() or "x"

    convs = []
    for _ in range(300 if quick else 1000):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": passage()}, {"role": "assistant", "content": passage()}]
        convs.append(messages)
    examples = [sft.to_example(*sft.render_conversation(m, tok), T) for m in convs]
    examples = [e for e in examples if e is not None]

    n_layer, n_head, n_embd = shape
    cfg = gpt.GPTConfig(block_size=T, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    torch.manual_seed(0)
    model = gpt.GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    streams = {pack: sft.make_batches(examples, sft.shuffled_forever(len(examples), torch.Generator().manual_seed(1)),
                                      batch_size, T, pack) for pack in (True, False)}
    sync = torch.cuda.synchronize if "cuda" in device else (lambda: None)
    stats = {pack: {"s": [], "tokens": 0, "targets": 0, "positions": 0, "time": 0.0} for pack in (True, False)}
    for rep in range(repeat + 1):  # the first round warms up and is not counted
        for pack in (True, False):
            batches = [sft.to_device(next(streams[pack]), device) for _ in range(steps)]
            sync()
            t0 = time.perf_counter()
            for b in batches:
                with common.autocast(device, dtype):
                    loss = sft.batch_loss(model, b)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            dt = time.perf_counter() - t0
            if rep:
                s = stats[pack]
                n_tok = sum(b["n_tokens"] for b in batches)
                s["s"].append(n_tok / dt)
                s["tokens"] += n_tok
                s["targets"] += sum(int((b["targets"] != -1).sum()) for b in batches)
                s["positions"] += sum(b["idx"].numel() for b in batches)
    packed, padded = stats[True], stats[False]
    name = f"{cfg.n_layer}L/{cfg.n_embd}, T={T}, B={batch_size}, {device}"
    tps = {k: statistics.median(v["s"]) for k, v in stats.items()}
    row("sft", f"real tokens/s ({name}, {torch.get_num_threads()} threads): packed / padded",
        f"{tps[True]:,.0f} / {tps[False]:,.0f} = {tps[True] / tps[False]:.2f}x")
    row("sft", f"  slowest-fastest of {repeat} repeats: packed / padded",
        " / ".join(f"{min(stats[p]['s']):,.0f}-{max(stats[p]['s']):,.0f}" for p in (True, False)))
    row("sft", "positions computed that carry loss: packed / padded",
        f"{100 * packed['targets'] / packed['positions']:.0f}% / {100 * padded['targets'] / padded['positions']:.0f}%")
    row("sft", "positions computed that hold a real token: packed / padded",
        f"{100 * packed['tokens'] / packed['positions']:.0f}% / {100 * padded['tokens'] / padded['positions']:.0f}%")
    n_assist = sum(sum(t != -1 for t in y) for _, y in examples)
    row("sft", "assistant tokens among all tokens of the data", f"{100 * n_assist / sum(len(x) for x, _ in examples):.0f}%")


def bench_sft_builtin(quick: bool) -> None:
    """The built-in task (python sft.py at its defaults): exact match before/after and wall
    time, with the process CPU time beside it (on a shared machine wall time mostly measures
    the other jobs)."""
    import sft

    if quick:
        args = ["--base_iters", "20", "--max_iters", "20", "--n_train", "200", "--n_test", "20",
                "--base_layer", "1", "--base_embd", "32", "--base_head", "2", "--eval_interval", "20"]
    else:
        args = []
    with tempfile.TemporaryDirectory() as out:
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = sft.main(args + ["--out_dir", out])
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    row("sft", f"built-in task{' (quick)' if quick else ''}: exact match before / after SFT",
        f"{100 * result['accuracy_before']:.1f}% / {100 * result['accuracy_after']:.1f}%")
    row("sft", f"built-in task: wall time (pretraining the base + SFT, {torch.get_num_threads()} threads)",
        f"{wall:.0f} s ({cpu:.0f} s of CPU, load average {os.getloadavg()[0]:.1f})")


# ----------------------------------------------------------------------------------------
# llama (from the part that teaches it)


# (hidden, layers, heads, kv heads, intermediate, vocab, tied, rope theta)
LLAMA_3_2_1B = (2048, 16, 32, 8, 8192, 128256, True, 500000.0)

SMOLLM2_135M = (576, 30, 9, 3, 1536, 49152, True, 100000.0)

LLAMA_3_8B = (4096, 32, 32, 8, 14336, 128256, False, 500000.0)

LLAMA_3_70B = (8192, 80, 64, 8, 28672, 128256, False, 500000.0)

def llama_config(shape, block_size=2048):
    import gpt

    hidden, layers, heads, kv, inter, vocab, tied, theta = shape
    return gpt.llama_config(block_size=block_size, vocab_size=vocab, n_layer=layers, n_head=heads, n_kv_head=kv,
                            n_embd=hidden, mlp_hidden=inter, tie_embeddings=tied, rope_theta=theta, norm_eps=1e-5)

def hf_llama_config(shape, transformers, block_size=2048):
    hidden, layers, heads, kv, inter, vocab, tied, theta = shape
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                    max_position_embeddings=block_size, rms_norm_eps=1e-5, rope_theta=theta,
                                    tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=0)

def write_random_shards(config, folder: Path, shard_bytes=512 << 20) -> int:
    """Random bf16 weights of config as Hugging Face's sharded safetensors (+ index, config.json);
    one tensor at a time, so writing needs about one shard of memory. Returns the bf16 bytes."""
    import gpt
    import hf_io

    folder.mkdir(parents=True, exist_ok=True)
    shapes = {hf_io.to_hf_name(k, "llama"): tuple(p.shape) for k, p in gpt.empty_model(config).named_parameters()}
    shards, current, size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.normal_(0, 0.02) if len(shape) == 2 else t.fill_(1.0)
        current[name], size = t, size + t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        hf_io.write_safetensors(folder / fname, shard)
        weight_map.update({k: fname for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    hidden, layers, heads, kv, inter, vocab, tied, theta = config_shape(config)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied, "rope_theta": theta,
        "rms_norm_eps": 1e-5, "max_position_embeddings": config.block_size, "hidden_act": "silu",
        "torch_dtype": "bfloat16"}))
    return total

def config_shape(c):
    return (c.n_embd, c.n_layer, c.n_head, c.kv_heads, c.mlp_hidden, c.vocab_size, c.tie_embeddings, c.rope_theta)

LOAD_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
if {who!r} == "ours":
    import gpt
    load = lambda: gpt.load_pretrained({folder!r})[0]
else:
    import transformers
    load = lambda: transformers.LlamaForCausalLM.from_pretrained({folder!r}, dtype=torch.bfloat16)
from bench import status_kib
open("/proc/self/clear_refs", "w").write("5")  # this process's own peak from here (bench.status_kib says why)
base = status_kib("VmRSS")  # the interpreter and the imports
t0 = time.perf_counter()
model = load()
wall = time.perf_counter() - t0
assert {{p.dtype for p in model.parameters()}} == {{torch.bfloat16}}
n = sum(p.numel() for p in model.parameters())
print(json.dumps(dict(wall=wall, peak_kib=status_kib("VmHWM"), base_kib=base, params=n)))
"""

def load_in_fresh_process(who, folder):
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT.format(root=str(ROOT), who=who, folder=str(folder))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

def bench_load(quick):
    try:
        import transformers  # noqa: F401
        peers = ("ours", "hf")
    except ImportError:
        peers = ("ours",)
    shape = (256, 2, 4, 2, 512, 4096, True, 500000.0) if quick else LLAMA_3_2_1B
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        nbytes = write_random_shards(llama_config(shape), Path(tmp), shard_bytes=(1 << 20) if quick else 512 << 20)
        name = f"{nbytes / 2 / 1e9:.2f}B-param Llama, bf16, {len(list(Path(tmp).glob('*.safetensors')))} shards"
        row("llama", f"write {name}", f"{time.perf_counter() - t0:.1f} s")
        runs = {who: [] for who in peers}
        for _ in range(2 if quick else 3):  # interleaved: ours, hf, ours, hf, ...
            for who in peers:
                runs[who].append(load_in_fresh_process(who, tmp))
        for who in peers:
            wall = statistics.median(r["wall"] for r in runs[who])
            peak = statistics.median(r["peak_kib"] for r in runs[who]) * 1024
            base = statistics.median(r["base_kib"] for r in runs[who]) * 1024
            label = "gpt.load_pretrained" if who == "ours" else "transformers from_pretrained"
            row("llama", f"load {label}: wall", f"{wall:.2f} s")
            row("llama", f"load {label}: peak RSS / bf16 bytes (goal <= 1.3x)",
                f"{peak / nbytes:.2f}x ({peak / 2**30:.2f} GiB; imports before loading {base / 2**30:.2f} GiB, "
                f"load alone {(peak - base) / nbytes:.2f}x)")
        if len(peers) == 2:
            ratio = statistics.median(r["wall"] for r in runs["hf"]) / statistics.median(r["wall"] for r in runs["ours"])
            row("llama", "load wall: transformers / ours", f"{ratio:.2f}x")

def bench_decode(quick):
    import gpt
    import sample

    torch.manual_seed(0)
    shape = (64, 2, 4, 2, 128, 512, True, 100000.0) if quick else SMOLLM2_135M
    prompt_len, new_tokens, repeat = (8, 16, 2) if quick else (32, 256, 3)
    model = gpt.GPT(llama_config(shape)).eval()
    with torch.no_grad():
        for p in model.parameters():  # std 0.02 gives near-uniform logits: make greedy tokens vary
            p.normal_(0, 0.1) if p.dim() == 2 else None
    n_params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, shape[5], (1, prompt_len), generator=torch.Generator().manual_seed(1))

    def ours():
        out = []
        for tok in sample.generate(model, prompt, new_tokens, temperature=0):
            out.append(int(tok))
            if len(out) == 1:
                t_first = time.perf_counter()
        return time.perf_counter() - t_first, out

    try:
        import transformers
        hf = transformers.LlamaForCausalLM(hf_llama_config(shape, transformers)).eval()
        hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    except ImportError:
        hf = None
    sample.decode_layout(model)  # as sample.py's CLI does for batch-1 decode on CPU (after HF's copy)

    def theirs():
        # decode time = all new tokens minus one prefill (timed alone: max_new_tokens=1)
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False)
            t2 = time.perf_counter()
        return (t2 - t1) - (t1 - t0), out[0, prompt_len:].tolist()

    # the bound: a 1-row fp32 product over as many weights as the model has, in the faster layout
    bound_ms = min(median_ms(product, repeat=5) for product in bound_products(n_params))
    ours(), theirs() if hf is not None else None  # warm-up
    times = {"ours": [], "hf": []}
    for _ in range(repeat):
        s, ours_out = ours()
        times["ours"].append(s)
        if hf is not None:
            s, hf_out = theirs()
            times["hf"].append(s)
    steps = new_tokens - 1
    name = "SmolLM2-135M-shaped" if not quick else "tiny Llama"
    ours_tps = steps / statistics.median(times["ours"])
    row("llama", f"memory bound: 1-row fp32 product over {n_params / 1e6:.0f}M weights", f"{bound_ms:.2f} ms ({1e3 / bound_ms:.1f} tok/s)")
    row("llama", f"{name} B=1 decode {new_tokens} tok, sample.generate", f"{ours_tps:.1f} tok/s ({ours_tps * bound_ms / 1e3:.0%} of the bound)")
    if hf is not None:
        hf_tps = steps / statistics.median(times["hf"])
        row("llama", f"{name} B=1 decode, LlamaForCausalLM.generate (same tokens: {ours_out == hf_out})",
            f"{hf_tps:.1f} tok/s ({hf_tps * bound_ms / 1e3:.0%} of the bound)")
        row("llama", f"{name} B=1 decode: ours / transformers", f"{ours_tps / hf_tps:.2f}x")

def bench_kv_and_paper():
    import sample

    smol = llama_config(SMOLLM2_135M)
    gqa, full = sample.kv_bytes_per_token(smol, torch.bfloat16), sample.kv_bytes_per_token(smol, torch.bfloat16, smol.n_head)
    row("llama", "SmolLM2-135M KV cache per token, bf16: GQA (3 kv heads) / full (9)",
        f"{gqa:,} / {full:,} bytes ({full / gqa:.0f}x; 8192 tokens: {gqa * 8192 / 2**20:.0f} vs {full * 8192 / 2**20:.0f} MiB)")

    nf4_bytes = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax

    def shapes(shape):
        hidden, layers, heads, kv, inter, vocab, tied, _ = shape
        hd = hidden // heads
        proj = [(hidden, heads * hd), (hidden, kv * hd), (hidden, kv * hd), (heads * hd, hidden),
                (hidden, inter), (hidden, inter), (inter, hidden)]  # q k v o gate up down: (in, out)
        linear = layers * sum(i * o for i, o in proj)
        embed = vocab * hidden * (1 if tied else 2)
        norms = (2 * layers + 1) * hidden
        return proj, layers, linear, embed, norms

    for label, shape, r in (("Llama-3-8B", LLAMA_3_8B, 16), ("Llama-3-70B", LLAMA_3_70B, 16)):
        proj, layers, linear, embed, norms = shapes(shape)
        lora = layers * sum(r * (i + o) for i, o in proj)
        frozen = linear * nf4_bytes + (embed + norms) * 2  # NF4 linears; embedding, head, norms bf16
        train = lora * (4 + 4 + 8)  # fp32 adapter weights, gradients, Adam's two moments
        if label == "Llama-3-8B":
            row("llama", f"{label} QLoRA r={r}, on paper: NF4 linears + bf16 embed/head",
                f"{frozen / 2**30:.1f} GiB frozen (bf16: {(linear + embed + norms) * 2 / 2**30:.1f} GiB) "
                f"+ {train / 2**30:.2f} GiB LoRA params/grads/Adam ({lora / 1e6:.0f}M)")
        else:
            row("llama", f"{label} FSDP2+QLoRA r={r} on 8 GPUs, on paper, per GPU",
                f"{frozen / 8 / 2**30:.1f} GiB frozen + {train / 8 / 2**30:.2f} GiB LoRA params/grads/Adam "
                f"(whole model {frozen / 2**30:.1f} GiB; activations and the gathered layer not counted)")

def bench_llama(args) -> None:
    """The Llama family: ~1B bf16 sharded load vs transformers, SmolLM2-135M-shaped batch-1
    decode vs transformers and vs the memory bound, GQA KV bytes, 8B/70B QLoRA memory on paper."""
    quick = getattr(args, "quick", args)
    bench_kv_and_paper()
    bench_decode(quick)
    bench_load(quick)

SECTIONS = {"train": bench_train, "bpb": bench_bpb, "loss": bench_loss, "sample": bench_sample, "bpe": bench_bpe, "nf4": bench_nf4,
            "lora": bench_lora, "fsdp2": bench_fsdp2, "dpo": bench_dpo, "moe": bench_moe, "hellaswag": bench_hellaswag,
            "flash": bench_flash, "serve": bench_serve, "export": bench_export, "research": bench_research, "sft": bench_sft, "llama": bench_llama}


# ----------------------------------------------------------------------------------------
# gpu: the CUDA check, one short go on a GPU machine (`--dry-run` proves its code paths on CPU)

GPU_SECTIONS = ("nf4", "train", "sample", "loss", "fsdp2")


def bench_gpu(quick: bool, dry_run: bool = False) -> None:
    """Every CUDA figure in one table, then `pytest -m gpu` (the CUDA-only tests); a failing
    part is reported and makes the run exit non-zero, the other parts still run."""
    if not dry_run and not torch.cuda.is_available():
        raise NanoError("bench.py gpu needs a CUDA GPU (use --dry-run to check its code paths on CPU)")
    failures = []
    parts = [(name, SECTIONS[name]) for name in GPU_SECTIONS if name in SECTIONS] + GPU_EXTRAS
    for name, fn in parts:
        try:
            fn(quick or dry_run)
        except Exception as e:  # one failing part must not hide the others' figures
            row("gpu", f"{name} FAILED", f"{e.__class__.__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
            failures.append(name)
    pytest_args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if dry_run:
        pytest_args.append("--collect-only")
    done = subprocess.run(pytest_args, cwd=ROOT, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    row("gpu", "pytest -m gpu" + (" --collect-only" if dry_run else ""), last)
    if done.returncode not in (0, 5):  # 5: no test collected (no CUDA-only test selected)
        failures.append("pytest -m gpu")
    if failures:
        raise NanoError(f"gpu check failed in: {', '.join(failures)}")


GPU_EXTRAS = [("flash", bench_flash_gpu), ("moe", bench_moe_gpu)]  # GPU parts that are not plain sections: (name, fn(quick))


@cli
def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="sections: " + ", ".join(SECTIONS) + ", gpu")
    parser.add_argument("sections", nargs="*", help="sections to run (default: every section but gpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark code itself")
    parser.add_argument("--dry-run", action="store_true", help="with gpu: check every import and path on CPU")
    parser.add_argument("--nanogpt", default="", help="train: a karpathy/nanoGPT checkout to run side by side "
                                                      "with train.py (default: none, that part is skipped)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    names = args.sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS and n != "gpu"]
    if unknown:
        raise NanoError(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)}, gpu)")
    print(f"{'section':<10} {'what':<62} figure")
    for name in names:
        if name == "gpu":
            bench_gpu(args.quick, args.dry_run)
        elif name == "train":
            bench_train(args.quick, args.nanogpt)
        else:
            SECTIONS[name](args.quick)


if __name__ == "__main__":
    main()
