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
    """Make every engine step take at least `delay` seconds, so a stream lasts long enough
    to be cut, watched or overlapped (the tiny model otherwise finishes in milliseconds)."""
    real = serve.Engine.run

    def set_delay(delay):
        def slow(*args, **kwargs):
            time.sleep(delay)
            return real(*args, **kwargs)
        monkeypatch.setattr(serve.Engine, "run", slow)
    return set_delay


def run_engine(engine, arrivals):
    """Drive an engine (no thread) step by step; arrivals: [(step, Request)], each submitted at
    the start of its step. Returns the tokens each request generated, in the order given."""
    pending = sorted(arrivals, key=lambda a: a[0])
    reqs, step = [r for _, r in arrivals], 0
    while pending or engine.running() or engine.scheduler.waiting or engine.waiting.qsize():
        while pending and pending[0][0] <= step:
            engine.submit(pending.pop(0)[1])
        engine.step()
        step += 1
        assert step < 20_000
    return [r.tokens[len(r.prompt):] for r in reqs]


# ---------------------------------------------------------------------------------------
# The paged step itself


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_paged_step_matches_full_forward(arch):
    """Three requests at lengths 5, 11, 2 (blocks of 4, scattered over the pool) compute in one
    forward pass through their block tables, both layouts: decode (a row per request, one token
    each) and prefill chunks (one row, the requests side by side, a block-diagonal mask). Each
    request's logits equal a plain uncached forward pass over it alone. Tolerance 1e-5 absolute
    on logits of size ~1-10: fp32 with different reduction orders (masked keys add exact zeros)."""
    model = random_model(65, arch)
    engine = serve.Engine(model, max_num_seqs=3, block_size=4)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 65, (n,), generator=g).tolist() for n in (5, 11, 2)]
    tables = [[7, 2], [0, 5, 9], [4]]  # any blocks, in any order
    for split in ([n - 1 for n in map(len, rows)], [1, 4, 0]):  # decode the last token; prefill from 1, 4, 0
        segments = [(r[:k], 0, t) for r, k, t in zip(rows, split, tables) if k]
        if segments:
            idx, pos, mask, views = engine.kv.batch(segments, [list(range(len(segments)))])
            with torch.no_grad():
                model.hidden_states(idx, kv_cache=views, input_pos=pos, position_ids=pos, attn_mask=mask)
        segments = [(r[k:], k, t) for r, k, t in zip(rows, split, tables)]
        decode = all(len(s[0]) == 1 for s in segments)
        layout = [[i] for i in range(3)] if decode else [[0, 1, 2]]
        idx, pos, mask, views = engine.kv.batch(segments, layout)
        with torch.no_grad():
            hidden = model.hidden_states(idx, kv_cache=views, input_pos=pos, position_ids=pos, attn_mask=mask)
        last = hidden[:, -1] if decode else hidden[0, torch.tensor([len(s[0]) for s in segments]).cumsum(0) - 1]
        for b, r in enumerate(rows):
            with torch.no_grad():
                want = model(torch.tensor([r]))[0][0, -1]
            torch.testing.assert_close(model.lm_head(last[b]), want, atol=1e-5, rtol=0)


def requests_with_random_arrival(n=64, seed=0, vocab=65):
    """n requests of mixed lengths (prompts 1..72 tokens, 1..40 new): half start with one of two
    shared prefixes of 32 tokens (whole blocks of 8 and 16), arriving at random steps."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prefixes = [torch.randint(0, vocab, (32,), generator=g).tolist() for _ in range(2)]
    out = []
    for i in range(n):
        own = torch.randint(0, vocab, (rand(0 if i % 2 else 1, 41),), generator=g).tolist()
        out.append((rand(0, 120), (prefixes[i % 4 // 2] if i % 2 else []) + own, rand(1, 41)))
    return out


@pytest.fixture(scope="module")
def static_outputs(model):
    """sample.generate's greedy tokens (the static KV cache): all 64 prompts as one left-padded
    batch of 40 new tokens, each row cut to its request's max_tokens (greedy: a prefix of a longer
    answer is the shorter answer)."""
    requests = requests_with_random_arrival()
    rows = list(zip(*[t.tolist() for t in sample.generate(model, [p for _, p, _ in requests], 40, temperature=0)]))
    return [list(row[:n]) for row, (_, _, n) in zip(rows, requests)]


def test_static_cache_reference_equals_hugging_face(model, static_outputs):
    """The reference of the engine tests: sample.generate equals Hugging Face's generate, request by request."""
    transformers = pytest.importorskip("transformers", reason="reference implementation of GPT-2 generation")
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()
    hf.load_state_dict(model.to_hf_state_dict(), strict=False)
    for (_, p, n), want in zip(requests_with_random_arrival(), static_outputs):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        assert out[0, len(p):].tolist() == want


