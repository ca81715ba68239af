"""Interpretability: look inside a GPT. Hooks at TransformerLens' names, attention patterns, head
scores, the logit lens, direct logit attribution, activation patching, what finetuning changed,
and induction heads appearing in a 2-layer attention-only model trained on a CPU.

A transformer's residual stream is a sum: the embeddings, plus what every attention head and MLP
writes into it (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"). Reading
the terms of that sum, and the attention patterns that route information between positions, is
most of what this file does:

- hooks: `run_with_cache(model, idx)` returns (logits, {name: activation}) with TransformerLens'
  names (`blocks.0.attn.hook_pattern`, `blocks.3.hook_resid_post`, ...); `run_with_hooks(model,
  idx, fwd_hooks=[(name, fn)])` calls fn(activation, name) there, and a tensor it returns replaces
  the activation. They run their own forward over gpt.GPT's modules and weights, written out
  step by step, so gpt.py's forward stays as it is and costs the same;
- head scores: previous-token, duplicate-token and induction heads found by comparing each
  head's pattern with the pattern such a head would have (TransformerLens' head_detector);
- the logit lens (nostalgebraist 2020): the final norm and head applied to the residual stream
  after every layer: when does the model "know" the next token?
- direct logit attribution: what each head writes, projected on an answer's unembedding;
- activation patching (Meng et al. 2022, "Locating and Editing Factual Associations"): run a
  corrupted prompt, put back one activation of the clean prompt, see how much of the clean
  answer returns: which layer and position carry the information;
- base vs tuned: per layer, how far SFT or DPO moved the residual stream and each head's pattern;
- induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads"): a 2-layer
  attention-only model trained on repeated random token spans learns a previous-token head in
  layer 0 and an induction head in layer 1 that K-composes with it, and the loss on the repeated
  part falls with it; a 1-layer model cannot compose heads and does not.

GPTConfig has no switch for "no MLP", so `attention_only(model)` removes the MLPs of a gpt.GPT
in place. The experiment's models use rotary positions: with learned positions no previous-token
head, and so no induction head, appeared within 750-1500 steps (measured, learning rates 1e-3 and
3e-3); with rotary positions both appear at steps 200-300. Measured (3 seeds, 600 steps): 2-layer
induction score 0.83, loss on the repeats 0.08 nats; 1-layer 0.09 and 3.13.

Run (each subcommand takes --help; pictures need matplotlib: pip install matplotlib):
  python interp.py induction          # 3 seeds x (2-layer, 1-layer) -> out-interp/induction.png, .json
  python interp.py patterns           # out/ckpt.pt (train.py's), a prompt -> out-interp/patterns.png
  python interp.py head-scores --init_from gpt2
  python interp.py logit-lens --init_from gpt2 --prompt "The Eiffel Tower is in the city of"
  python interp.py attribution --init_from gpt2 --answer " Mary" --wrong " John" \\
      --prompt "When Mary and John went to the store, John gave a drink to"
  python interp.py patch --init_from gpt2 --answer " Mary" --wrong " John" \\
      --prompt "When Mary and John went to the store, John gave a drink to" \\
      --corrupted "When Mary and John went to the store, Mary gave a drink to"
  python interp.py base-vs-tuned --base out/ckpt.pt --tuned out-sft/ckpt.pt,out-dpo/ckpt.pt
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import gpt
import tokenizer
from common import NanoError

# ----------------------------------------------------------------------------------------
# The hooked forward: gpt.GPT's computation written out, a hook at every TransformerLens name
#
#   hook_embed, hook_pos_embed (learned positions only)
#   blocks.{L}.hook_resid_pre -> ln1.hook_scale, ln1.hook_normalized
#     -> attn.hook_q, hook_k, hook_v (B, T, heads, head_dim; k and v have n_kv_head heads)
#     -> attn.hook_rot_q, hook_rot_k (rotary positions only)
#     -> attn.hook_attn_scores (B, heads, T, T; masked: -inf) -> attn.hook_pattern -> attn.hook_z
#   blocks.{L}.hook_attn_out -> hook_resid_mid -> ln2.* -> mlp.hook_pre (SwiGLU: also
#     hook_pre_linear) -> mlp.hook_post -> hook_mlp_out -> hook_resid_post
#   ln_final.hook_scale, ln_final.hook_normalized
# An attention-only block has, as in TransformerLens, no hook_resid_mid and no MLP hooks.
# hook_scale is the norm's divisor (std or RMS), hook_normalized the normalised vector before
# the gain and bias (as TransformerLens 4.3). Dropout is off, as in model.eval().


def head_shape(attn) -> tuple[int, int, int]:
    """(n_head, n_kv_head, head_dim) of a gpt.CausalSelfAttention: the one place that reads its
    head attributes by name."""
    return attn.n_head, attn.n_kv_head, attn.head_dim


class NoMLP(nn.Module):
    """An attention-only block's MLP (Elhage et al. 2021): it adds nothing to the residual stream."""

    def forward(self, x):
        return torch.zeros_like(x)


def attention_only(model: gpt.GPT) -> gpt.GPT:
    """Remove every block's MLP and the norm before it. GPTConfig has no switch for this, so the
    blocks are edited in place: gpt.GPT's own forward (and loss) then computes x + attn(ln_1(x))
    per block. Its state dict lacks those weights: it is a model for this file's experiments."""
    for block in model.transformer.h:
        block.ln_2, block.mlp = nn.Identity(), NoMLP()
    return model


class Hooks:
    """What the hooked forward calls at every name: the user's functions in order (a returned
    tensor replaces the activation), then the cache keeps the activation if its name is wanted."""

    def __init__(self, names=None, fwd_hooks=()):
        self.names = {names} if isinstance(names, str) else names if names is None or callable(names) else set(names)
        self.cache, self.fns, self.seen = {}, {}, set()
        for name, fn in fwd_hooks:
            self.fns.setdefault(name, []).append(fn)

    def wanted(self, name) -> bool:
        if self.names is None:
            return True
        return self.names(name) if callable(self.names) else name in self.names

    def __call__(self, name, x):
        self.seen.add(name)
        for fn in self.fns.get(name, ()):
            out = fn(x, name)
            x = x if out is None else out
        if self.wanted(name):
            self.cache[name] = x.detach()
        return x

    def check(self):
        """After a forward: every name asked for must exist (a typo must not pass silently)."""
        asked = list(self.fns) + ([] if self.names is None or callable(self.names) else list(self.names))
        unknown = sorted(set(asked) - self.seen)
        if unknown:
            raise NanoError(f"no hook named {unknown[0]!r} in this model (interp.hook_names(model) lists them)")


