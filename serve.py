"""An OpenAI-compatible inference server with continuous batching, streaming and a chat page.

The idea: continuous batching (iteration-level scheduling, Yu et al. 2022, "Orca"; the
scheduler of vLLM, Kwon et al. 2023, arXiv:2309.06180). sample.py generates a static batch:
all rows start together and the batch runs until its slowest row is done, so a row whose
answer is short sits idle and a request that arrives late waits for the whole batch. A
server schedules per decode step instead:
- one engine thread owns the model and a static KV cache of --max_batch rows (slots);
- every row has its own length: the token at position p of row b lives in cache slot p of
  row b, so per-row position ids and a per-row attention mask (slot <= the row's own
  position) let rows of different lengths share one forward pass;
- each engine iteration: retire cancelled requests, admit waiting requests into free rows
  (prefill each), then ONE decode step for every running request at once;
- so a new request joins the running batch at the step after its prefill, and a finished
  one leaves at the step it finishes, its row free at once; nobody waits for the slowest.

What runs in parallel and what in sequence:
- parallel: the HTTP threads (one per connection: parse, validate, tokenize, turn tokens
  back into text, stream); inside a prefill, all positions of one prompt (one forward pass,
  big matmuls, compute-bound); inside a decode step, all running requests (one B-row
  forward: each weight is read once for B tokens, and decode is memory-bound, so B rows
  cost little more than one until the matmuls turn compute-bound, at hundreds of rows on
  a GPU and far fewer on a CPU: that is where the throughput comes from).
- sequential: the engine's iterations (step t+1 feeds the tokens sampled at step t); the
  prefills of several new requests, one after the other, each stalling the decode step of
  the running requests for its duration (vLLM's chunked prefill bounds that stall by
  splitting long prompts; not done here).
The cache is allocated once, --max_batch rows of block_size slots; vLLM's PagedAttention
hands out cache blocks on demand instead, so short requests do not reserve a full row.

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI's request and response
shapes; "stream": true sends server-sent events ending in `data: [DONE]`), GET /v1/models,
GET /health, GET / (a chat page, assets/chat.html: plain JavaScript, works offline).
Bad requests get OpenAI-style error JSON with a 4xx status; a full queue gets 503 with
Retry-After; a client that goes away cancels its request.

Run:
  python serve.py --ckpt out/ckpt.pt                 # then open http://127.0.0.1:8000/
  python serve.py --init_from gpt2 --max_batch 16 --api_key secret
  python serve.py --ckpt out-sft/ckpt.pt --chat      # a model from sft.py, in the terminal
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}'
"""

from __future__ import annotations

import hmac
import json
import math
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

import common
import data
import sample
import tokenizer
from common import NanoError

# ----------------------------------------------------------------------------------------
# A KV cache whose rows have different lengths


