"""serve.py: the official openai client gets sample.generate's tokens (alone, streamed, under
concurrency), disconnects free their rows, bad requests get 4xx, a real browser chats, CLI."""

import http.client
import json
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import data
import gpt
import sample
import serve
import tokenizer

BLOCK = 128
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "a", "KING RICHARD III:\nNow is the winter of our",
           "To be, or not", "O", "What say you?\n", "HAMLET: Words, words, words."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models are fastest on one thread (the engine thread's ops are tiny); restore after
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    text = data.SHAKESPEARE_PATH.read_text() + "<|>"  # and the characters of sft.py's special tokens
    return tokenizer.load_tokenizer("char:" + "".join(sorted(set(text))))


def random_model(vocab_size, arch="gpt2", seed=0):
    """A random GPT whose weights are large enough that greedy output varies from token to
    token and from prompt to prompt (GPT-2's std 0.02 gives near-uniform logits). arch
    "llama": RMSNorm, rotary positions, SwiGLU, grouped-query attention (4 query heads, 2 kv)."""
    torch.manual_seed(seed)
    size = {"block_size": BLOCK, "vocab_size": vocab_size, "n_layer": 2, "n_head": 2, "n_embd": 32}
    config = gpt.GPTConfig(**size) if arch == "gpt2" else gpt.llama_config(**{**size, "n_head": 4, "n_kv_head": 2})
    m = gpt.GPT(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "wpe" in name else 0.3)
    return m


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tok.vocab_size)


def start(model, tok, **kw):
    srv = serve.make_server(model, tok, log_requests=False, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server(model, tok, loopback):
    srv = start(model, tok, max_batch=4)  # fewer rows than the 8 concurrent requests: some wait, then join
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai", reason="the official openai client (pip install openai) is the reference")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                         max_retries=0, timeout=30)


def reference(model, tok, ids, max_tokens, **kw):
    """What sample.generate gives for this prompt alone: (text, token ids)."""
    out = [int(t) for t in sample.generate(model, [list(ids)], max_tokens, vocab_size=tok.vocab_size, **kw)]
    return tok.decode(out), out


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def idle(srv):
    return srv.engine.running() == 0 and srv.engine.waiting.qsize() == 0


@pytest.fixture
def slow_steps(monkeypatch):
    """Make every decode step take at least `delay` seconds, so a stream lasts long enough
    to be cut, watched or overlapped (the tiny model otherwise finishes in milliseconds)."""
    real = serve.decode_step

    def set_delay(delay):
        def slow(*args, **kwargs):
            time.sleep(delay)
            return real(*args, **kwargs)
        monkeypatch.setattr(serve, "decode_step", slow)
    return set_delay


# ---------------------------------------------------------------------------------------
# The batched step itself


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_step_rows_of_different_lengths_match_full_forward(arch):
    """Three rows at lengths 5, 11, 2 decode in one step; each row's logits equal a plain
    uncached forward pass over that row alone. Tolerance 1e-5 absolute on logits of size
    ~1-10: fp32 with different reduction orders (masked slots contribute exact zeros)."""
    model = random_model(65, arch)
    engine = serve.Engine(model, max_batch=3)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 65, (n,), generator=g).tolist() for n in (5, 11, 2)]
    for b, r in enumerate(rows):  # prefill each row alone, leaving out its last token
        sample.prefill(model, torch.tensor([r[:-1]]), engine._views(slice(b, b + 1), len(r) - 1), head=engine.head)
    pos = torch.tensor([len(r) - 1 for r in rows])
    last = torch.tensor([[r[-1]] for r in rows])
    got = serve.decode_step(model, last, pos, engine._views(slice(0, 3), int(pos.max()) + 1), engine.head)
    for b, r in enumerate(rows):
        with torch.no_grad():
            want = model(torch.tensor([r]))[0][0, -1]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=0)


def test_engine_batches_a_llama_model(tok):
    """The engine alone (no HTTP) on a Llama-family model (rotary positions per row, grouped
    kv heads in the cache): 5 requests of different lengths through 3 rows each get
    sample.generate's greedy tokens."""
    model = random_model(tok.vocab_size, "llama")
    prompts = [tok.encode(p) for p in PROMPTS[:5]]
    lengths = [30, 7, 19, 25, 12]
    engine = serve.Engine(model, tok.vocab_size, max_batch=3).start()
    try:
        reqs = [engine.submit(serve.Request(p, n)) for p, n in zip(prompts, lengths)]
        got = []
        for req in reqs:
            events = [req.events.get(timeout=20)]
            while not isinstance(events[-1], serve.Finished):
                events.append(req.events.get(timeout=20))
            got.append(events[:-1])
    finally:
        engine.stop()
    assert got == [reference(model, tok, p, n, temperature=0)[1] for p, n in zip(prompts, lengths)]
    assert engine.stats["steps"] < sum(lengths) - len(lengths)  # rows shared steps


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


