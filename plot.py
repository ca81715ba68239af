"""Pictures of training runs, `python plot.py RUN.jsonl [RUN.jsonl ...] -o loss.png`: loss,
learning rate and throughput read from metrics.jsonl files.

Every training script here writes metrics.jsonl, one JSON object per line: evaluations
({"iter": 250, "train_loss": 1.91, "val_loss": 2.03}) and log steps ({"iter": 260, "loss":
1.95, "lr": 9.9e-4, "tok_per_s": 20480, "tokens": 266240}). A curve shows at a glance what a
log hides: whether the loss still falls, whether val splits away from train (overfitting),
whether warmup and decay did what was meant, whether throughput sagged. Several runs on one
figure, one colour per run, turn a comparison (a learning-rate sweep, distillation against
none) into one picture.

Run:
  python plot.py out/metrics.jsonl                                   # -> out/loss.png
  python plot.py out-a/metrics.jsonl out-b/metrics.jsonl -o cmp.png --names a,b --x tokens
matplotlib is an optional dependency, needed only here: pip install matplotlib
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common import NanoError, atomic_write, cli, parse_config

# What each panel draws: (row key, label, line style). Per-step train loss is noisy, so it
# is thin and faint; evaluations are few and exact, so they get markers.
PANELS = {
    "loss": [("loss", "train (step)", dict(lw=0.8, alpha=0.45)),
             ("train_loss", "train", dict(lw=1.6, marker="o", ms=3)),
             ("val_loss", "val", dict(lw=1.6, ls="--", marker="s", ms=3))],
    "lr": [("lr", "lr", dict(lw=1.4))],
    "tok_per_s": [("tok_per_s", "tokens/s", dict(lw=1.0))],
}
# other spellings of the same quantities: older train.py rows, dpo.py's and moe.py's rows (TRL's names)
ALIASES = {"tokens_per_s": "tok_per_s", "step": "iter", "eval/loss": "val_loss"}
X_AXES = {"iter": "iteration", "tokens": "tokens seen"}


def load_pyplot():
    """matplotlib is optional: import it only when a picture is asked for, headless."""
    try:
        import matplotlib
    except ImportError:
        raise NanoError("plotting needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # no display needed: write files only
    import matplotlib.pyplot as plt

    return plt


def check_output(out) -> Path:
    """Fail before any work on an output matplotlib cannot write."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise NanoError(f"output {out} must end in .png, .svg or .pdf (pass -o NAME.png)")
    return out


def save_figure(fig, out, dpi=100) -> Path:
    """Write to a temp file, then rename: a reader never sees half a picture."""
    out = check_output(out)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=dpi, bbox_inches="tight"))
    finally:
        fig.clear()
        load_pyplot().close(fig)
    return out


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.jsonl. A run killed mid-write may leave half a last line: it is
    skipped. A resumed run restarts from its checkpoint's iteration, so the rows it rewrites
    replace the ones logged after that checkpoint (the curve shows what the model went through)."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"metrics file {path} not found (train.py writes OUT_DIR/metrics.jsonl)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # the half-written last line of a killed run
            raise NanoError(f"{path} line {n} is not JSON (expected one JSON object per line)") from None
        if not isinstance(row, dict):
            raise NanoError(f"{path} line {n} is not a JSON object (expected {{\"iter\": ..., ...}} per line)")
        row = normalise(row)
        if "iter" in row and rows and "iter" in rows[-1] and row["iter"] < rows[-1]["iter"]:
            rows = [r for r in rows if r.get("iter", -1) < row["iter"]]  # a resume went back in time
        rows.append(row)
    if not rows:
        raise NanoError(f"{path} holds no metrics rows (is the run still starting?)")
    return rows


def normalise(row: dict) -> dict:
    return {ALIASES.get(k, k): v for k, v in row.items()}


def series(rows, key, x="iter"):
    """(xs, ys) of the rows that hold both x and a number for key."""
    pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def split_models(name: str, rows: list[dict]) -> dict:
    """A file whose rows name their model (moe.py logs the MoE and the dense GPT side by side)
    holds one run per model: {"out-moe moe": rows, "out-moe dense": rows}."""
    models = list(dict.fromkeys(r["model"] for r in rows if isinstance(r.get("model"), str)))
    if len(models) < 2:
        return {name: rows}
    return {f"{name} {m}": [r for r in rows if r.get("model") == m] for m in models}


