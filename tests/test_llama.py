"""gpt.py's Llama family against Hugging Face transformers: logits, greedy generation, loading.

Every model here is a tiny random transformers model written by `save_pretrained` in small
shards and read back by `gpt.load_pretrained`. Tolerance for logits: fp32, max |diff| <= 1e-5
(the same operations as transformers in the same order; what is left is summation order in
fused kernels, ~1e-7 at these sizes). Generation: token for token.
"""

import dataclasses
import json

import pytest
import torch

import gpt
import hf_io
import sample
from common import NanoError

transformers = pytest.importorskip("transformers", reason="transformers is the reference for the Llama family")

VOCAB = 97
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# (config class, model class, extra config): GQA and MHA, tied and untied, llama3 rope
# scaling, Qwen2's q/k/v biases, Qwen3's QK-norm with head_dim != hidden / heads
ARCHS = {
    "llama-gqa-llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                              dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-mha-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral-mqa": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=None)),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "qwen3-attention-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, attention_bias=True)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def hf_model(config_cls, model_cls, std=0.3, **extra):
    """A random transformers model whose weights are large enough (std 0.3, not 0.02) that
    its logits are far from uniform: greedy tokens then vary, and every bias and norm gain
    is random too (transformers initialises them to 0 and 1), so each one is checked."""
    if not hasattr(transformers, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**dict(  # no eos: no early stop
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=0), **extra})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0.0, std)
    return model


def saved(model, folder):
    """save_pretrained in shards of ~20 KB (several per model, with an index)."""
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    config_cls, model_cls, extra = ARCHS[request.param]
    hf = hf_model(config_cls, model_cls, **extra)
    folder = saved(hf, tmp_path_factory.mktemp(request.param))
    model, spec = gpt.load_pretrained(str(folder))
    return request.param, hf, model.eval(), folder


def test_logits_equal_transformers(pair):
    name, hf, model, _ = pair
    c = model.config
    assert c.arch == "llama" and c.norm == "rmsnorm" and c.rope_theta > 0
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.transformer.wte.weight) == c.tie_embeddings
    hf_head_dim = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    assert c.n_kv_head == hf.config.num_key_value_heads and c.head_dim == hf_head_dim
    assert not any(p.is_meta for p in model.parameters()) and next(model.parameters()).dtype == torch.float32
    idx = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert theirs.abs().max() > 1.0  # far from uniform: a wrong part would show
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if name.startswith("qwen2"):
        assert model.transformer.h[0].attn.q_proj.bias is not None and model.transformer.h[0].attn.o_proj.bias is None
    if name.startswith("qwen3"):
        assert hasattr(model.transformer.h[0].attn, "q_norm")
    if name.endswith("attention-bias"):  # q, k, v and o_proj, not the MLP
        assert model.transformer.h[0].attn.o_proj.bias is not None and model.transformer.h[0].mlp.up_proj.bias is None


def naive_copy(model):
    """The same weights with attn_impl="naive": softmax attention written out, GQA by repeating heads."""
    naive = gpt.GPT(dataclasses.replace(model.config, attn_impl="naive")).eval()
    naive.load_state_dict(model.state_dict())
    return naive


def test_naive_attention_equals_sdpa_and_transformers(pair):
    """GQA, MQA, rotary positions, QK-norm, head_dim != hidden / heads with the attention written
    out: logits against SDPA's and transformers' (fp32, rounding only: ~1e-7, atol 1e-5 as above),
    KV-cached greedy generation with left padding token for token."""
    _, hf, model, _ = pair
    naive = naive_copy(model)
    idx = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, sdpa, theirs = naive(idx)[0], model(idx)[0], hf(idx).logits
    torch.testing.assert_close(ours, sdpa, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    prompts = [[5, 17, 3], [60, 1, 33, 2, 8, 44, 9, 12], [7]]
    tokens = [torch.stack(list(sample.generate(m, prompts, 20, temperature=0)), dim=1) for m in (model, naive)]
    assert tokens[0].tolist() == tokens[1].tolist()


def test_llama3_rope_scaling_is_applied(tmp_path):
    """Without the llama3 scaling the same weights give other logits: the test above sees it."""
    hf = hf_model(*ARCHS["llama-gqa-llama3-rope"][:2], **ARCHS["llama-gqa-llama3-rope"][2])
    model, _ = gpt.load_pretrained(str(saved(hf, tmp_path)))
    unscaled = gpt.GPT.from_hf_state_dict(hf.state_dict(), gpt.GPTConfig(**{**vars(model.config), "rope_scaling": 0.0}))
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (unscaled(idx)[0] - model(idx)[0]).abs().max() > 1e-2


# RoPE scaling past the pretraining context: head_dim 16, base 100 (so several channel pairs turn
# more than once per original context and the blends have channels on both sides), 120 tokens.
# linear/dynamic configs give the original context as max_position_embeddings (32, stretched x4);
# yarn configs name original_max_position_embeddings (32) and reach max_position_embeddings (128).
ROPES = {
    "linear": (32, dict(rope_type="linear", factor=4.0)),
    "dynamic": (32, dict(rope_type="dynamic", factor=4.0)),
    "yarn": (128, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
    "yarn-betas-mscale": (128, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=8.0,
                                    beta_slow=0.5, mscale=1.0, mscale_all_dim=0.5)),
    "yarn-attention-factor-untruncated": (128, dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=32,
                                                    attention_factor=1.25, truncate=False)),
}


