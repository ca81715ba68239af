"""rl.py: GRPO against TRL 1.16's own GRPOTrainer._compute_loss and advantages, PPO against TRL 0.19.1's
PPOTrainer (transcribed), rollouts and log-probs against a plain forward, the LoRA reference, reward
functions, tiny GRPO/PPO runs, the pretrain -> sft -> reward -> rl -> serve walk, one-line errors; the
default built-in runs (>= 20 points of held-out exact match) are the slow tests."""

import io
import json
import sys
import types
from collections import defaultdict

import pytest
import torch

import gpt
import lora
import plot
import reward
import rl


# test_reward.py's fixture: the built-in task's SFT model after 10 steps
from test_reward import task_ckpt  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def random_batch(B=6, C=7, seed=0):
    """Per-token log-probs of a policy (with gradients), its old self and a reference; lengths 1..C."""
    g = torch.Generator().manual_seed(seed)
    logps = (-3 * torch.rand(B, C, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logps.detach() + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    ref = logps.detach() + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    lengths[0] = C  # one completion fills the window
    mask = torch.arange(C)[None] < lengths[:, None]
    return logps, old, ref, mask, g


# ----------------------------------------------------------------------------------------
# GRPO == TRL 1.16


def trl_grpo(loss_type, level, beta, logps, old, ref, advantages, mask, max_completion_length):
    """TRL 1.16's GRPOTrainer._compute_loss itself, on a stand-in trainer whose model returns `logps`. Its
    per-token losses are read from the function's locals as it returns (a profile hook)."""
    from trl import GRPOTrainer

    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x, sync_gradients=True)
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, vllm_importance_sampling_correction=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=accelerator, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    B, C = logps.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    seen = {}

    def hook(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "_compute_loss":
            seen.update(frame.f_locals)

    sys.setprofile(hook)
    try:
        loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    finally:
        sys.setprofile(None)
    return loss, (seen["per_token_loss"] * mask).expand(B, C), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", rl.GRPO_LOSSES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl_1_16(loss_type, level, beta):
    pytest.importorskip("trl")
    logps, old, ref, mask, g = random_batch()
    advantages = torch.randn(len(logps), generator=g, dtype=torch.float64)
    theirs, their_tokens, metrics = trl_grpo(loss_type, level, beta, logps, old, ref, advantages, mask, 7)
    ours, our_tokens, stats = rl.grpo_loss(logps, old, advantages, mask, ref, beta, 0.2, 0.28, loss_type, level, 7,
                                           mask.sum().item())
    # float64 and the same operations: equal far below the 1e-6 asked for
    torch.testing.assert_close(our_tokens, their_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours_grad, = torch.autograd.grad(ours, logps)
    theirs_grad, = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=1e-6)
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"][0], abs=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl_1_16(scale):
    """TRL 1.16's _generate_and_score_completions (one reward function, sum_then_normalize) transcribed
    around its own nanstd."""
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    g = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 2, (24,), generator=g).double() + 0.1 * torch.randn(24, generator=g, dtype=torch.float64)
    rewards[:4] = 1.0  # a group whose completions all scored alike: advantage 0
    G = 4
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0) if scale != "batch" else nanstd(rewards).expand_as(rewards)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(rl.group_advantages(rewards, G, scale), expected, rtol=0, atol=1e-6)
    assert rl.group_advantages(rewards, G, scale)[:4].abs().max() == 0


# ----------------------------------------------------------------------------------------
# PPO == TRL 0.19.1


def trl_0_19_1_core():
    """trl/core.py's masked_mean, masked_var, masked_whiten (0.19.1), transcribed."""
    def masked_mean(values, mask):
        return (values * mask).sum() / mask.sum()

    def masked_var(values, mask):
        variance = masked_mean((values - masked_mean(values, mask)) ** 2, mask)
        return variance * (mask.sum() / (mask.sum() - 1))

    def masked_whiten(values, mask, shift_mean=True):
        mean, var = masked_mean(values, mask), masked_var(values, mask)
        whitened = (values - mean) * torch.rsqrt(var + 1e-8)
        return whitened if shift_mean else whitened + mean

    return masked_mean, masked_whiten


