"""Continuous batching over a paged KV cache: an inference engine that schedules per step, behind an
OpenAI-compatible server (openai_api.py, which takes the engine as an argument) and a terminal chat.

The idea: iteration-level scheduling (Yu et al. 2022, "Orca") over PagedAttention (Kwon et al.
2023, arXiv:2309.06180, vLLM). sample.py generates a static batch: all rows start together and
run until the slowest is done, so a short answer's row sits idle and a late request waits for the
whole batch. A server schedules per step instead, in one engine thread that owns the model:
- the KV cache is a pool of fixed-size blocks (kv_blocks.py): a request holds a block table and
  takes blocks as it grows, so memory follows the tokens in flight, not max_batch x max_len;
  full blocks are named by a chained hash of their tokens, so a prompt that starts like an
  earlier one reuses its keys and skips that part of the prefill (prefix caching);
- the scheduler (scheduler.py) decides each step which requests compute how many tokens: one
  for every decoding request, chunks of waiting prompts in what is left of the token budget
  (chunked prefill: a long prompt does not stall the running streams); when blocks run out the
  newest request is preempted and recomputed later;
- each step is schedule -> run (ONE forward pass over all scheduled tokens: attention reads
  every request's keys through its block table) -> postprocess (a request whose tokens are all
  computed samples its next token; a finished one frees its blocks at once).
So a new request joins at the next step, and a finished one leaves the step it finishes.
In parallel: the client threads (openai_api.py: parse, tokenize, detokenize, stream) and all
tokens of one step (one forward reads each weight once for B tokens: decode is memory-bound).
In sequence: the engine's steps (step t+1 feeds the tokens sampled at step t).
On a CPU with AMX (bf16 matrix units) --dtype auto runs in bf16: products of 8+ rows are
several times faster than fp32 there. A quantize.py checkpoint (int8 weights) serves as is.

Run:
  python serve.py --ckpt out/ckpt.pt                 # then open http://127.0.0.1:8000/
  python serve.py --init_from gpt2 --max_num_seqs 16 --kv_mib 64 --api_key secret
  python serve.py --ckpt out-sft/ckpt.pt --chat      # a model from sft.py, in the terminal
  curl http://127.0.0.1:8000/metrics                 # running, waiting, KV blocks, TTFT, ...
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
import kv_blocks
import openai_api
import rag  # its bi-encoder answers /v1/embeddings (--embeddings)
import sample
import scheduler
import tokenizer
import tools
from common import NanoError

# ----------------------------------------------------------------------------------------
# The engine: one thread, the model, a paged KV cache, a scheduler


@dataclass
class Finished:
    """The last event of a request: why it ended, and how many tokens it generated."""
    reason: str  # "stop" (end token), "length" (max_tokens), "cancelled", "error"
    n_tokens: int
    error: str | None = None


@dataclass(eq=False)  # compared by identity
class Request:
    """One generation as the engine sees it: each new token id goes into `events`, then a
    Finished; any thread may set `cancelled` (the engine frees its blocks before its next step)."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    constraint: object = None  # a forced tool call (tools.CallConstraint): tokens outside its grammar masked
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    n_generated: int = 0
    # engine side: prompt + generated ids, how many have cached keys, the block table, the sampler
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrived: float = 0.0  # monotonic times, for TTFT and inter-token latency
    last_time: float = 0.0

    def cancel(self):
        self.cancelled = True


class Overloaded(queue.Full):
    """The waiting queue is full (or the engine is stopping): try again shortly."""