def test_text_stream_holds_back_split_characters_and_stop_strings():
    """GPT-2's byte-level BPE splits a character across tokens: no piece carries a half
    character (U+FFFD), the pieces add up to the text, and a stop string split across
    tokens is caught."""
    tok = tokenizer.load_tokenizer("gpt2")
    text = "héllo wörld, 日本語のテキスト 🙂 end"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters really are split over tokens
    stream = serve.TextStream(tok)
    pieces = [stream.push(t)[0] for t in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    stream = serve.TextStream(tok, stop=["語のテ"])
    out = ""
    for t in ids:
        piece, stopped = stream.push(t)
        out += piece
        if stopped:
            break
    assert stopped and out == "héllo wörld, 日本"


def test_engine_stops_at_a_stop_token(model, tok):
    """A request ends at the first of its stop ids: the tokens before it come out, the stop
    token itself does not (it counts as generated), and the reason is "stop"."""
    ids = tok.encode("ROMEO:")
    _, ref = reference(model, tok, ids, 30, temperature=0)
    stop = ref[5]
    engine = serve.Engine(model, tok.vocab_size, max_batch=2).start()
    try:
        req = engine.submit(serve.Request(ids, 30, stop_ids=frozenset({stop})))
        events = [req.events.get(timeout=10)]
        while not isinstance(events[-1], serve.Finished):
            events.append(req.events.get(timeout=10))
    finally:
        engine.stop()
    assert events[:-1] == ref[:ref.index(stop)]
    assert events[-1] == serve.Finished("stop", ref.index(stop) + 1)


def test_engine_checks_requests_before_queueing(model):
    """Library use: a bad request raises NanoError at submit, a full queue Overloaded (the
    engine thread is not started, so nothing leaves the queue)."""
    from common import NanoError

    engine = serve.Engine(model, max_batch=1, max_queue=1)
    for bad in (serve.Request([], 5), serve.Request([1], 0), serve.Request([1] * 100, BLOCK - 99),
                serve.Request([1], 5, temperature=-1.0), serve.Request([1], 5, temperature=1.0, top_p=0.0)):
        with pytest.raises(NanoError):
            engine.submit(bad)
    engine.submit(serve.Request([1] * 100, BLOCK - 100))  # exactly fills the context: fine
    with pytest.raises(serve.Overloaded):
        engine.submit(serve.Request([1], 5))


def test_chat_model_uses_sfts_template(model, tok, loopback):
    """A checkpoint finetuned by sft.py ("chat:" tokenizer spec): the prompt is the ids
    sft.render_conversation trains on, the reply stops at <|end|>; typed special strings stay text."""
    import copy

    import sft

    chat_tok = sft.ChatTokenizer(tok)
    chat_model = sft.add_chat_tokens(copy.deepcopy(model), chat_tok)
    loaded_tok, template = serve.load_tokenizer(chat_tok.spec)
    assert isinstance(template, serve.SFTChatTemplate) and template.stop_ids == {chat_tok.end_id}
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


def test_hf_chat_template_renders_what_sft_trains_on(tmp_path):
    """A Hugging Face tokenizer.json with a chat_template beside it: the prompt is rendered with
    the template (tokenizer.py), tokenized as sft.py's training rendering is, and
    the reply stops at the template's eos token."""
    import bpe
    import sft

    specials = ("<|im_start|>", "<|im_end|>")
    vocab, merges = bpe.train_bpe(data.SHAKESPEARE_PATH.read_text()[:20_000], 300, special_tokens=specials)
    tokenizer.save_tokenizer_json(bpe.Tokenizer(vocab, merges, specials), tmp_path / "tokenizer.json")
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml, "eos_token": "<|im_end|>"}))
    tok, template = serve.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(template, serve.SFTChatTemplate) and template.stop_ids == set(tok.encode("<|im_end|>"))
    messages = [{"role": "user", "content": "Speak, man"}, {"role": "assistant", "content": "I will"},
                {"role": "user", "content": "Now?"}]
    ids = template.render(messages)
    assert ids == sft.render_conversation(messages, tok, add_generation_prompt=True, template=template.hf_template)[0]
    assert tok.decode(ids) == ("<|im_start|>user\nSpeak, man<|im_end|>\n<|im_start|>assistant\nI will<|im_end|>\n"
                               "<|im_start|>user\nNow?<|im_end|>\n<|im_start|>assistant\n")


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
    assert health["status"] == "ok" and health["free_slots"] == health["max_batch"] == 4
    want, _ = reference(model, tok, tok.encode("O"), 10, temperature=0)
    assert client.completions.create(model="nanollm", prompt="O", max_tokens=10, temperature=0).choices[0].text == want


