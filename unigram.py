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


# ---------------------------------------------------------------------------------------------
# Training (Kudo 2018 section 3.2, as SentencePiece's unigram_model_trainer.cc does it)

def train_unigram(text: str, vocab_size: int, seed_size: int = 1_000_000, max_piece_length: int = 16,
                  shrinking_factor: float = 0.75, sub_iterations: int = 2, verbose: bool = False) -> Unigram:
    """A Unigram tokenizer of exactly vocab_size pieces (id 0 = <unk>) learned from text: words
    are pretokenize's (split at spaces, each with its leading `▁`; a newline is a character like
    any other, so encode_text loses nothing); every character seen is kept."""
    words = Counter(pretokenize(text))
    chars = Counter()
    for w, f in words.items():
        for c in w:
            chars[c] += f
    if vocab_size < len(chars) + 1:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(chars) + 1} characters + <unk> "
                         "of the text (give a larger vocab_size)")
    pieces = seed_pieces(words, chars, seed_size, max_piece_length)
    desired = int(vocab_size * 1.1)
    while True:
        for _ in range(sub_iterations):  # EM: expected counts -> log-probabilities
            counts, objective = e_step(pieces, words)
            pieces = m_step(pieces, counts)
            if verbose:
                print(f"EM: {len(pieces)} pieces, objective {objective:.4f}", file=sys.stderr)
        if len(pieces) <= desired:
            break
        pieces = prune(pieces, words, max(desired, int(shrinking_factor * len(pieces))))
    return Unigram([("<unk>", 0.0)] + finalize(pieces, chars, vocab_size - 1), unk_id=0)


def valid_piece(piece: str) -> bool:
    """SentencePiece's rules: `▁` only first; letters, digits and other characters (a stand-in
    for Unicode scripts) never mixed in one piece."""
    if SPACE in piece[1:]:
        return False
    kinds = {"d" if c.isdigit() else "l" if c.isalpha() else "o" for c in piece.lstrip(SPACE)}
    return len(kinds) <= 1


def seed_pieces(words: Counter, chars: Counter, seed_size: int, max_len: int) -> list[tuple[str, float]]:
    """Every character (score: its count) and the substrings of the distinct words that occur at
    least twice and are followed by two different characters somewhere (the internal nodes of
    the suffix tree SentencePiece enumerates), score count x length; top seed_size; log-normalized."""
    count, follower, branching = Counter(), {}, set()
    for w in words:
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + max_len) + 1):
                s, nxt = w[i:j], w[j] if j < len(w) else "\0"
                count[s] += 1
                if follower.setdefault(s, nxt) != nxt:
                    branching.add(s)
    subs = sorted(((c * len(s), s) for s, c in count.items() if c > 1 and s in branching and valid_piece(s)),
                  key=lambda t: (-t[0], t[1]))
    seeds = sorted(chars.items(), key=lambda t: (-t[1], t[0])) + [(s, score) for score, s in subs]
    seeds = seeds[:max(seed_size, len(chars))]
    log_total = math.log(sum(score for _, score in seeds))
    return [(s, math.log(score) - log_total) for s, score in seeds]


def training_model(pieces) -> Unigram:
    """pieces with <unk> first: a character the EM dropped becomes <unk> (min_score - 10) as in SentencePiece."""
    return Unigram([("<unk>", 0.0)] + pieces, unk_id=0)


def e_step(pieces, words: Counter) -> tuple[list[float], float]:
    """Expected count of each piece over all words (forward-backward on each word's lattice,
    weighted by the word's count) and the objective -sum log p(word) / #words."""
    model, counts, objective = training_model(pieces), [0.0] * (len(pieces) + 1), 0.0
    for w, f in words.items():
        edges, n = model.edges(w), len(w)
        fwd, bwd = [-math.inf] * (n + 1), [-math.inf] * (n + 1)
        fwd[0] = bwd[n] = 0.0
        for i in range(n):
            for end, _, score in edges[i]:
                fwd[end] = logaddexp(fwd[end], fwd[i] + score)
        for i in range(n - 1, -1, -1):
            for end, _, score in edges[i]:
                bwd[i] = logaddexp(bwd[i], score + bwd[end])
        z = fwd[n]
        for i in range(n):
            for end, pid, score in edges[i]:
                counts[pid] += f * math.exp(fwd[i] + score + bwd[end] - z)
        objective -= f * z
    return counts[1:], objective / sum(words.values())


def digamma(x: float) -> float:
    """SentencePiece's series for the digamma function."""
    result = 0.0
    while x < 7:
        result -= 1 / x
        x += 1
    x -= 0.5
    xx2 = (1 / x) ** 2
    xx4 = xx2 * xx2
    return result + math.log(x) + xx2 / 24 - 7 / 960 * xx4 + 31 / 8064 * xx4 * xx2 - 127 / 30720 * xx4 * xx4


def m_step(pieces, counts) -> list[tuple[str, float]]:
    """Pieces expected less than 0.5 times are dropped; the rest get digamma(count) - digamma(total)
    (the Bayesian / Dirichlet-process EM SentencePiece runs instead of plain log(count / total))."""
    kept = [(p, c) for (p, _), c in zip(pieces, counts) if c >= 0.5]
    log_total = digamma(sum(c for _, c in kept))
    return [(p, digamma(c) - log_total) for p, c in kept]


