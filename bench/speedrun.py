"""speedrun (with --nanogpt PATH): train.py --preset speedrun against karpathy/nanoGPT's own CPU
config (4L/4H/128, T=64, B=12, 2000 iters, shakespeare_char), run alternately, one thread each.
The clock is training time: the sum of each side's step times, evaluations left out (nanoGPT's
eval iterations count at its median step). The target is nanoGPT's final model scored on the
whole val split (train.whole_split_loss, the function train.py's speedrun evaluates with);
figures: train.py's time to that loss (goal <= 0.33x nanoGPT's time), train.py's loss at
nanoGPT's time (a run of the recipe sized to it), the lever table (each lever alone on nanoGPT's
recipe: time to the target), and a picture of val loss against training time.

Run: python -m bench speedrun --nanogpt PATH [--quick]   (PATH: a karpathy/nanoGPT checkout)"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import gpt

from .nanogpt import NANOGPT_ARGS, NANOGPT_CPU_SHAPE, full_val_loss, prepare_nanogpt
from .util import EVAL_INTERVAL, ROOT, SEEDS, SHARED_DATA, prepare_char_data, row, run_jobs

# Each lever alone on top of --preset nanogpt (the rest of nanoGPT's recipe unchanged)
LEVERS = {
    "llama block (RoPE, RMSNorm, SwiGLU)": ["--arch", "llama"],
    "muon (matrices), AdamW (rest)": ["--optimizer", "muon"],
    "wsd, 1-sqrt cooldown": ["--lr_schedule", "wsd", "--cooldown", "1-sqrt", "--min_lr", "0"],
    "qk-norm": ["--qk_norm", "True"],
    "relu^2 MLP": ["--gelu", "relu2"],
    "untied head + zero-init projections": ["--tie_embeddings", "False", "--zero_init", "True"],
    "learning rate 3e-3": ["--learning_rate", "3e-3", "--min_lr", "3e-4"],
}


def nanogpt_curve(stdout: str, eval_interval=EVAL_INTERVAL) -> list[tuple[int, float, float]]:
    """(iter, val loss as logged, training seconds) at each of nanoGPT's evaluations. Its line
    "iter k: ..., time Xms" times step k, which holds the evaluation when k is an eval iteration (and
    the warm-up at 0): those count at the median step."""
    ms = {int(m[1]): float(m[2]) for m in re.finditer(r"^iter (\d+): loss \S+, time ([\d.]+)ms", stdout, re.M)}
    median = statistics.median(v for k, v in ms.items() if k % eval_interval)
    clean = [median if k % eval_interval == 0 else ms[k] for k in sorted(ms)]
    evals = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step (\d+): train loss \S+, val loss ([\d.]+)", stdout, re.M)]
    return [(it, val, sum(clean[:it]) / 1000) for it, val in evals]


def trainpy_curve(out_dir: Path) -> list[tuple[int, float, float]]:
    """(iter, val loss, training seconds) from the eval rows of train.py's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [(r["iter"], r["val_loss"], r["time_s"]) for r in rows if "val_loss" in r]


def time_to(curve, target):
    """Training seconds at the first evaluation at or below target (None: never reached)."""
    return next((t for _, val, t in curve if val <= target), None)


def loss_at(curve, seconds):
    """The val loss of the last evaluation made within `seconds` of training."""
    return [val for _, val, t in curve if t <= seconds * 1.0001][-1]


def trainpy(args, out_dir: Path, tmp: Path):
    return [sys.executable, str(ROOT / "train.py"), "--dataset", "shakespeare_char", "--input",
            str(SHARED_DATA / "tinyshakespeare.txt"), "--data_root", str(tmp), "--out_dir", str(out_dir),
            "--sample_tokens", "0", "--device", "cpu", *args], ROOT


def in_parallel(groups: list[list], parallel: bool) -> list:
    """run_jobs over each group of jobs (a group's jobs one after another, alternating sides); the
    groups one after another, or side by side where parallel (a machine loaded by others: each
    process then gets its share of the cores, and the sides of a group still alternate)."""
    from concurrent.futures import ThreadPoolExecutor

    if not parallel:
        return [out for group in groups for out in run_jobs(group)]
    with ThreadPoolExecutor(len(groups)) as pool:
        return [out for outs in pool.map(run_jobs, groups) for out in outs]


