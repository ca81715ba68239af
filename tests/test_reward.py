"""reward.py: the Bradley-Terry loss against its formula and TRL 1.16's RewardTrainer, the score read at the
last real token, the checkpoint round trip, a tiny built-in run and a .jsonl run with LoRA, one-line errors;
the default built-in run (>= 90% held-out pairwise accuracy) is the slow test."""

import json
import types
from collections import defaultdict

import pytest
import torch

import common
import gpt
import plot
import reward
import tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def task_ckpt(tmp_path_factory):
    """The built-in task's SFT model after 10 steps: a valid body for tiny runs."""
    torch.set_num_threads(1)
    return reward.task_sft_model(tmp_path_factory.mktemp("task") / "sft.pt", "cpu", iters=10)


def random_rewards(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [4 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("use_margin,center", [(False, 0.0), (True, 0.0), (False, 0.01), (True, 0.3)])
def test_bradley_terry_loss_is_the_formula(use_margin, center):
    chosen, rejected, margin = random_rewards()
    margin = margin.abs() if use_margin else torch.zeros_like(margin)
    # written out independently: log of the sigmoid, not logsigmoid; a loop-free mean
    expected = (-torch.log(1 / (1 + torch.exp(-(chosen - rejected - margin))))).sum() / len(chosen)
    expected = expected + center * ((chosen + rejected) ** 2).sum() / len(chosen)
    got = reward.bradley_terry_loss(chosen, rejected, margin if use_margin else None, center)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)  # float64, |diff| < 40: no overflow


def test_loss_and_accuracy_match_trl_1_16():
    """TRL's own RewardTrainer.compute_loss, called with a stand-in trainer and a model that returns our rewards."""
    trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
    chosen, rejected, margin = random_rewards(seed=1)
    for center, with_margin in [(None, False), (None, True), (0.05, True)]:
        trainer = types.SimpleNamespace(
            model=types.SimpleNamespace(training=True), args=types.SimpleNamespace(center_rewards_coefficient=center),
            accelerator=types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
            _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list)})
        inputs = {"attention_mask": torch.ones(128, 5, dtype=torch.long)} | ({"margin": margin} if with_margin else {})
        model = lambda **kw: types.SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # noqa: E731
        theirs = trl_reward.RewardTrainer.compute_loss(trainer, model, inputs)
        ours = reward.bradley_terry_loss(chosen, rejected, margin if with_margin else None, center or 0.0)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        assert trainer._metrics["train"]["accuracy"] == [(chosen > rejected).double().mean().item()]


