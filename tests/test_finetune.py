"""finetune.py: the one finetune loop and its CLI (also `python lora.py`): text and
prompt/response data, the schedule and metrics rows, the adapter and merged checkpoint it
writes, a Llama-family base, and every bad option or file refused in one line before any work."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import finetune
import gpt
import lora
import tokenizer


@pytest.fixture
def idx(tiny_config):
    return torch.randint(0, tiny_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]

@pytest.fixture
def tiny_ckpt(tmp_path, tiny_config, shakespeare_path):
    text = shakespeare_path.read_text()
    alphabet = "".join(sorted(set(text)))
    assert len(alphabet) == tiny_config.vocab_size
    path = tmp_path / "base" / "ckpt.pt"
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config)
    with torch.no_grad():
        # A 0.02-std random head caps every logit near +-0.1: adapters inside the blocks could
        # barely move the output. Scaled by 4 the tied head can express a character
        # distribution, as a pretrained one can (the base loss is then 4.3, not ln 65 = 4.17).
        model.lm_head.weight.mul_(4)
    gpt.save_checkpoint(path, model, "char:" + alphabet)
    return path, text


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# learning rate 1e-2: measured over seeds 1337/1/2 x warmup 2/5 with common.cosine_lr, every
# text run ends at val 3.81-3.82 (base 4.32); 3e-2 sat at the edge of stability (2 of those
# 6 runs blew up back to 4.05-4.27 after step 7).
CLI = ["--r", "8", "--alpha", "16", "--batch_size", "8", "--learning_rate", "1e-2", "--warmup_iters", "2",
       "--eval_interval", "30", "--eval_iters", "4", "--log_interval", "10", "--device", "cpu"]


def test_cli_text(tmp_path, tiny_ckpt, capsys):
    ckpt, text = tiny_ckpt
    jsonl_path = tmp_path / "input.txt"
    jsonl_path.write_text(text[:20_000])
    out = tmp_path / "out"
    finetune.main(["--init_from", str(ckpt), "--data", str(jsonl_path), "--out_dir", str(out), "--max_iters", "30", *CLI])
    printed = capsys.readouterr().out
    assert "trainable" in printed and "peak memory" in printed and "tok/s" in printed and "ETA" in printed
    metrics = read_metrics(out)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert val[-1] < val[0] - 0.3 and val[-1] < math.log(65) - 0.2, val  # better than uniform: it learned
    # one row per step: the one warmup-cosine schedule, cumulative tokens, throughput at log steps
    steps = metrics[1:]
    assert [m["iter"] for m in metrics] == list(range(31)) and set(metrics[0]) == {"iter", "val_loss"}
    assert [m["lr"] for m in steps] == [common.cosine_lr(i, 1e-2, 1e-3, 2, 30) for i in range(30)]
    assert [m["tokens"] for m in steps] == [8 * 32 * (i + 1) for i in range(30)]
    assert [m["iter"] for m in steps if "tok_per_s" in m] == [10, 20, 30]
    adapter = out / "adapter.pt"
    assert adapter.stat().st_size < 0.5 * ckpt.stat().st_size  # the adapter alone, not the model
    sd = torch.load(adapter, weights_only=True)
    assert sd["base"] == str(ckpt) and sd["lora_config"]["r"] == 8
    model = lora.load_lora(gpt.load_checkpoint(ckpt)[0], adapter)
    assert all(torch.count_nonzero(layer.lora_B.weight) > 0 for _, layer in lora.lora_layers(model))  # B trained


def test_jsonl_masks_the_prompt(tiny_ckpt, tmp_path):
    _, text = tiny_ckpt
    tok = tokenizer.load_tokenizer("char:" + "".join(sorted(set(text))))
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text(json.dumps({"prompt": "Q: who?", "response": "A: me"}) + "\n\n")
    (ids, targets), = finetune.load_jsonl(jsonl_path, tok, 0.0, block_size=32)[0]
    prompt, response = tok.encode("Q: who?"), tok.encode("A: me")
    assert ids == (prompt + response)[:-1]
    # position t predicts token t+1: the last prompt position predicts the first response token
    assert targets == [-1] * (len(prompt) - 1) + response


def test_cli_jsonl_and_merge(tmp_path, tiny_ckpt, idx):
    ckpt, _ = tiny_ckpt
    rows = [{"prompt": f"Say {w}:", "response": f" {w.upper()}!"} for w in
            ["hello", "world", "lord", "king", "queen", "sir", "madam", "good", "night", "day"]]
    jsonl_path = tmp_path / "chat.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    finetune.main(["--init_from", str(ckpt), "--data", str(jsonl_path), "--out_dir", str(out), "--max_iters", "30",
               "--val_fraction", "0", "--merge", "True", *CLI])
    val = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m]
    assert val[-1] < val[0] - 0.5, val
    merged, _ = gpt.load_checkpoint(out / "ckpt_merged.pt")
    adapted = lora.load_lora(gpt.load_checkpoint(ckpt)[0], out / "adapter.pt").eval()
    torch.testing.assert_close(logits(merged.eval(), idx), logits(adapted, idx), rtol=0, atol=1e-5)


def test_cli_llama_checkpoint(tmp_path, shakespeare_path, idx):
    """lora.py on a Llama-family checkpoint: --targets auto adapts q/k/v/o and gate/up/down,
    the adapters train, and the merged checkpoint computes the adapted model."""
    text = shakespeare_path.read_text()
    config = gpt.llama_config(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, n_kv_head=1,
                              tie_embeddings=False)
    torch.manual_seed(0)
    gpt.save_checkpoint(tmp_path / "llama.pt", gpt.GPT(config), "char:" + "".join(sorted(set(text))))
    (tmp_path / "d.txt").write_text(text[:5000])
    out = tmp_path / "out"
    finetune.main(["--init_from", str(tmp_path / "llama.pt"), "--data", str(tmp_path / "d.txt"), "--out_dir", str(out),
               "--max_iters", "4", "--eval_interval", "4", "--eval_iters", "1", "--log_interval", "2",
               "--batch_size", "4", "--merge", "True", "--device", "cpu"])
    assert torch.load(out / "adapter.pt", weights_only=True)["lora_config"]["targets"] == \
        list(lora.DEFAULT_TARGETS["llama"])
    adapted = lora.load_lora(gpt.load_checkpoint(tmp_path / "llama.pt")[0], out / "adapter.pt").eval()
    assert len(lora.lora_layers(adapted)) == 7 * 2
    assert all(torch.count_nonzero(layer.lora_B.weight) > 0 for _, layer in lora.lora_layers(adapted))
    merged, _ = gpt.load_checkpoint(out / "ckpt_merged.pt")
    torch.testing.assert_close(logits(merged.eval(), idx), logits(adapted, idx), rtol=0, atol=1e-5)


def test_bad_input(tmp_path, tiny_ckpt):
    ckpt, text = tiny_ckpt
    base = ["--init_from", str(ckpt), "--out_dir", str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="not found"):
        finetune.main([*base, "--data", str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(SystemExit, match="line 2 is not JSON"):
        finetune.main([*base, "--data", str(bad)])
    bad.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(SystemExit, match="'prompt' and 'response'"):
        finetune.main([*base, "--data", str(bad)])
    short = tmp_path / "short.txt"
    short.write_text("First Citizen")
    with pytest.raises(SystemExit, match="fewer than block_size"):
        finetune.main([*base, "--data", str(short)])
    good = tmp_path / "good.txt"
    good.write_text(text[:5000])
    with pytest.raises(SystemExit, match="--targets c_attn,nope: no Linear named nope in this model"):
        finetune.main([*base, "--data", str(good), "--targets", "c_attn,nope"])
    with pytest.raises(SystemExit, match="block_size"):
        finetune.main([*base, "--data", str(short), "--block_size", "999"])
    with pytest.raises(SystemExit, match="unknown model 'gpt2-tiny'"):
        finetune.main(["--init_from", "gpt2-tiny", "--data", str(short)])
    with pytest.raises(SystemExit):  # argparse: a bool that is not one
        finetune.main([*base, "--data", str(short), "--merge", "maybe"])


def error_line(capsys, main, argv) -> str:
    """Run a CLI main that must refuse: exit status 2 and exactly one `error:` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# (option, bad value, the error line); every one refused before the checkpoint is read
