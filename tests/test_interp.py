"""interp.py: the hooked forward equals gpt.GPT and TransformerLens, head scores equal its detect_head,
patching and ablation change only what they should, the tools and every subcommand run, and
induction heads appear (a few steps by default; the whole experiment is marked slow)."""

import math

import pytest
import torch

import gpt
import interp
from common import NanoError

V = 40  # the TransformerLens tests' word-level vocabulary: "t0" ... "t39"


def tiny(arch="gpt2", seed=0, **fields):
    torch.manual_seed(seed)
    make = gpt.llama_config if arch == "llama" else gpt.GPTConfig
    model = gpt.GPT(make(**{**dict(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32), **fields}))
    for p in model.parameters():  # larger than the 0.02 init, so heads attend unevenly
        p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


MODELS = {
    "gpt2": lambda: tiny(),
    "gpt2-exact-gelu-no-bias": lambda: tiny(gelu="exact", bias=False),
    "llama-gqa": lambda: tiny("llama", n_kv_head=2, tie_embeddings=False),
    "qwen3-qk-norm": lambda: tiny("llama", n_kv_head=2, qk_norm=True, head_dim=16),
    "llama3-rope-scaling": lambda: tiny("llama", rope_scaling=8.0, rope_original_max_position=16),
    "mistral-sliding-window": lambda: tiny("llama", n_kv_head=2, sliding_window=6),  # 20 tokens: past it
    "attention-only": lambda: interp.attention_only(tiny(rope_theta=10000.0)),
}


@pytest.mark.parametrize("name", MODELS)
def test_hooked_forward_equals_gpt_logits(name):
    # SDPA and the written-out softmax(q k^T / sqrt(d)) v sum in different orders: fp32 rounding,
    # measured <= 2e-6 on these logits; 1e-5 leaves room for other CPUs' kernels.
    model = MODELS[name]()
    idx = torch.randint(0, V, (3, 20))
    logits, cache = interp.run_with_cache(model, idx)
    torch.testing.assert_close(logits, model(idx)[0], atol=1e-5, rtol=0)
    assert list(cache) == interp.hook_names(model)
    n_head, n_kv_head, head_dim = interp.head_shape(model.transformer.h[0].attn)
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, n_head, 20, 20)
    assert cache["blocks.0.attn.hook_k"].shape == (3, 20, n_kv_head, head_dim)


def test_attention_only_model_has_no_mlp_hooks():
    names = interp.hook_names(MODELS["attention-only"]())
    assert "blocks.0.attn.hook_rot_q" in names and "hook_pos_embed" not in names
    assert not [n for n in names if "mlp" in n or "resid_mid" in n or "ln2" in n]


def test_unknown_hook_names_fail():
    model = tiny()
    with pytest.raises(NanoError, match="blocks.0.hook_resid_middle"):
        interp.run_with_hooks(model, torch.zeros(1, 3, dtype=torch.long), [("blocks.0.hook_resid_middle", lambda x, n: x)])
    with pytest.raises(NanoError, match="no hook named"):
        interp.run_with_cache(model, torch.zeros(1, 3, dtype=torch.long), names=["blocks.9.hook_resid_pre"])


# ----------------------------------------------------------------------------------------
# TransformerLens 4.3 as the reference


@pytest.fixture(scope="module")
def tl():
    return pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens cannot be installed here "
                               "(pip install transformer-lens): the TransformerLens comparisons skip")


