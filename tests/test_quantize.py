"""quantize.py: each quantizer against a plain reference on odd shapes (K not a multiple of the
group, 1-row inputs), LLM.int8 against bitsandbytes' Linear8bitLt, GPTQ against a transcription
of IST-DASLab's gptq.py, AWQ's fold and search, the CPU kernels against the dequantize path,
quantized checkpoints and the CLI.

Tolerances, and why:
- int8/RTN codes are compared exactly with loop references (same float ops); a dequantized
  weight is within half a step of the original (plus fp32 rounding, 1e-6 relative).
- GPTQ vs the transcription: the same operations in the same order, so codes and dequantized
  weights are equal exactly.
- LLM.int8 vs bitsandbytes: the int8 codes and scales are equal exactly (inputs are fp16 values,
  as bnb casts to fp16); outputs differ only by bnb's fp16 output (and fp16 outlier product):
  within 2^-10 relative of the output scale plus 1e-3.
- torch's CPU kernels vs dequantize: they take bf16 activations and scales and return bf16, so the
  reference is computed in fp32 from bf16-rounded inputs, scales and zeros; the kernel's bf16 output
  and summation order leave ~2^-8 relative of the output scale.
- our kernels (quantize_kernels.c) vs their plain statement F.linear(block_quantized(x), W_hat):
  the same integer products, summed in another order in fp32: 1e-5 of the output scale.
"""

import copy
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn

import gpt
import quantize as Q
from common import NanoError


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# 1. int8 absmax / zero-point


def groups_of(w, granularity, g):
    """The plain reference's rows: slices of w that share one scale, one at a time."""
    N, K = w.shape
    if granularity == "tensor":
        return [(slice(None), slice(None))]
    if granularity == "channel":
        return [(slice(n, n + 1), slice(None)) for n in range(N)]
    return [(slice(n, n + 1), slice(k, k + g)) for n in range(N) for k in range(0, K, g)]


@pytest.mark.parametrize("granularity", Q.GRANULARITIES)
def test_int8_absmax_and_zeropoint_match_a_loop_reference(granularity):
    w = randn(7, 100) * torch.linspace(0.1, 3, 7)[:, None]  # K = 100: the last group of 32 is short
    w[3] = w[3].abs()  # a one-sided row: zero-point uses all 256 codes, absmax half of them
    q, s = Q.absmax_quantize(w, 8, granularity, 32)
    deq = Q.absmax_dequantize(q, s, w.shape)
    zq, zs, zz = Q.zeropoint_quantize(w, 8, granularity, 32)
    zdeq = Q.zeropoint_dequantize(zq, zs, zz, w.shape)
    for rows, cols in groups_of(w, granularity, 32):
        part = w[rows, cols]
        scale = part.abs().max() / 127
        assert torch.equal(deq[rows, cols], torch.round(part / scale) * scale)
        lo, hi = min(part.min(), 0), max(part.max(), 0)
        zscale = (hi - lo) / 255
        zero = torch.round(-lo / zscale)
        assert torch.equal(zdeq[rows, cols], (torch.clamp(torch.round(part / zscale) + zero, 0, 255) - zero) * zscale)
        assert (deq[rows, cols] - part).abs().max() <= scale / 2 * (1 + 1e-6)
        assert (zdeq[rows, cols] - part).abs().max() <= zscale / 2 * (1 + 1e-6)


def test_int8_error_falls_with_finer_scales():
    w = randn(64, 256) * torch.logspace(-2, 0, 64)[:, None]  # channels of very different sizes
    w[:, 7] *= 20  # one outlier input column: it spoils every channel's scale, and only its own group's
    table = Q.int8_error_table({"w": w}, group_size=32)
    for scheme in ("absmax", "zeropoint"):
        assert table[scheme, "tensor"] > table[scheme, "channel"] > table[scheme, "group"]
    assert table["zeropoint", "channel"] <= table["absmax", "channel"] * 1.01


# ----------------------------------------------------------------------------------------
# 2. LLM.int8 vs bitsandbytes


def bnb_linear(w, b, threshold):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the LLM.int8 reference (requirements-dev)")
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=b is not None, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    if b is not None:
        layer.bias = nn.Parameter(b.half(), requires_grad=False)
    # .to quantizes the weight (Int8Params); in training mode bnb's CPU path dequantizes instead
    return bnb, layer.to("cpu").eval()