def prune(pieces, words: Counter, size: int) -> list[tuple[str, float]]:
    """Keep `size` pieces: those without an alternative segmentation, then the ones whose removal
    would lose the most likelihood (their count moved onto the pieces of their second-best
    segmentation). Pieces unused by the Viterbi segmentation of the words go first."""
    model = training_model(pieces)
    freq, total = [0.0] * len(model), 0.0
    for w, f in words.items():
        for _, _, pid in model.viterbi(w):
            freq[pid] += f
            total += f
    kept, candidates, n_sentences = [], [], sum(words.values())
    for pid in range(1, len(model)):
        piece = model.pieces[pid]
        if freq[pid] == 0:
            continue
        if len(piece) == 1:  # a single character has no alternative: kept
            kept.append(pieces[pid - 1])
            continue
        if len(model.viterbi(piece)) > 1:  # never its own best segmentation: removable
            continue
        del model.ids[piece]
        alternative = [s[2] for s in model.viterbi(piece)]
        model.ids[piece] = pid
        logprob = math.log(freq[pid]) - math.log(total)
        log_total_alt = math.log(total + freq[pid] * (len(alternative) - 1))
        logprob_alt = sum(math.log(freq[a] + freq[pid]) - log_total_alt for a in alternative)
        candidates.append((freq[pid] / n_sentences * (logprob - logprob_alt), pid))
    candidates.sort(key=lambda t: -t[0])
    return kept + [pieces[pid - 1] for _, pid in candidates[:max(0, size - len(kept))]]


def finalize(pieces, chars: Counter, size: int) -> list[tuple[str, float]]:
    """Every character (one the EM dropped gets min_score minus a tiny, growing penalty), then
    the best-scoring pieces up to size; sorted by score."""
    scores, min_score = dict(pieces), min(s for _, s in pieces)
    final, penalty = {}, 0.0
    for c, _ in sorted(chars.items(), key=lambda t: (-t[1], t[0])):
        if c in scores:
            final[c] = scores[c]
        else:
            final[c] = min_score + penalty
            penalty += 0.0001
    for p, s in sorted(pieces, key=lambda t: (-t[1], t[0])):
        if len(final) >= size:
            break
        final.setdefault(p, s)
    return sorted(final.items(), key=lambda t: (-t[1], t[0]))


# ---------------------------------------------------------------------------------------------
# Files and the command line

def save(model: Unigram, path):
    """A Hugging Face tokenizer.json (Unigram model, Metaspace pre-tokenizer and decoder)."""
    metaspace = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": True}
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": model.unk_id, "content": model.pieces[model.unk_id], "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False, "special": True}]
            if model.unk_id is not None else [],
            "normalizer": None, "pre_tokenizer": metaspace, "post_processor": None, "decoder": metaspace,
            "model": {"type": "Unigram", "unk_id": model.unk_id, "byte_fallback": model.byte_fallback,
                      "vocab": [[p, s] for p, s in zip(model.pieces, model.scores)]}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, indent=1)


def load(path) -> Unigram:
    """The Unigram model of a tokenizer.json (tokenizer.py reads the rest of such files)."""
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "Unigram":
        raise ValueError(f"{path} holds no Unigram model (train one: python unigram.py train ...)")
    return Unigram([(p, s) for p, s in model["vocab"]], model.get("unk_id"), model.get("byte_fallback", False))


def encode_text(model: Unigram, text: str, alpha: float | None = None, rng=None) -> list[int]:
    """A whole text: pre-tokenized as SentencePiece does, each word Viterbi-encoded (or sampled)."""
    words = pretokenize(text) if text else []
    if alpha is None:
        return [i for w in words for i in model.encode(w)]
    return [i for w in words for i in model.sample(w, alpha, rng)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python unigram.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="learn a Unigram vocabulary from a text file")
    train.add_argument("--input", default="assets/tinyshakespeare.txt")
    train.add_argument("--vocab_size", type=int, default=1000)
    train.add_argument("--out", default="unigram.json", help="a Hugging Face tokenizer.json")
    enc = sub.add_parser("encode", help="encode a text, showing the pieces")
    enc.add_argument("--tokenizer", default="unigram.json")
    enc.add_argument("--alpha", type=float, default=None, help="sample (subword regularisation) with this alpha")
    enc.add_argument("--seed", type=int, default=0)
    enc.add_argument("text")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            with open(args.input, encoding="utf-8") as f:
                model = train_unigram(f.read(), args.vocab_size, verbose=True)
            save(model, args.out)
            print(f"wrote {args.out}: {len(model)} pieces; longest: {sorted(model.pieces, key=len)[-5:]}")
        else:
            model = load(args.tokenizer)
            ids = encode_text(model, args.text, args.alpha, random.Random(args.seed))
            print(ids)
            print(" ".join(model.pieces[i] for i in ids))
            print(repr(detokenize(model.decode(ids))))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
