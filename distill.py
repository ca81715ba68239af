"""Knowledge distillation: a small GPT learns from a bigger one's whole next-token distribution
(Hinton, Vinyals & Dean 2015, arXiv:1503.02531; DistilBERT / DistilGPT2, Sanh et al. 2019,
arXiv:1910.01108).

A label says only which token came next; the teacher's softmax also says how plausible
every other token was ("dark knowledge": after "thou" a space is likely, "gh" is not
impossible). The student minimises, per position with a target,

    loss = alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)) + (1 - alpha) * CE(z_s, y)

where z_t, z_s are teacher and student logits and tau > 1 softens both distributions so the
small probabilities carry weight. Why tau^2: the KL term's gradient with respect to z_s is
(softmax(z_s/tau) - softmax(z_t/tau)) / tau, and for large tau each softmax is about
(1 + z/tau) / V (logits centred), so that gradient is about (z_s - z_t) / (V * tau^2).
Multiplying the term by tau^2 keeps its gradient on the scale of the hard term's whatever
tau is, so alpha alone sets the mix of soft and hard targets.

Memory: at V = 50257 each (B*T, V) fp32 logits tensor of 16 x 1024 tokens is 3.3 GB, and the
naive loss holds several per model (logits, log-softmaxes, their gradients). The KD loss is
one more per-chunk loss for gpt.py's chunked lm_head: each chunk of rows gets its student
logits from the student's hidden states and its teacher logits from the teacher's final
hidden states (N, C_t) times the teacher's head, under no_grad; backward recomputes per
chunk, so at most one chunk of each model's logits exists at any moment.

Students: a smaller config trained from scratch, or DistilBERT's initialisation: the teacher's
width with every other block (0, 2, 4, ...), its embeddings and final norm.

Run:
  python distill.py       # Tiny Shakespeare (chars): train a teacher if absent, then the same
                          # student with KD and without (equal steps, data, init), 3 seeds, a plot
  python distill.py --teacher gpt2 --dataset shakespeare --student_init teacher_layers --seeds 1
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import gpt
from common import (MetricsLog, NanoError, autocast, cli, cosine_lr, parse_config, pick_device, pick_dtype, set_seed,
                    tracker_option)


# ----------------------------------------------------------------------------------------
# The KD loss: one chunk of rows at a time


def kd_loss_sum(student_logits, targets, teacher_hidden, teacher_weight, tau=2.0, alpha=0.5):
    """Sum over the rows with a target (!= -1) of alpha*tau^2*KL(p_t || p_s) + (1-alpha)*CE.
    student_logits: (n, V); targets: (n,); teacher_hidden: (n, C_t); teacher_weight: (V, C_t).
    The teacher's logits are made here, for this chunk only, and never get a gradient."""
    valid = targets != -1
    at_least_fp32 = torch.promote_types(student_logits.dtype, torch.float32)  # a 50k-way softmax needs it
    z_s = student_logits.to(at_least_fp32)
    with torch.no_grad():
        z_t = (teacher_hidden.detach() @ teacher_weight.detach().t()).to(at_least_fp32)
        log_p_t = F.log_softmax(z_t / tau, dim=-1)
    log_p_s = F.log_softmax(z_s / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (n,) KL(p_t || p_s) per row
    kl = torch.where(valid, kl, 0.0).sum()  # a row without a target has no teacher to match either
    ce = F.cross_entropy(z_s, targets, ignore_index=-1, reduction="sum")
    return alpha * tau**2 * kl + (1 - alpha) * ce


def kd_loss(x, weight, targets, teacher_hidden, teacher_weight, tau=2.0, alpha=0.5, chunk_size=1024):
    """Mean KD loss over targets != -1 with neither model's (N, V) logits in memory.
    x: (N, C_s) student hidden states, weight: (V, C_s) student head, targets: (N,),
    teacher_hidden: (N, C_t), teacher_weight: (V, C_t)."""
    check_kd(tau, alpha)
    if teacher_weight.shape[0] != weight.shape[0]:
        raise NanoError(f"teacher vocab {teacher_weight.shape[0]} != student vocab {weight.shape[0]} "
                        "(build the student with the teacher's vocab_size)")
    teacher_hidden = teacher_hidden.detach()
    if torch.is_autocast_enabled(x.device.type):  # the teacher's matmuls in bf16 too (autocast is off inside)
        teacher_hidden = teacher_hidden.to(torch.get_autocast_dtype(x.device.type))
    teacher_weight = teacher_weight.detach().to(teacher_hidden.dtype)  # cast once, not once per chunk
    loss_fn = functools.partial(kd_loss_sum, teacher_weight=teacher_weight, tau=tau, alpha=alpha)
    return gpt.chunked_loss(x, weight, targets, loss_fn, teacher_hidden, chunk_size=chunk_size)


def naive_kd_loss(student_logits, targets, teacher_logits, tau=2.0, alpha=0.5):
    """The same loss on full (N, V) logits with PyTorch's own F.kl_div: the reference the tests
    check kd_loss against, and the baseline of the memory benchmark."""
    valid = targets != -1
    kl = F.kl_div(F.log_softmax(student_logits[valid] / tau, -1), F.log_softmax(teacher_logits[valid] / tau, -1),
                  log_target=True, reduction="sum") / valid.sum().clamp(min=1)
    return alpha * tau**2 * kl + (1 - alpha) * F.cross_entropy(student_logits, targets, ignore_index=-1)


def check_kd(tau, alpha):
    if not tau > 0:
        raise NanoError(f"tau must be > 0 (got {tau}; 1 = the teacher's own distribution, 2-4 softens it)")
    if not 0 <= alpha <= 1:
        raise NanoError(f"alpha must be in [0, 1] (got {alpha}; 0 = no distillation, 1 = teacher only)")


def student_from_teacher(teacher: gpt.GPT) -> gpt.GPT:
    """DistilBERT's student: the teacher's config with half the blocks, initialised with the
    teacher's embeddings, final norm and blocks 0, 2, 4, ... (a 12-layer teacher gives 6)."""
    keep = list(range(0, teacher.config.n_layer, 2))
    student = gpt.GPT(replace(teacher.config, n_layer=len(keep)))
    sd = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("transformer.h."):
            i = int(k.split(".")[2])
            if i in keep:
                sd[k.replace(f"transformer.h.{i}.", f"transformer.h.{keep.index(i)}.", 1)] = v
        else:
            sd[k] = v
    student.load_state_dict(sd)
    return student


# ----------------------------------------------------------------------------------------
# The built-in comparison and its plumbing


@dataclass
class DistillConfig:
    teacher: str = field(default="", metadata={"help": "teacher checkpoint or gpt2 | gpt2-medium | ... "
                                                      "(default: OUT_DIR/teacher.pt, trained first if absent)"})
    dataset: str = field(default="shakespeare_char", metadata={"help": "shakespeare_char | shakespeare | text:<path> (data.py)"})
    input: str = field(default="", metadata={"help": "local raw text instead of the shipped Tiny Shakespeare"})
    data_root: str = "data"
    out_dir: str = "out-distill"
    plot: str = field(default="", metadata={"help": "picture of the curves (default OUT_DIR/distill.png; none = no plot)"})
    # the teacher trained when the default one is absent
    teacher_n_layer: int = 4
    teacher_n_head: int = 4
    teacher_n_embd: int = 128
    teacher_iters: int = 2000
    # the student
    student_init: str = field(default="scratch", metadata={"help": "scratch (n_layer/n_head/n_embd below) | "
                                                                   "teacher_layers (every other teacher block)"})
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    # distillation
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft (teacher) term; 0 = plain training"})
    tau: float = field(default=2.0, metadata={"help": "softmax temperature of both models in the soft term"})
    compare: bool = field(default=True, metadata={"help": "also train the same student without KD and compare"})
    seeds: str = field(default="1,2,3", metadata={"help": "comma-separated seeds: each trains both students"})
    # optimisation (students and the default teacher)
    block_size: int = 64
    batch_size: int = 16
    max_iters: int = 1000
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 40
    loss_chunk_size: int = 1024
    log_interval: int = 50
    tracker: str = field(**tracker_option())
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})