class SlotCache:
    """One layer's keys and values (rows, n_head, slots, head_dim), a view of the engine's
    static buffers (sample.make_cache). sample.KVCache writes every row at the same slots
    (left padding aligns them); here input_pos is (rows, T): each row writes its new tokens
    at its own positions, so requests of different lengths decode in one step."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, input_pos, k, v):  # k, v: (rows, n_head, T, head_dim)
        if input_pos.dim() == 1:  # one prompt's slots 0..T-1 (sample.prefill passes (T,))
            input_pos = input_pos.expand(k.shape[0], -1)
        index = input_pos[:, None, :, None].expand_as(k)  # (rows, n_head, T, head_dim)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        return self.k, self.v


@torch.no_grad()
def decode_step(model, tokens, pos, cache, head):
    """One decode step for rows of different lengths: tokens (B, 1) go into slot pos[b] (B,)
    of their own row, which is also their position; row b's query sees slots 0..pos[b]."""
    slots = torch.arange(cache[0].k.shape[2], device=pos.device)
    mask = (slots[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S): per-row causal mask
    hidden = model.hidden_states(tokens, kv_cache=cache, input_pos=pos[:, None], position_ids=pos[:, None],
                                 attn_mask=mask)
    return head(hidden[:, -1])  # (B, V)


# ----------------------------------------------------------------------------------------
# The engine: one thread, the model, max_batch rows


@dataclass
class Finished:
    """The last event of a request: why it ended, and how many tokens it generated."""
    reason: str  # "stop" (end token), "length" (max_tokens), "cancelled", "error"
    n_tokens: int
    error: str | None = None


@dataclass(eq=False)  # compared by identity
class Request:
    """One generation as the engine sees it. The engine puts each new token id into
    `events`, then a Finished; any thread may set `cancelled`, and the engine frees the
    row before its next step."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    n_generated: int = 0
    # engine side: the row, the slot of the next token fed, the newest token, the sampler
    row: int = -1
    pos: int = 0
    last: int = 0
    generator: torch.Generator | None = None

    def cancel(self):
        self.cancelled = True


class Overloaded(Exception):
    """The waiting queue is full."""


class Engine:
    def __init__(self, model, vocab_size=None, max_batch=8, max_queue=64):
        if max_batch < 1 or max_queue < 1:
            raise NanoError(f"max_batch and max_queue must be >= 1 (got {max_batch}, {max_queue})")
        self.model, self.block_size = model, model.config.block_size
        self.device = model.lm_head.weight.device
        self.head = sample.LogitsHead(model, vocab_size, batch_size=1)  # a 1-row step gets the fast layout
        self.cache = sample.make_cache(model, max_batch, self.block_size)  # (max_batch, n_head, block, hd) per layer
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: queue.Queue = queue.Queue(max_queue)
        self.stats = {"steps": 0, "prefills": 0, "finished": 0, "cancelled": 0}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # -- the API the HTTP threads use
    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._thread.join(timeout=10)

    def submit(self, req: Request) -> Request:
        """Queue a request (checked first); its tokens then arrive in req.events."""
        error = sample.check_sampling(req.temperature, req.top_k, req.top_p, 1.0)
        if error:
            raise NanoError(error)
        if not req.prompt or req.max_tokens < 1 or len(req.prompt) + req.max_tokens > self.block_size:
            raise NanoError(f"prompt ({len(req.prompt)} tokens, at least 1) + max_tokens ({req.max_tokens}, at least 1) "
                            f"must fit in the context of {self.block_size} (shorten the prompt or lower max_tokens)")
        if self._stopping.is_set():
            raise Overloaded("the server is shutting down")
        try:
            self.waiting.put_nowait(req)
        except queue.Full:
            raise Overloaded(f"{self.waiting.maxsize} requests are already waiting") from None
        return req

    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    # -- the loop
    def _loop(self):
        while not self._stopping.is_set():
            try:
                for req in self.rows:  # a cancelled request's row is free before the next step
                    if req is not None and req.cancelled:
                        self._finish(req, "cancelled")
                self._admit(block=self.running() == 0)
                if self.running():
                    self._decode()
            except Exception as e:  # noqa: BLE001  a bug must not take the server down: fail what ran, go on
                traceback.print_exc()
                for req in self.rows:
                    if req is not None:
                        self._finish(req, "error", f"{type(e).__name__}: {e}")
        for req in self.rows:
            if req is not None:
                self._finish(req, "cancelled")
        while not self.waiting.empty():
            req = self.waiting.get_nowait()
            req.events.put(Finished("cancelled", 0))

    def _admit(self, block):
        """Move waiting requests into free rows, prefilling each (one after the other)."""
        while None in self.rows:
            try:
                req = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if req.cancelled:
                req.events.put(Finished("cancelled", 0))
                self.stats["cancelled"] += 1
                continue
            req.row, req.pos = self.rows.index(None), len(req.prompt)
            req.generator = sample._generator(req.seed, self.device)
            self.rows[req.row] = req
            try:
                ids = torch.tensor([req.prompt], device=self.device)  # (1, T)
                logits = sample.prefill(self.model, ids, self._views(slice(req.row, req.row + 1), len(req.prompt)),
                                        head=self.head)  # all T positions in one forward pass
            except Exception as e:  # noqa: BLE001  (e.g. out of memory): this request fails, the server goes on
                traceback.print_exc()
                self._finish(req, "error", f"{type(e).__name__}: {e}")
                continue
            self.stats["prefills"] += 1
            self._emit(req, self._sample(logits, [req])[0])

    def _decode(self):
        """One step for every running row. Rows 0..n-1 go through the model as one batch
        (n = the highest running row + 1: free rows below it compute a dummy token at slot
        0, harmless, since a new request overwrites its row from slot 0)."""
        running = [r for r in self.rows if r is not None]
        n = running[-1].row + 1
        tokens = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.zeros(n, dtype=torch.long)
        for r in running:
            tokens[r.row, 0], pos[r.row] = r.last, r.pos
        length = int(pos.max()) + 1  # attention reads slots 0..longest row, not the whole block
        logits = decode_step(self.model, tokens.to(self.device), pos.to(self.device),
                             self._views(slice(0, n), length), self.head)  # (n, V)
        self.stats["steps"] += 1
        rows = torch.tensor([r.row for r in running], device=self.device)
        for r, t in zip(running, self._sample(logits[rows], running)):
            r.pos += 1
            self._emit(r, t)

    def _views(self, rows, length):
        return [SlotCache(c.k[rows, :, :length], c.v[rows, :, :length]) for c in self.cache]

    def _sample(self, logits, reqs) -> list[int]:
        """(k, V) logits -> one token per request, each with its own settings and generator
        (so a seeded request samples the same tokens whatever else runs beside it)."""
        greedy = logits.argmax(dim=-1).tolist()
        return [greedy[i] if r.temperature == 0 else
                int(sample.sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator))
                for i, r in enumerate(reqs)]

    def _emit(self, req, token):
        req.n_generated += 1
        req.last = token
        if token in req.stop_ids:
            self._finish(req, "stop")
            return
        req.events.put(token)
        if req.n_generated >= req.max_tokens:
            self._finish(req, "length")

    def _finish(self, req, reason, error=None):
        self.rows[req.row] = None
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        req.events.put(Finished(reason, req.n_generated, error))


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


class Completion:
    """One generation from the client side (an HTTP thread or the terminal chat): submits
    the request, then `deltas()` yields text as tokens arrive. Leaving deltas() early, for
    any reason, cancels the request, which frees its row at the engine's next step."""

    def __init__(self, engine, tok, req: Request, stop=()):
        self.engine, self.req = engine, req
        self.text = TextStream(tok, stop)
        self.finish_reason, self.completion_tokens = None, 0
        engine.submit(req)

    def deltas(self, client_gone=lambda: False):
        checked = time.monotonic()
        try:
            while True:
                if time.monotonic() - checked > 0.05:  # a few cheap polls a second, even while tokens flow
                    if client_gone():
                        return
                    checked = time.monotonic()
                try:
                    event = self.req.events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(event, Finished):
                    if event.reason in ("error", "cancelled"):  # cancelled by the engine: it is stopping
                        raise RuntimeError(event.error or "the server is shutting down")
                    self.finish_reason, self.completion_tokens = event.reason, event.n_tokens
                    tail = self.text.flush()
                    if tail:
                        yield tail
                    return
                piece, stopped = self.text.push(event)
                if piece:
                    yield piece
                if stopped:
                    self.finish_reason, self.completion_tokens = "stop", len(self.text.ids)
                    return
        finally:
            self.cancel()

    def cancel(self):
        self.req.cancel()  # a no-op once the engine has finished it


# ----------------------------------------------------------------------------------------
# Chat templates: a conversation -> prompt ids


class PlainChatTemplate:
    """For base models: "User: ...\\nAssistant: ...\\n" lines, ending in "Assistant:", and
    "\\nUser:" as a stop string so the model does not write the user's next turn."""

    stop = ("\nUser:",)

    def __init__(self, tok):
        self.tok, self.stop_ids = tok, frozenset({tok.eot_id} if tok.eot_id is not None else ())

    def render(self, messages) -> list[int]:
        names = {"user": "User", "assistant": "Assistant"}
        text = "".join(m["content"] + "\n\n" if m["role"] == "system" else f"{names[m['role']]}: {m['content']}\n"
                       for m in messages)
        return self.tok.encode(text + "Assistant:")


class SFTChatTemplate:
    """The template a chat model was finetuned with (sft.py): <|role|> content <|end|> per
    message with the chat tokens of a "chat:" tokenizer (content encoded as plain text, so a
    user cannot forge a turn), or a Hugging Face model's own chat_template, rendered by
    tokenizer.apply_chat_template; the reply ends at <|end|> (or the template's eos)."""

    stop = ()

    def __init__(self, tok, hf_template):
        self.tok, self.hf_template = tok, hf_template
        self.stop_ids = frozenset({tokenizer.stop_id(tok, hf_template)})

    def render(self, messages) -> list[int]:
        return tokenizer.apply_chat_template(messages, self.tok, self.hf_template, add_generation_prompt=True)


def load_tokenizer(spec):
    """(tokenizer, chat template) for a checkpoint's tokenizer spec: the chat template of a
    model finetuned on conversations (sft.py's "chat:" spec) or of a tokenizer that brings a
    chat_template, else the plain one for base models."""
    if str(spec).startswith(tokenizer.CHAT_PREFIX) or tokenizer.HFChatTemplate.find(spec) is not None:
        tok, hf_template = tokenizer.load_chat(spec)
        return tok, SFTChatTemplate(tok, hf_template)
    tok = tokenizer.load_tokenizer(spec)
    return tok, PlainChatTemplate(tok)


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
        "seed": get_field(body, "seed", ["integer"]),
    }
    return options, [stop] if isinstance(stop, str) else stop, {
        "stream": get_field(body, "stream", ["boolean"], False),
        "include_usage": bool(stream_options.get("include_usage")),
        "ignore_eos": get_field(body, "ignore_eos", ["boolean"], False),  # vLLM's extension, for benchmarks
    }


