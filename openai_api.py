"""OpenAI's HTTP API in front of an inference engine: routes, request validation, streaming
(server-sent events), OpenAI-style errors and a chat page.

serve.py teaches the engine (continuous batching); this file is the plumbing that lets any
OpenAI client talk to it. It imports no script: the engine, the tokenizer and the chat
template come in as arguments, and all it asks of them is
- engine: block_size, max_num_seqs, running(), waiting (a queue.Queue), stats (a dict),
  prometheus() (the /metrics text; Metrics below renders it), stop(), and complete(tok, prompt_ids, stop_ids, stop,
  max_tokens=, temperature=, top_p=, top_k=, seed=) -> a completion with deltas(client_gone)
  (text pieces; RuntimeError if the engine failed it), cancel(), finish_reason and
  completion_tokens. complete() raises NanoError for a request it cannot take and
  queue.Full when too many wait;
- tok: encode, decode, eot_id, vocab_size;
- template: render(messages) -> prompt ids, stop_ids, stop (strings); by default
  PlainChatTemplate below, for base models (tokenizer.load_chat_template gives a chat model's own);
- embedder (optional, for POST /v1/embeddings): name, dim, and embed(inputs) -> (vectors, tokens read)
  for a list of texts or token-id lists (rag.py's Encoder); NanoError for an input it cannot read.

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI's request and response
shapes; "stream": true sends server-sent events ending in `data: [DONE]`), POST /v1/embeddings
(with an embedder; "encoding_format": "base64" sends little-endian float32), GET /v1/models,
GET /health, GET /metrics (Prometheus text: vLLM's gauges and histograms), GET / (a chat page,
assets/chat.html: plain JavaScript, works offline). For a model that calls tools (tools.calls_tools)
the page runs the calculator through the server: GET /tools lists what it may offer the model
([tools.CALCULATOR_TOOL], or none), POST /tools/calculator runs a call's arguments
({"expression": "3487 * 291"} -> {"content": "1014717"}) with tools.calculate, a bad one is a 400.
Bad requests get OpenAI-style error JSON with a 4xx status; a full queue gets 503 with
Retry-After; a client that goes away cancels its request. One thread per connection.

Run (serve.py builds the engine and starts this server):
  python serve.py --ckpt out/ckpt.pt                 # then open http://127.0.0.1:8000/
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}'
"""

from __future__ import annotations

import base64
import errno
import hmac
import json
import math
import queue
import select
import socket
import struct
import threading
import time
import traceback
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import tools
from common import NanoError

PAGE = Path(__file__).resolve().parent / "assets" / "chat.html"

# ----------------------------------------------------------------------------------------
# Metrics in Prometheus' text format (GET /metrics), named as vLLM names them


class Metrics:
    """What the engine counts as it runs: tokens computed and generated, time to first token
    (arrival -> first token) and inter-token latency as histograms, generated tokens/s over the
    last 10 s. The engine calls step() after each forward pass and token() for each new token;
    text(gauges) renders everything, with the engine's gauges (running, waiting, KV blocks...)."""

    BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

    def __init__(self):
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "num_steps_total": 0}
        self.hist = {name: [0] * (len(self.BUCKETS) + 1) + [0.0] for name in ("time_to_first_token_seconds",
                                                                           "inter_token_latency_seconds")}
        self.recent: deque = deque()  # times of the tokens generated in the last 10 s
        self.lock = threading.Lock()

    def step(self, batch, now):
        """batch: [(request, tokens computed)]; a token computed past the prompt was generated before."""
        with self.lock:
            self.counters["num_steps_total"] += 1
            self.counters["prompt_tokens_total"] += sum(max(0, min(r.num_computed, len(r.prompt)) -
                                                            max(0, r.num_computed - n)) for r, n in batch)

    def token(self, req, now):
        with self.lock:
            self.counters["generation_tokens_total"] += 1
            first = req.n_generated == 0
            self.observe("time_to_first_token_seconds" if first else "inter_token_latency_seconds",
                         now - (req.arrived if first else req.last_time))
            req.last_time = now
            self.recent.append(now)
            while self.recent[0] < now - 10:
                self.recent.popleft()

    def observe(self, name, seconds):
        h = self.hist[name]
        h[next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))] += 1
        h[-1] += seconds

    def tokens_per_second(self) -> float:
        with self.lock:
            if len(self.recent) < 2:
                return 0.0
            return len(self.recent) / max(self.recent[-1] - self.recent[0], 1e-9)

    def text(self, gauges: dict) -> str:
        lines = []
        for name, value in {**gauges, "generation_tokens_per_second": self.tokens_per_second()}.items():
            lines += [f"# TYPE nanollm:{name} gauge", f"nanollm:{name} {value}"]
        with self.lock:
            for name, value in self.counters.items():
                lines += [f"# TYPE nanollm:{name} counter", f"nanollm:{name} {value}"]
            for name, h in self.hist.items():
                lines.append(f"# TYPE nanollm:{name} histogram")
                total = 0
                for bound, count in zip((*self.BUCKETS, "+Inf"), h[:-1]):
                    total += count
                    lines.append(f'nanollm:{name}_bucket{{le="{bound}"}} {total}')
                lines += [f"nanollm:{name}_sum {h[-1]}", f"nanollm:{name}_count {total}"]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# The chat template of base models: a conversation -> prompt ids