def hooked_norm(norm, x, hook, prefix):
    """LayerNorm or gpt.RMSNorm written out: hook_scale is the divisor (std or RMS), hook_normalized
    the normalised input before the gain and bias."""
    rms = isinstance(norm, gpt.RMSNorm)
    h = x.float() if rms else x  # RMSNorm in fp32, as gpt.RMSNorm (and Hugging Face's)
    centred = h if rms else h - h.mean(-1, keepdim=True)
    scale = hook(prefix + "hook_scale", (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt())
    out = hook(prefix + "hook_normalized", centred / scale).to(x.dtype) * norm.weight
    return out + norm.bias if getattr(norm, "bias", None) is not None else out


def hooked_attention(attn, x, rope, hook, prefix):
    """Causal self-attention written out: q, k, v per head, scores, pattern, z, output projection.
    gpt.py runs the middle part as one fused kernel (SDPA); here every step can be read."""
    B, T, _ = x.shape
    n_head, n_kv_head, head_dim = head_shape(attn)
    if attn.fused:  # GPT-2: one matrix for q, k and v
        q, k, v = attn.c_attn(x).split(attn.split, dim=2)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.view(B, T, n_head, head_dim)
    k, v = k.view(B, T, n_kv_head, head_dim), v.view(B, T, n_kv_head, head_dim)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = hook(prefix + "hook_q", q), hook(prefix + "hook_k", k), hook(prefix + "hook_v", v)
    if rope is not None:  # rotary positions: hook_q/k before, hook_rot_q/k after (apply_rope: heads first)
        q = hook(prefix + "hook_rot_q", gpt.apply_rope(q.transpose(1, 2), *rope).transpose(1, 2))
        k = hook(prefix + "hook_rot_k", gpt.apply_rope(k.transpose(1, 2), *rope).transpose(1, 2))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
    group = n_head // n_kv_head  # grouped-query attention: query head h reads key/value head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    if attn.window:  # Mistral's sliding window: keys window or more back are masked too
        future |= torch.ones_like(future).tril(-attn.window)
    scores = hook(prefix + "hook_attn_scores", scores.masked_fill(future, float("-inf")))
    pattern = hook(prefix + "hook_pattern", scores.softmax(dim=-1))
    z = hook(prefix + "hook_z", (pattern @ v).transpose(1, 2))  # (B, T, heads, head_dim)
    out_proj = attn.c_proj if attn.fused else attn.o_proj
    return out_proj(z.reshape(B, T, n_head * head_dim))


def hooked_mlp(mlp, x, hook, prefix):
    if isinstance(mlp, gpt.SwiGLU):  # TransformerLens' gated MLP: hook_pre is the gate's input
        pre, linear = hook(prefix + "hook_pre", mlp.gate_proj(x)), hook(prefix + "hook_pre_linear", mlp.up_proj(x))
        return mlp.down_proj(hook(prefix + "hook_post", F.silu(pre) * linear))
    if isinstance(mlp, gpt.MLP):
        pre = hook(prefix + "hook_pre", mlp.c_fc(x))
        return mlp.c_proj(hook(prefix + "hook_post", mlp.gelu(pre)))
    raise NanoError(f"interp.py reads GPT-2 and SwiGLU MLPs, not {type(mlp).__name__} (use a dense model)")


def hooked_block(block, x, rope, hook, prefix):
    x = hook(prefix + "hook_resid_pre", x)
    attn_in = hooked_norm(block.ln_1, x, hook, prefix + "ln1.")
    attn_out = hook(prefix + "hook_attn_out", hooked_attention(block.attn, attn_in, rope, hook, prefix + "attn."))
    if isinstance(block.mlp, NoMLP):  # attention-only: nothing between attention and resid_post
        return hook(prefix + "hook_resid_post", x + attn_out)
    x = hook(prefix + "hook_resid_mid", x + attn_out)
    mlp_in = hooked_norm(block.ln_2, x, hook, prefix + "ln2.")
    mlp_out = hook(prefix + "hook_mlp_out", hooked_mlp(block.mlp, mlp_in, hook, prefix + "mlp."))
    return hook(prefix + "hook_resid_post", x + mlp_out)


def hooked_forward(model: gpt.GPT, idx, hook):
    """gpt.GPT's forward without cache or loss, calling hook(name, activation) at every name."""
    B, T = idx.shape
    if T > model.config.block_size:
        raise NanoError(f"sequence length {T} exceeds block_size {model.config.block_size} (shorten the prompt)")
    tr, positions, rope = model.transformer, torch.arange(T, device=idx.device), None
    x = hook("hook_embed", tr.wte(idx))
    if "wpe" in tr:
        x = x + hook("hook_pos_embed", tr.wpe(positions).expand(B, T, -1))
    else:
        rope = gpt.rope_angles(model.config, positions, x.dtype)
    for layer, block in enumerate(tr.h):
        x = hooked_block(block, x, rope, hook, f"blocks.{layer}.")
    return model.lm_head(hooked_norm(tr.ln_f, x, hook, "ln_final."))


def run_with_cache(model: gpt.GPT, idx, names=None):
    """(logits, cache): cache maps each hook name to its activation (detached, no gradients).
    names: None for all, a list of names, or a function name -> bool (TransformerLens' names_filter)."""
    hooks = Hooks(names)
    with torch.no_grad():
        logits = hooked_forward(model, idx, hooks)
    hooks.check()
    return logits, hooks.cache


def run_with_hooks(model: gpt.GPT, idx, fwd_hooks=()):
    """Logits of a forward that calls fn(activation, name) at each (name, fn) of fwd_hooks; a
    tensor fn returns replaces the activation downstream (TransformerLens' convention)."""
    hooks = Hooks(names=(), fwd_hooks=fwd_hooks)
    logits = hooked_forward(model, idx, hooks)
    hooks.check()
    return logits


def hook_names(model: gpt.GPT) -> list[str]:
    """Every hook name of this model, in the order the forward reaches them."""
    return list(run_with_cache(model, torch.zeros(1, 1, dtype=torch.long, device=model.lm_head.weight.device))[1])


# ----------------------------------------------------------------------------------------
# Attention patterns and head scores (TransformerLens' head_detector)


def attention_patterns(model: gpt.GPT, idx) -> torch.Tensor:
    """(n_layer, B, n_head, T, T): every head's attention pattern (row: query, column: key)."""
    _, cache = run_with_cache(model, idx, names=lambda name: name.endswith("attn.hook_pattern"))
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.config.n_layer)])