# ----------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON replies; streams close the connection
    server_version = "nanollm"
    max_body = 1 << 20

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, fmt, *args):
        if self.server.log_requests:
            super().log_message(fmt, *args)

    def _dispatch(self, method):
        routes = {"/v1/chat/completions": ("POST", self.chat_completions), "/v1/completions": ("POST", self.completions),
                  "/v1/models": ("GET", self.models), "/health": ("GET", self.health),
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
            if path.startswith("/v1/") and key and \
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
        if length is None or not length.isdigit():
            self.close_connection = True
            raise APIError(411, "send the JSON body with a Content-Length header", code="length_required")
        if int(length) > self.max_body:
            self.close_connection = True
            raise APIError(413, f"the body is over {self.max_body} bytes", code="body_too_large")
        return self.rfile.read(int(length))

    @staticmethod
    def _json(raw):
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
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
        self._send_json(200, {"status": "ok", "model": self.server.model_name, "max_batch": len(engine.rows),
                              "running": engine.running(), "waiting": engine.waiting.qsize(),
                              "free_slots": len(engine.rows) - engine.running(), **engine.stats})

    def models(self, _):
        self._send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                          "created": self.server.created, "owned_by": "nanollm"}]})

    def page(self, _):
        payload = self.server.page
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def chat_completions(self, body):
        self._check_model(body)
        template = self.server.template
        ids = template.render(parse_messages(body))
        self._complete(body, ids, template.stop_ids, template.stop, chat=True)

    def completions(self, body):
        self._check_model(body)
        ids = parse_prompt(body, self.server.tok)
        if not ids:
            if self.server.tok.eot_id is None:
                raise APIError(400, "the prompt is empty (send at least one character)", param="prompt")
            ids = [self.server.tok.eot_id]  # an empty prompt starts a fresh document, as GPT-2 was trained
        eot = self.server.tok.eot_id
        self._complete(body, ids, frozenset({eot} if eot is not None else ()), (), chat=False)

    def _check_model(self, body):
        model = get_field(body, "model", ["string"])
        if model is not None and model != self.server.model_name:
            raise APIError(404, f"the model {model!r} does not exist (this server has {self.server.model_name!r})",
                           param="model", code="model_not_found")

    def _complete(self, body, ids, stop_ids, stop, chat):
        engine, tok = self.server.engine, self.server.tok
        options, user_stop, flags = parse_sampling(body, engine.block_size, len(ids))
        req = Request(ids, stop_ids=frozenset() if flags["ignore_eos"] else stop_ids, **options)
        try:
            comp = Completion(engine, tok, req, tuple(stop) + tuple(user_stop))
        except Overloaded as e:
            raise APIError(503, f"the server is busy ({e}; retry shortly)", kind="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.server.model_name}
        try:
            if flags["stream"]:
                self._stream(comp, head, chat, flags["include_usage"], len(ids))
            else:
                text = "".join(comp.deltas(self._client_gone))
                if comp.finish_reason is None:  # the client left
                    self.close_connection = True
                    return
                choice = {"index": 0, "finish_reason": comp.finish_reason, "logprobs": None,
                          **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
                self._send_json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                                      "choices": [choice], "usage": usage(len(ids), comp.completion_tokens)})
        finally:
            comp.cancel()

    def _stream(self, comp, head, chat, include_usage, n_prompt):
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

        if chat:
            send(chunk({"role": "assistant", "content": ""}))
        try:
            for piece in comp.deltas(self._client_gone):
                send(chunk({"content": piece}))
        except RuntimeError as e:  # the engine failed this request: say so in the stream
            send(APIError(500, str(e), kind="server_error").body())
        else:
            if comp.finish_reason is None:  # the client left
                return
            send(chunk({}, comp.finish_reason))
            if include_usage:
                send({**head, "object": kind, "choices": [], "usage": usage(n_prompt, comp.completion_tokens)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def usage(n_prompt, n_completion):
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection thread never keeps the process alive
    request_queue_size = 1024  # the listen backlog; socketserver's 5 resets connections in a burst

    def __init__(self, address, engine, tok, template=None, model_name="nanollm", api_key="", log_requests=True):
        super().__init__(address, Handler)
        self.engine, self.tok, self.template = engine, tok, template or PlainChatTemplate(tok)
        self.model_name, self.api_key, self.log_requests = model_name, api_key, log_requests
        self.created = int(time.time())
        self.page = (data.ASSETS / "chat.html").read_bytes()
        self.connections, self._lock = set(), threading.Lock()

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


def make_server(model, tok, host="127.0.0.1", port=0, max_batch=8, max_queue=64, **kwargs) -> Server:
    """A server (engine thread started) on host:port; port 0 picks a free one
    (server.server_address). Run it with serve_forever(); close() stops both."""
    if tok.vocab_size > model.config.vocab_size:
        raise NanoError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size} "
                        "(load the checkpoint's own tokenizer)")
    engine = Engine(model.eval(), tok.vocab_size, max_batch, max_queue).start()
    try:
        return Server((host, port), engine, tok, **kwargs)
    except OSError as e:
        engine.stop()
        raise NanoError(f"cannot listen on {host}:{port} ({e.strerror}; pick another --port)") from None


