"""dpo.py: the loss against its formulas (and TRL 0.19.1's), sequence log-probs against a naive
log_softmax, step-0 identities, a short synthetic run that learns, the LoRA reference, bad input."""

import copy
import importlib.util
import json
import math
import shlex

import pytest
import torch
import torch.nn.functional as F

import dpo
import common
import gpt
import plot
import lora
import tokenizer

# A tiny synthetic run: no pretraining (a random base is still a valid reference), one layer.
TINY = ["--pretrain_iters", "0", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_pairs", "256",
        "--batch_size", "16", "--learning_rate", "3e-3", "--log_interval", "4", "--eval_interval", "1000", "--device", "cpu"]


def random_logps(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-30 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("loss_type,label_smoothing,reference_free", [
    ("sigmoid", 0.0, False), ("sigmoid", 0.3, False), ("sigmoid", 0.0, True),
    ("ipo", 0.0, False), ("hinge", 0.0, False), ("hinge", 0.0, True)])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_loss_matches_the_formulas(loss_type, label_smoothing, reference_free, beta):
    pc, pr, rc, rr = random_logps()
    # the formulas written out independently, in float64 with log(sigmoid) rather than logsigmoid
    h = (pc - pr) - (0 if reference_free else rc - rr)
    expected = {
        "sigmoid": -(1 - label_smoothing) * torch.log(torch.sigmoid(beta * h))
                   - label_smoothing * torch.log(torch.sigmoid(-beta * h)),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": torch.clamp(1 - beta * h, min=0),
    }[loss_type]
    pc.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta, label_smoothing,
                                                            loss_type, reference_free)
    # float64 throughout: the two ways of writing log sigmoid agree to ~1e-15 here (|beta*h| < 21)
    torch.testing.assert_close(losses.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, beta * (pc.detach() - rc), rtol=0, atol=0)
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr), rtol=0, atol=0)
    assert not chosen_rewards.requires_grad and losses.requires_grad  # rewards are logging only


def trl_0_19_1_dpo_loss(pc, pr, rc, rr, beta, label_smoothing, loss_type, reference_free):
    """TRL 0.19.1's DPOTrainer.dpo_loss for these loss types (f_divergence_type reverse_kl),
    transcribed: no installable TRL has a standalone dpo_loss any more (>= 0.20 computes it inside
    _compute_loss, and 1.x dropped label_smoothing from the sigmoid loss), so its formulas stand here."""
    logratios = pc - pr
    ref_logratios = torch.zeros_like(logratios) if reference_free else rc - rr
    logits = logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo; the caller passes per-token average log-probs
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def test_dpo_loss_matches_trl_0_19_1():
    x = random_logps()
    for loss_type, ls, rf in [("sigmoid", 0.0, False), ("sigmoid", 0.2, False), ("sigmoid", 0.0, True),
                              ("ipo", 0.0, False), ("hinge", 0.0, False)]:
        theirs = trl_0_19_1_dpo_loss(*x, 0.3, ls, loss_type, rf)
        ours = dpo.dpo_loss(*x, beta=0.3, label_smoothing=ls, loss_type=loss_type, reference_free=rf)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # float64: the same formula


def test_sequence_logps_matches_naive_log_softmax():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = (3 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    labels = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[2] = False  # a row with nothing to score: sum 0, average 0 (no division by zero)
    labels[~mask] = -100  # masked labels may be anything, even an invalid id
    got_sum = dpo.sequence_logps(logits, labels, mask)
    got_avg = dpo.sequence_logps(logits, labels, mask, average=True)
    naive_sum = torch.zeros(B)
    naive_avg = torch.zeros(B)
    lsm = F.log_softmax(logits.double(), dim=-1)
    for b in range(B):
        terms = [lsm[b, t, labels[b, t]] for t in range(T) if mask[b, t]]
        if terms:
            naive_sum[b] = sum(terms)
            naive_avg[b] = sum(terms) / len(terms)
    # fp32 logsumexp vs fp64 log_softmax over 11 logits of scale 3: ~1e-6 relative
    torch.testing.assert_close(got_sum, naive_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_avg, naive_avg, rtol=1e-5, atol=1e-5)
    # the gradient too (what training uses)
    (g1,) = torch.autograd.grad(got_sum.sum(), logits)
    (g2,) = torch.autograd.grad(naive_sum.sum(), logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=len(dpo.SYNTH_ALPHABET), n_layer=2, n_head=2, n_embd=32))