HEAD_KINDS = ("previous_token", "duplicate_token", "induction")


def detection_pattern(tokens, kind: str) -> torch.Tensor:
    """The (T, T) pattern a head of this kind would have on tokens (T,): a previous-token head
    attends to position i - 1; a duplicate-token head to earlier copies of its token; an
    induction head to the token after an earlier copy of its token (A B ... A -> attend to B)."""
    if kind not in HEAD_KINDS:
        raise NanoError(f"unknown head kind {kind!r} ({', '.join(HEAD_KINDS)})")
    T = tokens.shape[-1]
    if kind == "previous_token":
        return torch.diag(torch.ones(T - 1), -1)
    duplicate = (tokens[:, None] == tokens[None, :]).float().cpu().tril(-1)
    if kind == "duplicate_token":
        return duplicate
    return torch.cat([torch.zeros(T, 1), duplicate[:, :-1]], dim=1).tril()  # one key to the right


def pattern_score(pattern, detection, exclude_bos=False, exclude_current_token=False, error_measure="mul") -> float:
    """How well one head's (T, T) pattern matches a detection pattern, as TransformerLens'
    compute_head_attention_similarity_score. "mul": the share of the attention that falls where
    the detection pattern has ones; "abs": 1 - (mean |pattern - detection|) * T, rounded to 3 places."""
    if error_measure == "mul":
        pattern = pattern.clone()
        if exclude_bos:
            pattern[:, 0] = 0
        if exclude_current_token:
            pattern.fill_diagonal_(0)
        return ((pattern * detection).sum() / pattern.sum()).item()
    if error_measure != "abs":
        raise NanoError(f"unknown error_measure {error_measure!r} (mul or abs)")
    diff = (pattern - detection).abs()
    if exclude_bos:
        diff[:, 0] = 0
    if exclude_current_token:
        diff.fill_diagonal_(0)
    return 1 - round((diff.mean() * len(diff)).item(), 3)


def head_scores(model: gpt.GPT, idx, kind: str, exclude_bos=False, exclude_current_token=False,
                error_measure="mul") -> torch.Tensor:
    """(n_layer, n_head) scores of every head for one kind (HEAD_KINDS), computed as
    TransformerLens' detect_head: per sequence of idx (B, T), then averaged over the B sequences
    (what detect_head does for a list of prompts)."""
    patterns = attention_patterns(model, idx).float().cpu()  # (L, B, H, T, T)
    n_layer, B, n_head = patterns.shape[:3]
    scores = torch.zeros(B, n_layer, n_head)
    for b in range(B):
        detection = detection_pattern(idx[b], kind)
        for layer in range(n_layer):
            for head in range(n_head):
                scores[b, layer, head] = pattern_score(patterns[layer, b, head], detection, exclude_bos,
                                                       exclude_current_token, error_measure)
    return scores.mean(0)


# ----------------------------------------------------------------------------------------
# The logit lens and direct logit attribution: reading the residual stream in token space


def logit_lens(model: gpt.GPT, idx) -> dict:
    """The final norm and head applied to the residual stream entering every block and leaving
    the last (n_layer + 1 rows; the last row is the model's own prediction), for a prompt idx (1, T).
    Returns top (rows, T): the top token; rank (rows, T - 1): the rank of the token that really
    comes next (0: the top one); logprob (rows, T - 1): its log-probability."""
    n_layer = model.config.n_layer
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layer)] + [f"blocks.{n_layer - 1}.hook_resid_post"]
    _, cache = run_with_cache(model, idx[:1], names=names)
    with torch.no_grad():
        logits = model.lm_head(model.transformer.ln_f(torch.cat([cache[name] for name in names]))).float()
    nxt = logits[:, :-1]  # position t predicts token t + 1
    right = nxt.gather(-1, idx[:1, 1:, None].expand(len(names), -1, 1))
    return dict(top=logits.argmax(-1), rank=(nxt > right).sum(-1),
                logprob=(right - nxt.logsumexp(-1, keepdim=True)).squeeze(-1))


