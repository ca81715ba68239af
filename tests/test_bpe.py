"""bpe.py: training (worked examples, CS336 ties, incremental == minbpe's naive loop), split
patterns checked, the naive encoder == the fast one, round trips, GPT-2's merges == tiktoken
token for token, the ASCII fast path == `regex`, encode_batch, streaming in bounded memory,
one-line errors on bad input. (Training on a file, bpe.py's file format, the command line and
the formats of others: tests/test_tokenizer.py.)
Fixtures gpt2 (GPT-2's merges), small (trained here) and tiktoken_gpt2: conftest.py."""

import pickle
import random
import tracemalloc
from itertools import pairwise

import pytest

import bpe
from bpe import BPEError
from data import SHAKESPEARE_PATH

EOT = "<|endoftext|>"
# The split patterns of Llama 3 and Qwen2 / Qwen3 as their tokenizer.json files write them
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

TRICKY = [
    "I'm you're WE'VE they'LL he'd IT'S don't 'tis rock'n'roll",
    "1234567 3.14159 1,000,000 12 123 1234 x2 ²³ ٣",
    "trailing spaces   ", "   leading", "   ", "\n\n\n", "a\r\n\r\nb", "tabs\t\tand\tx", "x  \n  y",
    "hello<|endoftext|>world", EOT, "<|endoftext|><|endoftext|> <|endoftext",
    "👋🏽 👨‍👩‍👧‍👦 emoji", "日本語のテキスト", "ﬁne émigré naïve", "a\x1c\x1db\x00\x7f\x1b[31m",
    " ' s 's ''", "?!\n\n((a))\n", "\u3000x\u00a0y\u2028z", "lone \ud800 surrogate",
]
BAD_PATTERNS = [("(", "bad split pattern"), ("(a)|.", "capturing groups"), ("foo", "skips 'h'"), (r"\S+", "skips ' '")]
ROUND_TRIP = [
    "", "hello world", "héllo wörld, Καλημέρα, привет, 你好, مرحبا", "👋🏽 family: 👨‍👩‍👧‍👦 🏳️‍🌈",
    "a   b\n\n\n\tc    \r\n  ", "\x00\x01\x02\x1b[0m\x7f\x85", "".join(map(chr, range(256))),
]


def shakespeare() -> str:
    return SHAKESPEARE_PATH.read_text(encoding="utf-8")


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)  # a BPEError's message
    assert "\n" not in msg, msg
    return msg


# ---- training ------------------------------------------------------------------------