class PlainChatTemplate:
    """For base models: "User: ...\\nAssistant: ...\\n" lines, ending in "Assistant:", and
    "\\nUser:" as a stop string so the model does not write the user's next turn."""

    stop = ("\nUser:",)

    def __init__(self, tok):
        self.tok, self.stop_ids = tok, frozenset({tok.eot_id} if tok.eot_id is not None else ())

    def render(self, messages, tools=None) -> list[int]:
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise NanoError("this base model has no chat template, so no tools (serve a chat model: sft.py)")
        names = {"user": "User", "assistant": "Assistant"}
        text = "".join(m["content"] + "\n\n" if m["role"] == "system" else f"{names[m['role']]}: {m['content']}\n"
                       for m in messages)
        return self.tok.encode(text + "Assistant:")


# ----------------------------------------------------------------------------------------
# Request validation: OpenAI's fields, OpenAI's errors


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers or {}

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def get_field(body, name, kinds, default=None, check=None, hint=""):
    """body[name] if it has one of the JSON types `kinds` ("string", "integer", "number",
    "boolean", "array", "object") and passes check; a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return default
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}
    ok = any(isinstance(value, types[k]) and (k == "boolean" or not isinstance(value, bool)) for k in kinds)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok or (check is not None and not check(value)):
        raise APIError(400, f"{value!r} is not a valid {name!r} (expected {' or '.join(kinds)}{hint})", param=name)
    return value


def parse_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {\"role\", \"content\"} objects",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be 'system', 'user' or 'assistant' (got {role!r})",
                           param=f"{where}.role")
        if isinstance(content, list):  # content parts: only text ones can be read by a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}}",
                               param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def parse_prompt(body, tok):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < tok.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in 0..{tok.vocab_size - 1}", param="prompt")
        return prompt
    raise APIError(400, "'prompt' is required: a string or a list of token ids (one prompt per request)",
                   param="prompt")


def parse_embedding_input(body) -> list:
    """'input' in OpenAI's four shapes: a string, a list of strings, a list of token ids, a list of
    such lists -> a list of strings or token-id lists (at most 2048; none empty)."""
    def ids(v):
        return isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    x = body.get("input")
    items = [x] if isinstance(x, str) or ids(x) else x
    if not isinstance(items, list) or not items or not all(isinstance(v, str) or ids(v) for v in items):
        raise APIError(400, "'input' is required: a string, a list of strings, a list of token ids, or a list of "
                            "token-id lists", param="input")
    if len(items) > 2048 or "" in items:
        raise APIError(400, "'input' must hold 1 to 2048 inputs, none of them empty", param="input")
    return items


def parse_sampling(body, block_size, n_prompt):
    """The generation fields shared by both endpoints -> Request keyword arguments, stop, stream options."""
    max_tokens = get_field(body, "max_tokens", ["integer"], check=lambda v: v >= 1, hint=" >= 1")
    max_tokens = get_field(body, "max_completion_tokens", ["integer"], max_tokens, lambda v: v >= 1, " >= 1")
    if max_tokens is None:  # OpenAI's default: whatever the context has left
        max_tokens = block_size - n_prompt
    if n_prompt + max_tokens > block_size or max_tokens < 1:
        raise APIError(400, f"this model's context is {block_size} tokens; the prompt has {n_prompt} and "
                       f"max_tokens asks for {max_tokens} more (shorten the prompt or lower max_tokens)",
                       param="max_tokens" if n_prompt < block_size else "messages", code="context_length_exceeded")
    stop = get_field(body, "stop", ["string", "array"], [],
                     lambda v: isinstance(v, str) or (len(v) <= 4 and all(isinstance(s, str) and s for s in v)),
                     hint=", at most 4 non-empty strings")
    get_field(body, "n", ["integer"], 1, lambda v: v == 1, hint=" 1: one choice per request")
    stream_options = get_field(body, "stream_options", ["object"], {})
    options = {
        "max_tokens": max_tokens,
        "temperature": get_field(body, "temperature", ["number"], 1.0, lambda v: 0 <= v <= 2, " in [0, 2]"),
        "top_p": get_field(body, "top_p", ["number"], 1.0, lambda v: 0 < v <= 1, " in (0, 1]"),
        "top_k": get_field(body, "top_k", ["integer"], 0, lambda v: v >= 0, " >= 0") or None,  # vLLM's extension
        "seed": get_field(body, "seed", ["integer"], check=lambda v: -2**63 <= v < 2**64,
                          hint=" in [-2**63, 2**64)"),  # what a 64-bit generator state takes
    }
    return options, [stop] if isinstance(stop, str) else stop, {
        "stream": get_field(body, "stream", ["boolean"], False),
        "include_usage": bool(stream_options.get("include_usage")),
        "ignore_eos": get_field(body, "ignore_eos", ["boolean"], False),  # vLLM's extension, for benchmarks
    }


# ----------------------------------------------------------------------------------------
# HTTP


def parse_tools(body) -> list | None:
    """The request's `tools` (None without), checked: a bad schema is a 400."""
    if body.get("tools") is None:
        return None
    try:
        return tools.check_tools(body["tools"])
    except NanoError as e:
        raise APIError(400, str(e), param="tools") from None


