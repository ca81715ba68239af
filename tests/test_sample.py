"""sample.py: KV cache == recomputation, batching, sampling helpers, speculative decoding, CLI."""

import copy
import math

import pytest
import torch

import gpt
import sample
from common import NanoError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def random_gpt(seed, block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, std=0.3):
    """A random GPT with weights large enough that its next-token distributions are far
    from uniform: greedy output then varies from token to token (GPT-2's init, std 0.02,
    gives near-uniform logits and a greedy run that repeats one token), and two such
    models disagree, which speculative decoding needs to be tested at all."""
    torch.manual_seed(seed)
    config = gpt.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = gpt.GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "wpe" in name else std)  # distinct positions matter more
    return model


def random_llama(seed, block_size=32, vocab_size=65, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, std=0.3):
    """A random Llama-family model (RMSNorm, RoPE, SwiGLU, GQA), weights scaled as random_gpt's."""
    torch.manual_seed(seed)
    config = gpt.llama_config(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                              n_kv_head=n_kv_head, n_embd=n_embd, tie_embeddings=False)
    model = gpt.GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


def noisy_copy(model, noise=0.05, seed=5):
    """A draft model that agrees with the target part of the time (a stand-in for a small
    model distilled from it): the target's weights plus Gaussian noise."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return draft


def greedy(model, prompt, n, **kw):
    return torch.stack(list(sample.generate(model, prompt, n, temperature=0, **kw)), dim=1)  # (B, n)


def chi2_critical(df, z=3.719):
    """Upper critical value of chi-square with df degrees of freedom at the one-sided
    normal quantile z (3.719: a 1e-4 false-alarm rate), by the Wilson-Hilferty cube
    approximation (within ~1% of the exact value for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_stat(counts, probs):
    """Pearson's chi-square of observed counts against probabilities, cells with an
    expected count under 5 merged into one (the usual validity condition); returns (stat, df)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected.clamp(min=1e-12)).sum().item()
    return stat, len(counts) - 1


# ---------------------------------------------------------------------------------------
# KV cache


def test_cache_step_writes_in_place():
    cache = sample.KVCache(2, 3, 8, 4)
    k_buf = cache.k
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k_all, v_all = cache.update(torch.tensor([5, 6]), k, v)
    assert k_all is k_buf and k_all.shape == (2, 3, 8, 4)  # static buffer, no growth
    assert torch.equal(k_all[:, :, 5:7], k) and torch.equal(v_all[:, :, 5:7], v)
    assert k_all[:, :, :5].abs().sum() == 0


def test_window_slides_by_half_a_block():
    """window_start is the closed form of: when the window would exceed block_size,
    keep its newest block_size // 2 tokens."""
    for block_size in (1, 2, 5, 32):
        start = 0
        for length in range(1, 200):
            if length - start > block_size:
                start = length - max(1, block_size // 2)
            assert sample.window_start(length, block_size) == start, (block_size, length)


def test_generate_matches_plain_forward_greedy():
    """Up to block_size, cached greedy == nanoGPT's loop (full forward, argmax of the last logits)."""
    model = random_gpt(0)
    prompt = torch.randint(0, 65, (1, 10), generator=torch.Generator().manual_seed(1))
    idx = prompt
    with torch.no_grad():
        for _ in range(22):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy(model, prompt, 22), idx[:, 10:])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_simple_equals_generate(arch):
    """On equal-length prompts that fit the window, the one-screen loop gives generate()'s
    tokens exactly: greedy at batch 1 and 2, and seeded sampling with top-k and top-p (the
    same generator draws; batch 2, where generate's head is the same F.linear as lm_head)."""
    model = random_gpt(0) if arch == "gpt2" else random_llama(0)
    prompts = torch.randint(0, 65, (2, 9), generator=torch.Generator().manual_seed(1))
    for idx in (prompts[:1], prompts):
        assert torch.equal(sample.generate_simple(model, idx, 23, temperature=0), greedy(model, idx, 23))
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    got = sample.generate_simple(model, prompts, 23, generator=sample.sample_generator(7, "cpu"), **kw)
    assert torch.equal(got, torch.stack(list(sample.generate(model, prompts, 23, seed=7, **kw)), dim=1))
    with pytest.raises(NanoError, match="exceed block_size"):
        sample.generate_simple(model, prompts, 24)


def test_cache_equals_no_cache_past_block_size():
    model = random_gpt(0)
    prompt = torch.randint(0, 65, (1, 10), generator=torch.Generator().manual_seed(1))
    cached = greedy(model, prompt, 120)  # 130 tokens in a 32-token window: 7 slides
    uncached = greedy(model, prompt, 120, use_cache=False)
    assert len(set(cached[0].tolist())) > 8  # a varied sequence, not one token repeated
    assert torch.equal(cached, uncached)


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = random_gpt(0)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 65, (n,), generator=g).tolist() for n in (3, 12, 7)]
    batched = greedy(model, prompts, 60)  # past block_size: each row slides at its own step
    for row, p in enumerate(prompts):
        assert torch.equal(batched[row], greedy(model, [p], 60)[0]), f"row {row}"
    assert torch.equal(batched, greedy(model, prompts, 60, use_cache=False))


