"""moe.py: both dispatch paths against a per-token reference and the per-expert loop, the
router losses, the DeepSeek-V3 bias, 0 graph breaks on the capacity path, MoE GPT == dense GPT when every
expert is the dense MLP, a tiny training run and the one-line errors.

Tolerance 1e-5 everywhere in fp32: the paths compute the same sums in a different order
(bmm over a padded buffer vs per-expert or per-row matmul, bias inside the GEMM vs added
after it), which moves results by a few ulps: ~1e-7 on O(1) outputs, and up to 3.3e-6
measured on the expert-weight gradients of the skewed-load test, sums over ~80 rows whose
values reach ~20 (1 ulp there is 1.9e-6); a wrong weight, slot or expert moves them by >= 1e-2."""

import importlib.util
import json
import math
import shlex

import pytest

from common import NanoError
import torch

import gpt
import moe
import plot


def reference_moe(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj, capacity=None):
    """Naive: loop over tokens, sum of the token's k experts weighted by the router.
    With a capacity, slots are taken in (choice, token) order and an expert's slots past
    `capacity` are skipped (GShard priority: all first choices before second choices)."""
    N, k = topk_idx.shape
    taken = [0] * w_fc.shape[0]
    keep = torch.ones(k, N, dtype=torch.bool)
    for j in range(k):
        for t in range(N):
            e = int(topk_idx[t, j])
            keep[j, t] = capacity is None or taken[e] < capacity
            taken[e] += 1
    rows = []
    for t in range(N):
        acc = torch.zeros_like(x[t])
        for j in range(k):
            if keep[j, t]:
                e = int(topk_idx[t, j])
                acc = acc + topk_w[t, j] * moe.expert_mlp(x[t], w_fc[e], b_fc[e], w_proj[e], b_proj[e])
        rows.append(acc)
    return torch.stack(rows)


def per_expert_loop(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj):
    """The plain loop the dispatch replaces (HF Mixtral's, bench.py's peer): for each expert,
    its (token, choice) slots, one matmul on those rows, the weighted result added back."""
    out = torch.zeros_like(x)
    for e in range(w_fc.shape[0]):
        token, choice = torch.where(topk_idx == e)
        y = moe.expert_mlp(x[token], w_fc[e], None if b_fc is None else b_fc[e], w_proj[e],
                           None if b_proj is None else b_proj[e])
        out.index_add_(0, token, y * topk_w[token, choice, None])
    return out


def make_layer(E=4, k=2, d=16, seed=0, **kw):
    torch.manual_seed(seed)
    config = gpt.GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=d)
    layer = moe.MoE(config, moe.MoEConfig(n_experts=E, top_k=k, **kw))
    with torch.no_grad():  # non-zero biases, so a bias in the wrong place shows
        layer.b_fc.normal_(std=0.1)
        layer.b_proj.normal_(std=0.1)
    return layer


def run_path(layer, x, path, capacity=None):
    """Output and gradients (x, router, experts) of one dispatch path on a fixed input."""
    x = x.clone().requires_grad_(True)
    _, _, idx, w = layer.router(x)
    weights = (layer.w_fc, layer.b_fc, layer.w_proj, layer.b_proj)
    if path == "dropless":
        y = moe.dropless_moe(x, idx, w, *weights)
    elif path == "capacity":
        y = moe.capacity_moe(x, idx, w, *weights, capacity)[0]
    else:
        y = reference_moe(x, idx, w, *weights, capacity=capacity)
    params = [x, layer.router.weight, *weights]
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), params)
    return y.detach(), grads


@pytest.mark.parametrize("path", ["dropless", "capacity"])
def test_dispatch_matches_per_token_reference(path):
    layer = make_layer(E=4, k=2)
    x = torch.randn(24, 16)
    capacity = 24 if path == "capacity" else None  # room for every slot: nothing dropped
    y, grads = run_path(layer, x, path, capacity)
    y_ref, grads_ref = run_path(layer, x, "reference")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5)


