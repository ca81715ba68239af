"""gpt.py against its references: HF GPT-2 logits, the naive loss, attention written out vs SDPA,
checkpoints, compile."""

import dataclasses
import math

import pytest

from common import NanoError
import torch
import torch.nn.functional as F

import common
import data
import gpt
import hf_io
import lora
import sample
import tokenizer
from gpt import GPT, GPTConfig



def to_hf_names(model):
    """Our state dict written the way Hugging Face's GPT2LMHeadModel names and lays it out."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte
        sd[k] = v.t().contiguous() if k.endswith(hf_io.HF_CONV1D_WEIGHTS) else v.clone()
    return sd


def test_hf_state_dict_round_trip(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    loaded = GPT.from_hf_state_dict(to_hf_names(model), tiny_config).eval()
    assert loaded.config == tiny_config
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    # without a config the shape is read off the tensors (64-dim heads assumed, as in GPT-2)
    wide = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=128))
    assert GPT.from_hf_state_dict(to_hf_names(wide)).config == wide.config


@pytest.mark.parametrize("activation, gelu", [("gelu_new", "tanh"), ("gelu", "exact")])
def test_logits_match_transformers_gpt2(activation, gelu):
    """GPT-2's tanh GELU ("gelu_new", its released weights) and the exact one ("gelu", what
    train.py trains from scratch, as nanoGPT), read from config.json and written back by export."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed: HF parity not checked")
    import export

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=64, n_layer=3, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=activation)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF's init leaves biases at zero: make them random so they are checked too
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    # the weights do not store n_head (GPT-2's sizes all have 64-dim heads): config.json does
    config = GPTConfig(**hf_io.hf_config_fields(hf_config.to_dict()))
    assert config.gelu == gelu
    model = GPT.from_hf_state_dict(hf.state_dict(), config).eval()
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    # fp32, same operations in a different order (fused SDPA vs HF's eager attention): 1e-5
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert export.hf_config(model, eot_id=0)["activation_function"] == activation
    with pytest.raises(common.NanoError, match="activation_function 'relu' is not supported"):
        hf_io.hf_config_fields({**hf_config.to_dict(), "activation_function": "relu"})


@pytest.mark.parametrize("n_rows,chunk", [(50, 16), (64, 64), (7, 1024)])
def test_chunked_loss_equals_naive(n_rows, chunk):
    torch.manual_seed(0)
    V, C = 97, 24
    x = torch.randn(n_rows, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (n_rows,))
    t[::5] = -1  # ignored positions
    loss = gpt.chunked_cross_entropy(x, w, t, chunk_size=chunk)
    gx, gw = torch.autograd.grad(loss * 3.0, (x, w))  # a non-unit upstream gradient
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-1)
    rgx, rgw = torch.autograd.grad(ref * 3.0, (x, w))
    # fp32, same math chunked: differences are summation order only
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=0, atol=1e-5)
    torch.testing.assert_close(gw, rgw, rtol=0, atol=1e-5)


@pytest.mark.parametrize("plain_max", [0, 2**24], ids=["chunked", "plain"])
def test_model_loss_equals_naive_path(tiny_config, plain_max):
    """Both of forward's losses: chunks (forced by plain_max 0) and, for small logits, the plain one."""
    torch.manual_seed(0)
    model = GPT(tiny_config)
    model.loss_chunk_size = 20  # ragged: 2*32 = 64 rows -> 20, 20, 20, 4
    model.plain_loss_max_logits = plain_max
    assert model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1))[1].item() == 0  # no target: 0, not nan
    idx = torch.randint(0, 65, (2, 32))
    tgt = torch.randint(0, 65, (2, 32))
    tgt[0, :3] = -1
    logits, loss = model(idx, tgt)
    assert logits is None
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(idx)
    F.cross_entropy(logits.view(-1, 65), tgt.view(-1), ignore_index=-1).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-5, msg=n)


def test_compile_fullgraph_no_breaks_no_recompile(tiny_config):
    torch._dynamo.reset()
    model = GPT(tiny_config)
    idx = torch.randint(0, 65, (2, 32))
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # counts frames compiled; no inductor codegen, so the test stays fast
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        _, loss = compiled(idx, idx)
        loss.backward()
    assert counter.frame_count == 1  # the second call with the same shapes reused the graph