def test_rope_ring_cache_equals_recomputation_past_block_size():
    """RoPE: the cache is a ring of block_size slots and the window slides one token at a
    time with no re-prefill. Reference: every step recomputed from scratch with each query
    seeing the last block_size tokens at every layer (use_cache=False)."""
    model = random_llama(0)
    prompt = torch.randint(0, 65, (1, 10), generator=torch.Generator().manual_seed(1))
    cached = greedy(model, prompt, 100)  # 110 tokens through a 32-token window
    assert len(set(cached[0].tolist())) > 8
    assert torch.equal(cached, greedy(model, prompt, 100, use_cache=False))


def test_rope_one_layer_ring_equals_each_window_from_scratch():
    """With one layer a cached key depends on its own token and position only, so by RoPE's
    relative positions the ring cache equals re-running the last block_size tokens alone at
    positions 0.. (logits to 1e-5: fp32, the angles of positions up to 42 vs up to 11)."""
    model = random_llama(3, block_size=12, n_layer=1)
    tokens = [5, 9, 3]
    cache = sample.make_cache(model, 1, 12)
    logits = sample.prefill(model, torch.tensor([tokens]), cache)
    for step in range(40):
        window = torch.tensor([tokens[-12:]])
        with torch.no_grad():
            scratch = model(window)[0][:, -1]
        torch.testing.assert_close(logits, scratch, rtol=0, atol=1e-5)
        tokens.append(int(logits.argmax()))
        logits = sample.decode_one_token(model, torch.tensor([[tokens[-1]]]), torch.tensor([len(tokens) - 1]), cache)
    assert len(set(tokens)) > 8


def test_rope_batched_prompts_equal_each_alone_past_block_size():
    model = random_llama(1)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 65, (n,), generator=g).tolist() for n in (3, 12, 7)]
    batched = greedy(model, prompts, 45)
    for b, p in enumerate(prompts):
        assert torch.equal(batched[b], greedy(model, [p], 45)[0]), b
    assert torch.equal(batched, greedy(model, prompts, 45, use_cache=False))


def test_cache_holds_the_key_value_heads():
    model = random_llama(0, n_head=4, n_kv_head=1)
    cache = sample.make_cache(model, 3, 20)
    assert cache[0].k.shape == (3, 1, 20, 8)  # MQA: one key/value head of head_dim 8
    assert sample.kv_bytes_per_token(model.config) * 4 == sample.kv_bytes_per_token(model.config, n_kv_head=4)


def test_batched_sampling_is_seeded_and_eos_stops_rows():
    model = random_gpt(0)
    prompts = [[1, 2, 3], [4, 5]]
    kw = dict(temperature=1.0, top_k=20, seed=7)
    a = torch.stack(list(sample.generate(model, prompts, 30, **kw)), 1)
    b = torch.stack(list(sample.generate(model, prompts, 30, **kw)), 1)
    assert torch.equal(a, b)
    eos = int(a[0, 4])
    c = torch.stack(list(sample.generate(model, prompts, 30, eos_id=eos, **kw)), 1)
    first = c[0].tolist().index(eos)
    assert (c[0, first:] == eos).all()  # a finished row keeps yielding eos
    ends = [r.index(eos) + 1 if eos in r else 30 for r in c.tolist()]
    assert c.shape[1] == max(ends)  # generation stops once every row has finished