def test_full_queue_gives_503_with_retry_after(model, tok, monkeypatch, loopback):
    srv = start(model, tok, max_batch=1, max_queue=1)
    gate, real = threading.Event(), serve.decode_step
    monkeypatch.setattr(serve, "decode_step", lambda *a, **k: (gate.wait(10), real(*a, **k))[1])
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
    assert status == 200 and health["max_batch"] == 4
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    page = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/html")
    assert "/v1/chat/completions" in page and "<script>" in page
    assert "src=\"http" not in page and "href=\"http" not in page and "@import" not in page  # works offline


# ---------------------------------------------------------------------------------------
# A real browser


def test_browser_chat_page_streams_a_reply(model, tok, slow_steps, loopback):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (pip install selenium) drives the browser")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.common.by import By

    srv = start(model, tok)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
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
        browser.quit()
        srv.close()


# ---------------------------------------------------------------------------------------
# CLI: terminal chat, Ctrl-C, errors


@pytest.fixture(scope="module")
def ckpt(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "ckpt.pt"
    gpt.save_checkpoint(path, model, tok.spec)
    return path


def test_terminal_chat(ckpt, model, tok, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Good morrow.\n/new\nHail!\n/quit\n"))
    serve.main(["--ckpt", str(ckpt), "--device", "cpu", "--chat", "--temperature", "0", "--max_tokens", "15"])
    out = capsys.readouterr().out
    template = serve.PlainChatTemplate(tok)
    for msg in ("Good morrow.", "Hail!"):  # /new: the second reply sees only its own turn
        want, _ = reference(model, tok, template.render([{"role": "user", "content": msg}]), 15, temperature=0)
        assert "assistant>" + want.split("\nUser:")[0] + "\n" in out


def test_ctrl_c_stops_cleanly(ckpt, capsys, loopback):
    """main() serving in the main thread; a Ctrl-C (KeyboardInterrupt there, as SIGINT gives)
    after a request returns normally, stops the engine thread, hangs up on open connections
    and closes the port."""
    import _thread

    with socket.socket() as s:  # a free port (released at once; nothing else here grabs it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answers, out = [], []

    def serving():
        out.append(capsys.readouterr().out)
        return "serving" in "".join(out)

    def client_then_ctrl_c():
        try:
            assert wait_until(serving, timeout=20)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "O", "max_tokens": 3}),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            answers.append((r.status, r.read() != b""))
            keep_alive.append(conn)  # left open, as a browser leaves its connections
        finally:
            _thread.interrupt_main()

    before = set(threading.enumerate())  # other tests' servers and engines
    keep_alive = []
    helper = threading.Thread(target=client_then_ctrl_c, daemon=True)
    helper.start()
    serve.main(["--ckpt", str(ckpt), "--port", str(port), "--device", "cpu", "--log_requests", "False"])
    helper.join(5)
    out.append(capsys.readouterr().out)
    assert answers == [(200, True)] and "stopping" in "".join(out)
    # the engine and every connection thread ended (an idle keep-alive one too: hung up on),
    # so nothing is left running when the interpreter exits
    assert [t for t in threading.enumerate() if t not in before] == []
    assert keep_alive[0].sock.recv(1) == b""  # the server closed the kept-alive connection
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="error: checkpoint .* not found"):
        serve.main(["--ckpt", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit, match="error: max_tokens, max_batch and max_queue must be >= 1"):
        serve.main(["--ckpt", str(tmp_path / "nope.pt"), "--max_batch", "0"])
    with pytest.raises(SystemExit, match="error: top_p must be in"):
        serve.main(["--top_p", "0"])
