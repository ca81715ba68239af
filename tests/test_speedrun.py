"""The speedrun's levers in train.py and common.py: Muon's Newton-Schulz iteration (its band, and
the iteration of Jordan et al. written out independently), Muon's AdamW groups against
torch.optim.AdamW, the WSD schedule, gradient checkpointing (bitwise the same gradients), the
presets, and the eval rows a time-to-loss is read from."""

import json
import math

import pytest
import torch

import common
import data
import gpt
import train

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--log_interval", "1", "--sample_tokens", "0", "--device", "cpu", "--dropout", "0.0"]


def keller_jordan_ns(G, steps=5):
    """Jordan et al.'s zeropower_via_newtonschulz5 as their post states it, in float64: scale G
    to Frobenius norm 1, work on the wide orientation, and apply X <- p(X X^T) X with the quintic's
    p(A) = a I + b A + c A^2, (a, b, c) = (3.4445, -4.7750, 2.0315), five times."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.transpose(-2, -1)
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)
    eye = torch.eye(X.shape[-2], dtype=X.dtype)
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        X = (a * eye + b * A + c * A @ A) @ X
    return X.transpose(-2, -1) if tall else X


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (3, 32, 32)])
def test_newton_schulz_band_and_reference(shape):
    torch.manual_seed(0)  # singular values spread over two decades: a gradient's are; far smaller
    U, _, Vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)  # ones (< ~1/300 of the Frobenius
    G = U @ torch.diag_embed(torch.logspace(-2, 0, min(shape[-2:]))) @ Vh  # norm) stay below the band
    ours = train.newton_schulz(G, dtype=torch.float64)
    torch.testing.assert_close(ours, keller_jordan_ns(G), rtol=0, atol=1e-12)  # the same iteration
    # the method's band: singular values pushed from (0, 1] into ~[0.7, 1.2] ("S' ~ Uniform(0.5, 1.5)"),
    # the singular vectors kept: X ~ U S' V^T, close to U V^T
    for dtype in (torch.float64, torch.bfloat16):  # Muon runs it in bf16
        X = train.newton_schulz(G, dtype=dtype).double()
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.5, (dtype, s.min(), s.max())
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        polar = U @ Vh
        cos = (X * polar).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert cos.min() > 0.98, cos


def test_muon_orthogonalises_matrices_and_runs_adamw_on_the_rest():
    """A Muon step on a block matrix moves it by lr x (~U V^T of its Nesterov momentum) (fused q|k|v:
    each third on its own); the embedding, head and gains move exactly as torch.optim.AdamW moves them."""
    torch.manual_seed(0)
    cfg = train.TrainConfig(optimizer="muon", muon_lr=0.02, learning_rate=1e-3, weight_decay=0.1)
    model = gpt.GPT(gpt.GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False))
    reference = gpt.GPT(model.config)
    reference.load_state_dict(model.state_dict())
    opt = train.muon_optimizer(model, cfg)
    names = dict(model.named_parameters())
    hidden = {n for n, p in names.items() if n.startswith("transformer.h.") and p.dim() == 2}
    ref_params = dict(reference.named_parameters())
    ref_opt = torch.optim.AdamW([{"params": [ref_params[n] for n in names if n not in hidden and names[n].dim() >= 2],
                                  "weight_decay": 0.1},
                                 {"params": [ref_params[n] for n in names if n not in hidden and names[n].dim() < 2],
                                  "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99), foreach=False)
    x = torch.randint(0, 50, (4, 16))
    attn, fc = "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"  # fc: (128, 32), tall
    bufs = {n: torch.zeros_like(names[n]) for n in (attn, fc)}
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in names.items()}
        with torch.no_grad():  # the same weights everywhere, so the same gradients: AdamW's steps compare
            for n in hidden:
                ref_params[n].copy_(names[n])
        for m, o in ((model, opt), (reference, ref_opt)):
            m(x, x)[1].backward()
            if m is model:  # Nesterov momentum as Muon's post writes it: buf = 0.95 buf + 0.05 g; g + 0.95 (buf - g)
                grads = {n: names[n].grad.clone() for n in bufs}
            o.step()
            o.zero_grad(set_to_none=True)
        for n in names:
            if n not in hidden:
                torch.testing.assert_close(names[n], ref_params[n], msg=n)
        for n, scale in ((attn, 1.0), (fc, 2.0)):  # sqrt(max(1, rows / cols))
            bufs[n] = 0.95 * bufs[n] + 0.05 * grads[n]
            nesterov = grads[n] + 0.95 * (bufs[n] - grads[n])
            parts = nesterov.view(3 if n == attn else 1, -1, 32)  # q, k, v: each orthogonalised on its own
            expected = torch.cat([train.newton_schulz(part).float() for part in parts]) * scale
            torch.testing.assert_close((before[n] - names[n].detach()) / 0.02, expected, rtol=0, atol=1e-5, msg=n)
            s = torch.linalg.svdvals(expected.view(parts.shape).double()) / scale
            assert s.max() < 1.5 and (s > 0.5).float().mean() > 0.8, s  # most directions move at ~the same rate


def test_wsd_schedule():
    lr = [common.wsd_lr(it, 1.0, 0.1, 10, 100, 40) for it in range(110)]
    assert lr[:10] == [common.cosine_lr(it, 1.0, 0.1, 10, 100) for it in range(10)]  # the same warmup
    assert lr[10:61] == [1.0] * 51 and lr[100:] == [0.1] * 10  # stable, then min_lr after decay_iters
    assert lr[70] == pytest.approx(0.1 + 0.9 * 0.75) and lr[99] < lr[80] < lr[61]  # linear: 1/4 of the way
    sqrt = common.schedule_lr(70, "wsd", 1.0, 0.1, 10, 100, 40, cooldown="1-sqrt")
    assert sqrt == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))  # 1-sqrt falls faster at first
    assert common.schedule_lr(95, "constant", 1.0, 0.1, 10, 100, 40) == 1.0
    assert common.schedule_lr(50, "cosine", 1.0, 0.1, 10, 100) == common.cosine_lr(50, 1.0, 0.1, 10, 100)
    with pytest.raises(common.NanoError, match="unknown lr schedule"):
        common.schedule_lr(5, "step", 1.0, 0.1, 10, 100)


@pytest.mark.parametrize("arch", [{}, dict(arch="llama", norm="rmsnorm", rope_theta=1e4, bias=False, qk_norm=True)])
def test_grad_checkpoint_gives_bitwise_the_same_gradients(arch):
    """Recomputing each block's activations in backward (dropout's random draws replayed) gives
    the plain run's gradients bit for bit on CPU fp32."""
    config = gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=3, n_head=2, n_embd=32, dropout=0.1, **arch)
    torch.manual_seed(0)
    plain = gpt.GPT(config)
    checkpointed = gpt.GPT(config)
    checkpointed.load_state_dict(plain.state_dict())
    train.checkpoint_blocks(checkpointed)
    x, y = torch.randint(0, 65, (2, 4, 32))
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(x, y)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_presets():
    cfg, _ = train.parse_args(["--preset", "nanogpt"])  # nanoGPT's README CPU line, its defaults otherwise
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.max_iters, cfg.lr_decay_iters,
            cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.beta2, cfg.dropout, cfg.bias, cfg.dtype,
            cfg.eval_iters, cfg.eval_interval, cfg.optimizer, cfg.lr_schedule, cfg.gelu) == \
        (4, 4, 128, 64, 12, 2000, 2000, 1e-3, 1e-4, 100, 0.99, 0.0, False, "float32", 20, 250, "adamw", "cosine", "exact")
    cfg, _ = train.parse_args(["--preset", "speedrun", "--max_iters", "300"])
    assert (cfg.dataset, cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.batch_size) == ("shakespeare_char", 4, 128, 64, 12)
    assert cfg.optimizer == "muon" and cfg.lr_decay_iters == 300 and cfg.warmup_iters == round(300 * cfg.warmup_ratio)


