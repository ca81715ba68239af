"""flash_attention.py: the tiled reference and the Triton kernels against naive attention in fp64.

The kernels run in Triton's interpreter, in subprocesses: TRITON_INTERPRET must be set before
flash_attention is imported, and this process may have imported it without. A subprocess gets
the inputs from a file, runs the kernels with a spy counting each kernel's launches and the
PyTorch reference made to fail (so a fallback cannot pass as the kernel), and writes the results
back; every comparison is made here.

Errors are max |got - exact| / max |exact| over a tensor, `exact` being naive
softmax(Q K^T scale + mask) V and its autograd gradients in fp64 on the same (rounded) inputs.
Tolerances, from the unit roundoff u of the input dtype (half the spacing of its numbers):
- fp32: 1e-5 (u = 6e-8; reordered sums over <= 150 keys with fp32 exp measure <= 1e-6);
- fp16, bf16: 2u (4.9e-4 * 2, 3.9e-3 * 2): the output is rounded to the dtype (<= u alone), and
  so are P and dS before their products with V, dO, Q and K, as tensor cores take them
  (measured <= 1.1u);
- fp64 (the reference alone): 1e-12 (u = 1.1e-16; the tiles only reorder the sums);
- logsumexp: 1e-5 absolute in every dtype: scores and sums are fp32 (values ~5).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_attention as fa
from common import NanoError
from data import SHAKESPEARE_PATH

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8, torch.float64: 1e-12}

# name: (B, H, H_kv, T, S, D, causal, dtype, scale, layout); "bthd": q, k, v are transposed
# views of (B, T, H, D) tensors, as gpt.py hands them over. The lengths leave ragged tiles in
# all three kernels (tiles of 32 rows for fp32, 32..128 for 16-bit inputs), and the causal
# diagonal crosses tiles.
CASES = {
    "causal_fp32_d64": (2, 2, 2, 100, 100, 64, True, torch.float32, None, "bhtd"),
    "cross_fp32_d32_S45": (1, 2, 2, 70, 45, 32, False, torch.float32, None, "bhtd"),
    "causal_gqa_fp32_d16_scale": (1, 4, 2, 45, 45, 16, True, torch.float32, 0.3, "bthd"),
    "causal_mqa_fp32_d128": (1, 3, 1, 40, 40, 128, True, torch.float32, None, "bhtd"),
    "causal_fp32_d32_T1": (2, 3, 3, 1, 1, 32, True, torch.float32, None, "bhtd"),
    "cross_fp32_d32_T1_S5": (1, 2, 1, 1, 5, 32, False, torch.float32, None, "bhtd"),
    "causal_gqa_bf16_d64": (1, 4, 2, 150, 150, 64, True, torch.bfloat16, None, "bthd"),
    "cross_bf16_d128": (1, 2, 2, 70, 130, 128, False, torch.bfloat16, None, "bhtd"),
    "causal_fp16_d32": (1, 2, 1, 150, 150, 32, True, torch.float16, None, "bhtd"),
    "window7_gqa_fp32_d16": (1, 4, 2, 100, 100, 16, True, torch.float32, None, "bhtd"),
    "window40_bf16_d32": (1, 2, 1, 150, 150, 32, True, torch.bfloat16, None, "bthd"),
}
# sliding-window cases: query t sees keys t - window < s <= t; 7 leaves whole key tiles before the
# window (skipped), tiles crossing its edge and full tiles; 40 crosses 16-bit tiles of 64 and 128
WINDOWS = {"window7_gqa_fp32_d16": 7, "window40_bf16_d32": 40}


def make_inputs(B, H, H_kv, T, S, D, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(heads, n):
        if layout == "bthd":  # (B, n, heads, D) viewed as (B, heads, n, D): strided, not contiguous
            return torch.randn(B, n, heads, D, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, heads, n, D, generator=g).to(dtype)

    return rand(H, T), rand(H_kv, S), rand(H_kv, S), rand(H, T)  # q, k, v, dO


def exact_attention(q, k, v, do, causal, scale, window=0):
    """Naive attention and its gradients in fp64, written out here (not fa.naive_attention)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kf, vf = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ kf.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        if window:  # and keys more than window - 1 back
            mask |= torch.ones_like(mask).tril(-window)
        scores = scores.masked_fill(mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.double())
    return dict(out=out.detach(), dq=dq, dk=dk, dv=dv, lse=torch.logsumexp(scores.detach(), dim=-1))


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# ----------------------------------------------------------------------------------------
# The kernels, in Triton's interpreter (subprocesses started once for the module)

