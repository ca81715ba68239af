"""WordPiece: BERT's tokenizer, trained from scratch and applied exactly like Hugging Face's.

Schuster & Nakajima 2012 ("Japanese and Korean Voice Search") and Wu et al. 2016 (GNMT,
arXiv:1609.08144) built the vocabulary; Devlin et al. 2019 (BERT, arXiv:1810.04805) made it the
encoder tokenizer. Like BPE it grows a vocabulary by merging adjacent pieces, but it picks the
pair whose merge raises the likelihood of the training words the most,

    score(a, b) = count(ab) / (count(a) * count(b))

so a pair of pieces that rarely appear apart wins over a merely frequent one. Pieces inside a
word carry a `##` prefix ("playing" -> play ##ing). Encoding is greedy: at each position the
longest piece in the vocabulary, and a word that cannot be spelled at all becomes [UNK] whole.

    text --BertNormalizer: clean, space CJK chars, strip accents, lower-case--> text
         --BertPreTokenizer: split on whitespace, isolate punctuation--> words
         --greedy longest-match-first--> ids

Run:
    python wordpiece.py train --input assets/tinyshakespeare.txt --vocab_size 2000 --out wp.json
    python wordpiece.py encode --tokenizer wp.json "To be, or not to be"
Imports nothing of ours (like bpe.py); bert.py trains on it; tokenizer.json files are written
so Hugging Face tokenizers reads them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import unicodedata
from collections import Counter, defaultdict

import numpy as np

import bpe

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's ids 0-4 here (bert-base has them at 0, 100-103)
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # tokenizers' is_chinese_char


def is_whitespace(c: str) -> bool:
    """Rust's char::is_whitespace (Python's isspace also counts the separators \\x1c-\\x1f)."""
    return c.isspace() and c not in "\x1c\x1d\x1e\x1f"


def is_punctuation(c: str) -> bool:
    """BERT's punctuation: every ASCII non-alphanumeric printable ($, +, ^, ...) and Unicode P*."""
    return (c.isascii() and c.isprintable() and not c.isalnum() and c != " ") or unicodedata.category(c)[0] == "P"


def normalize(text: str, lowercase: bool = True, strip_accents: bool | None = None) -> str:
    """BertNormalizer: drop control characters, whitespace -> " ", spaces around CJK characters,
    accents stripped (NFD, marks dropped; by default when lower-casing), lower-cased char by char."""
    out = []
    for c in text:
        if c in "\x00\ufffd" or (unicodedata.category(c)[0] == "C" and c not in "\t\n\r"):
            continue
        if is_whitespace(c):
            out.append(" ")
        elif any(lo <= ord(c) <= hi for lo, hi in CJK):
            out.append(f" {c} ")
        else:
            out.append(c)
    text = "".join(out)
    if strip_accents if strip_accents is not None else lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return "".join(c.lower() for c in text) if lowercase else text  # per char: no final-sigma rule


def pretokenize(text: str) -> list[str]:
    """BertPreTokenizer: split on whitespace, then every punctuation character is a word of its own."""
    words, current = [], []
    for c in text + " ":
        if is_whitespace(c) or is_punctuation(c):
            if current:
                words.append("".join(current))
                current = []
            if not is_whitespace(c):
                words.append(c)
        else:
            current.append(c)
    return words


class WordPiece:
    """vocab: pieces in id order (or {piece: id}). Encodes as tokenizers' BertNormalizer +
    BertPreTokenizer + WordPiece model; decodes as its WordPiece decoder."""

    def __init__(self, vocab, unk_token: str = "[UNK]", prefix: str = "##", max_input_chars_per_word: int = 100,
                 lowercase: bool = True, strip_accents: bool | None = None):
        self.vocab = dict(vocab) if isinstance(vocab, dict) else {p: i for i, p in enumerate(vocab)}
        self.pieces = {i: p for p, i in self.vocab.items()}
        if unk_token not in self.vocab:
            raise ValueError(f"the unknown token {unk_token!r} is not in the vocabulary (add it)")
        self.unk_token, self.prefix, self.max_chars = unk_token, prefix, max_input_chars_per_word
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self.max_len = max(map(len, self.vocab))
        self.cache: dict[str, list[int]] = {}

    def __len__(self):
        return len(self.vocab)

    def encode_word(self, word: str) -> list[int]:
        """Greedy longest-match-first; a word with an unspellable rest, or longer than
        max_input_chars_per_word characters, is one [UNK]."""
        if len(word) > self.max_chars:
            return [self.vocab[self.unk_token]]
        ids, start = [], 0
        while start < len(word):
            prefix = self.prefix if start else ""
            for end in range(min(len(word), start + self.max_len), start, -1):
                pid = self.vocab.get(prefix + word[start:end])
                if pid is not None:
                    break
            else:
                return [self.vocab[self.unk_token]]
            ids.append(pid)
            start = end
        return ids

    def words(self, text: str) -> list[str]:
        return pretokenize(normalize(text, self.lowercase, self.strip_accents))

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in self.words(text):
            if w not in self.cache:
                if len(self.cache) > 100_000:
                    self.cache.clear()
                self.cache[w] = self.encode_word(w)
            ids += self.cache[w]
        return ids

    def decode(self, ids, cleanup: bool = True) -> str:
        """Tokens joined by spaces, `##` pieces glued to the one before; cleanup as tokenizers'
        (" ." -> ".", " n't" -> "n't", ...)."""
        out = []
        for n, i in enumerate(ids):
            token = self.pieces[i]
            if n:
                token = token[len(self.prefix):] if token.startswith(self.prefix) else " " + token
            out.append(clean_up(token) if cleanup else token)
        return "".join(out)


