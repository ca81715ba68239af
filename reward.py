"""Reward model: a GPT body with a scalar head, fitted to pairwise preferences with the Bradley-Terry
loss; step 2 of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155; Stiennon et al. 2020,
arXiv:2009.01325), whose score rl.py then maximises with PPO or GRPO.

The idea. People find "which of these two answers is better?" easier to answer than "how good is this
answer?". Bradley and Terry (1952) model such comparisons with one hidden score per item,
P(y_w preferred to y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)). A reward model is a network r fitted to
that likelihood over preference pairs:

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)

- margin (0 unless a row has one): Llama 2 (Touvron et al. 2023, arXiv:2307.09288) asks a pair rated
  "much better" to be separated by more than one rated "slightly better".
- Only differences of r are fitted: adding a constant to every score leaves the loss unchanged, so the
  scores' level drifts where it likes. InstructGPT shifts the trained model's bias so that reference
  answers score 0 on average; --center_rewards_coefficient c instead adds c * mean((r_chosen + r_rejected)^2)
  to the loss, pulling each pair's scores towards a sum of 0 during training (TRL's RewardTrainer option,
  from Eisenstein et al. 2023, arXiv:2312.09244). A policy optimiser sees the level as a constant
  bonus per answer; GRPO's group baseline removes it, PPO's value head learns it.
The loss and its logged accuracy (share of held-out pairs with r_chosen > r_rejected) are TRL 1.16's
RewardTrainer.compute_loss (tests/test_reward.py checks them against it and a hand-written loss).

The model. The body is a GPT, as InstructGPT starts its reward model from the SFT model (the policy
that will be optimised): it already reads the task. Its language-model head goes unused; a
Linear(n_embd, 1), initialised with std 1/sqrt(n_embd + 1) as in OpenAI's lm-human-preferences,
reads the final hidden state of the LAST token of prompt + answer (the end-of-text token that closes
the answer, the one position that has seen all of it), as Hugging Face's
GPT2ForSequenceClassification reads the last non-pad token. Pairs are batched as one (2B, T) batch,
the B chosen sequences then the B rejected, right-padded: causal attention never lets a real token
see a later pad, so no attention mask is needed. --lora True trains adapters on the body (and the
head in full) and merges them at the end. `score(model, prompts, completions)` scores token lists;
`load_reward_model` reads the checkpoint back (a plain GPT checkpoint with the head beside it, so
gpt.load_checkpoint reads its body as any other GPT).

Data: --data a .jsonl of {"prompt", "chosen", "rejected"} (+ an optional numeric "margin"): the rows
dpo.py reads, read and cut as dpo.py does (each answer ends with end-of-text; a chat model's prompt
holds its chat tokens, e.g. "<|user|>add 47 38<|end|><|assistant|>").
Without --data, the built-in task: two-digit addition, "add 47 38" -> "85", shared with rl.py, drawn as a
worksheet on carrying (two problems in three need a carry from the ones into the tens). Its SFT
model learned from a sloppy teacher who forgets the carry 60% of the time (47 + 38 -> 75), so its
greedy answers are wrong on most problems with a carry: SFT imitates the demonstrations, mistakes and
all (see rl.py for what RL makes of it). It is trained on first use with sft.py's loop (about a minute
on an idle CPU; out-addition/sft.pt, shared by reward.py and rl.py). Reward-model pairs hold the right
sum against the carry mistake (the carry forgotten, or on a problem without one, made up: 12 34 -> 56);
held-out pairs come from problems that no training pair contains. The printed accuracy is on those.
(A pair whose rejected answer is one digit off by one anywhere needs the whole sum checked at the last
token: 70% after 1500 steps at this size, so the built-in task sticks to the carry.)

Run:
  python reward.py                                      # built-in task: prints pairwise accuracy last
  python reward.py --init_from out-sft/ckpt.pt --data pairs.jsonl --lora True --learning_rate 1e-4
  -> out-reward/ckpt.pt (python rl.py --reward_model out-reward/ckpt.pt --beta 1.0), out-reward/metrics.jsonl
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import common
from common import NanoError, cli
import dpo
import finetune
import gpt
import lora
import sft
import tokenizer

# ----------------------------------------------------------------------------------------
# The model and the loss


class RewardModel(nn.Module):
    """r(x, y): a GPT body and a Linear(n_embd, 1) on the hidden state of each sequence's last token."""

    def __init__(self, body: gpt.GPT):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, 1, device=body.lm_head.weight.device)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(body.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, lengths):
        """idx (B, T) right-padded sequences, lengths (B,) their real lengths -> rewards (B,) in fp32."""
        hidden = self.body.hidden_states(idx)  # (B, T, n_embd)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # the last real token
        return self.head(last).squeeze(-1).float()


