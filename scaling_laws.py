"""Scaling laws: train a grid of small GPTs, fit L(N, D), and read off the compute-optimal model
(Kaplan et al. 2020, arXiv:2001.08361; Hoffmann et al. 2022, "Chinchilla", arXiv:2203.15556).

The final loss of a model with N parameters trained on D tokens is close to

    L(N, D) = E + A / N^alpha + B / D^beta

E: the entropy of text that no model removes; A/N^alpha: what a finite model misses; B/D^beta:
what finite data misses. Training costs C ~ 6 N D FLOPs (2 per weight and token forward, 4
backward; this file checks the 6 against an exact count). For a budget C, minimising L under
N D = C/6 gives N_opt ~ C^a and D_opt ~ C^b with a = beta/(alpha+beta), b = alpha/(alpha+beta):
how a bigger budget should be split between a bigger model and more data. Chinchilla found
a ~ b ~ 0.5, about 20 tokens per parameter; Kaplan's 0.73 / 0.27 came from stopping runs
early on one long learning-rate schedule. So every grid point here is its own run whose
cosine schedule ends exactly at its token budget.

Two of Chinchilla's three ways to read the optimum are here:
- approach 3, fit_chinchilla: fit E, A, B, alpha, beta to every (N, D, L) by minimising a Huber
  loss on log L (robust to a stray run) with L-BFGS from the best points of a grid of starts;
- approach 2, isoflop_minima: at fixed FLOPs C, loss against log N is a valley; a parabola's
  minimum is N_opt(C), and a line through log N_opt against log C gives the exponent a.

Run:
  python scaling_laws.py --grid small      # 6 sizes x 5 budgets of char models: ~15 min on 2 CPU cores
  python scaling_laws.py --grid medium --dataset fineweb_edu     # on a GPU
  Every finished point is cached in OUT_DIR/points/: a rerun resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import gpt
from common import NanoError, atomic_write, autocast, cli, cosine_lr, parse_config, pick_device, pick_dtype, set_seed


# ----------------------------------------------------------------------------------------
# The law and its fit (approach 3)


def chinchilla_loss(N, D, E, A, B, alpha, beta):
    return E + A / np.asarray(N, dtype=float) ** alpha + B / np.asarray(D, dtype=float) ** beta


def huber(r, delta):
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def log_law_objective(theta, log_n, log_d, log_l, delta):
    """Huber loss of log L against log L(N, D), written as Chinchilla does with exponentiated
    constants, A = e^a, B = e^b, E = e^e, so that
        log L(N, D) = logsumexp(a - alpha log N, b - beta log D, e)
    is smooth in every parameter and A, B, E stay positive. theta: (..., 5) = a, b, e, alpha, beta;
    several starts at once when theta has a leading dimension."""
    a, b, e, alpha, beta = (t[..., None] for t in theta.unbind(-1))
    terms = torch.stack(torch.broadcast_tensors(a - alpha * log_n, b - beta * log_d, e))  # (3, ..., points)
    return huber(torch.logsumexp(terms, dim=0) - log_l, delta).sum(-1)


def fit_chinchilla(N, D, L, delta=1e-3, n_starts=8) -> dict:
    """Approach 3: E, A, B, alpha, beta minimising sum Huber_delta(log L_fit - log L).
    Chinchilla's grid of starts (a, b in 0..25, e in -1..1, alpha, beta in 0..2) is scored at
    once; L-BFGS runs from the n_starts best, and the best optimum wins."""
    N, D, L = (np.asarray(v, dtype=float).ravel() for v in (N, D, L))
    if not (len(N) == len(D) == len(L)):
        raise NanoError(f"N, D, L have different lengths ({len(N)}, {len(D)}, {len(L)})")
    if len(L) < 5:
        raise NanoError(f"{len(L)} points cannot fix 5 constants (run a grid of >= 5 points)")
    if not (np.all(N > 0) and np.all(D > 0) and np.all(L > 0) and np.all(np.isfinite(L))):
        raise NanoError("N, D and L must be positive and finite (did a run diverge?)")
    log_n, log_d, log_l = (torch.tensor(np.log(v), dtype=torch.float64) for v in (N, D, L))
    grid = torch.tensor(list(itertools.product(np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
                                               np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))), dtype=torch.float64)
    scores = log_law_objective(grid, log_n, log_d, log_l, delta)
    best_value, best_theta = math.inf, None
    for start in grid[scores.argsort()[:n_starts]]:
        theta = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, history_size=10, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = log_law_objective(theta, log_n, log_d, log_l, delta)
            value.backward()
            return value

        opt.step(closure)
        value = log_law_objective(theta.detach(), log_n, log_d, log_l, delta).item()
        if math.isfinite(value) and value < best_value:
            best_value, best_theta = value, theta.detach()
    a, b, e, alpha, beta = best_theta.tolist()
    return dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=best_value)


def compute_optimal(fit: dict, C):
    """Minimise L(N, D) subject to 6 N D = C: N_opt = G (C/6)^a, D_opt = (C/6)^b / G with
    a = beta/(alpha+beta), b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta))."""
    al, be = fit["alpha"], fit["beta"]
    a, b = be / (al + be), al / (al + be)
    G = (al * fit["A"] / (be * fit["B"])) ** (1 / (al + be))
    n_opt = G * (np.asarray(C, dtype=float) / 6) ** a
    d_opt = (np.asarray(C, dtype=float) / 6) ** b / G
    return dict(a=a, b=b, N_opt=n_opt, D_opt=d_opt, L_opt=chinchilla_loss(n_opt, d_opt, **law(fit)))


def law(fit):
    return {k: fit[k] for k in ("E", "A", "B", "alpha", "beta")}


# ----------------------------------------------------------------------------------------
# IsoFLOP minima (approach 2)


def isoflop_minima(points, n_levels=5, min_sizes=3) -> list[dict]:
    """points: dicts with N, D, C, val_loss. Each size's loss is interpolated linearly in
    (log C, log L) between its budgets; at each of n_levels FLOP budgets covered by at least
    min_sizes sizes, a parabola in log N through those losses has its minimum at N_opt(C).
    A minimum outside the sizes' range is only a bound: it is flagged 'inside': False."""
    by_size = {}
    for p in points:
        by_size.setdefault(p["N"], []).append(p)
    curves = {n: sorted(((math.log(p["C"]), math.log(p["val_loss"])) for p in ps)) for n, ps in by_size.items()}
    curves = {n: c for n, c in curves.items() if len(c) >= 2}
    if len(curves) < min_sizes:
        return []
    # the FLOP range where at least min_sizes curves overlap
    starts, ends = sorted(c[0][0] for c in curves.values()), sorted(c[-1][0] for c in curves.values())
    lo, hi = starts[min_sizes - 1], ends[-min_sizes]
    if lo >= hi:
        return []
    out = []
    for log_c in np.linspace(lo, hi, n_levels):
        slice_ = [(math.log(n), float(np.exp(np.interp(log_c, *zip(*c)))))
                  for n, c in sorted(curves.items()) if c[0][0] <= log_c <= c[-1][0]]
        if len(slice_) < min_sizes:
            continue
        log_ns, losses = map(np.array, zip(*slice_))
        c2, c1, c0 = np.polyfit(log_ns, losses, 2)  # L = c2 x^2 + c1 x + c0, x = log N
        inside = c2 > 0 and log_ns.min() <= -c1 / (2 * c2) <= log_ns.max()
        log_n_opt = -c1 / (2 * c2) if inside else log_ns[np.argmin(losses)]
        out.append(dict(C=math.exp(log_c), N_opt=math.exp(log_n_opt), L_opt=float(np.polyval([c2, c1, c0], log_n_opt)),
                        inside=bool(inside), parabola=(c2, c1, c0), slice=slice_))
    return out


