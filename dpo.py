"""DPO: align a language model to pairwise preferences without a reward model or RL
(Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", arXiv:2305.18290).

RLHF fits a reward model r(x, y) to preferences "y_w is better than y_l for prompt x" and
then maximises r with PPO under a KL penalty beta * KL(pi || pi_ref). That KL-constrained
problem has a closed-form optimum, pi*(y|x) ~ pi_ref(y|x) * exp(r(x, y) / beta), so the
reward can be written through the policy itself: r(x, y) = beta * log pi(y|x)/pi_ref(y|x)
(+ a term of x alone, which cancels in a comparison). Put that into the Bradley-Terry
likelihood of the preferences and the whole of RLHF becomes one classification loss on
sequence log-probabilities:

    h    = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)]
    loss = -log sigmoid(beta * h)                                          (paper, eq. 7)

`dpo_loss` has the variants of TRL 0.19.1's DPOTrainer.dpo_loss too (bitwise equal to that version;
current TRL 1.x no longer applies label_smoothing to the sigmoid loss and logs IPO rewards as token sums):
- label_smoothing eps (conservative DPO, Mitchell 2023: labels flipped with probability eps)
    -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
- "ipo" (Azar et al. 2023, arXiv:2310.12036, eq. 17): (h - 1/(2 beta))^2, where, as in TRL,
  the four log-probs are per-token AVERAGES over the completion, not sums (so beta = tau
  means the same for short and long answers); the training loop passes average=True.
- "hinge" (SLiC, Zhao et al. 2023, arXiv:2305.10425): relu(1 - beta * h)
- reference_free: the reference term of h is 0 (a reference that likes every answer alike).
The implicit rewards beta * (log pi - log pi_ref) of the chosen and the rejected answer are
what one watches: rewards/accuracies (chosen > rejected) and rewards/margins should rise.

Training: chosen and rejected are concatenated into one (2B, T) batch: one forward of the
policy, one of the reference (under no_grad), so the two halves see the same weights and a
sharded model (FSDP) runs one collective sequence per step. With --precompute_ref the
reference log-probs of the whole dataset are computed once before training and the
reference copy is freed. With --lora only LoRA adapters train, and the reference is the
SAME model with its adapters switched off (lora.disable_adapters): the memory trick, no
second copy of the weights exists (bench.py section "dpo" measures it).
Dropout is switched off in the base model (as TRL's disable_dropout): policy and reference
must compute the same function at step 0, where the loss is then exactly log 2.

Data: --data a .jsonl with one {"prompt": ..., "chosen": ..., "rejected": ...} per line
(the shape of Anthropic HH / UltraFeedback after splitting off the prompt); each sequence
is prompt + completion (+ end-of-text when the tokenizer has one, so the policy learns to
stop), and only completion tokens count. Truncation, the rule of the authors' code and
TRL's early DPOTrainer: when prompt + the longer completion exceed max_length, the prompt
keeps its LAST max_prompt_length tokens (the end is what the answer follows); if still too
long, each completion keeps its FIRST max_length - max_prompt_length tokens.
Without --data a built-in task runs: a tiny char-level model is pretrained on lines
"word>ANSWER." whose answer is half the time UPPERCASE, half lowercase; DPO is then shown
pairs whose chosen answer is uppercase, and the policy learns to shout: rewards separate
and the share of uppercase answers it samples goes from ~50% to ~100% in a minute on CPU.

Run:
  python dpo.py                                         # the synthetic task, CPU, ~1-2 min
  python dpo.py --lora True                             # same, LoRA policy, reference = adapters off
  python dpo.py --init_from gpt2 --data hh.jsonl --lora True --learning_rate 5e-5 --beta 0.1
  -> out-dpo/ckpt.pt (python sample.py --ckpt out-dpo/ckpt.pt; with --lora the adapters are
     merged into it, and out-dpo/adapter.pt holds the adapter alone), out-dpo/metrics.jsonl
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import common
from common import NanoError, cli
import data
import finetune
import gpt
import lora
import tokenizer

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ----------------------------------------------------------------------------------------
# The loss


def sequence_logps(logits, labels, loss_mask, average=False):
    """Log-probability of each sequence's completion: sum (or mean) over the positions with
    loss_mask of log softmax(logits)[label].

    logits (B, T, V) where logits[:, t] scores labels[:, t]; labels, loss_mask (B, T).
    log softmax(z)[y] = z[y] - logsumexp(z): one gather and one logsumexp per position, no
    (B, T, V) log_softmax tensor kept beside the logits. fp32 even under bf16 autocast."""
    logits = logits.float()
    labels = labels.masked_fill(~loss_mask, 0)  # any valid id; those positions are masked out
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    per_token = (picked - torch.logsumexp(logits, dim=-1)) * loss_mask
    total = per_token.sum(-1)
    return total / loss_mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0, loss_type="sigmoid", reference_free=False):
    """Per-pair losses and the implicit rewards of the chosen and rejected answers, all (B,).

    h = (policy chosen - policy rejected) - (ref chosen - ref rejected); see the module
    docstring for each loss_type. label_smoothing applies to "sigmoid" only (as in TRL).
    The rewards beta * (policy - ref) are detached: they are for logging, not for gradients."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0.0 if reference_free else ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------
