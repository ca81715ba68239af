"""passkey: a number hidden in filler text, retrieved by greedy decoding, at 1x, 2x and 4x the
context a tiny model was trained on, with plain RoPE and with the same weights under YaRN, dynamic
NTK and linear scaling (no finetuning). The test is the one of Mohtashami & Jaggi 2023 ("Landmark
Attention", arXiv:2305.16300), also used by YaRN (Peng et al. 2023, arXiv:2309.00071).

A 2-layer Llama-style model on characters is trained from scratch on sequences of exactly T
characters: filler sentences with "The pass key is 73914. " at a random depth, then "Again: the pass
key is 73914", the loss on those last five digits only. It is then asked at lengths T, 2T and 4T
(the key at a uniformly random depth, fresh keys) and greedy-decodes five characters, KV-cached:
accuracy = exact five-digit retrievals. Scaled rows use factor = length / T and original context T,
as a config.json would say (gpt.GPTConfig's rope_type, rope_scaling); at 1x dynamic is plain RoPE.
What to expect: a model this small extrapolates badly with plain RoPE (it never saw a distance past
T); the scaled rows show how much of that the frequency stretch alone, without finetuning, recovers.

Run: python -m bench passkey [--quick]"""

from __future__ import annotations

import dataclasses
import math
import random
import time

import torch

import gpt
import sample

from .util import row

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The pass key is {}. "
QUESTION = "Again: the pass key is "
ALPHABET = sorted(set(FILLER + KEY + QUESTION + "0123456789"))
STOI = {c: i for i, c in enumerate(ALPHABET)}


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def passkey_text(length: int, rng: random.Random) -> tuple[str, str]:
    """(prompt, key): a prompt of exactly `length` characters ending in QUESTION, the key sentence
    at a uniformly random depth in the filler (which starts at a random place of its cycle)."""
    key = f"{rng.randrange(10**5):05d}"
    sentence = KEY.format(key)
    room = length - len(sentence) - len(QUESTION)
    if room < 0:
        raise ValueError(f"length {length} leaves no room for the key and the question")
    start = rng.randrange(len(FILLER))
    filler = (FILLER * (room // len(FILLER) + 2))[start:start + room]
    depth = rng.randrange(room + 1)
    return filler[:depth] + sentence + filler[depth:] + QUESTION, key


def training_batch(batch_size: int, T: int, rng: random.Random):
    """(idx, targets) of shape (B, T - 1): prompt + key of T characters, shifted by one; the targets
    are -1 except the key's five digits at the end (the loss is on the retrieval only: measured, it
    learns several times faster than with the loss on every character)."""
    rows, targets = [], []
    for _ in range(batch_size):
        prompt, key = passkey_text(T - 5, rng)
        ids = encode(prompt + key)
        rows.append(ids[:-1])
        targets.append([-1] * (len(prompt) - 1) + ids[len(prompt):])
    return torch.tensor(rows), torch.tensor(targets)


def train(T: int, steps: int, seed: int = 0) -> gpt.GPT:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = gpt.GPT(gpt.llama_config(n_layer=2, n_head=4, n_embd=64, block_size=T, vocab_size=len(ALPHABET)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx, targets = training_batch(32, T, rng)
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def accuracy(model: gpt.GPT, length: int, n: int, rope: dict, seed: int = 1) -> float:
    """Exact five-digit retrievals among n prompts of `length` characters, greedy, KV-cached."""
    rng = random.Random(seed)
    config = dataclasses.replace(model.config, block_size=length, **rope)
    scaled = gpt.GPT(config).eval()
    scaled.load_state_dict(model.state_dict())
    prompts, keys = zip(*(passkey_text(length - 5, rng) for _ in range(n)))  # prompt + key = length
    idx = torch.tensor([encode(p) for p in prompts])
    out = torch.stack(list(sample.generate(scaled, idx, 5, temperature=0)), dim=1)
    return sum("".join(ALPHABET[i] for i in r) == k for r, k in zip(out.tolist(), keys)) / n


def bench_passkey(quick: bool) -> None:
    """The table: accuracy per (length, rope) of one model trained at T."""
    section = "passkey"
    T, steps, n = (64, 20, 8) if quick else (64, 1200, 100)
    t0 = time.perf_counter()
    model = train(T, steps)
    row(section, f"trained: 2 layers, 64 dims, T={T} chars, {steps} steps of 32", f"{time.perf_counter() - t0:.0f} s")
    for mult in (1, 2, 4):
        length = mult * T
        ropes = {"plain RoPE": {}}
        for kind in ("yarn", "dynamic", "linear"):
            if mult > 1 or kind == "dynamic":  # dynamic at T is plain RoPE: one row says so
                ropes[f"{kind} x{mult}"] = dict(  # yarn: beta_slow 1, beta_fast 32, attention 0.1 ln(s) + 1
                    rope_type=kind, rope_scaling=float(mult), rope_original_max_position=T, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=32.0, rope_attention_factor=0.1 * math.log(mult) + 1 if kind == "yarn" else 1.0)
        for name, rope in ropes.items():
            acc = accuracy(model, length, n, rope)
            row(section, f"length {length} ({mult}T), {name}", f"{acc:.0%} of {n} keys retrieved")