def test_speedrun_levers_train_and_resume(tmp_path, shakespeare_path):
    """All the levers at once on a tiny model: the untied zero head starts at exactly ln(vocab); eval
    rows carry the training time and the whole-val-split loss; a run cut and resumed (Muon's state in
    the checkpoint) takes the same steps."""
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    args = TINY + ["--preset", "speedrun", "--input", str(src), "--data_root", str(tmp_path / "data"),
                   "--max_iters", "6", "--eval_interval", "3", "--always_save_checkpoint", "True",
                   "--gelu", "relu2", "--grad_checkpoint", "True"]
    train.main(args + ["--out_dir", str(tmp_path / "full")])
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6] and evals[0]["time_s"] == 0 < evals[1]["time_s"] < evals[2]["time_s"]
    model, spec = gpt.load_checkpoint(tmp_path / "full" / "ckpt.pt")
    vocab = model.config.vocab_size
    assert evals[0]["val_loss"] == pytest.approx(math.log(vocab), abs=1e-6)  # zero head: uniform predictions
    assert model.config.qk_norm and not model.config.tie_embeddings and model.config.gelu == "relu2"
    assert isinstance(model.transformer.h[0].mlp, gpt.MLP)  # ReLU² in Llama's block
    bins = data.TokenBins(tmp_path / "data" / "shakespeare_char", "val")
    assert evals[-1]["val_loss"] == pytest.approx(train.whole_split_loss(model, bins, 32), rel=1e-6)
    train.main(args + ["--out_dir", str(tmp_path / "part"), "--max_iters", "3"])
    train.main(args + ["--out_dir", str(tmp_path / "part"), "--resume", "True"])
    losses = [{r["iter"]: r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for d in ("full", "part")]
    assert losses[0] == losses[1]


def test_dtype_auto_on_cpu(capsys):
    units = train.cpu_bf16_units()
    run = train.setup(train.TrainConfig(device="cpu", n_embd=768, out_dir="unused"))
    assert run.dtype == (torch.bfloat16 if units else torch.float32)
    assert (f"CPU bf16 matrix units: {units}" in capsys.readouterr().out) == bool(units)
    small = train.setup(train.TrainConfig(device="cpu", n_embd=128, out_dir="unused"))
    assert small.dtype == torch.float32  # below BF16_MIN_WIDTH the casts cost more than bf16 saves


def test_bench_reads_time_to_loss_from_both_logs(tmp_path):
    """bench speedrun's clock: nanoGPT's step times summed, its eval iterations (whose time holds the
    evaluation) counted at the median step; train.py's eval rows; the first eval at or below a target."""
    from bench.speedrun import loss_at, nanogpt_curve, time_to, trainpy_curve

    log = "\n".join(["step 0: train loss 4.2, val loss 4.2"] + [f"iter {k}: loss 3.0, time {500 if k % 4 == 0 else 10}.00ms, "
                     "mfu 1.00%" + (f"\nstep {k + 1}: train loss 2.0, val loss {3 - k / 8}" if k % 4 == 3 else "")
                     for k in range(8)])
    curve = nanogpt_curve(log, eval_interval=4)
    assert curve == [(0, 4.2, 0.0), (4, 2.625, 0.04), (8, 2.125, 0.08)]  # 10 ms steps: the 500 ms evals left out
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"iter": 0, "val_loss": 4.0, "time_s": 0.0}, {"iter": 1, "loss": 3.9}, {"iter": 5, "val_loss": 2.9, "time_s": 0.02},
        {"iter": 10, "val_loss": 2.4, "time_s": 0.05}]) + "\n")
    ours = trainpy_curve(tmp_path)
    assert time_to(ours, curve[1][1]) == 0.05 and time_to(ours, curve[2][1]) is None
    assert loss_at(ours, 0.04) == 2.9