def tiny_batch(n=6, seed=0):
    import random
    tok = tokenizer.load_tokenizer("char:" + dpo.SYNTH_ALPHABET)
    rows = dpo.synthetic_rows(n, random.Random(seed))
    pairs, _ = dpo.tokenize_pairs(rows, tok, 32, 16)
    return dpo.collate(pairs, "cpu")


def test_collate_masks_exactly_the_completion():
    pairs = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12])]
    idx, labels, mask = dpo.collate(pairs, "cpu")
    assert idx.shape == (4, 4)  # 2 chosen then 2 rejected; the longest sequence has 5 tokens -> 4 inputs
    # sequence 0 = prompt 1 2 3 + chosen 4 5: inputs 1 2 3 4, targets 2 3 4 5, scored targets 4 5
    assert idx[0].tolist() == [1, 2, 3, 4] and labels[0].tolist() == [2, 3, 4, 5]
    assert mask[0].tolist() == [False, False, True, True]
    assert labels[3][mask[3]].tolist() == [11, 12]  # rejected of pair 1: both tokens, nothing else
    assert labels[2][mask[2]].tolist() == [6]


def test_concatenated_logps_equals_full_logits():
    model = tiny_model()
    batch = tiny_batch()
    idx, labels, mask = batch
    assert not mask[:, :4].any()  # prompts are >= 5 characters: some columns are skipped
    full = dpo.sequence_logps(model(idx)[0], labels, mask).chunk(2)
    for avg in (False, True):
        got = dpo.concatenated_logps(model, batch, avg, common.autocast("cpu", torch.float32))
        want = full if not avg else dpo.sequence_logps(model(idx)[0], labels, mask, True).chunk(2)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)  # same math, other matmul shapes


def test_step0_policy_equals_reference_loss_is_log2():
    model = tiny_model()
    ref = copy.deepcopy(model).eval()
    batch = tiny_batch()
    ctx = common.autocast("cpu", torch.float32)
    c, r = dpo.concatenated_logps(model, batch, False, ctx)
    rc, rr = dpo.reference_logps(model, ref, batch, False, ctx)
    for loss_type, at_zero in [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)]:
        losses, cr, rjr = dpo.dpo_loss(c, r, rc, rr, beta=0.1, loss_type=loss_type)
        # identical weights, identical computation: h is exactly 0, not merely small
        assert torch.equal(cr, torch.zeros_like(cr)) and torch.equal(rjr, torch.zeros_like(rjr))
        torch.testing.assert_close(losses, torch.full_like(losses, at_zero), rtol=1e-7, atol=0)