def residual_terms(model: gpt.GPT, cache) -> dict:
    """The final residual stream as the sum of what each part wrote, {name: (B, T, C)}: embed,
    pos_embed, every head (L0H1: z of the head times its slice of the output projection), each
    layer's attention output bias, each MLP. Needs the cache of every hook (run_with_cache)."""
    terms = {"embed": cache["hook_embed"]}
    if "hook_pos_embed" in cache:
        terms["pos_embed"] = cache["hook_pos_embed"]
    for layer, block in enumerate(model.transformer.h):
        n_head, _, head_dim = head_shape(block.attn)
        proj = block.attn.c_proj if block.attn.fused else block.attn.o_proj
        heads = torch.einsum("bthd,chd->bthc", cache[f"blocks.{layer}.attn.hook_z"],
                             proj.weight.detach().view(-1, n_head, head_dim))
        terms.update({f"L{layer}H{h}": heads[:, :, h] for h in range(n_head)})
        if proj.bias is not None:
            terms[f"L{layer} attn bias"] = proj.bias.detach().expand_as(heads[:, :, 0])
        if f"blocks.{layer}.hook_mlp_out" in cache:
            terms[f"L{layer} mlp"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return terms


def through_final_norm(model: gpt.GPT, cache, x):
    """The final norm as a linear map of one term x (B, T, C) of the residual stream: centred
    (LayerNorm), divided by this forward's scale (ln_final.hook_scale, held fixed), times the
    gain. The norm's bias is a term of its own. (TransformerLens' apply_ln_to_stack.)"""
    norm = model.transformer.ln_f
    if not isinstance(norm, gpt.RMSNorm):
        x = x - x.mean(-1, keepdim=True)
    return x / cache["ln_final.hook_scale"] * norm.weight.detach()


def direct_logit_attribution(model: gpt.GPT, idx, answer: int, wrong: int | None = None, position=-1) -> dict:
    """What each head writes directly into the logit of `answer` (minus `wrong`'s) at `position`:
    its term of the residual stream, through the final norm (scale held fixed) and the head.
    Returns heads (n_layer, n_head), other {term: value} and logit_diff, the model's own value;
    heads and other add up to it (the decomposition is exact). Averaged over the rows of idx."""
    logits, cache = run_with_cache(model, idx)
    unembed = model.lm_head.weight.detach()
    direction = unembed[answer] - (unembed[wrong] if wrong is not None else 0)
    values = {name: (through_final_norm(model, cache, term)[:, position] @ direction).mean().item()
              for name, term in residual_terms(model, cache).items()}
    if getattr(model.transformer.ln_f, "bias", None) is not None:
        values["ln_final bias"] = (model.transformer.ln_f.bias.detach() @ direction).item()
    n_head = head_shape(model.transformer.h[0].attn)[0]
    heads = torch.tensor([[values.pop(f"L{layer}H{h}") for h in range(n_head)]
                          for layer in range(model.config.n_layer)])
    logit_diff = logits[:, position, answer] - (logits[:, position, wrong] if wrong is not None else 0)
    return dict(heads=heads, other=values, logit_diff=logit_diff.mean().item())


# ----------------------------------------------------------------------------------------
# Activation patching: which activations carry the answer?


def logit_diff_metric(answer: int, wrong: int):
    return lambda logits: (logits[:, -1, answer] - logits[:, -1, wrong]).mean().item()


def activation_patching(model: gpt.GPT, clean, corrupted, answer: int, wrong: int, act="resid_pre") -> torch.Tensor:
    """(n_layer, T): run the corrupted prompt with blocks.{L}.hook_{act} at one position replaced
    by its value on the clean prompt, and measure the logit difference answer - wrong at the last
    position, normalised: 0 = the corrupted run's, 1 = the clean run's (TransformerLens'
    patching.get_act_patch_resid_pre and friends). clean and corrupted: (B, T), the same T."""
    if clean.shape != corrupted.shape:
        raise NanoError(f"clean and corrupted prompts have {clean.shape[-1]} and {corrupted.shape[-1]} tokens "
                        "(patching pairs positions: make them the same length)")
    if act not in ("resid_pre", "attn_out", "mlp_out", "resid_mid", "resid_post"):
        raise NanoError(f"unknown activation {act!r} (resid_pre, attn_out, mlp_out, resid_mid or resid_post)")
    metric = logit_diff_metric(answer, wrong)
    names = [f"blocks.{layer}.hook_{act}" for layer in range(model.config.n_layer)]
    clean_logits, cache = run_with_cache(model, clean, names=names)
    with torch.no_grad():
        clean_value, corrupted_value = metric(clean_logits), metric(run_with_hooks(model, corrupted))
        if abs(clean_value - corrupted_value) < 1e-6:
            raise NanoError(f"clean and corrupted prompts give the same logit difference {clean_value:.4f} "
                            "(pick a corruption that changes the answer)")
        restored = torch.zeros(len(names), clean.shape[-1])
        for layer, name in enumerate(names):
            for pos in range(clean.shape[-1]):
                def put_back(x, hook_name, pos=pos):
                    x = x.clone()
                    x[:, pos] = cache[hook_name][:, pos]
                    return x

                value = metric(run_with_hooks(model, corrupted, [(name, put_back)]))
                restored[layer, pos] = (value - corrupted_value) / (clean_value - corrupted_value) + 0.0  # no -0.0
    return restored


# ----------------------------------------------------------------------------------------
# Base vs tuned: what did SFT or DPO change inside?


def compare_models(base: gpt.GPT, tuned: gpt.GPT, prompts) -> dict:
    """Per layer, on the same prompts (a list of (1, T) token tensors): resid_change (n_layer,),
    ||r_tuned - r_base|| / ||r_base|| of hook_resid_post averaged over positions; resid_cosine
    (n_layer,), their cosine similarity; pattern_tv (n_layer, n_head), the total variation distance
    0.5 * sum_k |p_tuned - p_base| between each head's attention rows, averaged over queries."""
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(base.config, name) != getattr(tuned.config, name):
            raise NanoError(f"base and tuned models differ in {name} ({getattr(base.config, name)} vs "
                            f"{getattr(tuned.config, name)}): compare a model with its own finetune")
    per_prompt = []
    for idx in prompts:
        caches = [run_with_cache(m, idx, lambda name: name.endswith(("hook_resid_post", "hook_pattern")))[1]
                  for m in (base, tuned)]
        rows = []
        for layer in range(base.config.n_layer):
            r_base, r_tuned = (c[f"blocks.{layer}.hook_resid_post"][0].float() for c in caches)  # (T, C)
            p_base, p_tuned = (c[f"blocks.{layer}.attn.hook_pattern"][0].float() for c in caches)  # (heads, T, T)
            rows.append(dict(resid_change=((r_tuned - r_base).norm(dim=-1) / r_base.norm(dim=-1)).mean(),
                             resid_cosine=F.cosine_similarity(r_tuned, r_base, dim=-1).mean(),
                             pattern_tv=0.5 * (p_tuned - p_base).abs().sum(-1).mean(-1)))
        per_prompt.append({key: torch.stack([row[key] for row in rows]) for key in rows[0]})
    return {key: torch.stack([p[key] for p in per_prompt]).mean(0) for key in per_prompt[0]}


# ----------------------------------------------------------------------------------------
# Induction heads appearing: 2-layer vs 1-layer attention-only models on repeated random spans


def repeated_spans(batch_size, T, vocab_size, span_min, span_max, generator):
    """(x, mask), both (B, T): token 0 (a BOS), then a span of S random tokens (1 .. vocab_size - 1,
    S drawn per row from span_min..span_max) repeated until T tokens. mask marks the tokens that
    only an induction head can predict: those from the second token of the second copy on (the
    token before them occurred before, followed by them). S varies, so no fixed offset finds them."""
    S = torch.randint(span_min, span_max + 1, (batch_size, 1), generator=generator)
    x = torch.randint(1, vocab_size, (batch_size, T), generator=generator)
    x[:, 0] = 0
    pos = torch.arange(T)[None]
    x = x.gather(1, torch.where(pos > S, (pos - 1) % S + 1, pos))  # position p > S copies p - S
    return x, pos > S + 1


def repeat_loss(model: gpt.GPT, x, mask) -> float:
    """Mean next-token loss on the repeats (mask) of repeated_spans."""
    with torch.no_grad():
        logits = model(x[:, :-1])[0]
    losses = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    return losses[mask[:, 1:]].mean().item()


@dataclass
class InductionConfig:
    seeds: int = 3
    layers: str = field(default="2,1", metadata={"help": "comma-separated layer counts of the attention-only models"})
    steps: int = 600
    batch_size: int = 32
    vocab_size: int = field(default=64, metadata={"help": "random tokens 1..vocab_size-1; token 0 starts every row"})
    span_min: int = 8
    span_max: int = 24
    block_size: int = field(default=49, metadata={"help": "tokens per row: BOS + spans repeated"})
    n_embd: int = 64
    n_head: int = 2
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary positions (0 = learned positions, which "
                                                                 "learn a previous-token head far more slowly)"})
    learning_rate: float = 3e-3
    eval_interval: int = 25
    eval_rows: int = 32
    threads: int = field(default=1, metadata={"help": "torch CPU threads while training (tiny models gain nothing "
                                                      "from more; 0 = torch's default)"})
    plot: str = field(default="", metadata={"help": "picture, a .json of the curves beside it "
                                                    "(empty = out-interp/induction.png; none = neither)"})