def clean_up(s: str) -> str:
    for dirty, clean in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        s = s.replace(dirty, clean)
    return s


# ---------------------------------------------------------------------------------------------
# Training. Merging every (a, b) into ab changes the log-likelihood of the training words under
# a unigram model of the pieces, L = sum_t c_t log c_t - N log N, by
#     dL = xlogx(c_ab) + xlogx(c_a - c_ab) + xlogx(c_b - c_ab) - xlogx(c_a) - xlogx(c_b) + xlogx(N) - xlogx(N - c_ab)
# (xlogx(x) = x log x): score="likelihood" merges the pair that raises it most. Its core is
# c_ab log(c_ab N / (c_a c_b)): the Hugging Face course's score count(ab) / (count(a) count(b)) is
# the ratio inside that log, score="ratio", which alone favours pairs of rare pieces (on Tiny
# Shakespeare ~2x the tokens per byte). tokenizers' WordPieceTrainer merges by count (BPE's rule).

def train_wordpiece(text: str, vocab_size: int, specials=SPECIALS, lowercase: bool = True,
                    strip_accents: bool | None = None, prefix: str = "##", score: str = "likelihood") -> WordPiece:
    """A vocabulary of vocab_size pieces: the specials, every character (first in a word, and as
    ##c inside one), then merges until the size is reached or no pair is left."""
    if score not in ("likelihood", "ratio"):
        raise ValueError(f"unknown score {score!r} (choose likelihood or ratio)")
    counts = Counter(pretokenize(normalize(text, lowercase, strip_accents)))
    words = [[w[0]] + [prefix + c for c in w[1:]] for w in counts]  # each distinct word's current pieces
    freq = list(counts.values())
    vocab = list(specials) + [p for p in sorted({p for w in words for p in w}) if p not in specials]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} specials and characters (raise it)")
    stats = PairStats(score)
    for n, w in enumerate(words):
        stats.add(w, freq[n], n)
    stats.rescore(list(stats.pair_count))
    while len(vocab) < vocab_size and (pair := stats.best()) is not None:
        a, b = pair
        merged = a + b[len(prefix):] if b.startswith(prefix) else a + b
        vocab.append(merged)
        for n in list(stats.where[pair]):
            stats.add(words[n], -freq[n], n)
            words[n] = bpe.merge(words[n], (a, b), merged)  # the same left-to-right replacement as BPE's
            stats.add(words[n], freq[n], n)
        stats.rescore(stats.pairs_of[a] | stats.pairs_of[b] | stats.pairs_of[merged])
    return WordPiece(vocab, unk_token=specials[1] if len(specials) > 1 else specials[0], prefix=prefix,
                     lowercase=lowercase, strip_accents=strip_accents)


def xlogx(x):
    """x log x (0 at 0), for a count or an array of them."""
    if isinstance(x, np.ndarray):
        return np.where(x > 0, x * np.log(np.maximum(x, 1)), 0.0)
    return x * math.log(x) if x > 0 else 0.0


