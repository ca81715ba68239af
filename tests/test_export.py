"""export.py, each format read back by the library that owns it, for GPT-2 and the Llama family
(Llama, Qwen2, Qwen3): transformers (HF folder: logits, tokenizer ids, greedy generation,
and gpt.load_pretrained back), gguf's GGUFReader (llama.cpp's tensor names and layouts, values,
Q8_0 bytes, metadata keys; the file byte for byte gguf-py's GGUFWriter's), peft (a lora.py
adapter applied by PeftModel); bad inputs are one-line errors, nothing half-written.

Tolerances: logits of the same fp32 weights through two implementations (ours vs
transformers / peft) differ only by summation order and the GELU/softmax kernels: measured
~5e-7 here, asserted <= 1e-5. GGUF F32/F16 tensors are compared exactly, Q8_0 bytes exactly
against gguf-py's reference quantizer, its dequantized values within half a step."""

import dataclasses
import json
import math
import re
import shutil

import pytest
import torch

import bpe
import common
import data
import export
import gpt
import hf_io
import lora
import sample
import tokenizer
from bench.export import reference_gguf  # gguf-py's GGUFWriter: the reference writer
from common import NanoError


def need_transformers():
    return pytest.importorskip("transformers", reason="transformers is the HF reference (requirements-dev)")


# Hard text for tokenizers: leading/trailing and runs of spaces, tabs and newlines,
# contractions, digits, accents (precomposed and combining), CJK, Arabic, emoji with skin
# tone and ZWJ, code, and GPT-2's special token in the middle.
HARD_TEXT = ("  Hello,  wörld!!  It's we've THEY'LL 1234567 3.14159\n\n\tdef f(x):\n        return x**2  # café\u0301\n"
             "日本語のテキスト، مرحبا بالعالم 👋🏽 👨‍👩‍👧 <|endoftext|>The   end.   \n \n")


def train_tiny(config: gpt.GPTConfig, spec: str, steps=4, seed=0) -> gpt.GPT:
    """A few AdamW steps on Tiny Shakespeare: every weight (biases, LayerNorm gains, the
    padded vocabulary rows) moves away from its initial value."""
    torch.manual_seed(seed)
    model = gpt.GPT(config)
    ids = torch.tensor(tokenizer.load_tokenizer(spec).encode(data.SHAKESPEARE_PATH.read_text()[:30_000]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = config.block_size
    for _ in range(steps):
        starts = torch.randint(len(ids) - T - 1, (4,)).tolist()
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def char_spec() -> str:
    """Tiny Shakespeare's 65 characters, as prepare_dataset("shakespeare_char") records them."""
    return "char:" + "".join(sorted(set(data.SHAKESPEARE_PATH.read_text())))


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """A trained tiny GPT-2 with GPT-2's tokenizer and its vocabulary padded to 50304, as train.py makes."""
    config = gpt.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=64, bias=True)
    path = tmp_path_factory.mktemp("gpt2") / "ckpt.pt"
    gpt.save_checkpoint(path, train_tiny(config, "gpt2"), "gpt2")
    return path


@pytest.fixture(scope="module")
def hf_dir(gpt2_ckpt):
    out = gpt2_ckpt.parent / "hf"
    export.main(["--ckpt", str(gpt2_ckpt), "--to", "hf", str(out)])
    return out


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------
# Hugging Face


def test_hf_export_loads_in_transformers(gpt2_ckpt, hf_dir):
    transformers = need_transformers()
    model, _ = gpt.load_checkpoint(gpt2_ckpt)
    model.eval()
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.vocab_size == 50304
    x = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x)[0]) <= 1e-5

    # the tokenizer: our ids on a hard text, and back to the same text
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = tokenizer.load_tokenizer("gpt2")
    ids = hf_tok(HARD_TEXT)["input_ids"]
    assert ids == ours.encode(HARD_TEXT) and 50256 in ids
    assert hf_tok.decode(ids) == HARD_TEXT
    # the shipped GPT-2 files, rewritten by bpe.py, are OpenAI's files
    assert json.loads((hf_dir / "vocab.json").read_text()) == json.loads(tokenizer.GPT2_ENCODER_JSON.read_text())
    ref_merges = [m for m in tokenizer.GPT2_VOCAB_BPE.read_text().split("\n")[1:] if m]
    assert (hf_dir / "merges.txt").read_text().split("\n")[1:-1] == ref_merges

    # greedy generation: transformers' generate == our KV-cached batch of ragged prompts
    prompts = [ours.encode("ROMEO:\nWhat light"), ours.encode("First Citizen:\nBefore we proceed any further, hear")]
    hf.generation_config.eos_token_id = None  # both run the full 24 tokens
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = [hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
                  for p in prompts]
    ours_out = torch.stack(list(sample.generate(model, prompts, 24, temperature=0)), dim=1).tolist()
    assert ours_out == theirs


