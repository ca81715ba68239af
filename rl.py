"""RL from feedback: PPO (Schulman et al. 2017, arXiv:1707.06347, as InstructGPT used it: Ouyang et al.
2022, arXiv:2203.02155) and GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) over one rollout
loop, against a checkable answer, a reward model (reward.py), or both.

The loop, one step:
1. rollout: take prompts_per_step prompts and sample num_generations completions of each with the
   policy (sample.generate, KV-cached, temperature 1), each up to the end-of-turn token;
2. score: every completion gets one number, the sum of the reward functions (--reward_fn, e.g. the
   exact answer: 1 or 0) and of the reward model (--reward_model), each times its --reward_weights;
3. log-probs: one forward pass without gradients gives each completion token's log-probability under
   the policy that sampled it ("old"; GRPO with one update per rollout skips it, as TRL does: at that
   update the policy still is the old one), and one under the reference (the SFT model we started
   from: the same LoRA model with its adapters switched off, as in dpo.py, or a frozen copy);
4. advantages: how much better than expected each token turned out (below, per algorithm);
5. update: a clipped policy-gradient loss over `epochs` passes of `minibatches` minibatches.

GRPO (group relative). The baseline is the group itself: each prompt's num_generations scores are
compared with their mean, A_i = (r_i - mean) / (std + 1e-4) (--scale_rewards group; batch: the std of
the whole batch; none: no division, as Dr. GRPO (Liu et al. 2025, arXiv:2503.20783) recommends), and
every token of completion i gets A_i. No value network. With the ratio rho_t = pi(y_t)/pi_old(y_t):

    per-token loss = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta * KL_t,
    KL_t = pi_ref/pi - log(pi_ref/pi) - 1          (the k3 estimator: unbiased, always >= 0)

--importance_sampling_level sequence uses one ratio per completion, exp(mean_t log rho_t) (GSPO, Zheng et
al. 2025, arXiv:2507.18071). The per-token losses are averaged by --loss_type: grpo (per completion, then
over completions: short answers weigh more per token), bnpo (over the tokens of the minibatch), dr_grpo
(sum / (completions * max_new_tokens)), dapo (Yu et al. 2025, arXiv:2503.14476: over the tokens of the
whole rollout). All as TRL 1.16's GRPOTrainer._compute_loss and its advantages (checked against it, 1e-6,
in tests/test_rl.py); defaults are TRL's (dapo, beta 0, group scaling).

PPO. A value head V (a Linear(n_embd, 1) on the policy's hidden states) predicts the return from each
position. The KL penalty goes into the reward itself: r_t = -kl_coef * (log pi_old - log pi_ref) at every
token (k1; or k3), and the score is added one step after the last token (where the episode ends; at the last
position when the completion fills max_new_tokens). Generalised advantage estimation (Schulman et al.
2016, arXiv:1506.02438) with gamma, lam:

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   returns R_t = A_t + V_t

then A is whitened over the batch's tokens. Losses: the clipped policy loss max(-A rho, -A clip(rho,
1 - c, 1 + c)) and the clipped value loss 0.5 max((V - R)^2, (clip(V, V_old +- c_v) - R)^2), summed as
pg + vf_coef * vf, over num_ppo_epochs passes (--epochs; 4 by default). Every formula is TRL 0.19.1's
PPOTrainer (the last TRL with PPO; transcribed as the reference in tests/test_rl.py).

The reward can be gamed. What the policy maximises is the reward, not what was meant. Against
reward.py's model of the built-in task (95% pairwise accuracy on held-out pairs of the right sum against
the carry mistake), GRPO with beta 0 first raises the exact match (39.5% -> 61.5% at step 20), then finds
answers the reward model never saw and scores higher than right sums ("175" for 56 + 79, "1<|system|>1"):
at step 100 its score has risen to 11.5 and the exact match fallen to 12%. The KL term is what stops it:
beta prices every step away from the reference (measured, one seed, 100 steps; KL per token, k3):

    beta                      0       0.1     0.3     1.0
    reward model's score      11.5    10.1    7.6     4.1
    KL to the reference       4.27    2.66    1.38    0.21
    exact match (was 39.5%)   12.0%   27.5%   47.0%   84.5%

(reward.py prints its next command with --beta 1.0 for that reason.) rl:longer_is_better is a simpler
proxy to game: a reward for length, as reward models often favour long answers.

Built-in task (no --data): reward.py's two-digit addition, "add 47 38" -> "85". Its SFT model learned
from a teacher who forgets the carry 60% of the time, so its greedy answers are wrong on most problems
with a carry: SFT imitates the demonstrations, mistakes and all, and more SFT on them would only fit the
mistakes better. The right answer is still sampled now and then, and a reward that checks it is all RL
needs: the exact answer on 200 held-out problems is printed before and after.

Run:
  python rl.py --algo grpo                            # built-in task (prints exact match before/after)
  python rl.py --algo ppo
  python rl.py --reward_model out-reward/ckpt.pt --beta 1.0   # reward.py's model instead (--beta 0: it hacks)
  python rl.py --reward_fn rl:exact_answer,rl:longer_is_better --reward_weights 1,0.5 --beta 0.0
  python rl.py --init_from out-sft/ckpt.pt --data prompts.jsonl --reward_fn mymodule:my_reward --lora True
  -> out-rl/ckpt.pt (a plain checkpoint: sample.py, serve.py), out-rl/metrics.jsonl, out-rl/rl.png
"""

