"""lora.py: the LoRA formula, init, training touches only A and B, merge/unmerge, adapter
files, merged checkpoints, disabled adapters, the finetune CLI, bad input, and parity with
Hugging Face PEFT's LoRA (skipped when peft is not installed)."""

import copy
import json
import math

import pytest

import common
from common import NanoError
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
import hf_io
import lora
import tokenizer


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


# ---------------------------------------------------------------------------------------
# Finetune CLI


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_config, shakespeare_path):
    text = shakespeare_path.read_text()
    alphabet = "".join(sorted(set(text)))
    assert len(alphabet) == tiny_config.vocab_size
    path = tmp_path / "base" / "ckpt.pt"
    model = tiny_gpt(tiny_config)
    with torch.no_grad():
        # A 0.02-std random head caps every logit near +-0.1: adapters inside the blocks could
        # barely move the output. Scaled by 4 the tied head can express a character
        # distribution, as a pretrained one can (the base loss is then 4.3, not ln 65 = 4.17).
        model.lm_head.weight.mul_(4)
    gpt.save_checkpoint(path, model, "char:" + alphabet)
    return path, text


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# learning rate 1e-2: measured over seeds 1337/1/2 x warmup 2/5 with common.cosine_lr, every
# text run ends at val 3.81-3.82 (base 4.32); 3e-2 sat at the edge of stability (2 of those
# 6 runs blew up back to 4.05-4.27 after step 7).
CLI = ["--r", "8", "--alpha", "16", "--batch_size", "8", "--learning_rate", "1e-2", "--warmup_iters", "2",
       "--eval_interval", "30", "--eval_iters", "4", "--log_interval", "10", "--device", "cpu"]


def test_cli_text(tmp_path, tiny_ckpt, capsys):
    ckpt, text = tiny_ckpt
    jsonl_path = tmp_path / "input.txt"
    jsonl_path.write_text(text[:20_000])
    out = tmp_path / "out"
    lora.main(["--init_from", str(ckpt), "--data", str(jsonl_path), "--out_dir", str(out), "--max_iters", "30", *CLI])
    printed = capsys.readouterr().out
    assert "trainable" in printed and "peak memory" in printed and "tok/s" in printed and "ETA" in printed
    metrics = read_metrics(out)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert val[-1] < val[0] - 0.3 and val[-1] < math.log(65) - 0.2, val  # better than uniform: it learned
    # one row per step: the one warmup-cosine schedule, cumulative tokens, throughput at log steps
    steps = metrics[1:]
    assert [m["iter"] for m in metrics] == list(range(31)) and set(metrics[0]) == {"iter", "val_loss"}
    assert [m["lr"] for m in steps] == [common.cosine_lr(i, 1e-2, 1e-3, 2, 30) for i in range(30)]
    assert [m["tokens"] for m in steps] == [8 * 32 * (i + 1) for i in range(30)]
    assert [m["iter"] for m in steps if "tok_per_s" in m] == [10, 20, 30]
    adapter = out / "adapter.pt"
    assert adapter.stat().st_size < 0.5 * ckpt.stat().st_size  # the adapter alone, not the model
    sd = torch.load(adapter, weights_only=True)
    assert sd["base"] == str(ckpt) and sd["lora_config"]["r"] == 8
    model = lora.load_lora(gpt.load_checkpoint(ckpt)[0], adapter)
    assert all(torch.count_nonzero(layer.lora_B.weight) > 0 for _, layer in lora.lora_layers(model))  # B trained


def test_jsonl_masks_the_prompt(tiny_ckpt, tmp_path):
    _, text = tiny_ckpt
    tok = tokenizer.load_tokenizer("char:" + "".join(sorted(set(text))))
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text(json.dumps({"prompt": "Q: who?", "response": "A: me"}) + "\n\n")
    (ids, targets), = lora.load_jsonl(jsonl_path, tok, 0.0, block_size=32)[0]
    prompt, response = tok.encode("Q: who?"), tok.encode("A: me")
    assert ids == (prompt + response)[:-1]
    # position t predicts token t+1: the last prompt position predicts the first response token
    assert targets == [-1] * (len(prompt) - 1) + response