def trl_0_19_1_ppo(scores, logprobs, ref_logprobs, values, sequence_lengths, new_logprobs, vpred, args):
    """PPOTrainer.train of TRL 0.19.1 (the last release with PPO): after the rollout, steps 4-6 and the loss of
    one minibatch holding the whole batch, transcribed line by line (TRL 1.x has no PPOTrainer to import)."""
    masked_mean, masked_whiten = trl_0_19_1_core()
    INVALID_LOGPROB = 1.0
    response_idxs = torch.arange(logprobs.shape[1]).repeat(logprobs.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    # 4. compute rewards
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[(actual_start, actual_end)] += scores  # TRL writes [[...]], which torch 2.9+ warns about
    # 5. whiten rewards
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    # 6. compute advantages and returns
    lastgaelam = 0
    advantages_reversed = []
    gen_length = logprobs.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    # the minibatch
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - args.cliprange_value, values + args.cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    return rewards, advantages, returns, pg_loss + args.vf_coef * vf_loss


@pytest.mark.parametrize("kl_estimator,whiten_rewards,gamma", [("k1", False, 1.0), ("k3", True, 0.9)])
def test_ppo_advantages_and_losses_equal_trl_0_19_1(kl_estimator, whiten_rewards, gamma):
    new, old, ref, mask, g = random_batch(B=8, C=6, seed=1)
    B, C = mask.shape
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    values = torch.randn(B, C, generator=g, dtype=torch.float64)
    vpred = (values + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)).requires_grad_(True)
    args = types.SimpleNamespace(kl_coef=0.05, kl_estimator=kl_estimator, whiten_rewards=whiten_rewards, gamma=gamma,
                                 lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    rewards, advantages, returns, loss = trl_0_19_1_ppo(scores, old, ref, values, mask.sum(1) - 1, new, vpred, args)
    our_rewards, _ = rl.ppo_rewards(scores, old, ref, mask, args.kl_coef, kl_estimator)
    our_adv, our_returns, our_values, _ = rl.ppo_advantages(scores, old, ref, values, mask, args)
    our_loss, stats = rl.ppo_loss(new, old, our_adv, mask, vpred, our_values, our_returns, 0.2, 0.2, 0.1)
    if not whiten_rewards:
        torch.testing.assert_close(our_rewards, rewards, rtol=0, atol=1e-6)
    for ours, theirs in [(our_adv, advantages), (our_returns, returns), (our_loss, loss)]:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # float64, the same operations
    grads = [torch.autograd.grad(x, (new, vpred)) for x in (our_loss, loss)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert 0 <= stats["clip_ratio"] <= 1 and stats["vf_loss"] > 0


def test_gae_by_hand():
    """One row, gamma 0.5, lambda 1: advantages are discounted sums of the TD errors."""
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = rl.gae(rewards, values, gamma=0.5, lam=1.0)
    deltas = [0 + 0.5 * 0.4 - 0.2, 0 + 0.5 * 0.6 - 0.4, 1.0 - 0.6]
    want = [deltas[0] + 0.5 * deltas[1] + 0.25 * deltas[2], deltas[1] + 0.5 * deltas[2], deltas[2]]
    torch.testing.assert_close(adv, torch.tensor([want]))
    torch.testing.assert_close(ret, adv + values)


# ----------------------------------------------------------------------------------------
# Rollouts, log-probs, the reference


def tiny_model(seed=0, vocab=20):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()


def test_completion_mask_ends_at_the_first_stop():
    tokens = torch.tensor([[3, 4, 9, 9], [9, 9, 9, 9], [1, 2, 3, 4]])
    assert rl.completion_mask(tokens, 9).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert rl.completion_mask(tokens, None).all()


def test_token_logps_equal_each_sequence_alone():
    """Left-padded prompts of different lengths: the log-probs of each completion equal those of a plain
    forward pass over that prompt + completion alone."""
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    ro = rl.rollout(model, prompts, 6, 1.0, stop_id=19, seed=0, vocab_size=19)
    assert ro.completion.max() < 19 or (ro.completion == 19).any()  # sampled below vocab_size (19 = stop)
    logps, _ = rl.token_logps(model, ro, temperature=0.7)
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + ro.completion[b].tolist()])
        logits = model(seq)[0][0, len(p) - 1:-1, :19].double() / 0.7
        want = logits.log_softmax(-1).gather(-1, ro.completion[b][:, None]).squeeze(-1)
        torch.testing.assert_close(logps[b].double(), want, rtol=0, atol=1e-5)  # fp32 sums of different shapes