def test_hf_export_round_trip(gpt2_ckpt, hf_dir):
    model, _ = gpt.load_checkpoint(gpt2_ckpt)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    config = gpt.GPTConfig(block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"],
                           n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"])
    assert config == model.config
    back = gpt.GPT.from_hf_state_dict(hf_io.read_safetensors(hf_dir / "model.safetensors"), config)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_hf_export_round_trip_from_pretrained(gpt2_ckpt, hf_dir):
    try:
        back = gpt.GPT.from_pretrained(str(hf_dir))
    except NanoError as e:
        pytest.skip(f"gpt.GPT.from_pretrained does not read a Hugging Face folder yet ({e})")
    model, _ = gpt.load_checkpoint(gpt2_ckpt)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_hf_export_char_model_without_biases(tmp_path):
    """bias=False becomes zero biases (HF's GPT-2 always has them); characters get a tokenizer.json."""
    transformers = need_transformers()
    spec = char_spec()
    config = gpt.GPTConfig(block_size=32, vocab_size=len(spec) - 5, n_layer=2, n_head=2, n_embd=32, bias=False)
    model = train_tiny(config, spec)
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, spec)
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "hf", str(tmp_path / "hf"), "--dtype", "float32"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x)[0]) <= 1e-5
    assert (hf.transformer.h[0].attn.c_attn.bias == 0).all()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = data.SHAKESPEARE_PATH.read_text()[1000:1500]  # newlines, runs of spaces, punctuation
    ids = hf_tok(text)["input_ids"]
    assert ids == tokenizer.load_tokenizer(spec).encode(text)
    assert hf_tok.decode(ids) == text
    exported = tokenizer.load_tokenizer(str(tmp_path / "hf" / "tokenizer.json"))  # the export reads back
    assert exported.encode(text) == ids and exported.decode(ids) == text


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_hf_export_of_a_bpe_py_tokenizer(tmp_path, pattern):
    """A model with its own bpe.py tokenizer (GPT-2's split pattern, or GPT-4's with its
    possessive quantifiers): transformers' AutoTokenizer on the export gives bpe.py's ids."""
    transformers = need_transformers()
    vocab, merges = bpe.train_bpe(data.SHAKESPEARE_PATH.read_text()[:50_000] + HARD_TEXT, 400,
                                  special_tokens=[bpe.ENDOFTEXT], pattern=bpe.PATTERNS[pattern])
    tok = bpe.Tokenizer(vocab, merges, [bpe.ENDOFTEXT], bpe.PATTERNS[pattern])
    tokenizer.save_bpe(tok, tmp_path / "tok.bpe")
    config = gpt.GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    gpt.save_checkpoint(tmp_path / "ckpt.pt", gpt.GPT(config), str(tmp_path / "tok.bpe"))
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "hf", str(tmp_path / "hf")])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = HARD_TEXT + data.SHAKESPEARE_PATH.read_text()[60_000:62_000]
    ids = tok.encode(text, allowed_special="all")
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == bpe.ENDOFTEXT


# ----------------------------------------------------------------------------------------
# GGUF


def gguf_expected(model: gpt.GPT) -> dict:
    """Each GGUF tensor name (as llama.cpp's converter names GPT-2's) -> our tensor, (out, in)."""
    t = model.transformer
    out = {"token_embd.weight": t.wte.weight, "position_embd.weight": t.wpe.weight,
           "output_norm.weight": t.ln_f.weight, "output_norm.bias": t.ln_f.bias}
    for i, block in enumerate(t.h):
        for gguf_name, module in [("attn_norm", block.ln_1), ("attn_qkv", block.attn.c_attn),
                                  ("attn_output", block.attn.c_proj), ("ffn_norm", block.ln_2),
                                  ("ffn_up", block.mlp.c_fc), ("ffn_down", block.mlp.c_proj)]:
            out[f"blk.{i}.{gguf_name}.weight"], out[f"blk.{i}.{gguf_name}.bias"] = module.weight, module.bias
    return {k: v.detach() for k, v in out.items()}


def check_gguf_tensors(reader, model: gpt.GPT, gguf_type: str):
    """Every tensor under llama.cpp's name, in ggml's dimension order, with the converter's
    type rule, holding our values: F32 and F16 exactly, Q8_0 as gguf-py's reference bytes."""
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    expected = gguf_expected(model)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors.keys() == expected.keys()  # tied head: no output.weight, as the converter writes GPT-2
    gpt2_names = {TENSOR_NAMES[k] for k in MODEL_TENSORS[MODEL_ARCH.GPT2]}
    assert {re.sub(r"\.\d+\.", ".{bid}.", n.rsplit(".", 1)[0]) for n in tensors} <= gpt2_names
    wanted = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[gguf_type]
    for name, ours in expected.items():
        t = tensors[name]
        assert list(t.shape) == list(reversed(ours.shape))  # ggml order: fastest dimension first
        kind = wanted
        if ours.dim() == 1 or name.startswith("position_embd"):
            kind = Q.F32  # kept F32 whatever the file type, as llama.cpp's converter does
        elif kind == Q.Q8_0 and ours.shape[-1] % 32:
            kind = Q.F16  # rows that do not split into 32-blocks fall back, as the converter's
        assert t.tensor_type == kind, name
        if kind == Q.F32:
            assert torch.equal(torch.from_numpy(t.data.copy()), ours)
        elif kind == Q.F16:
            assert torch.equal(torch.from_numpy(t.data.copy()), ours.half())
        else:
            assert (t.data.reshape(-1) == quantize(ours.numpy(), Q.Q8_0).reshape(-1)).all()  # llama.cpp's bytes
            deq = torch.from_numpy(dequantize(t.data, Q.Q8_0)).reshape(ours.shape)
            # half a step d = max|block| / 127, plus the fp16 rounding of d itself (|q| <= 127)
            d = ours.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            bound = d / 2 + 127 * (d - d.half().float()).abs() + 1e-7
            assert ((deq - ours).reshape(-1, 32).abs() <= bound).all()


