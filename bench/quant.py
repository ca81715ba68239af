"""bench quant: quantize.py's table.

1. A model trained here (4 layers x 256, GPT-2 BPE, Tiny Shakespeare, block 256; quick: a tiny
   one): val loss (perplexity) and model bytes for fp32, bf16, int8 absmax, LLM.int8, NF4, RTN-4,
   GPTQ-4 and AWQ-4 at group 128 (GPTQ/AWQ over 3 calibration seeds), 3-bit GPTQ vs RTN; GPTQ's
   layer output error against RTN's on held-out activations, layer by layer; int8's greedy
   tokens against fp32's over 256 tokens.
2. The GPT-2 124M shape with random weights (speed only): batch-1 greedy decode tokens/s of each
   format, all sides in turn in every round, medians.
3. llama.cpp (llama-cpp-python) on our GGUF exports (f32 / f16 / q8_0 / q4_0 / q4_k) of both
   models: tokens/s on the same prompt, same greedy tokens. llama-cpp-python is never installed
   here: it is imported if present, else run from the virtualenv whose python
   $NANOLLM_LLAMA_CPP_PYTHON names (python -m venv v && v/bin/pip install llama-cpp-python);
   without either, a printed note.

Run: python -m bench quant [--quick]
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .util import row

LLAMA_CPP_CHILD = Path(__file__).resolve().parent / "children" / "llama_cpp_decode.py"

S = "quant"


# ----------------------------------------------------------------------------------------
# Helpers: a model trained here, batch-1 greedy decode through sample.py's prefill/decode


def train_model(quick: bool):
    """(model, train ids, val ids): GPT-2 BPE on Tiny Shakespeare, AdamW with a cosine schedule."""
    import common
    import data
    import gpt
    import tokenizer

    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    cut = int(len(text) * (1 - data.VAL_FRACTION))
    tok = tokenizer.load_tokenizer("gpt2")
    train_ids, val_ids = (torch.tensor(tok.encode(t), dtype=torch.long) for t in (text[:cut], text[cut:]))
    if quick:
        config, steps, batch = gpt.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64), 15, 4
    else:
        config, steps, batch = gpt.GPTConfig(block_size=256, vocab_size=50304, n_layer=4, n_head=4, n_embd=256), 200, 2
    torch.manual_seed(0)
    model = gpt.GPT(config)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    g, T = torch.Generator().manual_seed(0), config.block_size
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = common.cosine_lr(step, 1e-3, 1e-4, steps // 10, steps)
        starts = torch.randint(0, len(train_ids) - T - 1, (batch,), generator=g).tolist()
        x = torch.stack([train_ids[s:s + T] for s in starts])
        y = torch.stack([train_ids[s + 1:s + T + 1] for s in starts])
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    row(S, f"trained {config.n_layer}L x {config.n_embd} (GPT-2 BPE, T={T}): {steps} steps of {batch}",
        f"{time.perf_counter() - t0:.0f} s")
    return model.eval(), train_ids, val_ids


def windows(ids, n, T, seed):
    """(x, y): n random windows of T tokens and their next tokens."""
    starts = torch.randint(0, len(ids) - T - 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    xy = torch.stack([ids[s:s + T + 1] for s in starts])
    return xy[:, :-1], xy[:, 1:]


def make_cache(model, max_len, dtype, batch=1):
    import sample

    c = model.config
    return [sample.KVCache(batch, c.n_kv_head or c.n_head, max_len, c.head_dim or c.n_embd // c.n_head, dtype=dtype)
            for _ in range(c.n_layer)]


@torch.no_grad()
def greedy(model, prompt: list[int], n: int, dtype=torch.float32, head=None, batch=1):
    """(tokens of row 0, seconds from the first new token to the last): greedy decode of `batch`
    copies of the prompt with a KV cache, through sample.prefill / decode_one_token; a quantized
    lm_head is called as a module."""
    import sample

    cache = make_cache(model, len(prompt) + n, dtype, batch)
    logits = sample.prefill(model, torch.tensor([prompt] * batch), cache, head=head)
    out = [logits.argmax(-1)]
    t0 = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + n - 1):
        logits = sample.decode_one_token(model, out[-1][:, None], torch.tensor([pos]), cache, head=head)
        out.append(logits.argmax(-1))
    return [int(t[0]) for t in out], time.perf_counter() - t0


def variant(model, kind: str, calib=None, seed=0, bits=4):
    """A copy of model in the named format."""
    import qlora_nf4
    import quantize as Q

    m = copy.deepcopy(model)
    if kind == "bf16":
        return m.to(torch.bfloat16)
    if kind == "nf4":
        return qlora_nf4.quantize_model(m, skip=())
    method = {"int8": "absmax", "llm_int8": "llm_int8", "rtn": "rtn", "gptq": "gptq", "awq": "awq"}[kind]
    cfg = Q.QuantizeConfig(method=method, bits=bits, group_size=128, seed=seed)
    return Q.quantize_model(m, cfg, calib, log=lambda s: None)


# ----------------------------------------------------------------------------------------
# 1. Quality on the trained model


def quality_rows(model, train_ids, val_ids, quick: bool):
    import quantize as Q

    T = model.config.block_size
    x, y = windows(val_ids, 4 if quick else 24, T, seed=1234)
    n_calib, seeds = (4, (0,)) if quick else (32, (0, 1, 2))
    calib = {seed: windows(train_ids, n_calib, T, seed)[0] for seed in seeds}
    kinds = [("fp32", None, 4), ("bf16", None, 4), ("int8", None, 8), ("llm_int8", None, 8), ("nf4", None, 4),
             ("rtn", None, 4), ("gptq", "seeds", 4), ("awq", "seeds", 4), ("rtn", None, 3), ("gptq", "seeds", 3)]
    base = Q.eval_loss(model, x, y)
    results, models = {}, {}
    for kind, uses_calib, bits in kinds:
        losses, t0 = [], time.perf_counter()
        for seed in seeds if uses_calib else (0,):
            m = model if kind == "fp32" else variant(model, kind, calib[seed], seed, bits)
            losses.append(Q.eval_loss(m, x, y) if kind != "bf16" else bf16_loss(m, x, y))
            models.setdefault((kind, bits), m)
        name = {"fp32": "fp32", "bf16": "bf16", "int8": "int8 absmax", "llm_int8": "LLM.int8", "nf4": "NF4 (all Linears)"}.get(
            kind, f"{kind.upper()}-{bits} g128")
        mean = statistics.mean(losses)
        spread = f" ({len(losses)} seeds: {min(losses):.4f}..{max(losses):.4f})" if len(losses) > 1 else ""
        results[kind, bits] = mean
        mib = Q.quantized_bytes(models[kind, bits]) / 2**20
        row(S, f"trained: {name}: val loss{spread}",
            f"{mean:.4f} (ppl {torch.tensor(mean).exp():.1f}, {mean - base:+.4f} vs fp32), {mib:.1f} MiB, "
            f"{time.perf_counter() - t0:.0f} s")
    for bits in (4, 3):
        gap_rtn, gap_gptq = results["rtn", bits] - base, results["gptq", bits] - base
        row(S, f"trained: {bits}-bit g128 loss above fp32: GPTQ / RTN (goal < 1)", f"{gap_gptq:+.4f} / {gap_rtn:+.4f}")
    row(S, "trained: 4-bit g128 loss above fp32: AWQ / RTN (goal < 1)",
        f"{results['awq', 4] - base:+.4f} / {results['rtn', 4] - base:+.4f}")
    for kind, bits in (("int8", 8), ("rtn", 4)):  # the same weights, the activations left in fp32
        plain = Q.eval_loss(Q.set_kernel(copy.deepcopy(models[kind, bits]), "none"), x, y)
        row(S, f"trained: {'int8 absmax' if bits == 8 else 'RTN-4 g128'} with fp32 activations (dequantized weights)",
            f"{plain:.4f} ({plain - base:+.4f} vs fp32; our kernel's int8 activation blocks: "
            f"{results[kind, bits] - plain:+.4f})")
    layer_error_rows(model, models["rtn", 4], models["gptq", 4], val_ids)
    greedy_rows(model, models["int8", 8], val_ids, n=64 if quick else 256)
    return models


@torch.no_grad()
def bf16_loss(m, x, y):
    import torch.nn.functional as F

    total = 0.0
    for i in range(x.shape[0]):
        logits = m(x[i:i + 1])[0]
        total += F.cross_entropy(logits.float().flatten(0, 1), y[i].flatten(), reduction="sum").item()
    return total / y.numel()


@torch.no_grad()
def layer_error_rows(model, rtn, gptq, val_ids):
    """||X W^T - X W_hat^T|| / ||X W^T|| per Linear on held-out inputs of the float model."""
    import quantize as Q

    names = Q.target_linears(model)
    x, _ = windows(val_ids, 2, model.config.block_size, seed=99)
    inputs, hooks = {}, []

    def keep(module, args, name):
        inputs[name] = args[0].reshape(-1, args[0].shape[-1]).float()

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: keep(m, a, name)))
    model.lm_head(model.hidden_states(x))
    for h in hooks:
        h.remove()
    ratios = []
    for name in names:
        w = model.get_submodule(name).weight
        e_rtn = Q.output_error(inputs[name], w, rtn.get_submodule(name).dequantized_weight())
        e_gptq = Q.output_error(inputs[name], w, gptq.get_submodule(name).dequantized_weight())
        ratios.append(e_gptq / e_rtn)
    row(S, f"trained: layer output error GPTQ-4 / RTN-4 on held-out inputs ({len(names)} Linears)",
        f"median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x, GPTQ lower in {sum(r < 1 for r in ratios)}"
        f"/{len(ratios)}")


def greedy_rows(model, int8, val_ids, n):
    prompt = val_ids[:16].tolist()
    n = min(n, model.config.block_size - len(prompt))
    ours, _ = greedy(model, prompt, n)
    theirs, _ = greedy(int8, prompt, n)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    row(S, f"trained: int8 absmax greedy tokens vs fp32 over {n} tokens",
        "identical" if first is None else f"first divergence at token {first}")


# ----------------------------------------------------------------------------------------
# 2. Speed: the 124M shape, batch-1 decode, all sides in turn


def speed_model(quick: bool):
    """(model, name): GPT-2 124M's shape with random weights (quick: a tiny one, GPT-2's vocabulary)."""
    import gpt

    torch.manual_seed(0)
    if quick:
        return gpt.GPT(gpt.GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)).eval(), "tiny"
    return gpt.GPT(gpt.GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)).eval(), "124M"


def speed_rows(model, name, quick: bool, llama: dict | None = None, batch: int = 1):
    """ms per decode step of every format at `batch` rows, interleaved over rounds; llama: {label:
    fn() -> seconds per step}; our kernels and torch's on the same quantized weights."""
    import quantize as Q
    import sample
    prompt, n, rounds = list(range(1, 33)), (16 if quick else 64), (2 if quick else 3)
    sides = {}
    fp32 = sample.decode_layout(copy.deepcopy(model)) if batch == 1 else copy.deepcopy(model)  # the CLI's CPU path
    sides["fp32"] = (fp32, torch.float32, sample.LogitsHead(fp32, batch_size=batch))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    sides["bf16"] = (bf16, torch.bfloat16, sample.LogitsHead(bf16, batch_size=batch))
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # serve.py's CPU path: oneDNN's layout
        packed = sample.pack_linears(copy.deepcopy(model).to(dtype), rows=batch)
        sides[f"{label}, oneDNN-prepacked"] = (packed, dtype, sample.LogitsHead(packed, batch_size=batch))
    kinds = [("int8", "int8 (our kernel: x in int8 blocks of 32)", "auto"),
             ("int8", "int8 weight-only (torch's _weight_int8pack_mm)", "torch"),
             ("rtn", "int4 g128 (our kernel)", "auto"), ("rtn", "int4 g128 (torch's _weight_int4pack_mm)", "torch")]
    kinds += [("llm_int8", "LLM.int8", "auto"), ("nf4", "NF4 (dequantize per step)", "auto")] if batch == 1 else []
    if Q.own_kernels() is None:
        kinds = [k for k in kinds if "our kernel" not in k[1]]
        row(S, "our kernels (quantize_kernels.c)", "skipped: no AVX-512 VNNI CPU or C compiler here")
    for kind, label, kernel in kinds:
        m = variant(model, kind, bits=8 if kind in ("int8", "llm_int8") else 4)
        sides[label] = (Q.set_kernel(m, kernel), torch.float32, None)
    times = {label: [] for label in list(sides) + list(llama or {})}
    for label, (m, dtype, head) in sides.items():  # warm-up: kernels' packed copies, allocator
        greedy(m, prompt, 4, dtype, head, batch)
    for _ in range(rounds):
        for label, (m, dtype, head) in sides.items():
            seconds = greedy(m, prompt, n, dtype, head, batch)[1]
            times[label].append(seconds / (n - 1))
        for label, fn in (llama or {}).items():
            times[label].append(fn())
    base = statistics.median(times["fp32"])
    load = os.getloadavg()[0]
    for label, ts in times.items():
        ms = statistics.median(ts) * 1e3
        mib = Q.quantized_bytes(sides[label][0]) / 2**20 if label in sides and "prepacked" not in label else None
        row(S, f"{name} batch-{batch} decode: {label}" + (f", {mib:.0f} MiB" if mib else ""),
            f"{ms:.2f} ms/step = {batch * 1e3 / ms:.1f} tok/s = {base * 1e3 / ms:.2f}x fp32")
    row(S, f"{name} batch-{batch} decode: {rounds} rounds x {n} tokens, {torch.get_num_threads()} threads",
        f"load average {load:.1f}")
    return times