def test_capacity_drops_follow_priority_and_match_reference():
    layer = make_layer(E=4, k=2)
    x = torch.randn(24, 16)
    _, _, idx, _ = layer.router(x)
    max_load = int(torch.bincount(idx.reshape(-1), minlength=4).max())
    capacity = max_load - 3  # some slots must be dropped
    y, grads = run_path(layer, x, "capacity", capacity)
    y_ref, grads_ref = run_path(layer, x, "reference", capacity)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5)
    kept = moe.capacity_moe(x, idx, torch.ones_like(idx, dtype=x.dtype), layer.w_fc, layer.b_fc,
                            layer.w_proj, layer.b_proj, capacity)[1]
    assert 0 < (~kept).sum() < kept.numel()


@pytest.mark.parametrize("bias", [True, False])
def test_dispatch_equals_per_expert_loop_skewed_load(bias):
    """Outputs and every gradient (x, router weights, experts) of both paths equal the plain
    per-expert loop on a skewed batch: expert 0 holds over twice any other's slots, expert E-1
    none, so blocks of very different fill, padding rows and an empty block are exercised."""
    E, k, N, d, h = 8, 2, 96, 32, 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=gen, requires_grad=True)
    first = torch.where(torch.rand(N, generator=gen) < 0.75, 0, torch.randint(1, E - 1, (N,), generator=gen))
    second = (first + torch.randint(1, E - 2, (N,), generator=gen)) % (E - 1)  # != first, never E-1
    idx = torch.stack([first, second], 1)
    w = torch.rand(N, k, generator=gen) + 0.1
    w = (w / w.sum(-1, keepdim=True)).requires_grad_()
    weights = [(torch.randn(*shape, generator=gen) * std).requires_grad_() if bias or len(shape) == 3 else None
               for shape, std in (((E, h, d), 0.2), ((E, h), 0.1), ((E, d, h), 0.2), ((E, d), 0.1))]
    params = [x, w] + [t for t in weights if t is not None]
    load = torch.bincount(idx.reshape(-1), minlength=E)
    assert load[E - 1] == 0 and load[0] > 2 * load[1:].max()
    dy = torch.randn(N, d, generator=gen)

    def outputs_and_grads(fn, *extra):
        y = fn(x, idx, w, *weights, *extra)
        y = y[0] if isinstance(y, tuple) else y
        return (y, *torch.autograd.grad(y, params, dy))

    expected = outputs_and_grads(per_expert_loop)
    for got in (outputs_and_grads(moe.dropless_moe), outputs_and_grads(moe.capacity_moe, int(load.max()))):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_capacity_at_max_load_equals_dropless():
    layer = make_layer(E=4, k=2, seed=1)
    x = torch.randn(40, 16)
    _, _, idx, _ = layer.router(x)
    max_load = int(torch.bincount(idx.reshape(-1), minlength=4).max())
    # a capacity above max_load drops nothing; its unused rows are padding that adds nothing
    y_cap, g_cap = run_path(layer, x, "capacity", capacity=max_load + 5)
    y_drop, g_drop = run_path(layer, x, "dropless")
    torch.testing.assert_close(y_cap, y_drop, rtol=0, atol=1e-5)
    for a, b in zip(g_cap, g_drop):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the layer's own capacity: factor E/k gives capacity = N >= any load, nothing dropped
    full = make_layer(E=4, k=2, seed=1, dropless=False, capacity_factor=2.0)
    assert full.capacity(40) == 40
    torch.testing.assert_close(full(x[None])[0], make_layer(E=4, k=2, seed=1)(x[None])[0], rtol=0, atol=1e-5)
    assert full.last_dropped.item() == 0


def test_router_weights_renormalised_fp32_and_bias_only_selects():
    layer = make_layer(E=4, k=2)
    x = torch.randn(10, 16)
    logits, probs, idx, w = layer.router(x)
    assert logits.dtype == probs.dtype == w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    torch.testing.assert_close(w, probs.gather(1, idx) / probs.gather(1, idx).sum(-1, keepdim=True))
    assert torch.equal(idx, probs.topk(2, dim=-1).indices)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])  # expert 3 always chosen, its weight stays unbiased
    _, probs_b, idx_b, w_b = layer.router(x, bias)
    assert (idx_b == 3).any(-1).all()
    torch.testing.assert_close(probs_b, probs)
    torch.testing.assert_close(w_b, probs.gather(1, idx_b) / probs.gather(1, idx_b).sum(-1, keepdim=True))