def power_law_exponent(xs, ys):
    """Slope of log y against log x: the exponent a of y ~ x^a."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# ----------------------------------------------------------------------------------------
# Parameters and FLOPs


def param_counts(model: gpt.GPT) -> dict:
    """Kaplan counts N without the embeddings (token and position tables: lookups, no
    matmul FLOPs); Chinchilla counts every parameter. The tied lm_head is the token table."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return dict(non_embedding=total - emb, total=total)


def flops_per_token(model: gpt.GPT, seq_len: int) -> int:
    """Exact matmul FLOPs of one training token: 6 per weight of every Linear (lm_head
    included: forward 2, backward 4 for the input and weight gradients) plus attention's
    scores and weighted sum, 2 * 2 * T * n_embd per layer forward and twice that backward
    (PaLM, arXiv:2204.02311, appendix B). Biases, norms and softmax are not matmuls and are
    left out, as FLOP counters do."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    return 6 * linear + 12 * cfg.n_layer * cfg.n_embd * seq_len


def count_flops(model: gpt.GPT, batch_size: int, seq_len: int) -> int:
    """FLOPs of one forward + backward on full logits, counted by PyTorch's FlopCounterMode.
    Attention runs on the math backend so its matmuls are visible to the counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits, _ = model(idx)
        F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------