BAD_OPTIONS = [
    ("--r", "0", "--r must be positive (got 0)"),
    ("--alpha", "-16", "--alpha must be positive (got -16.0)"),
    ("--batch_size", "0", "--batch_size must be positive (got 0)"),
    ("--grad_accum", "0", "--grad_accum must be positive (got 0)"),
    ("--max_iters", "-1", "--max_iters must be positive (got -1)"),
    ("--max_iters", "0", "--max_iters must be positive (got 0)"),
    ("--learning_rate", "-1", "--learning_rate must be positive (got -1.0)"),
    ("--learning_rate", "nan", "--learning_rate must be positive (got nan)"),
    ("--eval_interval", "0", "--eval_interval must be positive (got 0)"),
    ("--eval_iters", "0", "--eval_iters must be positive (got 0)"),
    ("--log_interval", "0", "--log_interval must be positive (got 0)"),
    ("--block_size", "-1", "--block_size must be >= 0 (got -1)"),
    ("--warmup_iters", "-1", "--warmup_iters must be >= 0 (got -1)"),
    ("--weight_decay", "-0.1", "--weight_decay must be >= 0 (got -0.1)"),
    ("--grad_clip", "-1", "--grad_clip must be >= 0 (got -1.0)"),  # clip_grad_norm_(-1) would ascend
    ("--min_lr_ratio", "1.5", "--min_lr_ratio must be in [0.0, 1.0] (got 1.5)"),
    ("--lora_dropout", "1", "--lora_dropout must be in [0, 1) (got 1.0)"),
    ("--val_fraction", "-0.1", "--val_fraction must be in [0, 1) (got -0.1)"),
    ("--dtype", "float8", "unknown dtype 'float8' (auto, float32, bfloat16, float16)"),
    ("--device", "tpu", "unknown --device 'tpu' (auto, cpu, cuda, cuda:N or mps)"),
]