class PairStats:
    """Counts of pieces and adjacent pairs over the words, which words hold each pair, and each
    pair's score kept in an array slot: a merge rescores only the pairs of the pieces it touched
    (the N-dependent part of the likelihood gain is added for all pairs at once, vectorized)."""

    def __init__(self, score: str):
        self.score, self.total = score, 0
        self.piece_count, self.pair_count = Counter(), Counter()
        self.where, self.pairs_of, self.slot, self.order = defaultdict(set), defaultdict(set), {}, []
        self.local, self.count = np.full(1024, -np.inf), np.zeros(1024)

    def add(self, pieces, f, n):
        """Count (f > 0) or uncount (f < 0) word n's pieces and adjacent pairs."""
        self.total += f * len(pieces)
        for p in pieces:
            self.piece_count[p] += f
        for pair in zip(pieces, pieces[1:]):
            self.pair_count[pair] += f
            if f > 0:
                self.where[pair].add(n)
                self.pairs_of[pair[0]].add(pair)
                self.pairs_of[pair[1]].add(pair)
            else:
                self.where[pair].discard(n)

    def rescore(self, pairs):
        for pair in list(pairs):
            c = self.pair_count[pair]
            if pair not in self.slot:
                if len(self.slot) == len(self.local):
                    self.local = np.concatenate([self.local, np.full(len(self.local), -np.inf)])
                    self.count = np.concatenate([self.count, np.zeros(len(self.count))])
                self.slot[pair] = len(self.order)
                self.order.append(pair)
            i = self.slot[pair]
            if c <= 0:  # gone from every word
                self.local[i], self.count[i] = -np.inf, 0
                self.pairs_of[pair[0]].discard(pair)
                self.pairs_of[pair[1]].discard(pair)
                continue
            ca, cb = self.piece_count[pair[0]], self.piece_count[pair[1]]
            if self.score == "ratio":
                self.local[i] = math.log(c) - math.log(ca) - math.log(cb)
            else:
                self.local[i] = xlogx(c) + xlogx(ca - c) + xlogx(cb - c) - xlogx(ca) - xlogx(cb)
            self.count[i] = c

    def best(self):
        scores = self.local if self.score == "ratio" else self.local + xlogx(self.total) - xlogx(self.total - self.count)
        i = int(np.argmax(scores))
        if scores[i] == -np.inf:
            return None
        return self.order[i]


# ---------------------------------------------------------------------------------------------
# Files and the command line

def save(model: WordPiece, path):
    """A Hugging Face tokenizer.json (BertNormalizer, BertPreTokenizer, WordPiece model and decoder)."""
    added = [{"id": model.vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s in SPECIALS if s in model.vocab]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                           "strip_accents": model.strip_accents, "lowercase": model.lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": None,
            "decoder": {"type": "WordPiece", "prefix": model.prefix, "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": model.unk_token, "continuing_subword_prefix": model.prefix,
                      "max_input_chars_per_word": model.max_chars, "vocab": model.vocab}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, indent=1)


def load(path) -> WordPiece:
    """A tokenizer.json with a WordPiece model, or a BERT vocab.txt (one piece a line, lower-cased)."""
    with open(path, encoding="utf-8") as f:
        if not str(path).endswith(".json"):
            return WordPiece([line.rstrip("\n") for line in f])
        spec = json.load(f)
    model, norm = spec.get("model", {}), spec.get("normalizer") or {}
    if model.get("type") != "WordPiece":
        raise ValueError(f"{path} holds no WordPiece model (train one: python wordpiece.py train ...)")
    return WordPiece(model["vocab"], model.get("unk_token", "[UNK]"), model.get("continuing_subword_prefix", "##"),
                     model.get("max_input_chars_per_word", 100), norm.get("lowercase", False), norm.get("strip_accents"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python wordpiece.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="learn a WordPiece vocabulary from a text file")
    train.add_argument("--input", default="assets/tinyshakespeare.txt")
    train.add_argument("--vocab_size", type=int, default=2000)
    train.add_argument("--cased", action="store_true", help="keep case and accents")
    train.add_argument("--out", default="wordpiece.json", help="a Hugging Face tokenizer.json")
    enc = sub.add_parser("encode", help="encode a text, showing the pieces")
    enc.add_argument("--tokenizer", default="wordpiece.json", help="a tokenizer.json or a BERT vocab.txt")
    enc.add_argument("text")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            with open(args.input, encoding="utf-8") as f:
                model = train_wordpiece(f.read(), args.vocab_size, lowercase=not args.cased)
            save(model, args.out)
            print(f"wrote {args.out}: {len(model)} pieces; longest: {sorted(model.vocab, key=len)[-5:]}")
        else:
            model = load(args.tokenizer)
            ids = model.encode(args.text)
            print(ids)
            print(" ".join(model.pieces[i] for i in ids))
            print(repr(model.decode(ids)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
