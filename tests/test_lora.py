"""lora.py: the LoRA formula, init, training touches only A and B, merge/unmerge, adapter
files, merged checkpoints, disabled adapters, bad adapters, and parity with Hugging Face
PEFT's LoRA (skipped when peft is not installed). The finetune loop: tests/test_finetune.py."""

import copy
import json
import math

import pytest

from common import NanoError
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
import hf_io
import lora


def tiny_gpt(config, seed=0):
    torch.manual_seed(seed)
    return gpt.GPT(config).eval()


def randomize_adapters(model, seed=1):
    """B starts at zero; give it (and A) random values so the adapter actually does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.fixture
def idx(tiny_config):
    return torch.randint(0, tiny_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_is_the_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = lora.LoRALinear(base, r=4, alpha=8, use_rslora=use_rslora)
    A, B = torch.randn(4, 24), torch.randn(40, 4)
    layer.lora_A.weight.data.copy_(A)
    layer.lora_B.weight.data.copy_(B)
    scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4
    assert layer.scaling == scaling
    x = torch.randn(3, 5, 24)
    y = layer(x)
    # the same kernels in the same order: bit-identical
    assert torch.equal(y, F.linear(x, base.weight, base.bias) + F.linear(F.linear(x, A), B) * scaling)
    # and the math written out; fp32 rounding of differently ordered sums: ~1e-6 relative
    ref = x @ base.weight.T + base.bias + (x @ A.T @ B.T) * scaling
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_init_a_kaiming_b_zero_base_frozen():
    base = nn.Linear(64, 32)
    layer = lora.LoRALinear(base, r=8)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert not any(p.requires_grad for p in base.parameters())
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    half = lora.LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2)
    assert half.lora_A.weight.dtype == torch.bfloat16  # the base's float dtype
    assert half(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert lora.LoRALinear(nn.Linear(8, 8), r=2, dtype=torch.float64).lora_B.weight.dtype == torch.float64


def test_init_equals_base_exactly(tiny_config, idx):
    base = tiny_gpt(tiny_config)
    model = lora.apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.1)
    assert len(lora.lora_layers(model)) == 4 * tiny_config.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert {n.rsplit(".", 1)[-1] for n, _ in lora.lora_layers(model)} == {"c_attn", "c_proj", "c_fc"}
    assert isinstance(model.lm_head, nn.Linear)  # not a target
    assert torch.equal(logits(model, idx), logits(base, idx))
    model.train()  # adapter dropout active: B = 0 still adds exactly nothing
    assert torch.equal(logits(model, idx), logits(base, idx))


def test_only_adapters_train(tiny_config, idx):
    model = lora.apply_lora(tiny_gpt(tiny_config), r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):  # step 1 moves only B (A's grad is B^T(...) = 0); steps 2-3 move A too
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():
        if ".lora_" in k:
            assert not torch.equal(v, after[k]), f"{k} did not train"
        else:
            assert torch.equal(v, after[k]), f"frozen {k} changed"


def test_merge_unmerge(tiny_config, idx):
    model = lora.apply_lora(tiny_gpt(tiny_config), r=4, alpha=8)
    randomize_adapters(model)
    unmerged = logits(model, idx)
    weights = {n: layer.base.weight.clone() for n, layer in lora.lora_layers(model)}
    for _, layer in lora.lora_layers(model):
        layer.merge()
        layer.merge()  # idempotent: never double-counts
    merged = logits(model, idx)
    assert not torch.equal(merged, unmerged)  # the weights really changed...
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)  # ...to the same function
    for n, layer in lora.lora_layers(model):
        layer.unmerge()
        assert torch.equal(layer.base.weight, weights[n])  # bit-exact, fp32
    assert torch.equal(logits(model, idx), unmerged)


def test_merge_refuses_a_base_without_float_weight():
    class Packed(nn.Module):  # stands in for qlora_nf4.Linear4bit: bytes, not a float weight
        in_features, out_features = 8, 4

        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.zeros(16, dtype=torch.uint8))

        def forward(self, x):
            return x[..., :4] * 0

    layer = lora.LoRALinear(Packed(), r=2)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(TypeError, match="no float weight"):
        layer.merge()
    holder = nn.Module()
    holder.c_fc = Packed()
    lora.apply_lora(holder, r=2)  # wraps anything with in_features
    assert isinstance(holder.c_fc, lora.LoRALinear)
    with pytest.raises(TypeError, match="no float weight"):
        lora.merge_lora(holder)


def test_disable_adapters_gives_base(tiny_config, idx):
    base = tiny_gpt(tiny_config)
    model = lora.apply_lora(copy.deepcopy(base), r=4, alpha=8)
    randomize_adapters(model)
    adapted = logits(model, idx)
    with lora.disable_adapters(model):
        assert torch.equal(logits(model, idx), logits(base, idx))
    assert torch.equal(logits(model, idx), adapted)
    lora.set_adapters_enabled(model, False)
    assert torch.equal(logits(model, idx), logits(base, idx))
    lora.set_adapters_enabled(model, True)
    lora.lora_layers(model)[0][1].merge()
    with pytest.raises(RuntimeError, match="merged"):
        lora.set_adapters_enabled(model, False)


def test_adapter_save_load_roundtrip(tmp_path, tiny_config, idx):
    model = lora.apply_lora(tiny_gpt(tiny_config), r=4, alpha=8, use_rslora=True)
    randomize_adapters(model)
    path = tmp_path / "adapter.pt"
    lora.save_lora(path, model, base="out/ckpt.pt")
    sd = torch.load(path, weights_only=True)
    assert sd["base"] == "out/ckpt.pt" and sd["lora_config"]["use_rslora"] is True
    tensors = [k for k, v in sd.items() if torch.is_tensor(v)]
    assert set(sd) == set(tensors) | {"base", "lora_config"}
    assert len(tensors) == 2 * 4 * tiny_config.n_layer and all(".lora_" in k for k in tensors)
    fresh = lora.load_lora(tiny_gpt(tiny_config), path)  # a plain base: wrapped from the file's config
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    wrapped = lora.apply_lora(tiny_gpt(tiny_config), r=4, alpha=8, use_rslora=True)
    assert torch.equal(logits(lora.load_lora(wrapped, path), idx), logits(model, idx))


def test_merge_lora_checkpoint_loads(tmp_path, tiny_config, idx):
    model = lora.apply_lora(tiny_gpt(tiny_config), r=4, alpha=8)
    randomize_adapters(model)
    adapted = logits(model, idx)
    merged = lora.merge_lora(model)
    assert type(merged) is gpt.GPT and not lora.lora_layers(merged)
    assert set(merged.state_dict()) == set(tiny_gpt(tiny_config).state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    gpt.save_checkpoint(tmp_path / "ckpt.pt", merged, "char:abc")
    loaded, spec = gpt.load_checkpoint(tmp_path / "ckpt.pt")
    assert spec == "char:abc"
    torch.testing.assert_close(logits(loaded.eval(), idx), adapted, rtol=0, atol=1e-5)  # fp32 merge rounding


# ---------------------------------------------------------------------------------------
# PEFT parity


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_as_peft(tiny_config, idx, use_rslora):
    peft = pytest.importorskip("peft", reason="peft not installed: parity with PEFT's LoRA not checked")
    base = tiny_gpt(tiny_config)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=use_rslora,
                             target_modules=["c_attn", "c_proj", "c_fc"])
    torch.manual_seed(7)
    theirs = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    torch.manual_seed(7)
    ours = lora.apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.1, use_rslora=use_rslora)
    their_sd = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if "lora_" in k}
    our_sd = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert their_sd.keys() == our_sd.keys()
    # same seed, same init (A kaiming-uniform drawn in the same order, B zero)
    assert all(torch.equal(their_sd[k], our_sd[k]) for k in our_sd)
    randomize_adapters(ours)
    theirs.load_state_dict({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                            for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    theirs.eval()  # PEFT's new dropout modules start in train mode; ours follow the base (eval)
    assert torch.equal(logits(theirs, idx), logits(ours, idx))  # same ops in the same order
    ours.train(), theirs.train()  # adapter dropout on: the same seed draws the same masks
    torch.manual_seed(11)
    y_ours = ours(idx)[0]
    torch.manual_seed(11)
    y_theirs = theirs(idx)[0]
    assert torch.equal(y_ours, y_theirs)


def hf_gpt2(tiny_config, head=True, seed=0):
    """A random Hugging Face GPT-2 of tiny_config's shape and the same weights in our GPT."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed: PEFT files not checked")
    c = tiny_config
    hf_config = transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                                        vocab_size=c.vocab_size, bos_token_id=0, eos_token_id=0,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    hf = (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(hf_config).eval()
    return hf, gpt.GPT.from_hf_state_dict(hf.state_dict(), c).eval()


def peft_adapter(hf, folder, seed=1, **options):
    """Wrap `hf` with PEFT's LoRA, give A and B random values, save it the way PEFT does."""
    peft = pytest.importorskip("peft", reason="peft not installed: PEFT adapter files not checked")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True, **options)  # GPT-2's Conv1D layers store W as (in, out)
    model = peft.get_peft_model(hf, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("options", [dict(lora_dropout=0.1), dict(use_rslora=True)])
def test_load_peft_adapter(tmp_path, tiny_config, idx, options):
    """An adapter written by PEFT on HF's GPT2LMHeadModel loads into lora.py and gives PEFT's
    logits. fp32, max |diff| <= 1e-5: HF's Conv1D (addmm on W (in, out)) and our nn.Linear sum
    in other orders (measured 1.2e-7; the adapter itself moves the logits by ~0.5)."""
    hf, ours = hf_gpt2(tiny_config)
    theirs = peft_adapter(hf, tmp_path / "peft", **options)
    lora.load_lora(ours, tmp_path / "peft")
    assert ours.lora_config["r"] == 4 and ours.lora_config["use_rslora"] == options.get("use_rslora", False)
    assert ours.lora_config["dropout"] == options.get("lora_dropout", 0.0)
    assert len(lora.lora_layers(ours)) == 4 * tiny_config.n_layer
    with torch.no_grad():
        expected = theirs(input_ids=idx).logits
    assert not torch.allclose(expected, hf_gpt2(tiny_config)[0](input_ids=idx).logits, atol=1e-3)  # B != 0
    torch.testing.assert_close(logits(ours, idx), expected, rtol=0, atol=1e-5)
    # into a model that already has the same adapters, and merged into a plain GPT
    again = lora.load_lora(lora.apply_lora(hf_gpt2(tiny_config)[1], r=4, alpha=8, **(
        {"use_rslora": True} if options.get("use_rslora") else {})), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(again, idx), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(lora.merge_lora(ours), idx), expected, rtol=0, atol=1e-5)


def test_load_peft_adapter_of_gpt2model(tmp_path, tiny_config, idx):
    """PEFT on HF's GPT2Model (no LM head) names modules h.0.attn.c_attn, without our
    "transformer." prefix: each still lands on its layer, and the hidden states are PEFT's."""
    hf, ours = hf_gpt2(tiny_config, head=False)
    theirs = peft_adapter(hf, tmp_path / "peft")
    assert "base_model.model.h.0.attn.c_attn.lora_A.weight" in hf_io.read_safetensors(
        tmp_path / "peft" / "adapter_model.safetensors")
    lora.load_lora(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours.hidden_states(idx), theirs(input_ids=idx).last_hidden_state, rtol=0, atol=1e-5)


def test_peft_adapter_refusals(tmp_path, tiny_config):
    hf, ours = hf_gpt2(tiny_config)
    folder = tmp_path / "peft"
    peft_adapter(hf, folder)
    config = json.loads((folder / "adapter_config.json").read_text())

    def refused(message, **changes):
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(NanoError, match=message):
            lora.load_lora(copy.deepcopy(ours), folder)

    refused("uses PEFT options lora.py does not implement: use_dora", use_dora=True)
    refused("layers_to_transform, .*bias", layers_to_transform=[0], bias="all")
    refused("describes a IA3 adapter, not LoRA", peft_type="IA3")
    refused("lacks an integer 'r'", r=None)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(NanoError, match="adapter_config.json is not JSON"):
        lora.load_lora(copy.deepcopy(ours), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(NanoError, match="is not a PEFT adapter folder"):
        lora.load_lora(copy.deepcopy(ours), folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = hf_io.read_safetensors(folder / "adapter_model.safetensors")
    hf_io.write_safetensors(folder / "adapter_model.safetensors",
                          {**tensors, "base_model.model.transformer.wte.weight": torch.zeros(65, 32)})
    with pytest.raises(NanoError, match="holds 'base_model.model.transformer.wte.weight', not a LoRA A or B"):
        lora.load_lora(copy.deepcopy(ours), folder)


# ---------------------------------------------------------------------------------------
# Default targets per architecture


def lora_paths(model):
    return sorted(name for name, _ in lora.lora_layers(model))


def peft_all_linear_paths(model):
    """The modules PEFT wraps with target_modules="all-linear": every Linear (and GPT-2
    Conv1D) except the output layer."""
    peft = pytest.importorskip("peft", reason="peft not installed: default targets not compared")
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear"))
    return sorted(n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def test_default_targets_gpt2(tiny_config):
    """GPT-2: the fused q/k/v, both output projections, the MLP's up projection; PEFT's
    all-linear wraps the same modules of HF's GPT-2."""
    hf, ours = hf_gpt2(tiny_config)
    assert lora.default_targets(ours) == ("c_attn", "c_proj", "c_fc")
    lora.apply_lora(ours)
    assert ours.lora_config["targets"] == ["c_attn", "c_proj", "c_fc"]
    assert lora_paths(ours) == peft_all_linear_paths(hf)


def hf_llama(seed=0):
    """A random Hugging Face Llama (GQA, untied head) and the same weights in our GPT."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed: Llama not checked")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=65, max_position_embeddings=32, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # HF's 0.02-std init makes every logit ~0: widen it so outputs differ
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return hf, gpt.GPT.from_hf_state_dict(hf.state_dict(), gpt.GPTConfig(**hf_io.hf_config_fields(hf.config.to_dict()))).eval()


def test_default_targets_llama():
    """Llama family: q, k, v, o and the gated MLP's gate, up, down in every layer, never the
    (untied) head: in HF's spelling the same modules PEFT's all-linear picks on LlamaForCausalLM."""
    hf, ours = hf_llama()
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert lora.default_targets(ours) == lora.default_targets(hf) == names
    x = torch.randint(0, 65, (2, 9))
    before = logits(ours, x)
    lora.apply_lora(ours)
    assert len(lora.lora_layers(ours)) == 7 * 2 and type(ours.lm_head) is nn.Linear
    assert torch.equal(logits(ours, x), before)  # B = 0: still the base model
    assert sorted(hf_io.to_hf_name(n, "llama") for n in lora_paths(ours)) == peft_all_linear_paths(hf)


def test_load_peft_adapter_llama(tmp_path):
    """PEFT on HF's LlamaForCausalLM names modules model.layers.i.self_attn.q_proj: the
    adapter lands on our Llama's layers and gives PEFT's logits (fp32, <= 1e-5 as above)."""
    peft = pytest.importorskip("peft", reason="peft not installed: PEFT adapter files not checked")
    hf, ours = hf_llama()
    x = torch.randint(0, 65, (2, 11), generator=torch.Generator().manual_seed(4))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        theirs.save_pretrained(tmp_path / "peft")
        expected = theirs.eval()(input_ids=x).logits
    base = logits(ours, x)
    lora.load_lora(ours, tmp_path / "peft")
    assert ours.lora_config["targets"] == sorted(lora.DEFAULT_TARGETS["llama"])
    assert (expected - base).abs().max() > 0.1  # the adapter changes the output...
    torch.testing.assert_close(logits(ours, x), expected, rtol=0, atol=1e-5)  # ...as PEFT's does


def test_targets_refused():
    with pytest.raises(NanoError, match="no attention or MLP projection with a known name .* layers: fc"):
        lora.apply_lora(nn.Sequential(nn.ModuleDict({"fc": nn.Linear(4, 4)})))
    holder = nn.Module()
    holder.c_attn = nn.Linear(4, 4)
    with pytest.raises(NanoError, match=r"no Linear named q_proj in this model .*layers: c_attn\)"):
        lora.apply_lora(holder, targets=["c_attn", "q_proj"])
    with pytest.raises(NanoError, match="LoRA rank r must be positive"):
        lora.apply_lora(holder, r=0)
    assert holder.c_attn.weight.requires_grad  # nothing was touched


def test_bad_adapter_files(tmp_path, tiny_config):
    model = tiny_gpt(tiny_config)
    ckpt = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(ckpt, model, "gpt2")  # a full checkpoint, not an adapter
    with pytest.raises(NanoError, match="adapter file .* not found"):
        lora.load_lora(model, tmp_path / "none.pt")
    with pytest.raises(NanoError, match="not a LoRA adapter"):
        lora.load_lora(model, ckpt)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(NanoError, match="not a readable adapter"):
        lora.load_lora(model, tmp_path / "junk.pt")
    wide = gpt.GPT(gpt.GPTConfig(**{**tiny_config.__dict__, "n_embd": 64}))
    lora.save_lora(tmp_path / "wide.pt", lora.apply_lora(wide, r=4), base="wide")
    with pytest.raises(NanoError, match="has shape"):
        lora.load_lora(tiny_gpt(tiny_config), tmp_path / "wide.pt")
    with pytest.raises(NanoError, match="LoRA config"):
        lora.load_lora(lora.apply_lora(tiny_gpt(tiny_config), r=2), tmp_path / "wide.pt")
    lying = torch.load(tmp_path / "wide.pt", weights_only=True)
    lying["lora_config"]["r"] = 10**6  # would size every A as (10**6, in) before the shapes are compared
    torch.save(lying, tmp_path / "lying.pt")
    with pytest.raises(NanoError, match=r"says r=1000000 but its tensors have rank\(s\) \[4\]"):
        lora.load_lora(tiny_gpt(tiny_config), tmp_path / "lying.pt")
    with pytest.raises(ValueError, match="lm_head"):
        lora.apply_lora(tiny_gpt(tiny_config), targets=("c_attn", "lm_head"))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(lora.apply_lora(tiny_gpt(tiny_config)))
