"""train.py end to end on a tiny config: learns, checkpoints, resumes bit-exactly, fails cleanly."""

import json

import pytest

import torch

import bpe
import data
import gpt
import tokenizer
import train

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
        "--dropout", "0.1", "--learning_rate", "3e-3", "--warmup_iters", "5", "--lr_decay_iters", "40",
        "--eval_iters", "4", "--log_interval", "1", "--sample_tokens", "0", "--device", "cpu"]


def losses_by_iter(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "val_loss" in r]


# Each architecture, and an option that a resumed run of it must refuse (the model comes from the checkpoint).
ARCHS = {"gpt2": ([], ["--n_layer", "3"], "--n_layer 3 differs from the checkpoint's 2"),
         # Llama's block (RMSNorm, RoPE, SwiGLU, no biases) with GQA: 2 query heads share 1 key/value head
         "llama": (["--arch", "llama", "--n_kv_head", "1"], ["--arch", "gpt2"],
                   "--arch gpt2 differs from the checkpoint's llama")}


@pytest.mark.parametrize("arch", ARCHS)
def test_train_learns_checkpoints_and_resumes_bit_exactly(tmp_path, shakespeare_path, arch):
    arch_args, conflicting, conflict_message = ARCHS[arch]
    src = tmp_path / "text.txt"
    src.write_text(shakespeare_path.read_text()[:60_000])
    common = TINY + arch_args + ["--input", str(src), "--data_root", str(tmp_path / "data"), "--eval_interval", "10"]

    full = tmp_path / "full"
    train.main(common + ["--max_iters", "20", "--out_dir", str(full)])
    losses, evals = losses_by_iter(full)
    assert sorted(losses) == list(range(1, 21))
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # from ~4.2 (uniform over 65) downwards
    assert set(json.loads((full / "metrics.jsonl").read_text().splitlines()[1])) == \
        {"iter", "loss", "lr", "ms_per_step", "tokens", "tokens_per_s", "mfu"}
    assert all(r["val_bpb"] > 0 for r in evals)  # Tiny Shakespeare is ASCII: bpb = nats / ln 2 per char

    # the same run cut at iter 10, then resumed: identical losses afterwards
    part = tmp_path / "part"
    train.main(common + ["--max_iters", "10", "--out_dir", str(part)])
    ckpt = gpt.read_checkpoint(part / "ckpt.pt")
    assert ckpt["step"] == 10 and {"optimizer", "torch_rng", "best_val_loss"} <= ckpt.keys()
    # a killed run may have logged past its checkpoint: those rows go, none is doubled
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 11, "loss": 99.0}) + "\n")
    (part / ".ckpt.pt.tmp12345").write_bytes(b"half a checkpoint")  # what a kill mid-save leaves
    train.main(common + ["--max_iters", "20", "--out_dir", str(part), "--resume", "True"])
    resumed, _ = losses_by_iter(part)
    for it in range(11, 21):
        assert resumed[it] == losses[it], f"iter {it}: {resumed[it]} != {losses[it]}"
    iters = [json.loads(line)["iter"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(i for i in iters if iters.count(i) > 1)) == [10, 20]  # one loss row + one eval row each
    assert not list(part.glob(".ckpt.pt.tmp*"))
    one_line_error(common + ["--max_iters", "30", "--out_dir", str(part), "--resume", "True"] + conflicting,
                   conflict_message)

    # --init_from a checkpoint file: its weights, a fresh optimizer, step 0
    init = tmp_path / "init"
    train.main(common + ["--max_iters", "2", "--out_dir", str(init), "--init_from", str(full / "ckpt.pt"),
                         "--eval_interval", "2"])
    first, _ = losses_by_iter(init)
    assert first[1] < losses[1] - 0.5  # starts from the trained weights, not from scratch

    model, spec = gpt.load_checkpoint(full / "ckpt.pt")
    assert spec.startswith("char:") and model.config.n_layer == 2 and model.config.arch == arch
    if arch == "llama":  # the checkpoint holds Llama's block: no biases, no position table, 1 key/value head
        assert model.config.n_kv_head == 1 and model.config.rope_theta and model.config.norm == "rmsnorm"
        names = model.state_dict().keys()
        assert not any(name.endswith("bias") for name in names) and "transformer.wpe.weight" not in names
    tok = tokenizer.load_tokenizer(spec)
    assert tok.decode(tok.encode("ROMEO:")) == "ROMEO:"


def one_line_error(argv, match):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value)
    assert message.startswith("error:") and "\n" not in message and match in message, message