@pytest.mark.parametrize("rows", [1, 5])
def test_llm_int8_matches_bitsandbytes(rows):
    w, b = (randn(37, 100, seed=1) * 0.05).half().float(), (randn(37, seed=2) * 0.1).half().float()
    x = randn(rows, 100, seed=3).half().float()
    x[:, 3] = torch.linspace(-9, 3, rows)  # an outlier column, and one big value inside a regular column
    x[0, 50] = 7.5
    bnb, ref = bnb_linear(w, b, 6.0)
    lin = nn.Linear(100, 37)
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    ours = Q.LLMInt8Linear.from_linear(lin, 6.0)
    # the codes: the weight's rows and the activations' rows, as bnb's int8_vectorwise_quant
    assert torch.equal(ours.cb, ref.weight.data) and torch.equal(ours.scb, ref.weight.SCB)
    ca, sca, cols = Q.int8_rowwise(x, 6.0)
    bca, bsca, bcols = bnb.functional.int8_vectorwise_quant(x.half(), threshold=6.0)
    assert torch.equal(ca, bca) and torch.equal(sca, bsca) and torch.equal(cols, bcols)
    assert 3 in cols.tolist() and 50 in cols.tolist()
    with torch.no_grad():
        theirs = ref(x.half()).float()
    y = ours(x)
    assert (y - theirs).abs().max() <= 2**-10 * theirs.abs().max() + 1e-3
    # and close to the float layer: the outlier columns are what keeps it so
    assert (y - lin(x)).abs().max() <= 0.02 * lin(x).abs().max()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("shape", [(1, 100, 37), (5, 37, 61), (17, 768, 2304), (3, 3072, 48)])
def test_int8_matmul_on_onednn_equals_the_exact_sums(shape):
    """LLM.int8's int8 x int8 product through oneDNN (the weight prepacked) gives the exact int32
    sums that torch._int_mm gives, at the extreme codes too (|sums| up to 127^2 * K), on odd shapes."""
    M, K, N = shape
    g = torch.Generator().manual_seed(K)
    a, b = (torch.randint(-127, 128, s, generator=g, dtype=torch.int8) for s in ((M, K), (N, K)))
    a[0], b[0] = 127, -127  # the largest sums there can be
    want = torch.mm(a.long(), b.long().t())
    got = Q.int8_matmul(a, b, Q.int8_pack(b))
    assert torch.equal(got, want.to(got.dtype)) and torch.equal(torch._int_mm(a, b.t()).long(), want)


# ----------------------------------------------------------------------------------------
# 3. RTN and the nibble packing


def test_rtn_matches_gptq_quantizer_per_group():
    w = randn(9, 100, seed=4)
    codes, scale, zero = Q.rtn_quantize(w, 4, 32)
    assert codes.shape == (9, 100) and scale.shape == zero.shape == (9, 4)
    for n in range(9):
        for j, k in enumerate(range(0, 100, 32)):
            part = w[n, k:k + 32]
            lo, hi = min(part.min(), 0), max(part.max(), 0)
            s = (hi - lo) / 15
            z = torch.round(-lo / s)
            assert torch.isclose(scale[n, j], s) and zero[n, j] == z
            assert torch.equal(codes[n, k:k + 32].float(), torch.clamp(torch.round(part / s) + z, 0, 15))
    deq = Q.dequantize_groups(codes, scale, zero, 32)
    step = scale.repeat_interleave(32, 1)[:, :100]
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(Q.unpack_nibbles(Q.pack_nibbles(codes), 100), codes)
    assert Q.pack_nibbles(codes).shape == (9, 50)


# ----------------------------------------------------------------------------------------
# 4. GPTQ vs a transcription of IST-DASLab/gptq's gptq.py (GPTQ.fasterquant + quant.Quantizer)


def ref_find_params(x, bits):
    """quant.py's Quantizer.find_params(x, weight=True), perchannel, sym=False, mse=False."""
    maxq = 2**bits - 1
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def ref_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def ref_fasterquant(W, H, bits, blocksize=128, percdamp=.01, groupsize=-1, actorder=False, static_groups=False):
    """gptq.py's GPTQ.fasterquant, line for line (the layer's weight and self.H as arguments)."""
    W = W.clone().float()
    columns = W.shape[1]
    maxq = 2**bits - 1
    scale, zero = ref_find_params(W, bits)
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            groups.append(ref_find_params(W[:, i:(i + groupsize)], bits))
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = ref_find_params(W[:, (i1 + i):(i1 + i + groupsize)], bits)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // groupsize]
            q = ref_quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q