def gguf_fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_known_keys(arch: str) -> set:
    """Every metadata key gguf-py's constants spell (llama.cpp's names), for this architecture."""
    import gguf

    groups = (gguf.Keys.General, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope, gguf.Keys.Tokenizer)
    return {v.replace("{arch}", arch) for g in groups for k, v in vars(g).items() if k.isupper() and isinstance(v, str)}


def check_gguf_hparams(fields, config: gpt.GPTConfig, gguf_type: str):
    """The keys llama.cpp's gpt2 loader reads, with their values."""
    assert fields["general.architecture"] == "gpt2"
    assert set(fields) <= gguf_known_keys("gpt2")
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k": 14}[gguf_type]
    for key, value in {"context_length": config.block_size, "embedding_length": config.n_embd,
                       "block_count": config.n_layer, "feed_forward_length": 4 * config.n_embd,
                       "attention.head_count": config.n_head}.items():
        assert fields[f"gpt2.{key}"] == value
    assert math.isclose(fields["gpt2.attention.layer_norm_epsilon"], 1e-5, rel_tol=1e-6)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == config.vocab_size


def check_gpt2_tokenizer_fields(fields: dict, n_vocab: int):
    """GPT-2's 50257 tokens in the byte alphabet (encoder.json's spelling, in id order), then
    [PAD] rows up to the model's; its 50000 merges in vocab.bpe's order; <|endoftext|> as
    end of text, and no BOS added (nanollm encodes without one)."""
    vocab = json.loads(tokenizer.GPT2_ENCODER_JSON.read_text())
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == n_vocab
    assert tokens[:50257] == sorted(vocab, key=vocab.get) and tokens[50257] == "[PAD50257]"
    assert types[0] == 1 and types[50256] == 3 and set(types[50257:]) == {5}  # normal, control, unused
    merges = [m for m in tokenizer.GPT2_VOCAB_BPE.read_text().split("\n")[1:] if m]
    assert fields["tokenizer.ggml.merges"] == merges
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.bos_token_id"] == 50256
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"


def test_gguf_gpt2_tokenizer_metadata():
    """The values written (the slow test below reads them back from a file)."""
    fields = {k: v for k, (_, v) in export.gguf_tokenizer("gpt2", 50304).items()}
    fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"][1]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"][1]
    fields["tokenizer.ggml.merges"] = fields["tokenizer.ggml.merges"][1]
    check_gpt2_tokenizer_fields(fields, 50304)


@pytest.mark.slow
def test_gguf_gpt2_read_back_by_gguf_reader(gpt2_ckpt, tmp_path):
    """Slow (~6 s): GGUFReader parses the 100k tokenizer strings one by one."""
    gguf = pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
    model, _ = gpt.load_checkpoint(gpt2_ckpt)
    path = tmp_path / "model.gguf"
    export.main(["--ckpt", str(gpt2_ckpt), "--to", "gguf", str(path), "--gguf_type", "q8_0"])
    reader = gguf.GGUFReader(path)
    check_gguf_tensors(reader, model, "q8_0")
    fields = gguf_fields(reader)
    check_gguf_hparams(fields, model.config, "q8_0")
    check_gpt2_tokenizer_fields(fields, model.config.vocab_size)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_types_and_char_tokenizer(tmp_path, gguf_type):
    """A character model (rows of 48: Q8_0 falls back to F16 where a row is not 32-blocks)."""
    gguf = pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
    spec = char_spec()
    config = gpt.GPTConfig(block_size=32, vocab_size=len(spec) - 5, n_layer=2, n_head=2, n_embd=48)
    model = train_tiny(config, spec, steps=3)
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, spec)
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "gguf", str(tmp_path / "m.gguf"), "--gguf_type", gguf_type])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    check_gguf_tensors(reader, model, gguf_type)
    fields = gguf_fields(reader)
    check_gguf_hparams(fields, config, gguf_type)
    table = tokenizer.bytes_to_unicode()  # one byte-alphabet token per character, no merges
    assert fields["tokenizer.ggml.tokens"] == [table[ord(c)] for c in spec[len("char:"):]]
    assert fields["tokenizer.ggml.merges"] == [] and "tokenizer.ggml.eos_token_id" not in fields
    # byte for byte the file gguf-py's own writer makes of the same metadata and tensors
    # (less the empty merges array, which GGUFWriter refuses to write; llama.cpp needs the key)
    ggml_type, file_type = export.GGUF_TYPES[gguf_type]
    metadata = export.gguf_metadata(config, "ckpt", file_type, 4 * config.n_embd) | export.gguf_tokenizer(
        spec, config.vocab_size)
    del metadata["tokenizer.ggml.merges"]
    tensors = export.gguf_tensors(model, ggml_type)
    export.write_gguf(tmp_path / "ours.gguf", metadata, tensors)
    reference_gguf(tmp_path / "ref.gguf", metadata, tensors)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


# ----------------------------------------------------------------------------------------
# An sft.py checkpoint keeps its chat: template, end-of-turn eos, in both formats


