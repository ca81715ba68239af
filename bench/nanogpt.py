"""train (with --nanogpt PATH): train.py against karpathy/nanoGPT's own train.py, run alternately
on nanoGPT's CPU config with the same seeds; final val loss as logged and on the whole val split,
ms/iter; then gpt.py's and nanoGPT's model.py fed the same weights and batches, and both steps
profiled op by op.

Run: python -m bench train --nanogpt PATH   (a checkout of https://github.com/karpathy/nanoGPT)"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pickle
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import common
import gpt
from common import NanoError

from .util import SEEDS, SHARED_DATA, median_excluding_evals, prepare_char_data, row, run_jobs, trainpy_job, trainpy_result

# nanoGPT's own command line for its CPU run (its README's "on a macbook" line, sized to
# train.py's defaults); --seed is ours: bench patches the scratch copy to read it.
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


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
    source = source.replace("\nconfig_keys = [", "\nseed = 1337  # bench: the seed as an option\nconfig_keys = [")
    (copy / "train.py").write_text(source)

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
    return torch.from_numpy(np.fromfile(bin_path, dtype=np.uint16).astype(np.int64))


def full_val_loss(state_dict: dict, val_bin: Path, gelu: str = "exact") -> float:
    """Mean loss of nanoGPT-CPU-shaped weights (either side's: the module names are the same)
    over every non-overlapping 64-character window of the val split: 111,540 scored positions,
    where the logged figure scores 20 random batches (15,360) and moves by ~+-0.01 with them."""
    import data
    import train

    model = gpt.GPT(gpt.GPTConfig(**NANOGPT_CPU_SHAPE, gelu=gelu))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})
    # train.py's --eval_full_val scores with the same function (the speedrun's clock stops on it)
    return train.whole_split_loss(model, data.TokenBins(val_bin.parent, "val"), 64)


def same_batches_as_nanogpt(checkout: Path, data_root: Path, steps: int) -> dict:
    """Where a final val loss gap can come from: gpt.py's model and optimizer against nanoGPT's
    model.py, started from the same weights and fed the same batches, the same LR schedule and
    clipping. Returns the largest |loss difference| over the steps, with the exact GELU (train.py's
    default, nanoGPT's: then only float rounding differs) and with GPT-2's tanh GELU, the final
    models' whole-val-split losses, and both steps profiled op by op (exact GELU)."""
    import copy

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
                jobs.append(trainpy_job(args + ["--seed", str(seed), "--compile", str(compile), "--preset", "nanogpt",
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
