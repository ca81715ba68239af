"""bench.py's own code runs (tiny sizes); the figures themselves come from `python bench.py`."""

import pytest

import bench


@pytest.mark.slow  # ~7 minutes even at --quick sizes: every section, each in its own processes
def test_every_section_runs_quick(capsys):
    bench.main(["--quick"])
    out = capsys.readouterr().out
    for section in bench.SECTIONS:
        assert any(line.startswith(section) for line in out.splitlines()), section


def test_gpu_check_dry_run_on_cpu(capsys):
    bench.main(["gpu", "--dry-run"])
    out = capsys.readouterr().out
    assert "FAILED" not in out and "pytest -m gpu --collect-only" in out, out


def test_gpu_check_without_cuda_is_one_line(capsys):
    if bench.torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real check would run")
    with pytest.raises(SystemExit, match="^error: bench.py gpu needs a CUDA GPU"):
        bench.main(["gpu"])


def test_help_and_unknown_section(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "sections:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown section 'nope'"):
        bench.main(["nope"])