def tl_model(model, tl):
    """TransformerLens' hooked model of our weights. TransformerLens 4 replaced HookedTransformer by
    TransformerBridge: a Hugging Face model (built here from our state dict) run with
    HookedTransformer's hook names and numerics (enable_compatibility_mode), its weight
    processing off: no LayerNorm folding, no centring, no value-bias folding."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    c = model.config
    if c.arch == "gpt2":
        hf_config = transformers.GPT2Config(vocab_size=V, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                                            n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=c.norm_eps)
        hf, name = transformers.GPT2LMHeadModel(hf_config), "gpt2"
    else:
        hf_config = transformers.LlamaConfig(
            vocab_size=V, hidden_size=c.n_embd, intermediate_size=model.transformer.h[0].mlp.up_proj.out_features,
            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            num_key_value_heads=interp.head_shape(model.transformer.h[0].attn)[1],
            max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_embeddings)
        hf, name = transformers.LlamaForCausalLM(hf_config), "meta-llama/Llama-3.2-1B"
    missing, unexpected = hf.load_state_dict(model.to_hf_state_dict(), strict=False)
    assert not unexpected and all(k.endswith("attn.bias") or k.endswith("masked_bias") for k in missing)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0")
    bridge = tl.TransformerBridge.boot_transformers(name, hf_model=hf.eval(), tokenizer=tokenizer, device="cpu")
    bridge.enable_compatibility_mode(fold_ln=False, center_writing_weights=False, center_unembed=False,
                                     fold_value_biases=False, disable_warnings=True)
    bridge.cfg.default_prepend_bos = False  # our sequences are the tokens as given
    return bridge


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_every_hook_equals_transformer_lens(name, tl):
    model = MODELS[name]()
    idx = torch.randint(0, V, (2, 12))
    ref_logits, ref = tl_model(model, tl).run_with_cache(idx)
    logits, cache = interp.run_with_cache(model, idx)
    assert set(cache) <= set(ref.keys()), set(cache) - set(ref.keys())
    for hook_name, value in cache.items():  # measured <= 1.1e-6 (hook_normalized: / scale vs * rsqrt)
        torch.testing.assert_close(value, ref[hook_name], atol=1e-5, rtol=0, msg=hook_name)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_head_scores_equal_detect_head(tl):
    from transformer_lens import head_detector

    model = tiny()
    bridge = tl_model(model, tl)
    span = [f"t{i}" for i in torch.randperm(V)[:8].tolist()]
    prompts = [" ".join(span + span), " ".join(f"t{i}" for i in torch.randint(0, V, (16,)).tolist())]
    idx = torch.cat([bridge.to_tokens(p) for p in prompts])
    for kind in interp.HEAD_KINDS:
        for options in (dict(), dict(exclude_bos=True, exclude_current_token=True), dict(error_measure="abs")):
            ref = head_detector.detect_head(bridge, prompts, kind + "_head", **options)
            torch.testing.assert_close(interp.head_scores(model, idx, kind, **options), ref, atol=1e-6, rtol=0,
                                       msg=f"{kind} {options}")


# ----------------------------------------------------------------------------------------
# Patching and ablation


def test_patching_a_hook_with_its_own_value_is_bitwise_identity():
    model = MODELS["llama-gqa"]()
    idx = torch.randint(0, V, (2, 10))
    logits, cache = interp.run_with_cache(model, idx)
    patched = interp.run_with_hooks(model, idx, [(name, lambda x, name: cache[name].clone()) for name in cache])
    assert torch.equal(patched, logits)
    assert torch.equal(interp.run_with_hooks(model, idx), logits)  # no hooks: the same forward


def test_zero_ablating_a_head_changes_only_what_it_should():
    model = tiny()
    idx = torch.randint(0, V, (2, 10))
    _, clean = interp.run_with_cache(model, idx)
    layer, head = 1, 2

    def ablate(z, name):
        z = z.clone()
        z[:, :, head] = 0
        return z

    hooks = interp.Hooks(names=None, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    with torch.no_grad():
        logits = interp.hooked_forward(model, idx, hooks)
    ablated = hooks.cache
    upstream = interp.hook_names(model)[:interp.hook_names(model).index(f"blocks.{layer}.attn.hook_z")]
    for name in upstream:  # everything computed before the head's output: bitwise the same
        assert torch.equal(ablated[name], clean[name]), name
    z, z_clean = ablated[f"blocks.{layer}.attn.hook_z"], clean[f"blocks.{layer}.attn.hook_z"]
    assert torch.equal(z[:, :, head], torch.zeros_like(z[:, :, head]))
    others = [h for h in range(z.shape[2]) if h != head]
    assert torch.equal(z[:, :, others], z_clean[:, :, others])
    # the attention output loses exactly that head's term of the residual stream
    term = interp.residual_terms(model, clean)[f"L{layer}H{head}"]
    torch.testing.assert_close(ablated[f"blocks.{layer}.hook_attn_out"], clean[f"blocks.{layer}.hook_attn_out"] - term,
                               atol=1e-6, rtol=0)
    assert not torch.allclose(logits, model(idx)[0])


# ----------------------------------------------------------------------------------------
# The tools


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_direct_logit_attribution_adds_up_to_the_logit_difference(name):
    model = MODELS[name]()
    idx = torch.randint(0, V, (2, 10))
    dla = interp.direct_logit_attribution(model, idx, answer=3, wrong=7)
    assert dla["heads"].shape == (2, 4)
    total = dla["heads"].sum().item() + sum(dla["other"].values())
    assert total == pytest.approx(dla["logit_diff"], abs=1e-4)  # an exact decomposition: fp32 sums only


def test_logit_lens_last_row_is_the_models_prediction():
    model = tiny()
    idx = torch.randint(0, V, (1, 12))
    lens = interp.logit_lens(model, idx)
    assert lens["top"].shape == (3, 12) and lens["rank"].shape == (3, 11)
    assert torch.equal(lens["top"][-1], model(idx)[0][0].argmax(-1))
    assert ((lens["rank"] == 0) == (lens["top"][:, :-1] == idx[0, 1:])).all()
    assert (lens["logprob"] <= 0).all()


def test_activation_patching_restores_where_the_prompts_differ():
    model = tiny()
    clean = torch.randint(0, V, (1, 8))
    corrupted = clean.clone()
    corrupted[0, 3] = (clean[0, 3] + 1) % V
    restored = interp.activation_patching(model, clean, corrupted, answer=5, wrong=9)
    assert restored.shape == (2, 8)
    assert restored[0, 3].item() == pytest.approx(1.0, abs=1e-5)  # the whole difference enters there
    assert (restored[0, [0, 1, 2, 4, 5, 6, 7]] == 0).all()  # the other positions hold the same tokens
    assert (restored[:, :3] == 0).all()  # causal: earlier positions never saw the change
    with pytest.raises(NanoError, match="same length"):
        interp.activation_patching(model, clean, corrupted[:, :-1], 5, 9)


def test_compare_models_is_zero_for_the_same_model():
    model, other = tiny(), tiny(seed=1)
    prompts = [torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 5))]
    same = interp.compare_models(model, model, prompts)
    assert same["resid_change"].abs().max() == 0 and same["pattern_tv"].abs().max() == 0
    assert same["resid_cosine"].tolist() == pytest.approx([1.0, 1.0])
    moved = interp.compare_models(model, other, prompts)
    assert (moved["resid_change"] > 0.1).all() and moved["pattern_tv"].shape == (2, 4)
    with pytest.raises(NanoError, match="n_layer"):
        interp.compare_models(model, tiny(n_layer=3), prompts)


def test_repeated_spans_mask_marks_the_copies():
    x, mask = interp.repeated_spans(16, 49, 64, 8, 24, torch.Generator().manual_seed(0))
    assert (x[:, 0] == 0).all() and (x[:, 1:] > 0).all()
    for row, m in zip(x, mask):
        S = int(m.int().argmax()) - 2  # the first marked token is the second of the second copy
        assert torch.equal(row[1 + S:], row[1:49 - S]) and m.sum() == 49 - S - 2


# ----------------------------------------------------------------------------------------
# The command line and the induction experiment


@pytest.fixture
def checkpoints(tmp_path):
    """A tiny char-level base checkpoint and a 'tuned' one: the base with noise added."""
    alphabet = "".join(sorted(set(interp.DEFAULT_PROMPT + interp.DEFAULT_CORRUPTED + interp.DEFAULT_COMPARE_PROMPTS)))
    model = tiny(vocab_size=len(alphabet), block_size=64, n_head=2)
    gpt.save_checkpoint(tmp_path / "base.pt", model, "char:" + alphabet)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    gpt.save_checkpoint(tmp_path / "tuned.pt", model, "char:" + alphabet)
    return tmp_path


def test_every_subcommand_runs(checkpoints, capsys):
    base = str(checkpoints / "base.pt")
    assert interp.main(["patterns", "--init_from", base, "--plot", str(checkpoints / "p.png")]).is_file()
    for argv in (["head-scores", "--span", "8"], ["logit-lens"], ["attribution", "--answer", "f", "--wrong", "s"],
                 ["patch", "--answer", "l", "--wrong", "u", "--prompt", "I will fly. I will f",
                  "--corrupted", "I will run. I will f"]):
        interp.main(argv + ["--init_from", base, "--plot", "none"])
    out = capsys.readouterr().out
    assert "induction: best head" in out and "after L1" in out and "(the rank of the right next token)" in out and "top heads" in out and "restored by hook_resid_pre" in out
    with pytest.raises(SystemExit):
        interp.main(["patch", "--init_from", base, "--corrupted", "ROMEO", "--plot", "none"])
    assert "same length" in capsys.readouterr().err


def test_base_vs_tuned_prints_a_table_and_saves_a_picture(checkpoints, capsys):
    picture = checkpoints / "cmp.png"
    results = interp.main(["base-vs-tuned", "--base", str(checkpoints / "base.pt"),
                           "--tuned", f"{checkpoints / 'tuned.pt'},{checkpoints / 'base.pt'}", "--plot", str(picture)])
    assert results == picture and picture.stat().st_size > 0
    out = capsys.readouterr().out
    assert out.count("layer  resid change") == 2 and "    1  " in out


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        interp.main(["induction", "--help"])
    out = capsys.readouterr().out
    assert "--steps INT" in out and "(default: 600)" in out
    with pytest.raises(SystemExit):
        interp.main(["--help"])
    assert "base-vs-tuned" in capsys.readouterr().out


def test_tiny_induction_run(tmp_path, capsys):
    picture = tmp_path / "induction.png"
    interp.main(["induction", "--seeds", "1", "--steps", "4", "--eval_interval", "2", "--eval_rows", "4",
                 "--batch_size", "8", "--plot", str(picture)])
    assert picture.is_file() and picture.with_suffix(".json").is_file()
    result = interp.induction_experiment(interp.InductionConfig(seeds=1, steps=2, eval_interval=2, eval_rows=4, batch_size=8),
                                         log=lambda line: None)
    rows = result["runs"]["2-layer"][0]
    assert [r["step"] for r in rows] == [0, 2] and set(result["runs"]) == {"2-layer", "1-layer"}
    assert rows[0]["repeat_loss"] == pytest.approx(math.log(64), abs=0.3)  # untrained: about uniform
    assert "loss on repeats" in capsys.readouterr().out


@pytest.mark.slow
def test_induction_heads_appear_in_two_layers_only():
    result = interp.induction_experiment(interp.InductionConfig())
    two, one = ([rows[-1] for rows in result["runs"][k]] for k in ("2-layer", "1-layer"))
    assert all(r["induction"] >= 0.5 and r["repeat_loss"] < 0.5 for r in two), two
    assert all(r["induction"] < 0.2 and r["repeat_loss"] > 2.0 for r in one), one