from __future__ import annotations

import copy
import importlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import common
from common import NanoError, cli
import data
import finetune
import gpt
import lora
import reward
import sample
import tokenizer

# ----------------------------------------------------------------------------------------
# Rollouts: sample completions, and their per-token log-probabilities


@dataclass
class Rollout:
    """N prompts (each repeated num_generations times) and their sampled completions."""
    idx: torch.Tensor  # (N, P + C): left-padded prompts, then the completions
    pad: torch.Tensor  # (N,) left padding of each row
    completion: torch.Tensor  # (N, C)
    mask: torch.Tensor  # (N, C) bool: completion tokens up to and including the end-of-turn token
    prompts: list  # N token lists
    vocab_size: int  # sampled among ids below it (the tokenizer's; a model's vocabulary may be padded)


def completion_mask(tokens, stop_id):
    """True up to and including the first stop token of each row (everything when there is none)."""
    if stop_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_stop = (tokens == stop_id).int()
    return (is_stop.cumsum(1) - is_stop) == 0  # no stop strictly before this position


@torch.no_grad()
def rollout(model, prompts, max_new_tokens, temperature, stop_id, seed, vocab_size):
    """Sample one completion per prompt (token lists), as one left-padded batch (sample.generate)."""
    was_training = model.training
    model.eval()
    tokens = torch.stack(list(sample.generate(model, prompts, max_new_tokens, temperature=temperature, eos_id=stop_id,
                                              seed=seed, vocab_size=vocab_size)), dim=1)  # (N, C)
    model.train(was_training)
    ids, pad = sample.left_pad(prompts, tokens.device)
    return Rollout(torch.cat([ids, tokens], 1), pad, tokens, completion_mask(tokens, stop_id), prompts, vocab_size)


