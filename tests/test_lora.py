"""lora.py: the LoRA formula, init, training touches only A and B, merge/unmerge, adapter
files, merged checkpoints, disabled adapters, the finetune CLI, bad input, and parity with
Hugging Face PEFT's LoRA (skipped when peft is not installed)."""

import copy
import json
import math

import pytest

from common import NanoError
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import gpt
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


CLI = ["--r", "8", "--alpha", "16", "--batch_size", "8", "--learning_rate", "3e-2", "--warmup_iters", "2",
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
    adapter = out / "adapter.pt"
    assert adapter.stat().st_size < 0.5 * ckpt.stat().st_size  # the adapter alone, not the model
    sd = torch.load(adapter, weights_only=True)
    assert sd["base"] == str(ckpt) and sd["lora_config"]["r"] == 8
    model = lora.load_lora(gpt.load_checkpoint(ckpt)[0], adapter)
    assert all(torch.count_nonzero(layer.lora_B.weight) > 0 for _, layer in lora.lora_layers(model))  # B trained


def test_jsonl_masks_the_prompt(tiny_ckpt, tmp_path):
    _, text = tiny_ckpt
    tok = data.load_tokenizer("char:" + "".join(sorted(set(text))))
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
    with pytest.raises(SystemExit, match="check --targets"):
        lora.main([*base, "--data", str(good), "--targets", "nope"])
    with pytest.raises(SystemExit, match="block_size"):
        lora.main([*base, "--data", str(short), "--block_size", "999"])
    with pytest.raises(SystemExit, match="unknown pretrained"):
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