def bench_speedrun(quick: bool, nanogpt: str, seeds=SEEDS, levers=True, equal_time=True, parallel=False,
                   plot="out-bench/speedrun.png"):
    """nanoGPT vs train.py --preset speedrun, alternately, one thread each (a loaded machine's
    cores are shared: more threads only wait on each other); see the module docstring. parallel:
    the seeds' pairs, the equal-time runs and the lever runs each side by side."""
    checkpoint_memory(quick)
    if not nanogpt:
        row("speedrun", "nanoGPT side by side: needs --nanogpt PATH (a karpathy/nanoGPT checkout)", "skipped")
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # the children's torch: one thread each
    iters, eval_interval = (40, 20) if quick else (2000, EVAL_INTERVAL)
    seeds = seeds[:1] if quick else seeds
    short = ["--max_iters", "16", "--eval_interval", "4"] if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copy = prepare_nanogpt(Path(nanogpt).expanduser().resolve(), tmp)
        prepare_char_data(tmp)
        val_dir = tmp / "shakespeare_char"
        steps = step_cpu_ms(copy, tmp, *((1, 2) if quick else (5, 10)))
        row("speedrun", "one step's thread CPU time: " + " / ".join(steps), " / ".join(f"{v:.1f}" for v in steps.values())
            + f" ms ({steps['train.py --preset speedrun'] / steps['nanoGPT']:.2f}x nanoGPT's)")
        groups, names = [], []
        for seed in seeds:  # alternately: the machine's drift hits both sides alike
            theirs = [sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                      f"--eval_interval={eval_interval}", f"--seed={seed}", f"--out_dir={tmp}/ng{seed}",
                      "--always_save_checkpoint=True"]
            groups.append([(theirs, copy), trainpy(["--preset", "speedrun", "--seed", str(seed), *short],
                                                   tmp / f"sr{seed}", tmp)])
            names += [("nanoGPT", seed), ("speedrun", seed)]
        outputs = dict(zip(names, in_parallel(groups, parallel)))
        curves = {"nanoGPT": {}, "speedrun": {}}
        target, ng_time = {}, {}
        for seed in seeds:
            curves["nanoGPT"][seed] = nanogpt_curve(outputs["nanoGPT", seed], eval_interval)
            curves["speedrun"][seed] = trainpy_curve(tmp / f"sr{seed}")
            saved = torch.load(tmp / f"ng{seed}" / "ckpt.pt", map_location="cpu", weights_only=False)
            target[seed] = full_val_loss(saved["model"], val_dir / "val.bin")
            ng_time[seed] = curves["nanoGPT"][seed][-1][2]
        report(seeds, curves, target, ng_time)
        if equal_time:  # the recipe given nanoGPT's whole time: its step time sets the iterations
            groups = []
            for seed in seeds:
                per_iter = curves["speedrun"][seed][-1][2] / curves["speedrun"][seed][-1][0]
                n = max(16, int(ng_time[seed] / per_iter))
                groups.append([trainpy(["--preset", "speedrun", "--seed", str(seed), "--max_iters", str(n),
                                        "--eval_interval", str(max(4, n // 12))], tmp / f"eq{seed}", tmp)])
            in_parallel(groups, parallel)
            eq = {seed: trainpy_curve(tmp / f"eq{seed}") for seed in seeds}
            losses = [loss_at(eq[s], ng_time[s]) for s in seeds]
            row("speedrun", "train.py's whole-val loss at nanoGPT's training time (recipe sized to it)",
                f"median {statistics.median(losses):.4f} vs nanoGPT's {statistics.median(target.values()):.4f} "
                f"({', '.join(f'{v:.4f}' for v in losses)})")
            curves["speedrun, nanoGPT's time"] = eq
        if levers:
            lever_table(seeds[0], target[seeds[0]], tmp, iters, quick, parallel)
        if plot:
            picture(curves, target, Path(plot))
            schedule_picture(Path(plot).with_name("lr_schedules.png"))


def report(seeds, curves, target, ng_time):
    row("speedrun", "nanoGPT CPU config: final val loss, whole val split, per seed",
        f"median {statistics.median(target.values()):.4f} ({', '.join(f'{target[s]:.4f}' for s in seeds)})")
    row("speedrun", "nanoGPT: training time (evals out), per seed",
        f"median {statistics.median(ng_time.values()):.1f} s ({', '.join(f'{ng_time[s]:.1f}' for s in seeds)})")
    reached = {s: time_to(curves["speedrun"][s], target[s]) for s in seeds}
    ratios = [reached[s] / ng_time[s] for s in seeds if reached[s] is not None]
    row("speedrun", "train.py --preset speedrun: time to nanoGPT's loss, per seed",
        ", ".join(f"{reached[s]:.1f} s" if reached[s] is not None else "not reached" for s in seeds))
    row("speedrun", "time to nanoGPT's final loss: train.py / nanoGPT (goal <= 0.33x)",
        f"median {statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})" if ratios else "not reached")
    final = [curves["speedrun"][s][-1] for s in seeds]
    row("speedrun", "train.py --preset speedrun: final whole-val loss, iters, time",
        f"median {statistics.median(f[1] for f in final):.4f} at {final[0][0]} iters, "
        f"{statistics.median(f[2] for f in final):.1f} s")


def lever_table(seed, target, tmp: Path, iters: int, quick: bool, parallel: bool):
    """Each lever alone on --preset nanogpt, nanoGPT's iterations, the whole val split scored
    every 100 iterations: time to nanoGPT's final loss over the time of --preset nanogpt's run
    in the same batch (nanoGPT's computation, by train.py)."""
    base = ["--preset", "nanogpt", "--seed", str(seed), "--eval_full_val", "True", "--max_iters", str(iters),
            "--eval_interval", str(4 if quick else 100), "--log_interval", "50"]
    variants = {"none (--preset nanogpt)": [], **LEVERS}
    in_parallel([[trainpy(base + args, tmp / f"lever{i}", tmp)] for i, args in enumerate(variants.values())], parallel)
    base_time = trainpy_curve(tmp / "lever0")[-1][2]
    for i, name in enumerate(variants):
        curve = trainpy_curve(tmp / f"lever{i}")
        reached = time_to(curve, target)
        row("speedrun", f"lever alone: {name}",
            (f"{reached / base_time:.2f}x the time to nanoGPT's loss" if reached is not None else "not reached")
            + f", final {curve[-1][1]:.4f}, {curve[-1][2] / curve[-1][0] * 1000:.1f} ms/iter")


def picture(curves, target, path: Path, xlabel="training time, s (evaluations left out, one thread)"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        row("speedrun", "picture", "skipped (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"nanoGPT": "tab:gray", "speedrun": "tab:red", "speedrun, nanoGPT's time": "tab:orange",
              "speedrun, 600 iters": "tab:orange"}
    for side, by_seed in curves.items():
        for i, (seed, curve) in enumerate(by_seed.items()):
            ax.plot([t for *_, t in curve], [v for _, v, _ in curve], "o-", ms=3, color=colors[side], alpha=0.8,
                    label=f"{side if side != 'speedrun' else 'train.py --preset speedrun'}" if i == 0 else None)
    ax.axhline(statistics.median(target.values()), color="k", ls=":", lw=1, label="nanoGPT's final loss (whole val)")
    ax.set(xlabel=xlabel, ylabel="val loss",
           title="Tiny Shakespeare, 4L/4H/128: nanoGPT vs train.py --preset speedrun", ylim=(1.4, 3.0))
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    row("speedrun", "picture: val loss against training time", str(path))


def step_cpu_ms(checkout: Path, data_root: Path, rounds=5, steps=10) -> dict:
    """Thread CPU ms of one training step (forward, backward, clip, optimizer), median over
    alternating rounds, in this process with one thread: nanoGPT's model.py + AdamW, train.py's
    --preset nanogpt, and --preset speedrun (its model and Muon). CPU time, not wall time, so a
    machine loaded by others changes it little: the speedrun's wall-time ratio on an idle machine
    is about its iterations x this ratio."""
    import contextlib
    import importlib.util
    import io
    import time

    import numpy as np

    import train

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    ng = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ng)
    ids = torch.from_numpy(np.fromfile(data_root / "shakespeare_char" / "train.bin", dtype=np.uint16).astype(np.int64))
    sides = {}
    with contextlib.redirect_stdout(io.StringIO()):
        model = ng.GPT(ng.GPTConfig(**NANOGPT_CPU_SHAPE))
        sides["nanoGPT"] = (model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"))
        for preset in ("nanogpt", "speedrun"):
            cfg, _ = train.parse_args(["--preset", preset])
            model = gpt.GPT(train.model_config(cfg, 65))
            opt = train.muon_optimizer(model, cfg) if cfg.optimizer == "muon" else \
                model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
            sides[f"train.py --preset {preset}"] = (model, opt)
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in sides}
    for _ in range(rounds + 1):  # the first round warms up
        for name, (model, opt) in sides.items():
            for _ in range(steps):
                starts = torch.randint(len(ids) - 65, (12,), generator=g)
                rows = torch.stack([ids[i:i + 65] for i in starts.tolist()])
                t0 = time.thread_time()
                model(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())[1].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                times[name].append(time.thread_time() - t0)
    return {name: statistics.median(t[steps:]) * 1000 for name, t in times.items()}


def checkpoint_memory(quick: bool):
    """--grad_checkpoint at the GPT-2 124M shape (T=256, B=2; --quick: a tiny one), each mode in a
    fresh process: the memory a forward pass keeps for backward (resident growth from before the
    forward to after it) and the median time of a forward + backward."""
    import json
    import subprocess

    res = {}
    for mode in ("plain", "checkpointed"):
        # large blocks mmapped, so freed memory leaves the resident set at once: it then tracks live tensors
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        done = subprocess.run([sys.executable, "-m", "bench.speedrun", "memory", mode, str(int(quick))], cwd=ROOT,
                              capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        res[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    plain, ckpt = res["plain"], res["checkpointed"]
    shape = "tiny" if quick else "124M, T=256, B=2"
    row("speedrun", f"--grad_checkpoint, {shape}: activation memory, plain -> checkpointed (goal <= 0.4x)",
        f"{plain['mib']:.0f} -> {ckpt['mib']:.0f} MiB ({ckpt['mib'] / plain['mib']:.2f}x)")
    row("speedrun", f"--grad_checkpoint, {shape}: forward + backward, plain -> checkpointed",
        f"{plain['ms']:.0f} -> {ckpt['ms']:.0f} ms ({ckpt['ms'] / plain['ms']:.2f}x)")


def memory_child(mode: str, quick: bool):
    import json
    import time

    import gpt
    import train

    from .util import status_kib

    torch.manual_seed(0)
    config = gpt.GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64) if quick else \
        gpt.GPTConfig(block_size=256)
    model = gpt.GPT(config)
    if mode == "checkpointed":
        train.checkpoint_blocks(model)
    x, y = torch.randint(0, config.vocab_size, (2, 2, config.block_size))
    times, kept = [], []
    for _ in range(3):
        before = status_kib("VmRSS")
        t0 = time.perf_counter()
        loss = model(x, y)[1]
        kept.append(status_kib("VmRSS") - before)  # what the forward keeps for backward (+ the loss)
        loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: later forwards measure alone
    print(json.dumps({"mib": statistics.median(kept) / 1024, "ms": statistics.median(times) * 1000}))


if __name__ == "__main__":  # python -m bench.speedrun memory plain|checkpointed 0|1
    memory_child(sys.argv[2], bool(int(sys.argv[3])))


def schedule_picture(path: Path, iters=2000, warmup=100):
    """The learning-rate schedules of --lr_schedule (common.schedule_lr) over one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import common

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, kw in (("cosine (nanoGPT's)", dict(schedule="cosine")),
                     ("wsd, linear cooldown (last 40%)", dict(schedule="wsd", cooldown_iters=int(0.4 * iters))),
                     ("wsd, 1-sqrt cooldown (last 40%)", dict(schedule="wsd", cooldown_iters=int(0.4 * iters),
                                                              cooldown="1-sqrt")),
                     ("constant", dict(schedule="constant"))):
        ax.plot([common.schedule_lr(it, max_lr=1.0, min_lr=0.1 if kw["schedule"] == "cosine" else 0.0,
                                    warmup_iters=warmup, decay_iters=iters, **kw) for it in range(iters)], label=name)
    ax.set(xlabel="iteration", ylabel="learning rate / max", title="--lr_schedule")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    row("speedrun", "picture: the learning-rate schedules", str(path))