def bradley_terry_loss(chosen, rejected, margin=None, center_coef=0.0):
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin), plus
    center_coef * mean((r_chosen + r_rejected)^2). chosen, rejected, margin: (B,)."""
    diff = chosen - rejected - (0.0 if margin is None else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def right_pad(seqs, device):
    """Token lists -> (B, T) ids padded with 0 on the right, and (B,) lengths."""
    idx = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return idx.to(device), torch.tensor([len(s) for s in seqs], device=device)


@torch.no_grad()
def score(model: RewardModel, prompts, completions, batch_size=64):
    """Rewards (N,) on the CPU of N answers: prompts[i] + completions[i], token lists (the completion
    ending with end-of-text where the reward model was trained so)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    block = model.body.config.block_size
    if max(len(s) for s in seqs) > block:
        raise NanoError(f"a prompt + answer has {max(len(s) for s in seqs)} tokens, more than the reward model's "
                        f"block_size {block} (shorten the prompts or --max_new_tokens)")
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    out = torch.cat([model(*right_pad(seqs[i:i + batch_size], device)).cpu()
                     for i in range(0, len(seqs), batch_size)])
    model.train(was_training)
    return out


def save_reward_model(path, model: RewardModel, spec, **extra):
    """A plain GPT checkpoint of the body, the head beside it ("reward_head")."""
    head = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
    gpt.save_checkpoint(path, model.body, spec, reward_head=head, **extra)


def load_reward_model(path, device="cpu"):
    """(RewardModel, tokenizer spec) from save_reward_model's file."""
    ckpt = gpt.read_checkpoint(path, device)
    if "reward_head" not in ckpt:
        raise NanoError(f"{path} is a language model, not a reward model (no 'reward_head'; train one with reward.py)")
    model = RewardModel(gpt.model_from_checkpoint(ckpt, path).to(device))
    model.head.load_state_dict(ckpt["reward_head"])
    return model.eval(), ckpt["tokenizer"]


# ----------------------------------------------------------------------------------------
# Pairs: dpo.py's rows, tokens, batches


