"""tokenizer.py: specs (gpt2, char:, chat:, a bpe.py file, a tokenizer.json), GPT-2's encoding built
from the shipped files == tiktoken's (and nothing written to any cache), the merges of a tiktoken
encoding recovered, Hugging Face tokenizer.json read and written == `tokenizers` token for token,
chat templates == transformers' apply_chat_template, bpe.py's files (trained on a file == on its
text, saved and read, corrupt files refused), the command line (also run as `python bpe.py`)."""

import json
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

import bpe
import sft
import tokenizer
from common import NanoError
from test_bpe import BAD_PATTERNS, EOT, LLAMA3_PATTERN, QWEN2_PATTERN, TRICKY, one_line_error, shakespeare

BASE = " 0123456789:" + string.ascii_lowercase  # ' ' = 0, '0'..'9' = 1..10, ':' = 11, 'a'..'z' = 12..37


# ---- specs -----------------------------------------------------------------------------


def test_tokenizers():
    char = tokenizer.load_tokenizer("char:abc ")
    assert char.encode("ab c") == [0, 1, 3, 2] and char.decode([2, 1]) == "cb" and char.vocab_size == 4
    tok = tokenizer.load_tokenizer("gpt2")
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    with pytest.raises(NanoError, match="neither"):
        tokenizer.load_tokenizer("no/such/tokenizer.bpe")