# The grid


# sizes are "n_layer x n_embd"; batch and block size are the grid's unless given
GRIDS = {
    "small": dict(sizes="1x32,1x48,2x48,2x64,3x80,4x96", tokens="6.25e4,1.25e5,2.5e5,5e5,1e6", batch_size=16, block_size=64),
    "medium": dict(sizes="2x128,4x192,4x256,6x384,8x512", tokens="1e7,3e7,1e8,3e8", batch_size=64, block_size=256),
    "large": dict(sizes="4x256,6x384,8x512,12x640,12x768", tokens="1e8,3e8,1e9,3e9", batch_size=64, block_size=1024),
}


@dataclass
class ScalingConfig:
    grid: str = field(default="small", metadata={"help": "small (CPU, minutes) | medium | large (GPU)"})
    sizes: str = field(default="", metadata={"help": "override the grid's sizes: comma-separated LAYERSxWIDTH, e.g. 2x64,4x128"})
    tokens: str = field(default="", metadata={"help": "override the grid's token budgets, comma-separated: 1e5,4e5"})
    dataset: str = field(default="shakespeare_char",
                         metadata={"help": "shakespeare_char | shakespeare | fineweb_edu | text:<path>"})
    input: str = field(default="", metadata={"help": "local raw text instead of the shipped Tiny Shakespeare"})
    data_root: str = "data"
    out_dir: str = "out-scaling"
    plot: str = field(default="", metadata={"help": "picture (default OUT_DIR/scaling_laws.png; none = no plot)"})
    fit_params: str = field(default="non_embedding", metadata={"help": "N in the fit and in C = 6ND: non_embedding | total"})
    head_dim: int = 16
    batch_size: int = field(default=0, metadata={"help": "sequences per step (0 = the grid's)"})
    block_size: int = field(default=0, metadata={"help": "tokens per sequence (0 = the grid's)"})
    learning_rate: float = 2e-3
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine ends at learning_rate * this"})
    warmup_frac: float = field(default=0.05, metadata={"help": "share of each run's steps spent warming up"})
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_iters: int = field(default=40, metadata={"help": "val batches for each point's final loss (the same for all)"})
    log_interval: int = 100
    seed: int = 1337
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})


def parse_grid(cfg: ScalingConfig):
    """(sizes as (n_layer, n_embd), token budgets) from the grid name and the overrides."""
    if cfg.grid not in GRIDS:
        raise NanoError(f"unknown grid {cfg.grid!r} (choose from {', '.join(GRIDS)})")
    preset = GRIDS[cfg.grid]
    cfg.batch_size = cfg.batch_size or preset["batch_size"]
    cfg.block_size = cfg.block_size or preset["block_size"]
    sizes = []
    for s in (cfg.sizes or preset["sizes"]).split(","):
        try:
            n_layer, n_embd = (int(v) for v in s.lower().split("x"))
        except ValueError:
            raise NanoError(f"size {s!r} is not LAYERSxWIDTH (e.g. 2x64)") from None
        if n_layer <= 0 or n_embd <= 0 or n_embd % cfg.head_dim:
            raise NanoError(f"size {s!r}: width must be a positive multiple of head_dim {cfg.head_dim}")
        sizes.append((n_layer, n_embd))
    try:
        budgets = [int(float(t)) for t in (cfg.tokens or preset["tokens"]).split(",")]
    except ValueError:
        raise NanoError(f"token budgets {cfg.tokens!r} are not numbers (e.g. 1e5,4e5)") from None
    if any(b < cfg.batch_size * cfg.block_size for b in budgets):
        raise NanoError(f"every token budget must be >= one step of {cfg.batch_size * cfg.block_size} tokens")
    if cfg.fit_params not in ("non_embedding", "total"):
        raise NanoError(f"fit_params must be non_embedding or total (got {cfg.fit_params!r})")
    return sizes, budgets


