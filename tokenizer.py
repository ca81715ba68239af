"""Tokenizers by spec, chat templates, bpe.py's files (trained on a file, saved, read), and the formats of others.

A checkpoint records its tokenizer as a spec, and `load_tokenizer(spec)` reads it:
- "gpt2" (also r50k_base, p50k_base, cl100k_base, o200k_base): tiktoken; GPT-2's files ship in assets/,
  so "gpt2" works offline;
- "char:<alphabet>": one id per character of the alphabet;
- "chat:<base spec>": the base tokenizer plus sft.py's four chat tokens; "chat:tools:<base spec>" also
  <|tool_call|> and <|tool_result|> (a model that calls tools);
- a path to a tokenizer saved by bpe.py, or to a Hugging Face tokenizer.json: byte-level BPE
  (GPT-2, Llama 3, Qwen2/3, SmolLM; read into a bpe.Tokenizer) or SentencePiece-style BPE (Llama 2,
  Mistral 7B, TinyLlama, Gemma: Metaspace, Prepend/Replace, byte fallback; SentencePieceTokenizer),
  also the character-level tokenizer.json export.py writes, and Unigram models (T5-style; unigram.py).
A file-based tokenizer travels inside the checkpoint (gpt.py's `pack_tokenizer`, `unpack_tokenizer`).

Chat templates, the tokenizer side (transformers keeps it on the tokenizer: apply_chat_template):
a conversation rendered to ids with nanollm's <|role|> content <|end|> (`chat_pieces`) or a
Hugging Face model's Jinja chat_template, rendered to one text and tokenized once, so the ids are
transformers' (tests/test_chat_templates.py: Llama 3.1, Qwen2.5/3, Mistral, Gemma, Phi), also with
OpenAI `tools`, assistant `tool_calls` and `tool` messages (apply_chat_template(..., tools=tools)). sft.py
masks the loss by character spans (`HFChatTemplate.answer_spans`, `token_spans`); the tokens that
end a reply come from tokenizer_config.json's eos_token and generation_config.json (`stop_ids`).

bpe.py's own tokenizers: trained on a file of any size (`train_bpe_file`: pre-tokens counted in
pieces cut at special tokens, by a process pool), saved and read as a human-readable
"nanollm-bpe v1" file with a .vocab listing beside it (`save_bpe`, `read_bpe`).

The formats of others, read into (and written from) bpe.py's Tokenizer with the ids of tiktoken
and of `tokenizers`: OpenAI's GPT-2 files (vocab.bpe + encoder.json), any tiktoken encoding
(only ranks: the merges are recovered with bpe.merge_by_rank), Hugging Face tokenizer.json
files of byte-level BPE models (GPT-2, Llama 3, Qwen2/3, SmolLM); SentencePiece-style ones are read
into SentencePieceTokenizer (CharBPE: merges over characters, bpe.apply_merges).

Run (`python bpe.py ...` runs the same command line):
    python tokenizer.py train --input input.txt --vocab_size 4096 --out tok.bpe
    python tokenizer.py encode --tokenizer gpt2 "Hello world"   (or a bpe.py file, a tokenizer.json)
    python tokenizer.py compare --input input.txt --tokenizer tok.bpe   (GPT-2, cl100k and yours)

This file imports `common` and `bpe`.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import hashlib
import json
import os
import re
import time
import unicodedata
from collections import Counter
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import regex

import bpe
import unigram
from bpe import ENDOFTEXT, GPT2_PATTERN, PATTERNS, PREFIX_SPACE, render_token
from common import NanoError, atomic_write, cli

ASSETS = Path(__file__).resolve().parent / "assets"
# GPT-2's BPE files laid out as tiktoken's cache (each named by the sha1 of its URL), so
# TIKTOKEN_CACHE_DIR=assets/tiktoken_cache also makes plain tiktoken work offline
TIKTOKEN_CACHE = ASSETS / "tiktoken_cache"
GPT2_VOCAB_BPE = TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"  # vocab.bpe: merges in rank order
GPT2_ENCODER_JSON = TIKTOKEN_CACHE / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"  # encoder.json: token -> id
GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"  # tiktoken's check
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")


# ----------------------------------------------------------------------------------------
# Tokenizers: "gpt2" (tiktoken), "char:<alphabet>", a bpe.py file or a tokenizer.json, "chat:..."


class CharTokenizer:
    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.stoi = {ch: i for i, ch in enumerate(alphabet)}
        self.vocab_size = len(alphabet)
        self.eot_id = None
        self.spec = "char:" + alphabet

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise NanoError(f"character {e.args[0]!r} is not in the model's alphabet") from None

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


@functools.lru_cache(maxsize=None)
def tiktoken_encoding(name: str):
    """tiktoken's encoding `name`. GPT-2's is built from the shipped encoder.json (its ids are
    tiktoken's ranks), so it needs no network and writes nothing to tiktoken's cache; the others
    are downloaded into tiktoken's cache the first time."""
    import tiktoken

    if name != "gpt2":
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # a download that failed: tiktoken raises requests' errors
            raise NanoError(f"could not load tiktoken's {name!r} ({e.__class__.__name__}; "
                            "check the network, or use 'gpt2', which ships with nanollm)") from None
    raw = GPT2_ENCODER_JSON.read_bytes()
    if hashlib.sha256(raw).hexdigest() != GPT2_ENCODER_SHA256:
        raise NanoError(f"{GPT2_ENCODER_JSON} is not GPT-2's encoder.json (restore it: git checkout assets)")
    ranks = {from_alphabet(token): i for token, i in json.loads(raw).items() if token != ENDOFTEXT}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


class TiktokenTokenizer:
    def __init__(self, name="gpt2"):
        self.enc = tiktoken_encoding(name)
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token
        self.spec = name

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(list(ids))


class BPEFileTokenizer:
    """A tokenizer saved by bpe.py, or a Hugging Face tokenizer.json (a path ending in .json)
    read into a bpe.Tokenizer."""

    def __init__(self, path):
        with self.as_nano_error():
            self.tok = bpe_from_tokenizer_json(path) if str(path).endswith(".json") else read_bpe(path)
        self.vocab_size, self.eot_id = self.tok.vocab_size, self.tok.eot_id
        self.spec = str(path)

    @contextlib.contextmanager
    def as_nano_error(self):
        try:
            yield
        except bpe.BPEError as e:  # bpe.py imports nothing of ours: its errors become NanoErrors here
            raise NanoError(str(e)) from None

    def encode(self, text):
        with self.as_nano_error():
            return self.tok.encode(text, allowed_special="all")

    def token_bytes(self, i) -> bytes:
        return self.tok.decode_bytes([i])

    def decode(self, ids):
        with self.as_nano_error():
            return self.tok.decode(list(ids))


ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # ids: base vocab_size + 0..3
TOOL_TOKENS = ("<|tool_call|>", "<|tool_result|>")  # "chat:tools:" specs only: ids base vocab_size + 4, 5
CHAT_PREFIX = "chat:"
# a chat tokenizer with the tool tokens too: its own spec prefix, so a "chat:" checkpoint (4 chat
# tokens, vocab = base + 4) loads as it always did, and a tool model's spec says that it has 6
TOOLS_PREFIX = CHAT_PREFIX + "tools:"


class ChatTokenizer:
    """A base tokenizer (load_tokenizer) with the chat tokens appended after its
    vocabulary, ids base.vocab_size + 0..3. Spec "chat:<base spec>". With tools=True also
    <|tool_call|> and <|tool_result|> (ids + 4, + 5), spec "chat:tools:<base spec>": an assistant
    turn that calls a tool is <|assistant|><|tool_call|>{"name": ..., "arguments": {...}}<|end|>,
    a tool's result <|tool_result|>content<|end|> (chat_pieces). eot_id is <|end|>, so
    sample.py --stop_at_eot and dpo.py (which appends eot_id to answers) end an assistant
    turn where the template does. encode() turns the special strings in a text into their
    ids (a prompt typed for sample.py / dpo.py works); encode_ordinary() never does: the
    template uses it for content."""

    def __init__(self, base, tools=False):
        if base.spec.startswith(CHAT_PREFIX):
            raise NanoError(f"tokenizer {base.spec[:40]!r} already has chat tokens (use it as it is)")
        self.base, self.tools = base, tools
        names = SPECIAL_TOKENS + (TOOL_TOKENS if tools else ())
        self.special = {s: base.vocab_size + i for i, s in enumerate(names)}
        self.role_id = dict(zip(ROLES, self.special.values()))
        self.assistant_id, self.end_id = self.special["<|assistant|>"], self.special["<|end|>"]
        self.tool_call_id, self.tool_result_id = self.special.get(TOOL_TOKENS[0]), self.special.get(TOOL_TOKENS[1])
        self.vocab_size = base.vocab_size + len(names)
        self.eot_id = self.end_id
        self.spec = (TOOLS_PREFIX if tools else CHAT_PREFIX) + base.spec
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        self._names = {i: s for s, i in self.special.items()}

    def encode_ordinary(self, text):
        return self.base.encode(text)

    def encode(self, text):
        ids = []
        for piece in self._split.split(text):  # odd pieces are special tokens
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece:
                ids += self.base.encode(piece)
        return ids

    def decode(self, ids):
        out, run = [], []
        for i in ids:
            if i in self._names:
                out += [self.base.decode(run), self._names[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.base.decode(run)])


def load_tokenizer(spec: str):
    if isinstance(spec, str) and spec.startswith(TOOLS_PREFIX):  # the chat tokens and the tool tokens
        return ChatTokenizer(load_tokenizer(spec[len(TOOLS_PREFIX):]), tools=True)
    if isinstance(spec, str) and spec.startswith(CHAT_PREFIX):  # sft.py's chat tokens on a base tokenizer
        return ChatTokenizer(load_tokenizer(spec[len(CHAT_PREFIX):]))
    if spec is None:
        raise NanoError("no tokenizer recorded (pass one, e.g. 'gpt2' or 'char:abc')")
    if spec.startswith("char:"):
        return CharTokenizer(spec[len("char:"):])
    if spec in TIKTOKEN_NAMES:
        return TiktokenTokenizer(spec)
    if Path(spec).is_file():
        return BPEFileTokenizer(spec)
    raise NanoError(f"tokenizer {spec!r} is neither 'gpt2', 'char:<alphabet>', a bpe.py file nor a tokenizer.json")


# ----------------------------------------------------------------------------------------
# Chat templates, the tokenizer side: a conversation -> the ids a chat model reads. transformers
# keeps this on the tokenizer (apply_chat_template); sft.py builds its loss mask on the same pieces.


# {% generation %} ... {% endgeneration %} (TRL's training templates): the block renders as it is,
# and while a render is tracked, the character span it fills is recorded (transformers'
# AssistantTracker; return_assistant_tokens_mask marks the tokens that overlap those spans)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TRACKED = contextvars.ContextVar("generation_spans", default=None)  # (chunks so far, spans)


@functools.lru_cache(maxsize=1)
def _generation_extension():
    import jinja2.ext
    from jinja2 import nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            if (tracked := _TRACKED.get()) is not None:  # template.generate() has yielded all before it
                chunks, spans = tracked
                start = sum(map(len, chunks))
                spans.append((start, start + len(text)))
            return text

    return Generation


class HFChatTemplate:
    """A Hugging Face `chat_template` (Jinja), rendered as transformers renders it: a sandboxed
    environment with trim_blocks / lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson`
    that keeps non-ASCII text, the tokenizer's special tokens as variables (bos_token, eos_token,
    ...) and `{% generation %}` blocks (tests/test_chat_templates.py compares with transformers on
    the templates of Llama 3.1, Qwen2.5/3, Mistral, Gemma, Phi)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", tokens=None):
        import jinja2  # comes with torch; only Hugging Face templates need it
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise NanoError(f"the chat template refuses this conversation: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_generation_extension(), "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise NanoError(f"the chat template does not parse ({e.__class__.__name__}: {e})") from None
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self.tokens = {k: v for k, v in (tokens or {}).items() if v} | {"bos_token": bos_token, "eos_token": eos_token}
        self.has_generation = bool(GENERATION_TAG.search(source))
        self.stop_tokens = [eos_token] if eos_token else []  # the template's end of a turn, and (find)
        self.stop_token_ids = []  # generation_config.json's eos_token_id(s)

    def render(self, messages, add_generation_prompt=False, tools=None) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the character spans of its {% generation %} blocks.
        tools: OpenAI's list of {"type": "function", "function": {...}} as the template's `tools`
        (transformers' apply_chat_template(tools=...)); messages may hold assistant `tool_calls`
        (arguments as dicts: tools.normalize_messages) and `tool` messages."""
        import jinja2

        chunks, spans = [], []
        tracking = _TRACKED.set((chunks, spans))
        try:
            chunks.extend(self.template.generate(messages=messages, tools=tools, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **self.tokens))
        except jinja2.TemplateError as e:
            raise NanoError(f"the chat template failed ({e.__class__.__name__}: {e})") from None
        finally:
            _TRACKED.reset(tracking)
        return "".join(chunks), spans

    def text(self, messages, add_generation_prompt=False, tools=None) -> str:
        return self.render(messages, add_generation_prompt, tools)[0]

    def answer_spans(self, messages, add_generation_prompt=False, tools=None) -> tuple[str, list[tuple[int, int]]]:
        """The text of a whole conversation and the character spans that carry loss (sft.py).
        With {% generation %} markers, the spans they enclose (transformers'
        return_assistant_tokens_mask). Without, sft.py's completion-only spans, found by
        rendering prefixes: the text of messages[:i] with the generation prompt ends where
        assistant message i starts, the text of messages[:i+1] where it ends; the span is the
        answer plus whatever the template closes it with (e.g. "<|im_end|>\\n"). That needs a
        template that renders a conversation's beginning as the beginning of its text, which
        Qwen3 (its last answer gets an empty <think> block), Phi-3.5/4 (eos after the last
        turn) and Mistral-Nemo (the system message goes into the last user turn) do not: for
        those, SFT asks for a template with {% generation %} markers. Serving never needs it."""
        text, spans = self.render(messages, add_generation_prompt, tools)
        if self.has_generation:
            return text, spans
        spans, done = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = self.text(messages[:i], True, tools), self.text(messages[:i + 1], False, tools)
            if not (full.startswith(prompt) and text.startswith(full) and len(prompt) >= done):
                raise NanoError("the chat template renders a conversation differently from its beginning (it "
                                "rewrites earlier turns), so its answers cannot be found for the loss mask (give sft.py "
                                "a template that marks them with {% generation %}, as TRL's training templates do)")
            spans.append((len(prompt), len(full)))
            done = len(full)
        return text, spans

    @classmethod
    def find(cls, spec):
        """The template beside a Hugging Face tokenizer.json spec (tokenizer_config.json's
        chat_template, or a chat_template.jinja file), or None."""
        if not isinstance(spec, str) or spec.startswith(CHAT_PREFIX) or not spec.endswith("tokenizer.json"):
            return None
        folder = Path(spec).parent
        config = _read_json(folder / "tokenizer_config.json")
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if source is None and (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not source:
            return None

        def token(name):  # a string, or an AddedToken written as {"content": ...}
            value = config.get(name) or ""
            return value.get("content", "") if isinstance(value, dict) else value

        template = cls(source, token("bos_token"), token("eos_token"),
                       {name: token(name) for name in ("unk_token", "pad_token", "sep_token", "cls_token", "mask_token")})
        # generation_config.json's eos_token_id (an int or a list: Llama 3 instruct stops at <|eot_id|>
        # and <|end_of_text|>) names more tokens that end a reply, by id
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        template.stop_token_ids = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
        return template


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NanoError(f"{path} is not valid JSON ({type(e).__name__}: {e}; fix or delete it)") from None
    return value if isinstance(value, dict) else {}


def token_spans(tok, text: str, ids) -> list[tuple[int, int]]:
    """The character span of `text` each token of `ids` (tok.encode(text)) stands for, as
    `tokenizers`' offsets: walk the text's UTF-8 bytes with each token's bytes (a token that
    splits a character covers all of it; a SentencePiece word-start "▁" that the tokenizer
    prepended covers nothing of the text). Normalized text (NFC, ...) is walked as if equal."""
    data = text.encode("utf-8")
    char_at = [0] * (len(data) + 1)  # byte offset -> index of the character it falls in
    pos = 0
    for k, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        char_at[pos:pos + n] = [k] * n
        pos += n
    char_at[len(data)] = len(text)
    piece_bytes = getattr(tok, "token_bytes", None) or (lambda i: tok.decode([i]).encode("utf-8"))
    spans, at = [], 0
    for i in ids:
        piece = piece_bytes(i)
        if not data.startswith(piece, at) and piece.startswith(b" ") and data.startswith(piece[1:], at):
            piece = piece[1:]  # the prepended word start
        end = min(at + len(piece), len(data))
        start_char = char_at[at]
        end_char = char_at[end - 1] + 1 if end > at else start_char
        spans.append((start_char, max(end_char, start_char)))
        at = end
    return spans


def chat_pieces(messages, tok, add_generation_prompt=False) -> list[tuple[list[int], bool]]:
    """nanollm's own template as token pieces [(ids, is an answer)]: <|role|> content <|end|> per
    message, which needs a ChatTokenizer; an answer is an assistant message's content with the
    <|end|> closing it. Content is encoded as plain text, so a user cannot forge a turn by typing
    "<|assistant|>". add_generation_prompt appends the opening of an assistant turn.
    With the tool tokens ("chat:tools:" specs), an assistant message's `tool_calls` follow its
    content, each <|tool_call|>{"name": ..., "arguments": {...}} (part of the answer), and a `tool`
    message is <|tool_result|>content<|end|> (given: the model reads results, never writes them).
    nanollm's template does not write the `tools` list into the prompt: a small model learns its
    tools in SFT (its context is short), so apply_chat_template's tools are ignored here."""
    if not isinstance(tok, ChatTokenizer):
        raise NanoError(f"tokenizer {tok.spec[:40]!r} has no chat tokens (wrap it: ChatTokenizer(tok), "
                        "or finetune the model with sft.py first)")
    pieces = []
    for m in messages:  # the role token opens the turn: given, never part of the answer
        role, content = m["role"], m.get("content") or ""
        if (role == "tool" or m.get("tool_calls")) and not tok.tools:
            raise NanoError(f"tokenizer {tok.spec[:40]!r} has no tool tokens, so it cannot show a tool call or "
                            "result (finetune with tool conversations: sft.py --tasks calculator)")
        if role == "tool":
            pieces += [([tok.tool_result_id], False), (tok.encode_ordinary(content) + [tok.end_id], False)]
            continue
        ids = tok.encode_ordinary(content)
        for call in m.get("tool_calls") or ():
            ids += [tok.tool_call_id] + tok.encode_ordinary(tool_call_text(call))
        pieces += [([tok.role_id[role]], False), (ids + [tok.end_id], role == "assistant")]
    if add_generation_prompt:
        pieces.append(([tok.assistant_id], False))
    return pieces


def tool_call_text(call) -> str:
    """An OpenAI tool call as nanollm's format writes it: {"name": "f", "arguments": {...}}."""
    function = call.get("function", call)
    arguments = function.get("arguments") or {}
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    return json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)


def apply_chat_template(messages, tok, template=None, add_generation_prompt=False, tools=None) -> list[int]:
    """The conversation's ids, as transformers' tokenizer.apply_chat_template(..., tokenize=True)
    gives them; with add_generation_prompt, the prompt a chat model answers (serve.py). A Hugging
    Face template renders the whole conversation to text, tokenized once (special tokens written
    in the text become their ids, as in transformers: content is not escaped). tools: OpenAI's
    tool list, as apply_chat_template(tools=...) passes it to the template."""
    if template is not None:
        return tok.encode(template.text(messages, add_generation_prompt, tools))
    return [i for ids, _ in chat_pieces(messages, tok, add_generation_prompt) for i in ids]


# nanollm's <|role|> content <|end|> as a Hugging Face chat_template: what export.py writes for a
# "chat:" checkpoint, so transformers' apply_chat_template gives chat_pieces' ids (content without
# special-token strings in it: transformers turns those into their ids, ChatTokenizer does not)
NANOLLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


# ... and with the tool tokens ("chat:tools:" specs): chat_pieces' calls and results
NANOLLM_TOOLS_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'tool' %}"
    "{{ '<|tool_result|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}{% set f = call['function'] if call['function'] is defined else call %}"
    "{{ '<|tool_call|>{\"name\": ' + f['name'] | tojson + ', \"arguments\": ' + f['arguments'] | tojson + '}' }}"
    "{% endfor %}{{ '<|end|>' }}"
    "{% else %}{{ raise_exception('roles are system, user, assistant and tool') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def nanollm_chat_template(tok) -> str:
    """The Hugging Face chat_template of a ChatTokenizer (export.py writes it): with or without tools."""
    return NANOLLM_TOOLS_CHAT_TEMPLATE if getattr(tok, "tools", False) else NANOLLM_CHAT_TEMPLATE