def test_compiled_decode_does_not_recompile():
    from torch._dynamo.utils import counters

    model = random_gpt(0)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    torch._dynamo.reset()
    counters.clear()
    # dynamo's graph capture and guards are the same for every backend; "eager" skips
    # inductor's code generation, which is slow and not what is being tested here
    step = sample.compile_decode(backend="eager")
    compiled = greedy(model, prompt, 56, decode_fn=step)  # 55 decode steps, one slide
    assert counters["stats"]["calls_captured"] > 0, "the decode step was not compiled"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert torch.equal(compiled, greedy(model, prompt, 56))
    torch._dynamo.reset()


def test_compiled_rope_decode_does_not_recompile_through_the_ring():
    from torch._dynamo.utils import counters

    model = random_llama(0, block_size=16)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    torch._dynamo.reset()
    counters.clear()
    compiled = greedy(model, prompt, 40, decode_fn=sample.compile_decode(backend="eager"))  # wraps twice
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["stats"])
    assert torch.equal(compiled, greedy(model, prompt, 40))
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager():
    model = random_gpt(0)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(greedy(model, prompt, 40, decode_fn=sample.compile_decode()), greedy(model, prompt, 40))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    torch._dynamo.reset()


def test_greedy_matches_hugging_face_generate():
    transformers = pytest.importorskip("transformers", reason="reference implementation of GPT-2 generation")
    model = random_gpt(3, block_size=64)
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()
    missing, unexpected = hf.load_state_dict(model.to_hf_state_dict(), strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing)  # only HF's causal-mask buffers
    prompt = torch.tensor([[5, 9, 3, 17, 1, 40]])
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, min_new_tokens=40,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(greedy(model, prompt, 40), ref[:, 6:])


# ---------------------------------------------------------------------------------------
# Sampling helpers


def test_top_k_1_equals_greedy():
    model = random_gpt(0)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    sampled = torch.stack(list(sample.generate(model, prompts, 50, temperature=1.3, top_k=1, seed=0)), 1)
    assert torch.equal(sampled, greedy(model, prompts, 50))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # sorted: 1 (.5), 3 (.2), 4 (.15), 2 (.1), 0 (.05)
    logits = probs.log()
    expected = {1e-6: {1}, 0.45: {1}, 0.6: {1, 3}, 0.8: {1, 3, 4}, 0.9: {1, 2, 3, 4}, 0.97: {0, 1, 2, 3, 4},
                1.0: {0, 1, 2, 3, 4}}
    for p, keep in expected.items():
        kept = torch.isfinite(sample.top_p_filter(logits[None], p)[0]).nonzero().flatten().tolist()
        assert set(kept) == keep, p
    # the kept tokens are renormalised among themselves
    assert torch.allclose(sample.logits_to_probs(logits, top_p=0.6), torch.tensor([0, 5 / 7, 0, 2 / 7, 0]))


def test_top_p_kept_set_is_exact_at_gpt2_vocab():
    """The kept set equals the count from fp64 probabilities (tokens whose higher-ranked mass
    is < p), at V=50257 where a top-down fp32 sum drops tail tokens; also Hugging Face's."""
    for seed, scale in ((0, 3.0), (1, 1.0), (2, 6.0)):
        torch.manual_seed(seed)
        x = torch.randn(2, 50257) * scale
        for p in (0.9, 0.99, 0.999, 0.9999):
            probs = x.double().softmax(-1).sort(descending=True).values
            exact = ((probs.cumsum(-1) - probs) < p).sum(-1)
            assert torch.equal(torch.isfinite(sample.top_p_filter(x, p)).sum(-1), exact), (seed, p)
    torch.manual_seed(0)
    x = torch.randn(1, 50257) * 3
    assert int(torch.isfinite(sample.top_p_filter(x, 0.999)).sum()) == 26310


def test_top_k_keeps_k():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert torch.isfinite(sample.top_k_filter(logits, 2)).nonzero()[:, 1].tolist() == [1, 3]