# ----------------------------------------------------------------------------------------
# Terminal chat


def chat_cli(engine, tok, template, cfg):
    """A read-eval-print loop over the same engine: /new starts over, /quit (or Ctrl-D)
    leaves, Ctrl-C stops the reply being written."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(system)
    print("nanollm chat (/new starts over, /quit leaves)", flush=True)
    while True:
        try:
            line = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/new":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = template.render(messages)
            room = engine.block_size - len(ids)
            if room < 1:
                print(f"[the conversation fills the context of {engine.block_size} tokens; /new starts over]")
                messages.pop()
                continue
            req = Request(ids, min(cfg.max_tokens, room), cfg.temperature, cfg.top_p, cfg.top_k or None,
                          stop_ids=template.stop_ids)
            comp = Completion(engine, tok, req, template.stop)
        except NanoError as e:
            print(f"[{e}]")
            messages.pop()
            continue
        print("assistant>", end="", flush=True)
        reply = []
        try:
            for piece in comp.deltas():
                reply.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            comp.cancel()
            print(" [stopped]", end="")
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})


# ----------------------------------------------------------------------------------------
# CLI


@dataclass
class ServeConfig:
    ckpt: str = field(default="out/ckpt.pt", metadata={"help": "checkpoint to serve (gpt.save_checkpoint)"})
    init_from: str = field(default="", metadata={"help": "gpt2 | gpt2-medium | ... or a Hugging Face directory, instead of --ckpt"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "port (0 = any free one)"})
    api_key: str = field(default="", metadata={"help": "require 'Authorization: Bearer <key>' on /v1/* (empty = open)"})
    max_batch: int = field(default=8, metadata={"help": "cache rows: requests decoded together in one step"})
    max_queue: int = field(default=64, metadata={"help": "requests that may wait for a row; beyond that: 503"})
    model_name: str = field(default="", metadata={"help": "the model's id in the API (empty: --init_from or the checkpoint's file name)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    log_requests: bool = field(default=True, metadata={"help": "print one line per HTTP request"})
    chat: bool = field(default=False, metadata={"help": "chat in the terminal instead of serving HTTP"})
    system: str = field(default="", metadata={"help": "--chat: system prompt"})
    max_tokens: int = field(default=256, metadata={"help": "--chat: longest reply in tokens"})
    temperature: float = field(default=0.8, metadata={"help": "--chat: 0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "--chat: nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "--chat: sample among the k most likely tokens (0 = all)"})


@common.cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):  # a bare `--chat` means `--chat True`
        if a == "--chat" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv[i:i + 1] = ["--chat", "True"]
    cfg = common.parse_config(ServeConfig, argv, __doc__)
    error = sample.check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, 1.0)
    if error:
        raise NanoError(error)
    if cfg.max_tokens < 1 or cfg.max_batch < 1 or cfg.max_queue < 1:
        raise NanoError("max_tokens, max_batch and max_queue must be >= 1")
    if not cfg.init_from and not Path(cfg.ckpt).is_file():
        raise NanoError(f"checkpoint {cfg.ckpt} not found (train one with train.py, or pass --init_from gpt2)")
    device = common.pick_device(cfg.device)
    model, spec = sample.load_model(cfg, device, common.pick_dtype(device, cfg.dtype))
    tok, template = load_tokenizer(spec)
    name = cfg.model_name or cfg.init_from or Path(cfg.ckpt).stem
    if cfg.chat:
        engine = Engine(model, tok.vocab_size, max_batch=1).start()
        try:
            chat_cli(engine, tok, template, cfg)
        finally:
            engine.stop()
        return
    server = make_server(model, tok, cfg.host, cfg.port, cfg.max_batch, cfg.max_queue, template=template,
                         model_name=name, api_key=cfg.api_key, log_requests=cfg.log_requests)
    host, port = server.server_address[:2]
    try:
        print(f"serving {name!r} on http://{host}:{port}/ (max_batch {cfg.max_batch}, {device}); Ctrl-C stops",
              flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:  # serve_forever ran in this thread and has returned: no shutdown() needed
        server.server_close()
        server.engine.stop()


if __name__ == "__main__":
    main()
