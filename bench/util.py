"""The helpers every bench section shares: the output row, interleaved timing, peak memory of a
child process, the GPT-2 shapes of the decode benches, and train.py runs in subprocesses.

Importing this module points tiktoken at the shipped GPT-2 BPE files (assets/), so no section
needs the network for GPT-2's tokenizer."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: the scripts bench measures
SHARED_DATA = ROOT / "assets"  # the shipped offline copies (Tiny Shakespeare, GPT-2's BPE files)
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from common import NanoError  # noqa: E402  (after the environment above)


def row(section: str, what: str, figure: str):
    print(f"{section:<10} {what:<62} {figure}", flush=True)


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


def status_kib(key: str) -> int:
    """This process's VmRSS (resident now) or VmHWM (peak since the last reset, which writing "5"
    to /proc/self/clear_refs does) in KiB. getrusage's ru_maxrss would include the parent's size
    at fork time (Linux keeps it across exec): children measure their own peak with this instead."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))


def run_child(name: str, *args) -> str:
    """Run bench/children/<name>.py in a fresh Python process (its own peak memory, nothing
    freed by an earlier run to reuse) and return its stdout; it prints its result last."""
    argv = [sys.executable, "-m", f"bench.children.{name}", *map(str, args)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise NanoError(f"bench child {name} {' '.join(map(str, args))} failed: "
                        f"{(done.stderr.strip().splitlines() or ['no output'])[-1]} "
                        f"(run `python -m bench.children.{name}` with those arguments to see why)")
    return done.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------
# model shapes of the decode benches (sample, serve, llama)


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


# ----------------------------------------------------------------------------------------
# train.py in its own processes, as a user runs it (train, its nanoGPT comparison, bpb)


NANOGPT_CPU_RUN = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--batch_size", "12",
                   "--max_iters", "2000", "--lr_decay_iters", "2000", "--learning_rate", "1e-3", "--dropout", "0.0",
                   "--eval_iters", "20", "--log_interval", "1", "--device", "cpu", "--compile", "False"]
SEEDS = (1337, 1, 2)  # one run's final val loss moves by ~+-0.01 with the seed (20 eval batches)
EVAL_INTERVAL = 250  # nanoGPT's config/train_shakespeare_char.py and train.py's default


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