def test_repetition_penalty_follows_hf_convention():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    # seen and positive: divided; seen and negative: multiplied; unseen: unchanged
    assert torch.equal(sample.apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, -3.0]]))
    transformers = pytest.importorskip("transformers", reason="reference repetition penalty / top-p")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    assert torch.allclose(sample.apply_repetition_penalty(scores, seen, 1.7), ref)
    for p in (0.3, 0.7, 0.95):
        ref = transformers.TopPLogitsWarper(p)(ids, scores.clone())
        assert torch.equal(torch.isinf(sample.top_p_filter(scores, p)), torch.isinf(ref)), p


def test_repetition_penalty_changes_generation():
    model = random_gpt(0)
    prompt = [[1, 2, 3]]
    plain = greedy(model, prompt, 30)[0].tolist()
    penalized = greedy(model, prompt, 30, repetition_penalty=5.0)[0].tolist()
    assert len(set(penalized)) > len(set(plain))  # fewer repeats


# ---------------------------------------------------------------------------------------
# Speculative decoding


def test_speculative_greedy_equals_target_greedy():
    target = random_gpt(0)
    draft = noisy_copy(target)
    prompt = torch.randint(0, 65, (1, 10), generator=torch.Generator().manual_seed(1))
    reference = greedy(target, prompt, 110)[0]  # past block_size
    for k in (1, 3, 5):
        stats = {}
        spec = torch.cat(list(sample.speculative_generate(target, draft, prompt, 110, k, temperature=0, stats=stats)))
        assert torch.equal(spec, reference), k
        assert 0 < stats["accepted"] < stats["proposed"]  # both the accept and the reject path ran
        assert stats["new_tokens"] == 110
    stats = {}  # a draft that is the target itself: every draft accepted, k+1 tokens per target pass
    spec = torch.cat(list(sample.speculative_generate(target, target, prompt, 110, 4, temperature=0, stats=stats)))
    assert torch.equal(spec, reference)
    assert stats["accepted"] == stats["proposed"]


def test_speculative_rope_greedy_equals_target_greedy():
    """A Llama target and a draft of the same family, past block_size: the rings of both
    (block_size + k slots) slide with the drafts and rollbacks."""
    target = random_llama(0)
    draft = noisy_copy(target, noise=0.08)
    prompt = [1, 2, 3, 4, 5, 6]
    reference = greedy(target, [prompt], 90)[0]
    for k in (1, 4):
        stats = {}
        spec = torch.cat(list(sample.speculative_generate(target, draft, prompt, 90, k, temperature=0, stats=stats)))
        assert torch.equal(spec, reference), k
        assert 0 < stats["accepted"] < stats["proposed"]


def test_speculative_accept_gives_the_target_distribution():
    """The verification rule alone, on hand-made p and q and 200k independent rows: the
    first emitted token must follow p_1, the second (when the first draft was accepted)
    p_2, the bonus p_3. Tolerance: Pearson chi-square below its 1e-4 critical value, so a
    correct rule fails with probability 1e-4 (the seed is fixed, so the test is
    deterministic); the same statistic against q is also computed and must be far above,
    which shows the test can tell the two distributions apart."""
    g = torch.Generator().manual_seed(0)
    V, N = 4, 200_000
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.6, 0.1, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(2)], 1)
    n_acc, nxt = sample.speculative_accept(p.expand(N, 3, V), q.expand(N, 2, V), drafts, g)
    first = torch.where(n_acc >= 1, drafts[:, 0], nxt)
    second = torch.where(n_acc >= 2, drafts[:, 1], nxt)[n_acc >= 1]
    bonus = nxt[n_acc == 2]
    crit = chi2_critical(V - 1)
    for tokens, target, draft in ((first, p[0], q[0]), (second, p[1], q[1]), (bonus, p[2], None)):
        counts = torch.bincount(tokens, minlength=V)
        stat, df = chi2_stat(counts, target)
        assert stat < chi2_critical(df), (stat, counts)
        if draft is not None:
            assert chi2_stat(counts, draft)[0] > 100 * crit
    # acceptance rate of the first draft = sum_x min(p, q) (Leviathan et al., eq. 1)
    assert abs((n_acc >= 1).float().mean().item() - torch.minimum(p[0], q[0]).sum().item()) < 0.01