def test_synthetic_run_separates_rewards(tmp_path, capsys):
    out = dpo.main(TINY + ["--max_iters", "24", "--out_dir", str(tmp_path)])
    command = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plot: python plot.py "))
    if importlib.util.find_spec("matplotlib"):  # the printed next command works as printed
        assert plot.main(shlex.split(command.removeprefix("plot: python plot.py "))).is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    first_eval = rows[0]
    assert first_eval["step"] == 0
    assert first_eval["eval/loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    assert first_eval["eval/rewards/margins"] == 0.0
    assert train[-1]["rewards/accuracies"] > 0.9
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"] > 0
    assert out["last"]["eval/rewards/accuracies"] > 0.9  # held-out pairs too
    assert out["last"]["eval/rewards/margins"] > 0.5  # from 0 at step 0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "tokens_per_s"):
        assert key in train[-1]
    model, spec = gpt.load_checkpoint(tmp_path / "ckpt.pt")  # what sample.py reads
    assert spec == "char:" + dpo.SYNTH_ALPHABET and model.config.n_layer == 1


def test_precomputed_reference_gives_the_same_run(tmp_path):
    args = TINY + ["--max_iters", "4", "--loss_type", "ipo"]
    live = dpo.main(args + ["--out_dir", str(tmp_path / "a")])
    pre = dpo.main(args + ["--out_dir", str(tmp_path / "b"), "--precompute_ref", "True"])
    for key, value in live["last"].items():
        if key != "eval/uppercase_rate":  # sampled: equal too, but not the point
            assert pre["last"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_lora_reference_equals_a_frozen_copy():
    model = tiny_model()
    frozen = copy.deepcopy(model).eval()
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"])
    with torch.no_grad():  # adapters that do something, as after training
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    batch = tiny_batch()
    ctx = common.autocast("cpu", torch.float32)
    via_disabled = dpo.reference_logps(model, None, batch, False, ctx)
    via_copy = dpo.reference_logps(frozen, frozen, batch, False, ctx)
    for a, b in zip(via_disabled, via_copy):
        assert torch.equal(a, b)  # the same base computation, bit for bit
    policy = dpo.concatenated_logps(model, batch, False, ctx)
    assert not torch.allclose(policy[0], via_copy[0])  # while the adapters are on, it differs
    assert all(layer.enabled for _, layer in lora.lora_layers(model))  # and they are back on


def test_lora_run_saves_adapter_and_merged_checkpoint(tmp_path):
    out = dpo.main(TINY + ["--max_iters", "12", "--lora", "True", "--lora_r", "4", "--learning_rate", "1e-2",
                           "--out_dir", str(tmp_path)])
    assert out["first"]["eval/loss"] == pytest.approx(math.log(2), rel=1e-6)  # B = 0: policy == base
    assert out["last"]["eval/rewards/accuracies"] > 0.8 and out["last"]["eval/rewards/margins"] > 0
    adapter = torch.load(tmp_path / "adapter.pt", weights_only=True)
    assert adapter["base"] == str(tmp_path / "base.pt") and adapter["lora_config"]["r"] == 4
    gpt.load_checkpoint(tmp_path / "ckpt.pt")  # merged: a plain checkpoint


# ---------------------------------------------------------------------------------------
# Data: truncation and bad input


def test_truncation_keeps_prompt_end_and_completion_start():
    p, c, r = dpo.truncate_pair(list(range(10)), [20, 21, 22, 23, 24, 25], [30, 31], max_length=8,
                                max_prompt_length=4)
    assert p == [6, 7, 8, 9] and c == [20, 21, 22, 23] and r == [30, 31]
    assert dpo.truncate_pair([1, 2], [3], [4], 8, 4) == ([1, 2], [3], [4])  # fits: untouched


@pytest.fixture
def char_ckpt(tmp_path):
    path = tmp_path / "base.pt"
    gpt.save_checkpoint(path, tiny_model(), "char:" + dpo.SYNTH_ALPHABET)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "\nabc>", "chosen": "XYZ.", "rejected": "xyz."}


@pytest.mark.parametrize("bad,message", [
    ({"prompt": "\nab>", "rejected": "x."}, "line 2: missing field 'chosen'"),
    ({"prompt": "\nab>", "chosen": "", "rejected": "x."}, "line 2: empty 'chosen'"),
    ({"prompt": "\nab>", "chosen": "X.", "rejected": 3}, "line 2: field 'rejected' is a int"),
    ('{"prompt": "a", ', "line 2: not valid JSON"),
    ({"prompt": "\nab>", "chosen": "X!", "rejected": "x."}, "line 2: character '!' is not in"),
    ({"prompt": "", "chosen": "X.", "rejected": "x."}, "line 2: empty prompt"),
])
def test_bad_rows_fail_before_training_naming_the_row(tmp_path, char_ckpt, bad, message):
    jsonl_path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(SystemExit) as e:
        dpo.main(["--init_from", str(char_ckpt), "--data", str(jsonl_path), "--out_dir", str(tmp_path / "o")])
    assert str(e.value).startswith("error: ") and message in str(e.value), str(e.value)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_identical_pairs_are_skipped_and_counted(tmp_path, char_ckpt, capsys):
    rows = [GOOD] * 6 + [{"prompt": "\nab>", "chosen": "same.", "rejected": "same."}] * 2
    jsonl_path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = dpo.main(["--init_from", str(char_ckpt), "--data", str(jsonl_path), "--out_dir", str(tmp_path / "o"),
                    "--max_iters", "1", "--val_fraction", "0", "--device", "cpu"])
    assert out["stats"]["identical_skipped"] == 2
    assert "skipped 2 pair(s)" in capsys.readouterr().err


def one_line_error(argv, match, capsys):
    """main(argv) exits 2 with exactly one `error:` line on stderr, which contains `match`."""
    with pytest.raises(SystemExit) as e:
        dpo.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and errors == [str(e.value)], (e.value.code, errors)
    assert match in errors[0], errors[0]


# Each bad value, with a valid --data and checkpoint around it unless the case is about those.
# In the arguments, {ckpt} is a real checkpoint, {tmp} the test's folder, {data} a valid .jsonl.
@pytest.mark.parametrize("args,message", [
    (["--beta", "0"], "--beta must be positive (got 0.0)"),
    (["--beta", "-1"], "--beta must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--grad_accum", "0"], "--grad_accum must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--max_iters", "-1"], "--max_iters must be >= 0"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--grad_clip", "-1"], "--grad_clip must be >= 0"),  # a negative clip would flip the gradient
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--warmup_iters", "-5"], "--warmup_iters must be >= 0"),
    (["--eval_interval", "0"], "--eval_interval must be positive"),
    (["--log_interval", "0"], "--log_interval must be positive"),
    (["--max_length", "-1"], "--max_length must be >= 0"),  # 0 is valid: the model's block_size
    (["--max_prompt_length", "-1"], "--max_prompt_length must be >= 0"),
    (["--lora_r", "0"], "--lora_r must be positive"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0.0, 0.99]"),
    (["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5)"),
    (["--label_smoothing", "-0.1"], "--label_smoothing must be in [0, 0.5)"),
    (["--val_fraction", "1"], "--val_fraction must be in [0, 1)"),
    (["--loss_type", "kto"], "unknown --loss_type 'kto'"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--dtype", "int4"], "unknown dtype 'int4'"),
    (["--data", "{tmp}/binary.jsonl"], "--data {tmp}/binary.jsonl is not UTF-8 text"),
    (["--data", "{tmp}/latin1.jsonl"], "--data {tmp}/latin1.jsonl is not UTF-8 text (bad byte at offset 17"),
    (["--data", "{tmp}/missing.jsonl"], "--data {tmp}/missing.jsonl not found"),
    (["--init_from", "{tmp}/notes.txt"], "--init_from: {tmp}/notes.txt is not a readable checkpoint"),
    (["--init_from", "{tmp}/missing.pt"], "--init_from: checkpoint {tmp}/missing.pt not found"),
    (["--init_from", "gpt5"], "--init_from: unknown model 'gpt5'"),
    (["--out_dir", "{tmp}/a_file"], "--out_dir {tmp}/a_file is a file or below one"),
    (["--out_dir", "{tmp}/a_file/sub"], "is a file or below one"),
    (["--data", "{data}", "--init_from", ""], "--data needs --init_from"),
    # what only the model can tell: checked after loading it, still before any step
    (["--max_prompt_length", "32"], "leaves no room for the completion"),
    (["--max_length", "64"], "exceeds the model's block_size"),
    (["--lora", "True", "--lora_targets", "nope"], "check --lora_targets"),
])
def test_bad_options_are_one_line_errors_before_any_work(tmp_path, char_ckpt, capsys, args, message):
    paths = {"ckpt": char_ckpt, "tmp": tmp_path, "data": write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)}
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n\x00\x01')
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).replace("abc", "caf\xe9").encode("latin-1"))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "a_file").write_text("x")
    valid = ["--init_from", "{ckpt}", "--data", "{data}", "--out_dir", "{tmp}/o", "--device", "cpu"]
    one_line_error([a.format(**paths) for a in valid + args], message.format(**paths), capsys)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert (tmp_path / "a_file").read_text() == "x"