class Engine:
    """The engine: max_num_seqs requests at most decode together, max_num_batched_tokens tokens at
    most in one forward pass; the KV cache is kv_mib MiB of block_size-token blocks (None: as much as
    a static cache of max_num_seqs full contexts would take)."""

    def __init__(self, model, vocab_size=None, max_num_seqs=8, max_queue=64, max_num_batched_tokens=512,
                 block_size=16, kv_mib=None, prefix_caching=True):
        if max_queue < 1:
            raise NanoError(f"max_queue must be >= 1 (got {max_queue})")
        self.model, self.block_size = model, model.config.block_size
        self.device = model.transformer.wte.weight.device
        self.head = sample.LogitsHead(model, vocab_size, batch_size=1)  # a 1-row step gets the fast layout
        dtype = model.transformer.wte.weight.dtype
        num_blocks = (max_num_seqs * -(-self.block_size // block_size) if kv_mib is None else
                      int(kv_mib * 2**20 // (sample.kv_bytes_per_token(model.config, dtype) * block_size)))
        self.blocks = kv_blocks.BlockManager(num_blocks, block_size, prefix_caching)
        self.kv = kv_blocks.PagedKV(model, num_blocks, block_size, dtype)
        self.scheduler = scheduler.Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.max_num_seqs = max_num_seqs
        self.waiting: queue.Queue = queue.Queue(max_queue)  # the inbox: HTTP threads put, the engine takes
        self.metrics = openai_api.Metrics()
        self.stats = {"steps": 0, "prefills": 0, "finished": 0, "cancelled": 0}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self.loop, name="engine", daemon=True)

    # -- the API the HTTP threads use
    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        if self._thread.is_alive():
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
        if self.blocks.blocks_for(len(req.prompt) + req.max_tokens) > self.blocks.num_blocks:
            raise NanoError(f"prompt + max_tokens ({len(req.prompt) + req.max_tokens}) exceed the whole KV cache "
                            f"({self.blocks.num_blocks} blocks of {self.blocks.block_size}; raise --kv_mib)")
        if self._stopping.is_set():
            raise Overloaded("the server is shutting down")
        req.arrived = time.monotonic()
        try:
            self.waiting.put_nowait(req)
        except queue.Full:
            raise Overloaded(f"{self.waiting.maxsize} requests are already waiting") from None
        return req

    def complete(self, tok, prompt, stop_ids=frozenset(), stop=(), **sampling) -> Completion:
        """Submit prompt ids (sampling: Request's fields); the text comes from the Completion."""
        return Completion(self, tok, Request(prompt, stop_ids=stop_ids, **sampling), stop)

    def running(self) -> int:
        return len(self.scheduler.running)

    # -- the loop: one step after another
    def step(self, block=False):
        """One iteration, nano-vllm's schedule -> run -> postprocess. Schedule: new requests in,
        cancelled ones out, then the scheduler picks (request, tokens) pairs. Run: one forward
        pass over all of them. Postprocess: a request whose tokens are all computed samples its
        next one; a finished request frees its blocks."""
        self._take_new(block)
        batch = self.scheduler.schedule()
        if not batch:
            return
        try:
            self.postprocess(batch, self.run(batch))
        except Exception:  # noqa: BLE001  which request broke the batch is unknowable: each alone
            traceback.print_exc()
            for r, n in batch:
                try:
                    self.postprocess([(r, n)], self.run([(r, n)]))
                except Exception as e:  # noqa: BLE001  this one fails, the others went on
                    self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _take_new(self, block):
        """Cancelled requests out; requests from the inbox into the scheduler (block: wait briefly)."""
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            if req.cancelled:
                self._finish(req, "cancelled")
        while len(self.scheduler.waiting) < self.max_num_seqs:
            try:
                req = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if req.cancelled:
                req.events.put(Finished("cancelled", 0))
                self.stats["cancelled"] += 1
                continue
            req.generator = sample.sample_generator(req.seed, self.device)  # (the seed was checked by submit)
            req.tokens = list(req.prompt)
            self.scheduler.add(req)

    def run(self, batch):
        """One forward pass over [(request, n tokens)] -> the logits (k, V) of the k requests whose
        tokens are now all computed. All decoding (1 token each): one row per request, keys
        gathered per row; else one row of every request's tokens side by side (a block-diagonal
        causal mask keeps requests apart): no padding of prompts to the longest."""
        segments = [(r.tokens[r.num_computed:r.num_computed + n], r.num_computed, r.table) for r, n in batch]
        decode = all(n == 1 for _, n in batch)
        rows = [[i] for i in range(len(batch))] if decode else [list(range(len(batch)))]
        idx, pos, mask, views = self.kv.batch(segments, rows, self.model.config.sliding_window)
        if self.model.config.attn_impl != "naive":  # SDPA adds a float mask: made once here, not in every layer
            mask = torch.zeros(mask.shape, dtype=self.kv.k[0].dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        with torch.no_grad():
            hidden = self.model.hidden_states(idx, kv_cache=views, input_pos=pos, position_ids=pos, attn_mask=mask)
        ends = [i for i, (r, n) in enumerate(batch) if r.num_computed + n == len(r.tokens)]
        last = (torch.tensor([n for _, n in batch]).cumsum(0) - 1)[ends]  # each one's last token, flat
        self.stats["steps"] += 1
        return self.head(hidden.flatten(0, 1)[last.to(self.device)]) if ends else None

    def postprocess(self, batch, logits):
        done = [r for r, n in batch if self.scheduler.computed(r, n)]
        now = time.monotonic()
        self.metrics.step(batch, now)
        self.stats["prefills"] += sum(r.n_generated == 0 for r in done)
        for r, token in zip(done, self._sample(logits, done) if done else []):
            if token is not None:  # None: its sampling failed and finished it
                self._emit(r, token, now)

    def loop(self):
        """Step until stop() (or Ctrl-C here): the engine thread's body. serve.py's main runs it in
        the main thread instead, where OpenMP's workers serve it best (a bf16 16-row decode ran 1.4x
        faster there than from another thread, measured; the HTTP threads only wait and write)."""
        try:
            while not self._stopping.is_set():
                try:
                    self.step(block=self.running() == 0 and not self.scheduler.waiting)
                except Exception as e:  # noqa: BLE001  a bug must not take the server down: fail what ran, go on
                    traceback.print_exc()
                    for req in [*self.scheduler.running, *self.scheduler.waiting]:
                        self._finish(req, "error", f"{type(e).__name__}: {e}")
        finally:
            self._stopping.set()
            for req in [*self.scheduler.running, *self.scheduler.waiting]:
                self._finish(req, "cancelled")
            while not self.waiting.empty():
                req = self.waiting.get_nowait()
                req.events.put(Finished("cancelled", 0))

    def _sample(self, logits, reqs) -> list[int | None]:
        """(k, V) logits -> one token per request, each with its own settings and generator
        (so a seeded request samples the same tokens whatever else runs beside it). A request
        whose sampling fails (NaN logits, say) is finished with the error: None in its place."""
        greedy = logits.max(dim=-1).indices.tolist()  # = argmax (the first maximum), ~2.5x faster on a CPU
        tokens = []
        for i, r in enumerate(reqs):
            try:
                row = logits[i:i + 1]
                if r.constraint is not None:  # a forced tool call: only its grammar's tokens
                    row = row.masked_fill(~r.constraint.allowed().to(row.device), float("-inf"))
                    greedy[i] = int(row.argmax())
                tokens.append(greedy[i] if r.temperature == 0 else
                              int(sample.sample_next(row, r.temperature, r.top_k, r.top_p, r.generator)))
                if r.constraint is not None:
                    r.constraint.advance(tokens[-1])
            except Exception as e:  # noqa: BLE001  this request fails, the others go on
                self._finish(r, "error", f"{type(e).__name__}: {e}")
                tokens.append(None)
        return tokens

    def _emit(self, req, token, now):
        self.metrics.token(req, now)
        req.n_generated += 1
        req.tokens.append(token)
        if token in req.stop_ids:
            self._finish(req, "stop")
            return
        req.events.put(token)
        if req.n_generated >= req.max_tokens:
            self._finish(req, "length")

    def _finish(self, req, reason, error=None):
        self.scheduler.finish(req)
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        req.events.put(Finished(reason, req.n_generated, error))

    def prometheus(self) -> str:
        """GET /metrics: vLLM's gauges and histograms, in Prometheus' text format."""
        gauges = self.scheduler.gauges()
        gauges["num_requests_waiting"] += self.waiting.qsize()  # the inbox too
        return self.metrics.text(gauges)


# ----------------------------------------------------------------------------------------
# The client side: a request's tokens back to text (openai_api.TextStream holds back stop strings)


class Completion:
    """A request from the client side (an HTTP thread, the terminal chat): deltas() yields text as
    tokens arrive; leaving it early, for any reason, cancels the request (its row frees next step)."""

    def __init__(self, engine, tok, req: Request, stop=()):
        self.engine, self.req = engine, req
        self.text = openai_api.TextStream(tok, stop)
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


def make_server(model, tok, host="127.0.0.1", port=0, engine_args=None, start_engine=True, **kwargs) -> openai_api.Server:
    """An OpenAI-compatible server on host:port (0: any free port), its engine thread started (with
    start_engine False, run server.engine.loop() yourself); run it with serve_forever(). engine_args:
    Engine's keywords (max_num_seqs, kv_mib...); kwargs: openai_api.Server's (template, model_name, ...)."""
    if tok.vocab_size > model.config.vocab_size:
        raise NanoError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size} "
                        "(load the checkpoint's own tokenizer)")
    engine = Engine(model.eval(), tok.vocab_size, **(engine_args or {}))
    return openai_api.make_server(engine.start() if start_engine else engine, tok, host, port, **kwargs)


# ----------------------------------------------------------------------------------------
# CLI: the terminal chat (--chat) or the HTTP server


def chat_cli(engine, tok, template, cfg):
    """A read-eval-print loop over the same engine: /new starts over, /quit (or Ctrl-D)
    leaves, Ctrl-C stops the reply being written. A model that calls tools (sft.py --tasks
    calculator, or a template that writes tool calls) gets the calculator: each call is run
    (tools.run_tool_call), shown with its result, and the result fed back for the answer."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(system)
    fmt = tools.tool_format(template)
    calculator = [tools.CALCULATOR_TOOL] if tools.calls_tools(tok, template) else None
    print("nanollm chat (/new starts over, /quit leaves)" + (" with a calculator" if calculator else ""), flush=True)
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
        turn = [{"role": "user", "content": line}]
        for _ in range(3):  # a reply, and up to two more after tool results
            reply = chat_reply(engine, tok, template, tools.normalize_messages(messages + turn, fmt), cfg, calculator)
            content, calls = tools.parse_tool_calls(reply, fmt) if calculator and reply else (reply, [])
            if not calls:
                break
            turn.append({"role": "assistant", "content": content, "tool_calls": calls})
            for call in calls:
                result = tools.run_tool_call(call, {"calculator": tools.calculator_text})
                print(f"[{call['function']['name']}({call['function']['arguments']}) -> {result}]", flush=True)
                turn.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        if reply is not None:  # None: the reply could not start (said why); the turn is dropped
            messages += turn + [{"role": "assistant", "content": reply}]


def chat_reply(engine, tok, template, messages, cfg, tool_list=None) -> str | None:
    """One assistant reply, printed as it streams; None (and why) when it cannot start."""
    try:
        ids = template.render(messages, tools=tool_list) if tool_list else template.render(messages)
        room = engine.block_size - len(ids)
        if room < 1:
            raise NanoError(f"the conversation fills the context of {engine.block_size} tokens; /new starts over")
        comp = engine.complete(tok, ids, template.stop_ids, template.stop, max_tokens=min(cfg.max_tokens, room),
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    except NanoError as e:
        print(f"[{e}]")
        return None
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
    return "".join(reply)


@dataclass
class ServeConfig:
    ckpt: str = field(default="out/ckpt.pt", metadata={"help": "checkpoint to serve (gpt.save_checkpoint)"})
    init_from: str = field(default="", metadata={"help": "gpt2 | gpt2-medium | ... or a Hugging Face directory, instead of --ckpt"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "port (0 = any free one)"})
    api_key: str = field(default="", metadata={"help": "require 'Authorization: Bearer <key>' on /v1/* (empty = open)"})
    max_num_seqs: int = field(default=16, metadata={"help": "requests running together (decoded in one step)"})
    max_num_batched_tokens: int = field(default=512, metadata={"help": "tokens in one forward pass (prefill chunks)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    kv_mib: float = field(default=0, metadata={"help": "KV cache size in MiB (0: max_num_seqs full contexts)"})
    prefix_caching: bool = field(default=True, metadata={"help": "reuse the KV blocks of shared prompt prefixes"})
    prepack: bool = field(default=True, metadata={"help": "CPU: weights reordered once for oneDNN (sample.PackedLinear)"})
    max_queue: int = field(default=64, metadata={"help": "requests that may wait in the inbox; beyond that: 503"})
    model_name: str = field(default="", metadata={"help": "the model's id in the API (empty: --init_from or the checkpoint's file name)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on a GPU, or a CPU with AMX) | float32 | bfloat16 | float16"})
    embeddings: str = field(default="", metadata={"help": "a rag.py encoder checkpoint: also serve POST /v1/embeddings"})
    log_requests: bool = field(default=True, metadata={"help": "print one line per HTTP request"})
    chat: bool = field(default=False, metadata={"help": "chat in the terminal instead of serving HTTP"})
    system: str = field(default="", metadata={"help": "--chat: system prompt"})
    max_tokens: int = field(default=256, metadata={"help": "--chat: longest reply in tokens"})
    temperature: float = field(default=0.8, metadata={"help": "--chat: 0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "--chat: nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "--chat: sample among the k most likely tokens (0 = all)"})


def pick_dtype(device, name="auto") -> torch.dtype:
    """common.pick_dtype, but auto on a CPU with AMX (bf16 matrix units; detected, and said) is bf16."""
    if name == "auto" and device == "cpu" and torch.cpu._is_amx_tile_supported():
        print("dtype auto: bfloat16 (this CPU has AMX bf16 matrix units)", flush=True)
        return torch.bfloat16
    return common.pick_dtype(device, name)


@common.cli
def main(argv=None):
    cfg = common.parse_config(ServeConfig, argv, __doc__)  # (a bare --chat means --chat True)
    error = sample.check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, 1.0)
    if error:
        raise NanoError(error)
    if min(cfg.max_tokens, cfg.max_num_seqs, cfg.max_queue, cfg.max_num_batched_tokens, cfg.block_size) < 1:
        raise NanoError("max_tokens, max_num_seqs, max_num_batched_tokens, block_size and max_queue must be >= 1")
    if not cfg.init_from and not Path(cfg.ckpt).is_file():
        raise NanoError(f"checkpoint {cfg.ckpt} not found (train one with train.py, or pass --init_from gpt2)")
    device = common.pick_device(cfg.device)
    model, spec = sample.load_model(cfg, device, pick_dtype(device, cfg.dtype))
    if cfg.prepack:  # several rows per product: oneDNN's blocked weights are faster (a no-op off CPU)
        sample.pack_linears(model, cfg.max_num_seqs)
    tok, template = tokenizer.load_chat_template(spec)
    name = cfg.model_name or cfg.init_from or Path(cfg.ckpt).stem
    args = dict(max_num_seqs=cfg.max_num_seqs, max_queue=cfg.max_queue, max_num_batched_tokens=cfg.max_num_batched_tokens,
                block_size=cfg.block_size, kv_mib=cfg.kv_mib or None, prefix_caching=cfg.prefix_caching)
    if cfg.chat:
        engine = Engine(model, tok.vocab_size, **args).start()
        try:
            chat_cli(engine, tok, template or openai_api.PlainChatTemplate(tok), cfg)
        finally:
            engine.stop()
        return
    server = make_server(model, tok, cfg.host, cfg.port, args, start_engine=False, template=template,
                         model_name=name, api_key=cfg.api_key, log_requests=cfg.log_requests,
                         embedder=rag.Encoder.load(cfg.embeddings, device) if cfg.embeddings else None)
    host, port = server.server_address[:2]
    http = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    try:
        blocks = server.engine.blocks
        print(f"serving {name!r} on http://{host}:{port}/ ({device}, {next(model.parameters()).dtype}, max_num_seqs "
              f"{cfg.max_num_seqs}, KV cache {blocks.num_blocks} blocks of {blocks.block_size}); Ctrl-C stops", flush=True)
        http.start()
        server.engine.loop()  # the engine steps in the main thread (Engine.loop says why)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        if http.is_alive():
            server.shutdown()  # serve_forever returns
        server.server_close()
        server.engine.stop()


if __name__ == "__main__":
    main()