def test_speculative_sampling_matches_the_target_end_to_end():
    """Two tokens after a one-token prompt from real (tiny-vocab) models, 1500 runs with
    k=2: their joint distribution must match the target's p(x1) p(x2 | x1), computed
    exactly from two target forward passes. Tolerance: chi-square at a 1e-4 false-alarm
    rate (see chi2_critical); the draft's own joint must be rejected by the same test."""
    V = 5
    target = random_gpt(10, vocab_size=V, n_layer=1, n_embd=16, std=0.6)
    draft = random_gpt(11, vocab_size=V, n_layer=1, n_embd=16, std=0.6)
    prompt = [2]

    def joint(model):
        with torch.no_grad():
            p1 = model(torch.tensor([prompt]))[0][0, -1].softmax(-1)  # (V,)
            p2 = model(torch.tensor([prompt + [a] for a in range(V)]))[0][:, -1].softmax(-1)  # (V, V)
        return p1[:, None] * p2

    p_joint, q_joint = joint(target), joint(draft)
    counts = torch.zeros(V, V)
    stats, total = {}, {"accepted": 0, "proposed": 0}
    for trial in range(1500):
        x1, x2 = (int(t) for t in sample.speculative_generate(target, draft, prompt, 2, 2, temperature=1.0,
                                                              seed=trial, stats=stats))
        counts[x1, x2] += 1
        total["accepted"] += stats["accepted"]
        total["proposed"] += stats["proposed"]
    assert 0.2 < total["accepted"] / total["proposed"] < 0.9  # the draft disagrees often enough to matter
    stat, df = chi2_stat(counts, p_joint)
    assert stat < chi2_critical(df), stat
    assert chi2_stat(counts, q_joint)[0] > chi2_critical(df)


def test_speculative_with_penalty_and_filters_runs():
    target = random_gpt(0)
    draft = noisy_copy(target)
    stats = {}
    out = list(sample.speculative_generate(target, draft, [1, 2, 3], 60, 3, temperature=0.9, top_k=10, top_p=0.9,
                                           repetition_penalty=1.3, seed=0, stats=stats))
    assert len(out) == 60 and stats["new_tokens"] == 60
    # greedy with a repetition penalty still equals the target's penalized greedy
    ref = greedy(target, [[1, 2, 3]], 60, repetition_penalty=1.3)[0]
    spec = torch.cat(list(sample.speculative_generate(target, draft, [1, 2, 3], 60, 3, temperature=0,
                                                      repetition_penalty=1.3)))
    assert torch.equal(spec, ref)


# ---------------------------------------------------------------------------------------
# CLI

ALPHABET = "\n abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(path, random_gpt(0, vocab_size=len(ALPHABET)), "char:" + ALPHABET)
    return path


def run_cli(*args):
    return sample.main(["--device", "cpu", *map(str, args)])


def test_cli_cache_no_cache_and_draft_agree(ckpt, tmp_path, capsys):
    draft = tmp_path / "draft.pt"
    gpt.save_checkpoint(draft, random_gpt(1, vocab_size=len(ALPHABET), n_layer=1, n_embd=16), "char:" + ALPHABET)
    common = ("--ckpt", ckpt, "--prompt", "to be", "--max_new_tokens", 60, "--temperature", 0)
    cached = run_cli(*common)
    err = capsys.readouterr().err
    assert "prefill:" in err and "decode:" in err and "tok/s" in err
    assert cached[0].startswith("to be") and len(cached[0]) == 65
    assert run_cli(*common, "--no_cache", "True") == cached
    assert run_cli(*common, "--draft", draft, "--num_draft_tokens", 3) == cached
    assert "acceptance rate" in capsys.readouterr().err
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("to be")
    assert run_cli(*common, "--prompt_file", prompt_file) == cached


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_on_prepacked_weights_is_as_close_to_fp32_as_plain_bf16(ckpt, arch):
    """--dtype bfloat16 on a CPU runs the Linears through oneDNN's prepacked layout (a bf16 1-row
    product is fast there, not in F.linear). The logits of 3 x 40 tokens then differ from the fp32
    model's no more than the plain bf16 model's do (the same bf16 rounding in another order: the
    mean error within 10% of plain bf16's; single extremes move either way); and the CLI samples with it."""
    torch.manual_seed(0)
    size = dict(vocab_size=65, n_layer=2, n_embd=32, block_size=64)
    config = gpt.GPTConfig(n_head=2, **size) if arch == "gpt2" else gpt.llama_config(n_head=4, n_kv_head=2, **size)
    model = gpt.GPT(config).eval()
    x = torch.randint(0, 65, (3, 40))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)  # logits of a few units, as a trained model's
        want = model(x)[0]
        plain = (copy.deepcopy(model).to(torch.bfloat16)(x)[0].float() - want).abs()
        packed = sample.pack_linears(copy.deepcopy(model).to(torch.bfloat16), rows=1)
        assert not any(type(m) is torch.nn.Linear for m in packed.modules())
        err = (packed(x)[0].float() - want).abs()
    assert err.mean() <= 1.1 * plain.mean()
    text = run_cli("--ckpt", ckpt, "--prompt", "to be", "--max_new_tokens", 30, "--dtype", "bfloat16")[0]
    assert text.startswith("to be") and len(text) == 35