# Data: (prompt, chosen, rejected) token lists, truncated, batched as one (2B, T) tensor


def truncate_pair(prompt, chosen, rejected, max_length, max_prompt_length):
    """Keep the end of the prompt, then the start of the completions (module docstring)."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        keep = max_length - max_prompt_length
        chosen, rejected = chosen[:keep], rejected[:keep]
    return prompt, chosen, rejected


def check_rows(rows, where="row"):
    """A missing, non-string or empty field is an error naming the row, raised before
    the model is even loaded."""
    for n, row in rows:
        if not isinstance(row, dict):
            raise NanoError(f"{where} {n}: expected a JSON object with prompt, chosen, rejected")
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise NanoError(f"{where} {n}: missing field {key!r} "
                                 "(every row needs prompt, chosen and rejected)")
            if not isinstance(row[key], str):
                raise NanoError(f"{where} {n}: field {key!r} is a {type(row[key]).__name__}, not a string")
        for key in ("chosen", "rejected"):
            if not row[key]:
                raise NanoError(f"{where} {n}: empty {key!r} completion (drop the row or fill it in)")


def tokenize_pairs(rows, tok, max_length, max_prompt_length, where="row"):
    """Checked rows -> (pairs of token lists, stats). A pair whose chosen equals its
    rejected carries no preference: skipped and counted (the caller warns)."""
    pairs, stats = [], {"rows": 0, "identical_skipped": 0, "truncated": 0}
    for n, row in rows:
        stats["rows"] += 1
        if row["chosen"] == row["rejected"]:
            stats["identical_skipped"] += 1
            continue
        try:
            p, c, r = (tok.encode(row[k]) for k in ("prompt", "chosen", "rejected"))
        except NanoError as e:  # e.g. a character outside a char model's alphabet
            raise NanoError(f"{where} {n}: {str(e).removeprefix('error: ')}") from None
        if not p:  # the first completion token must be predicted from something
            if tok.eot_id is None:
                raise NanoError(f"{where} {n}: empty prompt (this tokenizer has no "
                                 "end-of-text token to start from; give every row a prompt)")
            p = [tok.eot_id]
        if tok.eot_id is not None:  # answers end with end-of-text: the policy learns to stop
            c, r = c + [tok.eot_id], r + [tok.eot_id]
        p2, c2, r2 = truncate_pair(p, c, r, max_length, max_prompt_length)
        stats["truncated"] += (len(p2), len(c2), len(r2)) != (len(p), len(c), len(r))
        if c2 == r2:  # truncation cut away everything that differed
            stats["identical_skipped"] += 1
            continue
        pairs.append((p2, c2, r2))
    return pairs, stats


def read_jsonl(path):
    """(line number, parsed object) per non-blank line; bad JSON is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"--data {path} not found (pass a .jsonl with prompt/chosen/rejected)")
    try:
        text = data.read_text_file(path)
    except NanoError as e:  # a binary file, UTF-16, Latin-1: say which option named it
        raise NanoError(f"--data {e}") from None
    rows = []
    # split on "\n" only, as a file's lines: splitlines() would also cut at a raw U+2028 inside a string
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise NanoError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    return rows


