"""plot.py: reading metrics.jsonl (half-written lines, resumed runs), pictures of several runs,
the CLI, and one-line errors (a missing matplotlib included)."""

import json
import sys

import pytest

import plot
from common import NanoError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_rows(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def fake_run(n=40, lr=1e-3, scale=1.0):
    """Rows the way train.py writes them: evaluations, and log steps with lr and throughput."""
    rows = []
    for it in range(0, n + 1, 10):
        rows.append({"iter": it, "train_loss": scale * (4 - it / 20), "val_loss": scale * (4.1 - it / 22)})
        if it:
            rows.append({"iter": it, "loss": scale * (4 - it / 21), "lr": lr * (1 - it / (2 * n)),
                         "tokens_per_s": 5000.0 + it, "tokens": it * 768})
    return rows


def png_size(path):
    """(width, height) from the PNG header's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_read_metrics_skips_half_written_last_line_and_renames_aliases(tmp_path):
    path = write_rows(tmp_path / "m.jsonl", fake_run(), tail='{"iter": 50, "loss": 1.2')
    rows = plot.read_metrics(path)
    assert rows[-1]["iter"] == 40 and len(rows) == len(fake_run())
    assert all("tokens_per_s" not in r for r in rows) and any("tok_per_s" in r for r in rows)


def test_read_metrics_keeps_the_rows_of_a_resumed_run(tmp_path):
    """Killed after iter 30, resumed from the iter-20 checkpoint: iters 20..30 are logged twice;
    the curve must follow the second pass, not zigzag back."""
    first = [{"iter": i, "loss": 5.0 - i / 10} for i in (0, 10, 20, 30)]
    second = [{"iter": i, "loss": 1.0 - i / 100} for i in (20, 30, 40)]
    rows = plot.read_metrics(write_rows(tmp_path / "m.jsonl", first + second))
    assert [(r["iter"], r["loss"]) for r in rows] == [(0, 5.0), (10, 4.0), (20, 0.8), (30, 0.7), (40, 0.6)]


@pytest.mark.parametrize("text,match", [
    ('{"iter": 1}\nnot json\n{"iter": 2}\n', r"line 2 is not JSON"),
    ('[1, 2]\n{"iter": 2}\n', r"line 1 is not a JSON object"),
    ("\n\n", "holds no metrics rows"),
])
def test_read_metrics_bad_files(tmp_path, text, match):
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(NanoError, match=match):
        plot.read_metrics(path)
    with pytest.raises(NanoError, match="not found"):
        plot.read_metrics(tmp_path / "absent.jsonl")


def test_plot_runs_draws_several_runs_in_small_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py needs matplotlib to draw")
    runs = {"lr 1e-3": fake_run(lr=1e-3), "lr 3e-3": fake_run(lr=3e-3, scale=0.9)}
    out = plot.plot_runs(runs, tmp_path / "sub" / "cmp.png", x="tokens", title="two runs")
    w, h = png_size(out)
    assert w > 2.5 * h  # three panels side by side: loss, lr, tokens/s
    assert out.stat().st_size < 150_000
    assert not list(out.parent.glob(".*tmp*"))  # the temp file was renamed away
    # only the keys asked for: one panel
    one = plot.plot_runs(runs, tmp_path / "val.png", keys=("val_loss",))
    assert png_size(one)[0] < w / 2


def test_plot_runs_errors(tmp_path):
    with pytest.raises(NanoError, match=r"must end in .png, .svg or .pdf"):
        plot.plot_runs({"a": fake_run()}, tmp_path / "a.jpeg")
    with pytest.raises(NanoError, match="unknown x axis 'time'"):
        plot.plot_runs({"a": fake_run()}, tmp_path / "a.png", x="time")
    no_tokens = [{k: v for k, v in r.items() if k != "tokens"} for r in fake_run()]
    with pytest.raises(NanoError, match=r"run 'a' has no 'tokens'"):
        plot.plot_runs({"a": no_tokens}, tmp_path / "a.png", x="tokens")
    with pytest.raises(NanoError, match="the runs hold none of"):
        plot.plot_runs({"a": [{"iter": 1, "hellaswag_acc": 0.3}]}, tmp_path / "a.png")


def test_missing_matplotlib_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(NanoError, match=r"needs matplotlib \(pip install matplotlib\)"):
        plot.plot_runs({"a": fake_run()}, tmp_path / "a.png")
    path = write_rows(tmp_path / "run" / "metrics.jsonl", fake_run())
    with pytest.raises(SystemExit, match=r"^error: plotting needs matplotlib \(pip install matplotlib\)$"):
        plot.main([str(path)])


def test_main_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot.py needs matplotlib to draw")
    a = write_rows(tmp_path / "out-a" / "metrics.jsonl", fake_run())
    b = write_rows(tmp_path / "out-b" / "metrics.jsonl", fake_run(scale=0.8))
    out = plot.main([str(a), str(b), "-o", str(tmp_path / "ab.png"), "--logy", "True"])
    assert out == tmp_path / "ab.png" and png_size(out)[0] > 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert plot.main([str(a)]) == a.parent / "loss.png"  # default: beside the first file
    assert plot.run_name(a, {}) == "out-a" and plot.run_name(a, {"out-a": []}) == "out-a #2"
    with pytest.raises(SystemExit, match="error: --names has 1 names for 2 files"):
        plot.main([str(a), str(b), "--names", "only"])
    with pytest.raises(SystemExit, match="error: no metrics files given"):
        plot.main(["-o", "x.png"])


def test_plots_a_real_train_py_run(tmp_path, char_data):
    pytest.importorskip("matplotlib", reason="plot.py needs matplotlib to draw")
    import train

    out_dir = tmp_path / "out"
    train.main(["--dataset", "shakespeare_char", "--data_root", str(tmp_path / "data"),
                "--input", str(tmp_path / "shakespeare_100k.txt"), "--out_dir", str(out_dir),
                "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4",
                "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "1", "--log_interval", "2",
                "--sample_tokens", "0", "--device", "cpu"])
    rows = plot.read_metrics(out_dir / "metrics.jsonl")
    assert {"val_loss", "lr", "tok_per_s"} <= {k for r in rows for k in r}
    png = plot.main([str(out_dir / "metrics.jsonl"), "-o", str(tmp_path / "train.png")])
    assert png_size(png)[0] > 3 * png_size(png)[1] * 0.8


def test_dpo_and_moe_rows_plot(tmp_path, capsys):
    """dpo.py logs TRL's names ("step", "eval/loss"); moe.py logs the MoE and the dense GPT in one
    file, each row naming its model: both plot as the scripts print it, one curve per model."""
    pytest.importorskip("matplotlib", reason="plot.py needs matplotlib to draw")
    dpo_rows = [{"step": 0, "eval/loss": 0.69}, {"step": 5, "loss": 0.6, "lr": 1e-4, "tokens_per_s": 900.0},
                {"step": 10, "eval/loss": 0.5}]
    rows = plot.read_metrics(write_rows(tmp_path / "out-dpo" / "metrics.jsonl", dpo_rows))
    assert [r["iter"] for r in rows] == [0, 5, 10] and rows[2]["val_loss"] == 0.5
    moe_rows = [{"model": m, "step": s, "val_loss": 4 - s / (10 if m == "moe" else 20)}
                for m in ("moe", "dense") for s in (0, 10, 20)]
    runs = plot.split_models("out-moe", moe_rows)
    assert list(runs) == ["out-moe moe", "out-moe dense"] and all(len(r) == 3 for r in runs.values())
    assert plot.split_models("out", fake_run()) == {"out": fake_run()}  # one model: one run
    for folder in ("out-dpo", "out-moe"):
        write_rows(tmp_path / "out-moe" / "metrics.jsonl", moe_rows)
        out = plot.main([str(tmp_path / folder / "metrics.jsonl")])
        assert out == tmp_path / folder / "loss.png" and png_size(out)[0] > 0