@pytest.mark.parametrize("setting", ["prefix cache", "no prefix cache", "tiny KV: preemption", "chunked prefill"])
def test_engine_matches_the_static_cache_over_64_requests(model, static_outputs, setting):
    """64 mixed-length requests arriving at random steps, greedy: every request gets exactly the
    tokens of the static-cache path (and so of Hugging Face's generate, above), with prefix hits,
    without, with a KV cache so small that requests are preempted and recomputed, and with a token
    budget that splits prompts into chunks."""
    args = {"prefix cache": {}, "no prefix cache": {"prefix_caching": False},
            "tiny KV: preemption": {"kv_mib": 120 * 512 / 2**20, "block_size": 4},  # 120 tokens of 512 bytes
            "chunked prefill": {"max_num_batched_tokens": 12, "block_size": 16}}[setting]
    engine = serve.Engine(model, None, max_num_seqs=8, max_queue=64, **args)
    arrivals = [(t, serve.Request(p, n)) for t, p, n in requests_with_random_arrival()]
    assert run_engine(engine, arrivals) == static_outputs
    hit = engine.scheduler.prefix_hit_rate()
    assert (hit > 0.1) if engine.blocks.prefix_caching else hit == 0
    assert (engine.scheduler.preemptions > 0) == (setting == "tiny KV: preemption")
    assert engine.blocks.num_free() == engine.blocks.num_blocks  # every block given back


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("gelu", ["tanh", "exact", "relu2"])
def test_prepacked_linears_equal_nn_linear(gelu):
    """sample.PackedLinear (oneDNN's reordered weight, what serve.py runs on a CPU) computes
    nn.Linear, with and without a bias, on odd shapes, one row (fp32: through its plain copy), a
    batch of rows and a (B, T, C) input; GPT-2's MLP with its GELU (tanh or exact) fused into the first product equals the plain MLP. fp32 at
    1e-5 (another summation order); bf16 within one bf16 rounding of the fp32 result."""
    torch.manual_seed(0)
    config = gpt.GPTConfig(n_embd=40, n_head=4, gelu=gelu, bias=True)
    mlp = gpt.MLP(config).eval()
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        want = mlp(x)
        packed = sample.pack_linears(torch.nn.ModuleDict({"transformer": torch.nn.ModuleDict(
            {"wte": torch.nn.Embedding(2, 2)}), "mlp": mlp}))["mlp"]
        assert isinstance(packed.c_fc, sample.PackedLinear)
        assert isinstance(packed.gelu, torch.nn.Identity) == (gelu != "relu2")  # ReLU² stays apart
        torch.testing.assert_close(packed(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x[:1, :1]), want[:1, :1], atol=1e-5, rtol=1e-5)  # 1 fp32 row: plain weights
        for bias in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                linear = torch.nn.Linear(37, 61, bias=bias).to(dtype)
                layer = sample.PackedLinear(linear, rows=16)
                for shape in ((1, 37), (7, 37), (2, 3, 37)):
                    a = torch.randn(shape, dtype=dtype)
                    exact = torch.nn.functional.linear(a.float(), linear.weight.float(),
                                                       None if linear.bias is None else linear.bias.float())
                    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.01}
                    torch.testing.assert_close(layer(a).float(), exact, **tol)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_engine_on_prepacked_weights_gives_the_same_tokens(model, static_outputs, arch):
    """serve.main packs the weights for oneDNN on a CPU: the engine then gives the same greedy
    tokens as the plain model's static-cache path (GPT-2: the 64 mixed requests above; Llama:
    SwiGLU and grouped kv heads, 12 of them)."""
    import copy

    plain = model if arch == "gpt2" else random_model(65, "llama")
    requests = requests_with_random_arrival(64 if arch == "gpt2" else 12)
    want = static_outputs if arch == "gpt2" else [
        [int(t) for t in sample.generate(plain, [p], n, temperature=0)] for _, p, n in requests]
    packed = sample.pack_linears(copy.deepcopy(plain), rows=8)
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    engine = serve.Engine(packed, None, max_num_seqs=8)
    assert run_engine(engine, [(t, serve.Request(p, n)) for t, p, n in requests]) == want