def test_primitives_worked_examples():
    assert bpe.get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert bpe.merge([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4]
    assert bpe.merge([5, 5, 5], (5, 5), 6) == [6, 5]  # left to right: a pair overlapping itself
    assert bpe.merge([5, 5, 5, 5], (5, 5), 6) == [6, 6]


def test_wikipedia_example():
    # Wikipedia: aaabdaaabac -> ZabdZabac (Z=aa) -> ZYdZYac (Y=ab) -> XdXac (X=ZY=aaab).
    # After aa, "aa a" and "a b" both occur twice; the CS336 rule takes the greater pair
    # of bytes, (b"aa", b"a") > (b"a", b"b"), so our second token is "aaa", not "ab";
    # the third merge reaches Wikipedia's X = "aaab" all the same.
    vocab, merges = bpe.train_bpe("aaabdaaabac", 256 + 3)
    assert merges == [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b")]
    assert bpe.learn_merges_naive({b"aaabdaaabac": 1}, 3) == merges
    assert [vocab[256], vocab[257], vocab[258]] == [b"aa", b"aaa", b"aaab"]
    tok = bpe.Tokenizer(vocab, merges)
    ids = tok.encode("aaabdaaabac")
    assert [tok.vocab[i] for i in ids] == [b"aaab", b"d", b"aaab", b"a", b"c"]  # X d X a c


def test_ties_go_to_the_lexicographically_greater_pair():
    # The worked example of Stanford CS336 assignment 1 (pre-tokens split on whitespace;
    # the whitespace pieces are single bytes, so they hold no pair):
    # "es" and "st" tie at 9 and "st" wins; "lo" and "ow" tie at 7 and "ow" wins; ...
    text = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    expected = ["s t", "e st", "o w", "l ow", "w est", "n e", "ne west", "w i", "wi d", "wid est", "low e", "lowe r"]
    _, merges = bpe.train_bpe(text, 256 + 12, pattern=r"\S+|\s+")
    assert [f"{a.decode()} {b.decode()}" for a, b in merges] == expected
    counts = {p.encode(): c for p, c in bpe.count_text_pretokens(text, pattern=r"\S+|\s+").items()}
    assert bpe.learn_merges_naive(counts, 12) == merges
    # a corpus of nothing but ties: every pair occurs once; the greatest pair goes first
    _, merges = bpe.train_bpe("ab ba zy yz", 256 + 1, pattern=r"\S+|\s")
    assert merges == [(b"z", b"y")]
    _, merges = bpe.train_bpe("ab ac", 256 + 1, pattern=r"\S+|\s")
    assert merges == [(b"a", b"c")]
    # the heap orders ties by a key string that must sort pairs exactly in reverse bytes
    # order, prefixes ("a" < "ab") and the extreme bytes 0x00 / 0xff included
    rng = random.Random(0)
    tokens = [bytes(rng.choice(b"ab\x00\xff") for _ in range(rng.randint(1, 4))) for _ in range(400)]
    pairs = list(pairwise(tokens))
    key = lambda p: bpe.reversed_order_key(p[0]) + bpe.reversed_order_key(p[1])
    assert sorted(pairs, key=key) == sorted(pairs, reverse=True)


def test_incremental_training_equals_naive_loop():
    # runs of one letter make pairs that overlap themselves (a a a a), the tricky case;
    # late merges (counts ~10) are full of ties
    text = shakespeare()[:20_000] + " aaaa aaaaa abab ababab xxxxxxx\n\n\n    " * 20
    counts = {p.encode(): c for p, c in bpe.count_text_pretokens(text).items()}
    fast = bpe.learn_merges(counts, 250)
    assert len(fast) == 250
    assert fast == bpe.learn_merges_naive(counts, 250)


def test_special_tokens_never_merge():
    text = EOT.join(shakespeare()[:20_000].split("\n\n"))  # ~300 "documents"
    vocab, merges = bpe.train_bpe(text, 256 + 100 + 1, special_tokens=(EOT,))
    assert vocab[256 + 100] == EOT.encode() and len(vocab) == 256 + 100 + 1
    assert not any(b"<" in a + b or b"|" in a + b for a, b in merges)  # Shakespeare has neither


def test_training_stops_when_pairs_run_out():
    vocab, merges = bpe.train_bpe("ab", 1000, special_tokens=(EOT,))
    assert merges == [(b"a", b"b")] and vocab[257] == EOT.encode()


def test_train_bpe_never_guesses_a_file_name(tmp_path):
    """A string is the text, even when a file of that name exists; a path is refused."""
    name = tmp_path / "corpus.txt"
    name.write_text("zzzz zzzz zzzz", encoding="utf-8")
    _, merges = bpe.train_bpe(str(name), 256 + 1)
    assert merges != [(b"z", b"z")]  # learned from the characters of the name, not from the file
    with pytest.raises(BPEError) as e:
        bpe.train_bpe(name, 300)
    assert "train_bpe_file" in one_line_error(e)


@pytest.mark.parametrize("pattern, says", BAD_PATTERNS)
def test_bad_split_patterns_are_refused(pattern, says):
    with pytest.raises(BPEError) as e:
        bpe.train_bpe("hello foo world", 300, pattern=pattern)
    assert says in one_line_error(e)
    if says.startswith(("bad", "capturing")):
        with pytest.raises(BPEError):
            bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], pattern=pattern)


# ---- encoding and decoding -------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP, ids=lambda s: repr(s[:12]))
def test_round_trip(text, gpt2, small):
    for tok in (gpt2, small):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert list(tok.encode_iterable(iter(text), min_chars=1)) == ids  # one character at a time


def test_naive_encoder_equals_the_fast_one(gpt2, small):
    """encode_naive (minbpe's loop: merge the pair that makes the earliest learned token,
    repeat) gives Tokenizer's ids on real text in several scripts, with GPT-2's merges and
    with trained ones; the ranks are the ids, as in tiktoken."""
    text = shakespeare()[:20_000] + "".join(ROUND_TRIP) + "".join(TRICKY[:-1]) + "日本語のテキスト" * 20
    for tok in (gpt2, small):
        ranks = {t: i for i, t in tok.vocab.items() if i not in tok.special_tokens.values()}
        assert bpe.encode_naive(text, ranks, tok.pattern) == tok.encode_ordinary(text)
    assert bpe.merge_by_rank(b"aaab", {b"aa": 256, b"aaa": 257, b"ab": 258}) == [b"aaa", b"b"]
    assert bpe.merge_by_rank(b"aaab", {b"aa": 256, b"aaa": 257}, max_rank=257) == [b"aa", b"a", b"b"]


def test_all_256_bytes(gpt2, small, tiktoken_gpt2):
    for tok in (gpt2, small):
        id_of = {t: i for i, t in tok.vocab.items()}
        byte_ids = [id_of[bytes([b])] for b in range(256)]  # GPT-2's are a permutation of 0..255
        assert tok.decode_bytes(byte_ids) == bytes(range(256))
        assert tok.decode(byte_ids) == bytes(range(256)).decode("utf-8", errors="replace")
        if tok is gpt2:
            assert tok.decode(byte_ids) == tiktoken_gpt2.decode(byte_ids)
    # a token sequence cut inside a character decodes with U+FFFD, like tiktoken
    ids = gpt2.encode("é😀")
    for cut in range(len(ids) + 1):
        assert gpt2.decode(ids[:cut]) == tiktoken_gpt2.decode(ids[:cut])