def point_path(cfg, meta, n_layer, n_embd, budget) -> Path:
    """The cache file of one grid point; its name carries a hash of every setting that changes
    the result, so a rerun with other settings does not reuse stale points."""
    settings = dict(dataset=cfg.dataset, tokenizer=meta["tokenizer"], source=meta.get("source"),
                    batch_size=cfg.batch_size, block_size=cfg.block_size, head_dim=cfg.head_dim,
                    lr=cfg.learning_rate, min_lr_ratio=cfg.min_lr_ratio, warmup=cfg.warmup_frac,
                    wd=cfg.weight_decay, clip=cfg.grad_clip, eval_iters=cfg.eval_iters, seed=cfg.seed, dtype=cfg.dtype)
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.out_dir) / "points" / f"{n_layer}x{n_embd}_D{budget}_{tag}.json"


def train_point(n_layer, n_embd, budget, bins, meta, cfg, device, ctx) -> dict:
    """One grid point: a fresh model trained on `budget` tokens with a schedule that ends there."""
    set_seed(cfg.seed)
    model = gpt.GPT(gpt.GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=n_layer,
                                  n_head=n_embd // cfg.head_dim, n_embd=n_embd)).to(device)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), device.split(":")[0])
    tokens_per_step = cfg.batch_size * cfg.block_size
    steps = max(1, round(budget / tokens_per_step))
    warmup = max(1, int(cfg.warmup_frac * steps))
    t0, recent = time.time(), []
    for it in range(steps):
        lr = cosine_lr(it, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, warmup, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)  # every point reads the same text in order
        x, y = bins["train"].get_batch(cfg.batch_size, cfg.block_size, g, device)
        with ctx:
            loss = model(x, y)[1]
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-20:]
        if (it + 1) % cfg.log_interval == 0 or it + 1 == steps:
            dt = time.time() - t0
            print(f"  step {it + 1}/{steps}: loss {loss.item():.4f}, lr {lr:.2e}, "
                  f"{(it + 1) * tokens_per_step / dt:,.0f} tok/s, eta {dt / (it + 1) * (steps - it - 1):.0f} s")
    seconds = time.time() - t0
    model.eval()
    g = torch.Generator().manual_seed(4242)  # the same val batches for every point
    with torch.no_grad(), ctx:
        val = sum(model(*bins["val"].get_batch(cfg.batch_size, cfg.block_size, g, device))[1].item()
                  for _ in range(cfg.eval_iters)) / cfg.eval_iters
    counts = param_counts(model)
    D = steps * tokens_per_step
    return dict(n_layer=n_layer, n_embd=n_embd, budget=budget, D=D, steps=steps,
                params_non_embedding=counts["non_embedding"], params_total=counts["total"],
                flops_6ND=6 * counts["non_embedding"] * D, flops_exact=flops_per_token(model, cfg.block_size) * D,
                val_loss=val, train_loss=sum(recent) / len(recent), seconds=seconds)


def write_json(path: Path, obj):
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def run_grid(cfg, sizes, budgets, bins, meta, device, ctx) -> list[dict]:
    """Every (size, budget) point, cheapest first; finished points are read from the cache."""
    todo = sorted(itertools.product(sizes, budgets), key=lambda sb: sb[0][0] * sb[0][1] ** 2 * sb[1])
    results, done_flops, t_start = [], 0.0, time.time()  # FLOPs ~ 12 L C^2 D (6ND), for the ETA
    for k, ((n_layer, n_embd), budget) in enumerate(todo, 1):
        path = point_path(cfg, meta, n_layer, n_embd, budget)
        label = f"point {k}/{len(todo)}: {n_layer}x{n_embd}, {budget:,} tokens"
        if path.is_file():
            res = json.loads(path.read_text())
            print(f"{label}: cached, val loss {res['val_loss']:.4f}")
        else:
            print(f"{label}: training")
            res = train_point(n_layer, n_embd, budget, bins, meta, cfg, device, ctx)
            write_json(path, res)
            done_flops += 12 * n_layer * n_embd**2 * budget
            rate = done_flops / (time.time() - t_start)
            left = sum(12 * nl * ne**2 * b for (nl, ne), b in todo[k:]) / rate
            print(f"{label}: val loss {res['val_loss']:.4f} in {res['seconds']:.0f} s; grid eta {left / 60:.1f} min")
        results.append(res)
    return results


def flops_check(cfg, vocab_size):
    """The 6 in C = 6ND against PyTorch's own count on a tiny model."""
    set_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=2 * cfg.head_dim))
    B, T = 2, cfg.block_size
    counted = count_flops(model, B, T)
    exact = flops_per_token(model, T) * B * T
    six_nd = 6 * param_counts(model)["non_embedding"] * B * T
    print(f"FLOPs of one fwd+bwd, 2x{2 * cfg.head_dim} model, {B}x{T} tokens: counted {counted:,}; "
          f"6*N_matmul*D + attention {exact:,} ({'equal' if exact == counted else 'DIFFERENT'}); "
          f"6*N*D (N non-embedding) {six_nd:,} = {six_nd / counted:.2f}x counted "
          "(the gap: lm_head and attention, small for big models)")
    return dict(counted=counted, exact=exact, six_nd=six_nd)