def correlated_inputs(n, K, seed):
    """Inputs with correlated channels of different sizes, as real activations have (one fixed
    distribution; the seed draws the samples)."""
    mix = randn(K, K, seed=1000) / math.sqrt(K) + torch.eye(K)
    return (randn(n, K, seed=seed) * torch.logspace(-1, 0.5, K)) @ mix


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (3, 64, True), (4, 0, True), (4, 0, False)])
def test_gptq_matches_the_reference(bits, group_size, act_order):
    """K = 200: two lazy blocks of 128 and 72, groups that straddle a block (64) or end short (32)."""
    N, K = 24, 200
    w = randn(N, K, seed=5)
    X = correlated_inputs(300, K, 6)
    X[:, 17] = 0  # an input column never used: its Hessian diagonal is 0 (a dead column)
    H = 2 * X.t() @ X / X.shape[0]
    codes, scale, zero = Q.gptq_quantize(w, H, bits, group_size, block_size=128, act_order=act_order)
    ours = Q.dequantize_groups(codes, scale, zero, group_size or K)
    theirs = ref_fasterquant(w, H, bits, groupsize=group_size or -1, actorder=act_order, static_groups=act_order)
    assert torch.equal(ours, theirs)
    assert codes.max() <= 2**bits - 1


def test_gptq_output_error_below_rtn_on_held_out_inputs():
    K = 160
    w = randn(48, K, seed=7)
    calib, held_out = correlated_inputs(512, K, 8), correlated_inputs(512, K, 8 + 100)
    H = 2 * calib.t() @ calib / calib.shape[0]
    gptq = Q.dequantize_groups(*Q.gptq_quantize(w, H, 4, 32), 32)
    rtn = Q.dequantize_groups(*Q.rtn_quantize(w, 4, 32), 32)
    assert Q.output_error(held_out, w, gptq) < 0.8 * Q.output_error(held_out, w, rtn)


# ----------------------------------------------------------------------------------------
# 5. AWQ


def test_awq_search_never_worse_than_rtn_and_alpha_zero_is_rtn():
    K = 96
    x = correlated_inputs(400, K, 9)
    x[:, :4] *= 30  # a few salient input channels
    w = [randn(40, K, seed=10), randn(24, K, seed=11)]
    s, alpha, err = Q.awq_search(w, x, 4, 32)
    both = torch.cat(w)
    rtn = Q.dequantize_groups(*Q.rtn_quantize(both, 4, 32), 32)
    rtn_err = (x @ both.t() - x @ rtn.t()).pow(2).mean().item()
    assert err <= rtn_err * (1 + 1e-6) and alpha > 0 and err < 0.9 * rtn_err
    assert s.shape == (K,) and math.isclose((s.max() * s.min()).item(), 1.0, rel_tol=1e-4)


def test_awq_clip_picks_the_best_range_of_each_group():
    """K = 70: groups of 32, 32 and a short one of 6. A loop reference tries every shrink f of the
    grid on each (channel, group) alone; awq_clip's pick has that loop's least error (to fp32
    rounding of the two summation orders, 1e-5 relative) and is W clipped to f * [min, max]."""
    N, K, g = 6, 70, 32
    w = randn(N, K, seed=20)
    w[:, 5] *= 6  # a large weight in every channel's first group: clipping it rounds the rest finer
    x = correlated_inputs(64, K, 21)
    clipped = Q.awq_clip(w, x, 4, g)
    grid = [1 - i / 20 for i in range(10)]
    for n in range(N):
        for k in range(0, K, g):
            part, xg = w[n, k:k + g], x[:, k:k + g]
            lo, hi = min(part.min(), 0), max(part.max(), 0)

            def error(f):
                c = part.clamp(lo * f, hi * f)
                return (xg @ Q.fake_quantize(c[None], 4, g)[0] - xg @ part).pow(2).mean().item(), c

            errors = [error(f) for f in grid]
            best = min(e for e, _ in errors)
            ours = (xg @ Q.fake_quantize(clipped[n:n + 1, k:k + g], 4, g)[0] - xg @ part).pow(2).mean().item()
            assert ours <= best * (1 + 1e-5) + 1e-12
            assert any(torch.equal(clipped[n, k:k + g], c) for _, c in errors)
            assert ours <= errors[0][0] * (1 + 1e-5) + 1e-12  # f = 1: never worse than no clipping
    assert not torch.equal(clipped[:, :32], w[:, :32])  # the large weights did get clipped


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_awq_fold_leaves_the_float_block_unchanged(arch):
    config = gpt.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=64)
    if arch == "llama":
        config = gpt.llama_config(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=64)
    torch.manual_seed(0)
    model = gpt.GPT(config).eval()
    idx = torch.randint(0, 64, (2, 16))
    before = model(idx)[0]
    block = model.transformer.h[0]
    with torch.no_grad():
        for prev, rows, linears in Q.awq_pairs(block):
            s = torch.rand(linears[0].in_features) + 0.5
            Q.scale_output_down(prev, s, rows)
            for m in linears:
                m.weight.mul_(s)
    assert (model(idx)[0] - before).abs().max() <= 1e-4