def test_lora_reference_is_the_model_with_adapters_off(tmp_path):
    model = tiny_model()
    cfg = rl.RLConfig(lora=True, lora_r=2, lora_targets="c_attn,c_proj,c_fc")
    policy = rl.Policy(model, cfg, base="tiny")
    assert policy.ref_model is None and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ro = rl.rollout(model, [[1, 2, 3]] * 4, 5, 1.0, None, 0, 20)
    ctx = torch.autocast("cpu", enabled=False)
    before = policy.ref_logps(ro, ctx)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # the policy moves away ...
    moved, _ = rl.token_logps(model, ro, 1.0)
    assert (moved - before).abs().max() > 1e-3
    torch.testing.assert_close(policy.ref_logps(ro, ctx), before, rtol=0, atol=0)  # ... its reference does not
    plain = tiny_model()  # the same weights, no adapters at all
    torch.testing.assert_close(rl.token_logps(plain, ro, 1.0)[0], before, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# Rewards


def test_reward_functions_and_loading(tmp_path, monkeypatch):
    assert rl.exact_answer(None, ["85", " 75 ", "8"], answer=["85", "75", "85"]) == [1.0, 1.0, 0.0]
    assert rl.longer_is_better(None, ["85", ""]) == [2.0, 0.0]
    assert rl.load_reward_fn("rl:exact_answer") is rl.exact_answer
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                            "    return [-len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rl.load_reward_fn("my_rewards:short")(["p"], ["abc"]) == [-3]
    for name, message in [("exact_answer", "not module:function"), ("nosuchmodule:f", "cannot import nosuchmodule"),
                          ("rl:nothing", "rl has no function nothing")]:
        with pytest.raises(rl.NanoError, match=message):
            rl.load_reward_fn(name)


# ----------------------------------------------------------------------------------------
# Tiny runs, the walk from pretraining to serving


TINY = ["--steps", "4", "--prompts_per_step", "4", "--num_generations", "4", "--n_test", "16", "--eval_interval", "2",
        "--log_interval", "2", "--device", "cpu", "--plot", "False"]


@pytest.mark.parametrize("algo,extra", [("grpo", ["--beta", "0.04", "--loss_type", "grpo"]),
                                        ("ppo", ["--epochs", "2", "--minibatches", "2"]),
                                        ("grpo", ["--lora", "True", "--lora_r", "2", "--importance_sampling_level", "sequence"])])
def test_tiny_runs(task_ckpt, tmp_path, capsys, algo, extra):
    out = tmp_path / "rl"
    result = rl.main(TINY + ["--algo", algo, "--task_ckpt", str(task_ckpt), "--out_dir", str(out)] + extra)
    lines = capsys.readouterr().out.strip().splitlines()
    before, after = result["first"]["eval/exact_match"], result["last"]["eval/exact_match"]
    assert lines[-1] == f"exact match before: {100 * before:.1f}% after: {100 * after:.1f}%"
    assert lines[-3] == f"next: python serve.py --ckpt {out / 'ckpt.pt'} --chat"
    assert lines[-2] == f"plot: python plot.py {out / 'metrics.jsonl'}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 2 and {"reward", "kl", "completion_length", "rollout_tok_per_s", "train_tok_per_s",
                                 "time/rollout", "time/train", "lr"} <= logged[-1].keys()
    assert plot.plot_runs({"rl": plot.read_metrics(out / "metrics.jsonl")}, tmp_path / "loss.png").is_file()
    model, spec = gpt.load_checkpoint(out / "ckpt.pt")  # a plain checkpoint, adapters merged
    assert not lora.lora_layers(model) and spec == "chat:char:" + reward.TASK_ALPHABET
    assert (out / "adapter.pt").is_file() == ("--lora" in extra)


def test_draw_writes_the_picture(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": 0, "eval/exact_match": 0.4}, {"step": 5, "reward": 0.5, "kl": 0.01, "completion_length": 3.5},
            {"step": 10, "reward": 0.7, "kl": 0.02, "completion_length": 3.4}, {"step": 10, "eval/exact_match": 0.6}]
    assert rl.draw(rows, tmp_path / "rl.png").stat().st_size > 1000


