"""Unigram language-model tokenizer: Viterbi segmentation, subword sampling, and the EM trainer.

Kudo 2018, "Subword Regularization" (arXiv:1804.10959); SentencePiece (Kudo & Richardson 2018,
arXiv:1808.06226). A Unigram tokenizer is a vocabulary of pieces, each with a log-probability.
A word is cut into the pieces whose summed log-probability is highest: a best path through the
lattice of every piece that matches somewhere in the word, found by dynamic programming (Viterbi).

    "▁Hello"  lattice edges: ▁ ▁H ▁He H He Hel Hello e el ll l lo o ...
              best path:     ▁Hello            (or ▁He + llo, whichever sums higher)

SentencePiece's whitespace handling: text is split on spaces and each word gets a leading `▁`
(U+2581) that stands for the space, so decoding is joining pieces and turning `▁` back into
spaces; pieces never hold a `▁` except first. Characters no piece covers become the `<unk>`
piece with score min_score - 10 (runs of them fused into one), or, with byte_fallback, the
`<0xNN>` pieces of their UTF-8 bytes -- exactly as Hugging Face tokenizers' Unigram model does.

Training (`train_unigram`) is the paper's EM: seed a large vocabulary of frequent substrings,
then repeat {E-step: expected piece counts by forward-backward over every word's lattice;
M-step: counts -> log-probabilities} and prune the 25% of pieces whose removal costs the
corpus likelihood least, until the target size; single characters are always kept. `sample`
draws a segmentation in proportion to p(path)^alpha (subword regularisation).

Run:
    python unigram.py train --input assets/tinyshakespeare.txt --vocab_size 1000 --out uni.json
    python unigram.py encode --tokenizer uni.json "To be, or not to be"
Imports nothing of ours (like bpe.py); tokenizer.py reads Unigram tokenizer.json files with it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter

UNK_PENALTY = 10.0  # an unknown character scores min_score - 10 (tokenizers' and SentencePiece's kUnkPenalty)
SPACE = "\u2581"  # "▁": SentencePiece's visible space
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class Unigram:
    """pieces: [(piece, log-probability)], ids = positions. unk_id: the piece unknown characters
    become (None: an unknown character is an error unless byte_fallback covers it)."""

    def __init__(self, pieces: list[tuple[str, float]], unk_id: int | None, byte_fallback: bool = False):
        if unk_id is not None and not 0 <= unk_id < len(pieces):
            raise ValueError(f"unk_id {unk_id} is outside the {len(pieces)} pieces (give the id of the <unk> piece)")
        self.pieces = [p for p, _ in pieces]
        self.scores = [float(s) for _, s in pieces]
        self.ids = {p: i for i, p in enumerate(self.pieces)}  # a repeated piece: the last id, as tokenizers
        self.lengths = sorted({len(p) for p in self.ids if p})  # piece lengths to try at each position
        self.unk_id, self.byte_fallback = unk_id, byte_fallback
        self.min_score = min(self.scores, default=0.0)
        self.cache: dict[str, list[int]] = {}

    def __len__(self):
        return len(self.pieces)

    def edges(self, text: str):
        """The lattice, by start position: [(end, id, score)] for every piece matching at that
        character, shortest first, and the <unk> edge (id None when there is no unk_id) over a
        character that no single-character piece covers."""
        n, unk_score, out = len(text), self.min_score - UNK_PENALTY, []
        for i in range(n):
            here, single = [], False
            for length in self.lengths:
                if i + length > n:
                    break
                pid = self.ids.get(text[i:i + length])
                if pid is not None:
                    here.append((i + length, pid, self.scores[pid]))
                    single |= length == 1
            if not single:
                here.append((i + 1, self.unk_id, unk_score))
            out.append(here)
        return out

    def viterbi(self, text: str) -> list[tuple[int, int, int | None]]:
        """The best path as (start, end, id) spans. Ties go to the path found first (an earlier
        start for the last piece), as tokenizers' encode_optimized does; scores add in float64."""
        n = len(text)
        best: list[tuple[float, int, int | None] | None] = [None] * (n + 1)
        best[0] = (0.0, -1, None)
        for i, here in enumerate(self.edges(text)):
            so_far = best[i][0]
            for end, pid, score in here:
                if best[end] is None or so_far + score > best[end][0]:
                    if pid is None:  # the <unk> edge wins a node, as in tokenizers: an error there too
                        raise ValueError(f"{text[i]!r} is in no piece and there is no unk piece (give unk_id)")
                    best[end] = (so_far + score, i, pid)
        spans, end = [], n
        while end > 0:
            _, start, pid = best[end]
            spans.append((start, end, pid))
            end = start
        return spans[::-1]

    def encode(self, text: str) -> list[int]:
        """Ids of one normalized, pre-tokenized string such as "▁Hello" (tokenizers' Unigram.tokenize)."""
        if text not in self.cache:
            if len(self.cache) > 100_000:
                self.cache.clear()
            self.cache[text] = self.spans_to_ids(text, self.viterbi(text))
        return list(self.cache[text])

    def spans_to_ids(self, text: str, spans) -> list[int]:
        """Runs of <unk> spans fused into one string; each string looked up as a piece, else its
        UTF-8 bytes as <0xNN> pieces (byte_fallback, when all exist), else <unk>."""
        strings, i = [], 0
        while i < len(spans):
            start, end, pid = spans[i]
            while pid is not None and pid == self.unk_id and i + 1 < len(spans) and spans[i + 1][2] == pid:
                i += 1
                end = spans[i][1]
            strings.append(text[start:end])
            i += 1
        ids = []
        for s in strings:
            if s in self.ids:
                ids.append(self.ids[s])
                continue
            if self.byte_fallback:
                byte_ids = [self.ids.get(f"<0x{b:02X}>") for b in s.encode()]
                if None not in byte_ids:
                    ids += byte_ids
                    continue
            if self.unk_id is None:
                raise ValueError(f"{s!r} is in no piece and there is no unk piece (give unk_id)")
            ids.append(self.unk_id)
        return ids

    def decode(self, ids) -> str:
        """Pieces joined; runs of <0xNN> pieces turned back into UTF-8 (each byte of an invalid
        run becomes U+FFFD, as tokenizers' ByteFallback decoder). `▁` stays: see detokenize."""
        out, run = [], bytearray()
        for i in ids:
            piece = self.pieces[i]
            m = BYTE_PIECE.fullmatch(piece)
            if m:
                run.append(int(m.group(1), 16))
                continue
            if run:
                out.append(bytes_to_text(run))
                run = bytearray()
            out.append(piece)
        if run:
            out.append(bytes_to_text(run))
        return "".join(out)

    def sample(self, text: str, alpha: float = 0.1, rng: random.Random | None = None) -> list[int]:
        """Subword regularisation: one segmentation drawn with probability proportional to
        p(path)^alpha (forward filtering, backward sampling). alpha -> inf is Viterbi, 0 uniform."""
        rng = rng or random
        n, edges = len(text), self.edges(text)
        forward = [-math.inf] * (n + 1)
        forward[0] = 0.0
        into = [[] for _ in range(n + 1)]  # edges by end: (start, id, alpha * score)
        for i, here in enumerate(edges):
            for end, pid, score in here:
                into[end].append((i, pid, alpha * score))
                forward[end] = logaddexp(forward[end], forward[i] + alpha * score)
        spans, end = [], n
        while end > 0:
            weights = [math.exp(forward[s] + w - forward[end]) for s, _, w in into[end]]
            start, pid, _ = rng.choices(into[end], weights)[0]
            spans.append((start, end, pid))
            end = start
        return self.spans_to_ids(text, spans[::-1])


def bytes_to_text(run: bytes) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


def pretokenize(text: str) -> list[str]:
    """SentencePiece's whitespace handling (tokenizers' Metaspace, prepend "always"): every
    space becomes `▁` and starts a new word; the text gets a leading `▁`."""
    text = text.replace(" ", SPACE)
    if not text.startswith(SPACE):
        text = SPACE + text
    return [w for w in re.split(f"(?={SPACE})", text) if w]


def detokenize(text: str) -> str:
    """The inverse of pretokenize on joined pieces: `▁` back to spaces, the leading one dropped."""
    text = text.replace(SPACE, " ")
    return text[1:] if text.startswith(" ") else text