@pytest.mark.parametrize("option,value,message", BAD_OPTIONS)
def test_bad_option_refused_first(tmp_path, capsys, option, value, message):
    (tmp_path / "d.txt").write_text("to be or not to be\n" * 20)
    argv = ["--init_from", str(tmp_path / "never_read.pt"), "--data", str(tmp_path / "d.txt"),
            "--out_dir", str(tmp_path / "out"), "--device", "cpu", option, value]
    assert error_line(capsys, finetune.main, argv) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_bad_files_one_line(tmp_path, tiny_ckpt, capsys):
    ckpt, text = tiny_ckpt
    good = tmp_path / "good.txt"
    good.write_text(text[:5000])

    def run(data, out="out"):
        argv = ["--init_from", str(ckpt), "--device", "cpu", "--data", str(data), "--out_dir", str(tmp_path / out)]
        return error_line(capsys, finetune.main, argv)

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert run(binary) == (f"error: {binary} is not UTF-8 text (NUL byte at offset 0: a binary or UTF-16 file; "
                           "convert it to UTF-8 text)")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "response": "ok"}\n'.encode("latin-1"))
    assert run(latin1) == f"error: {latin1} is not UTF-8 text (bad byte at offset 15; convert it to UTF-8)"
    (tmp_path / "a_file").write_text("x")
    for out in ("a_file", "a_file/sub/dir"):  # common.check_out_dir's line
        assert run(good, out) == f"error: --out_dir {tmp_path / out} is a file or below one (pick a folder)"
    (tmp_path / "out" / "adapter.pt").mkdir(parents=True)
    assert run(good) == (f"error: {tmp_path / 'out' / 'adapter.pt'} is a folder, but adapter.pt is written "
                         "there (remove it or choose another --out_dir)")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before any work
    # a tokenizer with more tokens than the model has rows (was an IndexError in the embedding)
    wide = tmp_path / "wide.pt"
    gpt.save_checkpoint(wide, gpt.load_checkpoint(ckpt)[0], "char:" + "".join(sorted(set(text))) + "#%*+/<=>@^")
    assert error_line(capsys, finetune.main, ["--init_from", str(wide), "--data", str(good), "--out_dir",
                                          str(tmp_path / "o2"), "--device", "cpu"]) == \
        "error: the tokenizer has 75 tokens, the model only 65 (a checkpoint with another tokenizer?)"


def test_lora_py_runs_this_cli():
    """`python lora.py ...` is finetune.py's CLI: the same options, the same defaults."""
    root = Path(__file__).resolve().parents[1]
    helps = [subprocess.run([sys.executable, script, "--help"], cwd=root, capture_output=True, text=True,
                            check=True).stdout for script in ("lora.py", "finetune.py")]
    options = [help_text[help_text.index("options:"):] for help_text in helps]
    assert options[0] == options[1] and "--targets STR" in options[0] and "(default: 'out-lora')" in options[0]