def collate(pairs, device):
    """-> idx, labels, loss_mask, each (2B, T): the B chosen sequences, then the B rejected.
    A sequence is prompt + completion; the model reads all but its last token and predicts
    all but its first; only completion tokens count. Right padding (id 0, masked) cannot
    change earlier positions under causal attention, so no attention mask is needed."""
    seqs = [(p + c, len(p)) for p, c, _ in pairs] + [(p + r, len(p)) for p, _, r in pairs]
    T = max(len(s) for s, _ in seqs) - 1
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, n_prompt) in enumerate(seqs):
        s = torch.tensor(s)
        idx[i, :len(s) - 1], labels[i, :len(s) - 1] = s[:-1], s[1:]
        mask[i, n_prompt - 1:len(s) - 1] = True  # labels[t] = s[t + 1]: completion from t = n_prompt - 1
    return idx.to(device), labels.to(device), mask.to(device)


# The built-in task. Prompts are random lowercase words; answers are random words, half
# the time UPPERCASE. The pretraining text mixes both, so the reference model answers in
# either case; the preference pairs always prefer the uppercase answer.
LOWER = "abcdefghijklmnopqrstuvwxyz"
SYNTH_ALPHABET = LOWER + LOWER.upper() + ">.\n"


def _word(rng):
    return "".join(rng.choice(LOWER) for _ in range(rng.randint(3, 6)))


def synthetic_rows(n, rng):
    return [(i + 1, {"prompt": f"\n{_word(rng)}>", "chosen": _word(rng).upper() + ".\n",
                     "rejected": _word(rng) + ".\n"}) for i in range(n)]