def test_bad_inputs(tmp_path, shakespeare_path):
    base = TINY + ["--data_root", str(tmp_path / "data"), "--max_iters", "1"]
    one_line_error(base + ["--input", str(tmp_path / "missing.txt")], "not found")
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    ok = base + ["--input", str(src)]
    one_line_error(ok + ["--n_embd", "30", "--n_head", "4"], "divisible")
    one_line_error(ok + ["--out_dir", str(tmp_path / "nothing"), "--resume", "True"], "not found")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(b"\x00garbage" * 10)
    one_line_error(ok + ["--out_dir", str(corrupt), "--init_from", "resume"], "not a readable checkpoint")
    one_line_error(ok + ["--preset", "huge"], "unknown preset")
    one_line_error(ok + ["--dataset", "nope"], "unknown dataset")
    with pytest.raises(SystemExit):  # argparse: a boolean that is not one
        train.main(ok + ["--compile", "perhaps"])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok \xff\xfe not utf-8")
    one_line_error(base + ["--input", str(binary)], "is not UTF-8 text")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(ok + ["--out_dir", str(a_file)], "is a file or below one")
    one_line_error(ok + ["--out_dir", str(a_file / "sub")], "is a file or below one")


@pytest.mark.parametrize("option, value, message", [
    ("--grad_clip", "-1", "--grad_clip must be >= 0"),  # -1 used to ascend the gradient
    ("--eval_iters", "0", "--eval_iters must be positive"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be positive"),
    ("--max_iters", "-1", "--max_iters must be >= 0"),
    ("--batch_size", "0", "--batch_size must be positive"),
    ("--eval_interval", "0", "--eval_interval must be positive"),
    ("--log_interval", "0", "--log_interval must be positive"),
    ("--learning_rate", "-1", "--learning_rate must be positive"),
    ("--dropout", "1.5", "--dropout must be in [0.0, 0.99]"),
    ("--device", "tpu", "unknown --device 'tpu'"),
    ("--init_from", "gpt5", "unknown --init_from 'gpt5'"),
    ("--arch", "mamba", "unknown --arch 'mamba'"),
    ("--gelu", "relu", "unknown --gelu 'relu' (exact or tanh or relu2)"),
    ("--optimizer", "sgd", "unknown --optimizer 'sgd' (adamw or muon)"),
    ("--lr_schedule", "step", "unknown --lr_schedule 'step' (cosine or wsd or constant)"),
    ("--warmup_ratio", "1.5", "--warmup_ratio must be in [0.0, 1.0]"),
    ("--attn_impl", "eager", "unknown --attn_impl 'eager' (sdpa or naive or flash)"),
    ("--n_kv_head", "3", "n_head 2 is not a multiple of n_kv_head 3"),
    ("--n_kv_head", "-1", "--n_kv_head must be >= 0"),
])
def test_bad_options(tmp_path, option, value, message):
    one_line_error(TINY + ["--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "o"), option, value],
                   message)
    assert not (tmp_path / "data").exists()  # refused before any work


def test_attn_impl_naive_trains_as_sdpa(tmp_path, shakespeare_path):
    """--attn_impl naive (softmax attention written out) takes the same steps as SDPA: fp32, only
    rounding differs (~1e-7 per attention), so the losses of 4 steps agree to 1e-5; the checkpoint
    keeps the choice, and a resumed run refuses another one."""
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    args = TINY + ["--input", str(src), "--data_root", str(tmp_path / "data"), "--dropout", "0.0", "--max_iters", "4",
                   "--eval_interval", "4", "--always_save_checkpoint", "True", "--n_kv_head", "0"]
    for impl in ("sdpa", "naive"):
        train.main(args + ["--attn_impl", impl, "--out_dir", str(tmp_path / impl)])
    sdpa, naive = losses_by_iter(tmp_path / "sdpa")[0], losses_by_iter(tmp_path / "naive")[0]
    assert sdpa.keys() == naive.keys() and all(abs(sdpa[i] - naive[i]) < 1e-5 for i in sdpa), (sdpa, naive)
    assert gpt.load_checkpoint(tmp_path / "naive" / "ckpt.pt")[0].config.attn_impl == "naive"
    resume = args + ["--out_dir", str(tmp_path / "naive"), "--resume", "True", "--max_iters", "5"]
    one_line_error(resume + ["--attn_impl", "sdpa"], "--attn_impl sdpa differs from the checkpoint's naive")
    train.main(resume)  # the checkpoint's naive attention; --n_kv_head 0 still means n_head: no conflict


def test_text_dataset_with_gpt2_tokens(tmp_path, shakespeare_path):
    src = tmp_path / "play.txt"
    src.write_text(shakespeare_path.read_text()[:30_000])
    out = tmp_path / "out"
    train.main(["--dataset", f"text:{src}", "--data_root", str(tmp_path / "data"), "--out_dir", str(out),
                "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "2",
                "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--sample_tokens", "5",
                "--device", "cpu"])
    meta = data.read_meta(tmp_path / "data" / "text_play")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    model, spec = gpt.load_checkpoint(out / "ckpt.pt")
    assert spec == "gpt2" and model.config.vocab_size == 50257
    assert model.config.gelu == "exact"  # from scratch: nanoGPT's GELU (GPT-2's weights keep their tanh one)


def test_eval_hellaswag_every(tmp_path, shakespeare_path):
    src = tmp_path / "t.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    row = {"ind": 0, "activity_label": "Speech", "ctx_a": "First Citizen:", "ctx_b": "we", "ctx": "First Citizen: we",
           "endings": ["are accounted poor citizens.", "go.", "know it.", "shall."], "label": 0,
           "source_id": "x", "split": "val", "split_type": "indomain"}
    rows_path = tmp_path / "hellaswag_val.jsonl"
    rows_path.write_text("\n".join(json.dumps(dict(row, ind=i)) for i in range(3)) + "\n")
    out = tmp_path / "out"
    train.main(TINY + ["--input", str(src), "--data_root", str(tmp_path / "data"), "--out_dir", str(out),
                       "--max_iters", "4", "--eval_interval", "4", "--eval_hellaswag_every", "2",
                       "--hellaswag_data", str(rows_path)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "hellaswag_acc_norm" in r]
    assert [r["iter"] for r in scores] == [0, 2, 4]
    # the last score is eval_hellaswag.py's own on the checkpoint saved at that step
    import eval_hellaswag

    model, spec = gpt.load_checkpoint(out / "ckpt.pt")
    ref = eval_hellaswag.evaluate(model, tokenizer.load_tokenizer(spec), eval_hellaswag.load_examples(rows_path),
                                  "completion", device="cpu")
    assert (scores[-1]["hellaswag_acc"], scores[-1]["hellaswag_acc_norm"]) == (ref["acc"], ref["acc_norm"])


@pytest.mark.parametrize("arch", ARCHS)
def test_ddp_two_ranks_equal_one_process_with_accumulation(tmp_path, shakespeare_path, arch, loopback):
    """torchrun with 2 gloo ranks x 1 micro-step trains the same model as 1 process x 2 micro-steps:
    the same batches (seeded per global micro-step), gradients averaged by DDP's all-reduce."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "t.txt"
    src.write_text(shakespeare_path.read_text()[:30_000])
    args = ["--input", str(src), "--data_root", str(tmp_path / "data"), "--n_layer", "1", "--n_head", "2",
            "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--gradient_accumulation_steps", "2",
            "--max_iters", "6", "--eval_interval", "6", "--eval_iters", "2", "--always_save_checkpoint", "True",
            "--sample_tokens", "0", "--device", "cpu", "--dropout", "0.0"] + ARCHS[arch][0]
    train.main(args + ["--out_dir", str(tmp_path / "one")])
    root = Path(train.__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(root / "train.py"), *args, "--out_dir", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    one = gpt.read_checkpoint(tmp_path / "one" / "ckpt.pt")["model"]
    two = gpt.read_checkpoint(tmp_path / "two" / "ckpt.pt")["model"]
    for name, tensor in one.items():
        # fp32, the same sums in a different order (all-reduce): 1e-5
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_train_own_bpe_tokenizer(tmp_path, shakespeare_path):
    src = tmp_path / "play.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    out = tmp_path / "out"
    train.main(["--dataset", f"text:{src}", "--train_tokenizer", "300", "--data_root", str(tmp_path / "data"),
                "--out_dir", str(out), "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
                "--batch_size", "2", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
                "--sample_tokens", "5", "--device", "cpu"])
    model, spec = gpt.load_checkpoint(out / "ckpt.pt")
    tok = tokenizer.load_tokenizer(spec)  # the bpe.py file trained on the text, recorded in the checkpoint
    assert spec.endswith(".bpe") and tok.vocab_size == model.config.vocab_size == 300
    assert tok.decode(tok.encode("First Citizen:")) == "First Citizen:"
    text = src.read_text()  # trained on the train split only: the merges of bpe.py on its first 90%
    vocab, merges = bpe.train_bpe(text[:int(len(text) * 0.9)], 300, special_tokens=("<|endoftext|>",))
    assert tok.tok.merges == merges
