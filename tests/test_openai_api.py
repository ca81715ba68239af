"""openai_api.py: the official openai client gets sample.generate's tokens through the engine
(alone, streamed, under concurrency), disconnects free their rows, bad requests get 4xx JSON,
a full queue 503, a real browser chats; the file imports no script and needs of the engine
only what its docstring lists."""

import ast
import http.client
import json
import queue
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import openai_api
import sample
import serve
import test_serve
import tokenizer
from test_serve import BLOCK, PROMPTS, idle, reference, wait_until

# test_serve's fixtures: the character tokenizer, the random model, slow decode steps
tok, model, slow_steps = test_serve.tok, test_serve.model, test_serve.slow_steps
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


ENGINE_ARGS = ("max_num_seqs", "max_queue", "max_num_batched_tokens", "block_size", "kv_mib", "prefix_caching")


def start(model, tok, **kw):
    engine_args = {k: kw.pop(k) for k in ENGINE_ARGS if k in kw}
    srv = serve.make_server(model, tok, engine_args=engine_args, log_requests=False, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server(model, tok, loopback):
    srv = start(model, tok, max_num_seqs=4)  # fewer rows than the 8 concurrent requests: some wait, then join
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai", reason="the official openai client (pip install openai) is the reference")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                         max_retries=0, timeout=30)


# ---------------------------------------------------------------------------------------
# The openai client gets what sample.generate gives


def test_completions_greedy_equal_generate(client, model, tok):
    """The char tokenizer maps each character to one id, so equal text means equal tokens."""
    for prompt, n in [("ROMEO:", 40), ("First Citizen:\nBefore we proceed", 25)]:
        want, _ = reference(model, tok, tok.encode(prompt), n, temperature=0)
        r = client.completions.create(model="nanollm", prompt=prompt, max_tokens=n, temperature=0)
        assert r.choices[0].text == want
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
               (len(prompt), n, len(prompt) + n)
        pieces = [c.choices[0].text for c in
                  client.completions.create(model="nanollm", prompt=prompt, max_tokens=n, temperature=0, stream=True)]
        assert "".join(pieces) == want
        assert len([p for p in pieces if p]) == n  # one chunk per token: it really streams


def test_chat_greedy_equal_generate(client, model, tok, server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Speak, friend."}]
    ids = server.template.render(messages)
    assert tok.decode(ids) == "You are terse.\n\nUser: Speak, friend.\nAssistant:"
    want, _ = reference(model, tok, ids, 30, temperature=0)
    assert "\nUser:" not in want  # the template's stop string would cut it (tested apart)
    r = client.chat.completions.create(model="nanollm", messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 30
    stream = client.chat.completions.create(model="nanollm", messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_seeded_sampling_equals_generate(client, model, tok):
    """A seeded request has its own generator: the same draws as sample.generate with that seed."""
    prompt = "ROMEO:"
    want, _ = reference(model, tok, tok.encode(prompt), 40, temperature=0.9, top_p=0.9, seed=7)
    r = client.completions.create(model="nanollm", prompt=prompt, max_tokens=40, temperature=0.9, top_p=0.9, seed=7)
    assert r.choices[0].text == want


def test_stop_strings(client, model, tok):
    """The reply ends before the first occurrence of a stop string, which is never sent,
    even in a stream where it arrives one character (token) at a time."""
    prompt = "ROMEO:"
    full, _ = reference(model, tok, tok.encode(prompt), 60, temperature=0)
    stop = full[20:23]  # three characters from the middle of the greedy reply
    want = full[:full.find(stop)]
    r = client.completions.create(model="nanollm", prompt=prompt, max_tokens=60, temperature=0, stop=[stop, "@@"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    pieces = list(client.completions.create(model="nanollm", prompt=prompt, max_tokens=60, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_chat_model_uses_sfts_template(model, tok, loopback):
    """A checkpoint finetuned by sft.py ("chat:" tokenizer spec): the prompt is the ids
    sft.render_conversation trains on, the reply stops at <|end|>; typed special strings stay text."""
    import copy

    import sft

    chat_tok = sft.ChatTokenizer(tok)
    chat_model = sft.add_chat_tokens(copy.deepcopy(model), chat_tok)
    loaded_tok, template = tokenizer.load_chat_template(chat_tok.spec)
    assert isinstance(template, tokenizer.ChatTemplate) and template.stop_ids == {chat_tok.end_id}
    messages = [{"role": "user", "content": "Speak <|assistant|> now"}]
    ids = template.render(messages)
    assert ids == sft.render_conversation(messages, chat_tok, add_generation_prompt=True)[0]
    assert ids.count(chat_tok.assistant_id) == 1  # only the template's own turn opener
    want_ids = [int(t) for t in sample.generate(chat_model, [ids], 40, temperature=0, eos_id=chat_tok.end_id,
                                                vocab_size=chat_tok.vocab_size)]
    reply = want_ids[:want_ids.index(chat_tok.end_id)] if chat_tok.end_id in want_ids else want_ids
    srv = start(chat_model, loaded_tok, template=template)
    try:
        status, _, r = raw(srv, "POST", CHAT, {"messages": messages, "max_tokens": 40, "temperature": 0})
        assert status == 200
        assert r["choices"][0]["message"]["content"] == chat_tok.decode(reply)
        assert r["choices"][0]["finish_reason"] == ("stop" if chat_tok.end_id in want_ids else "length")
        assert r["usage"]["completion_tokens"] == len(want_ids)
    finally:
        srv.close()


def test_eight_concurrent_requests_get_what_they_get_alone(client, model, tok, server, slow_steps):
    """8 requests of different prompt and output lengths (half streamed, two sampled with
    seeds) at once through 4 rows: rows decode together, finished ones leave, waiting ones
    join; each gets what sample.generate gives it alone."""
    slow_steps(0.002)  # the requests overlap in time, whatever the machine's speed
    jobs = [(p, 10 + 9 * i, 0.0 if i % 4 else 0.8, i % 2 == 1) for i, p in enumerate(PROMPTS)]
    wants = [reference(model, tok, tok.encode(p), n, temperature=t, seed=i)[0] for i, (p, n, t, _) in enumerate(jobs)]

    def run(i):
        p, n, t, stream = jobs[i]
        kw = {"model": "nanollm", "prompt": p, "max_tokens": n, "temperature": t, "seed": i}
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    steps0 = server.engine.stats["steps"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, range(8)))
    assert got == wants
    total = sum(n for _, n, _, _ in jobs)
    assert server.engine.stats["steps"] - steps0 < total - 8  # many steps served several rows at once
    assert wait_until(lambda: idle(server))


# ---------------------------------------------------------------------------------------
# Disconnects, bad requests, a full queue


def test_cut_stream_frees_its_row(client, server, model, tok, slow_steps):
    slow_steps(0.02)  # the whole reply would take 110 * 20 ms = 2.2 s
    cancelled0 = server.engine.stats["cancelled"]
    stream = client.completions.create(model="nanollm", prompt="ROMEO:", max_tokens=110, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    t0 = time.monotonic()
    assert wait_until(lambda: idle(server), timeout=1.5)  # well before the reply could have finished
    assert time.monotonic() - t0 < 1.5
    assert server.engine.stats["cancelled"] == cancelled0 + 1
    # a client that sends a non-streamed request and hangs up is cancelled too
    with socket.create_connection(server.server_address[:2]) as s:
        body = json.dumps({"prompt": "ROMEO:", "max_tokens": 110}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: server.engine.running() == 1)
    assert wait_until(lambda: idle(server), timeout=1.5)
    assert server.engine.stats["cancelled"] == cancelled0 + 2
    slow_steps(0.0)
    want, _ = reference(model, tok, tok.encode("O"), 20, temperature=0)
    assert client.completions.create(model="nanollm", prompt="O", max_tokens=20, temperature=0).choices[0].text == want


def raw(server, method, path, body=None, headers=None):
    """(status, headers, parsed JSON) of one request sent with http.client."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), json.loads(text) if text else None


CHAT = "/v1/chat/completions"
OK_MSG = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [  # (path, body, status, param or code it names)
    (CHAT, b'{"messages": [', 400, "invalid_json"),
    (CHAT, b"[1, 2]", 400, "invalid_json"),
    (CHAT, {"max_tokens": 5}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    (CHAT, {"messages": OK_MSG, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {"messages": OK_MSG, "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"messages": OK_MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": OK_MSG, "temperature": 5}, 400, "temperature"),
    (CHAT, {"messages": OK_MSG, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": OK_MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": OK_MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"messages": OK_MSG, "stop": 3}, 400, "stop"),
    (CHAT, {"messages": OK_MSG, "seed": 1.5}, 400, "seed"),
    (CHAT, {"messages": OK_MSG, "seed": 2**64}, 400, "seed"),  # past a 64-bit generator state
    (CHAT, {"messages": OK_MSG, "seed": -2**63 - 1}, 400, "seed"),
    (CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),  # RecursionError
    (CHAT, {"messages": OK_MSG, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": OK_MSG, "n": 2}, 400, "n"),
    (CHAT, {"messages": OK_MSG, "model": "gpt-9"}, 404, "model_not_found"),
    (CHAT, {"messages": OK_MSG, "max_tokens": BLOCK}, 400, "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * BLOCK}]}, 400, "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "caf\u00e9"}]}, 400, None),  # not in the alphabet
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),  # no end-of-text token to start from
    ("/v1/nothing", {}, 404, "not_found"),
]


@pytest.mark.parametrize("path,body,status,names", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_request_gets_4xx_json(server, path, body, status, names):
    got, headers, reply = raw(server, "POST", path, body)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["message"] and "Traceback" not in reply["error"]["message"]
    if names is not None:
        assert names in (reply["error"]["param"], reply["error"]["code"])
    assert idle(server)


def test_server_keeps_serving_after_bad_requests(server, client, model, tok):
    openai = pytest.importorskip("openai")
    for path, body, _, _ in BAD_REQUESTS:
        raw(server, "POST", path, body)
    assert raw(server, "GET", CHAT)[0] == 405
    with socket.create_connection(server.server_address[:2]) as s:  # no Content-Length
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")
    with socket.create_connection(server.server_address[:2]) as s:  # a body too large to read
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")
    with pytest.raises(openai.BadRequestError) as e:  # the client reads our error JSON as OpenAI's
        client.chat.completions.create(model="nanollm", messages=OK_MSG, max_tokens=BLOCK)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=OK_MSG)
    health = raw(server, "GET", "/health")[2]
    assert health["status"] == "ok" and health["free_slots"] == health["max_num_seqs"] == 4
    want, _ = reference(model, tok, tok.encode("O"), 10, temperature=0)
    assert client.completions.create(model="nanollm", prompt="O", max_tokens=10, temperature=0).choices[0].text == want


def test_full_queue_gives_503_with_retry_after(model, tok, monkeypatch, loopback):
    srv = start(model, tok, max_num_seqs=1, max_queue=1)
    gate, real = threading.Event(), serve.Engine.run
    monkeypatch.setattr(serve.Engine, "run", lambda *a, **k: (gate.wait(10), real(*a, **k))[1])
    try:
        results = {}

        def call(name, prompt):
            results[name] = raw(srv, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0})

        a = threading.Thread(target=call, args=("a", "ROMEO:"))
        a.start()
        assert wait_until(lambda: srv.engine.running() == 1)  # a holds the one row, its step held at the gate
        b = threading.Thread(target=call, args=("b", "O"))
        b.start()
        assert wait_until(lambda: srv.engine.waiting.qsize() == 1)  # b fills the queue
        status, headers, reply = raw(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5})
        assert status == 503 and headers["Retry-After"] == "1"
        assert reply["error"]["code"] == "overloaded" and reply["error"]["type"] == "server_error"
        gate.set()
        a.join(10)
        b.join(10)
        for name, prompt in (("a", "ROMEO:"), ("b", "O")):
            assert results[name][0] == 200
            assert results[name][2]["choices"][0]["text"] == reference(model, tok, tok.encode(prompt), 5,
                                                                       temperature=0)[0]
    finally:
        gate.set()
        srv.close()


def test_api_key(model, tok, loopback):
    openai = pytest.importorskip("openai")
    srv = start(model, tok, api_key="s3cret")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        assert raw(srv, "GET", "/v1/models")[0] == 401
        status, _, reply = raw(srv, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
        models = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["nanollm"]
        assert raw(srv, "GET", "/health")[0] == 200  # health and the page stay open
    finally:
        srv.close()


def test_models_health_and_page(client, server):
    assert [m.id for m in client.models.list().data] == ["nanollm"]
    status, _, health = raw(server, "GET", "/health")
    assert status == 200 and health["max_num_seqs"] == 4
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    page = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/html")
    assert "/v1/chat/completions" in page and "<script>" in page
    assert "src=\"http" not in page and "href=\"http" not in page and "@import" not in page  # works offline


# ---------------------------------------------------------------------------------------
# A real browser


def test_browser_chat_page_streams_a_reply(model, tok, slow_steps, loopback, browser):
    from selenium.webdriver.common.by import By

    srv = start(model, tok)
    try:
        browser.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        assert wait_until(lambda: "nanollm" in browser.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max_tokens", "20"), ("system", "Be brief.")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        slow_steps(0.03)  # 20 tokens over ~0.6 s: partial replies are there to be seen
        browser.find_element(By.ID, "input").send_keys("Good morrow, sir.")
        browser.find_element(By.ID, "send").click()
        seen = set()

        def reply_done():
            replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            if replies:
                seen.add(replies[-1].get_property("textContent"))
                return replies[-1].get_attribute("data-done") == "true"
            return False

        assert wait_until(reply_done, timeout=15)
        ids = srv.template.render([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Good morrow, sir."}])
        want, _ = reference(model, tok, ids, 20, temperature=0)
        assert "\nUser:" not in want
        final = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert final.get_property("textContent") == want and final.get_attribute("data-finish") == "length"
        assert any(0 < len(s) < len(want) for s in seen)  # it appeared piece by piece

        # Stop: the page aborts the fetch and the server frees the row
        slow_steps(0.1)  # the rest of the context (~50 tokens) would take ~5 s
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "input").send_keys("And again.")
        browser.find_element(By.ID, "send").click()
        assert wait_until(lambda: srv.engine.running() == 1)
        browser.find_element(By.ID, "stop").click()
        assert wait_until(lambda: idle(srv), timeout=2)
        assert wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
                          .get_attribute("data-done") == "stopped")
    finally:
        srv.close()



# ---------------------------------------------------------------------------------------
# The engine is an argument: what openai_api needs of it


def test_imports_no_script():
    """openai_api imports the standard library, common.py and tools.py (the tool-call formats, itself
    importing only common), nothing else of ours (DESIGN.md, with tools as the README says)."""
    tree = ast.parse(Path(openai_api.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert names - set(sys.stdlib_module_names) == {"common", "tools"}


class StubCompletion:
    def __init__(self, pieces):
        self.pieces, self.finish_reason, self.completion_tokens = pieces, None, 0

    def deltas(self, client_gone=lambda: False):
        yield from self.pieces
        self.finish_reason, self.completion_tokens = "length", len(self.pieces)

    def cancel(self):
        pass


class StubEngine:
    """Only what openai_api's docstring lists: it answers "abc" to any prompt, or has a full queue."""
    block_size, max_num_seqs, stats = 64, 2, {}

    def __init__(self):
        self.waiting, self.full, self.calls = queue.Queue(), False, []

    def running(self):
        return 0

    def stop(self):
        pass

    def prometheus(self):
        return openai_api.Metrics().text({"num_requests_running": 0})

    def complete(self, tok, prompt, stop_ids, stop, **sampling):
        if self.full:
            raise queue.Full("3 requests are already waiting")
        self.calls.append((prompt, stop, sampling))
        return StubCompletion(["a", "b", "c"])


def test_server_takes_any_engine(tok, loopback):
    engine = StubEngine()
    srv = openai_api.make_server(engine, tok, log_requests=False)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, _, reply = raw(srv, "POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 5, "stop": "x",
                                                                "seed": 3})
        assert status == 200 and reply["choices"][0]["text"] == "abc" and reply["usage"]["completion_tokens"] == 3
        assert engine.calls == [(tok.encode("ROMEO:"), ("x",),
                                 {"max_tokens": 5, "temperature": 1.0, "top_p": 1.0, "top_k": None, "seed": 3})]
        assert raw(srv, "GET", "/health")[2]["free_slots"] == 2
        engine.full = True
        status, headers, reply = raw(srv, "POST", CHAT, {"messages": OK_MSG, "max_tokens": 5})
        assert status == 503 and headers["Retry-After"] == "1" and reply["error"]["code"] == "overloaded"
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------
# Reliability: one bad request, client or row fails alone


def exchange(server, request: bytes, wait=5.0) -> bytes:
    """Send raw bytes, read until the server hangs up (or `wait` passes): what came back."""
    with socket.create_connection(server.server_address[:2], timeout=wait) as s:
        s.sendall(request)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return got


def test_malformed_http_is_answered_4xx(model, tok, loopback):
    srv = start(model, tok, max_num_seqs=2, request_timeout=0.5)  # slow clients time out in half a second
    try:
        post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        assert exchange(srv, post + "Content-Length: \u00b2\r\n\r\n".encode()).startswith(b"HTTP/1.1 400")
        t0 = time.monotonic()
        short = exchange(srv, post + b"Content-Length: 50\r\n\r\n{\"prompt\"")  # then silence
        assert short.startswith(b"HTTP/1.1 408") and b"request_timeout" in short and time.monotonic() - t0 < 3
        assert exchange(srv, post + b"Content-Le") == b""  # headers that never end: hung up, not held
        head = exchange(srv, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # headers, no body
        assert raw(srv, "GET", "/health")[0] == 200
    finally:
        srv.close()


def test_port_in_use_is_one_line(model, tok, loopback):
    srv = start(model, tok, max_num_seqs=1)
    try:
        with pytest.raises(serve.NanoError, match=rf"^port {srv.server_address[1]} is in use \(pick --port\)$"):
            serve.make_server(model, tok, port=srv.server_address[1])
    finally:
        srv.close()


def test_a_failing_row_fails_alone(model, tok, monkeypatch, loopback):
    """A sampler that breaks for one request (as a NaN row would) and a batch step that breaks
    once: the broken request gets its error, every other one its exact greedy answer."""
    real_sample, real_step, broke = sample.sample_next, serve.Engine.run, []

    def sample_next(logits, temperature, top_k, top_p, generator):
        if top_k == 7:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, temperature, top_k, top_p, generator)

    def run(engine, batch):
        if len(batch) > 1 and not broke:  # once, in a batch: which request did it is unknowable
            broke.append(1)
            raise RuntimeError("a kernel failed")
        return real_step(engine, batch)

    monkeypatch.setattr(sample, "sample_next", sample_next)
    monkeypatch.setattr(serve.Engine, "run", run)
    srv = start(model, tok, max_num_seqs=4)
    try:
        with ThreadPoolExecutor(4) as pool:
            bad = pool.submit(raw, srv, "POST", "/v1/completions",
                              {"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0.7, "top_k": 7})
            good = [pool.submit(raw, srv, "POST", "/v1/completions", {"prompt": p, "max_tokens": 30, "temperature": 0})
                    for p in PROMPTS[:3]]
            assert bad.result()[0] == 500 and "inf, nan" in bad.result()[2]["error"]["message"]
            for p, f in zip(PROMPTS, good):
                assert f.result()[0] == 200
                assert f.result()[2]["choices"][0]["text"] == reference(model, tok, tok.encode(p), 30, temperature=0)[0]
        assert broke and wait_until(lambda: idle(srv)) and raw(srv, "GET", "/health")[0] == 200
    finally:
        srv.close()


def fuzz_request(rng) -> bytes:
    """One hostile request: bad JSON, wrong types, extreme numbers, odd HTTP."""
    values = [None, True, -1, 0, 2**64, 2**70, -2**63 - 1, 10**30, 1e308, -0.0, 0.5, "", "x" * 300, [], {}, [[[]]],
              "\u00e9\U0001F600", [1, 2, 10**6]]
    fields = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "model", "messages",
              "prompt", "stream_options", "max_completion_tokens", "ignore_eos"]
    body = {"messages": OK_MSG} if rng.random() < 0.5 else {"prompt": "O"}
    for name in rng.sample(fields, rng.randint(1, 4)):
        body[name] = rng.choice(values)
    payload = json.dumps(body).encode()
    kind = rng.randrange(6)
    if kind == 1:
        payload = payload[:rng.randrange(len(payload))]  # cut JSON
    elif kind == 2:
        payload = b"[" * rng.randint(1000, 50_000) + b"]" * 3  # deep, unbalanced nesting
    path = rng.choice([CHAT, "/v1/completions", "/v1/nothing", "/health"])
    length = str(len(payload)).encode() if kind != 3 else rng.choice([b"\xc2\xb2", b"-5", b"1e3", b"99999999"])
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " + length
    if kind == 4:
        return head + b"\r\n\r\n" + payload[:len(payload) // 2]  # a body shorter than it says
    if kind == 5:
        return rng.choice([b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"GARBAGE\r\n\r\n", b"POST /v1/",
                           b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: \xff\r\nConnection: close\r\n\r\n"])
    return head + b"\r\n\r\n" + payload


def test_request_fuzzer_while_good_requests_get_their_answers(model, tok, loopback):
    """300 hostile requests from a seeded generator, 4 at a time, while good requests run beside
    them: no hostile request gets a 5xx or holds its connection, every good one gets its exact
    greedy answer, /health stays 200."""
    import random

    rng = random.Random(1234)
    requests = [fuzz_request(rng) for _ in range(300)]
    srv = start(model, tok, max_num_seqs=4, request_timeout=0.5)
    statuses, stop = [], threading.Event()
    want = {p: reference(model, tok, tok.encode(p), 12, temperature=0)[0] for p in PROMPTS[:2]}

    def good_traffic():
        answers = []
        while not stop.is_set():
            for p in want:
                status, _, reply = raw(srv, "POST", "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})
                answers.append(status == 200 and reply["choices"][0]["text"] == want[p])
                answers.append(raw(srv, "GET", "/health")[0] == 200)
        return answers

    try:
        with ThreadPoolExecutor(5) as pool:
            good = pool.submit(good_traffic)
            for got in pool.map(lambda r: exchange(srv, r, wait=5.0), requests):
                statuses.append(got[9:12].decode() if got.startswith(b"HTTP/1.") else "closed")
            stop.set()
            answers = good.result()
        assert answers and all(answers)
        assert not [s for s in statuses if s.startswith("5")], statuses
        assert len([s for s in statuses if s.startswith("4")]) > 200  # most were answered, not hung up on
        assert wait_until(lambda: idle(srv)) and raw(srv, "GET", "/health")[0] == 200
    finally:
        stop.set()
        srv.close()


def test_metrics_in_prometheus_text(model, tok, loopback):
    """GET /metrics parses with the Prometheus client's own parser: gauges (running, waiting, KV
    blocks, prefix-cache hit rate), counters and the TTFT / inter-token histograms, whose counts
    are the requests and the gaps between their tokens."""
    parser = pytest.importorskip("prometheus_client.parser", reason="the Prometheus text-format reference")
    srv = start(model, tok, max_num_seqs=4, block_size=4)
    try:
        prompt = "First Citizen:\nBefore we proceed"
        for _ in range(3):  # the same prompt three times: the second and third hit the prefix cache
            assert raw(srv, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                         "ignore_eos": True})[0] == 200
        assert wait_until(lambda: idle(srv))
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in parser.text_string_to_metric_families(r.read().decode())}
    finally:
        srv.close()
    value = {f.name: f.samples[0].value for f in families.values() if f.type in ("gauge", "counter")}
    assert value["nanollm:num_requests_running"] == value["nanollm:num_requests_waiting"] == 0
    assert value["nanollm:kv_blocks_used"] == 0 and value["nanollm:kv_blocks_total"] == srv.engine.blocks.num_blocks
    n_prompt = len(tok.encode(prompt))
    blocks_hit = (n_prompt - 1) // 4
    assert value["nanollm:prefix_cache_hit_rate"] == pytest.approx(2 * blocks_hit * 4 / (3 * n_prompt))
    assert value["nanollm:generation_tokens"] == 18  # the parser drops a counter's _total
    assert value["nanollm:prompt_tokens"] == 3 * n_prompt - 2 * blocks_hit * 4
    counts = {f.name: {s.labels.get("le"): s.value for s in f.samples if s.name.endswith("_bucket")}
              for f in families.values() if f.type == "histogram"}
    assert counts["nanollm:time_to_first_token_seconds"]["+Inf"] == 3
    assert counts["nanollm:inter_token_latency_seconds"]["+Inf"] == 15
    buckets = list(counts["nanollm:inter_token_latency_seconds"].values())
    assert buckets == sorted(buckets)  # cumulative