def test_cli_samples_a_batch(ckpt, capsys):
    texts = run_cli("--ckpt", ckpt, "--prompt", "hi", "--num_samples", 3, "--max_new_tokens", 20,
                    "--top_p", 0.9, "--repetition_penalty", 1.2, "--seed", 3)
    assert len(texts) == 3 and all(t.startswith("hi") and len(t) == 22 for t in texts)
    assert len(set(texts)) > 1  # independent samples
    assert capsys.readouterr().out.count("---------------") == 3


@pytest.mark.parametrize("args, message", [
    (("--prompt", "a" * 40), "the prompt is 40 tokens"),
    (("--top_p", 0), "top_p"),
    (("--top_p", 1.5), "top_p"),
    (("--temperature", -1), "temperature"),
    (("--top_k", -3), "top_k"),
    (("--repetition_penalty", 0), "repetition_penalty"),
    (("--num_samples", 0), "num_samples"),
    (("--prompt", "ABC"), "not in the model's alphabet"),
    (("--prompt_file", "/nonexistent/prompt.txt"), "prompt file"),
    (("--no_cache", "True", "--compile", "True"), "no_cache"),
])
def test_cli_bad_input_is_a_one_line_error(ckpt, args, message):
    with pytest.raises(SystemExit) as e:
        run_cli("--ckpt", ckpt, *args)
    text = str(e.value)
    assert text.startswith("error:") and "\n" not in text and message in text


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.update(model="a string"), "is not a nanollm checkpoint (needs 'model' and 'config' dicts)"),
    (lambda c: c.update(tokenizer=42), "has a damaged tokenizer record"),
    (lambda c: c.update(tokenizer_file={"name": "t.bpe", "data": "not bytes"}), "has a damaged tokenizer record"),
    (lambda c: c.update(tokenizer_file={"data": b"x"}), "has a damaged tokenizer record"),
    (lambda c: c["config"].update(n_embd=2**17), "does not match its config (lm_head.weight: (28, 32) in the file, (28, 131072) for the config)"),
    (lambda c: c["model"]["transformer.wte.weight"].fill_(float("nan")), "the weights hold NaN or inf"),
])
def test_cli_crafted_checkpoints_are_one_line_errors(ckpt, tmp_path, capsys, damage, message):
    """Each crafted file: one line, exit 2, no traceback and no allocation of what a lying config asks
    (n_embd 2**17 would be 200+ GB: the shapes are compared on the meta device first)."""
    crafted = torch.load(ckpt, weights_only=True)
    damage(crafted)
    torch.save(crafted, tmp_path / "crafted.pt")
    with pytest.raises(SystemExit) as e:
        run_cli("--ckpt", tmp_path / "crafted.pt", "--prompt", "a")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err


def test_cli_bad_checkpoints(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="^error: checkpoint .* not found"):
        run_cli("--ckpt", tmp_path / "missing.pt")
    with pytest.raises(SystemExit, match="^error: unknown model"):
        run_cli("--init_from", "gpt5")
    other = tmp_path / "other_vocab.pt"
    gpt.save_checkpoint(other, random_gpt(1, vocab_size=10, n_layer=1, n_embd=16), "char:0123456789")
    with pytest.raises(SystemExit, match="^error: the draft's vocabulary") as e:
        run_cli("--ckpt", ckpt, "--draft", other, "--prompt", "a")
    assert "\n" not in str(e.value)


