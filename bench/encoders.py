"""encoders: BPE (bpe.py), WordPiece (wordpiece.py) and Unigram (unigram.py) trained at the same
vocabulary size on the same text: tokens per byte of held-out text, the longest tokens, and the
bits per byte of one small GPT trained on each token stream; and each trainer's time.

Run: python -m bench encoders [--quick]"""

from __future__ import annotations

import math
import time

import torch

import bpe
import gpt
import unigram
import wordpiece

from .util import SHARED_DATA, row

VOCAB = 1024
STEPS, BATCH, BLOCK = 300, 32, 64


def tokenizers(train_text: str, vocab: int) -> dict:
    """name -> (encode(text) -> ids, piece(id) -> str, training seconds, note)."""
    out = {}
    t0 = time.perf_counter()
    b = bpe.Tokenizer(*bpe.train_bpe(train_text, vocab))
    out["BPE (bpe.py, byte-level)"] = (b.encode, lambda i: b.decode_bytes([i]).decode("utf-8", "replace"),
                                       time.perf_counter() - t0, "lossless")
    t0 = time.perf_counter()
    w = wordpiece.train_wordpiece(train_text, vocab, lowercase=False)
    out["WordPiece (cased)"] = (w.encode, w.pieces.__getitem__, time.perf_counter() - t0, "drops whitespace")
    t0 = time.perf_counter()
    u = unigram.train_unigram(train_text, vocab)
    out["Unigram (SentencePiece-style)"] = (lambda s: unigram.encode_text(u, s), u.pieces.__getitem__,
                                            time.perf_counter() - t0, "lossless")
    return out


def bits_per_byte(train_ids, val_ids, val_bytes: int, vocab: int, steps: int, seed: int = 1337) -> float:
    """A 2-layer GPT (128 wide, context 64) trained `steps` AdamW steps on train_ids; val loss
    over consecutive windows of val_ids, in bits per UTF-8 byte of the held-out text."""
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(block_size=BLOCK, vocab_size=vocab, n_layer=2, n_head=4, n_embd=128, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        starts = torch.randint(len(train_ids) - BLOCK - 1, (BATCH,), generator=g)
        x = torch.stack([train_ids[s:s + BLOCK] for s in starts])
        y = torch.stack([train_ids[s + 1:s + BLOCK + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    nats = count = 0
    with torch.no_grad():
        for s in range(0, len(val_ids) - BLOCK - 1, BLOCK * BATCH):
            starts = range(s, min(s + BLOCK * BATCH, len(val_ids) - BLOCK - 1), BLOCK)
            x = torch.stack([val_ids[i:i + BLOCK] for i in starts])
            y = torch.stack([val_ids[i + 1:i + BLOCK + 1] for i in starts])
            _, loss = model(x, y)
            nats += loss.item() * y.numel()
            count += y.numel()
    # nats per scored token x tokens per byte of the held-out text
    return nats / count * (len(val_ids) / val_bytes) / math.log(2)


def bench_encoders(quick: bool) -> None:
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    if quick:
        text = text[:120_000]
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    vocab, steps = (300, 10) if quick else (VOCAB, STEPS)
    val_bytes = len(val_text.encode())
    row("encoders", f"Tiny Shakespeare, vocab {vocab}, trained on the first 90%, scored on the last 10%",
        "tokens/byte | longest tokens | GPT val bits/byte | train s")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: one thread (two spin against the other jobs)
    try:
        for name, (encode, piece, seconds, note) in tokenizers(train_text, vocab).items():
            train_ids, val_ids = torch.tensor(encode(train_text)), torch.tensor(encode(val_text))
            longest = sorted({piece(i) for i in set(train_ids.tolist())}, key=lambda p: (-len(p), p))[:3]
            bpb = bits_per_byte(train_ids, val_ids, val_bytes, vocab, steps)
            row("encoders", f"  {name} ({note})",
                f"{len(val_ids) / val_bytes:.3f} | {' '.join(repr(p) for p in longest)} | {bpb:.3f} | {seconds:.1f}")
    finally:
        torch.set_num_threads(threads)