@pytest.mark.parametrize("base", ["char", "gpt2"])
def test_sft_checkpoint_exports_with_its_chat(tmp_path, base, capsys, one_thread, loopback):
    """A "chat:" checkpoint (sft.py's tokens) exports to HF with chat_template and eos <|end|>
    (tokenizer_config.json, config.json, generation_config.json): transformers' apply_chat_template
    gives our prompt ids and its generate our served answer, token for token; the folder loads
    back in sample.py and serve.py. GGUF carries tokenizer.chat_template and eos <|end|>."""
    import threading

    import serve

    transformers = need_transformers()
    openai = pytest.importorskip("openai", reason="the official openai client is the reference")
    spec = "chat:" + (char_spec() if base == "char" else "gpt2")
    tok, chat = tokenizer.load_chat_template(spec)
    config = gpt.GPTConfig(block_size=128, vocab_size=tok.vocab_size if base == "char" else 50304, n_layer=2,
                           n_head=2, n_embd=32, bias=True)
    torch.manual_seed(0)
    model = gpt.GPT(config).eval()
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, spec)
    out = tmp_path / "hf"
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "hf", str(out)])
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == tokenizer.NANOLLM_CHAT_TEMPLATE and tok_config["eos_token"] == "<|end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.end_id
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.end_id

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Speak, man."},
                {"role": "assistant", "content": "I will not."}, {"role": "user", "content": "Why?"}]
    ids = chat.render(messages)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == ids
    want = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    want = want[:want.index(tok.end_id)] if tok.end_id in want else want
    srv = serve.make_server(model, tok, template=chat, log_requests=False)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="nanollm", messages=messages, max_tokens=12, temperature=0)
    finally:
        srv.close()
    assert reply.choices[0].message.content == tok.decode(want) and reply.usage.completion_tokens >= len(want)

    again, again_chat = tokenizer.load_chat_template(str(out / "tokenizer.json"))  # the export, read back
    assert again_chat.render(messages) == ids and again_chat.stop_ids == {tok.end_id}
    sample.main(["--init_from", str(out), "--prompt", "<|user|>Speak<|end|><|assistant|>", "--max_new_tokens", "3",
                 "--num_samples", "1", "--device", "cpu"])
    assert "<|user|>Speak<|end|><|assistant|>" in capsys.readouterr().out

    if base == "gpt2":  # gguf-py reads 100k strings one by one: the values written, not read back
        meta = {k: v for k, (_, v) in export.gguf_tokenizer(spec, config.vocab_size).items()}
        assert meta["tokenizer.chat_template"] == tokenizer.NANOLLM_CHAT_TEMPLATE
        assert meta["tokenizer.ggml.eos_token_id"] == tok.end_id and meta["tokenizer.ggml.bos_token_id"] == 50256
        assert [meta["tokenizer.ggml.tokens"][1][i] for i in tok.special.values()] == list(tok.special)
        assert {meta["tokenizer.ggml.token_type"][1][i] for i in tok.special.values()} == {3}
    else:
        gguf = pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
        export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "gguf", str(tmp_path / "m.gguf")])
        fields = gguf_fields(gguf.GGUFReader(tmp_path / "m.gguf"))
        assert fields["tokenizer.chat_template"] == tokenizer.NANOLLM_CHAT_TEMPLATE
        assert fields["tokenizer.ggml.eos_token_id"] == tok.end_id
        assert fields["tokenizer.ggml.tokens"][tok.end_id] == "<|end|>"
        assert fields["tokenizer.ggml.token_type"][tok.end_id] == 3


