"""Byte-level BPE: train a GPT tokenizer from scratch, apply it exactly like tiktoken.

Byte pair encoding (Sennrich et al. 2016, arXiv:1508.07909) starts from a vocabulary of
symbols and repeatedly merges the most frequent adjacent pair into a new symbol. GPT-2
(Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", section 2.2)
runs it on UTF-8 *bytes*, so the 256 byte tokens can spell any string and nothing is ever
out of vocabulary, and it first cuts text into pre-tokens with a regex (words with their
leading space, runs of digits, punctuation, whitespace) so merges never cross a word.

    text --split at special tokens--> segments --regex--> pre-tokens --UTF-8--> bytes
         --apply merges in the order they were learned--> token ids

Training: `learn_merges_naive` is minbpe's loop (count pairs, merge the most frequent,
repeat); `learn_merges` learns the same merges incrementally, fast, and is what
`train_bpe(text)` uses (tokenizer.train_bpe_file counts a file of any size in parallel). Ties
between equally frequent pairs go to the lexicographically greater pair of bytes (Stanford
CS336's rule), so runs are deterministic and comparable. Encoding: `encode_naive` is minbpe's
loop (merge the pair of the earliest learned token, repeat); `Tokenizer` gives the same ids
fast (also in a process pool, and streamed) and decodes. tokenizer.py saves and loads it (the
"nanollm-bpe v1" file) and reads and writes the formats of others with it: OpenAI's GPT-2
files, tiktoken encodings, Hugging Face tokenizer.json.

Run (the command line lives in tokenizer.py; `python bpe.py ...` runs it):
    python bpe.py train --input input.txt --vocab_size 4096 --out tok.bpe
    python bpe.py encode --tokenizer tok.bpe "Hello world"     (or gpt2, a tokenizer.json)
    python bpe.py compare --input input.txt --tokenizer tok.bpe  (GPT-2, cl100k, yours)
"""

from __future__ import annotations

import functools
import heapq
import math
import os
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from itertools import chain, pairwise, repeat

import regex  # Python's `re` has no \p{L} / \p{N} (Unicode letter / number), which the split patterns need