@pytest.fixture(scope="module", params=list(ROPES))
def scaled(request, tmp_path_factory):
    max_pos, rope = ROPES[request.param]
    hf = hf_model("LlamaConfig", "LlamaForCausalLM", num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=max_pos, rope_parameters={**rope, "rope_theta": 100.0})
    model, _ = gpt.load_pretrained(str(saved(hf, tmp_path_factory.mktemp(request.param))))
    return hf, model.eval()


def test_rope_scaling_inv_freq_equals_transformers(scaled):
    """inv_freq and the cos/sin factor == modeling_rope_utils' for sequences within and past the
    original context (dynamic's depends on the length); fp32, default tolerance (same formulas,
    a different order of a few float operations)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, model = scaled
    assert model.config.block_size == 128 and model.config.rope_type == hf.config.rope_parameters["rope_type"]
    for seq_len in (20, 60, 120):
        theirs, factor = ROPE_INIT_FUNCTIONS[model.config.rope_type](hf.config, "cpu", seq_len=seq_len)
        torch.testing.assert_close(hf_io.rope_inv_freq(model.config, torch.tensor(seq_len)), theirs)
        assert model.config.rope_attention_factor == pytest.approx(factor, rel=1e-12)


def test_rope_scaling_logits_and_greedy_equal_transformers(scaled):
    """Logits of 120 tokens (past the original 32) and 40 greedy tokens after an 80-token prompt,
    KV-cached: transformers' forward and generate (dynamic recomputes its frequencies as the
    sequence grows, in both). Without the scaling the logits differ: the test sees it."""
    hf, model = scaled
    idx = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits
        torch.testing.assert_close(model(idx)[0], theirs, rtol=0, atol=1e-5)
        plain = gpt.GPT.from_hf_state_dict(hf.state_dict(), dataclasses.replace(model.config, rope_scaling=0.0))
        assert (plain(idx)[0] - theirs).abs().max() > 1e-2
        prompt = idx[:1, :80]
        hf.model.rotary_emb.__init__(hf.config)  # dynamic: transformers keeps the longest call's frequencies
        ref = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)[:, 80:]
    ours = torch.stack(list(sample.generate(model, prompt.tolist(), 40, temperature=0)), dim=1)
    assert ours.tolist() == ref.tolist()


def test_greedy_equals_transformers_generate_with_left_padding(pair):
    """A batch of prompts of different lengths (left-padded on both sides), KV-cached greedy."""
    _, hf, model, _ = pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 6)]
    ids, pad = sample.left_pad(prompts, "cpu")
    mask = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                          pad_token_id=0)[:, ids.shape[1]:]
    ours = torch.stack(list(sample.generate(model, prompts, 20, temperature=0)), dim=1)
    assert min(len(set(r)) for r in ours.tolist()) > 3  # varied output, not one token repeated
    assert ours.tolist() == ref.tolist()


# Sliding windows of 12 keys on every layer (Mistral's sliding_window; Qwen2's use_sliding_window with
# max_window_layers 0), over sequences of 40 tokens: more than 3x the window. Two heads of 16: the
# size the flash kernels take.
SLIDING = {"mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=12)),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=12, max_window_layers=0))}


@pytest.fixture(scope="module", params=list(SLIDING))
def windowed(request, tmp_path_factory):
    config_cls, model_cls, extra = SLIDING[request.param]
    hf = hf_model(config_cls, model_cls, num_attention_heads=2, num_key_value_heads=1, **extra)
    model, _ = gpt.load_pretrained(str(saved(hf, tmp_path_factory.mktemp(request.param))))
    return hf, model.eval()


@pytest.mark.parametrize("attn_impl", ["sdpa", "naive", "flash"])
def test_sliding_window_logits_equal_transformers(windowed, attn_impl):
    """block_size stays max_position_embeddings and the window is a band mask in every path:
    logits of 40 tokens (fp32, atol 1e-5 as above), the loss of scoring/training against the
    cross-entropy of transformers' logits, its gradient at the embedding, and the KV-cached
    prefill. flash: flash_attention.py's window (its kernels: tests/test_flash_attention.py)."""
    hf, model = windowed
    assert model.config.sliding_window == 12 and model.config.block_size == 128
    model = gpt.GPT(dataclasses.replace(model.config, attn_impl=attn_impl)).eval()
    model.load_state_dict(windowed[1].state_dict())
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits
        torch.testing.assert_close(model(idx)[0], theirs, rtol=0, atol=1e-5)
        cache = sample.make_cache(model, 2, 40)
        torch.testing.assert_close(sample.prefill(model, idx, cache), theirs[:, -1], rtol=0, atol=1e-5)
        unwindowed = gpt.GPT(dataclasses.replace(model.config, sliding_window=0)).eval()
        unwindowed.load_state_dict(model.state_dict())
        assert (unwindowed(idx)[0][:, 12:] - theirs[:, 12:]).abs().max() > 1e-2  # the window matters
    loss = model(idx[:, :-1], targets=idx[:, 1:])[1]
    ref = torch.nn.functional.cross_entropy(hf(idx[:, :-1]).logits.flatten(0, 1), idx[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    loss.backward(), ref.backward()
    torch.testing.assert_close(model.transformer.wte.weight.grad, hf.model.embed_tokens.weight.grad, rtol=0, atol=1e-5)
    hf.zero_grad()


@pytest.mark.parametrize("attn_impl", ["sdpa", "naive"])
def test_sliding_window_generation_equals_transformers(windowed, attn_impl):
    """Greedy generation past the window, KV-cached and uncached, a prompt longer than the window
    (30 tokens) and a short one in one left-padded batch: token for token transformers' generate."""
    hf, model = windowed
    model = naive_copy(model) if attn_impl == "naive" else model
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (30, 3)]
    ids, pad = sample.left_pad(prompts, "cpu")
    mask = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                          pad_token_id=0)[:, ids.shape[1]:]
    for use_cache in (True, False):
        ours = torch.stack(list(sample.generate(model, prompts, 30, temperature=0, use_cache=use_cache)), dim=1)
        assert ours.tolist() == ref.tolist()