def test_q8_0_bytes_equal_ggml_reference():
    """Ties at exactly .5 (round half away from zero), an all-zero block, one outlier per
    block, negative maxima, tiny and huge scales: the bytes of gguf-py's bit-exact port of
    ggml's quantize_row_q8_0_ref."""
    pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 96, generator=g)
    x[0, :32] = 0.0
    x[2, :32] = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5] + [0.25] * 27)  # d = 1: q = x, ties at .5
    x[3] = x[3] * 1e-30
    x[4] = x[4] * 1e4
    x[5, 7] = -50.0
    ours = export.quantize_q8_0(x)
    assert ours.shape == (8 * 96 // 32, 34)
    assert (ours.numpy().reshape(-1) == quantize(x.numpy(), Q.Q8_0).reshape(-1)).all()
    q = ours[6:7, 2:].view(torch.int8)[0, :5].tolist()  # block 0 of row 2 (3 blocks per row)
    assert q == [127, 1, -1, 2, -3]


def test_q4_0_bytes_equal_ggml_reference():
    """Q4_0: the block's value of largest magnitude (first of equal ones, sign kept) on code 0,
    an all-zero block, a positive and a negative maximum, tiny and huge scales, codes that land
    on the .5 boundary of trunc(x / d + 8.5): gguf-py's bytes (a port of quantize_row_q4_0_ref)."""
    pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 96, generator=g)
    x[0, :32] = 0.0
    x[1, :32] = torch.arange(32.0) - 16  # d = -(-16) / -8 = -2: every x / d + 8.5 on a half
    x[2, 32:64] = torch.tensor([-3.0, 3.0] + [0.1] * 30)  # equal magnitudes: the first (-3) wins
    x[3] = x[3] * 1e-30
    x[4] = x[4] * 1e4
    x[5, 7] = 50.0
    ours = export.quantize_q4_0(x)
    assert ours.shape == (8 * 96 // 32, 18)
    assert (ours.numpy().reshape(-1) == quantize(x.numpy(), Q.Q4_0).reshape(-1)).all()
    with pytest.raises(NanoError, match="Q4_0 needs rows of a multiple of 32"):
        export.quantize_q4_0(torch.zeros(2, 48))


def q4_k_steps(blocks: torch.Tensor) -> torch.Tensor:
    """Each 32-weight sub-block's step d * sc, read with gguf-py's unpacking of the 6-bit scales."""
    from gguf.quants import Q4_K

    d = blocks[:, :2].contiguous().view(torch.float16).float()
    sc, _ = Q4_K.get_scale_min(blocks[:, 4:16].numpy())
    return (d * torch.from_numpy(sc.astype("float32"))).reshape(-1)


def test_q4_k_read_back_by_gguf_py_within_its_error():
    """Q4_K (ggml's k-quant layout, 144 bytes per 256 weights) as gguf-py dequantizes it: a value
    is within half its sub-block's step d * sc plus half the offset's 6-bit step dmin (> 99% of
    them), except values clipped at the ends of a range that the 6-bit rounding of the scale left
    short: those stay within 1.5x that (measured up to 1.27x). On Gaussian weights the error is
    below Q4_0's (a fitted scale and offset per 32 weights against one absmax scale): measured
    0.073 vs 0.096 relative RMS here."""
    pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(1))
    x[0, :32] = 0.0  # a flat sub-block
    x[1, :32] = -0.25  # a flat negative sub-block: all of it is the offset
    x[2, 100] = 40.0  # an outlier: its super-block's other scales fall to a few 6-bit steps
    x[3] = x[3].abs()  # one-sided rows: the offset is 0
    blocks = export.quantize_q4_k(x)
    assert blocks.shape == (16 * 512 // 256, 144)
    deq = torch.from_numpy(dequantize(blocks.numpy().reshape(16, -1), Q.Q4_K)).reshape(x.shape)
    err = (deq - x).reshape(-1, 32).abs()
    half = q4_k_steps(blocks)[:, None] / 2 + blocks[:, 2:4].contiguous().view(torch.float16).float().repeat_interleave(8, 0) / 2
    assert (err <= half + 1e-6).float().mean() > 0.99
    assert (err <= 3 * half + 1e-6).all()
    q4_0 = torch.from_numpy(dequantize(export.quantize_q4_0(x).numpy().reshape(16, -1), Q.Q4_0)).reshape(x.shape)
    assert (deq - x).norm() < 0.85 * (q4_0 - x).norm()


@pytest.mark.parametrize("gguf_type", ["q4_0", pytest.param("q4_k", marks=pytest.mark.slow)])  # q4_k: ~20 s
def test_gguf_q4_files(tmp_path, gguf_type):
    """A 4-bit GGUF read back by GGUFReader: each 2-D weight in its type (Q4_K rows of 256, else
    Q4_0; 1-D ones F32), holding our quantizer's bytes (Q4_0: gguf-py's too), the metadata
    llama.cpp reads, the file byte for byte GGUFWriter's where gguf-py can quantize (Q4_0)."""
    gguf = pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import quantize

    spec = char_spec()
    config = gpt.GPTConfig(block_size=32, vocab_size=len(spec) - 5, n_layer=1, n_head=2, n_embd=256)
    model = train_tiny(config, spec, steps=2)
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, spec)
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "gguf", str(tmp_path / "m.gguf"), "--gguf_type", gguf_type])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    check_gguf_hparams(gguf_fields(reader), config, gguf_type)
    tensors = {t.name: t for t in reader.tensors}
    wanted = {"q4_0": Q.Q4_0, "q4_k": Q.Q4_K}[gguf_type]
    for name, ours in gguf_expected(model).items():
        t = tensors[name]
        if ours.dim() == 1 or name.startswith("position_embd"):
            assert t.tensor_type == Q.F32
            continue
        assert t.tensor_type == wanted, name
        quantizer = export.quantize_q4_0 if wanted == Q.Q4_0 else export.quantize_q4_k
        assert (t.data.reshape(-1) == quantizer(ours).numpy().reshape(-1)).all(), name
        if wanted == Q.Q4_0:
            assert (t.data.reshape(-1) == quantize(ours.numpy(), Q.Q4_0).reshape(-1)).all()
    # the fallbacks: Q4_K rows that are no multiple of 256 become Q4_0, rows of no 32-multiple F16
    assert export.gguf_tensor_type("blk.0.ffn_up.weight", torch.zeros(8, 384), export.GGML_Q4_K) == export.GGML_Q4_0
    assert export.gguf_tensor_type("blk.0.ffn_up.weight", torch.zeros(8, 48), export.GGML_Q4_K) == export.GGML_F16
    assert export.gguf_tensor_type("blk.0.ffn_up.weight", torch.zeros(8, 48), export.GGML_Q4_0) == export.GGML_F16
    if gguf_type == "q4_0":
        ggml_type, file_type = export.GGUF_TYPES[gguf_type]
        metadata = export.gguf_metadata(config, "ckpt", file_type, 4 * config.n_embd) | export.gguf_tokenizer(
            spec, config.vocab_size)
        del metadata["tokenizer.ggml.merges"]
        tensors = export.gguf_tensors(model, ggml_type)
        export.write_gguf(tmp_path / "ours.gguf", metadata, tensors)
        reference_gguf(tmp_path / "ref.gguf", metadata, tensors)
        assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


# ----------------------------------------------------------------------------------------
# PEFT