def evaluate_induction(model, x, mask) -> dict:
    """The loss on the repeats and the best head's scores: induction (any layer; attention to
    BOS left out, as a head with nothing to copy parks there) and previous-token (layer 0)."""
    induction = head_scores(model, x, "induction", exclude_bos=True)
    previous = head_scores(model, x, "previous_token")
    return dict(repeat_loss=repeat_loss(model, x, mask), induction=induction.max().item(),
                previous_token=previous[0].max().item())


def train_induction(cfg: InductionConfig, n_layer: int, seed: int, log=print) -> list[dict]:
    """Train one attention-only model on repeated_spans; an evaluation row every eval_interval steps."""
    common.set_seed(seed)
    config = gpt.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=n_layer, n_head=cfg.n_head,
                           n_embd=cfg.n_embd, rope_theta=cfg.rope_theta)
    model = attention_only(gpt.GPT(config))
    optimizer = model.configure_optimizers(0.0, cfg.learning_rate, (0.9, 0.99), "cpu")
    data = torch.Generator().manual_seed(seed)
    shape = (cfg.block_size, cfg.vocab_size, cfg.span_min, cfg.span_max)
    held_out = repeated_spans(cfg.eval_rows, *shape, torch.Generator().manual_seed(10_000 + seed))
    rows, t0 = [], time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            model.eval()
            rows.append(dict(step=step, **evaluate_induction(model, *held_out), seconds=time.perf_counter() - t0))
            model.train()
            if step % (cfg.eval_interval * 8) == 0 or step == cfg.steps:
                log(f"  {n_layer}-layer seed {seed} step {step:4d}: loss on repeats {rows[-1]['repeat_loss']:.3f}, "
                    f"induction score {rows[-1]['induction']:.2f}, previous-token {rows[-1]['previous_token']:.2f}")
        if step == cfg.steps:
            return rows
        x, _ = repeated_spans(cfg.batch_size, *shape, data)
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def induction_experiment(cfg: InductionConfig, log=print) -> dict:
    """{"2-layer": [rows of seed 0, rows of seed 1, ...], ...} and the wall time."""
    common.check_options(cfg, positive=("seeds", "steps", "batch_size", "eval_interval", "eval_rows", "n_head",
                                        "learning_rate"), non_negative=("threads", "rope_theta"))
    if not 2 <= cfg.span_min <= cfg.span_max or 1 + 2 * cfg.span_max > cfg.block_size:
        raise NanoError("need 2 <= span_min <= span_max and 1 + 2 * span_max <= block_size (two copies fit)")
    layers = [int(n) for n in cfg.layers.split(",")]
    runs, t0, threads = {f"{n}-layer": [] for n in layers}, time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        for seed in range(cfg.seeds):
            for n_layer in layers:
                runs[f"{n_layer}-layer"].append(train_induction(cfg, n_layer, seed, log))
    finally:
        torch.set_num_threads(threads)
    return dict(runs=runs, seconds=time.perf_counter() - t0, config=asdict(cfg))


# ----------------------------------------------------------------------------------------
# Pictures (matplotlib, optional: plot.py's load_pyplot says how to install it)