def run_name(path, taken) -> str:
    """out/metrics.jsonl -> "out"; lr3e-4.jsonl -> "lr3e-4"; made unique with #2, #3."""
    path = Path(path)
    name = path.parent.name if path.stem == "metrics" and path.parent.name else path.stem
    base, k = name, 2
    while name in taken:
        name, k = f"{base} #{k}", k + 1
    return name


def plot_runs(runs: dict, out, x="iter", keys=None, title=None, logy=False, colors=None) -> Path:
    """Draw runs {name: rows} side by side in panels (loss, lr, tokens/s; only those with
    data), one colour per run, and write the figure to out (.png/.svg/.pdf).
    keys: restrict to these row keys (e.g. ("train_loss", "val_loss")); colors: {name: colour}."""
    check_output(out)
    if x not in X_AXES:
        raise NanoError(f"unknown x axis {x!r} (iter or tokens)")
    if not runs:
        raise NanoError("no runs to plot (pass at least one metrics.jsonl)")
    runs = {name: [normalise(r) for r in rows] for name, rows in runs.items()}
    for name, rows in runs.items():
        if not any(r.get(x) is not None for r in rows):
            raise NanoError(f"run {name!r} has no {x!r} in its rows (plot against --x iter)")
    panels = {p: [s for s in specs if keys is None or s[0] in keys] for p, specs in PANELS.items()}
    panels = {p: specs for p, specs in panels.items()
              if any(series(rows, s[0], x)[0] for rows in runs.values() for s in specs)}
    if not panels:
        wanted = keys or [s[0] for specs in PANELS.values() for s in specs]
        raise NanoError(f"the runs hold none of {', '.join(wanted)} (is this a metrics.jsonl of a training run?)")
    plt = load_pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.2, 3.6), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, specs) in zip(axes[0], panels.items()):
        for i, (name, rows) in enumerate(runs.items()):
            color = (colors or {}).get(name, palette[i % len(palette)])
            for key, label, style in specs:
                xs, ys = series(rows, key, x)
                if xs:
                    tag = name if len(specs) == 1 or not name else f"{name} {label}"
                    ax.plot(xs, ys, color=color, label=tag or label, **style)
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel({"loss": "loss (nats/token)", "lr": "learning rate", "tok_per_s": "tokens/s"}[panel])
        if panel == "loss" and logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


@dataclass
class PlotConfig:
    out: str = field(default="", metadata={"help": "picture to write (.png/.svg/.pdf; -o works too; "
                                                   "empty = loss.png beside the first file)"})
    names: str = field(default="", metadata={"help": "comma-separated run names, one per file (empty = folder names)"})
    x: str = field(default="iter", metadata={"help": "x axis: iter | tokens"})
    keys: str = field(default="", metadata={"help": "comma-separated row keys to draw, e.g. val_loss,lr (empty = all)"})
    title: str = ""
    logy: bool = field(default=False, metadata={"help": "log scale for the loss"})


def split_argv(argv):
    """`plot.py a.jsonl b.jsonl -o x.png --x tokens`: the files come first, options after."""
    files = []
    while argv and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    return files, ["--out" if a == "-o" else a for a in argv]


@cli
def main(argv=None):
    import sys

    files, options = split_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_config(PlotConfig, options, __doc__)
    if not files:
        raise NanoError("no metrics files given (python plot.py out/metrics.jsonl [more.jsonl ...] -o loss.png)")
    out = check_output(cfg.out or Path(files[0]).parent / "loss.png")
    names = [n.strip() for n in cfg.names.split(",")] if cfg.names else []
    if names and len(names) != len(files):
        raise NanoError(f"--names has {len(names)} names for {len(files)} files (give one per file)")
    runs = {}
    for i, f in enumerate(files):
        runs |= split_models(names[i] if names else run_name(f, runs), read_metrics(f))
    keys = [k.strip() for k in cfg.keys.split(",")] if cfg.keys else None
    out = plot_runs(runs, out, x=cfg.x, keys=keys, title=cfg.title or None, logy=cfg.logy)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