def test_prefix_cache_skips_the_shared_prefix_and_recomputes_a_whole_cached_prompt(model):
    """A prompt of exactly 3 blocks sent twice: the second time 2 blocks come from the cache and
    the last block is recomputed (its last token's logits are needed), with the same tokens.
    A shared 64-token prefix: the next requests skip it (>= 90% of their prefill)."""
    engine = serve.Engine(model, None, max_num_seqs=4, block_size=8)
    prompt = list(range(1, 25))
    first = run_engine(engine, [(0, serve.Request(prompt, 10))])
    assert engine.scheduler.prefix_hit == 0
    again = run_engine(engine, [(0, serve.Request(prompt, 10))])
    assert again == first == [[int(t) for t in sample.generate(model, [prompt], 10, temperature=0)]]
    assert engine.scheduler.prefix_hit == 16
    shared = torch.randint(0, 65, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    run_engine(engine, [(0, serve.Request(shared + [1], 2))])
    hit0, queried0 = engine.scheduler.prefix_hit, engine.scheduler.prefix_queried
    run_engine(engine, [(0, serve.Request(shared + [i, i], 2)) for i in range(4)])
    assert (engine.scheduler.prefix_hit - hit0) / (engine.scheduler.prefix_queried - queried0) >= 0.9


def test_kv_memory_follows_the_tokens_in_flight(model):
    """Blocks in use = the blocks the running requests' tokens fill, step by step; with request
    lengths varying 10x the peak is <= half of a static cache of max_num_seqs full contexts."""
    engine = serve.Engine(model, None, max_num_seqs=8, prefix_caching=False)
    arrivals = [(0, serve.Request([i % 60 + 1] * (4 + 4 * (i % 10)), 4)) for i in range(16)]  # prompts of 4..40
    peak, real_step = 0, engine.step

    def step(block=False):
        nonlocal peak
        real_step(block)
        used = engine.blocks.num_blocks - engine.blocks.num_free()
        assert used == sum(engine.blocks.blocks_for(r.num_computed) for r in engine.scheduler.running)
        peak = max(peak, used)

    engine.step = step
    run_engine(engine, arrivals)
    static = 8 * BLOCK  # slots a static cache of 8 rows holds
    assert 0 < peak * 16 <= 0.5 * static


def test_engine_batches_a_llama_model(tok):
    """The engine alone (no HTTP) on a Llama-family model (rotary positions per row, grouped
    kv heads in the cache): 5 requests of different lengths through 3 rows each get
    sample.generate's greedy tokens."""
    model = random_model(tok.vocab_size, "llama")
    prompts = [tok.encode(p) for p in PROMPTS[:5]]
    lengths = [30, 7, 19, 25, 12]
    engine = serve.Engine(model, tok.vocab_size, max_num_seqs=3).start()
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


def test_engine_keeps_a_sliding_window_past_it(tok):
    """A Mistral-style model (window 8) on prompts and replies 3-6x the window, prefilled in
    chunks beside decoding rows: sample.generate's greedy tokens (whose band mask test_llama.py
    checks against transformers)."""
    model = random_model(tok.vocab_size, "llama")
    model.config.sliding_window = 8
    for block in model.transformer.h:
        block.attn.window = 8
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    lengths = [30, 7, 19, 25]
    engine = serve.Engine(model, tok.vocab_size, max_num_seqs=2, max_num_batched_tokens=16)
    got = run_engine(engine, [(2 * i, serve.Request(p, n)) for i, (p, n) in enumerate(zip(prompts, lengths))])
    assert got == [reference(model, tok, p, n, temperature=0)[1] for p, n in zip(prompts, lengths)]
    unwindowed = random_model(tok.vocab_size, "llama")
    assert got != [reference(unwindowed, tok, p, n, temperature=0)[1] for p, n in zip(prompts, lengths)]


def test_text_stream_holds_back_split_characters_and_stop_strings():
    """GPT-2's byte-level BPE splits a character across tokens: no piece carries a half
    character (U+FFFD), the pieces add up to the text, and a stop string split across
    tokens is caught."""
    tok = tokenizer.load_tokenizer("gpt2")
    text = "héllo wörld, 日本語のテキスト 🙂 end"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters really are split over tokens
    stream = openai_api.TextStream(tok)
    pieces = [stream.push(t)[0] for t in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    stream = openai_api.TextStream(tok, stop=["語のテ"])
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
    engine = serve.Engine(model, tok.vocab_size, max_num_seqs=2).start()
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

    engine = serve.Engine(model, max_num_seqs=1, max_queue=1)
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
    serve.main(["--ckpt", str(ckpt), "--device", "cpu", "--dtype", "float32", "--chat", "--temperature", "0",
                "--max_tokens", "15"])
    out = capsys.readouterr().out
    template = openai_api.PlainChatTemplate(tok)
    for msg in ("Good morrow.", "Hail!"):  # /new: the second reply sees only its own turn
        want, _ = reference(model, tok, template.render([{"role": "user", "content": msg}]), 15, temperature=0)
        assert "assistant>" + want.split("\nUser:")[0] + "\n" in out


def test_terminal_chat_runs_the_calculator(monkeypatch, capsys):
    """--chat with a tool-calling model (a "chat:tools:" tokenizer): the reply's call is run by the
    real calculator, shown with its result, and the result is in the prompt of the next reply."""
    import io
    import types

    import tools

    tok = tokenizer.load_tokenizer("chat:tools:char:" + "".join(map(chr, range(32, 127))))
    call = '<|tool_call|>{"name": "calculator", "arguments": {"expression": "12*34"}}'
    replies, prompts = iter([call, "408"]), []

    class ScriptedEngine:  # what chat_cli needs of an engine: the scripted replies of a model that calls
        block_size = 512

        def complete(self, tok, ids, *args, **kwargs):
            prompts.append(tok.decode(ids))
            text = next(replies)
            return types.SimpleNamespace(deltas=lambda: iter([text]), cancel=lambda: None)

    monkeypatch.setattr(sys, "stdin", io.StringIO("what is 12*34?\n/quit\n"))
    cfg = types.SimpleNamespace(system="", max_tokens=50, temperature=0.0, top_p=1.0, top_k=0)
    serve.chat_cli(ScriptedEngine(), tok, tokenizer.ChatTemplate(tok), cfg)
    out = capsys.readouterr().out
    assert "with a calculator" in out and '[calculator({"expression": "12*34"}) -> 408]' in out
    assert prompts[1].endswith("<|tool_result|>408<|end|><|assistant|>") and tools.calculator_text("12*34") == "408"


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
    with pytest.raises(SystemExit, match="error: max_tokens, max_num_seqs, .* must be >= 1"):
        serve.main(["--ckpt", str(tmp_path / "nope.pt"), "--max_num_seqs", "0"])
    with pytest.raises(SystemExit, match="error: top_p must be in"):
        serve.main(["--top_p", "0"])


def test_engine_serves_an_int8_checkpoint(model, tmp_path):
    """A quantize.py checkpoint (int8 absmax weights, the head too) loads as serve.main loads it and
    the engine gives the static-cache path's greedy tokens of the same quantized model."""
    import copy

    import quantize

    qmodel = quantize.quantize_model(copy.deepcopy(model), quantize.QuantizeConfig(method="absmax"), log=lambda *a: None)
    quantize.save_quantized(tmp_path / "int8.pt", qmodel, "char:abc")
    loaded, _ = sample.load_source(str(tmp_path / "int8.pt"), "cpu", torch.float32)
    assert isinstance(loaded.lm_head, quantize.QuantLinear)
    requests = requests_with_random_arrival(12)
    want = [[int(t) for t in sample.generate(loaded, [p], n, temperature=0)] for _, p, n in requests]
    engine = serve.Engine(loaded, None, max_num_seqs=4, block_size=8)
    assert run_engine(engine, [(t, serve.Request(p, n)) for t, p, n in requests]) == want


def test_dtype_auto_picks_bf16_where_the_cpu_has_amx(capsys):
    """--dtype auto on a CPU: bf16 where the CPU says it has AMX bf16 units (Linux: the amx_bf16
    flag of /proc/cpuinfo, read independently of torch's detection), fp32 elsewhere; a named dtype wins."""
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo to check the CPU's flags against")
    amx = "amx_bf16" in info.read_text().split()
    assert serve.pick_dtype("cpu", "auto") == (torch.bfloat16 if amx else torch.float32)
    assert ("AMX" in capsys.readouterr().out) == amx
    assert serve.pick_dtype("cpu", "float32") == torch.float32