def trained_char_model(steps=300, batch=8, T=128):
    """A 3-layer x 128 character-level GPT trained on the shipped Tiny Shakespeare (AdamW, cosine
    schedule, seed 0), and its (train ids, val ids): data.py's split, the last 10% held out."""
    import common
    import data

    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    cut = int(len(ids) * (1 - data.VAL_FRACTION))
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=len(chars), n_layer=3, n_head=4, n_embd=128))
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = common.cosine_lr(step, 3e-3, 2e-4, steps // 10, steps)
        starts = torch.randint(0, cut - T - 1, (batch,), generator=g).tolist()
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval(), ids[:cut], ids[cut:]


@pytest.mark.slow
def test_awq_and_gptq_beat_rtn_on_a_trained_model():
    """The goal of both papers at 4 bits, group 128: on a model trained here, the val loss above
    fp32 is smaller for AWQ and for GPTQ than for plain RTN, for each of 3 calibration seeds
    (32 windows of the training split each; 64 held-out windows scored). ~1 min of CPU."""
    model, train_ids, val_ids = trained_char_model()
    T = model.config.block_size

    def windows(ids, n, seed):
        starts = torch.randint(0, len(ids) - T - 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        xy = torch.stack([ids[s:s + T + 1] for s in starts])
        return xy[:, :-1], xy[:, 1:]

    x, y = windows(val_ids, 64, 1234)
    base = Q.eval_loss(model, x, y, batch=8)

    def gap(method, seed=0):
        cfg = Q.QuantizeConfig(method=method, bits=4, group_size=128, seed=seed)
        qmodel = Q.quantize_model(copy.deepcopy(model), cfg, windows(train_ids, 32, seed)[0], log=lambda s: None)
        return Q.eval_loss(qmodel, x, y, batch=8) - base

    rtn = gap("rtn")
    assert rtn > 0
    for seed in (0, 1, 2):
        awq, gptq = gap("awq", seed), gap("gptq", seed)
        assert awq < rtn and gptq < rtn, (seed, awq, gptq, rtn)

# ----------------------------------------------------------------------------------------
# The layers: CPU kernels vs the dequantize path


def bf16(t):
    return t.to(torch.bfloat16).float()


def quant_layer(bits, N=37, K=100, group_size=32, seed=0):
    """N = 37 (not a multiple of 16) and K = 100 (not a multiple of the group): the kernels' pads."""
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    if bits == 8:
        q, s = Q.absmax_quantize(lin.weight.detach(), 8, "channel")
        return lin, Q.QuantLinear.from_int8(q, s, lin.bias)
    return lin, Q.QuantLinear.from_codes(*Q.rtn_quantize(lin.weight.detach(), bits, group_size), bits, group_size,
                                         lin.bias)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("shape", [(1, 100), (3, 5, 100)])
def test_quant_linear_torch_kernel_matches_dequantize(bits, shape):
    lin, layer = quant_layer(bits)
    layer.kernel = "torch"
    x = randn(*shape, seed=12)
    with torch.no_grad():
        y = layer(x)
        assert layer._kernel[0] == "torch"
        layer.kernel = "none"
        plain = layer(x)
    assert y.shape == plain.shape == (*shape[:-1], 37) and y.dtype == torch.float32
    if bits == 8:
        w = layer.qweight.float() * bf16(layer.scales)[:, None]
    else:
        codes = Q.unpack_nibbles(layer.qweight, 100).float()
        s = bf16(layer.scales).repeat_interleave(32, 1)[:, :100]
        z = bf16(layer.scales * (8 - layer.zeros.float())).repeat_interleave(32, 1)[:, :100]
        w = (codes - 8) * s + z
    ref = bf16(x) @ w.t() + lin.bias.detach()
    assert (y - ref).abs().max() <= 2**-8 * ref.abs().max() + 1e-4
    # the plain path (fp32 activations and scales) is close to the kernel's
    assert (y - plain).abs().max() <= 2**-6 * plain.abs().max() + 1e-3
    assert torch.allclose(plain, x @ layer.dequantized_weight().t() + lin.bias.detach(), atol=1e-5)


def test_block_quantized_matches_a_loop_reference():
    """llama.cpp's q8_0 activations: each block of 32 inputs of a row on its own absmax scale."""
    x = randn(3, 100, seed=4) * torch.logspace(-2, 1, 100)  # blocks of very different sizes
    x[1, 32:64] = 0.0  # an all-zero block
    got = Q.block_quantized(x)
    for r in range(3):
        for k in range(0, 100, 32):
            block = x[r, k:k + 32]
            amax = block.abs().max().item()
            want = [0.0] * len(block) if amax == 0 else [round(v * (127 / amax)) * (amax / 127) for v in block.tolist()]
            assert torch.allclose(got[r, k:k + 32], torch.tensor(want), rtol=1e-6, atol=0)


# where the CPU has VNNI and a C compiler is here, the kernels must build (a failed build is a failure, not a skip)
own = pytest.mark.skipif(not ({"avx512_vnni", "avx512bw"} <= Q.cpu_flags() and shutil.which(os.environ.get("CC", "cc"))),
                         reason="no AVX-512 VNNI CPU or no C compiler here: torch's kernels run instead")


@own
@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 32), (4, 128), (3, 64), (2, 32)])
@pytest.mark.parametrize("N,K", [(37, 100), (300, 520)])
def test_own_kernel_matches_its_plain_statement(bits, group_size, N, K):
    """quantize_kernels.c == F.linear(block_quantized(x), W_hat) + bias: 1-row, 3-row and 3-D inputs;
    N = 37 (one partial tile), 300 (three groups of 8 tiles, the last partial); K = 100 and 520
    (not multiples of the block of 32 or of the group)."""
    lin, layer = quant_layer(bits, N, K, group_size or 32, seed=bits)
    assert Q.own_kernels() is not None, "quantize_kernels.c did not build here"
    for shape in [(1, K), (3, K), (2, 5, K)]:
        x = randn(*shape, seed=len(shape)) * 3
        with torch.no_grad():
            y = layer(x)
            assert layer._kernel[0] == "own" and y.shape == (*shape[:-1], N) and y.dtype == torch.float32
            ref = nn.functional.linear(Q.block_quantized(x), layer.dequantized_weight(), lin.bias)
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
            # and within the format's error of the float layer: the activations' rounding, 1/254 of a block's absmax
            layer.kernel = "none"
            plain = layer(x)
            layer.kernel = "auto"
        assert (y - plain).abs().max() <= 0.02 * plain.abs().max()