def test_load_balancing_loss_formula_and_uniform_minimum():
    # hand-made: N=4 tokens, E=2, k=1; expert 0 gets 3 of 4 slots
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    f = torch.tensor([0.75, 0.25])
    P = torch.tensor([2.6 / 4, 1.4 / 4])
    expected = 2 * (f * P).sum()  # = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert math.isclose(moe.load_balancing_loss(probs, idx).item(), expected.item(), rel_tol=1e-6)
    assert math.isclose(expected.item(), 1.15, rel_tol=1e-6)
    # perfectly uniform routing: probs 1/E, slots spread evenly -> exactly 1, alpha after scaling
    E, k, N = 8, 2, 64
    uniform = torch.full((N, E), 1 / E)
    idx = torch.arange(N * k).remainder(E).view(N, k)
    assert math.isclose(moe.load_balancing_loss(uniform, idx).item(), 1.0, rel_tol=1e-6)
    # the layer's aux loss with the z-loss off is alpha * that: alpha for uniform routing
    layer = make_layer(E=E, k=k, aux_loss_coef=0.01, z_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight.zero_()  # every token: probs = 1/E
    layer(torch.randn(1, N, 16))
    # topk of equal scores picks the same 2 experts for every token: f is skewed, P uniform,
    # and E * sum f_i / E = 1 still: the loss is alpha
    assert math.isclose(layer.aux_loss.item(), 0.01, rel_tol=1e-5)
    assert moe.load_balancing_loss(probs, torch.tensor([[0], [0], [0], [0]])) > 1.0  # skew costs more


def test_z_loss():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    lse = torch.tensor([math.log(4), math.log(sum(math.exp(v) for v in (1, 2, 3, 4)))])
    assert math.isclose(moe.router_z_loss(logits).item(), lse.square().mean().item(), rel_tol=1e-6)


def test_bias_balancing_reduces_imbalance_on_skewed_inputs():
    def max_over_mean(balance):
        layer = make_layer(E=4, k=1, balance=balance, bias_update_rate=0.01)
        layer.train()
        with torch.no_grad():
            layer.router.weight.mul_(50)  # a confident router: probabilities spread over [0, 1]
        direction = layer.router.weight[0].detach() / layer.router.weight[0].norm()
        gen = torch.Generator().manual_seed(0)
        ratios = []
        with torch.no_grad():
            for _ in range(60):  # one forward + one bias update per "step"
                x = torch.randn(1, 256, 16, generator=gen) + direction  # skewed towards expert 0
                layer(x)
                layer.update_bias()
                ratios.append((layer.last_load.max() / layer.last_load.mean()).item())
        return ratios

    biased, plain = max_over_mean("bias"), max_over_mean("none")
    assert biased[0] == plain[0] > 1.8  # same skewed start (the bias begins at 0)

    def last(r):
        return sum(r[-10:]) / 10

    # measured: ~1.2 with the bias, ~1.85 without (a perfectly even split is 1.0)
    assert last(biased) < 1.35 and last(plain) > 1.6


def test_capacity_path_has_no_graph_breaks():
    layer = make_layer(E=4, k=2, dropless=False, balance="bias", n_shared_experts=1)
    layer.train()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 8, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("dropless", [True, False])
def test_moe_gpt_with_dense_experts_equals_dense_gpt(tiny_config, dropless):
    torch.manual_seed(0)
    dense = gpt.GPT(tiny_config).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    expected, _ = dense(idx)
    # top_k = n_experts = 1 (the case) and E=4, k=2 (renormalised weights sum to 1)
    for E, k in ((1, 1), (4, 2)):
        cfg = moe.MoEConfig(n_experts=E, top_k=k, dropless=dropless, capacity_factor=E / k,
                            expert_hidden=4 * tiny_config.n_embd)
        model = moe.MoEGPT(tiny_config, cfg, moe_every=1).eval()
        missing, _ = model.load_state_dict(dense.state_dict(), strict=False)
        assert all(".mlp." in name for name in missing)
        with torch.no_grad():
            for block, dense_block in zip(model.transformer.h, dense.transformer.h):
                for name, src in (("w_fc", "c_fc"), ("w_proj", "c_proj")):
                    getattr(block.mlp, name).copy_(getattr(dense_block.mlp, src).weight.expand(E, -1, -1))
                    getattr(block.mlp, name.replace("w_", "b_")).copy_(getattr(dense_block.mlp, src).bias.expand(E, -1))
        got, _ = model(idx)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_moe_every_and_active_params(tiny_config):
    cfg = moe.MoEConfig(n_experts=4, top_k=2)
    model = moe.MoEGPT(tiny_config, cfg, moe_every=2)
    assert [i for i, _ in model.moe_layers()] == [1]
    assert isinstance(model.transformer.h[0].mlp, gpt.MLP)
    dense = gpt.GPT(tiny_config)
    # fine-grained experts (hidden 4d/k): a token uses k * 2 * d * (4d/k) expert weights, as
    # many as the dense MLP; the extra active parameters are the router (E*d) and the k-1
    # additional output biases (the dense MLP has one)
    d, E, k = tiny_config.n_embd, 4, 2
    assert model.num_active_params() - dense.num_params() == d * (E + k - 1)
    assert model.num_params() - model.num_active_params() == (E - k) * (2 * d * (4 * d // k) + 4 * d // k + d)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    layer = model.transformer.h[1].mlp
    assert id(layer.b_fc) in no_decay and id(layer.b_proj) in no_decay and id(layer.w_fc) not in no_decay
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_main_tiny_run(tmp_path, char_data, capsys):
    out = tmp_path / "out"
    common = ["--data_root", str(char_data.parent), "--out_dir", str(out), "--device", "cpu",
              "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
              "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "2",
              "--n_experts", "4", "--top_k", "2"]
    results = moe.main(common)
    text = capsys.readouterr().out
    assert set(results) == {"moe", "dense"}
    for r in results.values():
        assert math.isfinite(r["val_loss"]) and r["tokens_per_s"] > 0 and set(r["val_losses"]) == {0, 3, 6}
    assert results["moe"]["val_loss"] < results["moe"]["val_losses"][0]  # it learns
    assert "layer 0:" in text and "layer 1:" in text and "e3" in text and "dropped-token fraction" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"moe", "dense"} and any("tokens_per_s" in r for r in rows)
    model, spec = moe.load_moe_checkpoint(out / "ckpt.pt")
    assert spec.startswith("char:") and len(model.moe_layers()) == 2
    if importlib.util.find_spec("matplotlib"):  # the printed next command works as printed
        command = next(line for line in text.splitlines() if line.startswith("plot: python plot.py "))
        picture = plot.main(shlex.split(command.removeprefix("plot: python plot.py ")))
        assert picture.is_file() and capsys.readouterr().out == f"wrote {picture}\n"
    # the capacity path with the bias method and a shared expert, MoE only
    results = moe.main(common + ["--dropless", "False", "--capacity_factor", "1.0", "--balance", "bias",
                                 "--n_shared_experts", "1", "--compare_dense", "False", "--max_iters", "3"])
    assert set(results) == {"moe"} and 0 <= results["moe"]["dropped_fraction"] < 1


@pytest.mark.parametrize("argv, message", [
    (["--top_k", "3", "--n_experts", "2"], "top_k 3 must be in 1..n_experts=2"),
    (["--capacity_factor", "0"], "capacity_factor must be > 0"),
    (["--capacity_factor", "-1.5"], "capacity_factor must be > 0"),
    (["--balance", "loss"], "balance 'loss' unknown"),
    (["--moe_every", "5", "--n_layer", "4"], "moe_every 5 > n_layer 4"),
    (["--n_embd", "30", "--n_head", "4"], "not divisible by n_head"),
    (["--grad_clip", "-1"], "--grad_clip must be >= 0"),  # -1 used to ascend the gradient
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--max_iters", "0"], "--max_iters must be positive"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
    (["--out_dir", __file__], "is a file or below one"),
])
def test_bad_config_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        moe.main(argv + ["--data_root", "/nonexistent"])  # fails before any data work
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_n_embd_mismatch_one_line_error(tiny_config):
    layer = moe.MoE(tiny_config, moe.MoEConfig(n_experts=2, top_k=1))
    with pytest.raises(NanoError) as e:
        layer(torch.randn(1, 4, tiny_config.n_embd + 1))
    assert "n_embd=33 but the layer was built for 32" in str(e.value) and "\n" not in str(e.value)