def load_chat(spec):
    """(tokenizer, template) for a checkpoint's tokenizer spec: the chat tokens of a "chat:"
    spec (template None), or a Hugging Face tokenizer with its chat_template."""
    tok = load_tokenizer(spec)
    template = HFChatTemplate.find(spec)
    if template is None and not isinstance(tok, ChatTokenizer):
        raise NanoError(f"tokenizer {str(spec)[:40]!r} has no chat template (finetune the model with sft.py first)")
    return tok, template


def stop_ids(tok, template=None) -> list[int]:
    """The tokens that end an assistant turn, first the one the template writes: <|end|>, or
    the template's eos_token, then generation_config.json's eos_token_id(s)."""
    if template is None:
        return [tok.end_id]
    found = []
    for name in template.stop_tokens:
        ids = tok.encode(name)
        if len(ids) != 1:
            raise NanoError(f"the chat template's eos_token {name!r} is not one token (check tokenizer_config.json)")
        found.append(ids[0])
    found += [i for i in template.stop_token_ids if i not in found and 0 <= i < tok.vocab_size]
    if not found:
        raise NanoError("the chat template names no eos_token (set it in tokenizer_config.json)")
    return found


def stop_id(tok, template=None) -> int:
    """The token that ends an assistant turn as the template writes it (stop_ids' first)."""
    return stop_ids(tok, template)[0]


