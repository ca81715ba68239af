"""bench rl: rl.py's built-in task end to end with
GRPO and PPO (held-out exact match before / after, wall and CPU time), where one RL step's time goes
(rollout, scoring, log-probs of the old policy and the reference, the update), and rollout tokens/s
against training tokens/s on a GPT-2-124M-shaped model, where generation is what RL waits for.

Run: python -m bench rl [--quick]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from .util import row


def run_builtin(algo, task_ckpt, out, quick):
    """rl.main on the built-in task, quietly; (result, wall s, CPU s, its metrics rows)."""
    import rl

    args = ["--algo", algo, "--task_ckpt", str(task_ckpt), "--out_dir", str(out), "--plot", "False"]
    if quick:
        args += ["--steps", "4", "--prompts_per_step", "4", "--num_generations", "4", "--n_test", "16",
                 "--eval_interval", "4", "--log_interval", "2"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = rl.main(args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return result, wall, cpu, [r for r in rows if "time/rollout" in r]


def time_shares(rows):
    """Seconds per step spent in each phase, averaged over the logged intervals."""
    keys = ["time/rollout", "time/score", "time/logps", "time/train"]
    return {k.removeprefix("time/"): sum(r[k] for r in rows) / len(rows) for k in keys}


def bench_builtin(quick):
    import reward

    with tempfile.TemporaryDirectory() as tmp:
        t0, cpu0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            task_ckpt = reward.task_sft_model(Path(tmp) / "sft.pt", "cpu", iters=20 if quick else 1500)
        row("rl", f"built-in task: training its SFT model ({torch.get_num_threads()} threads)",
            f"{time.perf_counter() - t0:.0f} s ({time.process_time() - cpu0:.0f} s of CPU)")
        for algo in ("grpo", "ppo"):
            result, wall, cpu, rows = run_builtin(algo, task_ckpt, Path(tmp) / algo, quick)
            first, last = result["first"]["eval/exact_match"], result["last"]["eval/exact_match"]
            row("rl", f"{algo}{' (quick)' if quick else ''}: held-out exact match before / after",
                f"{100 * first:.1f}% / {100 * last:.1f}% ({100 * (last - first):+.1f} points)")
            row("rl", f"{algo}: wall time of the RL run (load average {os.getloadavg()[0]:.1f})",
                f"{wall:.0f} s ({cpu:.0f} s of CPU)")
            shares = time_shares(rows)
            total = sum(shares.values())
            row("rl", f"{algo}: one step, where the time goes ({1000 * total:.0f} ms)",
                ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shares.items()))
            row("rl", f"{algo}: rollout / training tokens/s (task model, 2L/128)",
                f"{sum(r['rollout_tok_per_s'] for r in rows) / len(rows):,.0f} / "
                f"{sum(r['train_tok_per_s'] for r in rows) / len(rows):,.0f}")


def bench_rollout_vs_training(quick):
    """A batch of completions generated (rl.rollout: KV-cached, one token per forward) against the same
    tokens trained on (rl.token_logps forward + backward): tokens/s of each."""
    import gpt
    import rl

    if quick:
        name, (L, H, C, V), B, P, N = "tiny (2L/2H/32, V=512)", (2, 2, 32, 512), 4, 16, 8
    else:
        name, (L, H, C, V), B, P, N = "gpt2-124M shape (random weights)", (12, 12, 768, 50304), 16, 64, 32
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=P + N, vocab_size=V, n_layer=L, n_head=H, n_embd=C, dropout=0.0)).eval()
    prompts = torch.randint(V, (B, P)).tolist()
    rl.rollout(model, prompts, 2, 1.0, None, 0, V)  # warm-up
    t0 = time.perf_counter()
    ro = rl.rollout(model, prompts, N, 1.0, None, 0, V)
    gen = time.perf_counter() - t0
    logps, _ = rl.token_logps(model, ro, 1.0)  # warm-up
    logps.sum().backward()
    t0 = time.perf_counter()
    logps, _ = rl.token_logps(model, ro, 1.0)
    logps.sum().backward()
    train = time.perf_counter() - t0
    row("rl", f"{name}, {B} x ({P} prompt + {N} new): rollout / train tokens/s",
        f"{B * N / gen:,.0f} / {B * N / train:,.0f} completion tokens/s ({train / gen:.2f}x)")


def bench_rl(quick: bool) -> None:
    bench_builtin(quick)
    bench_rollout_vs_training(quick)