def test_configure_optimizers_decays_matrices_only(tiny_config):
    model = GPT(tiny_config)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert model.estimate_mfu(1, 1.0, None) is None
    assert 0 < model.estimate_mfu(4, 0.5, 1e12) < 1


def test_checkpoint_round_trip_and_errors(tmp_path, tiny_config):
    model = GPT(tiny_config)
    path = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(path, model, "char:abc", step=7)
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed away
    loaded, spec = gpt.load_checkpoint(path)
    assert spec == "char:abc" and loaded.config == tiny_config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])

    with pytest.raises(NanoError, match="not found"):
        gpt.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(NanoError, match="not a readable checkpoint"):
        gpt.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(NanoError, match="not a nanollm checkpoint"):
        gpt.load_checkpoint(tmp_path / "other.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["n_embd"] = 64
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(NanoError, match="does not match its config") as e:
        gpt.load_checkpoint(tmp_path / "mismatch.pt")
    assert "\n" not in str(e.value)


def test_checkpoint_carries_its_bpe_tokenizer(tmp_path, tiny_config, monkeypatch):
    """A bpe.py tokenizer travels inside the checkpoint: with data/ moved away, the checkpoint
    still loads a tokenizer that gives the same ids (the recorded path is only a hint)."""
    import bpe

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the restored copy goes to ~/.cache/nanollm
    text = data.SHAKESPEARE_PATH.read_text()[:20_000]
    vocab, merges = bpe.train_bpe(text, 300, ["<|endoftext|>"])
    tok_path = tmp_path / "data" / "tok.bpe"
    tok_path.parent.mkdir()
    tokenizer.save_bpe(bpe.Tokenizer(vocab, merges, ["<|endoftext|>"]), tok_path)
    want = tokenizer.load_tokenizer(str(tok_path)).encode("First Citizen: before we proceed")
    for spec in (str(tok_path), "chat:" + str(tok_path)):
        gpt.save_checkpoint(tmp_path / "ckpt.pt", GPT(tiny_config), spec)
        assert gpt.load_checkpoint(tmp_path / "ckpt.pt")[1] == spec  # still there: the path as recorded
    tok_path.rename(tmp_path / "moved.bpe")
    _, spec = gpt.load_checkpoint(tmp_path / "ckpt.pt")
    assert spec.startswith("chat:" + str(tmp_path / "home" / ".cache" / "nanollm" / "tokenizers"))
    assert tokenizer.load_tokenizer(spec).encode("First Citizen: before we proceed") == want
    tok_path.write_text("a different tokenizer now")  # the path holds other bytes: the packed copy wins
    assert gpt.load_checkpoint(tmp_path / "ckpt.pt")[1] == spec


def test_parse_config_booleans_and_errors():
    from dataclasses import dataclass

    @dataclass
    class C:
        compile: bool = True
        lr: float = 1e-3
        name: str = "x"

    assert common.parse_config(C, ["--compile", "False"]).compile is False
    assert common.parse_config(C, ["--compile=0", "--lr", "2e-4"]) == C(False, 2e-4, "x")
    with pytest.raises(SystemExit):  # argparse's own error for a bool that is not one
        common.parse_config(C, ["--compile", "maybe"])
    with pytest.raises(NanoError, match="divisible"):
        GPTConfig(n_embd=10, n_head=4)


def test_chunked_loss_with_frozen_head():
    # LoRA/QLoRA freeze lm_head: backward then differentiates the chunks w.r.t. x only
    torch.manual_seed(1)
    x = torch.randn(45, 16, requires_grad=True)
    w = torch.randn(33, 16)
    t = torch.randint(0, 33, (45,))
    (gx,) = torch.autograd.grad(gpt.chunked_cross_entropy(x, w, t, chunk_size=8), x)
    (ref,) = torch.autograd.grad(F.cross_entropy(x @ w.t(), t), x)
    torch.testing.assert_close(gx, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The Llama-family switches (HF parity of the real architectures: tests/test_llama.py)


def small_llama(**fields):
    return gpt.llama_config(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **fields)


def test_llama_loss_equals_naive_path_and_compiles_without_breaks():
    torch.manual_seed(0)
    model = GPT(small_llama(qkv_bias=True, qk_norm=True, tie_embeddings=False, rope_scaling=8.0,
                            rope_original_max_position=16))
    model.loss_chunk_size = 20
    model.plain_loss_max_logits = 0
    idx, tgt = torch.randint(0, 65, (2, 32)), torch.randint(0, 65, (2, 32))
    tgt[1, :4] = -1
    model(idx, tgt)[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(idx)[0].view(-1, 65), tgt.view(-1), ignore_index=-1).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-5, msg=n)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, tgt)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_llama_switches_build_what_they_say():
    model = GPT(small_llama(tie_embeddings=False))
    block = model.transformer.h[0]
    assert "wpe" not in model.transformer and isinstance(block.ln_1, gpt.RMSNorm)
    assert block.attn.k_proj.weight.shape == (16, 32) and block.attn.q_proj.bias is None  # 2 kv heads of 8
    assert block.mlp.gate_proj.weight.shape == (128, 32)  # 8/3 * 32 rounded up to 64s
    assert model.lm_head.weight is not model.transformer.wte.weight
    for arch, m in (("llama", model), ("gpt2", GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16)))):
        leaves = {n.rsplit(".", 1)[-1] for n, mod in m.transformer.h.named_modules() if isinstance(mod, torch.nn.Linear)}
        assert leaves == set(lora.DEFAULT_TARGETS[arch]), arch
    # SwiGLU at 8/3 n_embd has the parameters of GPT-2's 4x GELU MLP
    c = 768
    assert 3 * c * 64 * math.ceil(8 * c / 3 / 64) == 2 * c * 4 * c
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"])  # RMSNorm gains are not decayed