class ChatTemplate:
    """What a server needs of a chat model's template (sft.py's <|role|> content <|end|> with a
    "chat:" tokenizer's chat tokens, content encoded as plain text so a user cannot forge a turn;
    or a Hugging Face chat_template): the prompt ids of a conversation, the reply's stop ids."""

    stop = ()  # no stop strings: the reply ends at a stop token

    def __init__(self, tok, hf_template=None):
        self.tok, self.hf_template = tok, hf_template
        self.stop_ids = frozenset(stop_ids(tok, hf_template))

    def render(self, messages, tools=None) -> list[int]:
        """Prompt ids; messages as tools.normalize_messages returns them (tool_calls, tool results),
        tools: the request's OpenAI tool list (given to a Hugging Face template)."""
        return apply_chat_template(messages, self.tok, self.hf_template, add_generation_prompt=True, tools=tools)

    @property
    def source(self) -> str | None:
        """The Jinja source (None: nanollm's template), which names the tool-call format."""
        return self.hf_template.source if self.hf_template is not None else None


def base_spec(spec: str) -> str:
    """The base tokenizer's spec of a chat spec ("chat:gpt2", "chat:tools:gpt2" -> "gpt2")."""
    return spec.removeprefix(TOOLS_PREFIX) if spec.startswith(TOOLS_PREFIX) else spec.removeprefix(CHAT_PREFIX)