def tiny_reward_model(vocab=17, seed=0):
    torch.manual_seed(seed)
    body = gpt.GPT(gpt.GPTConfig(block_size=24, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    return reward.RewardModel(body).eval()


def test_reward_is_read_at_the_last_real_token():
    rm = tiny_reward_model()
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
    idx, lengths = reward.right_pad(seqs, "cpu")
    with torch.no_grad():
        batch = rm(idx, lengths)
        alone = torch.cat([rm(torch.tensor([s]), torch.tensor([len(s)])) for s in seqs])
        idx[1, 2:] = 13  # other pad ids: causal attention never lets the last real token see them
        repadded = rm(idx, lengths)
        h = rm.body.hidden_states(torch.tensor([seqs[0]]))[0, -1]
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)  # fp32, different batch shapes
    torch.testing.assert_close(repadded, batch, rtol=0, atol=0)
    torch.testing.assert_close(batch[0], rm.head(h)[0], rtol=1e-5, atol=1e-6)


def test_score_and_checkpoint_round_trip(tmp_path):
    rm = tiny_reward_model()
    prompts, completions = [[1, 2, 3], [4], [5, 6]], [[7, 16], [8, 9, 16], [16]]
    before = reward.score(rm, prompts, completions)
    path = tmp_path / "rm.pt"
    reward.save_reward_model(path, rm, "chat:char:" + reward.TASK_ALPHABET)
    loaded, spec = reward.load_reward_model(path)
    torch.testing.assert_close(reward.score(loaded, prompts, completions), before, rtol=0, atol=0)
    assert spec == "chat:char:" + reward.TASK_ALPHABET
    body, _ = gpt.load_checkpoint(path)  # the body is a plain GPT checkpoint (e.g. for a value head)
    assert body.config.n_layer == 2
    gpt.save_checkpoint(tmp_path / "lm.pt", body, spec)
    with pytest.raises(common.NanoError, match="not a reward model"):
        reward.load_reward_model(tmp_path / "lm.pt")
    with pytest.raises(common.NanoError, match="block_size 24"):
        reward.score(rm, [[1] * 20], [[2] * 5])


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_builtin_run(task_ckpt, tmp_path, capsys):
    out = tmp_path / "rm"
    last = reward.main(["--task_ckpt", str(task_ckpt), "--n_pairs", "512", "--max_iters", "40", "--eval_interval", "20",
                        "--log_interval", "10", "--out_dir", str(out), "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"pairwise accuracy: {100 * last['accuracy']:.1f}%"
    assert lines[-2] == f"next: python rl.py --reward_model {out / 'ckpt.pt'} --beta 1.0"
    rows = read_rows(out / "metrics.jsonl")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learns something even in 40 steps
    assert {"loss", "lr", "accuracy", "margin", "tok_per_s"} <= rows[-1].keys()
    assert plot.plot_runs({"rm": plot.read_metrics(out / "metrics.jsonl")}, tmp_path / "rm.png").is_file()
    rm, spec = reward.load_reward_model(out / "ckpt.pt")
    tok = tokenizer.load_tokenizer(spec)
    train, val = reward.task_pairs(tok, 4, 4, seed=0)
    chosen, rejected, _ = reward.pair_rewards(rm, val, "cpu", common.autocast("cpu", torch.float32))
    assert chosen.shape == rejected.shape == (4,)


def test_jsonl_pairs_with_margin_and_lora(task_ckpt, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"<|user|>add {a} {b}<|end|><|assistant|>", "chosen": str(a + b), "rejected": str(a + b + 10),
             "margin": 0.5 * (i % 2)} for i, (a, b) in enumerate([(12, 34), (21, 43), (50, 40), (33, 22), (61, 17)])]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tokenizer.load_tokenizer("chat:char:" + reward.TASK_ALPHABET)
    got, _ = reward.tokenize_rows(list(enumerate(rows, 1)), tok, 32, "row")
    assert [m for *_, m in got] == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert got[0][0] == reward.task_prompt(tok, "12 34") and got[0][1] == tok.encode("46") + [tok.eot_id]
    out = tmp_path / "rm"
    reward.main(["--init_from", str(task_ckpt), "--data", str(pairs), "--lora", "True", "--lora_r", "2",
                 "--max_iters", "4", "--batch_size", "2", "--val_fraction", "0.2", "--out_dir", str(out),
                 "--device", "cpu"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert not any(".lora_" in k for k in ckpt["model"]) and set(ckpt["reward_head"]) == {"weight", "bias"}


@pytest.mark.parametrize("row,message", [
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}, "line 1: 'margin' must be a number"),
    ({"prompt": "a", "chosen": "b"}, "line 1: missing field 'rejected'"),
])
def test_bad_rows_are_one_line_errors(task_ckpt, tmp_path, capsys, row, message):
    pairs = tmp_path / "bad.jsonl"
    pairs.write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as e:
        reward.main(["--init_from", str(task_ckpt), "--data", str(pairs), "--out_dir", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.jsonl", "--init_from", "x.pt"], "--data missing.jsonl not found"),
    (["--data", "x.jsonl"], "--data needs --init_from"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
    (["--val_fraction", "1"], "--val_fraction must be in [0, 1)"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        reward.main(args + ["--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_builtin_default_run_reaches_90_percent(tmp_path):
    """python reward.py as it comes (its SFT model trained first): >= 90% held-out pairwise accuracy."""
    last = reward.main(["--task_ckpt", str(tmp_path / "sft.pt"), "--out_dir", str(tmp_path / "rm"), "--device", "cpu"])
    assert last["accuracy"] >= 0.9