@own
def test_own_kernel_keeps_the_input_dtype_and_falls_back_to_torch(monkeypatch):
    lin, layer = quant_layer(4)
    build = Q.own_kernels.__wrapped__  # the uncached build
    x = randn(2, 100, seed=3).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == torch.bfloat16 and layer._kernel[0] == "own"
        ref = nn.functional.linear(Q.block_quantized(x), layer.dequantized_weight(), lin.bias)
        assert torch.allclose(y.float(), ref, rtol=2**-8, atol=1e-5 * ref.abs().max().item())
        monkeypatch.setattr(Q, "own_kernels", lambda: None)  # no compiler or no VNNI: torch's kernels
        layer.kernel = "auto"  # chosen again on next use
        assert (layer(x.float()) - ref).abs().max() <= 2**-6 * ref.abs().max() and layer._kernel[0] == "torch"
    monkeypatch.setenv("NANOLLM_OWN_KERNELS", "0")
    assert build() is None


# ----------------------------------------------------------------------------------------
# Whole models, checkpoints, CLI


def tiny_model(arch="gpt2"):
    kwargs = dict(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=64)
    config = gpt.llama_config(**kwargs, n_kv_head=1) if arch == "llama" else gpt.GPTConfig(**kwargs)
    torch.manual_seed(0)
    return gpt.GPT(config).eval()


