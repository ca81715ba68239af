"""sample: sample.py's KV-cached decode against recomputing the window and against Hugging Face's
generate, then batch-1 decode against the memory bound (one read of every weight per step).

Run: python -m bench sample [--quick]"""

from __future__ import annotations

import os
import statistics
import time

import torch

import gpt
import sample
from common import median_ms

from .util import bound_products, gpt2_shape, row


def bench_sample(quick: bool) -> None:
    """sample.py: KV-cached decode vs recomputing the window, and vs Hugging Face's generate.

    GPT-2-124M-shaped model with random weights (quick: a tiny one), 32-token prompts,
    greedy. The uncached decode time is integrated from the measured cost of one uncached
    step at a few window lengths (the per-step cost grows ~linearly with the window), since
    running all 256 uncached steps of a 124M model would take minutes on a CPU."""
    torch.manual_seed(0)
    config, name = gpt2_shape(quick)
    prompt_len, new_tokens, batches = (8, 8, (1, 2)) if quick else (32, 256, (1, 8))
    model = gpt.GPT(config).eval()

    def timed_generate(prompt, n=new_tokens):
        """(prefill_s, decode_s, tokens) of one cached greedy generation."""
        t0 = time.perf_counter()
        out, t_first = [], None
        for tok in sample.generate(model, prompt, n, temperature=0):
            out.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
        return t_first - t0, time.perf_counter() - t_first, torch.stack(out, 1)

    for batch in batches:
        prompt = torch.randint(0, config.vocab_size, (batch, prompt_len))
        timed_generate(prompt, n=4)  # warm-up (allocator, threads, the batch-1 head copy)
        prefill_s, decode_s, tokens = timed_generate(prompt)
        steps = new_tokens - 1  # the first token comes from the prefill
        cached_tps = batch * steps / decode_s
        row("sample", f"{name} B={batch} prefill {prompt_len} tok (cached)", f"{batch * prompt_len / prefill_s:.0f} tok/s")
        row("sample", f"{name} B={batch} decode {new_tokens} tok, cached", f"{cached_tps:.1f} tok/s, {decode_s / steps * 1e3:.2f} ms/step")

        # uncached: one step = the full window through the model; time it at 3 window lengths
        head = sample.LogitsHead(model, batch_size=batch)
        lengths = [prompt_len + 1, prompt_len + new_tokens // 2, prompt_len + new_tokens - 1]
        step_ms = []
        for length in lengths:
            rows = torch.randint(0, config.vocab_size, (batch, length)).tolist()
            with torch.no_grad():
                step_ms.append(median_ms(lambda rows=rows, head=head: sample.forward_no_cache(model, rows, head), repeat=1))
        # trapezoid over the window lengths the real run would see (prompt_len+1 .. prompt_len+new_tokens-1)
        half = steps / 2
        uncached_s = (half * (step_ms[0] + step_ms[1]) / 2 + half * (step_ms[1] + step_ms[2]) / 2) / 1e3
        row("sample", f"{name} B={batch} decode {new_tokens} tok, no cache (3-length estimate)",
            f"{batch * steps / uncached_s:.1f} tok/s, {uncached_s / steps * 1e3:.2f} ms/step")
        row("sample", f"{name} B={batch} decode speed-up of the KV cache", f"{uncached_s / decode_s:.2f}x")

        try:
            import transformers  # reference only: the same weights in GPT2LMHeadModel
        except ImportError:
            continue
        hf = hf_gpt2(model, transformers)
        ours_s = prefill_s + decode_s
        attention = torch.ones_like(prompt)
        with torch.no_grad():
            hf.generate(prompt[:, :4], attention_mask=attention[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
            t0 = time.perf_counter()
            hf_out = hf.generate(prompt, attention_mask=attention, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
            hf_s = time.perf_counter() - t0
        same = (hf_out[:, prompt_len:] == tokens).float().mean().item()
        row("sample", f"{name} B={batch} HF GPT2LMHeadModel.generate, {new_tokens} tok (same tokens: {same:.0%})",
            f"{batch * new_tokens / hf_s:.1f} tok/s")
        row("sample", f"{name} B={batch} sample.generate speed vs HF generate", f"{hf_s / ours_s:.2f}x")
    bench_decode_bound(quick)


def bench_decode_bound(quick: bool) -> None:
    """sample.py's batch-1 decode against the memory bound and against HF generate.

    The bound: a decode step reads every weight once, so it cannot beat one 1-row fp32
    product over a weight as large as the whole model (timed here, in the faster of the
    two layouts, in the same run). Ours: sample.generate on a model laid out by
    sample.decode_layout (as the CLI does on CPU), eager and with --compile's decode step;
    theirs: GPT2LMHeadModel.generate with the same weights, both greedy, 256 tokens after a
    32-token prompt (quick: a tiny model). Decode time = first new token to last (255
    steps), for HF read off a streamer. All sides run in turn in every round and the
    medians are compared, so a busy machine slows each alike."""
    torch.manual_seed(0)
    config, name = gpt2_shape(quick)
    prompt_len, new_tokens, rounds = (8, 8, 1) if quick else (32, 256, 3)
    model = sample.decode_layout(gpt.GPT(config).eval())
    n_params = sum(p.numel() for p in model.parameters())
    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(b))
               for b in (1, 8)}
    steps = new_tokens - 1  # the first new token comes from the prefill

    def clocks():  # wall time, and this thread's CPU time: the machine is shared, and with one
        return time.perf_counter(), time.thread_time()  # thread CPU time leaves out the waits

    def ours(batch=1, decode_fn=None):
        """((wall, CPU) decode seconds, tokens (B, new_tokens)) of one greedy sample.generate."""
        out = []
        for tok in sample.generate(model, prompts[batch], new_tokens, temperature=0, decode_fn=decode_fn):
            out.append(tok)
            if len(out) == 1:
                first = clocks()
        return [b - a for a, b in zip(first, clocks())], torch.stack(out, 1)

    compiled = sample.compile_decode()  # inductor, as --compile

    def bound(product):
        start = clocks()
        product()
        return [b - a for a, b in zip(start, clocks())], None

    in_out, out_in = bound_products(n_params)
    sides = {"bound (in, out)": lambda: bound(in_out), "bound (out, in)": lambda: bound(out_in),
             "ours": ours, "ours --compile": lambda: ours(decode_fn=compiled), "ours B=8": lambda: ours(8)}
    try:
        import transformers  # reference only: the same weights in GPT2LMHeadModel
    except ImportError:
        transformers = None
    if transformers is not None:
        hf = hf_gpt2(model, transformers)

        class Stamps(transformers.generation.streamers.BaseStreamer):
            """The time of every put: the prompt first, then each new token."""

            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(clocks())

            def end(self):
                pass

        def theirs():
            stamps = Stamps()
            with torch.no_grad():
                out = hf.generate(prompts[1], attention_mask=torch.ones_like(prompts[1]), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=stamps)
            return [b - a for a, b in zip(stamps.times[1], stamps.times[-1])], out[:, prompt_len:]

        sides["HF generate"] = theirs

    t0 = time.perf_counter()
    ours(decode_fn=compiled)  # compiles the decode step once
    compile_s = time.perf_counter() - t0
    results = {label: [fn()] for label, fn in sides.items()}  # warm-up round, dropped below
    for _ in range(rounds):
        for label, fn in sides.items():
            results[label].append(fn())
    med = {label: statistics.median(r[0][0] for r in runs[1:]) for label, runs in results.items()}  # wall
    cpu = {label: statistics.median(r[0][1] for r in runs[1:]) for label, runs in results.items()}
    tokens = {label: runs[-1][1] for label, runs in results.items()}

    bound_s = min(med["bound (in, out)"], med["bound (out, in)"])
    bound_tps = 1 / bound_s
    bound_cpu_s = min(cpu["bound (in, out)"], cpu["bound (out, in)"])
    threads = torch.get_num_threads()

    def cpu_note(text):  # with one thread, the same ratio in thread CPU time (robust to a busy machine)
        return f" (CPU time: {text})" if threads == 1 else ""

    load = os.getloadavg()[0]
    row("sample", f"{name} decode bound: 1-row fp32 product over {n_params / 1e6:.0f}M weights ({threads} threads)",
        f"{bound_s * 1e3:.1f} ms = {bound_tps:.1f} tok/s (load average {load:.1f})")
    for label in ("ours", "ours --compile"):
        tps = steps / med[label]
        what = label.replace("ours", "decode").strip()
        row("sample", f"{name} batch 1 {what}: ours / bound",
            f"{tps:.1f} tok/s = {tps / bound_tps:.0%} of {bound_tps:.1f}"
            + cpu_note(f"{bound_cpu_s * steps / cpu[label]:.0%}"))
    if transformers is not None:
        hf_tps = steps / med["HF generate"]
        same = torch.equal(tokens["HF generate"], tokens["ours"]) and torch.equal(tokens["ours --compile"], tokens["ours"])
        row("sample", f"{name} batch 1 decode: HF GPT2LMHeadModel.generate (same tokens: {same})",
            f"{hf_tps:.1f} tok/s = {hf_tps / bound_tps:.0%} of the bound")
        for label in ("ours", "ours --compile"):
            what = label.replace("ours", "decode").strip()
            row("sample", f"{name} batch 1 {what}: ours / HF generate",
                f"{med['HF generate'] / med[label]:.2f}x" + cpu_note(f"{cpu['HF generate'] / cpu[label]:.2f}x"))
    b8_tps, b1_tps = 8 * steps / med["ours B=8"], steps / med["ours"]
    row("sample", f"{name} decode tokens/s: batch 8 / batch 1",
        f"{b8_tps:.1f} / {b1_tps:.1f} tok/s = {b8_tps / b1_tps:.2f}x" + cpu_note(f"{8 * cpu['ours'] / cpu['ours B=8']:.2f}x"))
    row("sample", f"{name} --compile: compile + first generation", f"{compile_s:.1f} s")


def hf_gpt2(model, transformers):
    """Our weights in Hugging Face's GPT2LMHeadModel (its Conv1D wants (in, out) weights)."""
    c = model.config
    hf_config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(model.to_hf_state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), (missing, unexpected)
    return hf