def load_chat_template(spec):
    """(tokenizer, ChatTemplate) for a chat model's spec (sft.py's "chat:" spec, or a tokenizer that
    brings a chat_template); (tokenizer, None) for a base model."""
    if str(spec).startswith(CHAT_PREFIX) or HFChatTemplate.find(spec) is not None:
        tok, hf_template = load_chat(spec)
        return tok, ChatTemplate(tok, hf_template)
    return load_tokenizer(spec), None


# ----------------------------------------------------------------------------------------
# GPT-2's byte alphabet (how vocab.bpe, encoder.json, tokenizer.json and bpe.py's files write bytes)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map byte -> printable character, so a byte token can be written
    as text: the 188 printable latin-1 bytes stand for themselves, the other 68 (control
    characters, space, ...) become chr(256), chr(257), ... in byte order (space -> 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


def to_alphabet(token: bytes) -> str:
    # each byte read as the latin-1 character of the same number, then mapped in one C call
    return token.decode("latin-1").translate(_latin1_to_alphabet())


@functools.lru_cache(maxsize=1)
def _latin1_to_alphabet() -> dict[int, str]:
    return dict(bytes_to_unicode())


def from_alphabet(text: str) -> bytes:
    """Inverse of to_alphabet (UnicodeEncodeError: a character outside the alphabet)."""
    return text.translate(_alphabet_to_latin1()).encode("latin-1")


@functools.lru_cache(maxsize=1)
def _alphabet_to_latin1() -> dict[int, str]:
    """str.translate table: each alphabet character -> the latin-1 character of its byte.
    Latin-1 characters outside the alphabet (space, controls) -> U+FFFF, which latin-1
    cannot encode, so they raise instead of passing through."""
    table = {b: "\uffff" for b in range(256)}
    table.update({ord(c): chr(b) for b, c in bytes_to_unicode().items()})
    return table


# ----------------------------------------------------------------------------------------
# bpe.py's tokenizers: trained on a file of any size, saved as a "nanollm-bpe v1" file


FILE_VERSION = "nanollm-bpe v1"
CHUNK_BYTES = 16 << 20  # files are pre-tokenized in pieces of about this size (memory bound)


def find_chunk_boundaries(path, special_tokens, chunk_bytes=CHUNK_BYTES) -> list[int]:
    """Byte offsets that cut the file into pieces of about `chunk_bytes`, each cut at the
    start of a special token. Cutting there changes nothing: the text is split at special
    tokens before the regex runs anyway. Without special tokens the file stays whole."""
    size = os.path.getsize(path)
    if not special_tokens or size <= chunk_bytes:
        return [0, size]
    specials = sorted((s.encode("utf-8") for s in special_tokens), key=len, reverse=True)
    find = regex.compile(b"|".join(regex.escape(s) for s in specials))
    overlap = max(map(len, specials)) - 1  # so a token straddling two reads is still seen
    block = 1 << 20
    bounds = [0]
    with open(path, "rb") as f:
        pos = chunk_bytes
        while pos < size:
            found = None
            while found is None:  # scan forward from pos for the next special token
                f.seek(pos)
                data = f.read(block)
                match = find.search(data)
                if match:
                    found = pos + match.start()
                elif len(data) < block:
                    break
                else:
                    pos += block - overlap
            if found is None or found >= size:
                break
            if found > bounds[-1]:
                bounds.append(found)
            pos = found + chunk_bytes
    bounds.append(size)
    return bounds


def _count_file_chunk(args):
    """Worker: pre-token counts of bytes [start, end) of a file."""
    path, start, end, special_tokens, pattern = args
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanoError(f"{path} is not UTF-8 text (bad byte at offset {start + e.start}; convert it to UTF-8)") from None
    return bpe.count_text_pretokens(text, special_tokens, pattern)


def count_file_pretokens(path, special_tokens=(), pattern=GPT2_PATTERN, num_workers=None,
                         chunk_bytes=CHUNK_BYTES) -> Counter:
    """bpe.count_text_pretokens of a UTF-8 file, read in pieces cut at special tokens, counted
    by `num_workers` processes (default: one per CPU)."""
    if not os.path.isfile(path):
        raise NanoError(f"training file {path} not found (check the path)")
    bpe.compile_pattern(pattern)  # a bad pattern is one error here, not one per worker
    bounds = find_chunk_boundaries(path, special_tokens, chunk_bytes)
    jobs = [(str(path), a, b, tuple(special_tokens), pattern) for a, b in pairwise(bounds)]
    num_workers = min(num_workers or os.cpu_count() or 1, len(jobs))
    total = Counter()
    if num_workers > 1:
        import multiprocessing

        with multiprocessing.Pool(num_workers) as pool:
            for part in pool.imap_unordered(_count_file_chunk, jobs):
                total.update(part)
    else:
        for part in map(_count_file_chunk, jobs):
            total.update(part)
    return total


def train_bpe_file(path, vocab_size: int, special_tokens=(), pattern=GPT2_PATTERN, num_workers=None,
                   verbose=False):
    """bpe.train_bpe on a UTF-8 file of any size: read chunk by chunk (cut at special tokens),
    pre-tokens counted by `num_workers` processes (default: one per CPU)."""
    bpe.check_vocab_size(vocab_size, special_tokens)
    t0 = time.perf_counter()
    counts = count_file_pretokens(path, special_tokens, pattern, num_workers)
    return bpe.train_on_counts(counts, vocab_size, special_tokens, verbose, t0)


def save_bpe(tok: bpe.Tokenizer, path):
    """Write `path` (the tokenizer, human-readable) and a .vocab listing beside it.
    Both go to a temp file first, then are renamed: never a half-written file."""
    if tok.added_tokens or tok.normalizer or tok.pre_tokenizer is not None or not tok.ignore_merges:
        raise NanoError("this tokenizer's pipeline (from a tokenizer.json) does not fit a .bpe file "
                        "(write it as a tokenizer.json: tokenizer.save_tokenizer_json)")
    path = Path(path)
    special_ids = set(tok.special_tokens.values())
    token_id = {t: i for i, t in tok.vocab.items() if i not in special_ids}
    lines = [FILE_VERSION,
             "# byte-level BPE written by nanollm's bpe.py. Tokens are in GPT-2's byte alphabet",
             "# (Ġ is a space, Ċ a newline); a merge line is: left right id-of-the-merged-token.",
             f"pattern {json.dumps(tok.pattern)}",
             "bytes " + " ".join(str(token_id[bytes([b])]) for b in range(256)),
             f"special {len(tok.special_tokens)}"]
    lines += [f"{i} {json.dumps(s)}" for s, i in tok.special_tokens.items()]
    lines.append(f"merges {len(tok.merges)}")
    lines += [f"{to_alphabet(a)} {to_alphabet(b)} {token_id[a + b]}" for a, b in tok.merges]
    _write_text(path, "\n".join(lines) + "\n")

    made_by = {a + b: (a, b) for a, b in reversed(tok.merges)}  # earliest merge wins
    listing = []
    for i in sorted(tok.vocab):
        token = tok.vocab[i]
        if i in special_ids:
            listing.append(f"{i}\t{render_token(token)}\t(special)")
        elif token in made_by:
            a, b = made_by[token]
            listing.append(f"{i}\t{render_token(token)}\t= {render_token(a)} + {render_token(b)}")
        else:
            listing.append(f"{i}\t{render_token(token)}")
    _write_text(_vocab_path(path), "\n".join(listing) + "\n")


def read_bpe(path) -> bpe.Tokenizer:
    """Read a file written by save_bpe; a clear one-line error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"tokenizer file {path} not found (train one: python bpe.py train ...)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NanoError(f"{path} is not a bpe.py tokenizer file ({type(e).__name__})") from None
    lines = text.split("\n")
    try:
        # comment lines ("# ...") are allowed in the header only: "#" is also a token
        at = next((i for i, line in enumerate(lines) if line.startswith("merges ")), len(lines))
        lines = [line for line in lines[:at] if not line.startswith("#")] + lines[at:]
        if lines[0] != FILE_VERSION:
            raise ValueError(f"first line is {lines[0][:40]!r}, expected {FILE_VERSION!r}")
        pattern = json.loads(_field(lines[1], "pattern"))
        byte_ids = [int(x) for x in _field(lines[2], "bytes").split(" ")]
        if len(byte_ids) != 256:
            raise ValueError(f"{len(byte_ids)} byte ids, expected 256")
        vocab = {i: bytes([b]) for b, i in enumerate(byte_ids)}
        n_special = int(_field(lines[3], "special"))
        specials = {}
        for line in lines[4:4 + n_special]:
            i, s = line.split(" ", 1)
            specials[json.loads(s)] = int(i)
        at = 4 + n_special
        n_merges = int(_field(lines[at], "merges"))
        merges = []
        for line in lines[at + 1:at + 1 + n_merges]:
            left, right, i = line.split(" ")
            merges.append((from_alphabet(left), from_alphabet(right)))
            vocab[int(i)] = merges[-1][0] + merges[-1][1]
        if len(merges) != n_merges or any(lines[at + 1 + n_merges:]):
            raise ValueError(f"expected {n_merges} merges, found {len(lines) - at - 1} lines")
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise NanoError(f"{path} is not a valid bpe.py tokenizer file ({e}; re-create it "
                        "with python bpe.py train)") from None
    return bpe.Tokenizer(vocab, merges, specials, pattern)


def _field(line: str, name: str) -> str:
    key, _, value = line.partition(" ")
    if key != name:
        raise ValueError(f"expected a {name!r} line, got {line[:40]!r}")
    return value


def _vocab_path(path: Path) -> Path:
    return path.with_suffix(".vocab") if path.suffix != ".vocab" else Path(str(path) + ".vocab")


def _write_text(path: Path, text: str):
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------
# The formats of others as a bpe.Tokenizer: OpenAI's GPT-2 files, tiktoken encodings


def bpe_from_gpt2_files(vocab_bpe_path=GPT2_VOCAB_BPE, encoder_json_path=GPT2_ENCODER_JSON,
                        special_tokens=(ENDOFTEXT,)) -> bpe.Tokenizer:
    """OpenAI's GPT-2 files: vocab.bpe (one merge per line, in priority order) and
    encoder.json (token -> id), both written in GPT-2's byte alphabet (default: the shipped copies)."""
    try:
        encoder = json.loads(Path(encoder_json_path).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe_path).read_text(encoding="utf-8").split("\n")
        vocab = {int(i): from_alphabet(token) for token, i in encoder.items()}
        merges = [tuple(map(from_alphabet, line.split(" "))) for line in lines
                  if line and not line.startswith("#version")]
        if not all(len(m) == 2 for m in merges):
            raise ValueError("a merge line is not two tokens")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise NanoError(f"cannot read GPT-2 files {vocab_bpe_path}, {encoder_json_path}: "
                        f"{type(e).__name__}: {e} (need OpenAI's vocab.bpe and encoder.json)") from None
    specials = {s: encoder[s] for s in special_tokens if s in encoder}
    return bpe.Tokenizer(vocab, merges, specials, GPT2_PATTERN)


def bpe_from_tiktoken(encoding) -> bpe.Tokenizer:
    """Rebuild a tokenizer from a tiktoken encoding (or its name, e.g. "cl100k_base").
    tiktoken stores only ranks (token bytes -> id, lower merges first); the merge that
    made a token is found by running the naive BPE (bpe.merge_by_rank) on its bytes with
    only the lower-ranked tokens: what remains is exactly two parts, the pair that was merged."""
    if isinstance(encoding, str):
        encoding = tiktoken_encoding(encoding)
    ranks = encoding._mergeable_ranks  # tiktoken exposes no public accessor
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = bpe.merge_by_rank(token, ranks, max_rank=rank)
            if len(parts) != 2:
                raise NanoError(f"token {render_token(token)} (rank {rank}) is not a merge of "
                                "two lower-ranked tokens: not a BPE vocabulary")
            merges.append((parts[0], parts[1]))
    vocab = {rank: token for token, rank in ranks.items()}
    return bpe.Tokenizer(vocab, merges, dict(encoding._special_tokens), encoding._pat_str)


def load_bpe(spec: str) -> bpe.Tokenizer:
    """A bpe.Tokenizer from a saved bpe.py file (read_bpe), a Hugging Face tokenizer.json (a path
    ending in .json), or a tiktoken encoding name ("gpt2" from the shipped files)."""
    if spec.endswith(".json"):
        return bpe_from_tokenizer_json(spec)
    if Path(spec).is_file():
        return read_bpe(spec)
    if spec == "gpt2":
        return bpe_from_gpt2_files()
    if spec in TIKTOKEN_NAMES:
        return bpe_from_tiktoken(spec)
    raise NanoError(f"tokenizer {spec!r} is neither a file nor a tiktoken encoding name (e.g. gpt2)")


# ----------------------------------------------------------------------------------------
# Hugging Face tokenizer.json: read and written

SUPPORTED = "nanollm reads the byte-level BPE of GPT-2, Llama 3, Qwen2/3, SmolLM and SentencePiece-style BPE"
# Oniguruma, the regex engine of `tokenizers`, reads "X{1,3}+" as (X{1,3})+, not as a
# possessive X{1,3} (Python's regex and tiktoken's): rewrite one as the other both ways.
_BOUNDED_PLUS = regex.compile(r"(\\p\{\w+\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\()\[\]{}|])(\{\d+(?:,\d*)?\})\+")


def to_onig(pattern: str) -> str:
    return _BOUNDED_PLUS.sub(r"(?>\1\2)", pattern)


def from_onig(pattern: str) -> str:
    return _BOUNDED_PLUS.sub(r"(?:\1\2)+", pattern)


def _members(node, key) -> list[dict]:
    """The steps of a normalizer or pre_tokenizer, a Sequence of them flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for member in node.get(key, []) for step in _members(member, key)]
    return [node]


def _is_sentencepiece(spec: dict) -> bool:
    """A SentencePiece-style model: Metaspace, Prepend or Replace, or byte fallback, or a BPE
    over characters without any ByteLevel step (export.py writes character tokenizers so); else
    byte-level BPE. A Unigram model (unigram.py) goes through the same pipeline."""
    model = spec.get("model") or {}
    if model.get("type") == "Unigram":
        return True
    pre = {s.get("type") for s in _members(spec.get("pre_tokenizer"), "pretokenizers")}
    norms = {s.get("type") for s in _members(spec.get("normalizer"), "normalizers")}
    return model.get("type") == "BPE" and (bool(model.get("byte_fallback")) or "ByteLevel" not in pre
                                           or bool((pre | norms) & {"Metaspace", "Prepend", "Replace"}))


def _read_tokenizer_json(spec: dict, where) -> dict:
    """Tokenizer(...) arguments from a parsed tokenizer.json, or a one-line error."""
    model = spec.get("model") or {}
    pre = _members(spec.get("pre_tokenizer"), "pretokenizers")
    norms = _members(spec.get("normalizer"), "normalizers")
    if model.get("type") != "BPE":
        raise NanoError(f"{where}: a {model.get('type')} tokenizer model is not supported ({SUPPORTED})")
    if not pre or pre[-1].get("type") != "ByteLevel":
        raise NanoError(f"{where}: not a byte-level BPE (its pre_tokenizer does not end in ByteLevel; {SUPPORTED})")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise NanoError(f"{where}: BPE dropout, continuing_subword_prefix and end_of_word_suffix are not "
                        f"supported ({SUPPORTED})")
    steps = []
    for step in pre:
        kind = step.get("type")
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step.get("pattern", {})
            steps.append(from_onig(pattern["Regex"]) if "Regex" in pattern else regex.escape(pattern.get("String", "")))
        elif kind == "Digits":  # is_numeric(): \p{N}; runs of digits are one piece unless individual_digits
            steps.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and step is pre[-1]:
            steps += [PREFIX_SPACE] * bool(step.get("add_prefix_space")) + [GPT2_PATTERN] * step.get("use_regex", True)
        else:
            raise NanoError(f"{where}: the pre-tokenizer {json.dumps(step)[:100]} is not supported ({SUPPORTED})")
    for step in norms:
        if step.get("type") not in ("NFC", "NFD", "NFKC", "NFKD"):
            raise NanoError(f"{where}: the normalizer {step.get('type')} is not supported (NFC, NFD, NFKC, NFKD are)")
    specials, added = {}, {}
    try:
        for token in spec.get("added_tokens") or []:
            if token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
                raise NanoError(f"{where}: added token {token.get('content')!r} sets single_word, lstrip or "
                                "rstrip, which nanollm does not support")
            (specials if token.get("special") else added)[token["content"]] = int(token["id"])
        added_ids = set(specials.values()) | set(added.values())
        vocab = {i: _hf_bytes(t, where) for t, i in model["vocab"].items() if i not in added_ids}
        merges = [tuple(_hf_bytes(t, where) for t in (m.split(" ") if isinstance(m, str) else m))
                  for m in model["merges"]]
        if any(len(m) != 2 for m in merges):
            raise ValueError("a merge is not two tokens")
    except NanoError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise NanoError(f"{where}: malformed tokenizer.json ({type(e).__name__}: {e})") from None
    one_regex = len(steps) == 1 and steps[0] != PREFIX_SPACE
    return {"vocab": vocab, "merges": merges, "special_tokens": specials, "added_tokens": added,
            "pattern": steps[0] if one_regex else None, "pre_tokenizer": None if one_regex else steps,
            "normalizer": [step["type"] for step in norms], "ignore_merges": bool(model.get("ignore_merges"))}


def _hf_bytes(token: str, where) -> bytes:
    try:
        return from_alphabet(token)
    except UnicodeEncodeError:
        raise NanoError(f"{where}: token {token!r} is not written in GPT-2's byte alphabet (not a "
                        f"byte-level BPE; {SUPPORTED})") from None


def bpe_from_tokenizer_json(path) -> bpe.Tokenizer:
    """A Hugging Face tokenizer.json of a byte-level BPE (GPT-2, Llama 3, Qwen2/3, SmolLM):
    its normalizer, pre-tokenizer (Split regexes, Digits, ByteLevel), merges and added
    tokens, so that encode(text, allowed_special="all") gives the ids of `tokenizers`'
    encode(text, add_special_tokens=False), and "none" those with encode_special_tokens
    on. The post-processor (e.g. Llama 3's <|begin_of_text|> in front) is not applied.
    Other kinds (SentencePiece-style, WordPiece, Unigram): a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"tokenizer file {path} not found (check the path)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NanoError(f"{path} is not a tokenizer.json ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict):
        raise NanoError(f"{path} is not a tokenizer.json (a JSON object with a 'model')")
    try:
        if _is_sentencepiece(spec):
            tok = _sentencepiece_from_json(spec, path)
        else:
            tok = bpe.Tokenizer(**_read_tokenizer_json(spec, path))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, NanoError):
            raise
        raise NanoError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None
    ends = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")  # the document separators of those models
    tok.eot_id = next((tok.special_tokens[s] for s in ends if s in tok.special_tokens), None)
    return tok


