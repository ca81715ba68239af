"""Continuous batching: an inference engine that schedules per decode step, behind an
OpenAI-compatible server (openai_api.py, which takes the engine as an argument) and a terminal chat.

The idea: iteration-level scheduling (Yu et al. 2022, "Orca"; the scheduler of vLLM, Kwon
et al. 2023, arXiv:2309.06180). sample.py generates a static batch: all rows start together
and run until the slowest is done, so a short answer's row sits idle and a late request
waits for the whole batch. A server schedules per decode step instead:
- one engine thread owns the model and a static KV cache of --max_batch rows (slots);
- every row has its own length: the token at position p of row b lives in cache slot p of
  row b, so per-row position ids and a per-row attention mask (slot <= the row's own
  position) let rows of different lengths share one forward pass;
- each engine step: retire cancelled requests, admit waiting requests into free rows
  (prefill each), then ONE decode step for every running request at once;
- so a new request joins the running batch at the step after its prefill, and a finished
  one leaves at the step it finishes, its row free at once; nobody waits for the slowest.
In parallel: the client threads (openai_api.py: one per connection; parse, tokenize, turn
tokens back into text, stream); all positions of one prompt inside its prefill (one forward
pass, big matmuls, compute-bound); all running requests inside a decode step (one B-row
forward reads each weight once for B tokens; decode is memory-bound, so B rows cost little
more than one until the matmuls turn compute-bound, at hundreds of rows on a GPU and far
fewer on a CPU: that is where the throughput comes from).
In sequence: the engine's steps (step t+1 feeds the tokens sampled at step t); the prefills
of several new requests, each stalling the running requests' decode step for its duration
(vLLM's chunked prefill bounds that stall by splitting long prompts; not done here).
The cache is allocated once, --max_batch rows of block_size slots; vLLM's PagedAttention
hands out cache blocks on demand instead, so short requests do not reserve a full row.

Run:
  python serve.py --ckpt out/ckpt.pt                 # then open http://127.0.0.1:8000/
  python serve.py --init_from gpt2 --max_batch 16 --api_key secret
  python serve.py --ckpt out-sft/ckpt.pt --chat      # a model from sft.py, in the terminal
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
import openai_api
import rag  # its bi-encoder answers /v1/embeddings (--embeddings)
import sample
import tokenizer
from common import NanoError

# ----------------------------------------------------------------------------------------
# A KV cache whose rows have different lengths


class SlotCache:
    """One layer's keys and values (rows, n_kv_head, slots, head_dim): a view of the engine's buffers
    (sample.make_cache). sample.KVCache writes all rows at the same slots (left padding aligns them);
    here input_pos is (rows, T): each row writes at its own positions, so any lengths decode in one step."""

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


class Overloaded(queue.Full):
    """The waiting queue is full (or the engine is stopping): try again shortly."""


class Engine:
    def __init__(self, model, vocab_size=None, max_batch=8, max_queue=64):
        if max_batch < 1 or max_queue < 1:
            raise NanoError(f"max_batch and max_queue must be >= 1 (got {max_batch}, {max_queue})")
        self.model, self.block_size = model, model.config.block_size
        self.device = model.transformer.wte.weight.device
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
        if req.seed is not None and not -2**63 <= req.seed < 2**64:
            raise NanoError(f"seed {req.seed} does not fit a 64-bit generator (use -2**63 <= seed < 2**64)")
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

    def complete(self, tok, prompt, stop_ids=frozenset(), stop=(), **sampling) -> Completion:
        """Submit prompt ids (sampling: Request's fields); the text comes from the Completion."""
        return Completion(self, tok, Request(prompt, stop_ids=stop_ids, **sampling), stop)

    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    # -- the loop: one step after another
    def step(self, block=False):
        """One iteration, nano-vllm's schedule -> run -> postprocess. Schedule: free cancelled
        requests' rows, admit waiting requests into free rows (each prefilled, its first token
        sampled; block: wait briefly for one). Run: one decode step for every running row.
        Postprocess: each row's token goes to its request; a finished request frees its row."""
        for req in self.rows:  # a cancelled request's row is free before the next step
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")
        self._admit(block)
        running = [r for r in self.rows if r is not None]
        if running:
            try:
                self._postprocess(running, self._decode(running))  # logits (len(running), V)
            except Exception:  # noqa: BLE001  which row broke the batch is unknowable: each alone
                traceback.print_exc()
                for r in running:
                    try:
                        self._postprocess([r], self._decode([r]))
                    except Exception as e:  # noqa: BLE001  this one: it fails, the others went on
                        self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _postprocess(self, reqs, logits):
        for r, token in zip(reqs, self._sample(logits, reqs)):
            if token is not None:  # None: its sampling failed and finished it
                self._emit(r, token)

    def _loop(self):
        while not self._stopping.is_set():
            try:
                self.step(block=self.running() == 0)
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
            self.rows[req.row] = req
            try:
                req.generator = sample.sample_generator(req.seed, self.device)
                ids = torch.tensor([req.prompt], device=self.device)  # (1, T)
                logits = sample.prefill(self.model, ids, self.views(slice(req.row, req.row + 1), len(req.prompt)),
                                        head=self.head)  # all T positions in one forward pass
            except Exception as e:  # noqa: BLE001  (e.g. out of memory): this request fails, the server goes on
                traceback.print_exc()
                self._finish(req, "error", f"{type(e).__name__}: {e}")
                continue
            self.stats["prefills"] += 1
            self._postprocess([req], logits)

    def _decode(self, running):
        """One step for these running rows (sorted by row) -> their logits. Rows lo..hi go through
        the model as one batch (free rows between them compute a dummy token at slot 0, harmless,
        since a new request overwrites its row from slot 0)."""
        lo, hi = running[0].row, running[-1].row + 1
        tokens = torch.zeros(hi - lo, 1, dtype=torch.long)
        pos = torch.zeros(hi - lo, dtype=torch.long)
        for r in running:
            tokens[r.row - lo, 0], pos[r.row - lo] = r.last, r.pos
        length = int(pos.max()) + 1  # attention reads slots 0..longest row, not the whole block
        logits = decode_step(self.model, tokens.to(self.device), pos.to(self.device),
                             self.views(slice(lo, hi), length), self.head)  # (hi - lo, V)
        self.stats["steps"] += 1
        for r in running:  # each fed token is cached now: the next one goes one slot further
            r.pos += 1
        return logits[torch.tensor([r.row - lo for r in running], device=self.device)]

    def views(self, rows, length):
        """The cache of these rows (a slice), slots 0..length-1, as one SlotCache per layer."""
        return [SlotCache(c.k[rows, :, :length], c.v[rows, :, :length]) for c in self.cache]

    def _sample(self, logits, reqs) -> list[int | None]:
        """(k, V) logits -> one token per request, each with its own settings and generator
        (so a seeded request samples the same tokens whatever else runs beside it). A request
        whose sampling fails (NaN logits, say) is finished with the error: None in its place."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, r in enumerate(reqs):
            try:
                tokens.append(greedy[i] if r.temperature == 0 else
                              int(sample.sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)))
            except Exception as e:  # noqa: BLE001  this request fails, the others go on
                self._finish(r, "error", f"{type(e).__name__}: {e}")
                tokens.append(None)
        return tokens

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
    """A request from the client side (an HTTP thread, the terminal chat): deltas() yields text as
    tokens arrive; leaving it early, for any reason, cancels the request (its row frees next step)."""

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
# The server: the engine behind openai_api's HTTP handler (chat templates: tokenizer.ChatTemplate
# for chat models, openai_api.PlainChatTemplate for base models)


def make_server(model, tok, host="127.0.0.1", port=0, max_batch=8, max_queue=64, **kwargs) -> openai_api.Server:
    """An OpenAI-compatible server (engine thread started) on host:port (0: any free port); run it
    with serve_forever(), close() stops both. kwargs: openai_api.Server's (template, model_name, ...)."""
    if tok.vocab_size > model.config.vocab_size:
        raise NanoError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size} "
                        "(load the checkpoint's own tokenizer)")
    engine = Engine(model.eval(), tok.vocab_size, max_batch, max_queue).start()
    return openai_api.make_server(engine, tok, host, port, **kwargs)


# ----------------------------------------------------------------------------------------
# CLI: the terminal chat (--chat) or the HTTP server


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
                raise NanoError(f"the conversation fills the context of {engine.block_size} tokens; /new starts over")
            comp = engine.complete(tok, ids, template.stop_ids, template.stop, max_tokens=min(cfg.max_tokens, room),
                                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
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
    embeddings: str = field(default="", metadata={"help": "a rag.py encoder checkpoint: also serve POST /v1/embeddings"})
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
    tok, template = tokenizer.load_chat_template(spec)
    name = cfg.model_name or cfg.init_from or Path(cfg.ckpt).stem
    if cfg.chat:
        engine = Engine(model, tok.vocab_size, max_batch=1).start()
        try:
            chat_cli(engine, tok, template or openai_api.PlainChatTemplate(tok), cfg)
        finally:
            engine.stop()
        return
    server = make_server(model, tok, cfg.host, cfg.port, cfg.max_batch, cfg.max_queue, template=template,
                         model_name=name, api_key=cfg.api_key, log_requests=cfg.log_requests,
                         embedder=rag.Encoder.load(cfg.embeddings, device) if cfg.embeddings else None)
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