# ----------------------------------------------------------------------------------------
# 3. llama.cpp on our GGUF exports


def llama_cpp_python() -> list[str] | None:
    """How to run llama-cpp-python: this interpreter if it imports llama_cpp, else the one named by
    $NANOLLM_LLAMA_CPP_PYTHON (a virtualenv's python), else None."""
    try:
        import llama_cpp  # noqa: F401  (only whether it imports)
        return [sys.executable]
    except ImportError:
        pass
    other = os.environ.get("NANOLLM_LLAMA_CPP_PYTHON", "")
    if other and subprocess.run([other, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return [other]
    return None


def run_llama_cpp(python, path, prompt, n_new, rounds=1, n_ctx=256):
    args = {"path": str(path), "prompt": prompt, "n_new": n_new, "threads": torch.get_num_threads(),
            "rounds": rounds, "n_ctx": n_ctx}
    done = subprocess.run(python + [str(LLAMA_CPP_CHILD), json.dumps(args)], capture_output=True, text=True, timeout=600)
    if done.returncode:  # the child turns llama.cpp's weight repacking off: with it, signal 11 here (AMX)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_ggufs(model, folder: Path, types) -> dict:
    import export
    import gpt

    ckpt = folder / "ckpt.pt"
    gpt.save_checkpoint(ckpt, model, "gpt2")
    out = {}
    for t in types:
        out[t] = folder / f"model-{t}.gguf"
        export.main(["--ckpt", str(ckpt), "--to", "gguf", str(out[t]), "--gguf_type", t, "--force", "True"])
    return out


def llama_rows(python, trained, val_ids, quick: bool):
    """The trained model: llama.cpp's greedy tokens on each export against ours on the same format
    (fp32 for f32/f16; our int8 for q8_0; our RTN int4 for q4_0/q4_k), and its tokens/s."""
    types = ("f32", "f16", "q8_0", "q4_0", "q4_k")
    prompt = val_ids[:16].tolist()
    n = min(64 if quick else 128, trained.config.block_size - len(prompt))
    ours = {"fp32": greedy(trained, prompt, n)[0]}
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_ggufs(trained, Path(tmp), types)
        for t in types:
            res = run_llama_cpp(python, paths[t], prompt, n, n_ctx=trained.config.block_size)
            if res is None:
                row(S, f"trained: llama.cpp {t}", "llama.cpp exited with an error (run it by hand to see why)")
                continue
            res = res[0]
            same = sum(a == b for a, b in zip(res["tokens"], ours["fp32"]))
            row(S, f"trained: llama.cpp {t} ({paths[t].stat().st_size / 2**20:.1f} MiB): greedy tokens = fp32's",
                f"{same}/{n}, {(n - 1) / res['decode_s']:.0f} tok/s")


def llama_speed_fns(python, model, folder: Path, quick: bool) -> dict:
    """{label: fn() -> seconds per decode step} of llama.cpp on the 124M-shaped model's exports."""
    paths = export_ggufs(model, folder, ("f32", "q8_0", "q4_0") if quick else ("f32", "f16", "q8_0", "q4_0", "q4_k"))
    prompt, n = list(range(1, 33)), (16 if quick else 64)

    def fn(path):
        res = run_llama_cpp(python, path, prompt, n, n_ctx=128)
        return float("nan") if res is None else res[0]["decode_s"] / (n - 1)

    return {f"llama.cpp {t} ({p.stat().st_size / 2**20:.0f} MiB)": (lambda p=p: fn(p)) for t, p in paths.items()}


def bench_quant(quick: bool) -> None:
    """quantize.py: quality on a model trained here, decode speed on the 124M shape, llama.cpp beside."""
    trained, train_ids, val_ids = train_model(quick)
    quality_rows(trained, train_ids, val_ids, quick)
    model, name = speed_model(quick)
    python = llama_cpp_python()
    if python is None:
        row(S, "llama.cpp", "skipped: llama-cpp-python not importable and $NANOLLM_LLAMA_CPP_PYTHON not set")
        speed_rows(model, name, quick)
        speed_rows(model, name, quick, batch=8)
        return
    llama_rows(python, trained, val_ids, quick)
    with tempfile.TemporaryDirectory() as tmp:
        speed_rows(model, name, quick, llama_speed_fns(python, model, Path(tmp), quick))
    speed_rows(model, name, quick, batch=8)


if __name__ == "__main__":
    bench_quant(quick="--quick" in sys.argv)