def test_cli_jsonl_and_merge(tmp_path, tiny_ckpt, idx):
    ckpt, _ = tiny_ckpt
    rows = [{"prompt": f"Say {w}:", "response": f" {w.upper()}!"} for w in
            ["hello", "world", "lord", "king", "queen", "sir", "madam", "good", "night", "day"]]
    jsonl_path = tmp_path / "chat.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    lora.main(["--init_from", str(ckpt), "--data", str(jsonl_path), "--out_dir", str(out), "--max_iters", "30",
               "--val_fraction", "0", "--merge", "True", *CLI])
    val = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m]
    assert val[-1] < val[0] - 0.5, val
    merged, _ = gpt.load_checkpoint(out / "ckpt_merged.pt")
    adapted = lora.load_lora(gpt.load_checkpoint(ckpt)[0], out / "adapter.pt").eval()
    torch.testing.assert_close(logits(merged.eval(), idx), logits(adapted, idx), rtol=0, atol=1e-5)


def test_cli_llama_checkpoint(tmp_path, shakespeare_path, idx):
    """lora.py on a Llama-family checkpoint: --targets auto adapts q/k/v/o and gate/up/down,
    the adapters train, and the merged checkpoint computes the adapted model."""
    text = shakespeare_path.read_text()
    config = gpt.llama_config(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, n_kv_head=1,
                              tie_embeddings=False)
    torch.manual_seed(0)
    gpt.save_checkpoint(tmp_path / "llama.pt", gpt.GPT(config), "char:" + "".join(sorted(set(text))))
    (tmp_path / "d.txt").write_text(text[:5000])
    out = tmp_path / "out"
    lora.main(["--init_from", str(tmp_path / "llama.pt"), "--data", str(tmp_path / "d.txt"), "--out_dir", str(out),
               "--max_iters", "4", "--eval_interval", "4", "--eval_iters", "1", "--log_interval", "2",
               "--batch_size", "4", "--merge", "True", "--device", "cpu"])
    assert torch.load(out / "adapter.pt", weights_only=True)["lora_config"]["targets"] == \
        list(lora.DEFAULT_TARGETS["llama"])
    adapted = lora.load_lora(gpt.load_checkpoint(tmp_path / "llama.pt")[0], out / "adapter.pt").eval()
    assert len(lora.lora_layers(adapted)) == 7 * 2
    assert all(torch.count_nonzero(layer.lora_B.weight) > 0 for _, layer in lora.lora_layers(adapted))
    merged, _ = gpt.load_checkpoint(out / "ckpt_merged.pt")
    torch.testing.assert_close(logits(merged.eval(), idx), logits(adapted, idx), rtol=0, atol=1e-5)