KERNEL_WORKER = r"""
import sys, torch
import flash_attention as fa
assert fa.TRITON_INTERPRET and fa.triton is not None

class Spy:  # counts launches: `kernel[grid](...)` goes through __getitem__
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0
    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]

names = ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
spies = {n: Spy(getattr(fa, n)) for n in names}
for n, spy in spies.items():
    setattr(fa, n, spy)
def no_fallback(*args, **kwargs):
    raise AssertionError("the PyTorch reference ran instead of the kernel")
fa.reference_forward = fa.reference_backward = no_fallback

job = torch.load(sys.argv[1])
results = {}
for name, case in job["cases"].items():
    q, k, v, do = (t.requires_grad_() if i < 3 else t for i, t in enumerate(case["inputs"]))
    before = {n: s.launches for n, s in spies.items()}
    out = fa.flash_attention(q, k, v, causal=case["causal"], scale=case["scale"], window=case["window"])
    lse = out.grad_fn.saved_tensors[4]  # what the forward kept for the backward
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    launches = {n: s.launches - before[n] for n, s in spies.items()}
    results[name] = dict(out=out.detach(), dq=dq, dk=dk, dv=dv, lse=lse, launches=launches)
torch.save(results, sys.argv[2])
"""

COMPILE_AND_TRAIN_WORKER = r"""
import json, sys, torch
import torch.nn.functional as F
import flash_attention as fa
assert fa.TRITON_INTERPRET
launches = {"n": 0}
fwd = fa._attn_fwd_kernel
class Spy:
    def __getitem__(self, grid):
        launches["n"] += 1
        return fwd[grid]
fa._attn_fwd_kernel = Spy()
report = {}

# torch.compile(fullgraph=True) raises at the first graph break: the ops must be traced whole
torch.manual_seed(0)
B, T, H, D = 2, 40, 2, 16
x = torch.randn(B, T, H * D)
w = torch.randn(H * D, 3 * H * D) / (H * D) ** 0.5
def attend(x, w, attn):
    q, k, v = (x @ w).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
    return attn(q, k, v, causal=True).square().sum()
def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
compiled = torch.compile(lambda x, w: attend(x, w, fa.flash_attention), fullgraph=True, backend="aot_eager")
grads = {}
for name, fn in (("compiled_flash", compiled), ("sdpa", lambda x, w: attend(x, w, sdpa))):
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(xi, wi)
    loss.backward()
    grads[name] = (loss.item(), xi.grad, wi.grad)
(l1, gx1, gw1), (l2, gx2, gw2) = grads["compiled_flash"], grads["sdpa"]
report["compile"] = dict(loss_err=abs(l1 - l2) / abs(l2), dx_err=((gx1 - gx2).abs().max() / gx2.abs().max()).item(),
                         dw_err=((gw1 - gw2).abs().max() / gw2.abs().max()).item(), kernel_launches=launches["n"])

# a tiny GPT, a few AdamW steps on Tiny Shakespeare, attention by SDPA or by the kernels
import gpt
if hasattr(gpt.GPTConfig(), "attn_impl"):
    text = open(sys.argv[1]).read()[:20000]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    losses = {}
    for impl in ("sdpa", "flash"):
        torch.manual_seed(0)
        model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32,
                                      dropout=0.0, bias=True, attn_impl=impl))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        before = launches["n"]
        losses[impl] = []
        for step in range(5):
            starts = torch.randint(0, len(ids) - 33, (4,), generator=g)
            batch = torch.stack([ids[s:s + 33] for s in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
        losses[impl + "_launches"] = launches["n"] - before
    report["train"] = losses
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory):
    """Both interpreter subprocesses start together (2 cores); the kernel cases are split in two."""
    if fa.triton is None:
        pytest.skip("triton is not installed")
    tmp = tmp_path_factory.mktemp("flash")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    names = list(CASES)
    procs, inputs = [], {}
    for part, chunk in enumerate((names[0::2], names[1::2])):
        job = {"cases": {}}
        for seed, name in enumerate(chunk):
            B, H, H_kv, T, S, D, causal, dtype, scale, layout = CASES[name]
            inputs[name] = make_inputs(B, H, H_kv, T, S, D, dtype, layout, seed)
            job["cases"][name] = dict(inputs=inputs[name], causal=causal, scale=scale, window=WINDOWS.get(name, 0))
        torch.save(job, tmp / f"job{part}.pt")
        procs.append(subprocess.Popen([sys.executable, "-c", KERNEL_WORKER, str(tmp / f"job{part}.pt"),
                                       str(tmp / f"out{part}.pt")], env=env, stderr=subprocess.PIPE, text=True))
    train = subprocess.Popen([sys.executable, "-c", COMPILE_AND_TRAIN_WORKER, str(SHAKESPEARE_PATH)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for part, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"kernel worker failed:\n{err[-4000:]}"
        results.update(torch.load(tmp / f"out{part}.pt"))
    out, err = train.communicate(timeout=600)
    assert train.returncode == 0, f"compile/train worker failed:\n{err[-4000:]}"
    return dict(cases=results, inputs=inputs, report=json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_naive_fp64(kernel_results, name):
    T, causal, dtype, scale = CASES[name][3], CASES[name][6], CASES[name][7], CASES[name][8]
    got = kernel_results["cases"][name]
    q, k, v, do = kernel_results["inputs"][name]
    want = exact_attention(q, k, v, do, causal, scale, WINDOWS.get(name, 0))
    assert got["launches"] == {"_attn_fwd_kernel": 1, "_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1}
    assert got["out"].shape == q.shape and got["out"].dtype == dtype
    assert got["dk"].shape == k.shape and got["dk"].dtype == dtype
    errors = {key: rel_err(got[key], want[key]) for key in ("out", "dq", "dk", "dv")
              if want[key].abs().max() > 0}
    assert all(e <= TOL[dtype] for e in errors.values()), errors
    # the logsumexp saved for the backward is that of the scores, in fp32
    assert got["lse"].dtype == torch.float32
    assert (got["lse"].double() - want["lse"]).abs().max().item() <= 1e-5
    if T == 1 and causal:  # one visible key: the output is v itself, the softmax is constant
        assert want["dq"].abs().max() == 0 and got["dq"].abs().max() <= 1e-6 and got["dk"].abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["causal_fp32_d64", "causal_gqa_bf16_d64", "cross_bf16_d128", "window40_bf16_d32"])
def test_kernel_agrees_with_reference(kernel_results, name):
    causal, dtype, scale = CASES[name][6:9]
    got = kernel_results["cases"][name]
    q, k, v, do = (t.clone().requires_grad_(i < 3) for i, t in enumerate(kernel_results["inputs"][name]))
    out = fa.flash_attention_reference(q, k, v, causal=causal, scale=scale, window=WINDOWS.get(name, 0))
    ref = dict(zip(("out", "dq", "dk", "dv"), (out, *torch.autograd.grad(out, (q, k, v), do))))
    # both are errors of size <= TOL from the exact values, so they agree within twice that
    for key, value in ref.items():
        assert rel_err(got[key], value.double()) <= 2 * TOL[dtype], key


def test_kernels_compile_without_graph_break(kernel_results):
    r = kernel_results["report"]["compile"]
    assert r["kernel_launches"] >= 1  # the compiled graph ran the Triton kernel, not a fallback
    assert r["loss_err"] <= 1e-5 and r["dx_err"] <= 1e-5 and r["dw_err"] <= 1e-5, r


@pytest.mark.skipif(not hasattr(__import__("gpt").GPTConfig(), "attn_impl"),
                    reason="gpt.GPTConfig has no attn_impl yet")
def test_gpt_trains_the_same_with_flash_attention(kernel_results):
    losses = kernel_results["report"]["train"]
    assert losses["flash_launches"] == 2 * 5  # one forward kernel per layer and step: the kernel ran
    assert losses["sdpa"][-1] < losses["sdpa"][0] - 0.1  # it learns, so the comparison covers updates
    # fp32 attention differs from SDPA's by ~1e-7 relative; five AdamW steps carry that into the
    # weights (measured: losses ~3.8 apart by <= 3e-7), so 1e-5 leaves a 30x margin
    for a, b in zip(losses["flash"], losses["sdpa"]):
        assert abs(a - b) <= 1e-5, (losses["flash"], losses["sdpa"])


# ----------------------------------------------------------------------------------------
# The tiled PyTorch reference (in this process)


@pytest.mark.parametrize("B,H,H_kv,T,S,D,block,causal,window", [
    (2, 3, 3, 37, 37, 8, 16, True, 0), (2, 3, 3, 37, 37, 8, 16, False, 0),  # 37 = 2 tiles of 16 + 5
    (1, 4, 2, 50, 50, 48, 7, True, 0), (1, 4, 2, 50, 50, 48, 7, False, 0),  # GQA, tiles of 7
    (1, 2, 1, 1, 1, 16, 128, True, 0), (2, 2, 2, 33, 20, 16, 8, False, 0),  # T = 1; S != T
    (1, 4, 2, 50, 50, 8, 7, True, 10), (1, 2, 1, 37, 37, 8, 16, True, 1), (1, 2, 2, 20, 20, 8, 8, True, 64)])  # windows
def test_reference_matches_naive_fp64(B, H, H_kv, T, S, D, block, causal, window):
    q, k, v, do = make_inputs(B, H, H_kv, T, S, D, torch.float64, "bhtd", seed=T)
    want = exact_attention(q, k, v, do, causal, None, window)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = fa.flash_attention_reference(qg, kg, vg, causal=causal, block_size=block, window=window)
    got = dict(zip(("out", "dq", "dk", "dv"), (out, *torch.autograd.grad(out, (qg, kg, vg), do))))
    _, lse = fa.reference_forward(q, k, v, causal, 1 / math.sqrt(D), block, window)
    for key, value in got.items():
        if want[key].abs().max() > 0:
            assert rel_err(value, want[key]) <= TOL[torch.float64], key
    assert (lse - want["lse"]).abs().max() <= 1e-12


def test_reference_backward_gradcheck():
    """The hand-written tiled backward against finite differences (tiles of 2 over 5 positions)."""
    q, k, v, _ = make_inputs(1, 2, 1, 5, 5, 3, torch.float64, "bhtd", seed=0)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    for causal in (True, False):
        def attend(q, k, v, causal=causal):
            return fa.flash_attention_reference(q, k, v, causal, scale=0.7, block_size=2)

        assert torch.autograd.gradcheck(attend, inputs)


def test_reference_keeps_no_score_matrix():
    """What autograd keeps for the backward is O(T * D): q, k, v, o and the logsumexp."""
    B, H, T, D = 1, 2, 256, 16
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fa.flash_attention_reference(q, k, v, causal=True, block_size=64).sum().backward()
        n_tiled = len(saved)
        fa.naive_attention(q, k, v, causal=True).sum()
    assert max(saved[:n_tiled]) == B * H * T * D and sum(saved[:n_tiled]) == 4 * B * H * T * D + B * H * T
    assert max(saved[n_tiled:]) >= B * H * T * T  # the naive one keeps the (T, T) probabilities


def test_flash_attention_on_cpu_without_interpreter_is_the_reference():
    if fa.TRITON_INTERPRET:
        pytest.skip("this process runs the kernels in the interpreter")
    q, k, v, do = make_inputs(1, 4, 2, 70, 70, 32, torch.float32, "bthd", seed=3)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = fa.flash_attention(qg, kg, vg, causal=True)
    ref = fa.flash_attention_reference(q, k, v, causal=True)
    assert torch.equal(out, ref)  # the op's fallback is the reference itself
    want = exact_attention(q, k, v, do, True, None)
    for key, value in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (qg, kg, vg), do)):
        assert rel_err(value, want[key]) <= TOL[torch.float32], key


@pytest.mark.parametrize("shapes,kwargs,match", [
    (((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8)), {}, "must be 4-D"),
    (((2, 4, 8, 16), (2, 3, 8, 16), (2, 3, 8, 16)), {}, "3 K/V heads do not divide 4"),
    (((2, 4, 8, 16), (2, 4, 9, 16), (2, 4, 9, 16)), {"causal": True}, "as many keys as queries"),
    (((2, 4, 8, 24), (2, 4, 8, 24), (2, 4, 8, 24)), {}, "head size 24"),
    (((2, 4, 8, 16), (2, 4, 8, 32), (2, 4, 8, 32)), {}, "alike"),
    (((2, 4, 0, 16), (2, 4, 0, 16), (2, 4, 0, 16)), {}, "empty"),
    (((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16)), {"scale": float("nan")}, "finite"),
    (((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16)), {"window": 4}, "needs causal=True"),
    (((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16)), {"window": -2, "causal": True}, "positive int"),
])
def test_bad_inputs_raise_one_line_errors(shapes, kwargs, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(NanoError, match=match):
        fa.flash_attention(q, k, v, **kwargs)


def test_bad_dtypes_raise():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(NanoError, match="share dtype"):
        fa.flash_attention(q, q.half(), q.half())
    with pytest.raises(NanoError, match="cannot attend over torch.float64"):
        fa.flash_attention(q.double(), q.double(), q.double())
    fa.flash_attention_reference(q.double(), q.double(), q.double())  # the reference takes fp64, any D


def test_main_checks_and_times(capsys):
    fa.main(["--B", "1", "--H", "2", "--H_kv", "1", "--T", "40", "--D", "16", "--repeat", "1"])
    out = capsys.readouterr().out
    errors = [float(line.split("=")[-1]) for line in out.splitlines() if "vs naive fp64" in line]
    assert len(errors) == 4 and max(errors) <= TOL[torch.float32], out
    assert "forward+backward" in out and "never builds" in out


def test_main_help_and_bad_option(capsys):
    with pytest.raises(SystemExit):
        fa.main(["--help"])
    out = capsys.readouterr().out
    for option in ("--B", "--H_kv", "--T", "--D", "--causal", "--dtype", "--device", "--repeat", "--seed"):
        assert option in out
    with pytest.raises(SystemExit, match="error: unknown dtype 'int8'"):
        fa.main(["--dtype", "int8"])
    with pytest.raises(SystemExit, match="error: 3 K/V heads do not divide 4"):
        fa.main(["--H", "4", "--H_kv", "3", "--T", "8", "--D", "16"])


# ----------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere): the compiled kernels, at sizes the interpreter cannot afford


@pytest.mark.skipif(not torch.cuda.is_available() or fa.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
def test_kernel_on_cuda(dtype, D):
    for B, H, H_kv, T, S, causal, window in [(2, 8, 2, 1000, 1000, True, 0), (1, 4, 4, 333, 517, False, 0),
                                             (3, 2, 1, 1, 1, True, 0), (1, 4, 2, 1000, 1000, True, 100)]:
        q, k, v, do = (t.cuda() for t in make_inputs(B, H, H_kv, T, S, D, dtype, "bthd", seed=D))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = fa.flash_attention(qg, kg, vg, causal=causal, window=window)
        got = dict(zip(("out", "dq", "dk", "dv"), (out, *torch.autograd.grad(out, (qg, kg, vg), do))))
        want = exact_attention(q, k, v, do, causal, None, window)
        for key, value in got.items():
            if want[key].abs().max() > 0:
                assert rel_err(value, want[key]) <= TOL[dtype], (key, B, H, T, S, causal)
