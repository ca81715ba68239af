"""The bench package's own code runs (tiny sizes); the figures themselves come from `python -m bench`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.__main__ import SECTIONS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # minutes even at --quick sizes: every section, each in its own processes
def test_every_section_runs_quick(capsys):
    main(["--quick"])
    out = capsys.readouterr().out
    for section in SECTIONS:
        if section != "gpu":  # not in the default run: its own tests below
            assert any(line.startswith(section) for line in out.splitlines()), section


def test_gpu_check_dry_run_on_cpu(capsys):
    main(["gpu", "--dry-run"])
    out = capsys.readouterr().out
    assert "FAILED" not in out and "pytest -m gpu --collect-only" in out, out
    for part in ("nf4", "train", "loss", "flash", "moe"):
        assert any(line.startswith(part) for line in out.splitlines()), part


def test_gpu_check_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real check would run")
    with pytest.raises(SystemExit, match="^error: python -m bench gpu needs a CUDA GPU"):
        main(["gpu"])


def test_help_and_unknown_section(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "sections:" in out
    assert all(f"  {name} " in out for name in SECTIONS)
    with pytest.raises(SystemExit, match="unknown section 'nope'"):
        main(["nope"])


def test_every_section_names_a_function():
    """The section list points at real functions (each imported, not run)."""
    import importlib

    for name, (target, what) in SECTIONS.items():
        module, function = target.split(".")
        assert callable(getattr(importlib.import_module(f"bench.{module}"), function)), name
        assert what and "\n" not in what


def test_python_m_bench_from_another_directory(tmp_path):
    """`python -m bench` as a user runs it, here from outside the repository (the bench finds the
    scripts it measures, and starts its child programs, from its own location)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: python -m bench" in done.stdout, done.stderr