def tokenize_rows(rows, tok, max_length, where):
    """Checked dpo.py rows -> [(prompt, chosen, rejected, margin)], cut as dpo.py cuts them
    (the prompt keeps its last half of max_length), and dpo.tokenize_pairs' stats."""
    pairs, stats = [], {"rows": 0, "identical_skipped": 0, "truncated": 0}
    for n, row in rows:
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise NanoError(f"{where} {n}: 'margin' must be a number (got {margin!r})")
        got, part = dpo.tokenize_pairs([(n, row)], tok, max_length, max_length // 2, where)
        stats = {k: stats[k] + part[k] for k in stats}
        pairs += [(*pair, float(margin)) for pair in got]
    return pairs, stats


def collate_pairs(pairs, device):
    """(2B, T) ids (the B chosen answers, then the B rejected), (2B,) lengths, (B,) margins."""
    seqs = [p + c for p, c, _, _ in pairs] + [p + r for p, _, r, _ in pairs]
    idx, lengths = right_pad(seqs, device)
    return idx, lengths, torch.tensor([m for *_, m in pairs], device=device)


def pair_rewards(model, pairs, device, ctx):
    idx, lengths, margin = collate_pairs(pairs, device)
    with ctx:
        chosen, rejected = model(idx, lengths).chunk(2)
    return chosen, rejected, margin


@torch.no_grad()
def evaluate(model, pairs, cfg, device, ctx):
    """Loss, pairwise accuracy (r_chosen > r_rejected, ties count as wrong) and mean margin."""
    model.eval()
    total = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for i in range(0, len(pairs), 4 * cfg.batch_size):
        part = pairs[i:i + 4 * cfg.batch_size]
        chosen, rejected, margin = pair_rewards(model, part, device, ctx)
        total["loss"] += bradley_terry_loss(chosen, rejected, margin, cfg.center_rewards_coefficient).item() * len(part)
        total["accuracy"] += (chosen > rejected).float().sum().item()
        total["margin"] += (chosen - rejected).sum().item()
    model.train()
    return {k: v / len(pairs) for k, v in total.items()}


# ----------------------------------------------------------------------------------------
# The built-in task (rl.py's too): two-digit addition from a teacher who forgets to carry

TASK_ALPHABET = " 0123456789ad"
DRAW, PROMPT, ANSWER = sft.TASKS["add"]  # "47 38" -> "add 47 38" -> "85"
TASK_BLOCK = 32


def carries(item):
    """Whether the ones column carries into the tens ("47 38": 7 + 8 = 15, yes)."""
    a, b = map(int, item.split())
    return a % 10 + b % 10 >= 10


def sloppy_answer(item, rng, forget=0.6):
    """The teacher: the right sum, except that on a problem with a carry it forgets the carry with
    probability `forget` (47 + 38 -> 75)."""
    total = int(ANSWER(item))
    return str(total - 10 if carries(item) and rng.random() < forget else total)


def carry_mistake(item):
    """The wrong answer of a pair: the sum with its carry forgotten (47 38 -> 75), or, on a problem without
    a carry, with one made up (12 34 -> 56)."""
    total = int(ANSWER(item))
    return str(total - 10 if carries(item) else total + 10)


def task_items(rng, n, test=False, carry_share=2 / 3):
    """n problems ("47 38") of a worksheet on carrying: carry_share of them need a carry. Drawn from the
    held-out tenth of all problems (sft.held_out) or from the rest."""
    items = []
    while len(items) < n:
        want_carry = rng.random() < carry_share
        item = DRAW(rng)
        while sft.held_out(item) != test or carries(item) != want_carry:
            item = DRAW(rng)
        items.append(item)
    return items


def task_prompt(tok, item):
    """The ids of a problem as a user turn, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT(item)}], tok, add_generation_prompt=True)


def task_sft_model(path, device, seed=1337, iters=1500, forget=0.6):
    """The task's SFT model at `path`: loaded if it exists, else a 2-layer char GPT trained there on the
    sloppy teacher's conversations with sft.py's loop. Returns the path."""
    path = Path(path)
    if path.is_file():
        print(f"SFT model: {path} (delete it to train again)")
        return str(path)
    tok = tokenizer.ChatTokenizer(tokenizer.load_tokenizer("char:" + TASK_ALPHABET))
    rng = random.Random(seed)

    def examples(n, test):
        convs = [[{"role": "user", "content": PROMPT(i)}, {"role": "assistant", "content": sloppy_answer(i, rng, forget)}]
                 for i in task_items(rng, n, test)]
        return [sft.to_example(*sft.render_conversation(c, tok), TASK_BLOCK) for c in convs]

    train_ex, val_ex = examples(20000, False), examples(200, True)
    config = gpt.GPTConfig(block_size=TASK_BLOCK, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=128, dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = gpt.GPT(config).to(device)
    cfg = replace(sft.SFTConfig(), max_iters=iters, learning_rate=3e-3, min_lr_ratio=0.1, batch_size=32, warmup_iters=50,
                  log_interval=100, eval_interval=iters, seed=seed)
    print(f"training the task's SFT model ({iters} iters; the teacher forgets the carry {forget:.0%} of the time)")
    path.parent.mkdir(parents=True, exist_ok=True)
    sft.train(model, list(model.parameters()), train_ex, val_ex, cfg, TASK_BLOCK, device, torch.float32,
              path.parent / "sft_metrics.jsonl")
    gpt.save_checkpoint(path, model, tok.spec, step=iters, task={"forget": forget, "seed": seed})
    return str(path)


def task_pairs(tok, n_train, n_val, seed):
    """(train, val) pairs of the built-in task: the right sum chosen, carry_mistake rejected."""
    rng = random.Random(seed)

    def pairs(items):
        return [(task_prompt(tok, i), tok.encode_ordinary(ANSWER(i)) + [tok.eot_id],
                 tok.encode_ordinary(carry_mistake(i)) + [tok.eot_id], 0.0) for i in items]

    return pairs(task_items(rng, n_train)), pairs(task_items(rng, n_val, test=True))


# ----------------------------------------------------------------------------------------
# Options, training, CLI


@dataclass
class RewardConfig:
    init_from: str = field(default="", metadata={
        "help": "the body: a checkpoint (the SFT model, as InstructGPT), gpt2, a Hugging Face folder; "
                "empty: the built-in task's SFT model (--task_ckpt)"})
    data: str = field(default="", metadata={"help": ".jsonl of prompt/chosen/rejected (+ margin); empty: the built-in task"})
    out_dir: str = field(default="out-reward", metadata={"help": "ckpt.pt and metrics.jsonl go here"})
    task_ckpt: str = field(default="out-addition/sft.pt", metadata={
        "help": "built-in task: its SFT model, trained here if missing (rl.py uses the same file)"})
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "help": "c * mean((r_chosen + r_rejected)^2) added to the loss (0: off)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters on the body (and the head), merged at the end"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = field(default="auto", metadata={"help": "comma-separated Linear names (auto: every projection)"})
    max_length: int = field(default=0, metadata={"help": "tokens per prompt + answer (0: the model's block_size)"})
    val_fraction: float = field(default=0.1, metadata={"help": "held-out share of --data pairs"})
    n_pairs: int = field(default=8000, metadata={"help": "built-in task: training pairs (and 400 held out)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step"})
    max_iters: int = 800
    learning_rate: float = field(default=1e-3, metadata={"help": "peak LR (the built-in task's; ~1e-5 full, "
                                                                 "~1e-4 LoRA for GPT-2)"})
    min_lr_ratio: float = 0.1
    warmup_iters: int = 20
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    eval_interval: int = 100
    log_interval: int = 20
    tracker: str = field(**common.tracker_option())
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "autocast dtype: auto, float32, bfloat16, float16"})
    seed: int = 1337


def check_config(cfg: RewardConfig):
    common.check_options(cfg, positive=("lora_r", "lora_alpha", "n_pairs", "batch_size", "max_iters", "learning_rate",
                                        "eval_interval", "log_interval"),
                         non_negative=("center_rewards_coefficient", "max_length", "warmup_iters", "weight_decay",
                                       "grad_clip"),
                         ranges={"min_lr_ratio": (0.0, 1.0)})
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise NanoError(f"--val_fraction must be in [0, 1) (got {cfg.val_fraction}; 1 leaves nothing to train on)")
    if cfg.data and not cfg.init_from:
        raise NanoError("--data needs --init_from (the SFT model the reward model starts from)")
    if cfg.data and not Path(cfg.data).is_file():
        raise NanoError(f"--data {cfg.data} not found (a .jsonl with prompt/chosen/rejected)")
    common.check_out_dir(cfg.out_dir)


def load_pairs(cfg: RewardConfig, tok, block_size, rows):
    """(train, val) pairs from --data or the built-in task, all checked before training."""
    if not rows:
        return task_pairs(tok, cfg.n_pairs, 400, cfg.seed)
    max_length = cfg.max_length or block_size
    if max_length > block_size:
        raise NanoError(f"--max_length {max_length} exceeds the model's block_size {block_size} (lower it)")
    pairs, stats = tokenize_rows(rows, tok, max_length, f"{cfg.data} line")
    if stats["identical_skipped"]:
        print(f"warning: skipped {stats['identical_skipped']} pair(s) whose chosen equals the rejected")
    random.Random(cfg.seed).shuffle(pairs)
    n_val = int(len(pairs) * cfg.val_fraction)
    if len(pairs) - n_val < 1:
        raise NanoError(f"no usable preference pairs in {cfg.data} ({stats['rows']} rows read)")
    return pairs[n_val:], pairs[:n_val] or pairs


def train(model, train_pairs, val_pairs, cfg, device, ctx, metrics):
    """AdamW on the trainable parameters, warmup + cosine, random batches of pairs, clipping, progress
    lines, held-out accuracy every eval_interval. Returns the last evaluation."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    last = evaluate(model, val_pairs, cfg, device, ctx)
    metrics.log({"iter": 0, "val_loss": last["loss"], "eval/accuracy": last["accuracy"]})
    print(f"step 0: held-out loss {last['loss']:.4f}, pairwise accuracy {100 * last['accuracy']:.1f}%")
    t0 = t_log = time.time()
    tokens = 0
    for it in range(1, cfg.max_iters + 1):
        lr = common.cosine_lr(it - 1, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.warmup_iters,
                              cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train_pairs[i] for i in torch.randint(len(train_pairs), (cfg.batch_size,), generator=gen).tolist()]
        chosen, rejected, margin = pair_rewards(model, batch, device, ctx)
        loss = bradley_terry_loss(chosen, rejected, margin, cfg.center_rewards_coefficient)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(2 * len(p) + len(c) + len(r) for p, c, r, _ in batch)
        row = {"iter": it, "loss": loss.item(), "lr": lr, "accuracy": (chosen > rejected).float().mean().item(),
               "margin": (chosen - rejected).mean().item()}
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            now = time.time()
            row["tok_per_s"] = tokens / (now - t_log)
            print(f"step {it}/{cfg.max_iters} | loss {row['loss']:.4f} | acc {row['accuracy']:.2f} | margin "
                  f"{row['margin']:.3f} | {row['tok_per_s']:,.0f} tok/s | ETA {(now - t0) / it * (cfg.max_iters - it):.0f}s")
            t_log, tokens = now, 0
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            last = evaluate(model, val_pairs, cfg, device, ctx)
            row.update({"val_loss": last["loss"], "eval/accuracy": last["accuracy"], "eval/margin": last["margin"]})
            print(f"step {it}: held-out loss {last['loss']:.4f}, pairwise accuracy {100 * last['accuracy']:.1f}%")
        metrics.log(row)
    return last


def add_adapters(model: RewardModel, cfg: RewardConfig):
    """LoRA on the body's projections; the head stays fully trainable (PEFT's modules_to_save)."""
    targets = None if cfg.lora_targets == "auto" else [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    try:
        lora.apply_lora(model.body, cfg.lora_r, cfg.lora_alpha, 0.0, targets)
    except ValueError as e:
        raise NanoError(f"{e} (check --lora_targets)") from None
    model.head.requires_grad_(True)


@cli
def main(argv=None):
    cfg = common.parse_config(RewardConfig, argv, __doc__)
    check_config(cfg)
    rows = None
    if cfg.data:  # every row checked before any model loads
        rows = dpo.read_jsonl(cfg.data)
        dpo.check_rows(rows, where=f"{cfg.data} line")
    device = common.pick_device(cfg.device)
    ctx = common.autocast(device, common.pick_dtype(device, cfg.dtype))
    common.set_seed(cfg.seed)
    init_from = cfg.init_from or task_sft_model(cfg.task_ckpt, device)
    try:
        body, spec, _ = finetune.load_base(init_from, device)
    except NanoError as e:
        raise NanoError(f"--init_from: {e}") from None
    tok = tokenizer.load_tokenizer(spec)
    if not cfg.data and getattr(tok, "spec", "") != "chat:char:" + TASK_ALPHABET:
        raise NanoError(f"{init_from} is not the built-in task's model (give --data, or leave --init_from empty)")
    train_pairs, val_pairs = load_pairs(cfg, tok, body.config.block_size, rows)
    model = RewardModel(body)
    sft.set_dropout(body, 0.0)
    if cfg.lora:
        add_adapters(model, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"reward model: {init_from} + a scalar head, {n_train:,} trainable parameters"
          f"{' (LoRA)' if cfg.lora else ''}; {len(train_pairs)} training / {len(val_pairs)} held-out pairs")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with common.MetricsLog(out_dir / "metrics.jsonl", tracker=cfg.tracker, config=asdict(cfg)) as metrics:
        last = train(model, train_pairs, val_pairs, cfg, device, ctx, metrics)
    if cfg.lora:
        lora.merge_lora(model.body)
    save_reward_model(out_dir / "ckpt.pt", model, spec, step=cfg.max_iters, reward_config=asdict(cfg), base=init_from)
    print(f"saved {out_dir / 'ckpt.pt'}")
    # beta 1: against a learned reward the KL anchor is needed (rl.py's docstring: reward hacking)
    print(f"next: python rl.py --reward_model {out_dir / 'ckpt.pt'} --beta 1.0"
          + (f" --init_from {init_from} --data {cfg.data}" if cfg.data else ""))
    print(f"pairwise accuracy: {100 * last['accuracy']:.1f}%")
    return last


if __name__ == "__main__":
    main()
