"""bench.py's own code runs (tiny sizes); the figures themselves come from `python bench.py`."""

import pytest

import bench


def test_every_section_runs_quick(capsys):
    bench.main(["--quick"])
    out = capsys.readouterr().out
    for section in bench.SECTIONS:
        assert any(line.startswith(section) for line in out.splitlines()), section


def test_unknown_section_is_a_one_line_error():
    with pytest.raises(SystemExit, match="unknown section 'nope'"):
        bench.main(["nope"])
