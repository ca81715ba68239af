"""serve.py, the engine: rows of different lengths decode in one step and each request gets
sample.generate's tokens; stop tokens and strings, request checks, chat templates, the CLI
(terminal chat, Ctrl-C, errors). The HTTP side is tested in test_openai_api.py."""

import http.client
import json
import socket
import sys
import threading
import time

import pytest
import torch

import data
import gpt
import openai_api
import sample
import serve
import tokenizer

BLOCK = 128
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "a", "KING RICHARD III:\nNow is the winter of our",
           "To be, or not", "O", "What say you?\n", "HAMLET: Words, words, words."]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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
        sample.prefill(model, torch.tensor([r[:-1]]), engine.views(slice(b, b + 1), len(r) - 1), head=engine.head)
    pos = torch.tensor([len(r) - 1 for r in rows])
    last = torch.tensor([[r[-1]] for r in rows])
    got = serve.decode_step(model, last, pos, engine.views(slice(0, 3), int(pos.max()) + 1), engine.head)
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
    tok, template = tokenizer.load_chat_template(str(tmp_path / "tokenizer.json"))
    assert isinstance(template, tokenizer.ChatTemplate) and template.stop_ids == set(tok.encode("<|im_end|>"))
    messages = [{"role": "user", "content": "Speak, man"}, {"role": "assistant", "content": "I will"},
                {"role": "user", "content": "Now?"}]
    ids = template.render(messages)
    assert ids == sft.render_conversation(messages, tok, add_generation_prompt=True, template=template.hf_template)[0]
    assert tok.decode(ids) == ("<|im_start|>user\nSpeak, man<|im_end|>\n<|im_start|>assistant\nI will<|im_end|>\n"
                               "<|im_start|>user\nNow?<|im_end|>\n<|im_start|>assistant\n")


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
    template = openai_api.PlainChatTemplate(tok)
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
