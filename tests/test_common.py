"""common.py: atomic writes (stale temps of killed runs, a full disk or an unwritable path as one
line, the old file kept) and the dataclass CLI's bare boolean flags."""

import errno
import os
import shutil
from dataclasses import dataclass

import pytest

import common
from common import NanoError

DEAD_PID = 2**22 + 4321  # above the kernel's default pid_max: no process has it


def test_atomic_write_removes_the_temps_of_killed_runs(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    assert not common.pid_alive(DEAD_PID) and common.pid_alive(os.getpid())
    (tmp_path / f".ckpt.pt.tmp{DEAD_PID}").write_bytes(b"half a checkpoint")
    (tmp_path / f".ckpt.pt.tmp{os.getppid()}").write_bytes(b"a live writer's")  # alive: kept
    (tmp_path / f".other.pt.tmp{DEAD_PID}").write_bytes(b"another file's")  # not this path's: kept
    common.atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new"
    assert f"removed {tmp_path / f'.ckpt.pt.tmp{DEAD_PID}'}, left by an interrupted run (pid {DEAD_PID} is gone)" \
        in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt.pt", f".ckpt.pt.tmp{os.getppid()}", f".other.pt.tmp{DEAD_PID}"])


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")])
def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    if isinstance(error, RuntimeError):  # torch.save says only "unexpected pos": the free space tells
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 3 << 20))

    def write(tmp):
        tmp.write_bytes(b"ne")
        raise error

    with pytest.raises(NanoError, match=r"^no space left on device writing .*ckpt.pt \(free \d+ MB; free some space"):
        common.atomic_write(path, write)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_an_unwritable_path_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NanoError, match=r"^cannot write .*file/ckpt.pt \(.*; pick a writable path\)$"):
        common.atomic_write(tmp_path / "file" / "ckpt.pt", lambda tmp: tmp.write_bytes(b"new"))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error is not hidden
        common.atomic_write(tmp_path / "ok.pt", lambda tmp: (_ for _ in ()).throw(RuntimeError("a bug")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_bare_boolean_flags():
    @dataclass
    class C:
        force: bool = False
        compile: bool = True

    assert common.parse_config(C, ["--force"]) == C(True, True)
    assert common.parse_config(C, ["--force", "--compile", "False"]) == C(True, False)
    assert common.parse_config(C, ["--force", "False"]) == C(False, True)


def test_a_failed_run_keeps_the_last_good_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with common.MetricsLog(path) as log:
        log.log({"iter": 1, "loss": 2.0})
    assert path.read_text() == '{"iter": 1, "loss": 2.0}\n' and not (tmp_path / "metrics.jsonl.new").exists()
    with pytest.raises(NanoError, match="no space left on device"):
        with common.MetricsLog(path) as log:
            log.log({"iter": 1, "loss": 3.0})  # read live from metrics.jsonl.new
            assert (tmp_path / "metrics.jsonl.new").read_text() == '{"iter": 1, "loss": 3.0}\n'
            raise common.write_error(path, OSError(errno.ENOSPC, "No space left on device"))
    assert path.read_text() == '{"iter": 1, "loss": 2.0}\n'  # the last good run's log survives