# ----------------------------------------------------------------------------------------
# SentencePiece-style tokenizer.json (Llama 2, Mistral 7B, TinyLlama, Gemma): text, not bytes, is
# merged. Spaces become "▁" (a Replace normalizer or the Metaspace pre-tokenizer), a "▁" is put
# before the text (Prepend, or Metaspace's prepend_scheme), the BPE starts from characters, and a
# character missing from the vocabulary becomes the tokens of its UTF-8 bytes, <0xE6> <0x97> ...
# (byte_fallback), else <unk>. The model is one small part: a Unigram model (T5-style, Viterbi
# over pieces) fits the same pipeline with its own encode(word) -> ids.

SENTENCEPIECE = "nanollm reads SentencePiece-style BPE: Metaspace, Prepend, Replace, byte_fallback (Llama 2, Mistral, Gemma)"


class CharBPE:
    """BPE over characters as `tokenizers` runs it: a word starts as its characters' ids (byte
    fallback, else <unk>, runs of <unk> fused into one with fuse_unk), then bpe.apply_merges."""

    def __init__(self, vocab: dict[str, int], merges, unk_id=None, byte_fallback=False, fuse_unk=False,
                 ignore_merges=False, where=""):
        self.vocab, self.unk_id, self.byte_fallback, self.fuse_unk = vocab, unk_id, byte_fallback, fuse_unk
        self.ignore_merges = ignore_merges
        self.byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self.ranks, self.merged_id = {}, []
        for rank, (left, right) in enumerate(merges):
            try:
                pair, new_id = (vocab[left], vocab[right]), vocab[left + right]
            except KeyError:
                raise NanoError(f"{where}: merge {rank} ({left!r} + {right!r}) uses a token missing from the "
                                "vocabulary (malformed tokenizer.json)") from None
            self.ranks.setdefault(pair, len(self.merged_id))
            self.merged_id.append(new_id)
        self.cache = {}

    def encode(self, word: str) -> list[int]:
        if (ids := self.cache.get(word)) is None:
            ids = list(self._merge(word))
            if len(word) <= 64 and len(self.cache) < 1 << 16:  # words, not whole unsplit texts
                self.cache[word] = ids
        return ids

    def _merge(self, word):
        if self.ignore_merges and word in self.vocab:
            return (self.vocab[word],)
        ids, unknown = [], False  # unknown: the last character was <unk>
        for ch in word:
            byte_ids = [self.byte_ids[b] for b in ch.encode("utf-8")] if self.byte_fallback else [None]
            if (i := self.vocab.get(ch)) is not None or None not in byte_ids:
                ids += [i] if i is not None else byte_ids
                unknown = False
            elif self.unk_id is None:
                raise NanoError(f"character {ch!r} is not in the vocabulary, which has no unk_token (and no byte fallback)")
            elif not (self.fuse_unk and unknown):
                ids.append(self.unk_id)
                unknown = True
        return bpe.apply_merges(ids, self.ranks, self.merged_id)


