"""serve: serve.py over HTTP, 16 concurrent streamed requests, continuous batching against one
request at a time: total tokens/s, time to first token, inter-token latency; then the engine's
decode step alone at 16 rows vs 1.

Run: python -m bench serve [--quick]"""

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


def bench_serve(quick: bool) -> None:
    """serve.py: 16 concurrent streamed requests of 64 new tokens on the GPT-2-124M shape
    (random weights, greedy, ignore_eos so every request runs its 64 tokens), prompts of
    8..64 tokens, all sent at once. Continuous batching (--max_batch 16: every decode step
    serves every running request) against one request at a time (--max_batch 1: the same
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

    servers = {"batched": serve.make_server(model, tok, max_batch=n_requests, log_requests=False),
               "one at a time": serve.make_server(model, tok, max_batch=1, max_queue=n_requests, log_requests=False)}
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

    # the engine's decode step alone, B=16 rows vs 1 row at the same context length, the two
    # interleaved step by step (robust to a machine whose load drifts): where the gain comes from
    engine = serve.Engine(model, tok.vocab_size, max_batch=n_requests)
    length = max(len(p) for p in prompts) + new_tokens // 2
    step_ms = {1: [], n_requests: []}
    for _ in range(3 if quick else 10):
        for b, times in step_ms.items():
            tokens, pos = torch.zeros(b, 1, dtype=torch.long), torch.full((b,), length - 1)
            t0 = time.perf_counter()
            serve.decode_step(model, tokens, pos, engine.views(slice(0, b), length), engine.head)
            times.append((time.perf_counter() - t0) * 1e3)
    del engine

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
