"""Benchmarks: the figures each idea promises, measured, with ratios against baselines.

Every figure is a median of repeated runs (the machine is noisy). Ratios are printed as
`1.83x` and always say what is divided by what.

Run: python bench.py                 # every section
     python bench.py train loss      # only these sections
     python bench.py --quick         # tiny sizes: a smoke test of the benchmark code itself
     python bench.py gpu             # the CUDA check on a GPU machine (exits non-zero on a failure)
     python bench.py gpu --dry-run   # the same code paths on CPU, as the test suite runs it
`python bench.py --help` lists the sections.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT / "assets"  # the shipped offline copies (Tiny Shakespeare, GPT-2's BPE files)
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))

from common import NanoError, cli  # noqa: E402


def row(section: str, what: str, figure: str):
    print(f"{section:<10} {what:<62} {figure}", flush=True)


def median_ms(fn, repeat=5, warmup=1):
    """Median wall time of fn() in milliseconds (CUDA is synchronised around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def shakespeare_text() -> str:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        import common
        import data
        import gpt

        path = data.download(data.SHAKESPEARE_URL, ROOT / "data" / "tinyshakespeare.txt")
    return path.read_text()


def cpu_peak_flops(n=1024, repeat=5):
    """What this CPU really reaches on an fp32 matmul: the peak used for MFU on CPU,
    where no datasheet figure applies."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / (median_ms(lambda: a @ b, repeat=repeat) / 1000)


# ----------------------------------------------------------------------------------------
# train: step throughput and MFU


def bench_train(quick: bool):
    bench_train_step(quick)
    bench_train_quality(quick)


def bench_train_step(quick: bool):
    import common
    import data
    import gpt

    device = common.pick_device("auto")
    dtype = common.pick_dtype(device, "auto")
    peak = common.device_peak_flops(device, dtype) or cpu_peak_flops()
    shapes = {"tiny (4L/4H/128, T=64, B=12)": (gpt.GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128), 12),
              "gpt2-124M (T=256, B=2)" if device == "cpu" else "gpt2-124M (T=1024, B=8)":
                  (gpt.GPTConfig(block_size=256 if device == "cpu" else 1024), 2 if device == "cpu" else 8)}
    if quick:
        shapes = {"tiny (2L/2H/32, T=32, B=4)": (gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32), 4)}
    for name, (cfg, batch) in shapes.items():
        model = gpt.GPT(cfg).to(device)
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)

        def step():
            with common.autocast(device, dtype):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = median_ms(step, repeat=3 if quick else 7)
        tokens = batch * cfg.block_size
        row("train", f"{name}: step", f"{ms:.1f} ms, {tokens / ms * 1000:,.0f} tok/s")
        row("train", f"{name}: MFU vs {peak / 1e12:.2f} TFLOP/s peak", f"{model.estimate_mfu(batch, ms / 1000, peak) * 100:.1f}%")


NANOGPT_CPU_RUN = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--batch_size", "12",
                   "--max_iters", "2000", "--lr_decay_iters", "2000", "--learning_rate", "1e-3", "--dropout", "0.0",
                   "--eval_iters", "20", "--log_interval", "1", "--device", "cpu", "--compile", "False"]


def bench_train_quality(quick: bool):
    """nanoGPT's CPU shakespeare_char run through train.py: final val loss (goal <= 1.89) and
    ms/iter, beside a nanoGPT-style step (full logits + F.cross_entropy) of the same model
    timed in the same process."""
    import contextlib
    import io
    import json
    import tempfile

    import torch.nn.functional as F

    import common
    import data
    import gpt
    import train

    # One run's final val loss moves by about +-0.01 with the seed (20 eval batches): three
    # seeds. After each run, 200 nanoGPT-style steps of the same model shape, so both timings
    # see the same machine conditions (this machine's speed drifts by ~10% over minutes).
    seeds = (1337,) if quick else (1337, 1, 2)
    cfg = gpt.GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128)
    model = gpt.GPT(cfg)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    g = torch.Generator().manual_seed(0)
    vals, step_ms, base_ms = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        src = SHARED_DATA / "tinyshakespeare.txt"
        for seed in seeds:
            argv = NANOGPT_CPU_RUN + ["--out_dir", f"{tmp}/out{seed}", "--data_root", tmp, "--sample_tokens", "0",
                                      "--seed", str(seed)]
            argv += ["--input", str(src)] if src.is_file() else []
            if quick:
                argv += ["--max_iters", "20", "--eval_interval", "10"]
            with contextlib.redirect_stdout(io.StringIO()):  # the run's own log: not part of the table
                train.main(argv)
            rows = [json.loads(line) for line in open(Path(tmp) / f"out{seed}" / "metrics.jsonl")]
            vals[seed] = [r["val_loss"] for r in rows if "val_loss" in r][-1]
            step_ms += [r["ms_per_step"] for r in rows if "ms_per_step" in r]
            bins = data.TokenBins(Path(tmp) / "shakespeare_char", "train")

            def nanogpt_step():  # nanoGPT's forward: full logits, then F.cross_entropy
                x, y = bins.get_batch(12, 64, g)
                logits, _ = model(x)
                F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            base_ms.append(median_ms(nanogpt_step, repeat=20 if quick else 200, warmup=5))
    ours, base = statistics.median(step_ms), statistics.median(base_ms)
    per_seed = ", ".join(f"{v:.4f}" for v in vals.values())
    row("train", f"nanoGPT CPU config, {'20' if quick else '2000'} iters: final val loss, median of seeds "
        f"{'/'.join(map(str, seeds))} (goal <= 1.89)", f"{statistics.median(vals.values()):.4f} ({per_seed})")
    row("train", "  train.py ms/iter (median)", f"{ours:.1f} ms")
    row("train", "  nanoGPT-style step, same model (full logits + CE)", f"{base:.1f} ms")
    row("train", "  nanoGPT-style / train.py speed", f"{base / ours:.2f}x")


# ----------------------------------------------------------------------------------------
# loss: peak memory of naive vs chunked lm_head + cross-entropy


_LOSS_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
import gpt
mode, N, V, C = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
x = torch.randn(N, C, requires_grad=True)
w = torch.randn(V, C, requires_grad=True)
t = torch.randint(0, V, (N,))


def status_kib(key):  # VmRSS: resident now; VmHWM: peak since the last reset
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))


# getrusage's ru_maxrss would include the parent's size at fork time (Linux keeps it across
# exec): reset this process's own high-water mark instead, once the inputs exist
open("/proc/self/clear_refs", "w").write("5")
before = status_kib("VmRSS")
if mode == "naive":
    loss = torch.nn.functional.cross_entropy(x @ w.t(), t)
else:
    loss = gpt.chunked_cross_entropy(x, w, t, chunk_size=1024)
loss.backward()
print((status_kib("VmHWM") - before) * 1024)
"""


def bench_loss(quick: bool):
    N, V, C = (1024, 4096, 128) if quick else (8192, 50304, 768)
    peaks = {}
    for mode in ("naive", "chunked"):
        if torch.cuda.is_available():
            import common
            import data
            import gpt

            x = torch.randn(N, C, device="cuda", requires_grad=True)
            w = torch.randn(V, C, device="cuda", requires_grad=True)
            t = torch.randint(0, V, (N,), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = torch.nn.functional.cross_entropy(x @ w.t(), t) if mode == "naive" else gpt.chunked_cross_entropy(x, w, t)
            loss.backward()
            peaks[mode] = torch.cuda.max_memory_allocated() - base
            del x, w, t, loss
        else:  # a fresh process per mode and run: peak RSS growth during loss + backward, median of 3
            runs = [subprocess.run([sys.executable, "-c", _LOSS_CHILD.format(root=str(ROOT)), mode, str(N), str(V), str(C)],
                                   capture_output=True, text=True, check=True) for _ in range(1 if quick else 3)]
            peaks[mode] = statistics.median(int(out.stdout.strip()) for out in runs)
        row("loss", f"{mode} lm_head+CE+backward peak memory (N={N}, V={V}, C={C})", f"{peaks[mode] / 2**20:,.0f} MiB")
    row("loss", "chunked / naive peak memory (goal <= 0.50x)", f"{peaks['chunked'] / max(peaks['naive'], 1):.2f}x")


# ----------------------------------------------------------------------------------------
# sample


def bench_sample(quick: bool) -> None:
    """sample.py: KV-cached decode vs recomputing the window, and vs Hugging Face's generate.

    GPT-2-124M-shaped model with random weights (quick: a tiny one), 32-token prompts,
    greedy. The uncached decode time is integrated from the measured cost of one uncached
    step at a few window lengths (the per-step cost grows ~linearly with the window), since
    running all 256 uncached steps of a 124M model would take minutes on a CPU."""
    import common
    import data
    import gpt
    import sample

    torch.manual_seed(0)
    if quick:
        config = gpt.GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=2, n_embd=64)
        prompt_len, new_tokens, batches = 8, 16, (1, 2)
    else:
        config = gpt.GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
        prompt_len, new_tokens, batches = 32, 256, (1, 8)
    model = gpt.GPT(config).eval()
    name = "tiny" if quick else "124M"

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
        runs = [timed_generate(prompt) for _ in range(1 if not quick else 2)]
        prefill_s = sorted(r[0] for r in runs)[len(runs) // 2]
        decode_s = sorted(r[1] for r in runs)[len(runs) // 2]
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
                step_ms.append(median_ms(lambda rows=rows, head=head: sample.forward_no_cache(model, rows, head),
                                          repeat=1 if not quick else 3))
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
            hf_runs = []
            for _ in range(1 if not quick else 2):
                t0 = time.perf_counter()
                hf_out = hf.generate(prompt, attention_mask=attention, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
                hf_runs.append(time.perf_counter() - t0)
        hf_s = sorted(hf_runs)[len(hf_runs) // 2]
        same = (hf_out[:, prompt_len:] == runs[0][2]).float().mean().item()
        row("sample", f"{name} B={batch} HF GPT2LMHeadModel.generate, {new_tokens} tok (same tokens: {same:.0%})",
            f"{batch * new_tokens / hf_s:.1f} tok/s")
        row("sample", f"{name} B={batch} sample.generate speed vs HF generate", f"{hf_s / ours_s:.2f}x")


def hf_gpt2(model, transformers):
    """Our weights in Hugging Face's GPT2LMHeadModel (its Conv1D wants (in, out) weights)."""
    c = model.config
    hf_config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    import common
    import data
    import gpt

    sd = {k: (v.t() if k.endswith(gpt.HF_CONV1D_WEIGHTS) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), (missing, unexpected)
    return hf


# ----------------------------------------------------------------------------------------
# bpe


def bench_bpe(quick: bool) -> None:
    """bpe.py: training time (vocab 500 on 130 KB of English, goal < 0.4 s, the CS336
    reference's 0.38 s; vocab 10,000 on all of Tiny Shakespeare) and single-thread encode
    throughput against tiktoken on Tiny Shakespeare with GPT-2's merges (goal: within 10x).
    'cold' clears the pre-token cache before each run, 'warm' encodes the text a second
    time with every pre-token cached."""
    import tiktoken

    import bpe

    text = shakespeare_text()
    mb = len(text.encode("utf-8")) / 1e6

    ms = median_ms(lambda: bpe.train_bpe(text[:130_000], 500), repeat=1 if quick else 5)
    row("bpe", "train vocab 500 on 130 KB of Shakespeare (goal < 0.4 s)", f"{ms / 1000:.3f} s")
    if not quick:
        ms = median_ms(lambda: bpe.train_bpe(text, 10_000), repeat=3, warmup=0)
        row("bpe", f"train vocab 10,000 on Tiny Shakespeare ({mb:.1f} MB)", f"{ms / 1000:.2f} s")

    cache = SHARED_DATA / "tiktoken_cache"
    vocab_bpe, encoder_json = (cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                               cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
    enc = tiktoken.get_encoding("gpt2")
    tok = (bpe.Tokenizer.from_gpt2_files(vocab_bpe, encoder_json) if vocab_bpe.is_file()
           else bpe.Tokenizer.from_tiktoken(enc))
    if quick:
        text = text[:100_000]
        mb = len(text.encode("utf-8")) / 1e6
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text), "bpe.py and tiktoken disagree"
    repeat = 1 if quick else 5
    tiktoken_ms = median_ms(lambda: enc.encode_ordinary(text), repeat=repeat)  # one thread
    cold_ms = median_ms(lambda: (tok._encode_piece.cache_clear(), tok.encode_ordinary(text)), repeat=repeat)
    warm_ms = median_ms(lambda: tok.encode_ordinary(text), repeat=repeat)
    row("bpe", "encode GPT-2, Tiny Shakespeare: tiktoken (1 thread)", f"{mb / tiktoken_ms * 1000:.1f} MB/s")
    row("bpe", "encode GPT-2, Tiny Shakespeare: bpe.py, cold cache", f"{mb / cold_ms * 1000:.1f} MB/s")
    row("bpe", "encode GPT-2, Tiny Shakespeare: bpe.py, warm cache", f"{mb / warm_ms * 1000:.1f} MB/s")
    row("bpe", "bpe.py time / tiktoken time, cold cache (goal < 10x)", f"{cold_ms / tiktoken_ms:.2f}x")
    row("bpe", "bpe.py time / tiktoken time, warm cache", f"{warm_ms / tiktoken_ms:.2f}x")


# ----------------------------------------------------------------------------------------
# nf4


# HBM peaks from NVIDIA's datasheets (bytes/s), used when Triton cannot report the clock
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def _peak_bandwidth(device) -> float | None:
    import qlora_nf4

    try:  # memory clock (kHz) x bus width (bits), double data rate, as in Triton's tutorials
        props = qlora_nf4.triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        return 2 * props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] / 8
    except Exception:
        name = torch.cuda.get_device_name(device)
        return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def bench_nf4(quick: bool) -> None:
    import torch.nn as nn

    import qlora_nf4

    S = "nf4"
    n = 1024 if quick else 4096
    repeat = 3 if quick else 10
    w = torch.randn(n, n) * 0.02
    out_bytes = n * n * 2  # a bf16 weight

    # --- CPU: the plain PyTorch reference
    packed, state = qlora_nf4.quantize_nf4(w)
    ms = median_ms(lambda: qlora_nf4.quantize_nf4(w), repeat=repeat)
    q_bytes = packed.numel() + state.nbytes()
    row(S, f"quantize {n}x{n} fp32, PyTorch (cpu)", f"{ms:.1f} ms, {q_bytes / ms / 1e6:.3g} GB/s of output")
    ms = median_ms(lambda: qlora_nf4.dequantize_nf4(packed, state, torch.bfloat16), repeat=repeat)
    row(S, f"dequantize {n}x{n} -> bf16, PyTorch (cpu)", f"{ms:.1f} ms, {out_bytes / ms / 1e6:.3g} GB/s of output")

    # --- CUDA: own Triton kernel vs the PyTorch reference vs bitsandbytes
    if torch.cuda.is_available() and qlora_nf4.triton is not None:
        dev = "cuda"
        wc = (torch.randn(4096, 4096, device=dev) * 0.02).to(torch.bfloat16)
        packed, state = qlora_nf4.quantize_nf4(wc)
        mismatches = (qlora_nf4.dequantize_nf4_triton(packed, state) != qlora_nf4.dequantize_nf4(packed, state)).sum()
        row(S, "Triton == PyTorch reference, bf16 (cuda)",
            "bit-exact" if mismatches == 0 else f"{mismatches} values differ")
        moved = packed.numel() + state.nbytes() + wc.numel() * 2  # read packed + stats, write bf16
        rep = 20 if quick else 200
        t_triton = median_ms(lambda: qlora_nf4.dequantize_nf4_triton(packed, state, torch.bfloat16), repeat=rep)
        t_ref = median_ms(lambda: qlora_nf4.dequantize_nf4(packed, state, torch.bfloat16), repeat=rep)
        gbs = moved / t_triton / 1e6
        row(S, "dequantize 4096x4096 -> bf16, Triton (cuda)", f"{t_triton * 1e3:.1f} us, {gbs:.0f} GB/s moved")
        row(S, "dequantize 4096x4096 -> bf16, PyTorch ref (cuda)", f"{t_ref * 1e3:.1f} us")
        row(S, "Triton vs PyTorch reference (cuda)", f"{t_ref / t_triton:.2f}x")
        peak = _peak_bandwidth(dev)
        if peak:
            row(S, "Triton effective bandwidth vs device peak",
                f"{gbs:.0f} / {peak / 1e9:.0f} GB/s = {gbs * 1e9 / peak:.0%}")
        try:
            from bitsandbytes import functional as bnbF
        except ImportError:
            bnbF = None
        if bnbF is not None:
            bnb_packed, bnb_state = bnbF.quantize_4bit(wc, blocksize=64, quant_type="nf4", compress_statistics=True)
            t_bnb = median_ms(lambda: bnbF.dequantize_4bit(bnb_packed, bnb_state), repeat=rep)
            row(S, "dequantize 4096x4096 -> bf16, bitsandbytes (cuda)", f"{t_bnb * 1e3:.1f} us")
            row(S, "Triton vs bitsandbytes dequantize_4bit (goal >= 1.15x)", f"{t_bnb / t_triton:.2f}x")

    # --- memory: NF4 vs bf16 for the Linear weights of a GPT-2-124M-shaped model
    # (12 layers of c_attn 768->2304, c_proj 768->768, c_fc 768->3072, c_proj 3072->768;
    # the tied embedding / lm_head stays in bf16 and is left out of both sides)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    nf4 = sum(qlora_nf4.nf4_bytes(nn.ModuleList([qlora_nf4.Linear4bit(torch.randn(s) * 0.02)])) for s in shapes)
    bf16 = sum(2 * a * b for a, b in shapes)
    row(S, "GPT-2-124M Linear weights: NF4 / bf16 (incl. absmax, scales)",
        f"{12 * nf4 / 2**20:.1f} / {12 * bf16 / 2**20:.1f} MiB = {nf4 / bf16:.3f}x")


# ----------------------------------------------------------------------------------------
# lora: trainable parameters, optimizer state, step time and adapter size, LoRA vs full finetune


def bench_lora(quick: bool):
    import io

    import common
    import data
    import gpt
    import lora

    device = common.pick_device("auto")
    dtype = common.pick_dtype(device, "auto")
    if quick:
        name, cfg, batch = "tiny (2L/2H/32, T=32, B=4)", gpt.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32), 4
    elif device == "cpu":
        name, cfg, batch = "gpt2-124M (T=256, B=2)", gpt.GPTConfig(block_size=256), 2
    else:
        name, cfg, batch = "gpt2-124M (T=1024, B=8)", gpt.GPTConfig(block_size=1024), 8
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]

    results = {}
    for mode in ("full", "lora"):
        torch.manual_seed(0)
        model = gpt.GPT(cfg).to(device)
        if mode == "lora":
            lora.apply_lora(model, r=8, alpha=16)  # c_attn, c_proj, c_fc of every block
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with common.autocast(device, dtype):
                _, loss = model(x, targets=y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if "cuda" in device:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, repeat=3, warmup=1)
        peak = torch.cuda.max_memory_allocated() / 2**20 if "cuda" in device else None
        trainable = sum(p.numel() for p in params)
        buf = io.BytesIO()
        torch.save(lora.lora_state_dict(model, "bench") if mode == "lora" else model.state_dict(), buf)
        results[mode] = dict(ms=ms, peak=peak, trainable=trainable, file=buf.tell())

    full, ada = results["full"], results["lora"]
    row("lora", f"trainable params, {name}: full / LoRA r=8", f"{full['trainable']:,} / {ada['trainable']:,} "
        f"= {full['trainable'] / ada['trainable']:.0f}x")
    # grads + AdamW's two moments, fp32: 12 bytes per trainable parameter
    row("lora", "grad + AdamW state (fp32): full / LoRA", f"{12 * full['trainable'] / 2**20:,.1f} MiB / "
        f"{12 * ada['trainable'] / 2**20:,.2f} MiB")
    row("lora", "file written: checkpoint / adapter alone", f"{full['file'] / 2**20:,.1f} MiB / "
        f"{ada['file'] / 2**10:,.0f} KiB = {full['file'] / ada['file']:.0f}x")
    row("lora", f"train step ({device}, {str(dtype).replace('torch.', '')}): full / LoRA",
        f"{full['ms']:.1f} ms / {ada['ms']:.1f} ms = {full['ms'] / ada['ms']:.2f}x")
    if full["peak"] is not None:
        row("lora", "peak CUDA memory of a train step: full / LoRA",
            f"{full['peak']:,.0f} MiB / {ada['peak']:,.0f} MiB = {full['peak'] / ada['peak']:.2f}x")


# ----------------------------------------------------------------------------------------
# fsdp2


def bench_fsdp2(quick: bool) -> None:
    """fsdp2_train.py: what one rank holds, full vs QLoRA, and CPU step time 2 ranks vs 1.

    Bytes: counted on the real model fsdp2_train builds (GPT-2-124M shape; quick: a tiny
    one; QLoRA really quantized to NF4), cut the way FSDP2 cuts every parameter (dim 0 in
    torch.chunk pieces; rank 0 holds the largest piece, tests/test_fsdp2_train.py checks the
    rule on real shards). Per rank: parameter shards, gradient shards + AdamW's two moments
    (fp32, trainable parameters only), and the replicated buffers (NF4 fp32 scales).
    Step time: the tiny config through fsdp2_train.py on CPU/gloo, global batch 8, median
    ms/step from metrics.jsonl (first 3 steps dropped), 1 process vs torchrun with 2 ranks,
    one thread per process (a rank per core), and a plain GPT + AdamW step without
    torch.distributed. quick: the byte counts on a tiny shape only."""
    import contextlib
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    import fsdp2_train
    import common
    import data
    import gpt

    shape = (["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64"] if quick else
             ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"])
    name = "tiny 2L/64" if quick else "gpt2-124M"
    vocab = 512 if quick else 50304

    def rank0_bytes(model, world):
        params = train_state = 0
        for p in model.parameters():
            rows = -(-p.shape[0] // world)  # torch.chunk: the first piece is the largest
            local = rows * (p.numel() // p.shape[0])
            params += local * p.element_size()
            if p.requires_grad:
                train_state += local * 4 * 3  # fp32 gradient + exp_avg + exp_avg_sq
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return params, train_state, buffers

    MiB = 2**20
    totals = {}
    for mode in ("full", "qlora"):
        cfg, _ = fsdp2_train.parse_args(shape + ["--mode", mode])
        if mode == "full":
            with torch.device("meta"):  # shapes are all it takes
                model, _ = fsdp2_train.build_model(cfg, vocab, "cpu", torch.float32)
        else:
            model, _ = fsdp2_train.build_model(cfg, vocab, "cpu", torch.float32)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for world in (1, 2):
            params, train_state, buffers = rank0_bytes(model, world)
            totals[mode, world] = params + train_state + buffers
            row("fsdp2", f"{name} {mode} ({trainable / 1e6:.2f}M trainable), {world} rank{'s' if world > 1 else ''}: per rank",
                f"{totals[mode, world] / MiB:,.1f} MiB (params {params / MiB:,.1f} + grads/AdamW "
                f"{train_state / MiB:,.1f} + replicated {buffers / MiB:,.2f})")
        # the largest transient: one block gathered for its forward (bf16 floats on a GPU)
        block = model.transformer.h[0]
        gathered = sum(p.numel() * (2 if p.is_floating_point() else p.element_size()) for p in block.parameters())
        row("fsdp2", f"{name} {mode}: one block all-gathered (bf16 floats, any world size)", f"{gathered / MiB:,.2f} MiB")
        del model
    for world in (1, 2):
        row("fsdp2", f"{name} per-rank bytes, full / qlora, {world} rank{'s' if world > 1 else ''}",
            f"{totals['full', world] / totals['qlora', world]:.2f}x")
    row("fsdp2", f"{name} per-rank bytes, 1 rank / 2 ranks (full; qlora)",
        f"{totals['full', 1] / totals['full', 2]:.2f}x; {totals['qlora', 1] / totals['qlora', 2]:.2f}x")

    if quick:
        return  # the step timings below launch training runs: too slow for a smoke test
    # --- CPU step time, tiny config
    tiny = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
            "--max_iters", "40", "--eval_interval", "100000", "--eval_iters", "1", "--log_interval", "1",
            "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "shakespeare.txt"
        src.write_text(shakespeare_text()[:200_000])
        data_root = tmp / "data"
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            data.prepare_dataset("shakespeare_char", input=src, data_root=data_root)

        def median_step_ms(out_dir):
            rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
            times = sorted(r["ms_per_step"] for r in rows if "loss" in r and r["iter"] > 3)
            return times[len(times) // 2]

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # in-process: a 1-rank group
            fsdp2_train.main(tiny + ["--data_root", str(data_root), "--out_dir", str(tmp / "one")])
        one = median_step_ms(tmp / "one")
        row("fsdp2", "tiny 2L/32 B=8 CPU: 1 process (FSDP2 on 1 rank, 1 thread)", f"{one:.1f} ms/step")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "fsdp2_train.py"), *tiny, "--data_root", str(data_root),
                        "--out_dir", str(tmp / "two")], env=env, check=True, capture_output=True)
        two = median_step_ms(tmp / "two")
        row("fsdp2", "tiny 2L/32 B=8 CPU: torchrun 2 ranks gloo (1 thread each)", f"{two:.1f} ms/step")
        row("fsdp2", "tiny 2L/32 B=8 CPU: 2-rank step time / 1-process", f"{two / one:.2f}x")

        # the same step without any torch.distributed: what FSDP2's hooks and DTensors cost here
        model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=data.read_meta(data_root / "shakespeare_char")["vocab_size"],
                                      n_layer=2, n_head=2, n_embd=32))
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        bins = data.TokenBins(data_root / "shakespeare_char", "train")
        g = torch.Generator().manual_seed(0)

        def plain_step():
            x, y = bins.get_batch(8, 32, g)
            model(x, y)[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        plain = median_ms(plain_step, repeat=30, warmup=2)
        torch.set_num_threads(threads)
        row("fsdp2", "tiny 2L/32 B=8 CPU: plain GPT + AdamW step, no FSDP (1 thread)", f"{plain:.1f} ms/step")
        row("fsdp2", "tiny 2L/32 B=8 CPU: FSDP2 1-rank step / plain step", f"{one / plain:.2f}x")


# ----------------------------------------------------------------------------------------
# dpo: peak memory and step time of a DPO step, reference = a frozen copy vs LoRA adapters off


_DPO_CHILD = """
import copy, json, sys, torch
sys.path.insert(0, {root!r})
import common, dpo, gpt, lora
from bench import median_ms
variant, (n_layer, n_head, n_embd, vocab, T, B, repeat) = sys.argv[1], map(int, sys.argv[2:])
device = common.pick_device("auto")
dtype = common.pick_dtype(device, "auto")
ctx = common.autocast(device, dtype)


def vm_kib(key):  # VmRSS (now) or VmHWM (peak since the last reset) of this process
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))


# Warm torch's lazy runtime (thread pools, allocator caches) on a throwaway model first:
# only what a variant itself adds is counted.
warm = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8)).to(device)
warm(torch.zeros(1, 8, dtype=torch.long, device=device))[0].sum().backward()
torch.optim.AdamW(warm.parameters()).step()
del warm
torch.manual_seed(0)
if "cuda" in device:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (Linux >= 4.0)
    before = vm_kib("VmRSS") * 1024
model = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)).to(device)
dpo.disable_dropout(model)
weights = sum(p.numel() * p.element_size() for p in model.parameters())  # what a copy costs
ref = None if variant == "lora_off" else copy.deepcopy(model).eval().requires_grad_(False)
if variant != "full_copy":
    lora.apply_lora(model, r=8, alpha=16)  # c_attn, c_proj, c_fc of every block
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)
# B pairs: 2B sequences of T tokens, the second half of each is the completion
idx = torch.randint(0, vocab, (2 * B, T + 1), device=device)
mask = torch.zeros(2 * B, T, dtype=torch.bool, device=device)
mask[:, T // 2:] = True
batch = (idx[:, :-1], idx[:, 1:], mask)

def step():
    c, r = dpo.concatenated_logps(model, batch, False, ctx)
    rc, rr = dpo.reference_logps(model, ref, batch, False, ctx)
    losses, _, _ = dpo.dpo_loss(c, r, rc, rr)
    losses.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

ms = median_ms(step, repeat=repeat, warmup=1)
peak = torch.cuda.max_memory_allocated() if "cuda" in device else vm_kib("VmHWM") * 1024
print(json.dumps({{"variant": variant, "ms": ms, "peak": peak - before, "weights": weights, "device": device,
                  "dtype": str(dtype).replace("torch.", "")}}), flush=True)
"""


def bench_dpo(quick: bool):
    """One DPO step (policy forward + backward over chosen and rejected, reference forward,
    AdamW step) in a fresh process per variant. Memory: on CUDA torch.cuda.max_memory_allocated;
    on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up)
    minus its RSS just before the model is built, so torch's own footprint is left out (Linux)."""
    import json

    if quick:
        name, shape = "tiny (2L/2H/32, V=512, T=32, 2 pairs)", (2, 2, 32, 512, 32, 2, 2)
    elif torch.cuda.is_available():
        name, shape = "gpt2-124M (T=1024, 4 pairs)", (12, 12, 768, 50304, 1024, 4, 5)
    else:
        name, shape = "gpt2-124M (T=128, 2 pairs)", (12, 12, 768, 50304, 128, 2, 3)
    variants = {"full_copy": "full finetune, reference = frozen copy",
                "lora_copy": "LoRA r=8, reference = frozen copy",
                "lora_off": "LoRA r=8, reference = adapters disabled"}
    res = {}
    for variant, label in variants.items():
        # a fresh process per variant: memory one variant freed would be reused by the next
        # without showing in its RSS
        out = subprocess.run([sys.executable, "-c", _DPO_CHILD.format(root=str(ROOT)), variant, *map(str, shape)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise NanoError(f"dpo bench child {variant} failed: {out.stderr.strip().splitlines()[-1]}")
        r = res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        row("dpo", f"{name}, {label}", f"{r['peak'] / 2**20:,.0f} MiB peak, {r['ms']:.0f} ms/step")
    copy_, off = res["lora_copy"], res["lora_off"]
    row("dpo", f"peak memory: LoRA frozen copy / adapters off ({off['device']}, {off['dtype']})",
        f"{copy_['peak'] / max(off['peak'], 1):.2f}x")
    row("dpo", "  memory saved by adapters off (one copy of the weights would be)",
        f"{(copy_['peak'] - off['peak']) / 2**20:,.0f} MiB ({off['weights'] / 2**20:,.0f} MiB)")
    row("dpo", "step time: LoRA frozen copy / adapters off", f"{copy_['ms'] / off['ms']:.2f}x")
    row("dpo", "peak memory: full finetune + copy / LoRA adapters off", f"{res['full_copy']['peak'] / max(off['peak'], 1):.2f}x")


# ----------------------------------------------------------------------------------------
# moe


def bench_moe(quick: bool) -> None:
    """moe.py: dispatch paths vs a per-expert loop (training step of one MoE layer:
    forward + backward), the GEMM-only bound, and the expert-load balance (coefficient of
    variation) after a tiny training run with the aux loss, the DeepSeek-V3 bias, or neither."""
    import contextlib
    import io
    import tempfile
    from pathlib import Path

    import moe

    section = "moe"
    # the shape, and the shape `python moe.py` trains by default (batch 16 x 128
    # tokens, n_embd 128), where the GEMMs are small and the dispatch overhead shows
    shapes = [(8, 2, 256, 64)] if quick else [(8, 2, 4096, 512), (8, 2, 2048, 128)]
    for E, k, T, d in shapes:
        _moe_dispatch_rows(section, E, k, T, d, 1 if quick else 5, median_ms, row)

    # load balance after a tiny training run (same data, seed and steps for each method)
    shakespeare = Path(moe.__file__).resolve().parent.parent / "shared" / "data" / "tinyshakespeare.txt"
    iters = 10 if quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shakespeare.txt"
        src.write_text(shakespeare.read_text()[: 100_000 if quick else None])
        for balance in ("none", "aux", "bias"):
            argv = ["--input", str(src), "--data_root", f"{tmp}/data", "--out_dir", f"{tmp}/out_{balance}",
                    "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64",
                    "--batch_size", "16", "--max_iters", str(iters), "--eval_interval", str(iters // 2),
                    "--eval_iters", "5", "--log_interval", str(iters), "--compare_dense", "False",
                    "--balance", balance, "--bias_update_rate", "0.01"]
            with contextlib.redirect_stdout(io.StringIO()):
                r = moe.main(argv)["moe"]
            row(section, f"load CV after {iters} steps, balance={balance} (E=8 k=2; 0 = even)",
                f"{r['load_cv']:.3f} (max/mean {r['max_over_mean']:.2f}, val loss {r['val_loss']:.3f})")


def _moe_dispatch_rows(section, E, k, T, d, repeat, median_ms, row):
    """fwd+bwd and forward tokens/s of one MoE layer's dispatch paths at one shape."""
    import torch

    import moe

    h = 4 * d // k  # fine-grained experts: k active experts = one dense MLP of 4d
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)
    w_fc = (torch.randn(E, h, d) * 0.02).requires_grad_()
    b_fc = torch.zeros(E, h, requires_grad=True)
    w_proj = (torch.randn(E, d, h) * 0.02).requires_grad_()
    b_proj = torch.zeros(E, d, requires_grad=True)
    weights = (w_fc, b_fc, w_proj, b_proj)
    probs = (x.detach() @ torch.randn(d, E) * 0.1).softmax(-1)  # a random router: near-even load
    topk_w, topk_idx = probs.topk(k, dim=-1)
    topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).requires_grad_()

    def loop_baseline():
        """The per-expert loop of e.g. HF Mixtral: for each expert, mask-select its tokens,
        run it, scatter the weighted result back."""
        out = torch.zeros_like(x)
        for e, (wf, bf, wp, bp) in enumerate(zip(*(t.unbind(0) for t in weights))):
            token, choice = torch.where(topk_idx == e)
            y = moe.expert_mlp(x[token], wf, bf, wp, bp) * topk_w[token, choice, None]
            out = out.index_add(0, token, y)
        return out

    capacity = moe.expert_capacity(T, moe.MoEConfig(n_experts=E, top_k=k, capacity_factor=1.25))
    paths = {
        "per-expert loop": loop_baseline,
        "dropless": lambda: moe.dropless_moe(x, topk_idx, topk_w, *weights),
        "capacity 1.25": lambda: moe.capacity_moe(x, topk_idx, topk_w, *weights, capacity)[0],
    }
    # the floor: only the expert GEMMs + GELU on inputs already grouped by expert
    grouped = [x.detach()[:n].clone().requires_grad_() for n in
               torch.bincount(topk_idx.reshape(-1), minlength=E).tolist()]
    paths["expert GEMMs alone (bound)"] = lambda: torch.cat(
        [moe.expert_mlp(g, *ws) for g, ws in zip(grouped, zip(*(t.unbind(0) for t in weights)))])

    def train_step(fn):
        def step():
            fn().square().mean().backward()
            for t in (x, topk_w, *weights, *grouped):
                t.grad = None
        return step

    times = {}
    shape = f"E={E} k={k} T={T} d={d}"
    for name, fn in paths.items():
        times[name] = median_ms(train_step(fn), repeat=repeat, warmup=1)
        with torch.no_grad():
            fwd = median_ms(fn, repeat=repeat, warmup=1)
        row(section, f"{name} {shape}: fwd+bwd tokens/s", f"{T / times[name] * 1e3:,.0f}")
        row(section, f"{name} {shape}: forward tokens/s", f"{T / fwd * 1e3:,.0f}")
    base = times["per-expert loop"]
    for name in ("dropless", "capacity 1.25", "expert GEMMs alone (bound)"):
        row(section, f"{name} vs per-expert loop {shape} (fwd+bwd)", f"{base / times[name]:.2f}x")


# ----------------------------------------------------------------------------------------
# hellaswag


def bench_hellaswag(quick: bool) -> None:
    """HellaSwag scoring speed: the batched evaluator (several examples x 4 endings per padded
    forward, head only at ending positions) vs one forward per ending with full logits, on the
    GPT-2 124M shape with random weights (speed does not depend on the weights)."""
    import random

    import torch

    import eval_hellaswag as hs
    import common
    import data
    import gpt

    device = common.pick_device("auto")
    torch.manual_seed(0)
    # GPT-2 124M as from_pretrained("gpt2") builds it; quick: a tiny model, same vocabulary
    config = gpt.GPTConfig(vocab_size=50257)
    if quick:
        config = gpt.GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
    model = gpt.GPT(config).to(device).eval()
    shape = "tiny 2L/64" if quick else "gpt2-124M"
    tok = data.load_tokenizer("gpt2")

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


SECTIONS = {"train": bench_train, "loss": bench_loss, "sample": bench_sample, "bpe": bench_bpe, "nf4": bench_nf4,
            "lora": bench_lora, "fsdp2": bench_fsdp2, "dpo": bench_dpo, "moe": bench_moe, "hellaswag": bench_hellaswag}


# ----------------------------------------------------------------------------------------
# gpu: the CUDA check, one short go on a GPU machine (`--dry-run` proves its code paths on CPU)

GPU_SECTIONS = ("nf4", "train", "sample", "loss", "fsdp2")


def bench_gpu(quick: bool, dry_run: bool = False) -> None:
    """Every CUDA figure in one table, then `pytest -m gpu` (the CUDA-only tests); a failing
    part is reported and makes the run exit non-zero, the other parts still run."""
    if not dry_run and not torch.cuda.is_available():
        raise NanoError("bench.py gpu needs a CUDA GPU (use --dry-run to check its code paths on CPU)")
    failures = []
    parts = [(name, SECTIONS[name]) for name in GPU_SECTIONS if name in SECTIONS] + GPU_EXTRAS
    for name, fn in parts:
        try:
            fn(quick or dry_run)
        except Exception as e:  # one failing part must not hide the others' figures
            row("gpu", f"{name} FAILED", f"{e.__class__.__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
            failures.append(name)
    pytest_args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if dry_run:
        pytest_args.append("--collect-only")
    done = subprocess.run(pytest_args, cwd=ROOT, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    row("gpu", "pytest -m gpu" + (" --collect-only" if dry_run else ""), last)
    if done.returncode not in (0, 5):  # 5: no test collected (no CUDA-only test selected)
        failures.append("pytest -m gpu")
    if failures:
        raise NanoError(f"gpu check failed in: {', '.join(failures)}")


GPU_EXTRAS: list = []  # (name, fn(quick)) of GPU parts that are not plain sections


@cli
def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="sections: " + ", ".join(SECTIONS) + ", gpu")
    parser.add_argument("sections", nargs="*", help="sections to run (default: every section but gpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark code itself")
    parser.add_argument("--dry-run", action="store_true", help="with gpu: check every import and path on CPU")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    names = args.sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS and n != "gpu"]
    if unknown:
        raise NanoError(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)}, gpu)")
    print(f"{'section':<10} {'what':<62} figure")
    for name in names:
        if name == "gpu":
            bench_gpu(args.quick, args.dry_run)
        else:
            SECTIONS[name](args.quick)


if __name__ == "__main__":
    main()