def test_gpt2_encoding_is_tiktokens_and_writes_nothing(tmp_path, monkeypatch, tiktoken_gpt2):
    """"gpt2" is tiktoken's encoding built from the shipped encoder.json: the same ids as
    tiktoken.get_encoding("gpt2") on all of Shakespeare, and no file written to tiktoken's cache
    (tiktoken caches a local file under the sha1 of its path: litter in the work tree)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokenizer.tiktoken_encoding.cache_clear()
    assets = sorted(tokenizer.TIKTOKEN_CACHE.iterdir())
    enc = tokenizer.tiktoken_encoding("gpt2")
    text = shakespeare()
    assert enc.encode(text) == tiktoken_gpt2.encode(text) and enc.n_vocab == tiktoken_gpt2.n_vocab == 50257
    assert enc.encode(EOT, allowed_special="all") == [50256]
    assert list(tmp_path.iterdir()) == [] and sorted(tokenizer.TIKTOKEN_CACHE.iterdir()) == assets


def test_load_bpe_reads_every_byte_level_spec(tmp_path, gpt2, small):
    assert tokenizer.load_bpe("gpt2").merges == gpt2.merges
    tokenizer.save_bpe(small, tmp_path / "small.bpe")
    tokenizer.save_tokenizer_json(small, tmp_path / "small.json")
    for spec in ("small.bpe", "small.json"):
        assert tokenizer.load_bpe(str(tmp_path / spec)).vocab == small.vocab
    with pytest.raises(NanoError, match="neither a file nor a tiktoken encoding name"):
        tokenizer.load_bpe("nope")


def test_the_train_py_contract(tmp_path):
    """train.py trains and saves with these calls; tokenizer.load_tokenizer reads the file."""
    src = tmp_path / "input.txt"
    src.write_text(shakespeare()[:50_000], encoding="utf-8")
    vocab, merges = bpe.train_bpe(src.read_text(encoding="utf-8"), 400, special_tokens=(EOT,))
    assert len(vocab) == 400 and len(merges) == 400 - 256 - 1
    tokenizer.save_bpe(bpe.Tokenizer(vocab, merges, (EOT,)), tmp_path / "tok.bpe")
    tok = tokenizer.read_bpe(tmp_path / "tok.bpe")
    assert tok.vocab_size == 400 and tok.eot_id == 399
    assert tok.encode("to be" + EOT, allowed_special="all")[-1] == 399
    wrapped = tokenizer.load_tokenizer(str(tmp_path / "tok.bpe"))
    assert wrapped.vocab_size == 400 and wrapped.eot_id == 399
    ids = wrapped.encode("To be, or not" + EOT)
    assert ids[-1] == 399 and wrapped.decode(ids) == "To be, or not" + EOT
    tokenizer.save_tokenizer_json(tok, tmp_path / "tokenizer.json")  # a .json spec is a tokenizer.json
    from_json = tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (from_json.vocab_size, from_json.eot_id) == (400, 399) and from_json.encode("To be, or not" + EOT) == ids


# ---- bpe.py's files: trained on a file, saved, read ---------------------------------------


def test_file_training_equals_text_training(tmp_path):
    docs = shakespeare()[:300_000].split("\n\n")
    text = EOT.join(docs)
    path = tmp_path / "docs.txt"
    path.write_text(text, encoding="utf-8")
    bounds = tokenizer.find_chunk_boundaries(path, [EOT], chunk_bytes=40_000)
    raw = path.read_bytes()
    assert len(bounds) > 4 and bounds[0] == 0 and bounds[-1] == len(raw)
    assert all(raw[b:b + len(EOT)] == EOT.encode() for b in bounds[1:-1])
    serial = bpe.count_text_pretokens(text, [EOT])
    assert tokenizer.count_file_pretokens(path, [EOT], num_workers=2, chunk_bytes=40_000) == serial
    assert tokenizer.count_file_pretokens(str(path), [EOT], num_workers=1, chunk_bytes=40_000) == serial
    assert EOT not in serial and "<|" not in serial
    assert tokenizer.train_bpe_file(path, 400, [EOT], num_workers=1) == bpe.train_bpe(text, 400, [EOT])


def test_empty_or_missing_training_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(bpe.BPEError) as e:
        tokenizer.train_bpe_file(tmp_path / "empty.txt", 300)
    assert "empty" in one_line_error(e)
    with pytest.raises(NanoError) as e:
        tokenizer.train_bpe_file(tmp_path / "missing.txt", 300)
    assert "not found" in one_line_error(e)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(NanoError) as e:
        tokenizer.train_bpe_file(tmp_path / "latin1.txt", 300, num_workers=1)
    assert "not UTF-8" in one_line_error(e)


def test_save_read(tmp_path, gpt2, small):
    text = shakespeare()[-5000:] + "".join(TRICKY)
    for name, tok in (("small.bpe", small), ("gpt2.bpe", gpt2)):
        path = tmp_path / name
        tokenizer.save_bpe(tok, path)
        lines = path.read_text(encoding="utf-8").split("\n")
        assert lines[0] == tokenizer.FILE_VERSION
        vocab_listing = path.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
        assert len(vocab_listing) == len(tok.vocab)
        loaded = tokenizer.read_bpe(path)
        assert loaded.merges == tok.merges and loaded.vocab == tok.vocab
        assert loaded.special_tokens == tok.special_tokens and loaded.pattern == tok.pattern
        assert loaded.eot_id == tok.eot_id and loaded.vocab_size == tok.vocab_size
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
        assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]


def test_corrupt_tokenizer_file(tmp_path, small):
    good = tmp_path / "good.bpe"
    tokenizer.save_bpe(small, good)
    lines = good.read_text(encoding="utf-8").split("\n")
    cases = {
        "garbage": "this is not a tokenizer\n",
        "version": "\n".join(["nanollm-bpe v9"] + lines[1:]),
        "truncated": "\n".join(lines[:-20]),
        "bad merge": "\n".join(lines[:-3] + ["Ġ", lines[-2]]),
        "bad bytes": "\n".join(line if not line.startswith("bytes") else "bytes 1 2 3" for line in lines),
        "bad merge line": "\n".join(lines[:-2] + ["a b c 999", ""]),
        "not the alphabet": "\n".join(lines[:-2] + ["a\x01 b 999", ""]),
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.bpe"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(NanoError) as e:
            tokenizer.read_bpe(path)
        one_line_error(e)
    (tmp_path / "binary.bpe").write_bytes(bytes(range(256)))
    with pytest.raises(NanoError) as e:
        tokenizer.read_bpe(tmp_path / "binary.bpe")
    one_line_error(e)
    with pytest.raises(NanoError) as e:
        tokenizer.read_bpe(tmp_path / "missing.bpe")
    assert "not found" in one_line_error(e)


# ---- chat tokens and templates ---------------------------------------------------------


def test_chat_tokens_follow_the_base_vocabulary():
    tok = tokenizer.ChatTokenizer(tokenizer.load_tokenizer("char:" + BASE))
    assert tok.special == {"<|system|>": 38, "<|user|>": 39, "<|assistant|>": 40, "<|end|>": 41}
    assert tok.vocab_size == 42 and tok.eot_id == 41 and tok.spec == "chat:char:" + BASE
    again = tokenizer.load_tokenizer(tok.spec)  # the spec a checkpoint records loads the same tokenizer
    assert again.special == tok.special and again.encode("<|user|>add 1") == tok.encode("<|user|>add 1")


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_LIKE = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\n\n"
               "Today is ' + 'x' + '<|eot_id|>' }}{% endif %}{% for message in messages %}"
               "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
               "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


class SpecialCharTokenizer:
    """Characters, plus whole special-token strings as single ids (what a HF tokenizer does)."""

    def __init__(self, specials):
        self.specials = list(specials)
        self.vocab_size, self.eot_id, self.spec = 256 + len(self.specials), None, "toy"

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            for k, s in enumerate(self.specials):
                if text.startswith(s, i):
                    ids.append(256 + k)
                    i += len(s)
                    break
            else:
                ids.append(ord(text[i]) % 256)
                i += 1
        return ids

    def decode(self, ids):
        return "".join(self.specials[i - 256] if i >= 256 else chr(i) for i in ids)


@pytest.mark.parametrize("source, specials", [
    (CHATML, ["<|im_start|>", "<|im_end|>"]),
    (LLAMA3_LIKE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
])
def test_hf_template_renders_like_transformers(source, specials, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference for chat templates")
    tokenizers = pytest.importorskip("tokenizers")
    eos = "<|im_end|>" if "im_end" in specials[1] else "<|eot_id|>"
    bos = "" if "im_end" in specials[1] else "<|begin_of_text|>"
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos or None)
    hf.chat_template = source
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": source, "eos_token": eos, "bos_token": {"content": bos} if bos else None}))
    template = tokenizer.HFChatTemplate.find(str(tmp_path / "tokenizer.json"))
    toy = SpecialCharTokenizer(specials)
    convs = [[{"role": "user", "content": "héllo \"wörld\" <b>"}, {"role": "assistant", "content": " ça va "}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 2 3"},
              {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4 4?"},
              {"role": "assistant", "content": "8"}]]
    for messages in convs:
        for gen in (False, True):
            assert template.text(messages, gen) == hf.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=gen)
            # what serve.py generates from: the same text, tokenized once (sft.py trains on the same ids)
            prompt = tokenizer.apply_chat_template(messages, toy, template, add_generation_prompt=gen)
            assert toy.decode(prompt) == template.text(messages, gen)
            assert prompt == sft.render_conversation(messages, toy, gen, template)[0]
        ids, mask = sft.render_conversation(messages, toy, template=template)
        assert toy.decode(ids) == template.text(messages)
        learned = "".join(toy.decode([i]) for i, m in zip(ids, mask) if m)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if source is CHATML:
            assert learned == "".join(a + "<|im_end|>\n" for a in answers)
        else:
            assert learned == "".join(a.strip() + "<|eot_id|>" for a in answers)
        assert tokenizer.stop_id(toy, template) == 256 + specials.index(eos)


def test_hf_template_errors_are_nano_errors(tmp_path):
    with pytest.raises(NanoError, match="refuses this conversation: bad role"):
        tokenizer.HFChatTemplate(LLAMA3_LIKE).text([{"role": "tool", "content": "x"}])
    with pytest.raises(NanoError, match="does not parse"):
        tokenizer.HFChatTemplate("{% for m in messages %}")
    assert tokenizer.HFChatTemplate.find("gpt2") is None and tokenizer.HFChatTemplate.find("chat:gpt2") is None


# ---- the formats of others: tiktoken, Hugging Face tokenizer.json ----------------------


def test_from_tiktoken_rebuilds_gpt2_merges(gpt2, tiktoken_gpt2):
    rebuilt = tokenizer.bpe_from_tiktoken(tiktoken_gpt2)
    assert rebuilt.merges == gpt2.merges and rebuilt.vocab == gpt2.vocab
    assert rebuilt.special_tokens == gpt2.special_tokens == {EOT: 50256}


def test_from_tiktoken_cl100k():
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the reference")
    try:
        enc = tiktoken.get_encoding("cl100k_base")
    except Exception as e:  # noqa: BLE001 (no cached files and no network)
        pytest.skip(f"cl100k_base not available offline ({type(e).__name__})")
    tok = tokenizer.bpe_from_tiktoken(enc)
    text = shakespeare()[:200_000]
    assert tok.encode(text) == enc.encode(text)
    for s in TRICKY:
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), s


SPECIALS = [EOT, "<|im_start|>", "<|im_end|>", "<|reserved_special_token_0|>"]
HARD = [
    ("  Hello,  wörld!!  It's we've THEY'LL they'Re 1234567 3.14159 ٣٤٥ ²³ 0x1F\n\n\tdef f(x):\n"
     "        return x**2  # café\u0301 vs caf\u00e9\r\n"),
    "日本語のテキスト، مرحبا بالعالم Καλημέρα привет 👋🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ﬁne",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>ok</think>The   end.   \n \n",
    "<|endoftext|><|endoftext|> <|endoftext <|im_start|x a<|endoftext|>b   \u3000\u00a0\u2028 \x1c\x00\x7f\t\t",
    "       ", "\n", "x", "",
]


def hf_tokenizer(tmp_path, name, pre_tokenizer, normalizer=None, vocab_size=700, ignore_merges=False):
    """A byte-level BPE trained by `tokenizers` on Shakespeare + the hard texts, with special
    tokens and one non-special added token (Qwen3's <think>), saved as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is the reference for tokenizer.json")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([shakespeare()[:200_000], *HARD * 5], trainer)
    tok.add_tokens(["<think>", "</think>"])
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = ignore_merges
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return tokenizers.Tokenizer.from_file(str(path)), path


def hf_pipelines():
    pytest.importorskip("tokenizers", reason="HF tokenizers is the reference for tokenizer.json")
    from tokenizers import Regex, normalizers
    from tokenizers import pre_tokenizers as pt

    def split_then_bytes(pattern):
        return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated"), pt.ByteLevel(add_prefix_space=False,
                                                                                          use_regex=False)])
    return {  # the pipelines of those models' tokenizer.json files; the last one exercises add_prefix_space
        "gpt2": {"pre_tokenizer": pt.ByteLevel(add_prefix_space=False)},
        "llama3": {"pre_tokenizer": split_then_bytes(LLAMA3_PATTERN), "ignore_merges": True},
        "qwen2": {"pre_tokenizer": split_then_bytes(QWEN2_PATTERN), "normalizer": normalizers.NFC()},
        "smollm": {"pre_tokenizer": pt.Sequence([pt.Digits(individual_digits=True),
                                                 pt.ByteLevel(add_prefix_space=False)])},
        "prefix_space": {"pre_tokenizer": pt.Sequence([pt.Digits(individual_digits=False),
                                                       pt.ByteLevel(add_prefix_space=True)])},
    }