def test_llama_checkpoint_round_trip_and_old_checkpoints(tmp_path, tiny_config):
    model = GPT(small_llama()).eval()
    gpt.save_checkpoint(tmp_path / "llama.pt", model, "char:abc")
    loaded, _ = gpt.load_checkpoint(tmp_path / "llama.pt")
    idx = torch.randint(0, 65, (1, 20))
    assert loaded.config == model.config and torch.equal(loaded(idx)[0], model(idx)[0])
    # a checkpoint written before the Llama switches existed loads as GPT-2
    gpt.save_checkpoint(tmp_path / "old.pt", GPT(tiny_config), "char:abc")
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    ckpt["config"] = {k: ckpt["config"][k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd",
                                                     "dropout", "bias")}
    torch.save(ckpt, tmp_path / "old.pt")
    assert gpt.load_checkpoint(tmp_path / "old.pt")[0].config == tiny_config


def test_gpt2_folder_loads_by_config_json(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the reference folder")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=64, n_layer=3,
                                                              n_head=4, layer_norm_epsilon=1e-5)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    model, spec = gpt.load_pretrained(str(tmp_path))
    assert spec == "gpt2" and model.config.n_head == 4 and model.config.block_size == 48
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in model.to_hf_state_dict().items())


# ---------------------------------------------------------------------------------------
# Attention written out (attn_impl="naive") against PyTorch's fused kernel (SDPA). Both run in
# fp32 and compute the same products and sums in another order (SDPA's CPU kernel tiles the keys
# with an online softmax), so what differs is rounding: ~2e-7 measured at outputs of size ~1,
# hence atol 1e-6 for one attention and 1e-5 (as for every fp32 model here) for whole models.


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_naive_attention_equals_sdpa(n_kv_head):
    torch.manual_seed(0)
    group = 4 // n_kv_head
    q = torch.randn(2, 4, 7, 16)
    k, v = torch.randn(2, n_kv_head, 11, 16), torch.randn(2, n_kv_head, 11, 16)
    # causal, T = S: SDPA's is_causal against the lower-triangular mask
    ref = F.scaled_dot_product_attention(q, k[:, :, :7], v[:, :, :7], is_causal=True, enable_gqa=group > 1)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    out = gpt.naive_attention(q, gpt.repeat_kv(k[:, :, :7], group), gpt.repeat_kv(v[:, :, :7], group), mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # a cache of 11 slots, a (B, 1, T, S) mask per row (padding, unwritten slots, a window)
    mask = torch.rand(2, 1, 7, 11) > 0.4
    mask[..., 3] = True  # every query sees at least one slot (no all -inf row)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)
    out = gpt.naive_attention(q, gpt.repeat_kv(k, group), gpt.repeat_kv(v, group), mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def with_attn_impl(model, impl):
    """The same weights, attention computed by `impl`."""
    other = GPT(dataclasses.replace(model.config, attn_impl=impl))
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_naive_attention_model_equals_sdpa(tiny_config, arch):
    """Forward, backward, and KV-cached generation (left padding, the window sliding past block_size)."""
    torch.manual_seed(0)
    model = GPT(tiny_config if arch == "gpt2" else small_llama(qk_norm=True))
    naive = with_attn_impl(model, "naive")
    idx, tgt = torch.randint(0, 65, (2, 32)), torch.randint(0, 65, (2, 32))
    for m in (model, naive):
        m(idx, tgt)[1].backward()
    torch.testing.assert_close(naive(idx)[0], model(idx)[0], rtol=0, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), naive.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5, msg=name)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    tokens = [torch.stack(list(sample.generate(m.eval(), prompts, 45, temperature=0)), dim=1) for m in (model, naive)]
    assert tokens[0].tolist() == tokens[1].tolist()


@pytest.mark.parametrize("attn_impl", ["naive", "sdpa", "flash"])
def test_sliding_window_is_a_band_in_every_path(attn_impl):
    """A window of 5 over 23 tokens: each path's logits, loss and gradients equal the attention written
    out with the band as its mask (naive); a KV cache without a mask (gpt.py's own positions mask) gives
    the same logits; a window at least as long as the sequence changes nothing. The reference is the
    same model's naive path (fp32; rounding only, atol 1e-5 as the other attention tests)."""
    torch.manual_seed(0)
    config = gpt.llama_config(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50, sliding_window=5,
                              attn_impl=attn_impl)
    model, naive = GPT(config), GPT(dataclasses.replace(config, attn_impl="naive"))
    naive.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 50, (2, 23)), torch.randint(0, 50, (2, 23))
    torch.testing.assert_close(model(idx)[0], naive(idx)[0], rtol=0, atol=1e-5)
    losses = [m(idx, targets)[1] for m in (model, naive)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(loss, m.transformer.wte.weight)[0] for loss, m in zip(losses, (model, naive))]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
    with torch.no_grad():
        cached = model(idx, kv_cache=sample.make_cache(model, 2, 23), input_pos=torch.arange(23))[0]
        torch.testing.assert_close(cached, naive(idx)[0], rtol=0, atol=1e-5)
        wide = GPT(dataclasses.replace(config, sliding_window=23))
        wide.load_state_dict(model.state_dict())
        plain = GPT(dataclasses.replace(config, sliding_window=0))
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(wide(idx)[0], plain(idx)[0], rtol=0, atol=1e-5)
        assert (plain(idx)[0] - model(idx)[0]).abs().max() > 1e-3


def test_rope_config_checks_and_old_checkpoints():
    """A checkpoint written before rope_type (a factor alone) still means llama3; bad values are one line."""
    assert gpt.llama_config(rope_scaling=8.0).rope_type == "llama3"
    assert gpt.llama_config().rope_type == "default"
    with pytest.raises(NanoError, match=r"unknown rope_type 'ntk' \(default or llama3 or linear or dynamic or yarn\)"):
        gpt.llama_config(rope_type="ntk")
    with pytest.raises(NanoError, match="yarn rope scaling needs rope_high_freq_factor > rope_low_freq_factor"):
        gpt.llama_config(rope_type="yarn", rope_scaling=4.0, rope_low_freq_factor=32.0, rope_high_freq_factor=1.0)
    with pytest.raises(NanoError, match="sliding_window must be >= 0"):
        gpt.llama_config(sliding_window=-1)