@pytest.mark.parametrize("method,bits", [("absmax", 8), ("rtn", 4)])
def test_quantized_decode_step_compiles_in_one_graph(method, bits):
    """sample.py --compile on a quantized checkpoint: the kernel is an opaque op (nanollm::quant_linear
    or torch's), so dynamo traces the decode step whole (fullgraph) and gives the eager tokens."""
    from torch._dynamo.utils import counters

    import sample

    torch._dynamo.reset()
    counters.clear()
    model = Q.quantize_model(tiny_model(), Q.QuantizeConfig(method=method, bits=bits, group_size=32), log=lambda s: None)
    prompt = torch.tensor([[5, 17, 3, 40, 8, 21]])
    step = sample.compile_decode(backend="eager")
    compiled = torch.stack(list(sample.generate(model, prompt, 12, temperature=0, decode_fn=step)), dim=1)
    assert counters["stats"]["calls_captured"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(compiled, torch.stack(list(sample.generate(model, prompt, 12, temperature=0)), dim=1))


@pytest.mark.parametrize("method,arch", [("absmax", "gpt2"), ("llm_int8", "gpt2"), ("rtn", "llama"),
                                         ("gptq", "gpt2"), ("awq", "gpt2"), ("awq", "llama")])
def test_quantized_checkpoint_round_trip(tmp_path, method, arch):
    model = tiny_model(arch)
    x = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(13))
    base = Q.eval_loss(model, x[:, :-1], x[:, 1:])
    cfg = Q.QuantizeConfig(method=method, bits=4, group_size=32, n_calib=4, calib_len=32)
    qmodel = Q.quantize_model(copy.deepcopy(model), cfg, calib=x[:, :32], log=lambda s: None)
    loss = Q.eval_loss(qmodel, x[:, :-1], x[:, 1:])
    assert abs(loss - base) <= (0.01 if method in ("absmax", "llm_int8") else 0.05) * base
    assert model.transformer.wte.weight.equal(qmodel.transformer.wte.weight)  # AWQ scaled a copy of the head
    Q.save_quantized(tmp_path / "q.pt", qmodel, "char:abc")
    back, spec = Q.load_quantized(tmp_path / "q.pt")
    assert spec == "char:abc" and Q.is_quantized(torch.load(tmp_path / "q.pt", weights_only=True))
    assert type(back.lm_head) is type(qmodel.lm_head)
    with torch.no_grad():
        assert torch.equal(back(x[:, :32])[0], qmodel(x[:, :32])[0])


def test_cli_quantizes_a_checkpoint(tmp_path, capsys):
    model = tiny_model()
    spec = "char:" + "".join(chr(32 + i) for i in range(95)) + "\n"
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, spec)
    out = Q.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--method", "gptq", "--group_size", "32", "--n_calib", "4",
                  "--calib_len", "32"])
    assert out == tmp_path / "ckpt-gptq4.pt" and out.is_file()
    assert "calibration: 4 sequences of 32 tokens" in capsys.readouterr().out
    back, _ = Q.load_quantized(out)
    assert isinstance(back.transformer.h[1].mlp.c_fc, Q.QuantLinear)
    Q.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--method", "absmax", "--out", str(tmp_path / "i8.pt")])
    assert "absmax    per channel" in capsys.readouterr().out


def test_cli_help_and_bad_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        Q.main(["--help"])
    help_text = capsys.readouterr().out
    for f in Q.QuantizeConfig.__dataclass_fields__:
        assert f"--{f}" in help_text
    assert "(default: 'gptq')" in help_text
    gpt.save_checkpoint(tmp_path / "ckpt.pt", tiny_model(), "char:ab")
    ckpt = str(tmp_path / "ckpt.pt")
    for argv, message in [(["--method", "nf4"], "unknown --method 'nf4'"),
                          (["--bits", "8"], "--bits 8 is not supported by gptq"),
                          (["--group_size", "100"], "--group_size must be 32, 64, 128 or 256"),
                          (["--calib", "wiki"], "unknown --calib 'wiki'"),
                          (["--calib", f"text:{tmp_path / 'none.txt'}"], "cannot read")]:
        with pytest.raises(SystemExit, match=message):
            Q.main(["--ckpt", ckpt] + argv)
    with pytest.raises(NanoError, match="is not a quantized checkpoint"):
        Q.load_quantized(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # nothing written
