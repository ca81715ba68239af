"""gpu: the CUDA check, one short go on a GPU machine: the parts of the sections that measure on
CUDA, in one table, then `pytest -m gpu` (the CUDA-only tests). A failing part is reported and
makes the run exit non-zero; the other parts still run. `--dry-run` runs the same functions on
CPU at their --quick sizes (the test suite does), and only collects the CUDA-only tests.

Run: python -m bench gpu [--quick]     (on a CUDA machine)
     python -m bench gpu --dry-run     (anywhere)"""

from __future__ import annotations

import subprocess
import sys

import torch

from common import NanoError

from . import flash, loss, moe, nf4, train
from .util import ROOT, row

# (name, fn(quick)): every function of the sections with a CUDA path. Not here: what measures on
# the CPU whatever the machine (train's --arch runs, sample, fsdp2's gloo runs)
GPU_PARTS = [("nf4", nf4.bench_nf4), ("train", train.bench_train_step), ("loss", loss.bench_loss),
             ("flash", flash.bench_flash_gpu), ("moe", moe.bench_moe_gpu)]


def bench_gpu(quick: bool, dry_run: bool) -> None:
    """Every CUDA figure in one table, then `pytest -m gpu` (the CUDA-only tests); a failing
    part is reported and makes the run exit non-zero, the other parts still run."""
    if not dry_run and not torch.cuda.is_available():
        raise NanoError("python -m bench gpu needs a CUDA GPU (use --dry-run to check its code paths on CPU)")
    # the CUDA-only tests run after the figures (they would share the GPU); a dry run only
    # collects them, which needs no GPU: that runs beside the parts
    tests = start_pytest(collect_only=True) if dry_run else None
    failures = []
    for name, fn in GPU_PARTS:
        try:
            fn(quick or dry_run)
        except Exception as e:  # one failing part must not hide the others' figures
            row("gpu", f"{name} FAILED", f"{e.__class__.__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
            failures.append(name)
    tests = tests or start_pytest(collect_only=False)
    stdout, _ = tests.communicate()
    last = (stdout.strip().splitlines() or ["(no output)"])[-1]
    row("gpu", "pytest -m gpu" + (" --collect-only" if dry_run else ""), last)
    if tests.returncode not in (0, 5):  # 5: no test collected (no CUDA-only test selected)
        failures.append("pytest -m gpu")
    if failures:
        raise NanoError(f"gpu check failed in: {', '.join(failures)}")


def start_pytest(collect_only: bool) -> subprocess.Popen:
    """`pytest -m gpu` (the tests marked gpu: CUDA only) in its own process; collect_only: list them."""
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    return subprocess.Popen(argv + (["--collect-only"] if collect_only else []), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