def draw_heatmap(fig, ax, matrix, rows, cols, title, centred=False, cmap="viridis", vmax=None, text=None):
    """One heatmap on ax: a diverging colour map around 0 if centred; text: a (rows, cols) grid of strings."""
    m = matrix.float().cpu().numpy()
    limit = vmax or float(abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu_r" if centred else cmap, aspect="auto", vmin=-limit if centred else 0, vmax=limit)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for r, row in enumerate(text or []):
        for c, label in enumerate(row):  # white on the dark half of the colour map
            color = "white" if m[r, c] > limit / 2 else "black"
            ax.text(c, r, label, ha="center", va="center", fontsize=6, color=color)


def heatmap(matrix, rows, cols, title, out, **style):
    """A picture of one heatmap (draw_heatmap's options)."""
    import plot

    plt = plot.load_pyplot()
    fig, ax = plt.subplots(figsize=(min(16.0, 0.3 * len(cols) + 2.5), max(2.6, 0.35 * len(rows) + 1.5)))
    draw_heatmap(fig, ax, matrix, rows, cols, title, **style)
    return plot.save_figure(fig, out)


def plot_patterns(patterns, labels, out, title=None):
    """A grid of attention patterns (n_layer, n_head, T, T): rows layers, columns heads."""
    import plot

    plt = plot.load_pyplot()
    n_layer, n_head, T = patterns.shape[:3]
    fig, axes = plt.subplots(n_layer, n_head, figsize=(2.6 * n_head + 0.5, 2.6 * n_layer + 0.5), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(patterns[layer, head].float().cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"L{layer}H{head}", fontsize=8)
            ticks = range(T) if T <= 40 else []
            ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=5, rotation=90)
            ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=5)
    fig.suptitle(title or "attention patterns (row: query, column: key)", fontsize=10)
    return plot.save_figure(fig, out)


def plot_head_scores(scores: dict, out, title):
    import plot

    plt = plot.load_pyplot()
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2), squeeze=False)
    for ax, (kind, s) in zip(axes[0], scores.items()):
        rows, cols = [f"L{i}" for i in range(s.shape[0])], [f"H{h}" for h in range(s.shape[1])]
        draw_heatmap(fig, ax, s, rows, cols, kind, vmax=1.0)
    fig.suptitle(title, fontsize=10)
    return plot.save_figure(fig, out)


def plot_comparison(results: dict, base: str, out):
    """Left: the residual stream's relative change per layer, one line per tuned model; then each
    tuned model's per-head pattern distance (one colour scale for all)."""
    import plot

    plt = plot.load_pyplot()
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(4.2 * (1 + len(results)), 3.4), squeeze=False)
    vmax = max(r["pattern_tv"].max().item() for r in results.values()) or 1.0
    for (path, r), ax in zip(results.items(), axes[0][1:]):
        axes[0][0].plot(r["resid_change"].tolist(), marker="o", label=path)
        tv = r["pattern_tv"]
        draw_heatmap(fig, ax, tv, [f"L{i}" for i in range(tv.shape[0])], [f"H{h}" for h in range(tv.shape[1])],
                     f"attention pattern TV distance\n{path}", vmax=vmax)
    axes[0][0].set(xlabel="layer", ylabel="|r_tuned - r_base| / |r_base|", title=f"residual stream vs {base}")
    axes[0][0].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return plot.save_figure(fig, out)


