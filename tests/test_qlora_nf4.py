"""qlora_nf4.py: NF4 quantization bit-identical to bitsandbytes, the Triton kernel
bit-identical to the PyTorch reference, Linear4bit, QLoRA training and compile.

Regenerate the golden file (only after a deliberate format change):
    PYTHONPATH=. python tests/test_qlora_nf4.py --write-golden
"""

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from common import NanoError
import torch
import torch.nn.functional as F

import gpt
import lora
import qlora_nf4 as q

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "nf4_golden.pt"
BNB_REASON = "bitsandbytes (the reference for the NF4 format) is not installed"


# ----------------------------------------------------------------------------------------
# Deterministic inputs without an RNG: exact small integers times powers of two, so the
# golden file needs no stored input and means the same on every machine and torch version.


def hashed_weight(shape, seed=0):
    i = torch.arange(torch.Size(shape).numel(), dtype=torch.int64)
    h = ((i + seed) * 2654435761 + 12345) % 2**32  # Knuth's multiplicative hash, exact in int64
    bell = sum((h >> s) & 255 for s in (0, 8, 16, 24)) - 510  # sum of 4 bytes: bell-shaped, [-510, 510]
    row_scale = 2.0 ** -(8 + (i // shape[-1]) % 4)  # rows of different magnitude, like real weights
    return (bell.float() * row_scale).view(shape)


# (name, shape, blocksize, double_quant, store dequantized outputs); "big" keeps the
# SHA-256 of its 4,899 packed bytes instead of the bytes, so the file stays a few KB
GOLDEN_CASES = [
    ("big", (97, 101), 32, True, False),  # 307 blocks (> 256: two nested scales), odd numel, short last block
    ("small", (3, 43), 64, True, True),  # 129 values: odd, not a multiple of the blocksize
    ("plain", (5, 13), 32, False, True),  # no double quantization: fp32 absmax
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def golden_entries():
    out = {}
    for name, shape, blocksize, double_quant, with_outputs in GOLDEN_CASES:
        packed, state = q.quantize_nf4(hashed_weight(shape), blocksize, double_quant)
        if name == "big":
            out[f"{name}.packed_sha256"] = torch.tensor(list(hashlib.sha256(packed.numpy().tobytes()).digest()),
                                                        dtype=torch.uint8)
        else:
            out[f"{name}.packed"] = packed
        out[f"{name}.absmax"] = state.absmax
        if double_quant:
            out[f"{name}.nested_absmax"], out[f"{name}.offset"] = state.nested_absmax, state.offset
        if with_outputs:  # fp32 only: fp16/bf16 are torch's rounding of these (tested against bnb)
            out[f"{name}.dequantized"] = q.dequantize_nf4(packed, state, torch.float32)
    return out


def test_golden_file():
    """Our reference equals the committed bytes (produced by it, checked once against
    bitsandbytes: test_identical_to_bitsandbytes covers the same inputs)."""
    golden = torch.load(GOLDEN, weights_only=True)
    now = golden_entries()
    assert golden.keys() == now.keys()
    for key in golden:
        assert golden[key].dtype == now[key].dtype and torch.equal(golden[key], now[key]), key


# ----------------------------------------------------------------------------------------
# The format itself


def test_code_tables():
    assert torch.equal(q.nf4_from_normal_quantiles(), q.NF4_CODE)  # the table is the derivation
    code = q.DYNAMIC_CODE
    assert code.shape == (256,) and torch.equal(code, code.sort().values)
    assert code.max() == 1.0 and (code == 0).sum() == 1 and torch.equal(code[:127], -code[128:255].flip(0))


def test_nibble_order_and_midpoint_ties():
    """First element in the high nibble; a value exactly on a midpoint takes the lower code."""
    packed, _ = q.quantize_nf4(torch.tensor([-1.0, 1.0, 0.0]), blocksize=64, double_quant=False)
    assert packed.tolist() == [0x0F, 0x77]  # codes 0, 15, then 0.0 (7) and the padding zero (7)
    code = q.NF4_CODE
    midpoints = (code[:-1] + code[1:]) / 2
    below = torch.nextafter(midpoints, torch.tensor(-2.0))
    above = torch.nextafter(midpoints, torch.tensor(2.0))
    # absmax 1.0 (the first value) so every value is its own scaled value, exactly
    w = torch.cat([torch.ones(1), midpoints, below, above, torch.zeros(1)])
    packed, _ = q.quantize_nf4(w, blocksize=64, double_quant=False)
    codes = torch.stack([packed >> 4, packed & 15], 1).view(-1)[:w.numel()].long()
    k = torch.arange(15)
    assert codes[0] == 15
    assert torch.equal(codes[1:16], k) and torch.equal(codes[16:31], k) and torch.equal(codes[31:46], k + 1)


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_bounded(double_quant):
    """|w - dequant(quant(w))| <= (widest NF4 gap / 2) * absmax of its block. With double
    quantization the absmax used for decoding is itself off by at most half the widest gap
    of the 8-bit map times its 256-block scale, and that adds on (|code| <= 1). Slack
    1e-6 * absmax (~8 ulp): the fp32 roundings of the scaling (<= 2 ulp of 1) and the product."""
    torch.manual_seed(0)
    blocksize = 64
    w = torch.randn(37, 300) * torch.logspace(-3, 0, 37)[:, None]  # 11100 values, short last block
    packed, state = q.quantize_nf4(w, blocksize, double_quant)
    err = (q.dequantize_nf4(packed, state, torch.float32) - w).abs().view(-1)
    _, exact = q.quantize_nf4(w, blocksize, double_quant=False)
    n_blocks = exact.absmax.numel()
    bound = (q.NF4_CODE.diff().max() / 2) * exact.absmax
    if double_quant:
        scale_error = (q.DYNAMIC_CODE.diff().max() / 2) * state.nested_absmax.repeat_interleave(256)[:n_blocks]
        assert ((q.dequantize_absmax(state) - exact.absmax).abs() <= scale_error * (1 + 1e-6)).all()
        bound = bound + scale_error
    bound = (bound + 1e-6 * exact.absmax).repeat_interleave(blocksize)[:w.numel()]
    assert (err <= bound).all()
    assert err.max() > 0.2 * bound.max()  # the bound is not vacuous


def test_bnb_state_dict_round_trip_without_bitsandbytes():
    w = hashed_weight((30, 100))
    layer = q.Linear4bit(w, torch.arange(30.0))
    sd = layer.bnb_state_dict("layer.")
    assert list(sd) == ["layer.weight", "layer.bias", "layer.weight.absmax", "layer.weight.quant_map",
                        "layer.weight.nested_absmax", "layer.weight.nested_quant_map",
                        "layer.weight.quant_state.bitsandbytes__nf4"]
    meta = json.loads(bytes(sd["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == [30, 100] and meta["blocksize"] == 64
    back = q.Linear4bit.from_bnb_state_dict(sd, "layer.")
    x = torch.randn(4, 100)
    assert torch.equal(back(x), layer(x))
    assert all(torch.equal(a, b) for a, b in zip(back.bnb_state_dict("layer.").values(), sd.values()))


# ----------------------------------------------------------------------------------------
# Against bitsandbytes


@contextlib.contextmanager
def bnb_reference_kernels():
    """Run bitsandbytes with its pure-PyTorch reference kernels (its default backend) in
    place of the native CPU build, whose 8-bit blockwise quantizer picks the farther code
    for ~0.15% of values (see test_native_bitsandbytes_differs_only_by_far_codes)."""
    pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    reference = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def default_kernel(name):
        op = getattr(torch.ops.bitsandbytes, name).default
        return lambda *args, **kwargs: op.redispatch(reference, *args, **kwargs)

    with warnings.catch_warnings(), torch.library._scoped_library("bitsandbytes", "IMPL") as lib:
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in ("quantize_blockwise", "dequantize_blockwise", "dequantize_4bit"):
            lib.impl(name, default_kernel(name), "CPU")
        with torch._dynamo.config.patch(disable=True):  # its reference dequant is torch.compile'd: run eagerly
            yield


def test_code_tables_match_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional", reason=BNB_REASON)

    assert torch.equal(q.NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    for signed in (True, False):
        assert torch.equal(q.create_dynamic_map(signed), bnbF.create_dynamic_map(signed))


CASES = [(shape, blocksize, dtype) for shape, blocksize, dtype in [
    ((2,), 64, torch.float32),  # two elements: one short block
    ((33, 101), 64, torch.float16),  # odd numel, short last block
    ((300, 64), 64, torch.bfloat16),  # 300 blocks: > 256, two nested scales
    ((7, 999), 32, torch.float32),
    ((2, 5000), 4096, torch.float32),
    ((97, 101), 32, torch.float32),  # the golden "big" input
    ((3, 43), 64, torch.float32),  # the golden "small" input
]]


@pytest.mark.parametrize("shape,blocksize,dtype", CASES)
def test_identical_to_bitsandbytes(shape, blocksize, dtype):
    bnbF = pytest.importorskip("bitsandbytes.functional", reason=BNB_REASON)

    torch.manual_seed(sum(shape))
    w = hashed_weight(shape) if shape in ((97, 101), (3, 43)) else (torch.randn(shape) * 0.02).to(dtype)
    if w.numel() > 3 * blocksize:
        w.view(-1)[blocksize:2 * blocksize] = 0  # an all-zero block
    packed, state = q.quantize_nf4(w, blocksize)
    with bnb_reference_kernels():
        bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        assert torch.equal(packed, bnb_packed.view(-1))
        assert torch.equal(state.absmax, bnb_state.absmax)
        assert torch.equal(state.nested_absmax, bnb_state.state2.absmax)
        assert torch.equal(state.offset, bnb_state.offset)
        for out_dtype in DTYPES:
            bnb_state.dtype = out_dtype
            assert torch.equal(q.dequantize_nf4(packed, state, out_dtype), bnbF.dequantize_4bit(bnb_packed, bnb_state))


def test_native_bitsandbytes_differs_only_by_far_codes():
    """bitsandbytes' native CPU quantizer (its default here) agrees except on a few nested
    absmax codes, where it takes the neighbour of the nearest code. We measure that it is
    rare and that ours is the nearer one in every such case."""
    bnbF = pytest.importorskip("bitsandbytes.functional", reason=BNB_REASON)

    torch.manual_seed(0)
    w = torch.randn(4096, 128) * 0.02
    packed, state = q.quantize_nf4(w)
    native_packed, native = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, native_packed.view(-1)) and torch.equal(state.offset, native.offset)
    assert torch.equal(state.nested_absmax, native.state2.absmax)
    differ = state.absmax != native.absmax
    assert 0 < differ.sum() <= 0.005 * differ.numel()  # measured: 16 of 8192 codes
    ours, theirs = state.absmax[differ].long(), native.absmax[differ].long()
    assert ((ours - theirs).abs() == 1).all()
    _, raw = q.quantize_nf4(w, double_quant=False)
    scaled, _ = q.scale_blocks(raw.absmax - state.offset, 256)
    target = scaled[differ]
    assert ((q.DYNAMIC_CODE[ours] - target).abs() <= (q.DYNAMIC_CODE[theirs] - target).abs()).all()


def test_bnb_state_dicts_interchange():
    """bitsandbytes' Linear4bit state dict loads into ours and ours equals it key by key,
    tensor by tensor, JSON byte by byte; our state parses with bitsandbytes' QuantState."""
    bnb = pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    from bitsandbytes import functional as bnbF

    torch.manual_seed(0)
    linear = torch.nn.Linear(100, 30)
    theirs = bnb.nn.Linear4bit(100, 30, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    with bnb_reference_kernels():
        theirs = theirs.to("cpu")  # quantizes
    bnb_sd = theirs.state_dict()
    ours = q.Linear4bit.from_bnb_state_dict(bnb_sd)
    our_sd = q.Linear4bit.from_linear(linear).bnb_state_dict()
    assert list(our_sd) == list(bnb_sd) and list(ours.bnb_state_dict()) == list(bnb_sd)
    for k in bnb_sd:
        assert our_sd[k].dtype == bnb_sd[k].dtype and torch.equal(our_sd[k], bnb_sd[k]), k
    # ours -> bitsandbytes: its QuantState reads our entries and writes them back unchanged
    entries = {k.removeprefix("weight."): v for k, v in our_sd.items() if k.startswith("weight.")}
    bnb_state = bnbF.QuantState.from_dict(dict(entries), device="cpu")
    for k, v in bnb_state.as_dict(packed=True).items():
        assert torch.equal(v, entries[k]), k
    with bnb_reference_kernels():
        bnb_weight = bnbF.dequantize_4bit(our_sd["weight"], bnb_state)
    assert torch.equal(bnb_weight, ours.dequantized_weight(torch.float32))
    x = torch.randn(4, 100)
    assert torch.equal(ours(x), F.linear(x, bnb_weight, linear.bias))


# ----------------------------------------------------------------------------------------
# The Triton kernel: run in subprocesses, since TRITON_INTERPRET must be set before the
# kernel is defined (and this process may have imported qlora_nf4 without it)

TRITON_CHECK = r"""
import json, torch, qlora_nf4 as q
results = []
torch.manual_seed(0)
for n, blocksize, double_quant in [(2, 64, True), (3001, 64, True), (32 * 300 + 7, 32, True),
                                   (777, 128, False), (3 * 4096, 4096, True)]:
    packed, state = q.quantize_nf4(torch.randn(n) * 0.05, blocksize, double_quant)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ref = q.dequantize_nf4(packed, state, dtype)
        out = q.dequantize_nf4_triton(packed, state, dtype)
        truncated = ref.float() if dtype != torch.bfloat16 else (
            (q.dequantize_nf4(packed, state, torch.float32).view(torch.int32) >> 16 << 16).view(torch.float32))
        results.append(dict(n=n, dtype=str(dtype), shape_ok=out.shape == ref.shape and out.dtype == ref.dtype,
                            mismatches=int((out != ref).sum()),
                            truncation_differs=int((truncated != ref.float()).sum())))
print(json.dumps(results))
"""

NO_TRITON_CHECK = r"""
import sys; sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, qlora_nf4 as q
assert q.triton is None
packed, state = q.quantize_nf4(torch.randn(10, 64))
layer = q.Linear4bit(torch.randn(8, 64))
assert torch.equal(q.dequantize(packed, state), q.dequantize_nf4(packed, state))
layer(torch.randn(2, 64))
try:
    q.dequantize_nf4_triton(packed, state)
except q.NanoError as e:
    print("refused:", e)
"""


@pytest.fixture(scope="module")
def subprocess_checks():
    """Both subprocesses start together (their torch import dominates)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {}
    if q.triton is not None:
        procs["triton"] = subprocess.Popen([sys.executable, "-c", TRITON_CHECK], env={**env, "TRITON_INTERPRET": "1"},
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs["no_triton"] = subprocess.Popen([sys.executable, "-c", NO_TRITON_CHECK], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} check failed:\n{err[-3000:]}"
        results[name] = out
    return results


def test_triton_kernel_bit_exact_in_interpreter(subprocess_checks):
    if "triton" not in subprocess_checks:
        pytest.skip("triton is not installed")
    results = json.loads(subprocess_checks["triton"].strip().splitlines()[-1])
    assert len(results) == 15
    for r in results:
        assert r["shape_ok"] and r["mismatches"] == 0, r
    # the bf16 comparison has teeth: truncating instead of rounding would change many values
    assert all(r["truncation_differs"] > 0 for r in results if r["dtype"] == "torch.bfloat16" and r["n"] > 2)


def test_import_without_triton(subprocess_checks):
    assert "refused: Triton is not installed" in subprocess_checks["no_triton"]


# ----------------------------------------------------------------------------------------
# Linear4bit, QLoRA


def test_linear4bit_forward_backward_and_dtype_moves():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = q.Linear4bit.from_linear(linear)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    x = torch.randn(3, 5, 96, requires_grad=True)
    w = q.dequantize_nf4(layer.weight, layer.quant_state, torch.float32)
    expected = F.linear(x, w, linear.bias)
    out = layer(x)
    assert torch.equal(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.allclose(x.grad, g @ w, atol=1e-6) and layer.bias.grad is None
    stats = {k: v.clone() for k, v in layer.named_buffers()}
    layer.to(torch.bfloat16)  # must not round the fp32 statistics or touch the bytes
    assert all(torch.equal(v, stats[k]) and v.dtype == stats[k].dtype for k, v in layer.named_buffers())
    assert layer.bias.dtype == torch.bfloat16 and layer(x.detach().bfloat16()).dtype == torch.bfloat16


def qlora_gpt(config):
    torch.manual_seed(0)
    model = q.quantize_model(gpt.GPT(config))
    return lora.apply_lora(model, r=4, alpha=8)  # default targets: every attention and MLP projection


def llama_like(c):
    """tiny_config's sizes as a Llama: RMSNorm, RoPE, SwiGLU, GQA (1 key/value head), untied head."""
    return gpt.llama_config(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                            n_embd=c.n_embd, n_kv_head=1, tie_embeddings=False)


@pytest.mark.parametrize("arch,per_layer", [("gpt2", 4), ("llama", 7)])
def test_qlora_gpt_trains_only_adapters(tiny_config, arch, per_layer):
    """Every Linear but the head is 4-bit (GPT-2: c_attn, 2x c_proj, c_fc; Llama: q, k, v, o,
    gate, up, down), each carries an adapter, and only the adapters get gradients."""
    config = tiny_config if arch == "gpt2" else llama_like(tiny_config)
    model = qlora_gpt(config)
    quantized = [n for n, m in model.named_modules() if isinstance(m, q.Linear4bit)]
    assert len(quantized) == per_layer * config.n_layer == len(lora.lora_layers(model))
    assert all(n.endswith(".base") for n in quantized)  # the 4-bit layer is each LoRALinear's base
    assert type(model.lm_head) is torch.nn.Linear  # the head stays float (tied or, in Llama, not)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size), generator=g)
    y = (7 * x + 3) % tiny_config.vocab_size  # a token-to-token map the adapters can learn
    losses = []
    for _ in range(10):
        _, loss = model(x, targets=y)
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15, losses  # measured: GPT-2 4.17 -> 3.85, Llama 4.17 -> 3.89
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_compile_fullgraph_no_graph_breaks(tiny_config):
    """torch.compile(fullgraph=True) of forward + (AOT-traced) backward: one graph, and the
    same loss and adapter gradients as eager. backend aot_eager traces exactly what inductor
    would get, without minutes of C++ compilation on CPU."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = qlora_gpt(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    y = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():  # adapters away from zero so their gradients are not trivial
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.02)

    def loss_fn(x, y):
        return model(x, targets=y)[1]

    counter = CompileCounterWithBackend("aot_eager")
    grads = []
    for fn in (torch.compile(loss_fn, fullgraph=True, backend=counter), loss_fn):
        loss = fn(x, y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    assert counter.frame_count == 1  # fullgraph=True would have raised on any graph break
    (compiled_loss, compiled_grads), (eager_loss, eager_grads) = grads
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-6) and compiled_grads.keys() == eager_grads.keys()
    for k in eager_grads:
        assert torch.allclose(compiled_grads[k], eager_grads[k], atol=1e-6), k


def test_op_registration():
    packed, state = q.quantize_nf4(torch.randn(50, 64))
    torch.library.opcheck(torch.ops.nanollm.dequantize_nf4.default,
                          (packed, state.absmax, state.nested_absmax, state.offset, 64, [50, 64], torch.bfloat16))


# ----------------------------------------------------------------------------------------
# CLI and bad input


def test_finetune_cli(tmp_path, tiny_config, shakespeare_path, capsys):
    text = shakespeare_path.read_text()[:20_000]
    alphabet = "".join(sorted(set(text)))
    torch.manual_seed(0)
    base = gpt.GPT(gpt.GPTConfig(**{**tiny_config.__dict__, "vocab_size": len(alphabet)}))
    ckpt = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(ckpt, base, f"char:{alphabet}")
    data = tmp_path / "data.txt"
    data.write_text(text)
    out_dir = tmp_path / "out"
    q.main(["--init_from", str(ckpt), "--data", str(data), "--out_dir", str(out_dir), "--max_iters", "4",
            "--eval_iters", "1", "--eval_interval", "4", "--log_interval", "2", "--batch_size", "2",
            "--device", "cpu", "--merge", "True"])
    printed = capsys.readouterr().out
    ratio = float(re.search(r"\(([\d.]+)x of bf16", printed).group(1))
    assert ratio <= 0.30, printed
    adapter = torch.load(out_dir / "adapter.pt", weights_only=True)
    assert adapter["nf4"] == {"blocksize": 64, "double_quant": True} and adapter["base"] == str(ckpt)
    assert all(".lora_" in k for k, v in adapter.items() if torch.is_tensor(v))
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 5
    merged, _ = gpt.load_checkpoint(out_dir / "ckpt_merged.pt")  # a plain GPT
    assert isinstance(merged.transformer.h[0].attn.c_attn, torch.nn.Linear)


@pytest.mark.parametrize("blocksize", [16, 48, 8192])
def test_bad_blocksize(blocksize):
    with pytest.raises(NanoError, match=f"blocksize {blocksize} is not a power of two in \\[32, 4096\\]"):
        q.quantize_nf4(torch.randn(256), blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(NanoError, match="the weight holds 1 NaN/Inf"):
        q.Linear4bit(w)


def test_other_quant_type_refused():
    sd = q.Linear4bit(torch.randn(4, 64)).bnb_state_dict()
    meta = json.loads(bytes(sd.pop("weight.quant_state.bitsandbytes__nf4").tolist()))
    sd["weight.quant_state.bitsandbytes__fp4"] = torch.tensor(list(json.dumps({**meta, "quant_type": "fp4"}).encode()),
                                                              dtype=torch.uint8)
    with pytest.raises(NanoError, match="weight is quantized as 'fp4', not 'nf4'"):
        q.QuantState.from_bnb_state_dict(sd)


def error_line(capsys, argv) -> str:
    """q.main must refuse: exit status 2 and exactly one `error:` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        q.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# (option, bad value, the error line): QLoRA's own option, and the shared LoRA ones (finetune.py's
# check_config; tests/test_finetune.py has the full table), each before the checkpoint is read
BAD_OPTIONS = [
    ("--blocksize", "100", "blocksize 100 is not a power of two in [32, 4096] (64 is QLoRA's choice)"),
    ("--blocksize", "16", "blocksize 16 is not a power of two in [32, 4096] (64 is QLoRA's choice)"),
    ("--grad_clip", "-1", "--grad_clip must be >= 0 (got -1.0)"),
    ("--max_iters", "0", "--max_iters must be positive (got 0)"),
    ("--learning_rate", "-1", "--learning_rate must be positive (got -1.0)"),
    ("--lora_dropout", "1", "--lora_dropout must be in [0, 1) (got 1.0)"),
    ("--r", "-4", "--r must be positive (got -4)"),
    ("--device", "tpu", "unknown --device 'tpu' (auto, cpu, cuda, cuda:N or mps)"),
    ("--data", "missing.txt", "--data 'missing.txt' not found (a text file or a prompt/response .jsonl)"),
    ("--out_dir", "d.txt", "--out_dir d.txt is a file or below one (pick a folder)"),
]


@pytest.mark.parametrize("option,value,message", BAD_OPTIONS)
def test_cli_refuses_bad_option_first(tmp_path, monkeypatch, capsys, option, value, message):
    monkeypatch.chdir(tmp_path)
    Path("d.txt").write_text("hello world\n" * 20)
    argv = ["--init_from", "never_read.pt", "--data", "d.txt", "--out_dir", "out", "--device", "cpu", option, value]
    assert error_line(capsys, argv) == f"error: {message}"
    assert not Path("out").exists()


def test_cli_refuses_binary_data_before_quantizing(tmp_path, tiny_config, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(ckpt, gpt.GPT(tiny_config), "char:" + "".join(chr(32 + i) for i in range(65)))
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    monkeypatch.setattr(q, "quantize_model", lambda *a, **k: pytest.fail("quantized before checking the data"))
    assert error_line(capsys, ["--init_from", str(ckpt), "--data", str(binary), "--out_dir", str(tmp_path / "o"),
                               "--device", "cpu"]) == \
        f"error: {binary} is not UTF-8 text (NUL byte at offset 8: a binary or UTF-16 file; convert it to UTF-8 text)"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        sys.exit(__doc__)
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(golden_entries(), GOLDEN)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