def test_no_usable_pairs(tmp_path, char_ckpt, capsys):
    jsonl_path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "\na>", "chosen": "b.", "rejected": "b."}])
    one_line_error(["--init_from", str(char_ckpt), "--data", str(jsonl_path), "--out_dir", str(tmp_path / "o")],
                   "no usable preference pairs", capsys)


def test_gpt2_tokenized_jsonl_truncates_long_prompts(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "base.pt"
    gpt.save_checkpoint(path, gpt.GPT(gpt.GPTConfig(block_size=24, vocab_size=50304, n_layer=1, n_head=2,
                                                    n_embd=16)), "gpt2")
    long_prompt = "\n\nHuman: " + "tell me a story about a dragon and a knight " * 5 + "\n\nAssistant:"
    rows = [{"prompt": long_prompt, "chosen": " Once upon a time there was a kind dragon who loved reading.",
             "rejected": " No."},
            {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}] * 4
    jsonl_path = write_jsonl(tmp_path / "hh.jsonl", rows)
    out = dpo.main(["--init_from", str(path), "--data", str(jsonl_path), "--out_dir", str(tmp_path / "o"),
                    "--max_iters", "2", "--batch_size", "4", "--val_fraction", "0", "--device", "cpu"])
    assert out["stats"]["truncated"] == 4 and out["stats"]["rows"] == 8
    tok = tokenizer.load_tokenizer("gpt2")
    p, c, _ = dpo.truncate_pair(tok.encode(long_prompt), tok.encode(rows[0]["chosen"]), tok.encode(" No."), 24, 12)
    assert tok.decode(p).endswith("\n\nAssistant:") and len(p) == 12  # the end of the prompt survives
    assert tok.decode(c).startswith(" Once upon") and len(c) == 24 - 12  # the start of the answer
    pairs, _ = dpo.tokenize_pairs([(1, rows[1])], tok, 24, 12)
    assert pairs[0][1][-1] == pairs[0][2][-1] == tok.eot_id  # untruncated answers end with end-of-text