@torch.no_grad()
def evaluate(model, bins, cfg, device, ctx):
    """Mean cross-entropy on the true next tokens of the val split, over the same fixed batches
    for every run and seed (a paired comparison: KD and plain students see identical text)."""
    model.eval()
    g = torch.Generator().manual_seed(4242)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = bins["val"].get_batch(cfg.batch_size, cfg.block_size, g, device)
        with ctx:
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def train(model, bins, cfg, device, ctx, seed, iters, teacher=None, name="", metrics_path=None):
    """AdamW + warmup/cosine; with a teacher the loss is kd_loss, without it plain CE.
    Batches depend only on (seed, iter): runs of one seed see exactly the same data."""
    opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.99), device.split(":")[0])
    tokens_per_iter = cfg.batch_size * cfg.block_size
    rows, t0, t_start = [], time.time(), time.time()
    metrics = MetricsLog(metrics_path, tracker=cfg.tracker, config=asdict(cfg)) if metrics_path else None

    def log(row):
        rows.append(row)
        if metrics:
            metrics.log(row)

    for it in range(iters + 1):
        if it % cfg.eval_interval == 0 or it == iters:
            val = evaluate(model, bins, cfg, device, ctx)
            log({"iter": it, "tokens": it * tokens_per_iter, "val_loss": val})
            print(f"{name} iter {it}: val loss {val:.4f}")
        if it == iters:
            break
        lr = cosine_lr(it, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, iters)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = bins["train"].get_batch(cfg.batch_size, cfg.block_size,
                                       torch.Generator().manual_seed(seed * 1_000_003 + it), device)
        with ctx:
            if teacher is None:
                loss = model(x, y)[1]
            else:
                with torch.no_grad():
                    h_t = teacher.hidden_states(x)  # (B, T, C_t): the teacher's logits are made per chunk
                h_s = model.hidden_states(x)  # (B, T, C_s)
                loss = kd_loss(h_s.flatten(0, 1), model.lm_head.weight, y.flatten(), h_t.flatten(0, 1),
                               teacher.lm_head.weight, cfg.tau, cfg.alpha, cfg.loss_chunk_size)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % cfg.log_interval == 0:
            dt, t0 = time.time() - t0, time.time()
            tok_s = tokens_per_iter * cfg.log_interval / dt
            eta = (time.time() - t_start) / (it + 1) * (iters - it - 1)
            # "loss" is the objective trained on: the KD loss with a teacher, cross-entropy without
            log({"iter": it + 1, "loss": loss.item(), "lr": lr, "tokens": (it + 1) * tokens_per_iter, "tok_per_s": tok_s})
            print(f"{name} iter {it + 1}/{iters}: loss {loss.item():.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, eta {eta:.0f} s")
    if metrics:
        metrics.close()
    return rows