def test_pretrain_sft_reward_rl_serve(tmp_path, shakespeare_path, monkeypatch, capsys):
    """One checkpoint all the way: train.py -> sft.py (a .jsonl of conversations) -> reward.py (pairs) ->
    rl.py (GRPO against the reward model, as reward.py prints it) -> serve.py --chat (as rl.py prints it)."""
    import serve
    import sft
    import train

    src = tmp_path / "text.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    train.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
                "--max_iters", "3", "--eval_iters", "1", "--eval_interval", "3", "--sample_tokens", "0", "--input", str(src),
                "--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "pre"), "--device", "cpu"])
    words = ["dog", "cat", "sun", "bee", "owl", "ant", "fig", "elm"]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]}) + "\n" for w in words))
    sft.main(["--init_from", str(tmp_path / "pre" / "ckpt.pt"), "--data", str(tmp_path / "chat.jsonl"), "--max_iters", "3",
              "--batch_size", "4", "--val_fraction", "0.25", "--out_dir", str(tmp_path / "sft"), "--device", "cpu"])
    prompt = "<|user|>reverse: {}<|end|><|assistant|>"
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": prompt.format(w), "chosen": w[::-1],
                                                              "rejected": w}) + "\n" for w in words))
    capsys.readouterr()
    reward.main(["--init_from", str(tmp_path / "sft" / "ckpt.pt"), "--data", str(tmp_path / "pairs.jsonl"), "--max_iters",
                 "3", "--batch_size", "4", "--val_fraction", "0.25", "--out_dir", str(tmp_path / "rm"), "--device", "cpu"])
    rl_command = capsys.readouterr().out.strip().splitlines()[-2]  # the command reward.py prints, run as printed
    assert rl_command.startswith("next: python rl.py --reward_model ") and "--data" in rl_command
    rl.main(rl_command.split()[3:] + ["--steps", "2", "--prompts_per_step", "2", "--num_generations", "2", "--n_test", "2",
                                      "--out_dir", str(tmp_path / "rl"), "--device", "cpu", "--plot", "False"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("held-out reward before: ")  # pairs have no "answer": the reward model's score
    next_command = lines[-3]
    assert next_command == f"next: python serve.py --ckpt {tmp_path / 'rl' / 'ckpt.pt'} --chat"
    monkeypatch.setattr(sys, "stdin", io.StringIO("reverse: dog\n/quit\n"))
    serve.main(next_command.split()[3:] + ["--device", "cpu", "--temperature", "0", "--max_tokens", "4"])
    assert "assistant>" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--algo", "dqn"], "unknown --algo 'dqn' (one of grpo, ppo)"),
    (["--num_generations", "1"], "--num_generations must be >= 2"),
    (["--minibatches", "3"], "--minibatches 3 must divide the 128 completions"),
    (["--data", "p.jsonl"], "--data needs --init_from"),
    (["--reward_model", "nothing.pt"], "--reward_model nothing.pt not found"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--gamma", "1.5"], "--gamma must be in [0.0, 1.0]"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        rl.main(args + ["--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("setup,message", [
    ("bad_line", "prompts.jsonl line 2: needs a non-empty string 'prompt'"),
    ("no_answer", "reward function exact_answer"),
    ("weights", "--reward_weights has 2 weights for 1 rewards"),
    ("bad_weights", "--reward_weights 'x' is not comma-separated numbers"),
    ("lm_as_rm", "is a language model, not a reward model"),
])
def test_bad_inputs_are_one_line_errors(task_ckpt, tmp_path, capsys, setup, message):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "<|user|>add 12 34<|end|><|assistant|>", "answer": "46"}] * 10
    if setup == "bad_line":
        rows[1] = {"prompt": ""}
    if setup == "no_answer":
        rows = [{"prompt": r["prompt"]} for r in rows]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = {"weights": ["--reward_weights", "1,2"], "bad_weights": ["--reward_weights", "x"],
             "lm_as_rm": ["--reward_model", str(task_ckpt)]}.get(setup, [])
    with pytest.raises(SystemExit) as e:
        rl.main(["--init_from", str(task_ckpt), "--data", str(prompts), "--steps", "1", "--prompts_per_step", "2",
                 "--num_generations", "2", "--out_dir", str(tmp_path / "o"), "--device", "cpu"] + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def full_task_ckpt(tmp_path_factory):
    """The built-in task's SFT model as rl.py trains it by default (about a minute on an idle CPU)."""
    torch.set_num_threads(1)
    return reward.task_sft_model(tmp_path_factory.mktemp("full") / "sft.pt", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_builtin_default_run_raises_exact_match_by_20_points(full_task_ckpt, tmp_path, algo):
    """python rl.py --algo X as it comes: held-out exact match +20 points (measured: 39.5% -> 97-99% GRPO,
    93.5-97.5% PPO over three seeds)."""
    result = rl.main(["--algo", algo, "--task_ckpt", str(full_task_ckpt), "--out_dir", str(tmp_path / algo),
                      "--device", "cpu"])
    assert result["last"]["eval/exact_match"] - result["first"]["eval/exact_match"] >= 0.2