@pytest.mark.parametrize("targets,use_rslora", [("c_attn,c_proj,c_fc", True), ("c_attn", False)])
def test_peft_adapter_matches_peft(gpt2_ckpt, hf_dir, tmp_path, targets, use_rslora):
    transformers = need_transformers()
    peft = pytest.importorskip("peft", reason="peft is the LoRA reference (requirements-dev)")
    model, _ = gpt.load_checkpoint(gpt2_ckpt)
    lora.apply_lora(model.eval(), r=4, alpha=8, dropout=0.05, targets=tuple(targets.split(",")), use_rslora=use_rslora)
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    lora.save_lora(tmp_path / "adapter.pt", model, str(gpt2_ckpt))
    export.main(["--adapter", str(tmp_path / "adapter.pt"), "--to", "peft", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(targets.split(",")) and config["use_rslora"] == use_rslora

    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = base(x).logits
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()  # wraps base in place
        ours = model(x)[0]
        assert max_diff(theirs(x).logits, ours) <= 1e-5
        assert max_diff(base_logits, ours) > 1e-3  # the adapter does change the outputs

    # the adapter merged into the base, exported as a plain HF model
    export.main(["--ckpt", str(gpt2_ckpt), "--adapter", str(tmp_path / "adapter.pt"), "--to", "hf", str(tmp_path / "merged")])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert max_diff(merged(x).logits, ours) <= 1e-5


# ----------------------------------------------------------------------------------------
# The Llama family: Llama (GQA, untied head, Llama 3.1 rope scaling), Qwen2 (q/k/v biases,
# MQA), Qwen3 (QK-norm, head_dim of its own); an own BPE with GPT-4's split pattern

LLAMA_FAMILY = {
    "llama": {"n_head": 4, "n_kv_head": 2, "tie_embeddings": False, "rope_scaling": 4.0, "rope_original_max_position": 16},
    "qwen2": {"n_head": 4, "n_kv_head": 1, "qkv_bias": True, "norm_eps": 1e-6, "rope_theta": 1e6},
    "qwen3": {"n_head": 4, "n_kv_head": 2, "qk_norm": True, "head_dim": 32, "tie_embeddings": False},
}


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    vocab, merges = bpe.train_bpe(data.SHAKESPEARE_PATH.read_text()[:50_000] + HARD_TEXT, 500,
                                  special_tokens=[bpe.ENDOFTEXT], pattern=bpe.GPT4_PATTERN)
    path = tmp_path_factory.mktemp("tok") / "tok.bpe"
    tokenizer.save_bpe(bpe.Tokenizer(vocab, merges, [bpe.ENDOFTEXT], bpe.GPT4_PATTERN), path)
    return str(path)


def llama_ckpt(tmp_path, kind, spec):
    config = gpt.llama_config(block_size=64, vocab_size=512, n_layer=2, n_embd=64, **LLAMA_FAMILY[kind])
    model = train_tiny(config, spec)
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, spec)
    return model, tmp_path / "ckpt.pt"


@pytest.mark.parametrize("kind", list(LLAMA_FAMILY))
def test_llama_family_export_hf_and_gguf(tmp_path, llama_tokenizer, kind):
    transformers = need_transformers()
    gguf = pytest.importorskip("gguf", reason="gguf-py is the GGUF reference (requirements-dev)")
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    model, ckpt = llama_ckpt(tmp_path, kind, llama_tokenizer)
    c = model.config
    export.main(["--ckpt", str(ckpt), "--to", "hf", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == kind
    x = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x)[0]) <= 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = tokenizer.load_tokenizer(llama_tokenizer)
    assert hf_tok(HARD_TEXT)["input_ids"] == ours.encode(HARD_TEXT)
    prompt = ours.encode("ROMEO:\nWhat light")
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert torch.stack(list(sample.generate(model, [prompt], 20, temperature=0)), 1)[0].tolist() == theirs
    back, _ = gpt.load_pretrained(str(tmp_path / "hf"))  # the round trip: config.json spells defaults out
    resolved = dataclasses.replace(c, mlp_hidden=model.transformer.h[0].mlp.up_proj.out_features, head_dim=c.head_dim)
    assert back.config == resolved
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())

    export.main(["--ckpt", str(ckpt), "--to", "gguf", str(tmp_path / "m.gguf"), "--gguf_type", "f32"])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == kind)
    allowed = {TENSOR_NAMES[k] for k in MODEL_TENSORS[arch]}
    assert {re.sub(r"\.\d+\.", ".{bid}.", n.rsplit(".", 1)[0]) for n in tensors} <= allowed
    block = model.transformer.h[0]
    hd = c.head_dim
    q_rows = block.attn.q_proj.weight.detach().view(c.n_head, 2, hd // 2, c.n_embd)
    k_rows = block.attn.k_proj.weight.detach().view(c.n_kv_head, 2, hd // 2, c.n_embd)
    if kind == "llama":  # llama.cpp rotates channel pairs (2i, 2i+1), HF (i, i + hd/2): rows interleaved
        q_rows, k_rows = q_rows.transpose(1, 2), k_rows.transpose(1, 2)
    assert torch.equal(tensors["blk.0.attn_q.weight"], q_rows.reshape(-1, c.n_embd))
    assert torch.equal(tensors["blk.0.attn_k.weight"], k_rows.reshape(-1, c.n_embd))
    assert torch.equal(tensors["blk.1.ffn_gate.weight"], model.transformer.h[1].mlp.gate_proj.weight.detach())
    assert ("output.weight" in tensors) == (not c.tie_embeddings)
    if kind == "qwen2":
        assert torch.equal(tensors["blk.0.attn_v.bias"], block.attn.v_proj.bias.detach())
    if kind == "qwen3":
        assert torch.equal(tensors["blk.0.attn_k_norm.weight"], block.attn.k_norm.weight.detach())
    if c.rope_scaling:  # rope_freqs: how much slower each frequency turns than unscaled RoPE
        one = torch.tensor([1])
        angle = lambda cfg: torch.atan2(*reversed(gpt.rope_angles(cfg, one, torch.float64)))[0, :hd // 2]
        unscaled = dataclasses.replace(c, rope_scaling=0.0)
        assert torch.allclose(tensors["rope_freqs.weight"].double(), angle(unscaled) / angle(c), rtol=1e-5)
    fields = gguf_fields(reader)
    assert fields["general.architecture"] == kind and set(fields) <= gguf_known_keys(kind)
    for key, value in {"context_length": 64, "embedding_length": 64, "block_count": 2, "attention.head_count": 4,
                       "attention.head_count_kv": c.n_kv_head, "rope.dimension_count": hd,
                       "feed_forward_length": block.mlp.up_proj.out_features}.items():
        assert fields[f"{kind}.{key}"] == value, key
    assert math.isclose(fields[f"{kind}.rope.freq_base"], c.rope_theta, rel_tol=1e-6)
    assert math.isclose(fields[f"{kind}.attention.layer_norm_rms_epsilon"], c.norm_eps, rel_tol=1e-6)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"  # GPT-4's split pattern is Llama 3's


def test_llama_peft_adapter_matches_peft(tmp_path, llama_tokenizer):
    transformers = need_transformers()
    peft = pytest.importorskip("peft", reason="peft is the LoRA reference (requirements-dev)")
    model, ckpt = llama_ckpt(tmp_path, "qwen2", llama_tokenizer)
    export.main(["--ckpt", str(ckpt), "--to", "hf", str(tmp_path / "hf")])
    lora.apply_lora(model, r=4, alpha=8)  # the default targets: every attention and MLP projection
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    lora.save_lora(tmp_path / "adapter.pt", model, str(ckpt))
    export.main(["--adapter", str(tmp_path / "adapter.pt"), "--to", "peft", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and "gate_proj" in config["target_modules"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    x = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_diff(theirs(x).logits, model(x)[0]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_llama_cpp_runs_our_gguf(gpt2_ckpt, llama_tokenizer, tmp_path, kind):
    """llama.cpp itself (llama-cpp-python) on our GGUF: its tokens of a prompt and its greedy
    continuation equal ours, for GPT-2 (tokenizer "gpt2") and a Llama (GQA, Llama 3.1 rope
    scaling, an own BPE with GPT-4's split pattern: llama.cpp's "llama-bpe")."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip builds llama.cpp "
                                    "from source: pip install llama-cpp-python)")
    if kind == "gpt2":
        model, spec = gpt.load_checkpoint(gpt2_ckpt)
        ckpt = gpt2_ckpt
    else:
        model, ckpt = llama_ckpt(tmp_path, "llama", llama_tokenizer)
        spec = llama_tokenizer
    path = tmp_path / "model.gguf"
    export.main(["--ckpt", str(ckpt), "--to", "gguf", str(path), "--gguf_type", "f32"])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, verbose=False)
    text = "ROMEO:\nWhat light through yonder window breaks? 1234"
    prompt = tokenizer.load_tokenizer(spec).encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == 16:
            break
    ours = torch.stack(list(sample.generate(model, [prompt], 16, temperature=0)), 1)[0].tolist()
    assert theirs == ours


# ----------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def test_bad_inputs(gpt2_ckpt, hf_dir, tmp_path):
    import moe

    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    with pytest.raises(SystemExit, match=r"error: .*notes.txt is not a readable checkpoint"):
        export.main(["--ckpt", str(not_ckpt), "--to", "hf", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"error: unknown --to 'tflite' \(choose one of hf, gguf, peft, torch_export, onnx\)"):
        export.main(["--ckpt", str(gpt2_ckpt), "--to", "tflite", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"error: unknown --gguf_type 'q2_k'"):
        export.main(["--ckpt", str(gpt2_ckpt), "--to", "gguf", str(tmp_path / "a.gguf"), "--gguf_type", "q2_k"])
    with pytest.raises(SystemExit, match=r"error: --to peft exports a LoRA adapter"):
        export.main(["--ckpt", str(gpt2_ckpt), "--to", "peft", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"error: .*ckpt.pt is not a LoRA adapter"):
        export.main(["--adapter", str(gpt2_ckpt), "--to", "peft", str(tmp_path / "a")])

    config = gpt.GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=32)
    moe_model = moe.MoEGPT(config, moe.MoEConfig(n_experts=2, top_k=1))
    moe.save_moe_checkpoint(tmp_path / "moe.pt", moe_model, char_spec())
    with pytest.raises(SystemExit, match=r"error: .*moe.pt is a mixture-of-experts model .*cannot be exported"):
        export.main(["--ckpt", str(tmp_path / "moe.pt"), "--to", "gguf", str(tmp_path / "moe.gguf")])

    unicode_spec = "char:abcé\n "
    gpt.save_checkpoint(tmp_path / "uni.pt", gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=6, n_layer=1,
                                                                    n_head=1, n_embd=32)), unicode_spec)
    with pytest.raises(SystemExit, match=r"error: GGUF has no character tokenizer and this alphabet is not ASCII"):
        export.main(["--ckpt", str(tmp_path / "uni.pt"), "--to", "gguf", str(tmp_path / "uni.gguf")])

    before = sorted(p.name for p in hf_dir.iterdir())
    with pytest.raises(SystemExit, match=r"error: .*hf exists and is not empty \(pass --force to replace it\)"):
        export.main(["--ckpt", str(gpt2_ckpt), "--to", "hf", str(hf_dir)])
    assert sorted(p.name for p in hf_dir.iterdir()) == before
    (tmp_path / "x.gguf").write_bytes(b"keep")
    with pytest.raises(SystemExit, match=r"error: .*x.gguf exists and is not empty"):
        export.main(["--ckpt", str(gpt2_ckpt), "--to", "gguf", str(tmp_path / "x.gguf")])
    assert (tmp_path / "x.gguf").read_bytes() == b"keep"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temp file left behind


def test_force_replaces_only_an_earlier_export(gpt2_ckpt, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export's file: --force replaces it
    export.main(["--ckpt", str(gpt2_ckpt), "--to", "hf", str(out), "--force"])  # a bare flag is True
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or old folder left
    (out / "notes.txt").write_text("mine")  # a file no export writes: the folder is the user's
    with pytest.raises(SystemExit, match=r"error: .*hf holds files an export does not write \(notes.txt\)"):
        export.main(["--ckpt", str(gpt2_ckpt), "--to", "hf", str(out), "--force", "True"])
    assert (out / "notes.txt").read_text() == "mine"


def test_force_never_deletes_the_input(gpt2_ckpt, tmp_path, monkeypatch):
    run = tmp_path / "out"
    run.mkdir()
    ckpt = run / "ckpt.pt"
    ckpt.write_bytes(gpt2_ckpt.read_bytes())
    (run / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    for out in ("out", ".", str(tmp_path)):  # the run folder, the cwd holding it, the same by absolute path
        with pytest.raises(SystemExit, match=r"error: .* holds the input .*ckpt.pt \(write the export elsewhere\)"):
            export.main(["--ckpt", "out/ckpt.pt", "--to", "hf", out, "--force"])
    with pytest.raises(SystemExit, match=r"error: .*ckpt.pt holds the input"):
        export.main(["--ckpt", "out/ckpt.pt", "--to", "gguf", "out/ckpt.pt", "--force"])
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    assert ckpt.read_bytes() == gpt2_ckpt.read_bytes()


def test_an_interrupted_swap_is_finished_and_stale_temps_removed(gpt2_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    export.main(["--ckpt", str(gpt2_ckpt), "--to", "hf", str(out)])
    dead = 2**22 + 12345  # above the kernel's default pid_max: no process has it
    assert not common.pid_alive(dead)
    # a kill between write_folder's two renames: the old export aside, the new one complete, no `hf`
    out.rename(tmp_path / f".hf.old{dead}")
    shutil.copytree(tmp_path / f".hf.old{dead}", tmp_path / f".hf.tmp{dead}")
    (tmp_path / f".x.gguf.tmp{dead}").write_bytes(b"half")  # a kill during a GGUF save
    export.main(["--ckpt", str(gpt2_ckpt), "--to", "hf", str(out), "--force"])
    export.main(["--ckpt", str(gpt2_ckpt), "--to", "gguf", str(tmp_path / "x.gguf")])
    said = capsys.readouterr().out
    assert "finished the export into" in said and f"(pid {dead} is gone)" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "x.gguf"]


HF_ONLY = {  # rope types and switches export.py writes to config.json but not to GGUF
    "mistral-window": ("mistral", {"n_head": 4, "n_kv_head": 2, "sliding_window": 12}),
    "qwen2-window": ("qwen2", {"n_head": 4, "n_kv_head": 1, "qkv_bias": True, "sliding_window": 12}),
    "qwen3-attn-bias": ("qwen3", {"n_head": 4, "n_kv_head": 2, "qk_norm": True, "attn_bias": True}),
    "llama-yarn": ("llama", {"n_head": 4, "n_kv_head": 2, "rope_type": "yarn", "rope_scaling": 4.0, "rope_original_max_position": 16,
                             "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 32.0, "rope_attention_factor": 1.2}),
    "llama-linear": ("llama", {"n_head": 4, "n_kv_head": 2, "rope_type": "linear", "rope_scaling": 2.0, "rope_original_max_position": 32}),
    "llama-dynamic": ("llama", {"n_head": 4, "n_kv_head": 2, "rope_type": "dynamic", "rope_scaling": 2.0, "rope_original_max_position": 32}),
}


@pytest.mark.parametrize("case", list(HF_ONLY))
def test_hf_export_keeps_windows_rope_types_and_biases(tmp_path, case):
    """config.json written by export.py reads back in transformers with equal logits (a sequence
    past the window and past the original context) and in gpt.load_pretrained as the same config;
    GGUF, which has no field for them, refuses in one line."""
    transformers = need_transformers()
    kind, switches = HF_ONLY[case]
    config = gpt.llama_config(block_size=64, vocab_size=96, n_layer=2, n_embd=64, **switches)
    torch.manual_seed(0)
    model = gpt.GPT(config).eval()
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, "char:" + "".join(map(chr, range(32, 128))))
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "hf", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.model_type == kind
    x = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x)[0]) <= 1e-5
    back, _ = gpt.load_pretrained(str(tmp_path / "hf"))
    assert all(getattr(back.config, k) == getattr(config, k) for k in switches), case
    if "sliding_window" in switches or "rope_type" in switches:
        with pytest.raises(SystemExit, match="GGUF export writes Llama 3.1's rope scaling and no sliding window") as e:
            export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "gguf", str(tmp_path / "m.gguf")])
        assert e.value.code == 2 and not (tmp_path / "m.gguf").exists()