class ToolCalls:
    """How one chat request uses its tools: the reply is parsed into tool_calls with the
    template's format; with tool_choice "required" or a named function the reply is forced to be
    a call: the prompt ends with the format's opening (`opening` ids, `prefix` text), and the
    engine masks every token that would leave the call's grammar (tools.CallConstraint; the
    grammar of a tool list is compiled once per server)."""

    OPENINGS = {"nanollm": ("<|tool_call|>", ""), "hermes": ("<tool_call>\n", "\n</tool_call>"), "llama3": ("", "")}

    def __init__(self, fmt, choice, tool_list, server):
        self.fmt, self.opening, self.prefix, self.suffix, self.constraint = fmt, [], "", "", None
        if choice in ("auto", "none"):
            return
        if fmt.name not in self.OPENINGS:
            raise APIError(400, f"tool_choice {json.dumps(choice)} is not supported for {fmt.name} templates (use auto)",
                           param="tool_choice")
        if isinstance(choice, dict):  # a named function: only its grammar
            tool_list = [t for t in tool_list if t["function"]["name"] == choice["function"]["name"]]
        self.prefix, self.suffix = self.OPENINGS[fmt.name]
        self.opening = server.tok.encode(self.prefix) if self.prefix else []
        key = json.dumps(tool_list, sort_keys=True)
        if key not in server.grammars:
            if len(server.grammars) >= 16:  # many clients' tool lists: forget the oldest grammar
                server.grammars.pop(next(iter(server.grammars)))
            server.grammars[key] = tools.CallGrammar(server.tok, tool_list, server.template.stop_ids)
        self.constraint = tools.CallConstraint(server.grammars[key])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON replies; streams close the connection
    server_version = "nanollm"
    max_body = 1 << 20
    head_only = False

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def setup(self):
        self.timeout = self.server.request_timeout
        super().setup()

    def do_HEAD(self):  # a GET's status and headers, without the body
        self.head_only = True
        self._dispatch("GET")

    def log_message(self, fmt, *args):
        if self.server.log_requests:
            super().log_message(fmt, *args)

    def _dispatch(self, method):
        routes = {"/v1/chat/completions": ("POST", self.chat_completions), "/v1/completions": ("POST", self.completions),
                  "/v1/embeddings": ("POST", self.embeddings), "/v1/models": ("GET", self.models),
                  "/health": ("GET", self.health), "/metrics": ("GET", self.metrics),
                  "/tools": ("GET", self.tool_list), "/tools/calculator": ("POST", self.calculator),
                  "/": ("GET", self.page), "/index.html": ("GET", self.page)}
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            body = self._read_body() if method == "POST" else b""
            if path not in routes:
                raise APIError(404, f"no route {method} {path} (see GET /v1/models, POST /v1/chat/completions)",
                               code="not_found")
            want, handler = routes[path]
            if method != want:
                raise APIError(405, f"{path} takes {want}, not {method}", code="method_not_allowed",
                               headers={"Allow": want})
            key = self.server.api_key
            if path.startswith(("/v1/", "/tools")) and key and \
                    not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}"):
                raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
            handler(self._json(body) if method == "POST" else None)
        except APIError as e:
            self._send_json(e.status, e.body(), e.headers)
        except NanoError as e:  # e.g. a character the tokenizer cannot encode
            self._send_json(400, APIError(400, str(e)).body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001  a bug answers 500, never kills the server
            traceback.print_exc()
            self.close_connection = True
            try:
                self._send_json(500, APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body())
            except OSError:  # the client has gone too
                pass

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise APIError(411, "send the JSON body with a Content-Length header", code="length_required")
        if not (length.isascii() and length.isdigit()):  # "²" is a digit to str.isdigit, not to int()
            self.close_connection = True
            raise APIError(400, f"Content-Length {length!r} is not a number of bytes", code="bad_content_length")
        if int(length) > self.max_body:
            self.close_connection = True
            raise APIError(413, f"the body is over {self.max_body} bytes", code="body_too_large")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            body = b""
        if len(body) < int(length):  # the client stopped sending (or timed out) before its Content-Length
            self.close_connection = True
            raise APIError(408, f"the body ended after {len(body)} of {length} bytes (send the whole body "
                                f"within {self.timeout} s)", code="request_timeout")
        return body

    @staticmethod
    def _json(raw):
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        except RecursionError:  # json nests by recursion: 100k brackets overflow the stack
            raise APIError(400, "the body nests too deeply (at most a few hundred levels)", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _send_json(self, status, obj, headers=None):
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not self.head_only:
            self.wfile.write(payload)

    def _client_gone(self):
        """The client closed its end: the socket reads as end-of-file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- routes
    def health(self, _):
        engine = self.server.engine
        self._send_json(200, {"status": "ok", "model": self.server.model_name, "max_num_seqs": engine.max_num_seqs,
                              "running": engine.running(), "waiting": engine.waiting.qsize(),
                              "free_slots": engine.max_num_seqs - engine.running(), **engine.stats})

    def metrics(self, _):
        payload = self.server.engine.prometheus().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not self.head_only:
            self.wfile.write(payload)

    def models(self, _):
        names = [self.server.model_name] + ([self.server.embedder.name] if self.server.embedder else [])
        self._send_json(200, {"object": "list", "data": [{"id": n, "object": "model", "created": self.server.created,
                                                          "owned_by": "nanollm"} for n in names]})

    def page(self, _):
        payload = self.server.page
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not self.head_only:
            self.wfile.write(payload)

    def tool_list(self, _):
        self._send_json(200, {"tools": self.server.tools})

    def calculator(self, body):
        """The chat page's calculator: a call's arguments in, the tool's text out (the same as
        tools.calculator_text's); refused input is a 400 with the calculator's line."""
        expression = body.get("expression")
        if set(body) != {"expression"} or not isinstance(expression, str):
            raise APIError(400, "the calculator takes {\"expression\": \"<arithmetic>\"} (got keys "
                                f"{sorted(body)})", param="expression")
        self._send_json(200, {"name": "calculator", "content": tools.number_text(tools.calculate(expression))})

    def chat_completions(self, body):
        self._check_model(body)
        template, tool_list = self.server.template, parse_tools(body)
        choice = tools.check_tool_choice(body.get("tool_choice", "auto" if tool_list else "none"), tool_list)
        fmt = tools.tool_format(template)
        messages = body.get("messages")
        if tool_list or isinstance(messages, list) and any(
                isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages):
            ids = template.render(tools.normalize_messages(messages, fmt), tools=tool_list)
        else:
            ids = template.render(parse_messages(body))
        calls = ToolCalls(fmt, choice, tool_list, self.server) if tool_list and choice != "none" else None
        self._complete(body, ids + (calls.opening if calls else []), template.stop_ids, template.stop, chat=True,
                       calls=calls)

    def completions(self, body):
        self._check_model(body)
        ids = parse_prompt(body, self.server.tok)
        if not ids:
            if self.server.tok.eot_id is None:
                raise APIError(400, "the prompt is empty (send at least one character)", param="prompt")
            ids = [self.server.tok.eot_id]  # an empty prompt starts a fresh document, as GPT-2 was trained
        eot = self.server.tok.eot_id
        self._complete(body, ids, frozenset({eot} if eot is not None else ()), (), chat=False)

    def embeddings(self, body):
        embedder = self.server.embedder
        if embedder is None:
            raise APIError(404, "this server has no embedding model (start serve.py with --embeddings ENCODER)",
                           code="not_found")
        self._check_model(body, embedder.name)
        fmt = get_field(body, "encoding_format", ["string"], "float", lambda v: v in ("float", "base64"),
                        ": 'float' or 'base64'")
        get_field(body, "dimensions", ["integer"], check=lambda v: v == embedder.dim, hint=f", {embedder.dim} here")
        vectors, n_tokens = embedder.embed(parse_embedding_input(body))
        as_base64 = lambda v: base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()  # noqa: E731
        data = [{"object": "embedding", "index": i, "embedding": as_base64(v) if fmt == "base64" else v}
                for i, v in enumerate(vectors)]
        self._send_json(200, {"object": "list", "data": data, "model": embedder.name,
                              "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    def _check_model(self, body, name=None):
        model, name = get_field(body, "model", ["string"]), name or self.server.model_name
        if model is not None and model != name:
            raise APIError(404, f"the model {model!r} does not exist (this server has {name!r})",
                           param="model", code="model_not_found")

    def _complete(self, body, ids, stop_ids, stop, chat, calls=None):
        engine, tok = self.server.engine, self.server.tok
        options, user_stop, flags = parse_sampling(body, engine.block_size, len(ids))
        if calls is not None and calls.constraint is not None:
            options["constraint"] = calls.constraint
        try:
            comp = engine.complete(tok, ids, frozenset() if flags["ignore_eos"] else stop_ids,
                                   tuple(stop) + tuple(user_stop), **options)
        except queue.Full as e:
            raise APIError(503, f"the server is busy ({e}; retry shortly)", kind="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.server.model_name}
        try:
            if flags["stream"]:
                self._stream(comp, head, chat, flags["include_usage"], len(ids), calls)
            else:
                text = "".join(comp.deltas(self._client_gone))
                if comp.finish_reason is None:  # the client left
                    self.close_connection = True
                    return
                message, finish = {"role": "assistant", "content": text}, comp.finish_reason
                if calls is not None:
                    content, found = tools.parse_tool_calls(calls.prefix + text + calls.suffix, calls.fmt)
                    if found:
                        message, finish = {"role": "assistant", "content": content or None, "tool_calls": found}, "tool_calls"
                choice = {"index": 0, "finish_reason": finish, "logprobs": None,
                          **({"message": message} if chat else {"text": text})}
                self._send_json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                                      "choices": [choice], "usage": usage(len(ids), comp.completion_tokens)})
        finally:
            comp.cancel()

    def _stream(self, comp, head, chat, include_usage, n_prompt, calls=None):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        kind = "chat.completion.chunk" if chat else "text_completion"

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(piece, finish=None):
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": piece} if chat else {"text": piece.get("content", "")})
            return {**head, "object": kind, "choices": [choice]}

        def send_parts(content, call_deltas):  # content, then tool-call chunks (OpenAI's delta.tool_calls)
            if content:
                send(chunk({"content": content}))
            for delta in call_deltas:
                send(chunk({"tool_calls": [delta]}))

        if chat:
            send(chunk({"role": "assistant", "content": ""}))
        stream = tools.ToolStream(calls.fmt) if calls is not None else None
        if stream is not None:
            stream.feed(calls.prefix)  # the opening the prompt forced is part of the reply
        try:
            for piece in comp.deltas(self._client_gone):
                if stream is None:
                    send(chunk({"content": piece}))
                else:
                    send_parts(*stream.feed(piece))
        except RuntimeError as e:  # the engine failed this request: say so in the stream
            send(APIError(500, str(e), kind="server_error").body())
        else:
            if comp.finish_reason is None:  # the client left
                return
            finish = comp.finish_reason
            if stream is not None:
                stream.feed(calls.suffix)
                content, call_deltas = stream.finish()
                send_parts(content, call_deltas)
                finish = "tool_calls" if call_deltas else finish
            send(chunk({}, finish))
            if include_usage:
                send({**head, "object": kind, "choices": [], "usage": usage(n_prompt, comp.completion_tokens)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


# ----------------------------------------------------------------------------------------
# Tokens back to text, stop strings


class TextStream:
    """Token ids in, text out, piece by piece. Holds back a half-decoded UTF-8 character
    (byte-level BPE splits characters) and any tail that might be the start of a stop
    string, so a stop string never reaches the client, even split across tokens."""

    def __init__(self, tok, stop=()):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids, self.sent = [], 0  # sent: characters of the text handed out so far

    def push(self, token) -> tuple[str, bool]:
        """-> (new text, whether a stop string ended the text)"""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text, min(hits)), True
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        for k in range(min(safe - self.sent, max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[safe - k:safe]) for s in self.stop):
                safe -= k
                break
        return self._take(text, safe), False

    def flush(self) -> str:
        return self._take(self.tok.decode(self.ids), None)

    def _take(self, text, end):
        piece = text[self.sent:end]
        self.sent += len(piece)
        return piece



def usage(n_prompt, n_completion):
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


class Server(ThreadingHTTPServer):
    """The HTTP server: a Handler thread per connection, all sharing one engine; it keeps
    track of its connections so that server_close() can hang up on every one."""

    daemon_threads = True  # a connection thread never keeps the process alive
    request_queue_size = 1024  # the listen backlog; socketserver's 5 resets connections in a burst

    def __init__(self, address, engine, tok, template=None, model_name="nanollm", api_key="", log_requests=True,
                 request_timeout=30.0, embedder=None):
        self.request_timeout = request_timeout  # seconds a client may take to send headers or body: 408 / hang-up
        self.connections, self._lock = set(), threading.Lock()  # first: a failed bind calls server_close
        super().__init__(address, Handler)
        self.engine, self.tok, self.template = engine, tok, template or PlainChatTemplate(tok)
        self.model_name, self.api_key, self.log_requests, self.embedder = model_name, api_key, log_requests, embedder
        self.created = int(time.time())
        self.page = PAGE.read_bytes()
        self.grammars = {}  # tools.CallGrammar per tool list (tool_choice required or named)
        self.tools = [tools.CALCULATOR_TOOL] if tools.calls_tools(tok, self.template) else []  # GET /tools

    def process_request(self, request, client_address):
        with self._lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # a connection thread's last act
        with self._lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        """Stop listening and hang up on every open connection, idle keep-alive ones
        included, then wait for their threads: a connection thread still alive when the
        interpreter exits can abort the process ("terminate called without an active exception")."""
        super().server_close()
        with self._lock:
            hang_up = list(self.connections)
        for sock in hang_up:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # its thread reads end-of-file, or fails to write, and ends
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while self.connections and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self):
        """Stop serve_forever (running in another thread), the connections, the engine."""
        self.shutdown()
        self.server_close()
        self.engine.stop()


def make_server(engine, tok, host="127.0.0.1", port=0, **kwargs) -> Server:
    """A Server on host:port in front of a started engine (port 0 picks a free one); if it
    cannot listen, the engine is stopped and a NanoError says why."""
    try:
        return Server((host, port), engine, tok, **kwargs)
    except OSError as e:
        engine.stop()
        if e.errno == errno.EADDRINUSE:
            raise NanoError(f"port {port} is in use (pick --port)") from None
        raise NanoError(f"cannot listen on {host}:{port} ({e.strerror}; pick another --port)") from None