def pretrain_synthetic(cfg, device, rng):
    """A quick char-level GPT on the task's unpreferred-and-preferred mix: the SFT model
    that DPO starts from (policy and reference alike)."""
    tok = tokenizer.load_tokenizer("char:" + SYNTH_ALPHABET)
    text = "".join(f"{_word(rng)}>{_word(rng).upper() if rng.random() < 0.5 else _word(rng)}.\n"
                   for _ in range(5000 if cfg.pretrain_iters else 10))
    tokens = torch.tensor(tok.encode(text))
    config = gpt.GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=cfg.n_layer,
                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0)
    model = gpt.GPT(config).to(device)
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), device.split(":")[0])
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for it in range(cfg.pretrain_iters):
        ix = torch.randint(len(tokens) - config.block_size - 1, (32,), generator=g)
        x = torch.stack([tokens[i:i + config.block_size] for i in ix]).to(device)
        y = torch.stack([tokens[i + 1:i + 1 + config.block_size] for i in ix]).to(device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 100 == 0 or it == cfg.pretrain_iters - 1:
            print(f"pretrain {it + 1}/{cfg.pretrain_iters} | loss {loss.item():.3f} | {time.time() - t0:.0f}s")
    return model, tok.spec


@torch.no_grad()
def uppercase_rate(model, tok, prompts, seed, max_new=8):
    """Share of sampled answers (temperature 1, up to '.') whose letters are all uppercase:
    the behaviour DPO should have taught. Prompts of one length are sampled as one batch."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    shouted = 0
    by_len = {}
    for p in prompts:
        by_len.setdefault(len(p), []).append(p)
    for group in by_len.values():
        idx = torch.tensor([tok.encode(p) for p in group], device=dev)
        for _ in range(max_new):
            logits, _ = model(idx)
            probs = logits[:, -1].float().softmax(-1).cpu()
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g).to(dev)], dim=1)
        for row, p in zip(idx.tolist(), group):
            answer = tok.decode(row)[len(p):].split(".")[0]
            shouted += answer.isalpha() and answer.isupper()
    model.train(was_training)
    return shouted / max(1, len(prompts))


# ----------------------------------------------------------------------------------------
# Model side


def disable_dropout(model):
    """Every dropout probability to 0 (TRL's disable_dropout): a policy with dropout on
    would not equal its reference at step 0, and the implicit rewards would be noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # attention's dropout_p
            m.dropout = 0.0


def concatenated_logps(model, batch, average, ctx):
    """One forward over chosen and rejected together -> (chosen logps, rejected logps), (B,) each.

    The lm_head (a third of GPT-2's forward FLOPs at V = 50k) and the (2B, T, V) logits are
    only computed from the first column where some row has a completion token: prompt
    positions score nothing (TRL's logits_to_keep)."""
    idx, labels, mask = batch
    first = int(mask.any(0).float().argmax())  # leading columns that are prompt in every row
    with ctx:
        hidden = model.hidden_states(idx)  # (2B, T, n_embd)
        logits = model.lm_head(hidden[:, first:])  # (2B, T - first, V)
    return sequence_logps(logits, labels[:, first:], mask[:, first:], average).chunk(2)


@torch.no_grad()
def reference_logps(model, ref_model, batch, average, ctx):
    if ref_model is None:  # LoRA: the reference is the base, i.e. the model with adapters off
        with lora.disable_adapters(model):
            return concatenated_logps(model, batch, average, ctx)
    return concatenated_logps(ref_model, batch, average, ctx)


def pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """Per-batch sums of TRL's logged quantities (summed so batches of any size average right)."""
    return {"loss": losses.detach().sum().item(),
            "rewards/chosen": chosen_rewards.sum().item(),
            "rewards/rejected": rejected_rewards.sum().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
            "logps/chosen": chosen_logps.detach().sum().item(),
            "logps/rejected": rejected_logps.detach().sum().item()}


def add_into(total, part):
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


# ----------------------------------------------------------------------------------------
# Training


@dataclass
class DPOConfig:
    init_from: str = field(default="", metadata={"help": "policy and reference start here: a checkpoint path, or gpt2 / gpt2-medium / ...; empty: pretrain the synthetic task's tiny model"})
    data: str = field(default="", metadata={"help": ".jsonl with prompt/chosen/rejected per line; empty: the built-in synthetic task"})
    out_dir: str = field(default="out-dpo", metadata={"help": "ckpt.pt, metrics.jsonl (and adapter.pt, base.pt) go here"})
    beta: float = field(default=0.1, metadata={"help": "strength of the KL anchor to the reference (IPO: tau)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) | ipo | hinge"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO: assumed label-flip probability, in [0, 0.5) (sigmoid only)"})
    reference_free: bool = field(default=False, metadata={"help": "drop the reference term from the loss (rewards still use it)"})
    precompute_ref: bool = field(default=False, metadata={"help": "reference log-probs for all data before training, then free the reference"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters only; the reference is the model with adapters disabled"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = field(default="c_attn,c_proj,c_fc", metadata={"help": "comma-separated Linear names to adapt"})
    max_length: int = field(default=0, metadata={"help": "tokens per prompt + completion (0: the model's block_size)"})
    max_prompt_length: int = field(default=0, metadata={"help": "prompt tokens kept when a pair is too long (0: max_length // 2)"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out share of --data pairs for eval metrics"})
    batch_size: int = field(default=16, metadata={"help": "preference pairs per micro-batch (2x sequences)"})
    grad_accum: int = 1
    epochs: int = 1
    max_iters: int = field(default=0, metadata={"help": "optimizer steps (0: epochs over the data)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "1e-3 suits the tiny synthetic model; GPT-2: ~5e-7 full, ~5e-5 LoRA"})
    warmup_iters: int = field(default=10, metadata={"help": "linear warmup, then constant (as the paper)"})
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0: off)"})
    eval_interval: int = 50
    log_interval: int = 10
    tracker: str = field(**common.tracker_option())
    n_pairs: int = field(default=2048, metadata={"help": "synthetic task: training pairs (plus 1/8 as many, at least 32, for eval)"})
    pretrain_iters: int = field(default=300, metadata={"help": "synthetic task: steps of pretraining the base model"})
    n_layer: int = field(default=2, metadata={"help": "synthetic task's model"})
    n_head: int = 4
    n_embd: int = 64
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "autocast dtype: auto, float32, bfloat16, float16"})
    seed: int = 1337


def check_config(cfg):
    """Every option, checked before any work: numbers in range (common.check_options), then
    what a range cannot say, then the files. --max_iters, --max_length and --max_prompt_length
    may be 0: it means "derive it" (from --epochs, the model's block_size, max_length // 2)."""
    common.check_options(
        cfg, positive=("beta", "batch_size", "grad_accum", "epochs", "learning_rate", "eval_interval",
                       "log_interval", "lora_r", "lora_alpha", "n_pairs", "n_layer", "n_head", "n_embd"),
        non_negative=("max_iters", "max_length", "max_prompt_length", "warmup_iters", "weight_decay",
                      "grad_clip", "pretrain_iters"),
        ranges={"lora_dropout": (0.0, 0.99)})
    # half-open ranges: label smoothing 0.5 erases the preference, and a val share of 1 leaves no training pair
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise NanoError(f"--label_smoothing must be in [0, 0.5) (got {cfg.label_smoothing}; "
                        "0.5 would erase the preference)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise NanoError(f"--val_fraction must be in [0, 1) (got {cfg.val_fraction}; 1 leaves nothing to train on)")
    if cfg.loss_type not in LOSS_TYPES:
        raise NanoError(f"unknown --loss_type {cfg.loss_type!r} (one of {', '.join(LOSS_TYPES)})")
    if cfg.label_smoothing > 0 and cfg.loss_type != "sigmoid":
        print(f"warning: --label_smoothing applies to the sigmoid loss only; ignored for {cfg.loss_type}",
              file=sys.stderr)
    common.check_out_dir(cfg.out_dir)
    if cfg.data and not cfg.init_from:
        raise NanoError("--data needs --init_from (a checkpoint or gpt2): the synthetic task's model "
                        "knows only its own letters")
    if cfg.data and not Path(cfg.data).is_file():
        raise NanoError(f"--data {cfg.data} not found (pass a .jsonl with prompt/chosen/rejected)")


def prepare_pairs(cfg: DPOConfig, tok, model, rng, rows=None):
    """Token pairs (train, val) and their stats, all validated before any DPO step."""
    max_length = cfg.max_length or model.config.block_size
    if max_length > model.config.block_size:
        raise NanoError(f"--max_length {max_length} exceeds the model's block_size "
                        f"{model.config.block_size} (lower it)")
    max_prompt_length = cfg.max_prompt_length or max_length // 2
    if max_prompt_length >= max_length:
        raise NanoError(f"--max_prompt_length {max_prompt_length} leaves no room for the completion "
                        f"in max_length {max_length} (use a smaller one)")
    if cfg.data:
        pairs, stats = tokenize_pairs(rows, tok, max_length, max_prompt_length, where=f"{cfg.data} line")
        rng.shuffle(pairs)
        n_val = int(len(pairs) * cfg.val_fraction)
        train_pairs, val_pairs = pairs[n_val:], pairs[:n_val]
    else:
        n_val = max(32, cfg.n_pairs // 8)
        rows = synthetic_rows(cfg.n_pairs + n_val, rng)
        pairs, stats = tokenize_pairs(rows, tok, max_length, max_prompt_length, where="synthetic row")
        train_pairs, val_pairs = pairs[:-n_val], pairs[-n_val:]
    if stats["identical_skipped"]:
        print(f"warning: skipped {stats['identical_skipped']} pair(s) whose chosen equals the rejected "
              "(after truncation): no preference to learn", file=sys.stderr)
    if not train_pairs:
        raise NanoError(f"no usable preference pairs in {cfg.data or 'the synthetic task'} "
                        f"({stats['rows']} rows read)")
    print(f"data: {len(train_pairs)} train / {len(val_pairs)} val pairs, {stats['truncated']} truncated "
          f"(max_length {max_length}, prompts keep their last {max_prompt_length} tokens)")
    return train_pairs, val_pairs, stats


class Reference:
    """The reference policy's log-probs of a batch: a frozen copy, the same LoRA model with its
    adapters off, or (--precompute_ref) a table computed once for every pair."""

    def __init__(self, cfg, model, ref_model, train_pairs, val_pairs, average, ctx, device):
        self.model, self.ref_model, self.average, self.ctx = model, ref_model, average, ctx
        self.tables = {"train": None, "val": None}
        if cfg.precompute_ref:
            t0 = time.time()
            self.tables = {"train": self.precompute(train_pairs, 4 * cfg.batch_size, device),
                           "val": self.precompute(val_pairs, 4 * cfg.batch_size, device) if val_pairs else None}
            self.ref_model = None  # a frozen copy is no longer needed: free it (LoRA had none)
            print(f"precomputed reference log-probs of {len(train_pairs) + len(val_pairs)} pairs "
                  f"in {time.time() - t0:.1f}s")

    def precompute(self, pairs, size, device):
        parts = [reference_logps(self.model, self.ref_model, b, self.average, self.ctx)
                 for _, b in batches(pairs, size, device)]
        return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])

    def logps(self, batch, ids, split):
        table = self.tables[split]
        if table is not None:
            return table[0][ids], table[1][ids]
        return reference_logps(self.model, self.ref_model, batch, self.average, self.ctx)


def batches(pairs, size, device):
    for i in range(0, len(pairs), size):
        yield i, collate(pairs[i:i + size], device)


def train_dpo(cfg, model, reference, train_pairs, evaluate, log, device, ctx):
    """The loop: one concatenated (chosen; rejected) forward per micro-batch, the DPO loss
    against the reference's log-probs, linear warmup then a constant learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.999), device.split(":")[0])
    max_iters = cfg.max_iters or cfg.epochs * math.ceil(len(train_pairs) / (cfg.batch_size * cfg.grad_accum))
    print(f"DPO ({cfg.loss_type}, beta {cfg.beta}) for {max_iters} steps, {sum(p.numel() for p in params):,} "
          f"trainable parameters, reference: "
          f"{'precomputed' if cfg.precompute_ref else 'adapters disabled' if cfg.lora else 'frozen copy'}")
    last = evaluate(0)
    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    cursor, epoch, interval, n_interval, tokens = 0, 0, {}, 0, 0
    t0 = t_log = time.time()
    for step in range(1, max_iters + 1):
        lr = cfg.learning_rate * min(1.0, step / max(1, cfg.warmup_iters))
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            if cursor >= len(order):  # next epoch, new order
                epoch += 1
                order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
                cursor = 0
            ids = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            batch = collate([train_pairs[i] for i in ids], device)
            chosen, rejected = concatenated_logps(model, batch, reference.average, ctx)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, *reference.logps(batch, ids, "train"), cfg.beta, cfg.label_smoothing,
                cfg.loss_type, cfg.reference_free)
            (losses.mean() / cfg.grad_accum).backward()
            add_into(interval, pair_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected))
            n_interval += len(ids)
            tokens += batch[0].numel()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if step % cfg.log_interval == 0 or step == max_iters:
            now = time.time()
            row = {"step": step, "epoch": epoch + min(cursor, len(train_pairs)) / len(train_pairs), "lr": lr,
                   **{k: v / n_interval for k, v in interval.items()}, "tokens_per_s": tokens / (now - t_log)}
            log(row)
            eta = (now - t0) / step * (max_iters - step)
            print(f"step {step}/{max_iters} | loss {row['loss']:.4f} | acc {row['rewards/accuracies']:.2f} | "
                  f"margin {row['rewards/margins']:.3f} (chosen {row['rewards/chosen']:.3f}, rejected "
                  f"{row['rewards/rejected']:.3f}) | {row['tokens_per_s']:.0f} tok/s | ETA {eta:.0f}s")
            interval, n_interval, tokens, t_log = {}, 0, 0, time.time()
        if step % cfg.eval_interval == 0 or step == max_iters:
            last = evaluate(step) or last
    return max_iters, last


@cli
def main(argv=None):
    cfg = common.parse_config(DPOConfig, argv, description=__doc__)
    check_config(cfg)
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)
    ctx = common.autocast(device, dtype)
    common.set_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out_dir = Path(cfg.out_dir)
    rows = None
    if cfg.data:  # check every row before loading anything big
        rows = read_jsonl(cfg.data)
        check_rows(rows, where=f"{cfg.data} line")

    # ---- the starting model (policy = reference at step 0) and the tokenizer
    if cfg.init_from:
        try:
            model, spec, base = finetune.load_base(cfg.init_from, device)
        except NanoError as e:  # e.g. a file that is no checkpoint: say which option pointed at it
            raise NanoError(f"--init_from: {e}") from None
    else:
        model, spec = pretrain_synthetic(cfg, device, rng)
        out_dir.mkdir(parents=True, exist_ok=True)
        base = str(out_dir / "base.pt")
        gpt.save_checkpoint(base, model, spec)  # the adapter's base, and a reusable --init_from
    tok = tokenizer.load_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise NanoError(f"tokenizer {spec!r} has {tok.vocab_size} tokens, the model only "
                        f"{model.config.vocab_size} (a checkpoint with another tokenizer?)")
    train_pairs, val_pairs, stats = prepare_pairs(cfg, tok, model, rng, rows)

    # ---- policy and reference
    disable_dropout(model)
    model.train()
    if cfg.lora:
        targets = [t for t in cfg.lora_targets.split(",") if t]
        try:
            lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets)
        except ValueError as e:
            raise NanoError(f"{e} (check --lora_targets)") from None
        ref_model = None  # the base weights inside the LoRA model are the reference
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    average = cfg.loss_type == "ipo"  # TRL: IPO on per-token average log-probs
    reference = Reference(cfg, model, ref_model, train_pairs, val_pairs, average, ctx, device)

    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    metrics = common.MetricsLog(out_dir / "metrics.jsonl", tracker=cfg.tracker, config=asdict(cfg))
    log = metrics.log

    @torch.no_grad()
    def evaluate(step):
        if not val_pairs:
            return {}
        total = {}
        for start, batch in batches(val_pairs, 4 * cfg.batch_size, device):
            c, r = concatenated_logps(model, batch, average, ctx)
            rc, rr = reference.logps(batch, slice(start, start + len(c)), "val")
            add_into(total, pair_metrics(*dpo_loss(c, r, rc, rr, cfg.beta, cfg.label_smoothing,
                                                   cfg.loss_type, cfg.reference_free), c, r))
        out = {f"eval/{k}": v / len(val_pairs) for k, v in total.items()}
        if not cfg.data:
            prompts = [tok.decode(p) for p, _, _ in val_pairs[:128]]
            out["eval/uppercase_rate"] = uppercase_rate(model, tok, prompts, cfg.seed)
        log({"step": step, **out})
        print(f"{'eval ' if step else ''}step {step} | " + " | ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in out.items()))
        return out

    first = evaluate(0)
    steps, last = train_dpo(cfg, model, reference, train_pairs, lambda step: evaluate(step) if step else first,
                            log, device, ctx)
    metrics.close()

    # ---- save: a plain checkpoint sample.py reads (+ the adapter alone with --lora)
    if cfg.lora:
        lora.save_lora(out_dir / "adapter.pt", model, base)
        lora.merge_lora(model)
    gpt.save_checkpoint(out_dir / "ckpt.pt", model, spec, step=steps, dpo=asdict(cfg))
    print(f"saved {out_dir / 'ckpt.pt'}" + (f" and {out_dir / 'adapter.pt'}" if cfg.lora else ""))
    print(f"plot: python plot.py {out_dir / 'metrics.jsonl'}")
    return {"first": first, "last": last, "stats": stats}

if __name__ == "__main__":
    main()