def assert_same_as_hf(ours, hf, texts):
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == expected, text
        assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=False), text
    hf.encode_special_tokens = True  # special tokens as plain text; added ones still match
    try:
        for text in texts:
            assert ours.encode(text, allowed_special="none") == hf.encode(text, add_special_tokens=False).ids, text
    finally:
        hf.encode_special_tokens = False


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2", "smollm", "prefix_space"])
def test_tokenizer_json_gives_the_ids_of_hf_tokenizers(tmp_path, kind):
    hf, path = hf_tokenizer(tmp_path, kind, **hf_pipelines()[kind])
    ours = tokenizer.bpe_from_tokenizer_json(path)
    assert ours.vocab_size == hf.get_vocab_size() and ours.eot_id == hf.token_to_id(EOT)
    assert set(ours.special_tokens) == set(SPECIALS) and set(ours.added_tokens) == {"<think>", "</think>"}
    assert_same_as_hf(ours, hf, HARD + TRICKY[:-1] + [shakespeare()[-30_000:]])
    if kind != "prefix_space":  # streaming cannot know where a text begins
        text = "".join(HARD) * 3
        chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
        assert list(ours.encode_iterable(chunks, allowed_special="all", min_chars=50)) == \
            hf.encode(text, add_special_tokens=False).ids