class SentencePieceTokenizer:
    """A tokenizer.json pipeline as `tokenizers` runs it: the text is cut at added tokens (longest
    first); each other piece is normalized (Prepend, Replace, NFC/NFKC/...), split by Metaspace
    (spaces -> "▁", a "▁" prepended: always, or only to the piece that starts the text ("first"),
    words cut before each "▁" with split), and each word encoded by the model (CharBPE). ids ==
    `tokenizers`' encode(text, add_special_tokens=False) (tests/test_tokenizer.py)."""

    def __init__(self, model, pieces: dict[int, str], special_tokens: dict, added_tokens: dict, normalizer=(),
                 metaspace=None, decoder=(None, False, 0)):
        self.model, self.pieces = model, pieces  # pieces: id -> the token's string ("▁the", "<0x0A>")
        self.special_tokens, self.added_tokens = special_tokens, added_tokens
        self.normalizer, self.metaspace = list(normalizer), metaspace
        self.space_mark, self.byte_pieces, self.strip_left = decoder  # "▁" -> " ", <0xNN> -> byte, strip
        self.matched = special_tokens | added_tokens
        self.split = bpe.special_token_regex(frozenset(self.matched)) if self.matched else None
        self.vocab_size = max(pieces) + 1
        self.eot_id = None
        self.merges = ()  # no byte-level merges (export.py asks)

    def encode(self, text: str, allowed_special="all") -> list[int]:
        ids, at = [], 0
        for match in (self.split.finditer(text) if self.split else ()):
            ids += self.encode_ordinary(text[at:match.start()], at == 0)
            ids.append(self.matched[match.group()])
            at = match.end()
        return ids + self.encode_ordinary(text[at:], at == 0)

    def encode_ordinary(self, text: str, starts_text=True) -> list[int]:
        if not text:
            return []
        for kind, a, b in self.normalizer:
            text = (b + text if kind == "Prepend" else text.replace(a, b) if kind == "Replace"
                    else a.sub(lambda _: b, text) if kind == "Regex" else unicodedata.normalize(kind, text))
        words = [text]
        if self.metaspace is not None:
            mark, scheme, split = self.metaspace
            text = text.replace(" ", mark)
            if (scheme == "always" or scheme == "first" and starts_text) and not text.startswith(mark):
                text = mark + text
            words = [w for w in re.split(f"(?={re.escape(mark)})", text) if w] if split else [text]
        return [i for word in words for i in self.model.encode(word)]

    def decode_bytes(self, ids) -> bytes:
        """The tokens' bytes: <0xNN> is byte NN, "▁" a space (the decoder strips none here)."""
        out = bytearray()
        for i in ids:
            piece = self.pieces[i]
            if self.byte_pieces and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(int(piece[3:5], 16))
            else:
                out += (piece.replace(self.space_mark, " ") if self.space_mark else piece).encode("utf-8")
        return bytes(out)

    def decode(self, ids) -> str:
        text = self.decode_bytes(ids).decode("utf-8", errors="replace")
        return text[self.strip_left:] if text[:self.strip_left] == " " * self.strip_left else text


