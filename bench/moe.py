"""moe: moe.py's dispatch paths (dropless, capacity) against a per-expert loop, forward and
forward + backward of one MoE layer, with the GEMM-only bound; on CUDA also torch._grouped_mm;
and the expert-load balance after a tiny training run (aux loss, DeepSeek-V3 bias, or neither).

Run: python -m bench moe [--quick]"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import moe

from .util import interleaved, row


def bench_moe(quick: bool) -> None:
    """moe.py: dispatch paths vs a per-expert loop (training step of one MoE layer:
    forward + backward), the GEMM-only bound, and the expert-load balance (coefficient of
    variation) after a tiny training run with the aux loss, the DeepSeek-V3 bias, or neither."""
    section = "moe"
    bench_moe_dispatch(quick)

    # load balance after a tiny training run (same data, seed and steps for each method)
    shakespeare = data.SHAKESPEARE_PATH
    iters = 10 if quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shakespeare.txt"
        src.write_text(shakespeare.read_text()[: 100_000 if quick else None])
        for balance in ("none", "aux", "bias"):
            argv = ["--input", str(src), "--data_root", f"{tmp}/data", "--out_dir", f"{tmp}/out_{balance}",
                    "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64",
                    "--batch_size", "16", "--max_iters", str(iters), "--eval_interval", str(iters // 2),
                    "--eval_iters", "5", "--log_interval", str(iters), "--compare_dense", "False",
                    "--balance", balance, "--bias_update_rate", "0.01"]
            with contextlib.redirect_stdout(io.StringIO()):
                r = moe.main(argv)["moe"]
            row(section, f"load CV after {iters} steps, balance={balance} (E=8 k=2; 0 = even)",
                f"{r['load_cv']:.3f} (max/mean {r['max_over_mean']:.2f}, val loss {r['val_loss']:.3f})")


def _moe_inputs(E, k, T, d, device, dtype):
    """One MoE layer's inputs: fine-grained experts (hidden 4d/k, so k experts = one dense
    MLP), non-zero biases (a bias added in the wrong place shows), a random router."""
    h = 4 * d // k
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype).requires_grad_()

    x = leaf(T, d, std=1.0)
    weights = (leaf(E, h, d, std=0.02), leaf(E, h, std=0.1), leaf(E, d, h, std=0.02), leaf(E, d, std=0.1))
    router = torch.randn(d, E, generator=gen).to(device, torch.float32) * 0.1
    probs = (x.detach().float() @ router).softmax(-1)  # near-even load, as a trained router aims for
    topk_w, topk_idx = probs.topk(k, dim=-1)
    topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    return x, topk_idx, topk_w, weights


def moe_loop_baseline(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj):
    """The peer: HF Mixtral's per-expert loop. For each expert, find its (token, choice)
    slots, run it on those rows, add the weighted result back in place."""
    out = torch.zeros_like(x)
    for e, (wf, bf, wp, bp) in enumerate(zip(w_fc, b_fc, w_proj, b_proj)):
        token, choice = torch.where(topk_idx == e)  # a host sync per expert on CUDA
        y = moe.expert_mlp(x[token], wf, bf, wp, bp) * topk_w[token, choice, None]
        out.index_add_(0, token, y)
    return out


def _grouped_mm_moe(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj):
    """dropless with torch._grouped_mm (bf16; one CUTLASS kernel per layer on sm90+): a
    peer measured on CUDA only (its meta kernel accepts bf16 alone, so it does not compile
    in fp32, and autocast does not cast its inputs)."""
    N, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = flat.argsort(stable=True)  # (N*k,) slots grouped by expert
    expert_sorted = flat[order]
    ends = torch.bincount(flat, minlength=w_fc.shape[0]).cumsum(0).to(torch.int32)  # block ends
    xs = x[order // k]  # (N*k, d)
    h = torch._grouped_mm(xs, w_fc.mT, offs=ends) + b_fc[expert_sorted]  # (N*k, h)
    y = torch._grouped_mm(F.gelu(h, approximate="tanh"), w_proj.mT, offs=ends) + b_proj[expert_sorted]
    y = y * topk_w.reshape(-1)[order, None]
    return x.new_zeros(N, x.shape[1]).index_add_(0, order // k, y)


def _moe_dispatch_rows(section, E, k, T, d, repeat, device="cpu", dtype=torch.float32, label=""):
    """Forward+backward (and forward-only) tokens/s of one MoE layer's dispatch paths and
    the per-expert loop, interleaved; ratios are loop time / path time (> 1: path faster)."""
    x, topk_idx, topk_w, weights = _moe_inputs(E, k, T, d, device, dtype)
    capacity = moe.expert_capacity(T, moe.MoEConfig(n_experts=E, top_k=k, capacity_factor=1.25))
    counts = torch.bincount(topk_idx.reshape(-1), minlength=E)
    paths = {
        "per-expert loop": lambda: moe_loop_baseline(x, topk_idx, topk_w, *weights),
        "dropless": lambda: moe.dropless_moe(x, topk_idx, topk_w, *weights),
        "capacity 1.25": lambda: moe.capacity_moe(x, topk_idx, topk_w, *weights, capacity)[0],
        # dropless by padding instead of sorting: every expert's block as long as the fullest
        "capacity = max load": lambda: moe.capacity_moe(x, topk_idx, topk_w, *weights, int(counts.max()))[0],
    }
    if device.startswith("cuda") and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        paths["torch._grouped_mm"] = lambda: _grouped_mm_moe(x, topk_idx, topk_w, *weights)
    # the floor: the expert GEMMs + GELU alone on inputs already grouped by expert
    grouped = [x.detach()[:n].clone().requires_grad_() for n in counts.tolist()]
    paths["expert GEMMs alone (bound)"] = lambda: torch.cat(
        [moe.expert_mlp(g, *ws) for g, ws in zip(grouped, zip(*weights))])
    leaves = (x, topk_w, *weights, *grouped)

    # equal to the loop? (the bound computes other rows, so it is not compared)
    shape = f"E={E} k={k} T={T} d={d}{' ' + label if label else ''}"
    g_out = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    params = (x, topk_w, *weights)
    ref = None
    for name in [n for n in paths if "bound" not in n]:
        try:
            y = paths[name]()
            grads = torch.autograd.grad(y, params, g_out)
        except RuntimeError as e:  # e.g. _grouped_mm on a GPU older than sm90
            row(section, f"{name} {shape}", f"unsupported: {str(e).splitlines()[0][:60]}")
            del paths[name]
            continue
        if ref is None:
            ref = (y, grads)
            continue
        diff = max((a - b).abs().max().item() for a, b in zip((y, *grads), (ref[0], *ref[1])))
        kept = "" if "capacity" not in name else f" (slots dropped: {(counts - capacity).clamp(min=0).sum().item()})"
        row(section, f"{name} == loop {shape}: max |diff| out+grads{kept}", f"{diff:.1e}")

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn, backward):
        def step():
            if backward:
                fn().float().square().mean().backward()
                for t in leaves:
                    t.grad = None
            else:
                with torch.no_grad():
                    fn()
            sync()
        return step

    for backward, what in ((True, "fwd+bwd"), (False, "forward")):
        sync()
        times = interleaved({name: timed(fn, backward) for name, fn in paths.items()}, repeat)
        for name, s in times.items():
            row(section, f"{name} {shape}: {what} tokens/s", f"{T / s:,.0f}")
        for name, s in times.items():
            if name != "per-expert loop":
                row(section, f"{name} vs per-expert loop {shape} ({what})", f"{times['per-expert loop'] / s:.2f}x")


def bench_moe_dispatch(quick: bool) -> None:
    """The CPU rows of bench_moe (its first part): the issue's shape and `python moe.py`'s,
    at the default thread count and at one thread."""
    shapes = [(8, 2, 256, 64)] if quick else [(8, 2, 4096, 512), (8, 2, 2048, 128)]
    threads = torch.get_num_threads()
    for E, k, T, d in shapes:
        for n in dict.fromkeys((threads, 1)):  # 1 thread: what a core does when others wait for it
            torch.set_num_threads(n)
            try:
                _moe_dispatch_rows("moe", E, k, T, d, 1 if quick else 7, label=f"{n} thr")
            finally:
                torch.set_num_threads(threads)


def bench_moe_gpu(quick: bool) -> None:
    """GPU: the same interleaved dispatch comparison on CUDA, fp32 and bf16; with --dry-run
    (no CUDA) the code paths run on CPU at a tiny shape."""
    if torch.cuda.is_available():
        device, shapes = "cuda", [(8, 2, 4096, 512)] if quick else [(8, 2, 4096, 512), (8, 2, 16384, 1024), (64, 8, 16384, 1024)]
    elif quick:
        device, shapes = "cpu", [(4, 2, 64, 32)]
    else:
        row("moe", "GPU dispatch vs per-expert loop", "skipped (no CUDA)")
        return
    for E, k, T, d in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            _moe_dispatch_rows("moe", E, k, T, d, 1 if quick else 10, device=device, dtype=dtype,
                               label=f"{device} {str(dtype).removeprefix('torch.')}")