def test_cli_moe_checkpoint_is_a_one_line_error(ckpt, tmp_path, capsys):
    """An MoE checkpoint has expert keys a GPT lacks: one line saying what it is, not a
    list of ~1,500 characters of missing and unexpected keys. Built by moe.py's own code."""
    import moe

    config = gpt.GPTConfig(block_size=32, vocab_size=len(ALPHABET), n_layer=2, n_head=2, n_embd=16)
    path = tmp_path / "moe.pt"
    moe.save_moe_checkpoint(path, moe.MoEGPT(config, moe.MoEConfig(n_experts=4, top_k=2)), "char:" + ALPHABET)
    with pytest.raises(SystemExit) as e:
        run_cli("--ckpt", path, "--prompt", "hi")
    text = str(e.value)
    assert text == capsys.readouterr().err.strip()  # the line on stderr is the whole message
    assert text.startswith(f"error: {path} is an MoE checkpoint (") and "moe" in text.split("(", 1)[1]
    assert "\n" not in text and "w_fc" not in text and len(text) < 300
    # the same model saved as a plain checkpoint (no "moe" config) is recognised by its keys
    plain = tmp_path / "moe_as_plain.pt"
    gpt.save_checkpoint(plain, moe.MoEGPT(config, moe.MoEConfig(n_experts=4, top_k=2)), "char:" + ALPHABET)
    with pytest.raises(SystemExit, match="is an MoE checkpoint"):
        run_cli("--ckpt", plain, "--prompt", "hi")
    with pytest.raises(SystemExit, match="is an MoE checkpoint"):  # also as the draft
        run_cli("--ckpt", ckpt, "--draft", path, "--prompt", "hi")


@pytest.mark.parametrize("content, what", [
    (b"to be\x00\x01\x02", "NUL byte at offset 5"),  # a binary file
    ("to be".encode("utf-16"), "NUL byte at offset 3"),  # UTF-16: b"\xff\xfet\x00o\x00..."
    ("naïve".encode("latin-1"), "bad byte at offset 2"),  # a lone 0xef byte, not UTF-8
    (b"\x89PNG\r\n", "bad byte at offset 0"),
])
def test_cli_prompt_file_not_utf8_is_a_one_line_error(ckpt, tmp_path, content, what):
    prompt_file = tmp_path / "prompt.bin"
    prompt_file.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run_cli("--ckpt", ckpt, "--prompt_file", prompt_file)
    text = str(e.value)
    assert text.startswith(f"error: {prompt_file} is not UTF-8 text (") and what in text and "\n" not in text


@pytest.mark.parametrize("make", [random_gpt, random_llama])
def test_decode_layout_changes_memory_order_only(make):
    """decode_layout re-lays the wide Linear weights (in, out) in place: same Parameters,
    shapes and values, and the same greedy tokens as the model it came from. Logits of one
    decode step to 1e-5: a 1-row product sums in another order in the other layout, so
    logits of size ~4 differ by fp32 rounding (measured 2.4e-6, ~5 ulp)."""
    import copy

    model = make(0)
    laid = copy.deepcopy(model)
    params = dict(laid.named_parameters())
    sample.decode_layout(laid)
    assert dict(laid.named_parameters()).keys() == params.keys()
    moved = []
    for name, p in laid.named_parameters():
        assert p is params[name] and torch.equal(p, dict(model.named_parameters())[name]), name
        if not p.is_contiguous():
            moved.append(name)
            assert p.t().is_contiguous() and p.shape[0] > p.shape[1], name  # (out, in) view of (in, out) memory
    wide = ("attn.c_attn.weight", "mlp.c_fc.weight") if make is random_gpt else ("gate_proj.weight", "up_proj.weight")
    assert moved and all(n.endswith(wide) for n in moved), moved
    assert sum(n.endswith(wide[0]) for n in moved) == model.config.n_layer
    prompt = torch.randint(0, 65, (1, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy(laid, prompt, 60), greedy(model, prompt, 60))  # past block_size
    logits = []
    for m in (model, laid):
        cache = sample.make_cache(m, 1, 32)
        sample.prefill(m, prompt, cache)
        logits.append(sample.decode_one_token(m, torch.tensor([[7]]), torch.tensor([10]), cache))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