def test_bad_input(tmp_path, tiny_ckpt, tiny_config):
    ckpt, text = tiny_ckpt
    base = ["--init_from", str(ckpt), "--out_dir", str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="not found"):
        lora.main([*base, "--data", str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(SystemExit, match="line 2 is not JSON"):
        lora.main([*base, "--data", str(bad)])
    bad.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(SystemExit, match="'prompt' and 'response'"):
        lora.main([*base, "--data", str(bad)])
    short = tmp_path / "short.txt"
    short.write_text("First Citizen")
    with pytest.raises(SystemExit, match="fewer than block_size"):
        lora.main([*base, "--data", str(short)])
    good = tmp_path / "good.txt"
    good.write_text(text[:5000])
    with pytest.raises(SystemExit, match="--targets c_attn,nope: no Linear named nope in this model"):
        lora.main([*base, "--data", str(good), "--targets", "c_attn,nope"])
    with pytest.raises(SystemExit, match="block_size"):
        lora.main([*base, "--data", str(short), "--block_size", "999"])
    with pytest.raises(SystemExit, match="unknown model 'gpt2-tiny'"):
        lora.main(["--init_from", "gpt2-tiny", "--data", str(short)])
    with pytest.raises(SystemExit):  # argparse: a bool that is not one
        lora.main([*base, "--data", str(short), "--merge", "maybe"])
    # adapter files
    model = tiny_gpt(tiny_config)
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
    with pytest.raises(ValueError, match="lm_head"):
        lora.apply_lora(tiny_gpt(tiny_config), targets=("c_attn", "lm_head"))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(lora.apply_lora(tiny_gpt(tiny_config)))


def error_line(capsys, main, argv) -> str:
    """Run a CLI main that must refuse: exit status 2 and exactly one `error:` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# (option, bad value, the error line); every one refused before the checkpoint is read
BAD_OPTIONS = [
    ("--r", "0", "--r must be positive (got 0)"),
    ("--alpha", "-16", "--alpha must be positive (got -16.0)"),
    ("--batch_size", "0", "--batch_size must be positive (got 0)"),
    ("--grad_accum", "0", "--grad_accum must be positive (got 0)"),
    ("--max_iters", "-1", "--max_iters must be positive (got -1)"),
    ("--max_iters", "0", "--max_iters must be positive (got 0)"),
    ("--learning_rate", "-1", "--learning_rate must be positive (got -1.0)"),
    ("--learning_rate", "nan", "--learning_rate must be positive (got nan)"),
    ("--eval_interval", "0", "--eval_interval must be positive (got 0)"),
    ("--eval_iters", "0", "--eval_iters must be positive (got 0)"),
    ("--log_interval", "0", "--log_interval must be positive (got 0)"),
    ("--block_size", "-1", "--block_size must be >= 0 (got -1)"),
    ("--warmup_iters", "-1", "--warmup_iters must be >= 0 (got -1)"),
    ("--weight_decay", "-0.1", "--weight_decay must be >= 0 (got -0.1)"),
    ("--grad_clip", "-1", "--grad_clip must be >= 0 (got -1.0)"),  # clip_grad_norm_(-1) would ascend
    ("--min_lr_ratio", "1.5", "--min_lr_ratio must be in [0.0, 1.0] (got 1.5)"),
    ("--lora_dropout", "1", "--lora_dropout must be in [0, 1) (got 1.0)"),
    ("--val_fraction", "-0.1", "--val_fraction must be in [0, 1) (got -0.1)"),
    ("--dtype", "float8", "unknown dtype 'float8' (auto, float32, bfloat16, float16)"),
    ("--device", "tpu", "unknown --device 'tpu' (auto, cpu, cuda, cuda:N or mps)"),
]


@pytest.mark.parametrize("option,value,message", BAD_OPTIONS)
def test_bad_option_refused_first(tmp_path, capsys, option, value, message):
    (tmp_path / "d.txt").write_text("to be or not to be\n" * 20)
    argv = ["--init_from", str(tmp_path / "never_read.pt"), "--data", str(tmp_path / "d.txt"),
            "--out_dir", str(tmp_path / "out"), "--device", "cpu", option, value]
    assert error_line(capsys, lora.main, argv) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_bad_files_one_line(tmp_path, tiny_ckpt, capsys):
    ckpt, text = tiny_ckpt
    good = tmp_path / "good.txt"
    good.write_text(text[:5000])

    def run(data, out="out"):
        argv = ["--init_from", str(ckpt), "--device", "cpu", "--data", str(data), "--out_dir", str(tmp_path / out)]
        return error_line(capsys, lora.main, argv)

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert run(binary) == (f"error: {binary} is not UTF-8 text (NUL byte at offset 0: a binary or UTF-16 file; "
                           "convert it to UTF-8 text)")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "response": "ok"}\n'.encode("latin-1"))
    assert run(latin1) == f"error: {latin1} is not UTF-8 text (bad byte at offset 15; convert it to UTF-8)"
    (tmp_path / "a_file").write_text("x")
    assert run(good, "a_file") == f"error: --out_dir {tmp_path / 'a_file'} is a file (choose a folder)"
    assert run(good, "a_file/sub/dir") == (f"error: --out_dir {tmp_path / 'a_file/sub/dir'} is below the file "
                                          f"{tmp_path / 'a_file'} (choose a folder)")
    (tmp_path / "out" / "adapter.pt").mkdir(parents=True)
    assert run(good) == (f"error: {tmp_path / 'out' / 'adapter.pt'} is a folder, but adapter.pt is written "
                         "there (remove it or choose another --out_dir)")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before any work
    # a tokenizer with more tokens than the model has rows (was an IndexError in the embedding)
    wide = tmp_path / "wide.pt"
    gpt.save_checkpoint(wide, gpt.load_checkpoint(ckpt)[0], "char:" + "".join(sorted(set(text))) + "#%*+/<=>@^")
    assert error_line(capsys, lora.main, ["--init_from", str(wide), "--data", str(good), "--out_dir",
                                          str(tmp_path / "o2"), "--device", "cpu"]) == \
        "error: the tokenizer has 75 tokens, the model only 65 (a checkpoint with another tokenizer?)"