def test_to_hf_state_dict_loads_into_transformers():
    """Our own Llama (llama_config) in Hugging Face's names: strict load, same logits."""
    torch.manual_seed(0)
    config = gpt.llama_config(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              mlp_hidden=48, tie_embeddings=False, norm_eps=1e-6)
    model = gpt.GPT(config).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    idx = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)
    # LoRA's usual Llama targets are leaf names of our modules, as in PEFT
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= leaves


def test_bf16_shards_load_in_their_dtype(tmp_path):
    hf = hf_model("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2).to(torch.bfloat16)
    model, _ = gpt.load_pretrained(str(saved(hf, tmp_path)))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(model.state_dict()[hf_io.from_hf_name(k, "llama")], v) for k, v in hf.state_dict().items())
    as_fp32, _ = gpt.load_pretrained(str(tmp_path), dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}


def test_tokenizer_json_is_the_spec(tmp_path):
    folder = saved(hf_model("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2), tmp_path)
    assert gpt.load_pretrained(str(folder))[1] is None  # no tokenizer.json: nothing to name
    (folder / "tokenizer.json").write_text("{}")
    assert gpt.load_pretrained(str(folder))[1] == str(folder / "tokenizer.json")


# ---------------------------------------------------------------------------------------
# Bad input: one line, before any weight is read


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return saved(hf_model("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
                 tmp_path_factory.mktemp("llama"))


def broken_copy(src, dst, edit_config=None, drop_shard=False):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if drop_shard:
        sorted(dst.glob("model-*.safetensors"))[1].unlink()
    return dst


@pytest.mark.parametrize("edit, drop, message", [
    (lambda c: c.update(model_type="gemma"), False, r"model_type 'gemma' is not supported \(supported: gpt2, llama, mistral, qwen2, qwen3\)"),
    (None, True, r"lacks model-00002-of-\d+\.safetensors"),
    (lambda c: c.update(intermediate_size=64), False, r"has shape \((56, 32|32, 56)\), the config wants \((64, 32|32, 64)\)"),
    (lambda c: c.update(num_hidden_layers=3), False, r"lacks \d+ tensors, e\.g\. model\.layers\.2\."),
    (lambda c: c.update(num_key_value_heads=3), False, r"not a multiple of n_kv_head 3"),
    (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}), False,
     r"rope type 'longrope' is not supported \(supported: default, llama3, linear, dynamic, yarn\)"),
    (lambda c: c.update(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
     False, r"sliding window on 1 of 2 layers is not supported"),
    (lambda c: c.update(partial_rotary_factor=0.5), False, r"partial_rotary_factor 0.5 is not supported"),
])
def test_bad_folders_are_one_line_errors(llama_dir, tmp_path, monkeypatch, edit, drop, message):
    folder = broken_copy(llama_dir, tmp_path / "broken", edit, drop)
    read = []
    monkeypatch.setattr(hf_io, "read_safetensors", lambda *a, **k: read.append(a))
    with pytest.raises(NanoError, match=message) as e:
        gpt.load_pretrained(str(folder))
    assert "\n" not in str(e.value) and not read  # failed from config and headers alone


def test_bad_names(tmp_path):
    with pytest.raises(NanoError, match="unknown model 'llama5'"):
        gpt.load_pretrained("llama5")
    with pytest.raises(NanoError, match="has no config.json"):
        gpt.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama",')  # cut off mid-download
    with pytest.raises(NanoError, match=r"config.json is not valid JSON"):
        gpt.load_pretrained(str(tmp_path))


def test_hub_names_download_config_shards_and_tokenizer(llama_dir, tmp_path, monkeypatch):
    """A hub name: config.json, the index and every shard it lists, tokenizer.json, fetched
    into the cache (the network replaced by a local folder); a repo of one file works too."""
    def fake_download(url, dest, hint="", headers=None):  # common.download's contract: a file already there is kept
        assert headers == {"Authorization": "Bearer hf_test"}  # HF_TOKEN goes along (gated models)
        if dest.is_file():
            return dest
        repo, name = url.split("https://huggingface.co/")[1].split("/resolve/main/")
        src = {"org/sharded": llama_dir, "org/single": tmp_path / "single"}[repo] / name
        if not src.is_file():
            raise NanoError(f"could not download {url} (HTTPError; {hint})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        fetched.append(name)
        return dest

    fetched = []
    monkeypatch.setattr(hf_io, "download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    (llama_dir / "tokenizer.json").write_text("{}")
    try:
        model, spec = gpt.load_pretrained("org/sharded", cache_dir=tmp_path / "cache")
    finally:
        (llama_dir / "tokenizer.json").unlink()
    shards = sorted(p.name for p in llama_dir.glob("model-*.safetensors"))
    assert fetched == ["config.json", "model.safetensors.index.json", *shards, "tokenizer.json"]
    assert spec == str(tmp_path / "cache" / "org" / "sharded" / "tokenizer.json")
    reference, _ = gpt.load_pretrained(str(llama_dir))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    # one model.safetensors, no index, no tokenizer.json
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    hf_io.write_safetensors(tmp_path / "single" / "model.safetensors", reference.to_hf_state_dict())
    fetched.clear()
    model, spec = gpt.load_pretrained("org/single", cache_dir=tmp_path / "cache")
    assert fetched == ["config.json", "model.safetensors"] and spec is None
    fetched.clear()
    gpt.load_pretrained("org/single", cache_dir=tmp_path / "cache")
    assert fetched == []  # everything is in the cache now


def test_sample_cli_on_a_folder(llama_dir, tmp_path, capsys):
    """sample.py --init_from FOLDER prints the GQA cache saving; without a tokenizer.json it says so."""
    with pytest.raises(SystemExit, match="^error: .* has no tokenizer.json"):
        sample.main(["--init_from", str(llama_dir), "--device", "cpu"])
    model, _ = gpt.load_pretrained(str(llama_dir))
    ckpt = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(ckpt, model, "char:" + "".join(chr(c) for c in range(32, 32 + VOCAB)))  # 97 characters
    texts = sample.main(["--ckpt", str(ckpt), "--device", "cpu", "--prompt", "ab", "--max_new_tokens", "5",
                         "--temperature", "0"])
    assert len(texts) == 1
    err = capsys.readouterr().err  # 2 (k, v) * 2 layers * 2 heads * 8 dims * 4 bytes
    assert "KV cache: 256 bytes per token (2 key/value heads for 4 query heads: 2x less than the 512 of full heads)" in err