def test_gpt2_tokenizer_json_from_openai_files_equals_tiktoken(tmp_path, tiktoken_gpt2, gpt2):
    """GPT-2's tokenizer.json as `tokenizers` builds it from OpenAI's files (as HF's gpt2
    repository ships it): read into a bpe.Tokenizer, the same ids as tiktoken and as `tokenizers`."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is the reference for tokenizer.json")
    from tokenizers import decoders, models, pre_tokenizers

    encoder = json.loads(tokenizer.GPT2_ENCODER_JSON.read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in tokenizer.GPT2_VOCAB_BPE.read_text(encoding="utf-8").splitlines()[1:] if line]
    hf = tokenizers.Tokenizer(models.BPE(encoder, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = tokenizer.load_bpe(str(tmp_path / "tokenizer.json"))
    assert ours.vocab == gpt2.vocab and ours.merges == gpt2.merges and ours.eot_id == 50256
    assert ours.pattern == bpe.GPT2_PATTERN and not ours.ignore_merges
    text = shakespeare()[:100_000]
    assert ours.encode(text) == tiktoken_gpt2.encode(text) == hf.encode(text).ids
    assert_same_as_hf(ours, hf, HARD + TRICKY[:-1])


def test_written_tokenizer_json_loads_in_hf_tokenizers(tmp_path, gpt2, small):
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is the reference for tokenizer.json")
    text = shakespeare()[:30_000] + "".join(TRICKY[:-1]) * 5 + "".join(HARD)
    vocab, merges = bpe.train_bpe(text, 600, special_tokens=SPECIALS, pattern=bpe.GPT4_PATTERN)
    gpt4 = bpe.Tokenizer(vocab, merges, SPECIALS, bpe.GPT4_PATTERN)
    for name, tok in (("gpt2", gpt2), ("small", small), ("gpt4", gpt4)):
        path = tmp_path / f"{name}.json"
        tokenizer.save_tokenizer_json(tok, path)
        hf = tokenizers.Tokenizer.from_file(str(path))
        assert_same_as_hf(tok, hf, HARD + TRICKY[:-1] + ["1234567890 12345", text])
        again = tokenizer.bpe_from_tokenizer_json(path)  # and back: the same tokenizer
        assert (again.vocab, again.merges, again.special_tokens) == (tok.vocab, tok.merges, tok.special_tokens)
        assert again.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    # Oniguruma reads GPT-4's possessive \p{N}{1,3}+ as (\p{N}{1,3})+, any run of digits: written
    # as an atomic group; a file that has it raw is read as Oniguruma reads it
    assert tokenizer.to_onig(bpe.GPT4_PATTERN).count(r"(?>\p{N}{1,3})") == 1
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = bpe.GPT4_PATTERN
    path.write_text(json.dumps(spec), encoding="utf-8")
    hf, raw = tokenizers.Tokenizer.from_file(str(path)), tokenizer.bpe_from_tokenizer_json(path)
    assert raw.pattern.count(r"(?:\p{N}{1,3})+") == 1
    assert_same_as_hf(raw, hf, ["1234567890 12345", *HARD])
    def pieces(tok, text):
        return bpe.split_isolated(bpe.compile_pattern(tok.pattern), text)

    assert pieces(raw, "1234567") == ["1234567"] and pieces(gpt4, "1234567") == ["123", "456", "7"]


# ---- SentencePiece-style tokenizer.json (Llama 2, Mistral, TinyLlama, Gemma) --------------
# The fixture is built offline: a sentencepiece BPE model with byte_fallback trained on Tiny
# Shakespeare, its vocabulary and merges converted by transformers' convert_slow_tokenizer
# (SpmConverter), then written in the shapes those repositories' tokenizer.json files have.

SP_TEXTS = HARD + TRICKY[:-1] + ["KING RICHARD:\n  What say'st thou?  \n\n", " [INST] hi [/INST] ok</s>",
                                 "<s>[INST] é 日本 [/INST]", "\u0000\u00ff\U0001F600 \u2581 ▁▁x"]
SP_SHAPES = {  # normalizer, pre_tokenizer, decoder steps after ByteFallback/Fuse
    "llama2": (["Prepend", "Replace"], None, True),  # Llama 2, Mistral 7B v0.1, TinyLlama (legacy)
    "metaspace_first": ([], ("first", False), True),  # Mistral v0.3 and newer conversions
    "gemma": (["Replace"], None, False),  # no word-start mark in front
    "metaspace_split": ([], ("always", True), True),  # older files: words split before each ▁
}


@pytest.fixture(scope="module")
def sp_base(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    prefix = tmp_path_factory.mktemp("sp") / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shakespeare()[:100_000].split("\n")), model_prefix=str(prefix),
                                   model_type="bpe", vocab_size=800, byte_fallback=True, character_coverage=1.0,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    proto = convert.import_protobuf().ModelProto()
    proto.ParseFromString(Path(f"{prefix}.model").read_bytes())
    converted = convert.SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)})
    return converted, json.loads(converted.to_str())["model"]


def sp_tokenizer(path, base, shape, byte_fallback=True):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, normalizers, pre_tokenizers

    norms, meta, strip = SP_SHAPES[shape]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(
        base["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in base["merges"]],
        unk_token="<unk>", fuse_unk=True, byte_fallback=byte_fallback))
    steps = {"Prepend": normalizers.Prepend("▁"), "Replace": normalizers.Replace(" ", "▁")}
    if norms:
        hf.normalizer = normalizers.Sequence([steps[n] for n in norms])
    if meta:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=meta[0], split=meta[1])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + [decoders.Strip(" ", 1, 0)] * strip)
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.add_tokens([tokenizers.AddedToken("<think>", normalized=False)])
    hf.save(str(path))
    return hf


@pytest.mark.parametrize("shape", SP_SHAPES)
def test_sentencepiece_tokenizer_json_gives_the_ids_of_hf_tokenizers(tmp_path, sp_base, shape):
    hf = sp_tokenizer(tmp_path / "tokenizer.json", sp_base[1], shape)
    tok = tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == hf.get_vocab_size() and tok.eot_id == hf.token_to_id("</s>")
    for text in SP_TEXTS + [shakespeare()[-20_000:]]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids, text
        if "\ufffd" not in hf.decode(ids, skip_special_tokens=False):
            assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), text


def test_sentencepiece_converted_file_and_unknown_characters(tmp_path, sp_base):
    """The converter's own output (Replace normalizers, one a regex; Metaspace always) and, without
    byte fallback, <unk> for unknown characters, runs of them fused into one."""
    converted, base = sp_base
    converted.save(str(tmp_path / "tokenizer.json"))
    ours = tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json"))
    for text in SP_TEXTS:
        assert ours.encode(text) == converted.encode(text, add_special_tokens=False).ids, text
    hf = sp_tokenizer(tmp_path / "unk.json", base, "llama2", byte_fallback=False)
    ours = tokenizer.load_tokenizer(str(tmp_path / "unk.json"))
    for text in SP_TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert ours.encode("日本語") == [hf.token_to_id("▁"), hf.token_to_id("<unk>")]


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_unigram_tokenizer_json_gives_the_ids_of_hf_tokenizers(tmp_path, byte_fallback):
    """A T5-style file: a sentencepiece Unigram model trained here (offline) on Tiny Shakespeare,
    its scored pieces in a `tokenizers` Unigram model behind a Metaspace pre-tokenizer, with the
    special and added tokens such files carry."""
    spm = pytest.importorskip("sentencepiece")
    tokenizers = pytest.importorskip("tokenizers")
    prefix = tmp_path / "uni"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shakespeare()[:100_000].split("\n")), model_prefix=str(prefix),
                                   model_type="unigram", vocab_size=600, byte_fallback=byte_fallback,
                                   character_coverage=1.0, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    hf = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, sp.unk_id(), byte_fallback))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    hf.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(),
                                               tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.add_tokens([tokenizers.AddedToken("<think>", normalized=False)])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json"))
    for text in SP_TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
        if byte_fallback:
            assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False).ids,
                                                               skip_special_tokens=False), text


def test_tokenizer_json_of_another_kind_is_one_line_error(tmp_path):
    base = {"version": "1.0", "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(tokenizer.bytes_to_unicode().values())},
                      "merges": []}}
    sentencepiece = {**base, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"},
                     "normalizer": {"type": "Lowercase"}, "model": {**base["model"], "byte_fallback": True}}
    cases = {
        "SentencePiece-style BPE": sentencepiece,
        "WordPiece tokenizer": {**base, "model": {"type": "WordPiece", "vocab": {}}},
        "Whitespace": {**base, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Whitespace"}, base["pre_tokenizer"]]}},
        "normalizer Lowercase": {**base, "normalizer": {"type": "Lowercase"}},
        "lstrip": {**base, "added_tokens": [{"id": 256, "content": "<mask>", "lstrip": True, "special": True}]},
        "byte alphabet": {**base, "model": {**base["model"], "vocab": {**base["model"]["vocab"], "a b": 256}}},
        "malformed": {**base, "model": {**base["model"], "merges": ["Ġ"]}},
        "malformed tokenizer.json": {**base, "added_tokens": [{"content": "<|x|>", "special": True}]},
    }
    for says, spec in cases.items():
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        with pytest.raises(NanoError) as e:
            tokenizer.bpe_from_tokenizer_json(path)
        assert says in one_line_error(e), says
    path.write_text("{not json", encoding="utf-8")
    for bad in (path, tmp_path / "missing.json"):
        with pytest.raises(NanoError) as e:
            tokenizer.bpe_from_tokenizer_json(bad)
        one_line_error(e)
    path.write_text(json.dumps(base), encoding="utf-8")
    tok = tokenizer.bpe_from_tokenizer_json(path)  # the minimal byte-level file is fine
    assert tok.decode(tok.encode("hi ü")) == "hi ü" and len(tok.encode("hi ü")) == 5
    with pytest.raises(NanoError) as e:  # a pipeline the .bpe format cannot hold
        tokenizer.save_bpe(tokenizer.bpe_from_tokenizer_json(path), tmp_path / "x.bpe")
    assert "save_tokenizer_json" in one_line_error(e)


# ---- command line --------------------------------------------------------------------


def cli_error(capsys, argv) -> str:
    """tokenizer.main(argv) must stop with exit status 2 and one `error:` line on stderr: returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tokenizer.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize("pattern, says", BAD_PATTERNS)