def load_teacher(cfg, meta, bins, device, ctx):
    """The teacher: gpt2* from the hub, a checkpoint, or (default path, absent) trained here."""
    path = Path(cfg.teacher or Path(cfg.out_dir) / "teacher.pt")
    if cfg.teacher.startswith("gpt2"):
        if meta["tokenizer"] != "gpt2":  # said before the download
            raise NanoError(f"a {cfg.teacher} teacher needs GPT-2 tokens (use --dataset shakespeare or text:<path>)")
        teacher, spec = gpt.GPT.from_pretrained(cfg.teacher), "gpt2"
        teacher.crop_block_size(cfg.block_size)
    elif path.is_file():
        teacher, spec = gpt.load_checkpoint(path, device)
    elif not cfg.teacher:
        set_seed(0)
        teacher = gpt.GPT(gpt.GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"],
                                        n_layer=cfg.teacher_n_layer, n_head=cfg.teacher_n_head,
                                        n_embd=cfg.teacher_n_embd)).to(device)
        print(f"no teacher at {path}: training one ({teacher.num_params() / 1e6:.2f}M parameters, "
              f"{cfg.teacher_iters} iters)")
        train(teacher, bins, cfg, device, ctx, seed=0, iters=cfg.teacher_iters, name="teacher",
              metrics_path=Path(cfg.out_dir) / "teacher_metrics.jsonl")
        spec = meta["tokenizer"]
        gpt.save_checkpoint(path, teacher, spec, step=cfg.teacher_iters)
    else:
        raise NanoError(f"teacher {path} not found (pass a checkpoint path or gpt2*, or no --teacher to train one)")
    if spec != meta["tokenizer"]:
        raise NanoError(f"the teacher uses tokenizer {spec!r}, the data {meta['tokenizer']!r} "
                        "(pick a dataset made with the teacher's tokenizer)")
    if cfg.block_size > teacher.config.block_size:
        raise NanoError(f"block_size {cfg.block_size} exceeds the teacher's {teacher.config.block_size}")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_student(cfg, teacher, seed):
    set_seed(seed)  # the KD and the plain student of one seed start from the same weights
    if cfg.student_init == "teacher_layers":
        return student_from_teacher(teacher)
    return gpt.GPT(gpt.GPTConfig(block_size=cfg.block_size, vocab_size=teacher.config.vocab_size,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))


def plot_comparison(runs, teacher_val, iters, path, title="distillation: student val loss with and without KD"):
    """Val curves of the KD (blue) and plain (orange) students, the teacher's loss as a line.
    Iteration 0 (every run at ~ln V) is left out so the gap is visible."""
    import plot

    runs = {name: [r for r in rows if r["iter"] > 0] for name, rows in runs.items()}
    runs["teacher"] = [{"iter": 0, "val_loss": teacher_val}, {"iter": iters, "val_loss": teacher_val}]
    colors = {name: "tab:blue" if name.startswith("KD") else "tab:orange" for name in runs}
    colors["teacher"] = "gray"
    return plot.plot_runs(runs, path, keys=("val_loss",), colors=colors, title=title)