def plot_scaling(points, fit, iso, out, fit_params):
    """Three panels: loss vs FLOPs with the per-size fits and the frontier; the IsoFLOP
    slices with their parabolas; N_opt against C from both approaches."""
    import plot

    plt = plot.load_pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    sizes = sorted({p["N"] for p in points})
    cmap = plt.get_cmap("viridis")
    color = {n: cmap(i / max(1, len(sizes) - 1) * 0.9) for i, n in enumerate(sizes)}
    c_all = np.array([p["C"] for p in points])
    c_line = np.geomspace(c_all.min() / 1.5, c_all.max() * 1.5, 100)
    for n in sizes:
        ps = sorted((p for p in points if p["N"] == n), key=lambda p: p["C"])
        ax1.plot([p["C"] for p in ps], [p["val_loss"] for p in ps], "o", color=color[n], ms=4,
                 label=f"N={n / 1e3:,.0f}k ({ps[0]['n_layer']}x{ps[0]['n_embd']})")
        d_line = np.geomspace(min(p["D"] for p in ps) / 1.5, max(p["D"] for p in ps) * 1.5, 50)
        ax1.plot(6 * n * d_line, chinchilla_loss(n, d_line, **law(fit)), "-", color=color[n], lw=1, alpha=0.7)
    opt = compute_optimal(fit, c_line)
    ax1.plot(c_line, opt["L_opt"], "k--", lw=1.6, label="compute-optimal frontier (fit)")
    inner, edge = [m for m in iso if m["inside"]], [m for m in iso if not m["inside"]]
    if inner:
        ax1.plot([m["C"] for m in inner], [m["L_opt"] for m in inner], "r*", ms=9, label="IsoFLOP minima")
    if edge:
        ax1.plot([m["C"] for m in edge], [m["L_opt"] for m in edge], "rx", ms=7,
                 label="IsoFLOP best size at the grid's edge")
    ax1.set(xscale="log", xlabel="training FLOPs C = 6ND", ylabel="val loss (nats/token)",
            title=f"L = {fit['E']:.2f} + {fit['A']:.3g}/N^{fit['alpha']:.2f} + {fit['B']:.3g}/D^{fit['beta']:.2f}")
    ax1.legend(fontsize=7)
    cmap2 = plt.get_cmap("plasma")
    for i, m in enumerate(iso):
        col = cmap2(i / max(1, len(iso) - 1) * 0.85)
        log_ns, losses = zip(*m["slice"])
        xs = np.linspace(min(log_ns) - 0.3, max(log_ns) + 0.3, 50)
        ax2.plot(np.exp(log_ns), losses, "o", color=col, ms=4, label=f"C={m['C']:.2g}")
        ax2.plot(np.exp(xs), np.polyval(m["parabola"], xs), "-", color=col, lw=1)
        ax2.plot(m["N_opt"], m["L_opt"], "*" if m["inside"] else "x", color=col, ms=10)
    ax2.set(xscale="log", xlabel=f"N ({fit_params.replace('_', '-')} parameters)", ylabel="val loss",
            title="IsoFLOP slices (approach 2)" if iso else "IsoFLOP: no budget covered by 3 sizes")
    if iso:
        ax2.legend(fontsize=7)
    ax3.plot(c_line, opt["N_opt"], "k--", label=f"approach 3: N_opt ~ C^{opt['a']:.2f}")
    if inner:
        ax3.plot([m["C"] for m in inner], [m["N_opt"] for m in inner], "r*", ms=9, label="approach 2: IsoFLOP minima")
    if edge:
        ax3.plot([m["C"] for m in edge], [m["N_opt"] for m in edge], "rv", ms=7,
                 label="approach 2: best size at an edge (a bound)")
    for n in sizes:
        ax3.axhline(n, color=color[n], lw=0.6, alpha=0.5)
    ax3.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N_opt", title="compute-optimal model size")
    ax3.legend(fontsize=7)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3, which="both")
    return plot.save_figure(fig, out, dpi=90)