def token_logps(model, ro: Rollout, temperature, value_head=None):
    """Log-probabilities (N, C) of the completion tokens under `model` (of the sampling distribution:
    the logits divided by the temperature), and with a value head its values (N, C) at the same
    positions. Left padding gets sample.py's positions and mask; without it, plain causal attention."""
    idx, C = ro.idx, ro.completion.shape[1]
    if ro.pad.any():
        slots = torch.arange(idx.shape[1], device=idx.device)
        hidden = model.hidden_states(idx, position_ids=sample.position_ids(ro.pad, slots),
                                     attn_mask=sample.attention_mask(ro.pad, slots, idx.shape[1],
                                                                     model.config.sliding_window or None))
    else:
        hidden = model.hidden_states(idx)
    hidden = hidden[:, -C - 1:-1]  # the positions that predict completion tokens 0..C-1
    logits = model.lm_head(hidden)[..., :ro.vocab_size].float() / temperature
    logps = logits.gather(-1, ro.completion[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return logps, (value_head(hidden).squeeze(-1).float() if value_head is not None else None)


# ----------------------------------------------------------------------------------------
# GRPO: group-normalised advantages and the clipped loss (TRL 1.16's GRPOTrainer)

GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards, group_size, scale_rewards="group"):
    """(N,) rewards of N / group_size groups of completions -> (N,) advantages: reward minus its group's
    mean, divided (group, batch) or not (none) by the std (with Bessel's correction) + 1e-4."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    if scale_rewards == "group":
        std = grouped.std(1).repeat_interleave(group_size)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale_rewards == "none":
        return rewards - mean
    else:
        raise NanoError(f"unknown scale_rewards {scale_rewards!r} (group, batch or none)")
    return (rewards - mean) / (std + 1e-4)


def k3_kl(ref_logps, logps):
    """Per-token KL(pi || pi_ref) estimate exp(ref - pi) - (ref - pi) - 1 (Schulman's k3)."""
    return torch.exp(ref_logps - logps) - (ref_logps - logps) - 1


def grpo_loss(logps, old_logps, advantages, mask, ref_logps=None, beta=0.0, epsilon=0.2, epsilon_high=None,
              loss_type="dapo", importance_sampling_level="token", max_completion_length=None, num_items=None):
    """(loss, per-token losses (N, C) with 0 outside the mask, stats). logps (N, C) with gradients,
    old_logps and ref_logps (N, C) without (ref_logps may be None when beta is 0; given, its KL is in
    the stats), advantages (N,), mask (N, C) bool. num_items (dapo): the
    rollout's completion tokens per optimizer step; max_completion_length (dr_grpo)."""
    mask = mask.float()
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":  # GSPO: one ratio per completion
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    elif importance_sampling_level != "token":
        raise NanoError(f"unknown importance_sampling_level {importance_sampling_level!r} (token or sequence)")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = k3_kl(ref_logps, logps) if ref_logps is not None else None
    if beta:
        per_token = per_token + beta * kl
    masked = per_token * mask  # (N, C) also where per_token is one value per completion
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        loss = masked.sum() / max(float(num_items), 1.0)
    else:
        raise NanoError(f"unknown loss_type {loss_type!r} (one of {', '.join(GRPO_LOSSES)})")
    region = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    stats = {"clip_ratio": (region.float().expand_as(mask) * mask).sum().item() / max(mask.sum().item(), 1.0)}
    if kl is not None:
        stats["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1.0)).item()
    return loss, masked, stats


# ----------------------------------------------------------------------------------------
# PPO: per-token rewards with the KL penalty, GAE, whitening, clipped losses (TRL 0.19.1's PPOTrainer)

INVALID_LOGPROB = 1.0  # TRL's filler for log-probs past the end: equal in policy and reference, so KL 0 there


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the masked entries (unbiased variance, + 1e-8); shift_mean False adds the mean back."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def value_mask(mask):
    """The positions a value is trained at: the completion and one more (the state after the last token,
    where the score arrives)."""
    return mask | torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)


def ppo_rewards(scores, logps, ref_logps, mask, kl_coef, kl_estimator="k1"):
    """Per-token rewards (N, C) and the KL estimate (N, C): -kl_coef * KL at every completion token, the
    score added one step after the last token (at the last position when the completion fills the window)."""
    logps = logps.masked_fill(~mask, INVALID_LOGPROB)
    ref_logps = ref_logps.masked_fill(~mask, INVALID_LOGPROB)
    logr = ref_logps - logps
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    rewards = -kl_coef * kl
    lengths = mask.sum(1)
    end = torch.where(lengths < mask.shape[1], lengths, lengths - 1)
    rewards[torch.arange(len(rewards), device=rewards.device), end] += scores
    return rewards, kl


def gae(rewards, values, gamma, lam):
    """Advantages and returns (N, C) by generalised advantage estimation, from the last position back."""
    last, reversed_advantages = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def ppo_advantages(scores, logps, ref_logps, values, mask, cfg):
    """Everything PPO computes once per rollout: (advantages, returns, old values, KL), TRL's steps 4-6."""
    vmask = value_mask(mask)
    values = values.masked_fill(~vmask, 0)
    rewards, kl = ppo_rewards(scores, logps, ref_logps, mask, cfg.kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, vmask, shift_mean=False).masked_fill(~vmask, 0)
    advantages, returns = gae(rewards, values, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask).masked_fill(~mask, 0)
    return advantages, returns, values, kl


def ppo_loss(logps, old_logps, advantages, mask, vpred, old_values, returns, cliprange=0.2, cliprange_value=0.2,
             vf_coef=0.1):
    """(pg_loss + vf_coef * vf_loss, stats): the clipped policy and value losses, masked means."""
    vmask = value_mask(mask)
    logps = logps.masked_fill(~mask, INVALID_LOGPROB)
    old_logps = old_logps.masked_fill(~mask, INVALID_LOGPROB)
    vpred = vpred.masked_fill(~vmask, 0)
    vpred_clipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = torch.max((vpred - returns) ** 2, (vpred_clipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, vmask)
    ratio = torch.exp(logps - old_logps)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    stats = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
             "clip_ratio": masked_mean((pg_losses2 > pg_losses).float(), mask).item(),
             "vf_clipfrac": masked_mean(((vpred_clipped - returns) ** 2 > (vpred - returns) ** 2).float(), vmask).item()}
    return pg_loss + vf_coef * vf_loss, stats


# ----------------------------------------------------------------------------------------
# Rewards: functions of the text (module:function) and reward.py's model


def exact_answer(prompts, completions, answer, **columns):
    """1.0 where the completion is the answer (surrounding spaces ignored), else 0.0: a verifiable reward."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def longer_is_better(prompts, completions, **columns):
    """A proxy that can be gamed: the completion's length in characters (reward models often favour long answers)."""
    return [float(len(c)) for c in completions]


def load_reward_fn(name):
    """module:function -> the function (TRL's signature: fn(prompts, completions, **columns) -> floats)."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise NanoError(f"--reward_fn {name!r} is not module:function (e.g. rl:exact_answer)")
    try:
        mod = sys.modules[__name__] if module in ("rl", "__main__") else importlib.import_module(module)
    except ImportError as e:
        raise NanoError(f"--reward_fn {name}: cannot import {module} ({e.msg}; is it on PYTHONPATH?)") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise NanoError(f"--reward_fn {name}: {module} has no function {attr}")
    return fn


class Scorer:
    """The sum of the weighted rewards of one rollout, and each one's mean for the log."""

    def __init__(self, cfg, tok, spec, device):
        names = [n.strip() for n in cfg.reward_fn.split(",") if n.strip()]
        if names == ["auto"]:
            names = [] if cfg.reward_model else ["rl:exact_answer"]
        self.fns = [(n.split(":")[-1], load_reward_fn(n)) for n in names]
        self.model = None
        if cfg.reward_model:
            try:
                self.model, rm_spec = reward.load_reward_model(cfg.reward_model, device)
            except NanoError as e:
                raise NanoError(f"--reward_model: {e}") from None
            if rm_spec != spec:
                raise NanoError(f"--reward_model {cfg.reward_model} reads tokenizer {str(rm_spec)[:40]!r}, the policy "
                                f"{str(spec)[:40]!r} (train the reward model from the policy's SFT model)")
        count = len(self.fns) + (self.model is not None)
        if not count:
            raise NanoError("no reward: give --reward_fn module:function or --reward_model")
        try:
            weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else [1.0] * count
        except ValueError:
            raise NanoError(f"--reward_weights {cfg.reward_weights!r} is not comma-separated numbers (e.g. 1,0.5)") from None
        if len(weights) != count:
            raise NanoError(f"--reward_weights has {len(weights)} weights for {count} rewards (one per --reward_fn, "
                            "then the reward model)")
        self.weights, self.tok = weights, tok

    def __call__(self, ro: Rollout, columns, stop_id):
        prompts = [self.tok.decode(p) for p in ro.prompts]
        completions = [self.tok.decode([t for t, m in zip(c, k) if m and t != stop_id])
                       for c, k in zip(ro.completion.tolist(), ro.mask.tolist())]
        parts = {}
        for name, fn in self.fns:
            try:
                values = fn(prompts, completions, **columns)
            except TypeError as e:  # e.g. exact_answer without an "answer" column
                raise NanoError(f"reward function {name}: {e} (give the column in --data)") from None
            if len(values) != len(completions):
                raise NanoError(f"reward function {name} returned {len(values)} rewards for {len(completions)} "
                                "completions (one number each)")
            parts[name] = torch.tensor([float(v) for v in values])
        if self.model is not None:
            ids = [c[:int(k.sum())] for c, k in zip(ro.completion.tolist(), ro.mask)]
            parts["reward_model"] = reward.score(self.model, ro.prompts, ids)
        total = sum(w * v for w, v in zip(self.weights, parts.values()))
        return total.to(ro.idx.device), {f"rewards/{k}": v.mean().item() for k, v in parts.items()}, completions


# ----------------------------------------------------------------------------------------
# Prompts: --data or the built-in task


def read_prompts(path):
    """[(prompt text, other columns)] of a .jsonl with a "prompt" per line; errors name the line."""
    rows = []
    for n, line in enumerate(data.read_text_file(path, "--data").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise NanoError(f"{path} line {n}: needs a non-empty string 'prompt'")
        rows.append((row["prompt"], {k: v for k, v in row.items() if k != "prompt"}))
    if not rows:
        raise NanoError(f"{path} has no prompts (one {{\"prompt\": ...}} per line)")
    return rows


def load_prompts(cfg, tok, rows):
    """(train, test): lists of (prompt ids, columns). The test prompts are what exact match is measured on."""
    if rows is None:
        rng = random.Random(cfg.seed)
        train = [(reward.task_prompt(tok, i), {"answer": reward.ANSWER(i)}) for i in reward.task_items(rng, 5000)]
        test = [(reward.task_prompt(tok, i), {"answer": reward.ANSWER(i)})
                for i in reward.task_items(random.Random(0), cfg.n_test, test=True)]
        return train, test
    rows = [(tok.encode(p), cols) for p, cols in rows]
    random.Random(cfg.seed).shuffle(rows)
    n_test = min(cfg.n_test, max(1, len(rows) // 5))
    return rows[n_test:] or rows, rows[:n_test]  # one prompt alone: trained on and tested


def batch_columns(examples):
    keys = set().union(*(cols.keys() for _, cols in examples))
    return {k: [cols.get(k) for _, cols in examples] for k in keys}


# ----------------------------------------------------------------------------------------
# Options


@dataclass
class RLConfig:
    algo: str = field(default="grpo", metadata={"help": "grpo | ppo"})
    init_from: str = field(default="", metadata={
        "help": "the policy (and reference): an SFT checkpoint, gpt2, a Hugging Face folder; empty: the built-in "
                "task's SFT model (--task_ckpt)"})
    data: str = field(default="", metadata={
        "help": ".jsonl of {\"prompt\": ...} (+ columns the reward functions read, e.g. \"answer\"); empty: built-in task"})
    reward_fn: str = field(default="auto", metadata={
        "help": "comma-separated module:function rewards (auto: rl:exact_answer, or none with --reward_model)"})
    reward_model: str = field(default="", metadata={"help": "a reward.py checkpoint whose score is a reward"})
    reward_weights: str = field(default="", metadata={"help": "comma-separated weights: each --reward_fn, then the reward model"})
    out_dir: str = field(default="out-rl", metadata={"help": "ckpt.pt, metrics.jsonl, rl.png (and adapter.pt) go here"})
    task_ckpt: str = field(default="out-addition/sft.pt", metadata={
        "help": "built-in task: its SFT model (trained here if missing; shared with reward.py)"})
    steps: int = field(default=100, metadata={"help": "rollout + update steps"})
    prompts_per_step: int = 16
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (GRPO's group size)"})
    max_new_tokens: int = field(default=6, metadata={"help": "longest completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts (> 0)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "the built-in task's; ~1e-6 full, ~1e-5 LoRA for GPT-2"})
    epochs: int = field(default=0, metadata={"help": "passes over each rollout (0: GRPO 1, PPO 4)"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass over a rollout"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the policy ratio (PPO's cliprange)"})
    epsilon_high: float = field(default=0.0, metadata={"help": "GRPO: upper clip range (0: = epsilon; DAPO 0.28)"})
    beta: float = field(default=0.0, metadata={"help": "GRPO: KL coefficient (k3 estimator; TRL's default 0)"})
    loss_type: str = field(default="dapo", metadata={"help": "GRPO: grpo | bnpo | dr_grpo | dapo"})
    scale_rewards: str = field(default="group", metadata={"help": "GRPO: group | batch | none"})
    importance_sampling_level: str = field(default="token", metadata={"help": "GRPO: token | sequence (GSPO)"})
    kl_coef: float = field(default=0.05, metadata={"help": "PPO: KL penalty per token in the reward"})
    kl_estimator: str = field(default="k1", metadata={"help": "PPO: k1 | k3"})
    gamma: float = field(default=1.0, metadata={"help": "PPO: discount"})
    lam: float = field(default=0.95, metadata={"help": "PPO: GAE lambda"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: weight of the value loss"})
    cliprange_value: float = field(default=0.2, metadata={"help": "PPO: clip range of the value"})
    whiten_rewards: bool = field(default=False, metadata={"help": "PPO: whiten the per-token rewards"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters; the reference is the model with them off"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = field(default="auto", metadata={"help": "comma-separated Linear names (auto: every projection)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    n_test: int = field(default=200, metadata={"help": "held-out prompts for exact match (--data: at most a fifth)"})
    eval_interval: int = 20
    log_interval: int = 5
    tracker: str = field(**common.tracker_option())
    plot: bool = field(default=True, metadata={"help": "draw out_dir/rl.png (needs matplotlib)"})
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "autocast dtype: auto, float32, bfloat16, float16"})
    seed: int = 1337


def check_config(cfg: RLConfig):
    common.check_options(cfg, positive=("steps", "prompts_per_step", "num_generations", "max_new_tokens", "temperature",
                                        "learning_rate", "minibatches", "lora_r", "lora_alpha", "eval_interval",
                                        "log_interval", "n_test"),
                         non_negative=("epochs", "epsilon", "epsilon_high", "beta", "kl_coef", "vf_coef",
                                       "cliprange_value", "grad_clip"),
                         ranges={"gamma": (0.0, 1.0), "lam": (0.0, 1.0)})
    choices = {"algo": ("grpo", "ppo"), "loss_type": GRPO_LOSSES, "scale_rewards": ("group", "batch", "none"),
               "importance_sampling_level": ("token", "sequence"), "kl_estimator": ("k1", "k3")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise NanoError(f"unknown --{name} {getattr(cfg, name)!r} (one of {', '.join(allowed)})")
    if cfg.algo == "grpo" and cfg.num_generations < 2:
        raise NanoError("GRPO compares completions within a group: --num_generations must be >= 2")
    if (cfg.prompts_per_step * cfg.num_generations) % cfg.minibatches:
        raise NanoError(f"--minibatches {cfg.minibatches} must divide the {cfg.prompts_per_step * cfg.num_generations} "
                        "completions of a step")
    if cfg.data and not cfg.init_from:
        raise NanoError("--data needs --init_from (the SFT model to start from)")
    for name in ("data", "reward_model"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
            raise NanoError(f"--{name} {getattr(cfg, name)} not found (check the path)")
    common.check_out_dir(cfg.out_dir)


# ----------------------------------------------------------------------------------------
# The loop


class Policy:
    """The model being trained, how to get its reference log-probs, and (PPO) its value head."""

    def __init__(self, model, cfg, base):
        self.model, self.cfg = model, cfg
        model.eval()  # no dropout anywhere: the policy, its old self and the reference compute the same function
        if cfg.lora:
            targets = None if cfg.lora_targets == "auto" else [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
            try:
                lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, 0.0, targets)
            except ValueError as e:
                raise NanoError(f"{e} (check --lora_targets)") from None
            model.lora_base = base
        # the reference: the adapters switched off, or a frozen copy (also with beta 0: the KL is logged)
        self.ref_model = None if cfg.lora else copy.deepcopy(model).requires_grad_(False)
        self.value_head = None
        if cfg.algo == "ppo":
            device = model.lm_head.weight.device
            self.value_head = nn.Linear(model.config.n_embd, 1, device=device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.params += list(self.value_head.parameters()) if self.value_head is not None else []

    @torch.no_grad()
    def ref_logps(self, ro, ctx):
        with ctx:
            if self.ref_model is not None:
                return token_logps(self.ref_model, ro, self.cfg.temperature)[0]
            with lora.disable_adapters(self.model):
                return token_logps(self.model, ro, self.cfg.temperature)[0]


def make_batch(policy, examples, cfg, step, stop_id, vocab_size, scorer, ctx):
    """Steps 1-4 of the loop for one batch of prompts: rollout, scores, log-probs, advantages."""
    t0 = time.time()
    group = [ex for ex in examples for _ in range(cfg.num_generations)]
    ro = rollout(policy.model, [p for p, _ in group], cfg.max_new_tokens, cfg.temperature, stop_id,
                 cfg.seed * 1_000_003 + step, vocab_size)
    t1 = time.time()
    scores, parts, _ = scorer(ro, batch_columns(group), stop_id)
    t2 = time.time()
    batch = {"ro": ro, "ref_logps": policy.ref_logps(ro, ctx), "scores": scores, "old_logps": None}
    mask = ro.mask.float()
    stats = {"reward": scores.mean().item(), "reward_std": scores.std().item(), **parts,
             "completion_length": mask.sum(1).mean().item()}
    if cfg.algo == "grpo":
        batch["advantages"] = group_advantages(scores, cfg.num_generations, cfg.scale_rewards)
        if (cfg.epochs or 1) > 1 or cfg.minibatches > 1:  # else old = the policy itself, at its only update (TRL)
            with torch.no_grad(), ctx:
                batch["old_logps"] = token_logps(policy.model, ro, cfg.temperature)[0]
    else:
        with torch.no_grad(), ctx:
            batch["old_logps"], values = token_logps(policy.model, ro, cfg.temperature, policy.value_head)
        batch["advantages"], batch["returns"], batch["values"], kl = ppo_advantages(
            scores, batch["old_logps"], batch["ref_logps"], values, ro.mask, cfg)
        stats["kl"] = (kl * mask).sum().item() / mask.sum().item()
    stats.update({"time/rollout": t1 - t0, "time/score": t2 - t1, "time/logps": time.time() - t2,
                  "rollout_tokens": int(mask.sum().item())})
    return batch, stats


def select(batch, rows):
    """The minibatch of a batch: the same rows of every tensor."""
    ro = batch["ro"]
    part = Rollout(ro.idx[rows], ro.pad[rows], ro.completion[rows], ro.mask[rows], [ro.prompts[i] for i in rows],
                   ro.vocab_size)
    return {k: part if k == "ro" else (v[rows] if torch.is_tensor(v) else v) for k, v in batch.items()}


def minibatch_loss(policy, mb, cfg, num_items, ctx):
    with ctx:
        logps, vpred = token_logps(policy.model, mb["ro"], cfg.temperature, policy.value_head)
    if cfg.algo == "ppo":
        return ppo_loss(logps, mb["old_logps"], mb["advantages"], mb["ro"].mask, vpred, mb["values"], mb["returns"],
                        cfg.epsilon, cfg.cliprange_value, cfg.vf_coef)
    old_logps = logps.detach() if mb["old_logps"] is None else mb["old_logps"]
    loss, _, stats = grpo_loss(logps, old_logps, mb["advantages"], mb["ro"].mask, mb["ref_logps"], cfg.beta,
                               cfg.epsilon, cfg.epsilon_high or None, cfg.loss_type, cfg.importance_sampling_level,
                               cfg.max_new_tokens, num_items)
    return loss, stats


def update(policy, optimizer, batch, cfg, generator, ctx):
    """Step 5: epochs x minibatches optimizer steps on one rollout. Returns mean stats."""
    n = batch["ro"].idx.shape[0]
    epochs = cfg.epochs or (4 if cfg.algo == "ppo" else 1)
    num_items = batch["ro"].mask.sum().item() / cfg.minibatches  # dapo: tokens per optimizer step (TRL)
    totals, count = {}, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for rows in order.chunk(cfg.minibatches):
            loss, stats = minibatch_loss(policy, select(batch, rows), cfg, num_items, ctx)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(policy.params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": loss.item(), **stats}.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
    return {k: v / count for k, v in totals.items()}, epochs


@torch.no_grad()
def evaluate(policy, tests, cfg, stop_id, vocab_size, scorer):
    """Greedy answers to the held-out prompts: exact match where they have an answer, and the mean reward."""
    ro = rollout(policy.model, [p for p, _ in tests], cfg.max_new_tokens, 0.0, stop_id, None, vocab_size)
    scores, _, completions = scorer(ro, batch_columns(tests), stop_id)
    out = {"eval/reward": scores.mean().item()}
    answers = [cols.get("answer") for _, cols in tests]
    if all(a is not None for a in answers):
        out["eval/exact_match"] = sum(exact_answer(None, completions, answers)) / len(tests)
    return out, completions


def train(policy, train_set, test_set, cfg, stop_id, vocab_size, scorer, ctx, log):
    """The loop: batches of prompts in a shuffled cycle, rollout -> update, progress lines and metrics
    rows every log_interval steps, held-out evaluation every eval_interval. Returns (first, last) evaluations."""
    optimizer = torch.optim.AdamW(policy.params, lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    order, cursor = [], 0
    first, _ = evaluate(policy, test_set, cfg, stop_id, vocab_size, scorer)
    log({"step": 0, **first})
    last, interval, t_start = first, [], time.time()
    for step in range(1, cfg.steps + 1):
        if cursor + cfg.prompts_per_step > len(order):
            order, cursor = torch.randperm(len(train_set), generator=generator).tolist(), 0
        examples = [train_set[i] for i in order[cursor:cursor + cfg.prompts_per_step]]
        cursor += cfg.prompts_per_step
        batch, stats = make_batch(policy, examples, cfg, step, stop_id, vocab_size, scorer, ctx)
        t0 = time.time()
        train_stats, epochs = update(policy, optimizer, batch, cfg, generator, ctx)
        stats.update(train_stats, **{"time/train": time.time() - t0, "trained_tokens": batch["ro"].idx.numel() * epochs})
        interval.append(stats)
        if step % cfg.log_interval == 0 or step == cfg.steps:
            log(progress(step, interval, cfg, t_start))
            interval = []
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            last, _ = evaluate(policy, test_set, cfg, stop_id, vocab_size, scorer)
            log({"step": step, **last})
            print(f"eval step {step}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in last.items()))
    return first, last


def progress(step, interval, cfg, t_start):
    """One metrics row (the interval's means) and its progress line."""
    row = {"step": step, "lr": cfg.learning_rate,
           **{k: sum(s[k] for s in interval) / len(interval) for k in interval[-1] if not k.startswith(("time/", "rollout_t", "trained_t"))}}
    spent = {k: sum(s[k] for s in interval) for k in interval[-1] if k.startswith("time/")}
    row["rollout_tok_per_s"] = sum(s["rollout_tokens"] for s in interval) / max(spent["time/rollout"], 1e-9)
    row["train_tok_per_s"] = sum(s["trained_tokens"] for s in interval) / max(spent["time/train"], 1e-9)
    row["tokens_per_s"] = sum(s["rollout_tokens"] for s in interval) / max(sum(spent.values()), 1e-9)
    row.update({k: v / len(interval) for k, v in spent.items()})
    eta = (time.time() - t_start) / step * (cfg.steps - step)
    print(f"step {step}/{cfg.steps} | loss {row['loss']:.4f} | reward {row['reward']:.3f} (std {row['reward_std']:.2f}) | "
          f"KL {row['kl']:.4f} | length {row['completion_length']:.1f} | rollout {row['rollout_tok_per_s']:,.0f} tok/s, "
          f"train {row['train_tok_per_s']:,.0f} tok/s | ETA {eta:.0f}s")
    return row


def draw(rows, out):
    """out: reward, held-out exact match (or reward), KL and completion length against the step."""
    import plot  # only for the picture

    plt = plot.load_pyplot()
    keys = [("reward", "reward (train)"), ("eval/exact_match", "exact match (held out)"), ("kl", "KL to reference"),
            ("completion_length", "completion tokens")]
    keys = [(k, label) for k, label in keys if plot.series(rows, k, "step")[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        ax.plot(*plot.series(rows, key, "step"), marker="o" if key.startswith("eval/") else None, ms=3)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    return plot.save_figure(fig, out)


def load_policy(cfg, device):
    """(model, tokenizer, its spec, what it was loaded from); the built-in task's SFT model without --init_from."""
    init_from = cfg.init_from or reward.task_sft_model(cfg.task_ckpt, device)
    try:
        model, spec, base = finetune.load_base(init_from, device)
    except NanoError as e:
        raise NanoError(f"--init_from: {e}") from None
    tok = tokenizer.load_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise NanoError(f"tokenizer {str(spec)[:40]!r} has {tok.vocab_size} tokens, the model only "
                        f"{model.config.vocab_size} (a checkpoint with another tokenizer?)")
    if not cfg.data and getattr(tok, "spec", "") != "chat:char:" + reward.TASK_ALPHABET:
        raise NanoError(f"{init_from} is not the built-in task's model (give --data, or leave --init_from empty)")
    return model, tok, spec, base


@cli
def main(argv=None):
    cfg = common.parse_config(RLConfig, argv, __doc__)
    check_config(cfg)
    rows = read_prompts(cfg.data) if cfg.data else None  # every row checked before any model loads
    device = common.pick_device(cfg.device)
    ctx = common.autocast(device, common.pick_dtype(device, cfg.dtype))
    common.set_seed(cfg.seed)
    model, tok, spec, base = load_policy(cfg, device)
    template = tokenizer.HFChatTemplate.find(spec)
    stop_id = tokenizer.stop_id(tok, template) if template or isinstance(tok, tokenizer.ChatTokenizer) else tok.eot_id
    train_set, test_set = load_prompts(cfg, tok, rows)
    longest = max(len(p) for p, _ in train_set + test_set) + cfg.max_new_tokens
    if longest > model.config.block_size:
        raise NanoError(f"a prompt + --max_new_tokens {cfg.max_new_tokens} is {longest} tokens, more than block_size "
                        f"{model.config.block_size} (shorten the prompts or --max_new_tokens)")
    scorer = Scorer(cfg, tok, spec, device)
    policy = Policy(model, cfg, base)
    print(f"{cfg.algo.upper()} on {len(train_set)} prompts, {cfg.prompts_per_step} x {cfg.num_generations} completions "
          f"a step; {sum(p.numel() for p in policy.params):,} trainable parameters{' (LoRA)' if cfg.lora else ''}; "
          f"rewards: {', '.join([n for n, _ in scorer.fns] + (['reward model'] if scorer.model else []))}")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_logged = []
    with common.MetricsLog(out_dir / "metrics.jsonl", tracker=cfg.tracker, config=asdict(cfg)) as metrics:
        def log(row):
            rows_logged.append(row)
            metrics.log(row)

        first, last = train(policy, train_set, test_set, cfg, stop_id, tok.vocab_size, scorer, ctx, log)
    if cfg.lora:
        lora.save_lora(out_dir / "adapter.pt", model, base)
        lora.merge_lora(model)
    gpt.save_checkpoint(out_dir / "ckpt.pt", model, spec, step=cfg.steps, rl_config=asdict(cfg), base=base)
    print(f"saved {out_dir / 'ckpt.pt'}" + (f" and {out_dir / 'adapter.pt'}" if cfg.lora else ""))
    if cfg.plot:
        try:
            print(f"wrote {draw(rows_logged, out_dir / 'rl.png')}")
        except NanoError as e:
            print(f"note: no picture ({e})")
    chat = template is not None or isinstance(tok, tokenizer.ChatTokenizer)
    print(f"next: python {'serve.py' if chat else 'sample.py'} --ckpt {out_dir / 'ckpt.pt'}{' --chat' if chat else ''}")
    print(f"plot: python plot.py {out_dir / 'metrics.jsonl'}")
    if "eval/exact_match" in first:
        print(f"exact match before: {100 * first['eval/exact_match']:.1f}% after: {100 * last['eval/exact_match']:.1f}%")
    else:
        print(f"held-out reward before: {first['eval/reward']:.3f} after: {last['eval/reward']:.3f}")
    return {"first": first, "last": last}


if __name__ == "__main__":
    main()
