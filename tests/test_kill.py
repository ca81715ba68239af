"""kill -9 at random moments during saves (export to HF and GGUF, dpo.py and sft.py runs): every
output is the old file or the new one, never half of one, and the next run removes what the
killed one left behind (its temp files, a half-swapped folder). Slow: real processes, many kills."""

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpt
import hf_io

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def killed_at(args, delay, cwd):
    """Run `python args...`, kill -9 it after `delay` seconds (if still running): did it finish?"""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return proc.returncode == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old" in p.name or p.name.endswith(".new"))


def check_hf(folder: Path):
    header, _ = hf_io.safetensors_header(folder / "model.safetensors")  # whole and consistent, or refused
    assert header and (folder / "config.json").read_text().strip().endswith("}")


def check_gguf(path: Path):
    gguf = pytest.importorskip("gguf", reason="gguf-py reads the file back")
    assert len(gguf.GGUFReader(str(path)).tensors) > 0


@pytest.mark.parametrize("to", ["hf", "gguf"])
def test_export_survives_kills(tmp_path, to):
    config = gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=64)
    ckpt = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(ckpt, gpt.GPT(config), "char:" + "".join(chr(32 + i) for i in range(65)))
    out = tmp_path / ("m.gguf" if to == "gguf" else "hf")
    check = check_gguf if to == "gguf" else check_hf
    args = [str(ROOT / "export.py"), "--ckpt", str(ckpt), "--to", to, str(out), "--force"]
    assert killed_at(args, 120, tmp_path)
    rng, kills = random.Random(0), 0
    for _ in range(12):
        if not killed_at(args, rng.uniform(0.5, 4.0), tmp_path):
            kills += 1
        if out.exists():  # the old export or the new one, whole
            check(out)
    assert killed_at(args, 120, tmp_path)  # the next run cleans up what the kills left
    check(out)
    assert temps(tmp_path) == [] and kills > 0


@pytest.mark.parametrize("script", ["dpo", "sft"])
def test_training_runs_survive_kills(tmp_path, script):
    out = tmp_path / "out"
    if script == "dpo":
        args = [str(ROOT / "dpo.py"), "--pretrain_iters", "0", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                "--n_pairs", "64", "--batch_size", "8", "--max_iters", "6", "--device", "cpu", "--out_dir", str(out)]
    else:
        args = [str(ROOT / "sft.py"), "--base_layer", "1", "--base_iters", "5", "--n_train", "200", "--n_test", "10",
                "--max_iters", "6", "--eval_interval", "3", "--device", "cpu", "--out_dir", str(out)]
    assert killed_at(args, 300, tmp_path)
    good_metrics = (out / "metrics.jsonl").read_text()
    rng, kills = random.Random(1), 0
    for _ in range(8):
        t0 = time.monotonic()
        if not killed_at(args, rng.uniform(1.0, 8.0), tmp_path):
            kills += 1
        gpt.load_checkpoint(out / "ckpt.pt")  # never half a checkpoint
        metrics = (out / "metrics.jsonl").read_text()  # never a half run's log over the last good one
        assert metrics.endswith("\n") and len(metrics.splitlines()) == len(good_metrics.splitlines())
        assert time.monotonic() - t0 < 300
    assert killed_at(args, 300, tmp_path)
    assert temps(out) == [] and kills > 0
