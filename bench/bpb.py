"""bpb: bits per UTF-8 byte of held-out Tiny Shakespeare for one model shape trained through
train.py with four tokenizers (characters, bpe.py's BPE at two vocabulary sizes, GPT-2's BPE).

Run: python -m bench bpb [--quick]"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch

import data
import gpt
import train

from .util import NANOGPT_CPU_RUN, SHARED_DATA, row

# nanoGPT's CPU run with a quarter of its 2000 iterations (set per run below): the GPT-2-vocabulary
# run, whose 50k-row head costs ~7x the rest of the model, took 1457 s of the section's ~32 min
# (2-6.5 s a step on 2 shared cores at load 8-18); the other three runs 1.5-3 min each.
BPB_RUN = NANOGPT_CPU_RUN + ["--log_interval", "50", "--sample_tokens", "0", "--preset", "none", "--seed", "1337"]
BPB_ITERS = 500
BPB_EVAL_ITERS = 40  # 40 x 12 x 64 = 30,720 scored val positions (20, the default, is noisier)


def bench_bpb(quick: bool) -> None:
    """Bits per UTF-8 byte of held-out Tiny Shakespeare (its last 10%, data.py's split) for one
    model shape trained with four tokenizers: characters, GPT-2's BPE, and bpe.py's BPE trained
    by train.py --train_tokenizer on the train split only (the first 90%) at vocab 512 and 4096. Same n_layer, n_head,
    n_embd, block_size, batch_size, iterations, LR schedule and seed for all, through train.py's
    CLI; val_bpb is train.py's eval figure (val loss in bits x val tokens / val bytes).
    What is equal is the transformer body and the number of token positions per step; what is
    not: the tied embedding/head grows with the vocabulary (FLOPs per token printed), and a BPE
    token spans more bytes, so the same steps read more text (bytes seen printed)."""
    src = SHARED_DATA / "tinyshakespeare.txt"
    iters, eval_iters, sizes = (20, 4, (300,)) if quick else (BPB_ITERS, BPB_EVAL_ITERS, (512, 4096))
    arg = dict(zip(BPB_RUN[::2], BPB_RUN[1::2]))
    n_layer, n_embd, T, B = (int(arg[k]) for k in ("--n_layer", "--n_embd", "--block_size", "--batch_size"))
    row("bpb", f"Tiny Shakespeare val bits/byte: {n_layer}L/{n_embd}, T={T}, B={B}, {iters} iters, CPU",
        "val_bpb | bytes/token | GFLOP/step | MB of text seen | wall")
    with tempfile.TemporaryDirectory() as tmp:
        # characters: the text's own alphabet (shakespeare_char); else the text with that tokenizer
        tokenizers = {"char (vocab 65)": ["--dataset", "shakespeare_char", "--input", str(src)]}
        for size in sizes:  # own BPE (its training time counts in the wall time)
            tokenizers[f"own BPE (vocab {size})"] = ["--dataset", f"text:{src}", "--train_tokenizer", str(size)]
        # last: the slowest run (its head is 50257 x n_embd)
        tokenizers["GPT-2 BPE (vocab 50257)"] = ["--dataset", f"text:{src}", "--tokenizer", "gpt2"]
        # one thread: this model is too small for two to help, and on a shared machine two threads
        # spin against the other jobs (measured at load ~7.5 on 2 cores: 157 vs 985 ms per char-model step)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, (name, dataset_args) in enumerate(tokenizers.items()):
                root = Path(tmp) / f"run{i}"
                argv = BPB_RUN + dataset_args + ["--data_root", str(root), "--out_dir", str(root / "out"),
                                                 "--max_iters", str(iters), "--lr_decay_iters", str(iters),
                                                 "--eval_interval", str(iters), "--eval_iters", str(eval_iters)]
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    train.main(argv)
                wall = time.perf_counter() - t0
                meta = data.read_meta(next(root.glob("*/meta.json")).parent)
                evals = [json.loads(line) for line in open(root / "out" / "metrics.jsonl")]
                bpb = [r["val_bpb"] for r in evals if "val_bpb" in r][-1]
                model = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=meta["vocab_size"], n_layer=n_layer,
                                              n_head=int(arg["--n_head"]), n_embd=n_embd))
                gflop = model.flops_per_token() * B * T / 1e9
                bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
                mb_seen = iters * B * T * meta["train_bytes"] / meta["train_tokens"] / 1e6
                row("bpb", f"  {name}", f"{bpb:.3f} | {bytes_per_token:.2f} | {gflop:.2f} | {mb_seen:.1f} | {wall:.0f} s")
        finally:
            torch.set_num_threads(threads)
