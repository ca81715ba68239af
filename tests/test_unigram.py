"""unigram.py against its references: Viterbi ids == Hugging Face tokenizers' Unigram model (per
pre-tokenized word and whole texts, unknown characters, fused <unk>, byte fallback) and ==
sentencepiece's for a model trained with sentencepiece on the shipped text; the trainer's
vocabulary reaches its size and its tokens per byte are within 5% of sentencepiece's."""

import random

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, models, pre_tokenizers

import unigram
from conftest import SHAKESPEARE

MIXED = [
    "Hello world, wie geht's? Über alles: naïve café, façade.",
    "日本語のテキスト と English 混在 🙂🙃 emoji 👩‍👩‍👧",
    "double  spaces,\ttabs\nand newlines;   trailing ",
    " leading space and ∑∫√ symbols ≠ ∞, Ωmega",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "zzqx qqqq xxzz JJJ kkkkkkkk ????!!!! ...",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A sentencepiece Unigram model (vocab 1000) trained on 300 KB of Tiny Shakespeare."""
    folder = tmp_path_factory.mktemp("spm")
    text = SHAKESPEARE.read_text()
    (folder / "train.txt").write_text(text[:300_000])
    spm.SentencePieceTrainer.train(input=str(folder / "train.txt"), model_prefix=str(folder / "m"),
                                   model_type="unigram", vocab_size=1000, character_coverage=1.0,
                                   normalization_rule_name="identity", minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_file=str(folder / "m.model"))


def mixed_vocab(sp, byte_pieces: bool):
    """sentencepiece's pieces plus mixed-script, emoji and byte pieces with random scores; some
    characters of MIXED (語, 混, most emoji, ∫) stay in no piece."""
    rng = random.Random(0)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    extra = ["▁über", "Ü", "ü", "ber", "ï", "é", "ç", "日", "本", "日本", "の", "テ", "キ", "ス", "ト", "テキスト",
             "と", "🙂", "▁🙂", "∑", "√", "≠", "∞", "Ω", "\t", "\n", "▁▁", "kkkk", "?"]
    vocab += [(p, -rng.uniform(3, 14)) for p in extra]
    if byte_pieces:  # all but 0x80-0x87: characters holding those bytes fall back to <unk>
        vocab += [(f"<0x{b:02X}>", -rng.uniform(15, 20)) for b in range(256) if not 0x80 <= b < 0x88]
    return vocab


def reference(vocab, unk_id, byte_fallback):
    tok = Tokenizer(models.Unigram(vocab, unk_id, byte_fallback))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return tok


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_viterbi_ids_equal_tokenizers(spm_model, byte_fallback):
    vocab = mixed_vocab(spm_model, byte_fallback)
    ours, ref = unigram.Unigram(vocab, 0, byte_fallback), reference(vocab, 0, byte_fallback)
    lines = SHAKESPEARE.read_text()[300_000:320_000].splitlines()
    rng = random.Random(1)
    alphabet = "abcdeéü日本語🙂∫? \n"
    noise = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    n_unk = n_bytes = 0
    for text in MIXED + lines + noise:
        words = [w for w, _ in ref.pre_tokenizer.pre_tokenize_str(text)]
        assert unigram.pretokenize(text) == words if text else True
        for word in words:
            assert ours.encode(word) == [t.id for t in ref.model.tokenize(word)], word
        ids = [i for w in words for i in ours.encode(w)]
        assert ids == ref.encode(text).ids, text
        n_unk += ids.count(0)
        n_bytes += sum(ours.pieces[i].startswith("<0x") for i in ids)
        if not byte_fallback and "<unk>" not in text:  # decode: pieces joined
            assert ours.decode(ids) == "".join(ref.id_to_token(i) for i in ids)
    assert n_unk > (0 if byte_fallback else 10) and (n_bytes > 10 or not byte_fallback)  # cases reach both
    if byte_fallback:  # byte pieces back into UTF-8
        word = "▁語混🙂∫"
        assert ours.decode(ours.encode(word)) == word and max(ours.encode(word)) >= 1000


def test_unknown_without_unk_id_is_an_error_as_in_tokenizers():
    vocab = [("a", -1.0), ("b", -2.0), ("<0x63>", -3.0)]
    ours, ref = unigram.Unigram(vocab, None, True), models.Unigram(vocab, None, True)
    assert ours.encode("ab") == [t.id for t in ref.tokenize("ab")]
    for text in ("abc", "abd"):
        with pytest.raises(Exception):
            ref.tokenize(text)
        with pytest.raises(ValueError, match="unk"):
            ours.encode(text)


def test_viterbi_ids_equal_sentencepiece(spm_model):
    vocab = [(spm_model.id_to_piece(i), spm_model.get_score(i)) for i in range(spm_model.get_piece_size())]
    ours = unigram.Unigram(vocab, spm_model.unk_id())
    lines = [" ".join(line.split()) for line in SHAKESPEARE.read_text()[400_000:440_000].splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        assert [i for w in unigram.pretokenize(line) for i in ours.encode(w)] == spm_model.encode(line), line


def test_sample_draws_segmentations_in_proportion(spm_model):
    """alpha large -> the Viterbi path; alpha small -> several segmentations, each decoding to the word."""
    vocab = [(spm_model.id_to_piece(i), spm_model.get_score(i)) for i in range(spm_model.get_piece_size())]
    ours, rng = unigram.Unigram(vocab, 0), random.Random(0)
    word = "▁gentlemen"
    assert ours.sample(word, alpha=1000.0, rng=rng) == ours.encode(word)
    draws = {tuple(ours.sample(word, alpha=0.1, rng=rng)) for _ in range(200)}
    assert len(draws) > 5 and all(ours.decode(d) == word for d in draws)


def test_trainer_reaches_the_size_and_tokens_per_byte_of_sentencepiece(tmp_path):
    """Training is not bit-identical across references (sentencepiece and tokenizers differ
    too): the check is the vocabulary size, every character kept, and tokens per byte on
    held-out text within 5% of sentencepiece's Unigram trainer on the same text and settings."""
    text = SHAKESPEARE.read_text()
    (tmp_path / "train.txt").write_text(text[:100_000])
    ours = unigram.train_unigram(" ".join(text[:100_000].split()), 500)  # sentencepiece reads lines: no newlines
    assert len(ours) == 500 and len(set(ours.pieces)) == 500
    assert set(text[:100_000]) - {" ", "\n"} <= set(ours.pieces)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "m"),
                                   model_type="unigram", vocab_size=500, character_coverage=1.0,
                                   normalization_rule_name="identity", minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    lines = [" ".join(line.split()) for line in text[1_000_000:1_060_000].splitlines()]
    lines = [line for line in lines if line]
    n_ours = sum(len(unigram.encode_text(ours, line)) for line in lines)
    n_ref = sum(len(sp.encode(line)) for line in lines)
    assert abs(n_ours / n_ref - 1) < 0.05, (n_ours, n_ref)


def test_cli_writes_a_tokenizer_json_that_tokenizers_reads(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(SHAKESPEARE.read_text()[:30_000])
    out = tmp_path / "u.json"
    assert unigram.main(["train", "--input", str(tmp_path / "in.txt"), "--vocab_size", "200", "--out", str(out)]) == 0
    ours, ref = unigram.load(out), Tokenizer.from_file(str(out))
    text = "To be, or not to be: that is the question. 語"
    assert unigram.encode_text(ours, text) == ref.encode(text).ids
    assert unigram.detokenize(ours.decode(ref.encode(text).ids)) == ref.decode(ref.encode(text).ids, skip_special_tokens=False)
    assert unigram.main(["encode", "--tokenizer", str(out), "--alpha", "0.1", text]) == 0
    assert "question" in capsys.readouterr().out
    assert unigram.main(["encode", "--tokenizer", str(tmp_path / "missing.json"), "x"]) == 2