@cli
def main(argv=None):
    cfg = parse_config(ScalingConfig, argv, __doc__)
    sizes, budgets = parse_grid(cfg)
    if len(sizes) * len(budgets) < 5:
        raise NanoError(f"{len(sizes)} sizes x {len(budgets)} budgets cannot fix 5 constants (give >= 5 points)")
    plot_path = None if cfg.plot.lower() == "none" else Path(cfg.plot or Path(cfg.out_dir) / "scaling_laws.png")
    if plot_path is not None:
        import plot

        plot.check_output(plot_path)
        plot.load_pyplot()  # a missing matplotlib is said now, not after the grid
    device = pick_device(cfg.device)
    ctx = autocast(device, pick_dtype(device, cfg.dtype))
    folder = data.prepare_dataset(cfg.dataset, cfg.input or None, data_root=cfg.data_root)
    meta = data.read_meta(folder)
    bins = {"train": data.TokenBins(folder, "train"), "val": data.TokenBins(folder, "val")}
    flops = flops_check(cfg, meta["vocab_size"])

    results = run_grid(cfg, sizes, budgets, bins, meta, device, ctx)
    points = [dict(r, N=r[f"params_{cfg.fit_params}"], C=6 * r[f"params_{cfg.fit_params}"] * r["D"]) for r in results]
    print(f"\n{'size':>7} {'N non-emb':>10} {'N total':>9} {'D':>10} {'C=6ND':>9} {'C exact':>9} {'val loss':>8}")
    for p in sorted(points, key=lambda p: (p["N"], p["D"])):
        print(f"{p['n_layer']}x{p['n_embd']:<5} {p['params_non_embedding']:>10,} {p['params_total']:>9,} {p['D']:>10,} "
              f"{p['C']:>9.2e} {p['flops_exact']:>9.2e} {p['val_loss']:>8.4f}")

    fit = fit_chinchilla([p["N"] for p in points], [p["D"] for p in points], [p["val_loss"] for p in points])
    print(f"\napproach 3 (Huber on log L, L-BFGS): L(N, D) = {fit['E']:.3f} + {fit['A']:.4g} / N^{fit['alpha']:.3f}"
          f" + {fit['B']:.4g} / D^{fit['beta']:.3f}" + ("  (E ~ 0: no loss floor shows in these runs yet)"
                                                        if fit["E"] < 0.01 else ""))
    c_max = max(p["C"] for p in points)
    opt = compute_optimal(fit, c_max)
    print(f"  compute-optimal: N_opt ~ C^{opt['a']:.3f}, D_opt ~ C^{opt['b']:.3f}; at C = {c_max:.2e}: "
          f"N_opt {float(opt['N_opt']):,.0f}, D_opt {float(opt['D_opt']):,.0f}, "
          f"{float(opt['D_opt'] / opt['N_opt']):.1f} tokens per parameter (Chinchilla: ~20)")
    iso = isoflop_minima(points)
    summary = dict(points=points, fit=fit, exponents=dict(a=opt["a"], b=opt["b"]),
                   tokens_per_param=float(opt["D_opt"] / opt["N_opt"]), flops_check=flops, isoflop=[])
    if iso:
        print("approach 2 (IsoFLOP parabolas):")
        for m in iso:
            flag = "" if m["inside"] else "  (best at an edge of the sizes there: a bound, not a minimum)"
            print(f"  C = {m['C']:.2e}: N_opt {m['N_opt']:,.0f}, D_opt {m['C'] / 6 / m['N_opt']:,.0f}, "
                  f"{m['C'] / 6 / m['N_opt'] ** 2:.1f} tokens/param, loss {m['L_opt']:.4f}{flag}")
        good = [m for m in iso if m["inside"]]
        if len(good) >= 2:
            a2 = power_law_exponent([m["C"] for m in good], [m["N_opt"] for m in good])
            print(f"  N_opt ~ C^{a2:.3f}, D_opt ~ C^{1 - a2:.3f}")
            summary["isoflop_exponent_a"] = a2
        summary["isoflop"] = [{k: m[k] for k in ("C", "N_opt", "L_opt", "inside")} for m in iso]
    else:
        print("approach 2: no FLOP budget is covered by 3 sizes (add sizes or budgets)")
    write_json(Path(cfg.out_dir) / "results.json", dict(summary, config=asdict(cfg)))
    if plot_path is not None:
        print(f"plot: {plot_scaling(points, fit, iso, plot_path, cfg.fit_params)}")
    return summary


if __name__ == "__main__":
    main()
