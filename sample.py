"""Sampling from a GPT: a KV-cached generator (prefill + decode) and speculative decoding.

The idea. A causal transformer computes the keys and values of token t from tokens 0..t
only, so they never change once computed. Generation therefore has two phases:
- prefill: the whole prompt goes through the model in one forward pass. All prompt
  positions are known, so they are computed in parallel (big matmuls, compute-bound),
  and their keys/values are written into the cache.
- decode: one new token per forward pass. Token t+1 depends on the sample drawn at t, so
  this phase is sequential; each step feeds only the newest token, which attends to the
  cached keys/values of everything before it. A step reads every weight once to do a
  1-row matmul, so decode is memory-bound and its speed is measured in ms per step.
The KV cache stores, per layer, the keys and values of every position so far, in static
buffers (B, n_kv_head, max_len, head_dim) allocated once and written in place (no torch.cat
growth, so shapes are fixed and `torch.compile` compiles the decode step once). With
grouped-query attention (Llama 3, SmolLM, Qwen) only the n_kv_head shared key/value heads
are stored: n_head / n_kv_head times less cache per token (printed by the CLI).
Without the cache each step re-runs the whole window: O(T) work per token instead of O(1).
generate_simple (right after prefill and decode_one_token) is that loop on one screen;
generate() adds what real prompts need, below.

Batches of prompts of different lengths are left-padded: every row then writes its next
token into the same cache slot, so one decode step (one `index_copy_` per layer) serves
the whole batch with static shapes. Each row gets its own position ids (its first real
token is position 0, as if it ran alone) and a key-padding mask hides the pad slots.

Past the window, two kinds of position embedding call for two strategies:
- GPT-2's learned position embedding covers block_size positions, and every cached key
  depends on its position, so the window cannot slide one token at a time without
  recomputing all of it. When a row's window is full we slide by half a window: keep the
  newest block_size // 2 tokens, re-prefill them at positions 0.., and decode on. One
  re-prefill per block_size // 2 tokens keeps the cost per token O(1).
- RoPE (the Llama family) rotates q and k by their positions, so a score q_m . k_n depends
  on m - n only, and positions can grow without limit. The window then slides one token
  at a time with no re-prefill: the cache is a ring buffer of block_size slots, token i goes
  into slot i % block_size over the oldest one, and every query attends to the last
  block_size tokens at every layer (config.sliding_window tokens, when the model has
  Mistral's window). That is sliding-window attention (cached keys of old tokens were
  computed from their own windows, so with more than one layer it is not the same as
  re-running only the last window).
`use_cache=False` recomputes the same windows, so cached and uncached generation give the same tokens.

Speculative decoding (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318): a small draft model of the same family (the same tokenizer) proposes k
tokens one by one, the target model scores all k+1 positions in one forward pass, each
draft token d is accepted with probability min(1, p(d)/q(d)), the first rejected one is
replaced by a sample of norm(max(0, p - q)), and when all k are accepted a bonus token
comes from p. The output has exactly the target's distribution; the target runs once per
accepted run of tokens.

Run:
  python sample.py --ckpt out/ckpt.pt --prompt "ROMEO:" --max_new_tokens 300
  python sample.py --init_from gpt2 --prompt "Hello, I'm a language model," --num_samples 3
  python sample.py --init_from HuggingFaceTB/SmolLM2-360M --draft HuggingFaceTB/SmolLM2-135M
  python sample.py --init_from gpt2-medium --draft out/small.pt --num_draft_tokens 4
  python sample.py --ckpt out/ckpt.pt --profile trace.json   (torch.profiler: Chrome trace, top ops)
  python sample.py --init_from gpt2 --no_cache True     # the same text, much slower
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

import common
from common import NanoError, cli
import data
import gpt
import tokenizer

# ----------------------------------------------------------------------------------------
# The static KV cache


class KVCache(nn.Module):
    """One layer's keys and values for every cache slot, preallocated once.

    The model calls `update(input_pos, k, v)` with the T new tokens' k, v (B, n_kv_head, T,
    head_dim); they are written into slots input_pos (T,) in place and the whole buffers
    (B, n_kv_head, max_len, head_dim) come back. The mask never lets through a slot not yet
    written or left over from a rejected speculative draft, but such slots must still be
    finite (a masked NaN key or value still turns the softmax or 0 * v into NaN): hence
    zeros, not torch.empty."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, device=None, dtype=torch.float32):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def make_cache(model, batch_size, max_len) -> list[KVCache]:
    """One KVCache per layer, on the model's device and in its dtype, of n_kv_head heads."""
    cfg = model.config
    weight = model.transformer.wte.weight  # (a quantized model's head has no float weight)
    return [KVCache(batch_size, cfg.n_kv_head, max_len, cfg.head_dim, weight.device, weight.dtype)
            for _ in range(cfg.n_layer)]


def kv_bytes_per_token(config, dtype=torch.float32, n_kv_head=None) -> int:
    """Cache bytes one token costs: keys and values of every layer's key/value heads."""
    return 2 * config.n_layer * (n_kv_head or config.n_kv_head) * config.head_dim * dtype.itemsize


# ----------------------------------------------------------------------------------------
# Left padding and the ring: positions and masks


