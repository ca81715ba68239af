"""sft: sft.py's two batch layouts on the same conversations, packed rows (block-diagonal mask) vs
one conversation per padded row: real tokens/s and the share of computed positions that count;
then the built-in task (`python sft.py` at its defaults): exact match before and after, wall time.

Run: python -m bench sft [--quick]"""

from __future__ import annotations

import math
import os
import random
import statistics
import tempfile
import time

import torch

import common
import data
import gpt
import sft
import tokenizer

from .util import row


def bench_sft(quick: bool) -> None:
    bench_sft_packing(quick)
    bench_sft_builtin(quick)


def bench_sft_packing(quick: bool) -> None:
    """sft.py's two batch layouts on the same conversations: packed rows of T tokens with a
    block-diagonal mask, or one conversation per row padded to the batch's longest. The
    conversations are Tiny Shakespeare passages in the chat template (GPT-2 BPE + the four
    chat tokens), 1-3 exchanges of user and assistant turns whose lengths are drawn
    log-normally (median T/8 tokens, a tail up to T/2), the raggedness of real chat data;
    longer conversations are cut at T. A training step is forward + backward + AdamW: on a GPU
    the GPT-2 124M shape at T = 1024, B = 8 rows; on a CPU a 4-layer 256-wide GPT (with
    GPT-2's 50k vocabulary) at T = 256, B = 4. Figures: real (non-pad) tokens/s, the share of computed
    positions that carry loss, and that hold a real token; medians over interleaved repeats
    (packed, padded, packed, ...), both layouts from one run, with the slowest and fastest
    repeat beside the median (this machine is shared: the spread says how far to trust a ratio)."""
    device = common.pick_device("auto")
    dtype = common.pick_dtype(device, "auto")
    if quick:
        T, batch_size, shape, repeat, steps = 64, 4, (2, 2, 64), 2, 2
    elif device == "cpu":
        T, batch_size, shape, repeat, steps = 256, 4, (4, 4, 256), 5, 2
    else:  # the GPT-2 124M shape
        T, batch_size, shape, repeat, steps = 1024, 8, (12, 12, 768), 5, 3
    tok = tokenizer.ChatTokenizer(tokenizer.load_tokenizer("gpt2"))
    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    rng = random.Random(0)

    def passage():  # a log-normal number of GPT-2 tokens of Shakespeare (median T / 8), as text
        n = max(1, min(T // 2, int(rng.lognormvariate(math.log(T / 8), 1.0))))
        start = rng.randrange(len(text) - 8 * n)
        return tok.base.decode(tok.base.encode(text[start:start + 8 * n])[:n]).strip() or "x"

    convs = []
    for _ in range(300 if quick else 1000):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": passage()}, {"role": "assistant", "content": passage()}]
        convs.append(messages)
    examples = [sft.to_example(*sft.render_conversation(m, tok), T) for m in convs]
    examples = [e for e in examples if e is not None]

    n_layer, n_head, n_embd = shape
    cfg = gpt.GPTConfig(block_size=T, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    torch.manual_seed(0)
    model = gpt.GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    streams = {pack: sft.make_batches(examples, sft.shuffled_forever(len(examples), torch.Generator().manual_seed(1)),
                                      batch_size, T, pack) for pack in (True, False)}
    sync = torch.cuda.synchronize if "cuda" in device else (lambda: None)
    stats = {pack: {"s": [], "tokens": 0, "targets": 0, "positions": 0, "time": 0.0} for pack in (True, False)}
    for rep in range(repeat + 1):  # the first round warms up and is not counted
        for pack in (True, False):
            batches = [sft.to_device(next(streams[pack]), device) for _ in range(steps)]
            sync()
            t0 = time.perf_counter()
            for b in batches:
                with common.autocast(device, dtype):
                    loss = sft.batch_loss(model, b)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            dt = time.perf_counter() - t0
            if rep:
                s = stats[pack]
                n_tok = sum(b["n_tokens"] for b in batches)
                s["s"].append(n_tok / dt)
                s["tokens"] += n_tok
                s["targets"] += sum(int((b["targets"] != -1).sum()) for b in batches)
                s["positions"] += sum(b["idx"].numel() for b in batches)
    packed, padded = stats[True], stats[False]
    name = f"{cfg.n_layer}L/{cfg.n_embd}, T={T}, B={batch_size}, {device}"
    tps = {k: statistics.median(v["s"]) for k, v in stats.items()}
    row("sft", f"real tokens/s ({name}, {torch.get_num_threads()} threads): packed / padded",
        f"{tps[True]:,.0f} / {tps[False]:,.0f} = {tps[True] / tps[False]:.2f}x")
    row("sft", f"  slowest-fastest of {repeat} repeats: packed / padded",
        " / ".join(f"{min(stats[p]['s']):,.0f}-{max(stats[p]['s']):,.0f}" for p in (True, False)))
    row("sft", "positions computed that carry loss: packed / padded",
        f"{100 * packed['targets'] / packed['positions']:.0f}% / {100 * padded['targets'] / padded['positions']:.0f}%")
    row("sft", "positions computed that hold a real token: packed / padded",
        f"{100 * packed['tokens'] / packed['positions']:.0f}% / {100 * padded['tokens'] / padded['positions']:.0f}%")
    n_assist = sum(sum(t != -1 for t in y) for _, y in examples)
    row("sft", "assistant tokens among all tokens of the data", f"{100 * n_assist / sum(len(x) for x, _ in examples):.0f}%")


def bench_sft_builtin(quick: bool) -> None:
    """The built-in task (python sft.py at its defaults): exact match before/after and wall
    time, with the process CPU time beside it (on a shared machine wall time mostly measures
    the other jobs)."""
    if quick:
        args = ["--base_iters", "20", "--max_iters", "20", "--n_train", "200", "--n_test", "20",
                "--base_layer", "1", "--base_embd", "32", "--base_head", "2", "--eval_interval", "20"]
    else:
        args = []
    with tempfile.TemporaryDirectory() as out:
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = sft.main(args + ["--out_dir", out])
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    row("sft", f"built-in task{' (quick)' if quick else ''}: exact match before / after SFT",
        f"{100 * result['accuracy_before']:.1f}% / {100 * result['accuracy_after']:.1f}%")
    row("sft", f"built-in task: wall time (pretraining the base + SFT, {torch.get_num_threads()} threads)",
        f"{wall:.0f} s ({cpu:.0f} s of CPU, load average {os.getloadavg()[0]:.1f})")