def plot_induction(result, out):
    """Loss on the repeats and the best induction score over training: one colour per model,
    one thin line per seed."""
    import plot

    plt = plot.load_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    panels = (("repeat_loss", "loss on the repeats (nats/token)"), ("induction", "induction score (best head)"),
              ("previous_token", "previous-token score (best layer-0 head)"))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, panels):
        for color, (model, seeds) in zip(palette, result["runs"].items()):
            for seed, rows in enumerate(seeds):
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], color=color, lw=1.2, alpha=0.8,
                        label=model if seed == 0 else None)
        ax.set(xlabel="training step", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = len(next(iter(result["runs"].values())))
    fig.suptitle(f"induction heads appear in 2-layer attention-only models ({seeds} seeds)")
    return plot.save_figure(fig, out)


# ----------------------------------------------------------------------------------------
# The command line: python interp.py COMMAND [--option value ...]

DEFAULT_PROMPT = "ROMEO:\nI will fly.\nJULIET:\nI will stay.\nROMEO:\nI will f"
DEFAULT_CORRUPTED = "ROMEO:\nI will run.\nJULIET:\nI will stay.\nROMEO:\nI will f"
DEFAULT_COMPARE_PROMPTS = ("ROMEO:\nI will fly.\nJULIET:\nI will stay.|First Citizen:\nBefore we proceed any further, "
                           "hear me speak.|What is the capital of France?")


@dataclass
class ModelOptions:
    init_from: str = field(default="out/ckpt.pt", metadata={"help": "a checkpoint, or gpt2 / gpt2-medium / ... "
                                                                    "/ a Hugging Face folder"})
    prompt: str = DEFAULT_PROMPT
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    plot: str = field(default="", metadata={"help": "picture (.png/.svg/.pdf; empty = out-interp/COMMAND.png; "
                                                    "none = no picture)"})


@dataclass
class HeadScoresConfig(ModelOptions):
    source: str = field(default="repeated", metadata={"help": "repeated: rows of random tokens, a span of them twice; "
                                                              "prompt: --prompt"})
    span: int = 20
    rows: int = 4
    seed: int = 0
    exclude_bos: bool = False
    exclude_current_token: bool = False
    error_measure: str = field(default="mul", metadata={"help": "mul | abs (TransformerLens' detect_head)"})


@dataclass
class AttributionConfig(ModelOptions):
    answer: str = field(default="", metadata={"help": "the answer token's text (empty = the model's top prediction)"})
    wrong: str = field(default="", metadata={"help": "the token to compare with (empty = the model's second choice)"})
    top: int = 10


@dataclass
class PatchConfig(AttributionConfig):
    corrupted: str = field(default=DEFAULT_CORRUPTED, metadata={"help": "the prompt with the information removed "
                                                                        "(as many tokens)"})
    act: str = field(default="resid_pre", metadata={"help": "resid_pre | attn_out | mlp_out | resid_mid | resid_post"})
    answer: str = field(default="", metadata={"help": "empty = the top prediction on the clean prompt"})
    wrong: str = field(default="", metadata={"help": "empty = the top prediction on the corrupted prompt"})


@dataclass
class CompareConfig:
    base: str = "out/ckpt.pt"
    tuned: str = field(default="out-sft/ckpt.pt", metadata={"help": "one or more checkpoints, comma-separated "
                                                                    "(SFT, DPO, ...)"})
    prompts: str = field(default=DEFAULT_COMPARE_PROMPTS, metadata={"help": "'|'-separated prompts"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    plot: str = field(default="", metadata={"help": "picture (empty = out-interp/base-vs-tuned.png; "
                                                    "none = no picture)"})


def load_model(init_from: str, device: str):
    """(model in eval mode, tokenizer) from a checkpoint file or a pretrained name / folder."""
    if Path(init_from).is_file() or init_from.endswith(".pt"):
        model, spec = gpt.load_checkpoint(init_from, device)
    else:
        model, spec = gpt.load_pretrained(init_from)
    return model.to(device).eval(), tokenizer.load_tokenizer(spec)


def encode(tok, text: str, device, block_size: int):
    ids = tok.encode(text.replace("\\n", "\n"))  # a typed \n is a newline
    if not 2 <= len(ids) <= block_size:
        raise NanoError(f"the prompt has {len(ids)} tokens (give 2 to block_size {block_size})")
    return torch.tensor([ids], device=device)


def one_token(tok, text: str) -> int:
    ids = tok.encode(text)
    if len(ids) != 1:
        raise NanoError(f"{text!r} is {len(ids)} tokens (answers are single tokens; GPT-2's often start with a space)")
    return ids[0]


def labels(tok, ids) -> list[str]:
    return [repr(tok.decode([int(i)]))[1:-1][:8] for i in ids]


def picture_path(cfg, command: str):
    import plot

    if cfg.plot.lower() == "none":
        return None
    path = plot.check_output(cfg.plot or Path("out-interp") / f"{command}.png")
    plot.load_pyplot()  # a missing matplotlib is said before any work
    return path


def cmd_patterns(cfg: ModelOptions):
    """attention patterns of a prompt, one panel per layer and head"""
    out = picture_path(cfg, "patterns")
    model, tok = load_model(cfg.init_from, cfg.device)
    idx = encode(tok, cfg.prompt, cfg.device, model.config.block_size)
    patterns = attention_patterns(model, idx)[:, 0]
    print(f"{idx.shape[1]} tokens: {' '.join(labels(tok, idx[0]))}")
    for layer in range(patterns.shape[0]):
        top = patterns[layer, :, -1].argmax(-1).tolist()
        print(f"layer {layer}: the last token's strongest key per head: {labels(tok, idx[0, top])}")
    return plot_patterns(patterns, labels(tok, idx[0]), out) if out else None


def cmd_head_scores(cfg: HeadScoresConfig):
    """previous-token, duplicate-token and induction scores of every head (TransformerLens' detect_head)"""
    out = picture_path(cfg, "head-scores")
    model, tok = load_model(cfg.init_from, cfg.device)
    if cfg.source == "repeated":
        generator = torch.Generator().manual_seed(cfg.seed)
        span = torch.randint(0, model.config.vocab_size, (cfg.rows, cfg.span), generator=generator)
        idx = torch.cat([span, span], dim=1).to(cfg.device)[:, :model.config.block_size]
    elif cfg.source == "prompt":
        idx = encode(tok, cfg.prompt, cfg.device, model.config.block_size)
    else:
        raise NanoError(f"unknown --source {cfg.source!r} (repeated or prompt)")
    scores = {kind: head_scores(model, idx, kind, cfg.exclude_bos, cfg.exclude_current_token, cfg.error_measure)
              for kind in HEAD_KINDS}
    for kind, s in scores.items():
        layer, head = divmod(s.argmax().item(), s.shape[1])
        print(f"{kind:>15}: best head L{layer}H{head} {s.max():.3f}; per layer " + " | ".join(
            " ".join(f"{v:.2f}" for v in row) for row in s.tolist()))
    return plot_head_scores(scores, out, f"head scores ({cfg.source})") if out else None


def cmd_logit_lens(cfg: ModelOptions):
    """the top token and the right token's rank after every layer (nostalgebraist's logit lens)"""
    out = picture_path(cfg, "logit-lens")
    model, tok = load_model(cfg.init_from, cfg.device)
    idx = encode(tok, cfg.prompt, cfg.device, model.config.block_size)
    lens = logit_lens(model, idx)
    names = ["embed"] + [f"after L{layer}" for layer in range(model.config.n_layer)]
    targets = labels(tok, idx[0, 1:])
    print("per position: the top token of each layer's residual stream (the rank of the right next token)")
    print(f"{'pos':>4} {'token':>8} {'next':>8} " + " ".join(f"{name:>14}" for name in names))
    tops = [labels(tok, row) for row in lens["top"][:, :-1]]
    for t, (token, target) in enumerate(zip(labels(tok, idx[0, :-1]), targets)):
        print(f"{t:>4} {token:>8} {target:>8} " + " ".join(
            f"{top[t]:>8} ({rank:>3})" for top, rank in zip(tops, lens["rank"][:, t].tolist())))
    if out:
        return heatmap(torch.log10(1 + lens["rank"].float()), names, targets, "log10(1 + rank of the right next "
                       "token); text: the top token", out, cmap="magma_r", text=tops)
    return None


def pick_answers(model, tok, idx, answer: str, wrong: str):
    with torch.no_grad():
        ranked = model(idx)[0][0, -1].argsort(descending=True).tolist()
    a = one_token(tok, answer) if answer else ranked[0]
    w = one_token(tok, wrong) if wrong else next(t for t in ranked if t != a)
    return a, w


def cmd_attribution(cfg: AttributionConfig):
    """direct logit attribution: each head's share of the answer's logit difference"""
    out = picture_path(cfg, "attribution")
    model, tok = load_model(cfg.init_from, cfg.device)
    idx = encode(tok, cfg.prompt, cfg.device, model.config.block_size)
    answer, wrong = pick_answers(model, tok, idx, cfg.answer, cfg.wrong)
    dla = direct_logit_attribution(model, idx, answer, wrong)
    heads = dla["heads"]
    print(f"logit({labels(tok, [answer])[0]!r}) - logit({labels(tok, [wrong])[0]!r}) = {dla['logit_diff']:.3f} "
          f"= heads {heads.sum():.3f} + other terms {sum(dla['other'].values()):.3f}")
    order = heads.flatten().abs().argsort(descending=True)[:cfg.top].tolist()
    print("top heads: " + ", ".join(f"L{i // heads.shape[1]}H{i % heads.shape[1]} {heads.flatten()[i]:+.3f}"
                                    for i in order))
    other = sorted(dla["other"].items(), key=lambda kv: -abs(kv[1]))[:cfg.top]
    print("other: " + ", ".join(f"{k} {v:+.3f}" for k, v in other))
    rows, cols = [f"L{i}" for i in range(heads.shape[0])], [f"H{h}" for h in range(heads.shape[1])]
    return heatmap(heads, rows, cols, "direct logit attribution per head", out, centred=True) if out else None


def cmd_patch(cfg: PatchConfig):
    """activation patching: the share of the clean logit difference each layer x position restores"""
    out = picture_path(cfg, "patch")
    model, tok = load_model(cfg.init_from, cfg.device)
    clean = encode(tok, cfg.prompt, cfg.device, model.config.block_size)
    corrupted = encode(tok, cfg.corrupted, cfg.device, model.config.block_size)
    answer = pick_answers(model, tok, clean, cfg.answer, "")[0]
    wrong = pick_answers(model, tok, corrupted, cfg.wrong, "")[0] if not cfg.wrong else one_token(tok, cfg.wrong)
    if wrong == answer:
        raise NanoError(f"clean and corrupted prompts both predict {labels(tok, [answer])[0]!r} (pass --wrong)")
    restored = activation_patching(model, clean, corrupted, answer, wrong, cfg.act)
    cols = [f"{a}/{b}" if a != b else a for a, b in zip(labels(tok, clean[0]), labels(tok, corrupted[0]))]
    print(f"answer {labels(tok, [answer])[0]!r} vs {labels(tok, [wrong])[0]!r}: share of the logit difference "
          f"restored by hook_{cfg.act}, per position (clean/corrupted token) and layer")
    print(f"{'pos':>4} {'token':>12} " + " ".join(f"{'L' + str(layer):>6}" for layer in range(restored.shape[0])))
    for pos, column in enumerate(restored.t().tolist()):
        print(f"{pos:>4} {cols[pos]:>12} " + " ".join(f"{v:>+6.2f}" for v in column))
    rows = [f"L{i}" for i in range(model.config.n_layer)]
    title = f"share of the logit difference restored, hook_{cfg.act}"
    return heatmap(restored, rows, cols, title, out, centred=True) if out else None


def cmd_base_vs_tuned(cfg: CompareConfig):
    """what finetuning changed: per layer, residual-stream change and attention-pattern distance"""
    out = picture_path(cfg, "base-vs-tuned")
    base, tok = load_model(cfg.base, cfg.device)
    tuned = {path: load_model(path, cfg.device)[0] for path in cfg.tuned.split(",")}
    prompts = [encode(tok, p, cfg.device, base.config.block_size) for p in cfg.prompts.split("|")]
    results = {path: compare_models(base, model, prompts) for path, model in tuned.items()}
    print(f"{len(prompts)} prompts; per layer: |r_tuned - r_base| / |r_base| of hook_resid_post, cosine, "
          "and the heads' mean (max) total-variation distance of attention rows")
    for path, r in results.items():
        print(f"\n{cfg.base} -> {path}\nlayer  resid change  cosine  pattern TV mean (max head)")
        for layer in range(base.config.n_layer):
            tv = r["pattern_tv"][layer]
            print(f"{layer:>5}  {r['resid_change'][layer]:>12.4f}  {r['resid_cosine'][layer]:>6.4f}  "
                  f"{tv.mean():>15.4f} ({tv.max():.4f} H{tv.argmax().item()})")
    return plot_comparison(results, cfg.base, out) if out else results


def cmd_induction(cfg: InductionConfig):
    """the induction-heads experiment: 2-layer vs 1-layer attention-only models, over training"""
    out = picture_path(cfg, "induction")
    result = induction_experiment(cfg)
    print(f"\n{'model':>8}  {'loss on repeats':>15}  {'induction score':>15}  {'previous-token':>14}  "
          "first step with induction >= 0.5 (per seed)")
    for model, seeds in result["runs"].items():
        finals = [rows[-1] for rows in seeds]
        first = [next((r["step"] for r in rows if r["induction"] >= 0.5), None) for rows in seeds]
        means = [statistics.mean(f[key] for f in finals) for key in ("repeat_loss", "induction", "previous_token")]
        print(f"{model:>8}  {means[0]:>15.3f}  {means[1]:>15.3f}  {means[2]:>14.3f}  {first}")
    print(f"wall time {result['seconds']:.1f} s for {cfg.seeds} seeds x {len(result['runs'])} models")
    if out:
        common.atomic_write(out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(result)))
        print(f"wrote {out.with_suffix('.json')}")
        return plot_induction(result, out)
    return result


COMMANDS = {"patterns": (ModelOptions, cmd_patterns), "head-scores": (HeadScoresConfig, cmd_head_scores),
            "logit-lens": (ModelOptions, cmd_logit_lens), "attribution": (AttributionConfig, cmd_attribution),
            "patch": (PatchConfig, cmd_patch), "base-vs-tuned": (CompareConfig, cmd_base_vs_tuned),
            "induction": (InductionConfig, cmd_induction)}


@common.cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="interp.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, run) in COMMANDS.items():
        sub.add_parser(name, help=run.__doc__, add_help=False)  # its options: parse_config below
    args = parser.parse_args(argv[:1])
    config_cls, run = COMMANDS[args.command]
    cfg = common.parse_config(config_cls, argv[1:], f"interp.py {args.command}: {run.__doc__}")
    if hasattr(cfg, "device"):
        cfg.device = common.pick_device(cfg.device)
    result = run(cfg)
    if isinstance(result, Path):
        print(f"wrote {result}")
    return result


if __name__ == "__main__":
    main()