def attention_mask(pad, query_pos, num_slots, window=None):
    """(B, 1, T, S) bool, True = may attend. query_pos (T,): where each query stands in the
    stream of fed tokens (left padding included); it was written to slot query_pos % S, so
    once the stream is longer than S the cache is a ring. Slot j then holds the latest
    stream index that maps to it, held = q - (q - j) % S (negative: not written yet), and
    query q sees it iff held >= pad[b] (written, and not one of the row's left-padding
    slots) and q - held < window (the sliding window; None: S, everything in the cache).
    A pad query also sees itself, so no softmax row is all -inf (that would make NaNs that
    leak through the cache into later layers); real tokens never look at pad slots."""
    slots = torch.arange(num_slots, device=pad.device)
    held = query_pos[:, None] - (query_pos[:, None] - slots[None, :]) % num_slots  # (T, S)
    visible = held[None] >= pad[:, None, None]  # (B, T, S)
    if window is not None:
        visible = visible & (query_pos[:, None] - held < window)[None]
    return (visible | (held == query_pos[:, None])[None])[:, None]


def position_ids(pad, query_pos):
    """(B, T): stream index minus the row's padding, so every row's first real token is position 0."""
    return (query_pos[None, :] - pad[:, None]).clamp(min=0)


def left_pad(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (B, W) ids right-aligned, and pad (B,)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    return ids.to(device), pad.to(device)


# ----------------------------------------------------------------------------------------
# Sampling helpers


def apply_repetition_penalty(logits, seen, penalty):
    """Hugging Face's convention (from CTRL, Keskar et al. 2019): logits of tokens already
    in the context are divided by penalty when positive and multiplied by it when
    negative, so penalty > 1 always makes them less likely. seen: bool like logits."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens
    whose probability adds up to at least p. A token goes when the tokens ranked at or below
    it hold at most 1 - p of the mass. That tail mass is summed from the least likely token
    up, as Hugging Face's TopPLogitsWarper does: summed top-down in fp32, a running total
    near 1 has lost the tail's tiny terms to rounding (at V=50257, p=0.999 that dropped
    19 tokens the exact count keeps). The top token always stays."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    mass_at_or_below = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_at_or_below <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def logits_to_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution a token is drawn from. temperature 0 means greedy: all the mass on
    the argmax (a one-hot row), which lets speculative decoding treat greedy as sampling."""
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return logits.softmax(dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature, top_k, top_p, repetition_penalty):
    """The one place sampling values are validated; returns an error string or None."""
    if temperature < 0 or math.isnan(temperature):
        return f"temperature must be >= 0 (got {temperature}; 0 is greedy)"
    if top_k is not None and top_k < 0:
        return f"top_k must be >= 0 (got {top_k}; 0 or None disables it)"
    if top_p is not None and not 0.0 < top_p <= 1.0:
        return f"top_p must be in (0, 1] (got {top_p}; 1 disables it)"
    if not repetition_penalty > 0:
        return f"repetition_penalty must be > 0 (got {repetition_penalty}; 1 disables it)"
    return None


def sample_generator(seed, device):
    """A private random generator seeded with seed (None: none, the global RNG), so a
    seeded generation draws the same tokens whatever else runs beside it."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _token_rows(idx) -> list[list[int]]:
    """(B, T) or (T,) tensor, a list of token lists, or one token list -> B token lists."""
    if isinstance(idx, torch.Tensor):
        return idx.tolist() if idx.dim() == 2 else [idx.tolist()]
    idx = list(idx)
    if idx and not isinstance(idx[0], (list, tuple, torch.Tensor)):
        return [[int(t) for t in idx]]
    return [[int(t) for t in r] for r in idx]


# ----------------------------------------------------------------------------------------
# Prefill and decode


def last_logits(model, hidden, head=None):
    """(B, V) fp32 logits of the last position: model.lm_head, or a LogitsHead (end of the file)."""
    return head(hidden[:, -1]) if head is not None else model.lm_head(hidden[:, -1]).float()


@torch.no_grad()
def prefill(model, idx, cache, pad=None, head=None):
    """Run the (left-padded) prompts idx (B, T) through the model at slots 0..T-1, filling
    the cache; return the logits of the last position (B, V)."""
    slots = torch.arange(idx.shape[1], device=idx.device)
    pad = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device) if pad is None else pad
    hidden = model.hidden_states(idx, kv_cache=cache, input_pos=slots, position_ids=position_ids(pad, slots),
                                 attn_mask=attention_mask(pad, slots, cache[0].k.shape[2], model.config.sliding_window or None))
    return last_logits(model, hidden, head)


@torch.no_grad()
def decode_one_token(model, tok, pos, cache, pad=None, head=None):
    """One decode step: the newest token tok (B, 1) at stream index pos (a (1,) tensor, so a
    compiled step sees the same shapes every call) goes into slot pos % max_len (a ring for
    RoPE models; GPT-2's stream never passes max_len); returns the next logits (B, V).
    pad (B,): left padding of each row (None: none)."""
    num_slots = cache[0].k.shape[2]
    pad = torch.zeros(tok.shape[0], dtype=torch.long, device=tok.device) if pad is None else pad
    hidden = model.hidden_states(tok, kv_cache=cache, input_pos=pos % num_slots, position_ids=position_ids(pad, pos),
                                 attn_mask=attention_mask(pad, pos, num_slots, model.config.sliding_window or None))
    return last_logits(model, hidden, head)


@torch.no_grad()
def generate_simple(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The whole idea in one loop: prefill the prompts idx (B, T) once, then feed back one
    sampled token per decode step. All prompts have the same length and prompt + new tokens
    fit in the window, so there is no padding and no slide (generate() below adds both).
    Returns the new tokens (B, max_new_tokens)."""
    B, T = idx.shape
    if T + max_new_tokens > model.config.block_size:
        raise NanoError(f"{T} prompt + {max_new_tokens} new tokens exceed block_size {model.config.block_size} "
                        "(use generate(), which slides the window)")
    cache = make_cache(model, B, T + max_new_tokens)
    logits = prefill(model, idx, cache)  # (B, V): the prompt's keys and values are now cached
    out = []
    for pos in range(T, T + max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        out.append(tok)
        if pos < T + max_new_tokens - 1:  # the last token needs no forward pass
            logits = decode_one_token(model, tok[:, None], torch.tensor([pos], device=idx.device), cache)
    return torch.stack(out, dim=1)


def forward_no_cache(model, rows, head=None):
    """The uncached baseline: recompute from scratch, logits of the last position. GPT-2:
    the given windows, causal. RoPE: every query sees the last block_size tokens at every
    layer, as the ring cache does, over the last n_layer * (block_size - 1) + 1 tokens
    (all that the last token's output depends on), at their true positions."""
    cfg, device = model.config, model.transformer.wte.weight.device
    window = cfg.sliding_window or cfg.block_size  # Mistral's sliding window, else the ring's
    starts = [max(0, len(r) - cfg.n_layer * (window - 1) - 1) if cfg.rope_theta else 0 for r in rows]
    idx, pad = left_pad([r[s:] for r, s in zip(rows, starts)], device)
    if not pad.any() and idx.shape[1] <= cfg.block_size:  # plain causal attention, as nanoGPT's generate
        return last_logits(model, model.hidden_states(idx), head)
    slots = torch.arange(idx.shape[1], device=device)
    hidden = model.hidden_states(idx, input_pos=slots,
                                 position_ids=position_ids(pad, slots) + torch.tensor(starts, device=device)[:, None],
                                 attn_mask=attention_mask(pad, slots, idx.shape[1], window=window))
    return last_logits(model, hidden, head)


def compile_decode(backend="inductor", **kwargs):
    """decode_one_token compiled once: the token, the slot (a tensor, not an int, so its
    value is not baked into the graph), the padding and the cache buffers keep their
    shapes from step to step, so dynamo never recompiles. Prefill stays eager (its length
    differs per prompt)."""
    return torch.compile(decode_one_token, backend=backend, fullgraph=True, **kwargs)


# ----------------------------------------------------------------------------------------
# Generation


def window_start(length, block_size):
    """Where the window begins when the model predicts the token after `length` tokens.

    GPT-2 (learned positions): up to block_size tokens the window is everything. When it
    would overflow it slides by half a window: the newest block_size // 2 tokens are kept
    (and re-prefilled), then it grows again until full. A pure function of the length, so
    generate(), its uncached twin and speculative decoding all see exactly the same windows.
    RoPE models do not use it: their ring cache slides one token at a time."""
    if length <= block_size:
        return 0
    # The window slides when it would hold block_size + 1 tokens and keeps the newest `keep`,
    # so it moves by stride = block_size + 1 - keep tokens; the slides come at lengths
    # block_size + 1, block_size + 1 + stride, ...: one per stride tokens generated.
    keep = max(1, block_size // 2)  # half a window (at least one token, for block_size 1)
    stride = block_size + 1 - keep
    return ((length - block_size - 1) // stride + 1) * stride


def check_prompts(rows, block_size):
    """Every prompt has 1..block_size tokens."""
    if not rows or min(len(r) for r in rows) == 0:
        raise NanoError("every prompt needs at least one token")
    if max(len(r) for r in rows) > block_size:
        raise NanoError(f"a prompt has {max(len(r) for r in rows)} tokens, more than block_size {block_size}")


def seen_tokens(rows, vocab, device):
    """(B, V) bool: the tokens each row's context holds, for the repetition penalty."""
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        seen[b, torch.tensor([t for t in r if t < vocab], dtype=torch.long, device=device)] = True
    return seen


def hold_at_eos(tok, finished, eos_id):
    """Rows that produced eos_id keep producing it; finished (B,) bool is updated in place."""
    tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
    finished |= tok == eos_id
    return tok


def slide_windows(rows, start, block_size) -> bool:
    """GPT-2: move each row's window start (a list, updated in place) to window_start of its
    length; True if any row's window slid (its positions changed, so it must be re-prefilled)."""
    slid = False
    for b, r in enumerate(rows):
        if window_start(len(r), block_size) != start[b]:
            start[b] = window_start(len(r), block_size)
            slid = True
    return slid


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
             eos_id=None, use_cache=True, seed=None, vocab_size=None, decode_fn=None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) LongTensor, as soon as it is sampled.

    generate_simple's loop (prefill, sample_next, decode_one_token) plus what real prompts
    need. idx: (B, T) LongTensor, or a list of B token lists of different lengths (left-padded,
    see the module docstring). Rows that produced eos_id keep yielding eos_id; generation
    stops when all rows have. vocab_size: sample only ids below it (the tokenizer's size).
    decode_fn: a compiled decode_one_token (compile_decode()). seed: a private generator,
    so the result does not depend on the global RNG."""
    error = check_sampling(temperature, top_k, top_p, repetition_penalty)
    if error:
        raise NanoError(error)
    rows = _token_rows(idx)
    block_size = model.config.block_size
    check_prompts(rows, block_size)
    if max_new_tokens <= 0:
        return
    rope = bool(model.config.rope_theta)  # the ring cache slides by one token: no re-prefill
    device = model.transformer.wte.weight.device
    head = LogitsHead(model, vocab_size, batch_size=len(rows))
    generator = sample_generator(seed, device)
    start = [0] * len(rows)  # where each row's window begins in its token list
    seen = seen_tokens(rows, head.weight.shape[0], device) if repetition_penalty != 1.0 else None
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)

    def windows():
        return [r[s:] for r, s in zip(rows, start)]

    if use_cache:
        max_len = min(block_size, max(len(r) for r in rows) + max_new_tokens)
        cache = make_cache(model, len(rows), max_len)
        ids, pad = left_pad(windows(), device)
        logits = prefill(model, ids, cache, pad, head)
        width = ids.shape[1]  # tokens fed per row, pads included; the next goes into slot width % max_len
        step_fn = decode_fn or decode_one_token
    else:
        logits = forward_no_cache(model, windows(), head)

    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            tok = hold_at_eos(tok, finished, eos_id)
        yield tok
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            return
        for r, t in zip(rows, tok.tolist()):
            r.append(t)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), tok] = True
        slid = not rope and slide_windows(rows, start, block_size)  # GPT-2's window is full: slide it
        if not use_cache:
            logits = forward_no_cache(model, windows(), head)
        elif slid:  # some positions changed: recompute the windows from scratch
            ids, pad = left_pad(windows(), device)
            logits = prefill(model, ids, cache, pad, head)
            width = ids.shape[1]
        else:
            pos = torch.tensor([width], device=device)
            logits = step_fn(model, tok[:, None], pos, cache, pad, head)
            width += 1


# ----------------------------------------------------------------------------------------
# Speculative decoding


def speculative_accept(p, q, draft_tokens, generator=None):
    """Verify k draft tokens (Leviathan et al. 2023, Algorithm 1), for N independent rows.

    p: (N, k+1, V) target probabilities at the k draft positions plus the one after;
    q: (N, k, V) the draft probabilities each draft token was sampled from; draft_tokens
    (N, k). Token i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first
    rejection is replaced by a sample of norm(max(0, p_i - q_i)), which puts back exactly
    the mass that acceptance under-delivers, so every emitted token is distributed as p.
    If all k are accepted, a bonus token is drawn from p_{k+1}.
    Returns (n_accepted (N,), next_token (N,)): emit draft_tokens[:n] then next_token."""
    N, k = draft_tokens.shape
    p_draft = p[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (N, k)
    q_draft = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
    r = torch.rand(p_draft.shape, generator=generator, device=p.device, dtype=p.dtype)
    accepted = r * q_draft < p_draft  # r < p/q without dividing; q(d) > 0 as d was drawn from q
    n_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # length of the accepted prefix
    residual = (p[:, :k] - q).clamp(min=0)
    # a residual with no mass left (p == q up to rounding) cannot be reached by a rejection; use p
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :k])
    choices = torch.cat([residual, p[:, k:]], dim=1)  # (N, k+1, V): row n is what follows n accepted
    dist = choices[torch.arange(N, device=p.device), n_accepted]  # (N, V)
    next_token = torch.multinomial(dist / dist.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
    return n_accepted, next_token


class WindowedModel:
    """A model, its batch-1 static cache and its sliding window over a growing token list,
    for speculative decoding. The cache holds the first `filled` tokens of the window;
    each call feeds only what it lacks. A rejected draft needs no undo: `rollback` just
    lowers `filled`, the next call writes over those slots, and the mask never shows a
    slot beyond the current position. GPT-2: the half-window slides of window_start. RoPE:
    a ring of block_size + k slots, so writing k+1 tokens at once never overwrites a key
    that one of them still sees (attention_mask keeps each query to the last block_size)."""

    def __init__(self, model, vocab_size=None, max_write=1):
        self.model, self.block_size = model, model.config.block_size
        self.rope = bool(model.config.rope_theta)
        self.head = LogitsHead(model, vocab_size, batch_size=1)
        self.cache = make_cache(model, 1, self.block_size + (max_write - 1 if self.rope else 0))
        self.start, self.filled = 0, 0
        self.forwards = 0

    def logits(self, tokens, n_last=1):
        """Logits (n_last, V) predicting the token after tokens[:len - n_last + 1], ...,
        after tokens[:len], in one forward pass. GPT-2: the caller keeps these contexts in
        one window (window_start of their lengths equal)."""
        start = 0 if self.rope else window_start(len(tokens) - n_last + 1, self.block_size)
        if start != self.start:  # the window slid: positions changed, re-prefill it
            self.start, self.filled = start, 0
        feed = tokens[start + self.filled:]
        device, num_slots = self.head.weight.device, self.cache[0].k.shape[2]
        pos = torch.arange(self.filled, self.filled + len(feed), device=device)
        hidden = self.model.hidden_states(torch.tensor([feed], device=device), kv_cache=self.cache,
                                          input_pos=pos % num_slots, position_ids=pos,
                                          attn_mask=attention_mask(pos.new_zeros(1), pos, num_slots,
                                                                   self.model.config.sliding_window or self.block_size))
        self.filled += len(feed)
        self.forwards += 1
        return self.head(hidden[0, -n_last:])  # (n_last, V)

    def rollback(self, n_valid):
        """Only the first n_valid tokens of the list are still right."""
        self.filled = max(0, min(self.filled, n_valid - self.start))


def one_prompt(prompt, block_size) -> list[int]:
    """Speculative decoding's prompt: one token list of 1..block_size tokens."""
    rows = _token_rows(prompt)
    if len(rows) != 1:
        raise NanoError("speculative decoding takes one prompt at a time")
    if not rows[0] or len(rows[0]) > block_size:
        raise NanoError(f"the prompt needs 1..{block_size} tokens (got {len(rows[0])})")
    return rows[0]


def propose(d_model, tokens, k, to_probs, seen, generator, greedy):
    """The draft's k tokens after tokens, one forward pass each. Returns (drafts, q_rows,
    seen_rows): q_rows[i] the distribution draft i was drawn from, seen_rows[i] the tokens
    in the context of position i (for the repetition penalty; None without one)."""
    drafts, q_rows, seen_rows = [], [], [seen] if seen is not None else None
    for i in range(k):
        q_i = to_probs(d_model.logits(tokens + drafts)[0], seen_rows[i] if seen_rows else None)
        d_i = int(q_i.argmax()) if greedy else int(torch.multinomial(q_i, 1, generator=generator))
        drafts.append(d_i)
        q_rows.append(q_i)
        if seen_rows is not None:
            seen_rows.append(seen_rows[-1].clone().index_fill_(0, torch.tensor([d_i], device=q_i.device), True))
    return drafts, q_rows, seen_rows


@torch.no_grad()
def speculative_generate(target, draft, prompt, max_new_tokens, num_draft_tokens=4, temperature=1.0,
                         top_k=None, top_p=None, repetition_penalty=1.0, eos_id=None, seed=None,
                         vocab_size=None, stats=None) -> Iterator[torch.Tensor]:
    """Speculative decoding of one prompt (a token list or (1, T) tensor); yields (1,)
    tokens like generate(), with the same sliding windows, so at temperature 0 the output
    is the target's greedy output token for token. stats (a dict) receives
    target_forwards, draft_forwards, proposed, accepted and new_tokens."""
    error = check_sampling(temperature, top_k, top_p, repetition_penalty)
    if error:
        raise NanoError(error)
    tokens = one_prompt(prompt, target.config.block_size)
    if num_draft_tokens < 1:
        raise NanoError(f"num_draft_tokens must be >= 1 (got {num_draft_tokens})")
    t_model = WindowedModel(target, vocab_size, max_write=num_draft_tokens + 1)
    d_model = WindowedModel(draft, vocab_size, max_write=num_draft_tokens + 1)
    if t_model.head.weight.shape[0] != d_model.head.weight.shape[0]:
        raise NanoError("target and draft have different vocabularies (pass vocab_size=the tokenizer's)")
    device, vocab = t_model.head.weight.device, t_model.head.weight.shape[0]
    generator = sample_generator(seed, device)
    stats = {} if stats is None else stats
    stats.update(target_forwards=0, draft_forwards=0, proposed=0, accepted=0, new_tokens=0)
    seen = seen_tokens([tokens], vocab, device)[0] if repetition_penalty != 1.0 else None

    def to_probs(logits, seen_rows):
        if seen_rows is not None:
            logits = apply_repetition_penalty(logits, seen_rows, repetition_penalty)
        return logits_to_probs(logits, temperature, top_k, top_p)

    produced = 0
    while produced < max_new_tokens:
        n = len(tokens)
        # GPT-2: verify at most as many drafts as keep every checked context in the target's window
        room = num_draft_tokens if t_model.rope else t_model.block_size - (n - window_start(n, t_model.block_size))
        k = min(num_draft_tokens, max_new_tokens - produced - 1, room)
        # 1. the draft proposes k tokens, one forward each
        drafts, q_rows, seen_rows = propose(d_model, tokens, k, to_probs, seen, generator, greedy=temperature == 0)
        # 2. the target scores all k+1 positions in one forward pass
        p = to_probs(t_model.logits(tokens + drafts, n_last=k + 1),
                     torch.stack(seen_rows) if seen_rows is not None else None)  # (k+1, V)
        # 3. accept a prefix of the drafts, then one token more: a correction or the bonus
        q = torch.stack(q_rows) if q_rows else p.new_zeros(0, vocab)
        n_acc, next_tok = speculative_accept(p[None], q[None], torch.tensor([drafts], dtype=torch.long,
                                                                            device=device).view(1, k), generator)
        n_acc = int(n_acc)
        new = drafts[:n_acc] + [int(next_tok)]
        t_model.rollback(n + n_acc)  # cache keeps the context and the accepted drafts
        d_model.rollback(n + n_acc)
        stats["proposed"] += k
        stats["accepted"] += n_acc
        stats["target_forwards"], stats["draft_forwards"] = t_model.forwards, d_model.forwards
        for t in new:
            tokens.append(t)
            if seen is not None and t < vocab:
                seen[t] = True
            produced += 1
            stats["new_tokens"] += 1
            yield torch.tensor([t], device=device)
            if produced == max_new_tokens or t == eos_id:
                return


# ----------------------------------------------------------------------------------------
# CLI


@dataclass
class SampleConfig:
    ckpt: str = field(default="out/ckpt.pt", metadata={"help": "checkpoint written by train.py (gpt.save_checkpoint)"})
    init_from: str = field(default="", metadata={"help": "instead of --ckpt: gpt2 .. gpt2-xl, a Hugging Face folder or hub name (Llama, Mistral, Qwen2/3, SmolLM)"})
    prompt: str = field(default="\n", metadata={"help": "text to continue"})
    prompt_file: str = field(default="", metadata={"help": "read the prompt from this file instead"})
    num_samples: int = field(default=1, metadata={"help": "samples of the prompt, generated as one batch"})
    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate per sample"})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy, < 1 sharper, > 1 flatter"})
    top_k: int = field(default=200, metadata={"help": "sample among the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: smallest set of tokens with this much mass (1 = all)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages tokens already in the context (HF convention)"})
    stop_at_eot: bool = field(default=False, metadata={"help": "end a sample at the tokenizer's end-of-text token"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16 (weights and cache)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (compiled once, static shapes)"})
    no_cache: bool = field(default=False, metadata={"help": "recompute the whole window every token (the slow baseline)"})
    draft: str = field(default="", metadata={"help": "a small draft model (checkpoint, folder or hub name) with the same tokenizer: speculative decoding"})
    num_draft_tokens: int = field(default=4, metadata={"help": "tokens the draft proposes per target forward"})
    profile: str = field(default="", metadata={"help": "write a torch.profiler Chrome trace of prefill + 8 decode steps to this .json, print the top ops, and stop"})


def check_config(cfg: SampleConfig):
    error = check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    if error:
        raise NanoError(error)
    if cfg.num_samples < 1:
        raise NanoError(f"num_samples must be >= 1 (got {cfg.num_samples})")
    if cfg.max_new_tokens < 1:
        raise NanoError(f"max_new_tokens must be >= 1 (got {cfg.max_new_tokens})")
    if cfg.prompt_file and not Path(cfg.prompt_file).is_file():
        raise NanoError(f"prompt file {cfg.prompt_file} not found (check --prompt_file)")
    if cfg.draft:
        if cfg.no_cache:
            raise NanoError("--draft needs the KV cache (drop --no_cache)")
        if cfg.compile:
            raise NanoError("--compile compiles the plain decode step; it does not apply to --draft (drop one)")
        if cfg.num_draft_tokens < 1:
            raise NanoError(f"num_draft_tokens must be >= 1 (got {cfg.num_draft_tokens})")
    if cfg.compile and cfg.no_cache:
        raise NanoError("--compile compiles the cached decode step (drop --no_cache)")


def load_model(cfg, device, dtype):
    """(model in eval mode, tokenizer spec) of cfg.init_from if set, else of the checkpoint cfg.ckpt."""
    return load_source(cfg.init_from, device, dtype) if cfg.init_from else load_source(cfg.ckpt, device, dtype, True)


def load_source(source: str, device, dtype, checkpoint=None):
    """A checkpoint file, or a GPT-2 name / Hugging Face folder / hub name (gpt.load_pretrained)."""
    if checkpoint or (checkpoint is None and (Path(source).is_file() or source.endswith((".pt", ".pth")))):
        ckpt = gpt.read_checkpoint(source, device="cpu")
        if is_moe_checkpoint(ckpt):  # a GPT would list every expert key it lacks: say what the file is instead
            raise NanoError(f"{source} is an MoE checkpoint (sample it with moe.py's model: "
                            "model, spec = moe.load_moe_checkpoint(path), then sample.generate(model, ...))")
        if "quantization" in ckpt:  # written by quantize.py: its layers, already in their own dtypes
            import quantize

            return quantize.load_quantized(ckpt, device)
        model, spec = gpt.model_from_checkpoint(ckpt, source), ckpt.get("tokenizer")
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # else a sampling traceback later
            raise NanoError(f"{source}: the weights hold NaN or inf (the run diverged: use an earlier checkpoint)")
    else:
        model, spec = gpt.load_pretrained(source, dtype=dtype)
        if spec is None:
            raise NanoError(f"{source} has no tokenizer.json (put the model's tokenizer.json beside config.json)")
    return model.to(device=device, dtype=dtype).eval(), spec


def is_moe_checkpoint(ckpt: dict) -> bool:
    """Written by moe.save_moe_checkpoint (its "moe" config), or any state dict with an MoE
    layer's router or stacked experts (keys "...mlp.router.weight", "...mlp.w_fc")."""
    return "moe" in ckpt or any(k.endswith((".mlp.router.weight", ".mlp.w_fc")) for k in ckpt["model"])


def same_tokenizer(a, b) -> bool:
    """Equal specs, or two tokenizer.json files with the same contents (two folders of a family)."""
    if a == b:
        return True
    return all(isinstance(s, str) and Path(s).is_file() for s in (a, b)) and Path(a).read_bytes() == Path(b).read_bytes()


@cli
def main(argv=None):
    cfg = common.parse_config(SampleConfig, argv, description=__doc__)
    check_config(cfg)
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)
    common.set_seed(cfg.seed)
    prompt = data.read_text_file(Path(cfg.prompt_file), "--prompt_file") if cfg.prompt_file else cfg.prompt
    model, spec = load_model(cfg, device, dtype)
    tok = tokenizer.load_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise NanoError(f"tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
    ids = tok.encode(prompt)
    if not ids:
        if tok.eot_id is None:
            raise NanoError("the prompt is empty (pass --prompt with at least one character)")
        ids = [tok.eot_id]  # an empty prompt starts a fresh document, as GPT-2 was trained
    block_size = model.config.block_size
    draft = None
    if cfg.draft:
        draft, draft_spec = load_source(cfg.draft, device, dtype)
        if not same_tokenizer(draft_spec, spec) or draft.config.vocab_size < tok.vocab_size:
            raise NanoError(f"the draft's vocabulary ({str(draft_spec)[:40]!r}, {draft.config.vocab_size} ids) "
                             f"differs from the target's ({str(spec)[:40]!r}) (train the draft with the same tokenizer)")
    if len(ids) > block_size:
        raise NanoError(f"the prompt is {len(ids)} tokens, the model takes at most {block_size} "
                         "(shorten --prompt)")
    if device == "cpu":  # faster 1-row products (decode_layout): the draft's steps, or batch-1 decode
        if draft is not None:
            decode_layout(draft)
        elif dtype == torch.bfloat16 and not cfg.compile:  # bf16 products are fast only in oneDNN's layout
            pack_linears(model, rows=cfg.num_samples)
        elif cfg.num_samples == 1:
            decode_layout(model)
    print(kv_cache_line(model.config, dtype), file=sys.stderr)
    if cfg.profile:
        return profile_steps(model, ids, cfg.profile, device)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                  repetition_penalty=cfg.repetition_penalty, seed=cfg.seed, vocab_size=tok.vocab_size,
                  eos_id=tok.eot_id if cfg.stop_at_eot else None)

    if draft is None:
        return sample_batch(model, tok, ids, prompt, cfg, sampling)
    return sample_speculative(model, draft, tok, ids, prompt, cfg, sampling)


def profile_steps(model, ids, path, device, steps=8):
    """--profile: torch.profiler over prefill and `steps` greedy decode steps, each step labelled;
    the Chrome trace (chrome://tracing, ui.perfetto.dev) goes to `path`, the ops that took the most
    time are printed. Returns the table."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = "cuda" in device
    cache = make_cache(model, 1, model.config.block_size)
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        with record_function("prefill"):
            logits = prefill(model, torch.tensor([ids], device=device), cache)
        for pos in range(len(ids), min(len(ids) + steps, model.config.block_size)):
            with record_function("decode"):
                logits = decode_one_token(model, logits.argmax(-1, keepdim=True), torch.tensor([pos], device=device), cache)
        logits.cpu()  # wait for the device inside the profile
    common.atomic_write(path, lambda tmp: prof.export_chrome_trace(str(tmp)))
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15)
    print(table)
    print(f"wrote {path}: open it in chrome://tracing or ui.perfetto.dev")
    return table


def kv_cache_line(config, dtype) -> str:
    """The cache per token, and what grouped-query attention saves against full heads."""
    line = f"KV cache: {kv_bytes_per_token(config, dtype):,} bytes per token"
    if config.n_kv_head < config.n_head:
        line += (f" ({config.n_kv_head} key/value heads for {config.n_head} query heads: {config.n_head // config.n_kv_head}x "
                 f"less than the {kv_bytes_per_token(config, dtype, config.n_head):,} of full heads)")
    return line


def _until_eos(out, eos_id):
    return out[:out.index(eos_id)] if eos_id is not None and eos_id in out else out


def sample_batch(model, tok, ids, prompt, cfg, sampling):
    """--num_samples copies of the prompt as one batch; one sample is streamed as it comes."""
    decode_fn = compile_decode() if cfg.compile else None
    outputs = [[] for _ in range(cfg.num_samples)]
    stream, printed = cfg.num_samples == 1, ""
    if stream:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    stamps = []  # when each step's tokens were out
    for step_tokens in generate(model, [ids] * cfg.num_samples, cfg.max_new_tokens,
                                use_cache=not cfg.no_cache, decode_fn=decode_fn, **sampling):
        for out, t in zip(outputs, step_tokens.tolist()):  # .tolist() waits for the device
            out.append(t)
        stamps.append(time.perf_counter())
        if stream:  # hold back a half-decoded multi-byte character until it is complete
            text = tok.decode(_until_eos(outputs[0], sampling["eos_id"]))
            if not text.endswith("\ufffd"):
                print(text[len(printed):], end="", flush=True)
                printed = text
    texts = [prompt + tok.decode(_until_eos(out, sampling["eos_id"])) for out in outputs]
    for text in texts:
        print(text[len(prompt) + len(printed):] if stream else text)
        print("---------------")
    # prefill = prompt in, first token out; decode = every later step. With --compile the
    # first decode step also compiles, so it is reported apart and left out of decode.
    n, prefill_s = cfg.num_samples, stamps[0] - t0
    line = f"prefill: {n * len(ids)} tokens in {prefill_s * 1e3:.1f} ms ({n * len(ids) / prefill_s:.0f} tok/s)"
    if cfg.compile and len(stamps) > 1:
        line += f" | compile + first decode step: {stamps[1] - stamps[0]:.1f} s"
        stamps = stamps[1:]
    steps, decode_s = len(stamps) - 1, stamps[-1] - stamps[0]
    if steps > 0:
        line += (f" | decode: {n * steps} tokens in {decode_s:.2f} s ({n * steps / decode_s:.1f} tok/s, "
                 f"{decode_s / steps * 1e3:.2f} ms/step)")
    print(line + (" [no cache]" if cfg.no_cache else ""), file=sys.stderr)
    return texts


def sample_speculative(model, draft, tok, ids, prompt, cfg, sampling):
    """--num_samples samples one after the other, each by speculative decoding."""
    texts, totals = [], {}
    t0 = time.perf_counter()
    for i in range(cfg.num_samples):
        stats = {}
        out = [int(t) for t in speculative_generate(model, draft, ids, cfg.max_new_tokens, cfg.num_draft_tokens,
                                                    stats=stats, **{**sampling, "seed": cfg.seed + i})]
        texts.append(prompt + tok.decode(_until_eos(out, sampling["eos_id"])))
        print(texts[-1])
        print("---------------")
        for key, v in stats.items():
            totals[key] = totals.get(key, 0) + v
    dt = time.perf_counter() - t0
    print(f"speculative: k={cfg.num_draft_tokens}, acceptance rate "
          f"{totals['accepted'] / max(1, totals['proposed']):.2f}, "
          f"{totals['new_tokens'] / max(1, totals['target_forwards']):.2f} tokens per target forward, "
          f"{totals['new_tokens'] / dt:.1f} tok/s", file=sys.stderr)
    return texts


# ----------------------------------------------------------------------------------------
# CPU decode optimisations: weights laid out for 1-row products. The output head as a
# (C, V) copy (optional: prefill/decode_one_token work with model.lm_head; generate() passes
# a LogitsHead), and the blocks' wide weights re-laid in place (decode_layout, opt-in).


_transposed_heads = WeakIdKeyDictionary()  # lm_head weight -> (version, vocab, (C, V) copy)


class LogitsHead:
    """The output projection applied to one position per row, in fp32. Rows past the
    tokenizer's vocabulary (GPT-2 pads 50257 to 50304) are dropped, so they are never sampled.

    Why: batch-1 decode on CPU is one 1-row product per weight, and a 1-row product with a
    contiguous (C, V) copy of the head took about half the time of nn.Linear's (V, C) layout
    (12.4 vs 6.2 ms at V=50257, C=768); with several rows (V, C) is as fast, so the copy is
    made only for batch 1 on CPU. It is kept across calls (rebuilt if the weight changes in
    place), so a short generation does not pay the 150 MB copy each time."""

    def __init__(self, model, vocab_size=None, batch_size=None):
        self.module, self.vocab_size = model.lm_head, vocab_size
        if not isinstance(model.lm_head, nn.Linear):  # a quantized head (quantize.py) runs its own kernel
            self.weight = self.weight_t = None
            return
        weight = model.lm_head.weight
        self.weight = weight.detach()[:vocab_size] if vocab_size else weight.detach()  # (V, C)
        self.weight_t = None
        if batch_size == 1 and weight.device.type == "cpu":
            version, vocab, copy = _transposed_heads.get(weight, (None, None, None))
            if (version, vocab) != (weight._version, self.weight.shape[0]) or copy.dtype != weight.dtype:
                copy = self.weight.t().contiguous()  # (C, V)
                _transposed_heads[weight] = (weight._version, self.weight.shape[0], copy)
            self.weight_t = copy

    def __call__(self, hidden):  # (B, C) -> (B, V) in fp32 for sampling
        if self.weight is None:
            return self.module(hidden)[:, :self.vocab_size].float()
        if self.weight_t is not None and hidden.shape[0] == 1:
            return (hidden @ self.weight_t).float()
        return F.linear(hidden, self.weight).float()


def decode_layout(model):
    """Store every Linear weight of the blocks whose output is wider than its input (GPT-2's
    c_attn and c_fc; Llama's gate/up) as an (in, out) contiguous tensor, seen through its
    transpose: the Parameter, its shape (out, in) and its values stay, only the memory order
    changes (a 1-row product then sums in another order: equal up to fp32 rounding). Returns the model.

    Why: decode at batch 1 is a chain of 1-row products, each bound by reading its weight.
    On this CPU kind a 1-row product streamed a wide weight about 1.6x faster in the
    (in, out) order (768 -> 3072: 0.65 vs 0.33 ms), as it did the output head (LogitsHead);
    narrow ones (3072 -> 768) were no faster, so they stay; at 8 rows both orders were alike.
    A 124M batch-1 decode step went from ~35 to ~29 ms (thread CPU time; the memory bound,
    one 1-row product over 124M weights, ~26 ms). Hugging Face's GPT-2 keeps its Conv1D
    weights in this order anyway. Done in place, not as a copy, so it costs no memory; call
    it once on a model kept for sampling (main() does, on CPU, for batch 1 and drafts)."""
    for block in model.transformer.h:
        for linear in block.modules():
            if isinstance(linear, nn.Linear) and linear.out_features > linear.in_features \
                    and linear.weight.is_contiguous():
                linear.weight.data = linear.weight.data.t().contiguous().t()  # (out, in) view of (in, out)
    return model


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight oneDNN has reordered once into its own blocked layout,
    run by oneDNN's matmul (what vLLM's CPU backend does with its prepacked onednn_mm).

    Why: several rows at once (serving's decode batch, a prefill) are a small matrix product,
    and the blocked layout keeps the CPU's vector (fp32) or AMX (bf16) units fed; measured on
    this CPU kind (one thread, 16 rows): 768 -> 2304 1.2-1.4x and the 768 -> 50304 head
    2.6x faster than F.linear in fp32, 1.4x in bf16 (and 2.3x for the bf16 head at 1 row).
    One or two fp32 rows are slower there (a whole 124M batch-1 step 1.2x), so an fp32 layer
    keeps a plain copy too for those, wide ones in decode_layout's faster order (twice the weight
    memory); a bf16 one keeps only the packed copy (an opaque tensor: it cannot be saved, trained
    or read back as a matrix)."""

    def __init__(self, linear: nn.Linear, rows: int = 16, gelu: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)  # (out, in), blocked
        self.weight = None  # fp32: the 1-2 row path, a wide weight in decode_layout's (in, out) order
        if weight.dtype == torch.float32:
            self.weight = weight.t().contiguous().t() if self.out_features > self.in_features else weight
        self.bias = None if linear.bias is None else linear.bias.detach()
        # GELU fused into the product (a oneDNN post-op, "tanh" or "none" as nn.GELU's approximate):
        # one pass over the (rows, 4C) output instead of two
        self.gelu, self.post_op, self.algorithm = gelu, "gelu" if gelu else "none", gelu or ""

    def forward(self, x):  # (..., in) -> (..., out)
        if self.weight is not None and x.numel() <= 2 * self.in_features:
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y, approximate=self.gelu) if self.gelu else y
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.post_op, [], self.algorithm)


def pack_linears(model, rows: int = 16):
    """Replace every nn.Linear of a CPU inference model (the blocks and the output head; a tied
    head gets its own packed copy, the embedding keeps the matrix) by a PackedLinear tuned for
    `rows` rows, GPT-2's MLP GELU fused into its first product. Returns the model; a no-op off
    CPU or where PyTorch was built without oneDNN."""
    if model.transformer.wte.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return model
    for module in list(model.modules()):
        if type(getattr(module, "c_fc", None)) is nn.Linear and isinstance(getattr(module, "gelu", None), nn.GELU):
            module.c_fc = PackedLinear(module.c_fc, rows, gelu=module.gelu.approximate)  # GPT-2's MLP
            module.gelu = nn.Identity()
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child, rows))
    return model


if __name__ == "__main__":
    main()
