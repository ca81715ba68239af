"""hellaswag: eval_hellaswag.py's batched scoring (several examples x 4 endings per padded
forward, the head only at ending positions) against one forward per ending with full logits.

Run: python -m bench hellaswag [--quick]"""

from __future__ import annotations

import random

import torch

import common
import eval_hellaswag as hs
import gpt
import tokenizer
from common import median_ms

from .util import row


def bench_hellaswag(quick: bool) -> None:
    """HellaSwag scoring speed: the batched evaluator (several examples x 4 endings per padded
    forward, head only at ending positions) vs one forward per ending with full logits, on the
    GPT-2 124M shape with random weights (speed does not depend on the weights)."""
    device = common.pick_device("auto")
    torch.manual_seed(0)
    # GPT-2 124M as from_pretrained("gpt2") builds it; quick: a tiny model, same vocabulary
    config = gpt.GPTConfig(vocab_size=50257)
    if quick:
        config = gpt.GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
    model = gpt.GPT(config).to(device).eval()
    shape = "tiny 2L/64" if quick else "gpt2-124M"
    tok = tokenizer.load_tokenizer("gpt2")

    # synthetic rows shaped like HellaSwag val: a 15-70 word context, endings of 8-30 words
    # (quick: short ones), so padding costs what it costs on the real data
    rng = random.Random(0)
    words = ("the man woman dog ball water then she he is are holds runs jumps into over a of "
             "slowly quickly kitchen street bike camera rope table paint snow").split()
    ctx_len, end_len = ((8, 16), (4, 8)) if quick else ((15, 70), (8, 30))

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    n = 1 if quick else (256 if device.startswith("cuda") else 2)
    examples = [{"ind": i, "activity_label": "Bench", "ctx_a": "", "ctx_b": "", "ctx": text(*ctx_len),
                 "endings": [text(*end_len) for _ in range(4)], "label": 0} for i in range(n)]
    batch_size = 32 if device.startswith("cuda") else 2

    def batched():
        hs.evaluate(model, tok, examples, "completion", batch_size=batch_size, device=device)

    def one_forward_per_ending():
        for example in examples:
            scores = hs.ending_logprobs_naive(model, hs.render_example(example, tok, "completion"), device)
            int(scores.argmax())

    repeat, warmup = (1, 0) if quick else ((5, 1) if device.startswith("cuda") else (2, 1))
    batched_ms = median_ms(batched, repeat=repeat, warmup=warmup)
    naive_ms = median_ms(one_forward_per_ending, repeat=repeat, warmup=warmup)
    row("hellaswag", f"{shape} batched, {batch_size} examples/forward ({device}, fp32)",
        f"{n / batched_ms * 1e3:.1f} examples/s")
    row("hellaswag", f"{shape} one forward per ending ({device}, fp32)", f"{n / naive_ms * 1e3:.1f} examples/s")
    row("hellaswag", f"{shape} batched / one-forward-per-ending throughput", f"{naive_ms / batched_ms:.2f}x")