def check_config(cfg):
    check_kd(cfg.tau, cfg.alpha)
    if cfg.student_init not in ("scratch", "teacher_layers"):
        raise NanoError(f"unknown student_init {cfg.student_init!r} (scratch or teacher_layers)")
    for name in ("max_iters", "batch_size", "block_size", "eval_interval", "eval_iters", "log_interval",
                 "loss_chunk_size", "teacher_iters"):
        if getattr(cfg, name) <= 0:
            raise NanoError(f"{name} must be positive (got {getattr(cfg, name)})")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise NanoError(f"seeds must be comma-separated integers (got {cfg.seeds!r})") from None
    if not seeds:
        raise NanoError("no seeds given (e.g. --seeds 1,2,3)")
    return seeds


@cli
def main(argv=None):
    cfg = parse_config(DistillConfig, argv, __doc__)
    seeds = check_config(cfg)
    plot_path = None if cfg.plot.lower() == "none" else Path(cfg.plot or Path(cfg.out_dir) / "distill.png")
    if plot_path is not None:
        import plot

        plot.check_output(plot_path)
        plot.load_pyplot()  # a missing matplotlib is said now, not after minutes of training
    device = pick_device(cfg.device)
    dtype = pick_dtype(device, cfg.dtype)
    ctx = autocast(device, dtype)
    folder = data.prepare_dataset(cfg.dataset, cfg.input or None, data_root=cfg.data_root)
    meta = data.read_meta(folder)
    bins = {"train": data.TokenBins(folder, "train"), "val": data.TokenBins(folder, "val")}
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(cfg, meta, bins, device, ctx)
    teacher_val = evaluate(teacher, bins, cfg, device, ctx)
    print(f"teacher: {teacher.num_params() / 1e6:.2f}M parameters, val loss {teacher_val:.4f}")

    runs, results = {}, []
    for seed in seeds:
        res = {"seed": seed}
        for kind in ("kd", "plain") if cfg.compare else ("kd",):
            student = make_student(cfg, teacher, seed).to(device)
            if kind == "kd" and seed == seeds[0]:
                print(f"student ({cfg.student_init}): {student.num_params() / 1e6:.2f}M parameters, "
                      f"{student.config.n_layer} layers, n_embd {student.config.n_embd}")
            rows = train(student, bins, cfg, device, ctx, seed, cfg.max_iters, teacher if kind == "kd" else None,
                         name=f"{kind} s{seed}", metrics_path=out_dir / f"metrics_{kind}_seed{seed}.jsonl")
            res[kind] = rows[-1]["val_loss"]
            runs[f"{'KD' if kind == 'kd' else 'no KD'} (seed {seed})"] = [r for r in rows if "val_loss" in r]
            if kind == "kd":
                gpt.save_checkpoint(out_dir / "student_kd.pt", student, meta["tokenizer"], step=cfg.max_iters,
                                    distill_config=asdict(cfg))
        results.append(res)

    print(f"\nteacher val loss {teacher_val:.4f}; student val loss after {cfg.max_iters} iters "
          f"(alpha {cfg.alpha}, tau {cfg.tau}):")
    for r in results:
        print(f"  seed {r['seed']}: KD {r['kd']:.4f}" + (f", no KD {r['plain']:.4f}, gap {r['plain'] - r['kd']:+.4f}"
                                                         if cfg.compare else ""))
    summary = {"teacher_val_loss": teacher_val, "runs": results}
    if cfg.compare:
        gaps = [r["plain"] - r["kd"] for r in results]
        sd = statistics.stdev(gaps) if len(gaps) > 1 else math.nan
        summary["gap_mean"], summary["gap_std"] = statistics.mean(gaps), sd
        print(f"  gap (no KD - KD) over {len(gaps)} seed(s): {summary['gap_mean']:+.4f} +- {sd:.4f} nats/token")
    if plot_path is not None:
        title = f"student val loss: KD {statistics.mean(r['kd'] for r in results):.3f}"
        if cfg.compare:
            title += f", no KD {statistics.mean(r['plain'] for r in results):.3f}"
        title += f" ({len(results)} seed{'s' * (len(results) > 1)}; teacher {teacher_val:.3f})"
        print(f"plot: {plot_comparison(runs, teacher_val, cfg.max_iters, plot_path, title)}")
    return summary


if __name__ == "__main__":
    main()