def _sentencepiece_from_json(spec: dict, where) -> SentencePieceTokenizer:
    """A SentencePieceTokenizer from a parsed tokenizer.json, or a one-line error."""
    model = spec["model"]
    normalizer, metaspace = [], None
    for step in _members(spec.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Prepend":
            normalizer.append(("Prepend", "", step["prepend"]))
        elif kind == "Replace" and "String" in step.get("pattern", {}):
            normalizer.append(("Replace", step["pattern"]["String"], step["content"]))
        elif kind == "Replace" and "Regex" in step.get("pattern", {}):  # Oniguruma's \z is Python's \Z
            pattern = regex.compile(from_onig(step["pattern"]["Regex"]).replace(r"\z", r"\Z"))
            normalizer.append(("Regex", pattern, step["content"]))
        elif kind in ("NFC", "NFD", "NFKC", "NFKD"):
            normalizer.append((kind, "", ""))
        else:
            raise NanoError(f"{where}: the normalizer {json.dumps(step)[:100]} is not supported ({SENTENCEPIECE})")
    for step in _members(spec.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") != "Metaspace" or metaspace is not None:
            raise NanoError(f"{where}: the pre-tokenizer {json.dumps(step)[:100]} is not supported ({SENTENCEPIECE})")
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        metaspace = (step.get("replacement", "▁"), scheme, step.get("split", True))
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise NanoError(f"{where}: BPE dropout and subword prefixes/suffixes are not supported ({SENTENCEPIECE})")
    specials, added = {}, {}
    for token in spec.get("added_tokens") or []:
        if token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
            raise NanoError(f"{where}: added token {token.get('content')!r} sets single_word, lstrip or rstrip, "
                            "which nanollm does not support")
        if token.get("normalized") and normalizer:  # `tokenizers` would match its normalized form
            raise NanoError(f"{where}: added token {token.get('content')!r} is matched after normalization "
                            "(normalized: true), which nanollm does not support")
        (specials if token.get("special") else added)[token["content"]] = int(token["id"])
    if model["type"] == "Unigram":  # T5-style: Viterbi over scored pieces (unigram.py), same pipeline
        vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
        piece_model = unigram.Unigram([(p, float(score)) for p, score in model["vocab"]], model.get("unk_id"),
                                      bool(model.get("byte_fallback")))
        pieces, decoder = sentencepiece_decoding(spec, vocab, specials, added)
        return SentencePieceTokenizer(piece_model, pieces, specials, added, normalizer, metaspace, decoder)
    vocab = {t: int(i) for t, i in model["vocab"].items()}
    merges = [tuple(m.split(" ", 1) if isinstance(m, str) else m) for m in model["merges"]]
    unk = model.get("unk_token")
    piece_model = CharBPE(vocab, merges, vocab.get(unk) if unk else None, bool(model.get("byte_fallback")),
                          bool(model.get("fuse_unk")), bool(model.get("ignore_merges")), where)
    pieces, decoder = sentencepiece_decoding(spec, vocab, specials, added)
    return SentencePieceTokenizer(piece_model, pieces, specials, added, normalizer, metaspace, decoder)


def sentencepiece_decoding(spec, vocab, specials, added):
    """(id -> piece, how to decode) for a SentencePieceTokenizer: the decoder's space mark, whether
    <0xNN> pieces are bytes, and how many leading spaces it strips."""
    decoders = _members(spec.get("decoder"), "decoders")
    kinds = {d.get("type") for d in decoders}
    mark = next((d["pattern"]["String"] for d in decoders if d.get("type") == "Replace" and d.get("content") == " "
                 and "String" in d.get("pattern", {})), "▁" if "Metaspace" in kinds else None)
    strip = sum(d.get("start", 0) for d in decoders if d.get("type") == "Strip" and d.get("content") == " ")
    strip += any(d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never" for d in decoders)
    pieces = {i: t for t, i in vocab.items()} | {i: s for s, i in (specials | added).items()}
    return pieces, (mark, "ByteFallback" in kinds, strip)


def to_tokenizer_json(tok: bpe.Tokenizer) -> dict:
    """A bpe.Tokenizer as a Hugging Face tokenizer.json (a dict), which `tokenizers` and
    transformers' PreTrainedTokenizerFast encode as tok.encode(text, allowed_special="all")."""
    steps = list(tok.pre_tokenizer if tok.pre_tokenizer is not None else [tok.pattern])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    if steps[-1:] == [GPT2_PATTERN]:  # ByteLevel's own regex is GPT-2's
        byte_level["use_regex"] = bool(steps.pop())
    if steps[-1:] == [PREFIX_SPACE]:
        byte_level["add_prefix_space"] = bool(steps.pop())
    if PREFIX_SPACE in steps:
        raise NanoError("a space prefix before other split steps has no tokenizer.json form")
    pre = [{"type": "Split", "pattern": {"Regex": to_onig(s)}, "behavior": "Isolated", "invert": False}
           for s in steps] + [byte_level]
    norms = [{"type": form} for form in tok.normalizer]
    added_ids = {i: s for s, i in (tok.special_tokens | tok.added_tokens).items()}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": s in tok.special_tokens}
                         for i, s in sorted(added_ids.items())],
        "normalizer": norms[0] if len(norms) == 1 else {"type": "Sequence", "normalizers": norms} if norms else None,
        "pre_tokenizer": pre[0] if len(pre) == 1 else {"type": "Sequence", "pretokenizers": pre},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tok.ignore_merges,
                  "vocab": {to_alphabet(t): i for i, t in sorted(tok.vocab.items()) if i not in added_ids},
                  "merges": [f"{to_alphabet(a)} {to_alphabet(b)}" for a, b in tok.merges]}}


