"""bpe: bpe.py's GPT-2 encoder against tiktoken (cold and warm cache, one document and a batch of
them over every core), and its trainer against Hugging Face tokenizers (vocab 500 and 10,000 on
Tiny Shakespeare, then 10,000 on >= 50 MB).

Run: python -m bench bpe [--quick]"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import tiktoken

import bpe
import data
import tokenizer

from .util import interleaved, row

EOT = "<|endoftext|>"


def bench_bpe(quick: bool) -> None:
    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    bench_bpe_encode(quick, text)
    bench_bpe_train(quick, text)


def bench_bpe_encode(quick, text):
    repeat = 2 if quick else 7
    enc = tiktoken.get_encoding("gpt2")
    tok = tokenizer.bpe_from_gpt2_files(tokenizer.GPT2_VOCAB_BPE, tokenizer.GPT2_ENCODER_JSON)
    curly = text.replace("'", "\u2019")  # no longer ASCII: the `regex` split
    for name, sample in (("Tiny Shakespeare (ASCII)", text), ("Tiny Shakespeare, curly ' (not ASCII)", curly)):
        sample = sample[:200_000] if quick else sample
        assert tok.encode_ordinary(sample) == enc.encode_ordinary(sample), "bpe.py and tiktoken disagree"
        mb = len(sample.encode("utf-8")) / 1e6
        for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
            s = interleaved({"tiktoken": lambda t=sample: enc.encode_ordinary(t),
                             "cold": lambda t=sample: (tok._cache.clear(), tok.encode_ordinary(t)),
                             "warm": lambda t=sample: tok.encode_ordinary(t)}, repeat, clock)
            if clock_name == "wall":
                row("bpe", f"encode GPT-2, {name}: tiktoken, 1 thread", f"{mb / s['tiktoken']:.1f} MB/s")
                row("bpe", f"encode GPT-2, {name}: bpe.py cold / warm cache",
                    f"{mb / s['cold']:.1f} / {mb / s['warm']:.1f} MB/s")
            row("bpe", f"  bpe.py time / tiktoken's, cold / warm ({clock_name}; goal <= 2.5x)",
                f"{s['cold'] / s['tiktoken']:.2f}x / {s['warm'] / s['tiktoken']:.2f}x")

    # encode_batch: documents of Tiny Shakespeare (paragraphs, ragged), all the machine's cores
    docs = [d for d in text.split("\n\n") if d][:500 if quick else None]
    n = os.cpu_count() or 1
    assert tok.encode_batch(docs[:50], num_workers=2) == enc.encode_ordinary_batch(docs[:50])
    s = interleaved({"tiktoken 1": lambda: enc.encode_ordinary_batch(docs, num_threads=1),
                     f"tiktoken {n}": lambda: enc.encode_ordinary_batch(docs, num_threads=n),
                     "bpe.py 1": lambda: (tok._cache.clear(), tok.encode_batch(docs, num_workers=1)),
                     f"bpe.py {n}": lambda: (tok._cache.clear(), tok.encode_batch(docs, num_workers=n))},
                    max(2, repeat // 2))
    row("bpe", f"encode_batch {len(docs):,} docs: tiktoken 1 / {n} threads",
        f"{s['tiktoken 1'] * 1000:.0f} / {s[f'tiktoken {n}'] * 1000:.0f} ms")
    row("bpe", f"encode_batch: bpe.py 1 process (cold) / pool of {n} (fresh workers, cold)",
        f"{s['bpe.py 1'] * 1000:.0f} / {s[f'bpe.py {n}'] * 1000:.0f} ms")
    row("bpe", f"  bpe.py pool / tiktoken threads, {n} each", f"{s[f'bpe.py {n}'] / s[f'tiktoken {n}']:.2f}x")


def hf_train(path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train([str(path)], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


def bench_bpe_train(quick, text):
    try:
        import tokenizers  # noqa: F401 (test-only reference)
    except ImportError:
        row("bpe", "train: HF tokenizers not installed", "skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "shakespeare.txt"
        small.write_text(text[:200_000] if quick else text, encoding="utf-8")
        for vocab_size in (500, 10_000):
            s = interleaved({"bpe.py": lambda v=vocab_size: tokenizer.train_bpe_file(small, v, [EOT], num_workers=1),
                             "hf": lambda v=vocab_size: hf_train(small, v)}, 1 if quick else 5)
            vocab, merges = tokenizer.train_bpe_file(small, vocab_size, [EOT], num_workers=1)
            ours = bpe.Tokenizer(vocab, merges, [EOT]).encode(text)
            theirs = hf_train(small, vocab_size).encode(text).ids
            row("bpe", f"train vocab {vocab_size:,}, Tiny Shakespeare, 1 thread: bpe.py / HF tokenizers",
                f"{s['bpe.py']:.2f} / {s['hf']:.2f} s = {s['bpe.py'] / s['hf']:.2f}x")
            row("bpe", "  tokens for all of Tiny Shakespeare: bpe.py / HF", f"{len(ours):,} / {len(theirs):,}")

        # >= 50 MB: Tiny Shakespeare's paragraphs, shuffled, repeated, joined by <|endoftext|>
        paragraphs = [p for p in text.split("\n\n") if p]
        big, rng, parts, size = Path(tmp) / "big.txt", random.Random(0), [], 0
        target = 2e6 if quick else 52e6
        while size < target:
            rng.shuffle(paragraphs)
            parts.append(EOT.join(paragraphs))
            size += len(parts[-1])
        big.write_text(EOT.join(parts), encoding="utf-8")
        mb, n = big.stat().st_size / 1e6, os.cpu_count() or 1
        times = {}
        for _ in range(1 if quick else 2):  # interleaved by hand: each run is long
            for name, fn in (("bpe.py 1", lambda: tokenizer.train_bpe_file(big, 10_000, [EOT], num_workers=1)),
                             ("hf 1", lambda: hf_train(big, 10_000)),
                             (f"bpe.py {n}", lambda: tokenizer.train_bpe_file(big, 10_000, [EOT], num_workers=n))):
                t0 = time.perf_counter()
                fn()
                times.setdefault(name, []).append(time.perf_counter() - t0)
        s = {name: statistics.median(t) for name, t in times.items()}
        row("bpe", f"train vocab 10,000 on {mb:.0f} MB (repeated Shakespeare): bpe.py / HF, 1 thread",
            f"{s['bpe.py 1']:.1f} / {s['hf 1']:.1f} s = {s['bpe.py 1'] / s['hf 1']:.2f}x")
        row("bpe", f"  bpe.py with {n} counting processes", f"{s[f'bpe.py {n}']:.1f} s")