def test_gpt2_files_equal_tiktoken_on_all_of_shakespeare(gpt2, tiktoken_gpt2):
    text = shakespeare()
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert gpt2.vocab_size == tiktoken_gpt2.n_vocab == 50257 and gpt2.eot_id == tiktoken_gpt2.eot_token


def test_gpt2_tricky_strings_equal_tiktoken(gpt2, tiktoken_gpt2):
    for s in TRICKY:
        assert gpt2.encode(s, allowed_special="all") == tiktoken_gpt2.encode(s, allowed_special="all"), s
        assert gpt2.encode_ordinary(s) == tiktoken_gpt2.encode_ordinary(s), s
        assert gpt2.encode(s, allowed_special={EOT}) == tiktoken_gpt2.encode(s, allowed_special={EOT}), s
    assert gpt2.encode(EOT, allowed_special="all") == [50256]


def test_gpt4_pattern_equals_tiktoken_regex(small):
    """The GPT-4 split pattern under the `regex` module cuts text as tiktoken's Rust regex
    does: a tokenizer trained with it, handed to tiktoken as ranks, encodes identically."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the reference")
    text = shakespeare()[:100_000] + "".join(TRICKY[:-1]) * 5
    vocab, merges = bpe.train_bpe(text, 700, special_tokens=(EOT,), pattern=bpe.GPT4_PATTERN)
    tok = bpe.Tokenizer(vocab, merges, (EOT,), bpe.GPT4_PATTERN)
    ranks = {t: i for i, t in vocab.items() if i != tok.eot_id}
    enc = tiktoken.Encoding("nanollm-test", pat_str=bpe.GPT4_PATTERN, mergeable_ranks=ranks,
                            special_tokens=tok.special_tokens)
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    for s in TRICKY:
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), s


def test_special_tokens_longest_wins_and_allowed_sets(small):
    specials = [EOT, "<|a|>", "<|a|><|b|>"]
    tok = bpe.Tokenizer(small.vocab, small.merges, specials)
    a, ab = tok.special_tokens["<|a|>"], tok.special_tokens["<|a|><|b|>"]
    ids = tok.encode("x<|a|><|b|>y<|a|>", allowed_special="all")
    assert ab in ids and ids[-1] == a and tok.decode(ids) == "x<|a|><|b|>y<|a|>"
    assert tok.encode("x<|a|>", allowed_special={"<|a|>"})[-1] == a
    with pytest.raises(BPEError) as e:  # allowed {"<|a|>"}: EOT is still disallowed
        tok.encode(f"x<|a|>{EOT}", allowed_special={"<|a|>"})
    assert EOT in one_line_error(e)
    plain = tok.encode("x<|a|>", allowed_special="none")
    assert plain == tok.encode_ordinary("x<|a|>") and a not in plain
    assert tok.eot_id == small.eot_id == small.special_tokens[EOT]


def test_encode_iterable_equals_encode(gpt2, small):
    """Random chunk boundaries, splitting pre-tokens and special tokens anywhere."""
    gpt4 = bpe.Tokenizer(small.vocab, small.merges, (EOT,), bpe.GPT4_PATTERN)
    text = shakespeare()[:30_000] + "".join(TRICKY[:-1]) * 3 + "don't  \n\n 123456  'll"
    rng = random.Random(0)
    skipping = bpe.Tokenizer(small.vocab, small.merges, (EOT,), r"\S+")  # drops whitespace
    for tok in (gpt2, small, gpt4, skipping):
        cuts = sorted(rng.sample(range(1, len(text)), 3000))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        expected = tok.encode(text, allowed_special="all")
        assert list(tok.encode_iterable(chunks, allowed_special="all", min_chars=1)) == expected
        assert list(tok.encode_iterable(chunks, allowed_special="all", min_chars=100)) == expected
        lines = text.splitlines(keepends=True)
        assert list(tok.encode_iterable(lines, allowed_special="none")) == tok.encode_ordinary(text)
        assert tok.decode(expected) == text  # a pattern that skips text: the gaps are pieces too


def test_encode_iterable_memory_is_bounded(gpt2):
    """Streaming 4x more text takes no more memory: the buffer and the pre-token cache
    (warmed beforehand; bounded by cache_size) are all that is kept."""
    text = shakespeare()
    block = text[:text.index("\n", 20_000) + 1]  # ends "...:\n", and the text starts "First"
    lines = block.splitlines(keepends=True)
    per_block = len(gpt2.encode(block))  # also warms the cache

    def peak_memory(reps):
        stream = (line for _ in range(reps) for line in lines)
        tracemalloc.start()
        try:
            n_tokens = sum(1 for _ in gpt2.encode_iterable(stream))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n_tokens == reps * per_block
        return peak

    small_peak, big_peak = peak_memory(8), peak_memory(32)  # 160 KB and 640 KB of text
    # 32 blocks make ~190k tokens: a list of them alone would take ~1.5 MB; 64 KB is slack
    # for allocator noise
    assert big_peak < small_peak + 64 * 1024 and big_peak < 1024 * 1024, (small_peak, big_peak)


def test_ascii_fast_path_splits_as_regex():
    """ASCII text is split by Python's `re` with [A-Za-z] / [0-9] for \\p{L} / \\p{N}: the
    same pieces as `regex` on Shakespeare and on random ASCII (controls included)."""
    rng = random.Random(0)
    alphabet = "".join(map(chr, range(128))) + "   \n\n\t'sdmtlvreSLDaz09"
    texts = [shakespeare()[:300_000], *(s for s in TRICKY if s.isascii())]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1000)]
    for pattern in (bpe.GPT2_PATTERN, bpe.GPT4_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN):
        fast, reference = bpe.ascii_pattern(pattern), bpe.compile_pattern(pattern)
        assert fast is not None and type(fast) is not type(reference)
        for text in texts:
            assert fast.findall(text) == reference.findall(text), (pattern, text)
    assert bpe.ascii_pattern(r"\p{Lu}+|\s") is None  # another Unicode property: regex only


def test_whole_token_shortcut_changes_nothing(gpt2, small):
    """encode takes a pre-token that is itself a token as that token (tiktoken does; HF's
    `ignore_merges`): for GPT-2's merges and trained ones, merging its bytes gives that token."""
    for tok in (gpt2, small):
        special = set(tok.special_tokens.values())
        assert all(tok.merge_bytes(t) == (i,) for i, t in tok.vocab.items() if i not in special)