def save_tokenizer_json(tok: bpe.Tokenizer, path):
    """Write to_tokenizer_json(tok) to `path` (a temp file first, then renamed)."""
    _write_text(Path(path), json.dumps(to_tokenizer_json(tok), ensure_ascii=False))


# ----------------------------------------------------------------------------------------
# Command line: train a tokenizer; the tokens of a text; one text under several tokenizers

SAMPLE_TEXT = """The quick brown fox doesn't jump over 1,234,567 lazy dogs -- they'll sleep in.
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)   # 4 spaces of indent
Tokenizers split "ﬁne" ligatures, émigré accents, 日本語のテキスト and emoji 👋🏽 very differently.
"""


def _cmd_train(args):
    if not os.path.isfile(args.input):
        raise NanoError(f"input file {args.input} not found (check --input)")
    if Path(args.out).is_dir() or not Path(args.out).parent.is_dir():
        raise NanoError(f"--out {args.out} is a folder or lies in no folder (give a file name in an existing folder)")
    pattern = PATTERNS.get(args.pattern, args.pattern)
    bpe.compile_pattern(pattern)
    specials = [s for s in args.special_tokens.split(",") if s]
    t0 = time.perf_counter()
    vocab, merges = train_bpe_file(args.input, args.vocab_size, specials, pattern, args.num_workers, verbose=True)
    tok = bpe.Tokenizer(vocab, merges, specials, pattern)
    save_bpe(tok, args.out)
    print(f"trained {len(merges):,} merges (vocab {tok.vocab_size:,}) in {time.perf_counter() - t0:.2f} s; "
          f"wrote {args.out} and {_vocab_path(Path(args.out))}")


def _cmd_encode(args):
    tok = load_bpe(args.tokenizer)
    try:
        text = Path(args.file).read_text(encoding="utf-8") if args.file else args.text
    except (OSError, UnicodeDecodeError) as e:
        raise NanoError(f"cannot read {args.file} as UTF-8 text ({type(e).__name__})") from None
    if text is None:
        raise NanoError("nothing to encode (give the text, or --file FILE)")
    ids = tok.encode(text, allowed_special=args.allowed_special)
    print(ids)
    print("|".join(tok.decode_bytes([i]).decode("utf-8", "replace") for i in ids))
    print(f"{len(ids)} tokens for {len(text.encode('utf-8'))} bytes")


def _cmd_compare(args):
    text = Path(args.input).read_text(encoding="utf-8")[:args.max_chars] if args.input else SAMPLE_TEXT
    n_bytes = len(text.encode("utf-8"))
    tokenizers = []
    for name in filter(None, args.reference.split(",")):
        try:
            tokenizers.append((name, load_bpe(name)))
        except NanoError as e:
            print(f"({name} skipped: {e})")
    if args.tokenizer:
        tokenizers += [(spec, load_bpe(spec)) for spec in args.tokenizer]
    else:
        vocab, merges = bpe.train_bpe(text, args.vocab_size, (ENDOFTEXT,))
        tokenizers.append((f"bpe.py trained on this very text (--vocab_size {args.vocab_size}; optimistic)",
                           bpe.Tokenizer(vocab, merges, (ENDOFTEXT,))))
    first_line = text.strip().split("\n")[0][:100]
    print(f"text: {n_bytes:,} bytes" + (f" from {args.input}" if args.input else " (built-in sample)"))
    for name, tok in tokenizers:
        ids = tok.encode(text, allowed_special="all")
        longest = sorted((t for i, t in tok.vocab.items() if i not in tok.special_tokens.values()),
                         key=len, reverse=True)[:5]
        print(f"\n{name}: vocab {tok.vocab_size:,}, {len(ids):,} tokens, {len(ids) / n_bytes:.3f} tokens/byte "
              f"({n_bytes / max(len(ids), 1):.2f} bytes/token)")
        print("  longest tokens: " + ", ".join(render_token(t) for t in longest))
        pieces = (tok.decode_bytes([i]).decode("utf-8", "replace") for i in tok.encode_ordinary(first_line))
        print("  " + "|".join(pieces))


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,  # prog: tokenizer.py, or bpe.py, which runs this
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a tokenizer on a text file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="UTF-8 text file")
    p.add_argument("--vocab_size", type=int, default=4096, help="256 bytes + merges + special tokens")
    p.add_argument("--out", default="tok.bpe", help="tokenizer file (a .vocab listing is written beside it)")
    p.add_argument("--special_tokens", default=ENDOFTEXT, help="comma-separated; '' for none")
    p.add_argument("--pattern", default="gpt2", help="split regex: gpt2, gpt4, or a regex")
    p.add_argument("--num_workers", type=int, default=0, help="processes counting pre-tokens (0: one per CPU)")
    p.set_defaults(run=_cmd_train)
    p = sub.add_parser("encode", help="show the tokens of a text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenizer", default="gpt2", help="a bpe.py file, a tokenizer.json, or a tiktoken name (gpt2, cl100k_base)")
    p.add_argument("--file", default=None, help="encode this file instead of the text argument")
    p.add_argument("--allowed_special", default="none_raise", choices=["none_raise", "all", "none"])
    p.add_argument("text", nargs="?", default=None)
    p.set_defaults(run=_cmd_encode)
    p = sub.add_parser("compare", help="one text under GPT-2, cl100k and your tokenizer",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", default=None, help="text file (default: a built-in sample)")
    p.add_argument("--max_chars", type=int, default=1_000_000, help="use at most this much of --input")
    p.add_argument("--tokenizer", action="append", default=None, help="bpe.py file(s) to compare (repeatable)")
    p.add_argument("--reference", default="gpt2,cl100k_base", help="tiktoken encodings to compare with")
    p.add_argument("--vocab_size", type=int, default=1024, help="without --tokenizer: train one of this size")
    p.set_defaults(run=_cmd_compare)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