# GPT-2's split pattern as tiktoken writes it. The release's original
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""" cuts
# text identically; possessive quantifiers (++) only spare the regex engine backtracking.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's (cl100k_base): case-insensitive contractions, digits in groups of at most three,
# newlines kept apart from other whitespace.
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
ENDOFTEXT = "<|endoftext|>"


class BPEError(ValueError):
    """Bad input, said in one line `<what> (<how to fix>)`. bpe.py stands alone (it imports
    nothing of nanollm's, like minbpe), so it has its own error type; `one_line` tells
    common.cli to print it as `error: ...` exactly like a common.NanoError."""

    one_line = True


# ----------------------------------------------------------------------------------------
# The two BPE primitives (named as in minbpe)


def get_stats(ids, counts=None, weight=1):
    """Count adjacent pairs: get_stats([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}.
    Adds to `counts` if given, each occurrence counting `weight` (how often a pre-token occurs)."""
    counts = {} if counts is None else counts
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, new_id):
    """Replace each occurrence of `pair` in `ids` by `new_id`, scanning left to right:
    merge([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]. Left to right matters when the pair
    overlaps itself: merge([5, 5, 5], (5, 5), 6) -> [6, 5]."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ----------------------------------------------------------------------------------------
# The simple trainer (minbpe's loop): the baseline


def learn_merges_naive(pretoken_counts: dict[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """minbpe's training loop: count every adjacent pair (get_stats), merge the most frequent
    one into a new token (merge), repeat. It runs on pre-tokens ({pre-token bytes: how often
    it occurs}, see count_text_pretokens), so merges never cross a word and each distinct
    word is counted once. Ties go to the greater pair of bytes (CS336). Every step re-counts
    everything: O(merges x distinct text). Returns [(left bytes, right bytes), ...] in the
    order learned (fewer if no pair is left)."""
    token_bytes = [bytes([i]) for i in range(256)]
    words, freqs = [list(w) for w in pretoken_counts], list(pretoken_counts.values())
    merges = []
    while len(merges) < num_merges:
        stats = {}
        for word, freq in zip(words, freqs):
            get_stats(word, stats, freq)
        if not stats:
            break  # every pre-token is a single token
        pair = max(stats, key=lambda p: (stats[p], token_bytes[p[0]], token_bytes[p[1]]))
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        merges.append((token_bytes[pair[0]], token_bytes[pair[1]]))
        words = [merge(word, pair, new_id) for word in words]
    return merges


# ----------------------------------------------------------------------------------------
# The simple encoder (minbpe's encode): the reference the fast Tokenizer is tested against


def merge_by_rank(data: bytes, ranks: dict[bytes, int], max_rank=math.inf) -> list[bytes]:
    """One pre-token's tokens: start from its bytes, then merge the adjacent pair whose
    concatenation is the earliest learned token (the lowest rank), again and again, until no
    adjacent pair makes a token of rank below max_rank. ranks {token bytes: rank} is what
    tiktoken stores; a trained vocabulary's ids are its ranks (bytes, then merges in order)."""
    parts = [bytes([b]) for b in data]
    while len(parts) > 1:
        pair = min(pairwise(parts), key=lambda p: ranks.get(p[0] + p[1], math.inf))
        if ranks.get(pair[0] + pair[1], math.inf) >= max_rank:
            break  # no adjacent pair is a token (of a low enough rank)
        parts = merge(parts, pair, pair[0] + pair[1])
    return parts


def encode_naive(text: str, ranks: dict[bytes, int], pattern=GPT2_PATTERN) -> list[int]:
    """The ids of `text` (special tokens are plain text here) the slow, obvious way: cut it
    into pre-tokens with the split regex, merge each one's bytes by rank. Tokenizer.encode
    gives the same ids, fast."""
    return [ranks[part] for piece in regex.findall(pattern, text)
            for part in merge_by_rank(piece.encode("utf-8"), ranks)]


# ----------------------------------------------------------------------------------------
# The incremental trainer: the same merges without re-counting


def reversed_order_key(token: bytes) -> str:
    """A string whose order is the reverse of the order of `token` among byte strings:
    each byte b becomes chr(255 - b), and a final chr(256), larger than any of them, makes
    a prefix ("ab") sort after its extensions ("abc"), the reverse of bytes order. The key
    of a pair is the two keys concatenated (the terminator keeps them apart)."""
    return token.translate(_INVERT_BYTES).decode("latin-1") + "\u0100"


_INVERT_BYTES = bytes(range(255, -1, -1))


def learn_merges(pretoken_counts: dict[bytes, int], num_merges: int, verbose=False):
    """The merges of learn_merges_naive, learned incrementally; same arguments and result.

    Re-counting every pair after every merge costs O(merges x text). Instead:
      - each distinct pre-token ("word") is a list of token ids with its count, so work
        and memory scale with the number of distinct pre-tokens, not the text size;
      - pair_counts holds the current count of every adjacent pair (weighted by word
        count), pair_words the words that hold it, so a merge rewrites only those words
        (merge_word) and applies the change of their pair counts (most merges touch a few words);
      - the best pair comes from a heap of (-count, reversed-order key, pair). Counts
        change all the time, and a heap cannot update an entry in place, so every change
        pushes a fresh entry (update_pair_counts) and stale ones are dropped when popped
        (lazy invalidation: an entry is live iff its count equals pair_counts[pair]). A pop
        is O(log n), against O(#pairs) for a max() over the dict each merge. The key string
        makes ties (equal counts) pop the lexicographically greater pair of bytes first,
        with the comparison done in C by the heap, not by a Python __lt__.
    pair_words is a superset: a word that lost a pair is not removed from its set; when
    that pair is merged the word is scanned and nothing happens (cheaper than keeping the
    sets exact)."""
    token_bytes = [bytes([i]) for i in range(256)]
    order_key = [reversed_order_key(t) for t in token_bytes]
    words, freqs = [list(w) for w in pretoken_counts], list(pretoken_counts.values())
    pair_counts, pair_words = index_pairs(words, freqs)
    heap = [(-c, order_key[a] + order_key[b], (a, b)) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges, t0 = [], time.perf_counter()
    while len(merges) < num_merges and heap:
        neg_count, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # stale entry: this pair's count has changed since it was pushed
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        order_key.append(reversed_order_key(token_bytes[new_id]))
        merges.append((token_bytes[pair[0]], token_bytes[pair[1]]))
        del pair_counts[pair]
        delta = defaultdict(int)  # how the merge changes the count of each neighbouring pair
        for w in pair_words.pop(pair):
            # unchanged (a stale index entry) if an earlier merge took the pair out
            words[w] = merge_word(words[w], pair, new_id, freqs[w], delta, pair_words, w)
        update_pair_counts(pair_counts, heap, order_key, delta, pair)
        if verbose and (len(merges) % 1000 == 0 or len(merges) == num_merges):
            print(f"merge {len(merges):,}/{num_merges:,}: {token_bytes[new_id]!r} (count {-neg_count:,}), "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return merges


def index_pairs(words, freqs):
    """pair_counts {pair: count, weighted by word count} and pair_words {pair: indices of the
    words that hold it}."""
    pair_counts: dict[tuple[int, int], int] = {}
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        get_stats(word, pair_counts, freq)
        for pair in pairwise(word):
            pair_words[pair].add(w)
    return pair_counts, pair_words


def merge_word(word, pair, new_id, freq, delta, pair_words, w):
    """merge(word, pair, new_id), noting in `delta` how the word's pair counts change (times its
    count `freq`) and in pair_words the new pairs word `w` holds. Only the neighbours of a merged
    occurrence change: x a b y -> x N y loses (x, a) and (b, y) and gains (x, N) and (N, y);
    in a b a b -> N N the (b, a) between two occurrences is lost once and (N, N) gained once."""
    a, b = pair
    out, i, n = [], 0, len(word)
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            if out:
                left = out[-1]
                if left != new_id:  # else (b, a) was already counted out just below
                    delta[left, a] -= freq
                delta[left, new_id] += freq
                pair_words[left, new_id].add(w)
            if i + 2 < n:
                right = word[i + 2]
                delta[b, right] -= freq
                if not (right == a and i + 3 < n and word[i + 3] == b):  # else: (N, N) above
                    delta[new_id, right] += freq
                    pair_words[new_id, right].add(w)
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def update_pair_counts(pair_counts, heap, order_key, delta, merged):
    """Apply the count changes of one merge; each changed count pushes a fresh heap entry."""
    for p, d in delta.items():
        if d == 0 or p == merged:
            continue
        count = pair_counts.get(p, 0) + d
        if count > 0:
            pair_counts[p] = count
            heapq.heappush(heap, (-count, order_key[p[0]] + order_key[p[1]], p))
        else:
            del pair_counts[p]


# ----------------------------------------------------------------------------------------
# Pre-tokenization: special tokens first, then the split regex


def compile_pattern(pattern: str):
    """The split regex, or a one-line error saying what is wrong with it."""
    try:
        split = regex.compile(pattern)
    except regex.error as e:
        raise BPEError(f"bad split pattern {pattern!r}: {e} (give a valid regex, or gpt2 / gpt4)") from None
    if split.groups:  # findall would return the groups, not the pre-tokens
        raise BPEError(f"split pattern {pattern!r} has capturing groups (write (?:...) instead of (...))")
    return split


def split_isolated(split, text: str) -> list[str]:
    """The pre-tokens of `text`: the matches of `split`, and the text between two matches as
    a piece of its own (Hugging Face's Split "Isolated"), so no text is ever dropped. The
    patterns here match every character: the slow path is only for a custom one."""
    pieces = split.findall(text)
    if sum(map(len, pieces)) == len(text):
        return pieces
    pieces, at = [], 0
    for m in split.finditer(text):
        if m.start() > at:
            pieces.append(text[at:m.start()])
        if m.end() > m.start():
            pieces.append(m.group())
        at = m.end()
    return pieces + [text[at:]] if at < len(text) else pieces


@functools.lru_cache(maxsize=64)
def ascii_pattern(pattern: str):
    """The split pattern for ASCII text, compiled by Python's own `re`, which splits it 2-3x
    faster than `regex`: on ASCII, \\p{L} is [A-Za-z] and \\p{N} is [0-9]. None if the pattern
    uses anything else `re` lacks, or if the two disagree on a probe of every ASCII character."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        prop = {r"\p{L}": "A-Za-z", r"\p{N}": "0-9"}.get(pattern[i:i + 5])
        if prop:
            out.append(prop if in_class else f"[{prop}]")
            i += 5
            continue
        step = pattern[i:i + 2] if pattern[i] == "\\" else pattern[i]
        in_class = (in_class or step == "[") and step != "]"
        out.append(step)
        i += len(step)
    try:
        fast = re.compile("".join(out), re.ASCII)
    except re.error:
        return None
    probe = "".join(map(chr, range(128))) + " ab  12 345'll 'S x\n\n  y\t\r\n z.. ,\x0b; 6 " * 2
    return fast if fast.findall(probe) == compile_pattern(pattern).findall(probe) else None


@functools.lru_cache(maxsize=64)
def special_token_regex(special_tokens: frozenset):
    """Regex matching any of the special tokens; longer ones first, so when two overlap
    (e.g. "<|a|>" and "<|a|><|b|>") the longest wins."""
    ordered = sorted(special_tokens, key=lambda s: (-len(s), s))
    return regex.compile("|".join(regex.escape(s) for s in ordered))


def split_on_special_tokens(text: str, special_tokens) -> list[str]:
    """The text between special tokens (they delimit documents and never take part in merges)."""
    if not special_tokens:
        return [text]
    return special_token_regex(frozenset(special_tokens)).split(text)


def _replace_lone_surrogates(text: str) -> str:
    """A str may hold lone surrogates ("\\ud800") that UTF-8 cannot encode; like tiktoken,
    replace them by U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def count_text_pretokens(text: str, special_tokens=(), pattern=GPT2_PATTERN) -> Counter:
    """How often each distinct pre-token occurs in `text` (special tokens removed). The
    pattern must match every character: merges learned where it skips text would be learned
    on pieces that encoding then cuts differently."""
    split, ascii_split = compile_pattern(pattern), ascii_pattern(pattern)
    counts = Counter()
    for segment in split_on_special_tokens(text, special_tokens):
        pieces = (ascii_split if ascii_split and segment.isascii() else split).findall(segment)
        if sum(map(len, pieces)) != len(segment):
            at = 0  # the first character no match covers
            for m in split.finditer(segment):
                if m.start() > at:
                    break
                at = m.end()
            raise BPEError(f"split pattern {pattern!r} skips {segment[at]!r} of the training text (in "
                            f"{segment[max(0, at - 20):at + 20]!r}; a pattern must match every character, "
                            "e.g. end it with |\\s+|\\S)")
        counts.update(pieces)
    return counts


# ----------------------------------------------------------------------------------------
# Training: a text -> (vocab, merges)


def train_bpe(text: str, vocab_size: int, special_tokens=(), pattern=GPT2_PATTERN, verbose=False):
    """Train a byte-level BPE tokenizer on the string `text` (a file of any size:
    tokenizer.train_bpe_file).

    vocab_size: 256 byte tokens + merges + special tokens. Returns (vocab, merges): vocab
    {id: bytes} with ids 0-255 the bytes, 256... the merges in order, then the special
    tokens; merges [(left bytes, right bytes), ...]."""
    if not isinstance(text, str):
        raise BPEError(f"train_bpe takes the text itself, not a {type(text).__name__} (for a file "
                        "use tokenizer.train_bpe_file)")
    check_vocab_size(vocab_size, special_tokens)
    t0 = time.perf_counter()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _replace_lone_surrogates(text)
    counts = count_text_pretokens(text, special_tokens, pattern)
    return train_on_counts(counts, vocab_size, special_tokens, verbose, t0)


def check_vocab_size(vocab_size, special_tokens) -> int:
    """The number of merges a vocabulary of vocab_size leaves, or a one-line error."""
    n_special = len(set(special_tokens))
    num_merges = vocab_size - 256 - n_special
    if num_merges < 0:
        raise BPEError(f"vocab_size {vocab_size} is too small (it counts 256 byte tokens and "
                        f"{n_special} special token(s): use at least {256 + n_special})")
    return num_merges


def train_on_counts(counts, vocab_size: int, special_tokens=(), verbose=False, t0=None):
    """train_bpe's (vocab, merges) from pre-token counts {pre-token: count} (count_text_pretokens'
    or a file's); t0: when counting began, for the verbose report."""
    special_tokens = list(dict.fromkeys(special_tokens))
    num_merges = check_vocab_size(vocab_size, special_tokens)
    if not counts:
        raise BPEError("the training text is empty (nothing outside special tokens; give a non-empty text)")
    if verbose:
        took = f", counted in {time.perf_counter() - t0:.1f} s" if t0 is not None else ""
        print(f"{len(counts):,} distinct pre-tokens, {sum(counts.values()):,} in all{took}", file=sys.stderr)
    merges = learn_merges({p.encode("utf-8"): c for p, c in counts.items()}, num_merges, verbose)
    vocab = {i: bytes([i]) for i in range(256)}
    for left, right in merges:
        vocab[len(vocab)] = left + right
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


# ----------------------------------------------------------------------------------------
# Tokenizer

PREFIX_SPACE = " "  # a pre_tokenizer step: prepend a space to a piece that lacks one (HF ByteLevel's add_prefix_space)


def apply_merges(ids: list[int], ranks: dict, merged_id: list[int]) -> tuple[int, ...]:
    """Merge the adjacent pair of the earliest learned merge, the leftmost if it occurs twice,
    until no pair is a merge (what GPT-2's encoder.py, tiktoken and HF `tokenizers` do).
    ranks: (left id, right id) -> priority; merged_id[priority]: the id of left + right.
    A short list takes the plain loop (O(n^2)), a long one (a page of CJK text, a blob) the heap."""
    return _merge_short(ids, ranks, merged_id) if len(ids) <= 128 else _merge_long(ids, ranks, merged_id)


def _merge_short(ids, ranks, merged_id) -> tuple[int, ...]:
    """ranks_at[i] is the priority of the pair (ids[i], ids[i + 1]): a merge changes only its neighbours'."""
    rank_of, none = ranks.get, len(merged_id)
    ranks_at = list(map(rank_of, pairwise(ids), repeat(none)))
    while ranks_at:
        best = min(ranks_at)
        if best == none:
            break  # no pair left that the merges know
        i = ranks_at.index(best)
        ids[i] = merged_id[best]
        del ids[i + 1], ranks_at[i]
        if i > 0:
            ranks_at[i - 1] = rank_of((ids[i - 1], ids[i]), none)
        if i < len(ranks_at):
            ranks_at[i] = rank_of((ids[i], ids[i + 1]), none)
    return tuple(ids)


def _merge_long(ids, ranks, merged_id) -> tuple[int, ...]:
    """The same in O(n log n): a heap of (priority, position) over a linked list of the
    tokens, so the earliest merge, then the leftmost, pops first. An entry is stale when
    the pair at its position changed since it was pushed (a pair's priority is its own)."""
    rank_of, none = ranks.get, len(merged_id)
    n = len(ids)
    after, before, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
    heap = [(r, i) for i, r in enumerate(map(rank_of, pairwise(ids), repeat(none))) if r != none]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = after[i]
        if not alive[i] or j == n or rank_of((ids[i], ids[j])) != rank:
            continue
        ids[i], alive[j] = merged_id[rank], False
        after[i] = after[j]
        for left in (before[i], i) if after[i] < n else (before[i],):
            if left >= 0 and (r := rank_of((ids[left], ids[after[left]]), none)) != none:
                heapq.heappush(heap, (r, left))
        if after[i] < n:
            before[after[i]] = i
    return tuple(t for t, keep in zip(ids, alive) if keep)


def render_token(token: bytes) -> str:
    """A token for people: its text if valid UTF-8, else its bytes; control chars escaped."""
    try:
        return repr(token.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(token)


class Tokenizer:
    """Encode text with learned merges (also in a process pool, and streamed), decode ids.

    vocab: {id: bytes}; merges: [(left, right), ...] in priority order (each left + right
    must be in vocab); special_tokens: strings (found in vocab by their bytes, appended if
    absent) or {string: id}; pattern: the split regex. cache_size bounds the cache of
    encoded pre-tokens (natural text repeats a few thousand words most of the time).
    ignore_merges: a pre-token that is itself a token is that token, merges or not, as in
    tiktoken; for vocabularies made by merges (GPT-2's, trained ones) that only skips work,
    as a test checks, and the half of Shakespeare's distinct words that are tokens need no
    merging. The other keyword options hold what a Hugging Face tokenizer.json may add (see
    tokenizer.bpe_from_tokenizer_json): added_tokens {string: id}, non-special tokens matched in any text;
    normalizer: Unicode forms applied first ("NFC", ...); pre_tokenizer: steps applied in turn
    to every piece instead of `pattern` (a regex: split_isolated; PREFIX_SPACE)."""

    def __init__(self, vocab, merges, special_tokens=(), pattern=GPT2_PATTERN, cache_size=1 << 16, *,
                 added_tokens=None, normalizer=(), pre_tokenizer=None, ignore_merges=True):
        self.vocab = {int(i): bytes(t) for i, t in vocab.items()}
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.pattern = pattern
        self.cache_size = cache_size
        if isinstance(special_tokens, dict):
            self.special_tokens = {s: int(i) for s, i in special_tokens.items()}
            for s, i in self.special_tokens.items():
                self.vocab[i] = s.encode("utf-8")
        else:
            self.special_tokens = {}
            by_bytes = {t: i for i, t in self.vocab.items()}
            for s in special_tokens:
                i = by_bytes.get(s.encode("utf-8"))
                if i is None:  # not in the vocabulary yet: append it
                    i = max(self.vocab, default=-1) + 1
                    self.vocab[i] = s.encode("utf-8")
                self.special_tokens[s] = i
        self.added_tokens = {s: int(i) for s, i in (added_tokens or {}).items()}
        for s, i in self.added_tokens.items():
            self.vocab[i] = s.encode("utf-8")
        self.normalizer = tuple(normalizer)
        self.pre_tokenizer = None if pre_tokenizer is None else tuple(pre_tokenizer)
        self.ignore_merges = ignore_merges
        self.eot_id = self.special_tokens.get(ENDOFTEXT)
        self.vocab_size = max(self.vocab) + 1  # rows of an embedding table indexed by these ids
        self._build_tables()

    def _build_tables(self):
        steps = self.pre_tokenizer if self.pre_tokenizer is not None else (self.pattern,)
        self._steps = [s if s == PREFIX_SPACE else compile_pattern(s) for s in steps]
        self._ascii_steps = [s if s == PREFIX_SPACE else ascii_pattern(s) or compile_pattern(s) for s in steps]
        added_ids = set(self.special_tokens.values()) | set(self.added_tokens.values())
        token_id = {t: i for i, t in self.vocab.items() if i not in added_ids}
        missing = [b for b in range(256) if bytes([b]) not in token_id]
        if missing:
            raise BPEError(f"the vocabulary lacks byte token(s) {missing[:5]} "
                            "(a byte-level BPE needs all 256)")
        self._byte_ids = [token_id[bytes([b])] for b in range(256)]
        self._ranks, self._merged_id = {}, []  # (left id, right id) -> priority; priority -> id of left+right
        for rank, (left, right) in enumerate(self.merges):
            try:
                pair, new_id = (token_id[left], token_id[right]), token_id[left + right]
            except KeyError:
                raise BPEError(f"merge {rank} ({render_token(left)} + {render_token(right)}) "
                                "uses a token missing from the vocabulary (rebuild the tokenizer)") from None
            self._ranks.setdefault(pair, rank)  # a repeated merge keeps its first priority
            self._merged_id.append(new_id)
        self._whole_ids = token_id if self.ignore_merges else {}
        self._matched_ids = self.special_tokens | self.added_tokens
        self._cache = {}  # pre-token -> ids; a plain dict: map() looks pieces up in C

    def __getstate__(self):  # tables, compiled regexes and the cache are rebuilt
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_tables()

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={list(self.special_tokens)})")

    # --- encoding ---

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Token ids of one pre-token (what the cache holds)."""
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates ("\ud800") become U+FFFD, as in tiktoken
            data = _replace_lone_surrogates(piece).encode("utf-8")
        whole = self._whole_ids.get(data)  # ignore_merges: a pre-token that is a token is that token
        return (whole,) if whole is not None else self.merge_bytes(data)

    def merge_bytes(self, data: bytes) -> tuple[int, ...]:
        """Token ids of `data` by the merges (apply_merges), starting from its bytes."""
        return apply_merges(list(map(self._byte_ids.__getitem__, data)), self._ranks, self._merged_id)

    def _merge_short(self, ids):  # each loop on its own (tests/test_bpe.py compares them)
        return _merge_short(ids, self._ranks, self._merged_id)

    def _merge_long(self, ids):
        return _merge_long(ids, self._ranks, self._merged_id)

    def _pretokenize(self, text: str) -> list[str]:
        steps = self._ascii_steps if text.isascii() else self._steps
        if len(steps) == 1 and steps[0] != PREFIX_SPACE:  # one split regex: the usual case
            return split_isolated(steps[0], text)
        pieces = [text]
        for step in steps:
            if step == PREFIX_SPACE:
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            else:
                pieces = [q for p in pieces for q in split_isolated(step, p)]
        return pieces

    def _normalize(self, text: str) -> str:
        for form in self.normalizer:
            text = unicodedata.normalize(form, text)
        return text

    def _encode_text(self, text: str) -> list[int]:
        """Ids of a text with no special or added token in it. Natural text repeats a few
        thousand pre-tokens most of the time, so each distinct one is merged once and its
        ids cached; the loop over pieces is then map, chain and list, all in C."""
        pieces = self._pretokenize(self._normalize(text) if self.normalizer else text)
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, pieces)))
        except KeyError:  # pieces not seen before
            return list(chain.from_iterable(map(self._cache_with(pieces).__getitem__, pieces)))

    def _cache_with(self, pieces) -> dict:
        """The pre-token cache, holding all of `pieces` (each new one merged once)."""
        cache = self._cache
        if len(cache) > self.cache_size:  # bounded memory; natural text refills it quickly
            self._cache = cache = {}  # a new dict: another thread may still be reading the old one
        for piece in set(pieces).difference(cache):
            cache[piece] = self._bpe(piece)
        return cache

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode, treating special tokens as plain text."""
        return self.encode(text, allowed_special="none")

    def _special_sets(self, allowed_special):
        """(allowed, disallowed) special tokens for an `allowed_special` argument:
        "none_raise" (default, as tiktoken): none allowed, and finding one is an error;
        "all": all allowed; "none": none, they are plain text; a set: those allowed, any
        other one found is an error (tiktoken's disallowed_special="all")."""
        every = frozenset(self.special_tokens)
        if allowed_special == "all":
            return every, frozenset()
        if allowed_special == "none":
            return frozenset(), frozenset()
        if allowed_special == "none_raise":
            return frozenset(), every
        if isinstance(allowed_special, (set, frozenset, list, tuple)):
            unknown = set(allowed_special) - every
            if unknown:
                raise BPEError(f"{sorted(unknown)} are not special tokens of this tokenizer "
                                f"(it has {sorted(every)})")
            return frozenset(allowed_special), every - frozenset(allowed_special)
        raise BPEError(f"allowed_special={allowed_special!r} (use 'none_raise', 'all', 'none' or a set)")

    def _check_disallowed(self, text, disallowed):
        if disallowed:
            found = special_token_regex(disallowed).search(text)
            if found:
                raise BPEError(f"the text contains the special token {found.group()!r} (pass "
                                "allowed_special='all' to encode it as one token, or use encode_ordinary "
                                "to encode it as plain text)")

    def encode(self, text: str, allowed_special="none_raise") -> list[int]:
        """Encode text; special tokens in `allowed_special` become their single id (and so
        do a tokenizer.json's non-special added tokens, always, as in `tokenizers`)."""
        allowed, disallowed = self._special_sets(allowed_special)
        self._check_disallowed(text, disallowed)
        matched = allowed | frozenset(self.added_tokens)
        if not matched:
            return self._encode_text(text)
        ids, start = [], 0
        for match in special_token_regex(matched).finditer(text):
            ids += self._encode_text(text[start:match.start()])
            ids.append(self._matched_ids[match.group()])
            start = match.end()
        ids += self._encode_text(text[start:])
        return ids

    def encode_batch(self, texts, allowed_special="none_raise", num_workers=None) -> list[list[int]]:
        """encode() of each text, in `num_workers` processes (default: one per CPU). Processes,
        not threads: this is Python, and the GIL lets one thread run at a time."""
        texts = list(texts)
        self._special_sets(allowed_special)  # a bad argument fails here, not in every worker
        num_workers = min(num_workers or os.cpu_count() or 1, len(texts))
        if num_workers <= 1:
            return [self.encode(text, allowed_special) for text in texts]
        import multiprocessing

        with multiprocessing.Pool(num_workers, _set_worker_tokenizer, (self,)) as pool:
            return pool.starmap(_encode_in_worker, [(text, allowed_special) for text in texts],
                                chunksize=max(1, len(texts) // (4 * num_workers)))

    def _units(self, text, matched):
        """The pre-tokens (str) and matched special / added tokens (int id) of `text` in
        order, and where each one ends."""
        units, ends, start = [], [], 0
        found = list(special_token_regex(matched).finditer(text)) if matched else []
        for special in found + [None]:
            for piece in self._pretokenize(text[start:special.start() if special else len(text)]):
                units.append(piece)
                start += len(piece)
                ends.append(start)
            if special:
                units.append(self._matched_ids[special.group()])
                start = special.end()
                ends.append(start)
        return units, ends

    def _ids_of_units(self, units):
        cache = self._cache_with([unit for unit in units if type(unit) is str])
        return [i for unit in units for i in ((unit,) if type(unit) is int else cache[unit])]

    def encode_iterable(self, chunks, allowed_special="none_raise", min_chars=1 << 14):
        """Yield the ids of a stream of strings (e.g. an open file's lines) in constant
        memory; the result equals encode("".join(chunks)).

        A pre-token can straddle two chunks ("hel" + "lo"), and where the text stops
        changes the last pre-tokens (a trailing "'" may become "'ll"; a whitespace run at
        the end is cut differently than one followed by a word). So the last two units
        of the buffer are held back until more text arrives: the split patterns look at
        most 2 characters past a pre-token's start or 1 past its end, so the units before
        them are final. A suffix that could begin a special token is held back too.
        Memory: the buffer (min_chars plus one chunk) and the bounded pre-token cache."""
        if PREFIX_SPACE in self._steps:
            raise BPEError("encode_iterable cannot stream a tokenizer that prefixes each text with a "
                            "space (add_prefix_space): use encode")
        allowed, disallowed = self._special_sets(allowed_special)
        matched = allowed | frozenset(self.added_tokens)
        held = list(self.special_tokens) + list(self.added_tokens) if (matched or disallowed) else []
        buffer = ""
        for chunk in chunks:
            buffer += chunk
            if len(buffer) < min_chars:
                continue  # work on sizeable pieces: per-call overhead would dominate on lines
            if self.normalizer:  # normalize(normalize(a) + b) == normalize(a + b)
                buffer = self._normalize(buffer)
            self._check_disallowed(buffer, disallowed)
            hold = len(buffer)
            for s in held:  # longest suffix that is a proper prefix of a special token
                for k in range(min(len(s) - 1, len(buffer)), 0, -1):
                    if len(buffer) - k < hold and buffer.endswith(s[:k]):
                        hold = len(buffer) - k
                        break
            units, ends = self._units(buffer, matched)
            n_final = len(units) - 2
            while n_final > 0 and ends[n_final - 1] > hold:
                n_final -= 1
            if n_final > 0:
                yield from self._ids_of_units(units[:n_final])
                buffer = buffer[ends[n_final - 1]:]
        buffer = self._normalize(buffer)
        self._check_disallowed(buffer, disallowed)
        yield from self._ids_of_units(self._units(buffer, matched)[0])

    # --- decoding ---

    def decode_bytes(self, ids) -> bytes:
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as e:
            raise BPEError(f"token id {e.args[0]!r} is not in the vocabulary (ids go up to "
                             f"{self.vocab_size - 1})") from None

    def decode(self, ids) -> str:
        """Text of the ids; bytes that are not valid UTF-8 (a token sequence cut inside a
        character) become U+FFFD, as tiktoken's decode(errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _set_worker_tokenizer(tok):
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_in_worker(text, allowed_special):
    return _worker_tokenizer.encode(text, allowed_special)


_worker_tokenizer = None  # encode_batch's processes: set once per process by the pool's initializer


if __name__ == "__main__":  # the command line (train, encode, compare) lives in tokenizer.py
    import runpy

    runpy.run_module("tokenizer", run_name="__main__")