def test_long_pieces_take_the_heap(gpt2, small, tiktoken_gpt2):
    """Pieces over 128 bytes are merged with a heap in O(n log n): the same ids as the
    short path, and as tiktoken on pieces of 10-40 KB (the short path would take seconds)."""
    rng = random.Random(0)
    words = shakespeare().split()
    for _ in range(100):
        piece = "".join(rng.choice(words) for _ in range(rng.randint(1, 60))).encode()
        for tok in (gpt2, small):
            ids = list(map(tok._byte_ids.__getitem__, piece))
            assert tok._merge_long(list(ids)) == tok._merge_short(list(ids)), piece
    for text in ("é" * 20_000, "日本語のテキスト" * 1000, "".join(rng.choice("abcé日 ") for _ in range(20_000))):
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text)


def test_encode_batch_equals_encode(gpt2, small):
    texts = [shakespeare()[i:i + n] for i, n in ((0, 5000), (9000, 1), (20_000, 0), (30_000, 12_345))]
    texts += TRICKY[:-1]
    for tok in (gpt2, small):
        expected = [tok.encode(t, allowed_special="all") for t in texts]
        assert tok.encode_batch(texts, allowed_special="all", num_workers=2) == expected
        assert tok.encode_batch(texts, allowed_special="all", num_workers=1) == expected
        copy = pickle.loads(pickle.dumps(tok))  # what a spawned worker receives
        assert [copy.encode(t, allowed_special="all") for t in texts] == expected
    with pytest.raises(BPEError) as e:  # a worker's error reaches the caller as itself
        small.encode_batch(["fine", f"a{EOT}b", "fine"], num_workers=2)
    assert EOT in one_line_error(e)


# ---- bad input ---------------------------------------------------------------


def test_bad_vocab_size():
    with pytest.raises(BPEError) as e:
        bpe.train_bpe("hello", 256, special_tokens=(EOT,))
    assert "257" in one_line_error(e)


def test_empty_training_text():
    for empty in ("", EOT * 3):
        with pytest.raises(BPEError) as e:
            bpe.train_bpe(empty, 300, special_tokens=(EOT,))
        assert "empty" in one_line_error(e)
    with pytest.raises(BPEError) as e:
        bpe.train_on_counts({}, 300)
    assert "empty" in one_line_error(e)


def test_special_token_with_none_raise(small):
    for call in (lambda: small.encode(f"a{EOT}b"),
                 lambda: list(small.encode_iterable(["a<|endof", "text|>b"], min_chars=1))):
        with pytest.raises(BPEError) as e:
            call()
        assert EOT in one_line_error(e)
    assert small.encode_ordinary(EOT) == small.encode(EOT, allowed_special="none") != [small.eot_id]


def test_unknown_id(small):
    with pytest.raises(BPEError) as e:
        small.decode([10 ** 6])
    one_line_error(e)