def test_train_cli_refuses_bad_split_patterns(tmp_path, capsys, pattern, says):
    src = tmp_path / "input.txt"
    src.write_text("hello foo world\n" * 50, encoding="utf-8")
    out = tmp_path / "tok.bpe"
    assert says in cli_error(capsys, ["train", "--input", str(src), "--out", str(out), "--pattern", pattern,
                                       "--num_workers", "1"])
    assert not out.exists()


def test_bpe_py_runs_this_command_line(capsys):
    """`python bpe.py encode ...` (the README's command) prints what tokenizer.main does."""
    tokenizer.main(["encode", "Hello world"])
    ran = subprocess.run([sys.executable, "bpe.py", "encode", "Hello world"], cwd=Path(tokenizer.__file__).parent,
                         capture_output=True, text=True, check=True)
    assert ran.stdout == capsys.readouterr().out and ran.stdout.startswith("[15496, 995]")


def test_cli(tmp_path, capsys):
    src = tmp_path / "input.txt"
    src.write_text(shakespeare()[:30_000], encoding="utf-8")
    out = tmp_path / "tok.bpe"
    tokenizer.main(["train", "--input", str(src), "--vocab_size", "300", "--out", str(out), "--num_workers", "1"])
    assert "trained 43 merges" in capsys.readouterr().out
    assert tokenizer.read_bpe(out).vocab_size == 300 and out.with_suffix(".vocab").is_file()
    for out_dir in (tmp_path, tmp_path / "no" / "tok.bpe"):  # checked before training
        assert cli_error(capsys, ["train", "--input", str(src), "--out", str(out_dir)]).startswith("error: --out")
    assert "not found" in cli_error(capsys, ["train", "--input", str(tmp_path / "missing.txt")])
    tokenizer.main(["encode", "--tokenizer", str(out), "First Citizen"])
    ids_line, _pieces, _ = capsys.readouterr().out.splitlines()
    assert tokenizer.read_bpe(out).decode(json.loads(ids_line)) == "First Citizen"
    tokenizer.main(["compare", "--input", str(src), "--tokenizer", str(out), "--reference", "gpt2"])
    report = capsys.readouterr().out
    assert "tokens/byte" in report and str(out) in report and "gpt2: vocab 50,257" in report
    tokenizer.save_tokenizer_json(tokenizer.read_bpe(out), tmp_path / "tokenizer.json")  # a .json is a tokenizer.json
    tokenizer.main(["encode", "--tokenizer", str(tmp_path / "tokenizer.json"), "First Citizen"])
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == json.loads(ids_line)
    tokenizer.main(["encode", "Hello world"])  # gpt2, the default
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == [15496, 995]
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    for argv, says in ((["encode", "--file", str(tmp_path / "latin1.txt")], "error: cannot read .* as UTF-8"),
                       (["encode", f"a{EOT}"], "error: the text contains the special token")):
        with pytest.raises(SystemExit) as e:
            tokenizer.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and re.match(says, err), err
