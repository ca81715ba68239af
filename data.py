"""Data plumbing: tokenizers by spec and their chat templates, token-bin datasets, downloads.

Tokenizer specs (what a checkpoint records and `load_tokenizer` reads):
- "gpt2" (also r50k_base, cl100k_base, o200k_base): tiktoken; GPT-2's files ship in assets/,
  so "gpt2" works offline;
- "char:<alphabet>": one id per character of the alphabet;
- "chat:<base spec>": the base tokenizer plus sft.py's four chat tokens;
- a path to a tokenizer saved by bpe.py, or to a Hugging Face tokenizer.json (Llama 3,
  Qwen, SmolLM, ...: byte-level BPE, read by bpe.py).

Chat templates, the tokenizer side (transformers keeps it on the tokenizer: apply_chat_template):
a conversation rendered to ids with nanollm's <|role|> content <|end|> or a Hugging Face model's
Jinja chat_template, the prompt serve.py generates from; sft.py builds its loss mask on the same
pieces (`chat_pieces`).

Datasets are tokenized once into `data/<name>/{train,val}.bin` (uint16 ids; uint32 past 65,536) plus
`meta.json`, then sampled as random windows by `TokenBins`. Tiny Shakespeare ships in
assets/, so the default runs need no network; FineWeb-Edu and others are downloaded.

This file imports `common` (and `bpe` lazily, for a saved bpe.py tokenizer or a tokenizer.json).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import struct
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import NanoError, atomic_write

ASSETS = Path(__file__).resolve().parent / "assets"
SHAKESPEARE_PATH = ASSETS / "tinyshakespeare.txt"  # Tiny Shakespeare (public domain), 1,115,394 bytes
# GPT-2's BPE files laid out as tiktoken's cache (each named by the sha1 of its URL), so
# TIKTOKEN_CACHE_DIR=assets/tiktoken_cache also makes plain tiktoken work offline
TIKTOKEN_CACHE = ASSETS / "tiktoken_cache"
GPT2_VOCAB_BPE = TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"  # vocab.bpe: merges in rank order
GPT2_ENCODER_JSON = TIKTOKEN_CACHE / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"  # encoder.json: token -> id

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_URL = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/{:03d}_00000.parquet"
FINEWEB_SHARD_TOKENS = 100_000_000


# ----------------------------------------------------------------------------------------
# Tokenizers: "gpt2" (tiktoken), "char:<alphabet>", or a path to a bpe.py file


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
def _tiktoken_encoding(name: str):
    import tiktoken

    if name != "gpt2":
        return tiktoken.get_encoding(name)  # downloaded into tiktoken's cache the first time
    # GPT-2 from the shipped files (hash-checked by tiktoken), so it never needs the network
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        str(GPT2_VOCAB_BPE), str(GPT2_ENCODER_JSON),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


class TiktokenTokenizer:
    def __init__(self, name="gpt2"):
        try:
            self.enc = _tiktoken_encoding(name)
        except Exception as e:  # a download that failed: tiktoken raises requests' errors
            raise NanoError(f"could not load tiktoken's {name!r} ({e.__class__.__name__}; "
                            "check the network, or use 'gpt2', which ships with nanollm)") from None
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token
        self.spec = name

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(list(ids))


class BPEFileTokenizer:
    """A tokenizer saved by bpe.py, or a Hugging Face tokenizer.json (a path ending in .json)
    that bpe.py reads; bpe is imported lazily: only these specs need it."""

    def __init__(self, path):
        import bpe

        self.error = bpe.BPEError  # bpe.py imports nothing of ours: its errors become NanoErrors here
        with self.as_nano_error():
            self.tok = bpe.Tokenizer.from_tokenizer_json(path) if str(path).endswith(".json") else bpe.Tokenizer.load(path)
        self.vocab_size, self.eot_id = self.tok.vocab_size, self.tok.eot_id
        self.spec = str(path)

    @contextlib.contextmanager
    def as_nano_error(self):
        try:
            yield
        except self.error as e:
            raise NanoError(str(e)) from None

    def encode(self, text):
        with self.as_nano_error():
            return self.tok.encode(text, allowed_special="all")

    def decode(self, ids):
        with self.as_nano_error():
            return self.tok.decode(list(ids))


ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # ids: base vocab_size + 0..3
CHAT_PREFIX = "chat:"


class ChatTokenizer:
    """A base tokenizer (data.load_tokenizer) with the chat tokens appended after its
    vocabulary, ids base.vocab_size + 0..3. Spec "chat:<base spec>". eot_id is <|end|>, so
    sample.py --stop_at_eot and dpo.py (which appends eot_id to answers) end an assistant
    turn where the template does. encode() turns the special strings in a text into their
    ids (a prompt typed for sample.py / dpo.py works); encode_ordinary() never does: the
    template uses it for content."""

    def __init__(self, base):
        if base.spec.startswith(CHAT_PREFIX):
            raise NanoError(f"tokenizer {base.spec[:40]!r} already has chat tokens (use it as it is)")
        self.base = base
        self.special = {s: base.vocab_size + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.role_id = dict(zip(ROLES, self.special.values()))
        self.assistant_id, self.end_id = self.special["<|assistant|>"], self.special["<|end|>"]
        self.vocab_size = base.vocab_size + len(SPECIAL_TOKENS)
        self.eot_id = self.end_id
        self.spec = CHAT_PREFIX + base.spec
        self._split = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")
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
    if isinstance(spec, str) and spec.startswith(CHAT_PREFIX):  # sft.py's chat tokens on a base tokenizer
        return ChatTokenizer(load_tokenizer(spec[len(CHAT_PREFIX):]))
    if spec is None:
        raise NanoError("no tokenizer recorded (pass one, e.g. 'gpt2' or 'char:abc')")
    if spec.startswith("char:"):
        return CharTokenizer(spec[len("char:"):])
    if spec in ("gpt2", "r50k_base", "cl100k_base", "o200k_base"):
        return TiktokenTokenizer(spec)
    if Path(spec).is_file():
        return BPEFileTokenizer(spec)
    raise NanoError(f"tokenizer {spec!r} is neither 'gpt2', 'char:<alphabet>', a bpe.py file nor a tokenizer.json")


# ----------------------------------------------------------------------------------------
# Chat templates, the tokenizer side: a conversation -> the ids a chat model reads. transformers
# keeps this on the tokenizer (apply_chat_template); sft.py builds its loss mask on the same pieces.


class HFChatTemplate:
    """A Hugging Face `chat_template` (Jinja), rendered as transformers renders it: a sandboxed
    environment with trim_blocks / lstrip_blocks, `raise_exception`, `strftime_now` and a
    `tojson` that keeps non-ASCII text (tests/test_sft.py compares with apply_chat_template)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2  # comes with torch; only Hugging Face templates need it
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise NanoError(f"the chat template refuses this conversation: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise NanoError(f"the chat template does not parse ({e.__class__.__name__}: {e})") from None
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    def text(self, messages, add_generation_prompt=False) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise NanoError(f"the chat template failed ({e.__class__.__name__}: {e})") from None

    def segments(self, messages, add_generation_prompt=False) -> list[tuple[str, bool]]:
        """The rendered text cut at the assistant's answers, [(text, is an answer)], found by
        rendering prefixes: the text of messages[:i] with the generation prompt ends where
        assistant message i starts, the text of messages[:i+1] where it ends; that span is the
        answer plus whatever the template closes it with (e.g. "<|im_end|>\\n")."""
        segments, done = [], ""  # and the text covered so far
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = self.text(messages[:i], True), self.text(messages[:i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise NanoError("the chat template renders a conversation differently from its beginning "
                                "(it rewrites earlier turns), so the assistant's tokens cannot be found")
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = self.text(messages, add_generation_prompt)
        if not rest.startswith(done):
            raise NanoError("the chat template renders a conversation differently from its beginning")
        segments.append((rest[len(done):], False))
        return segments

    @classmethod
    def find(cls, spec):
        """The template beside a Hugging Face tokenizer.json spec (tokenizer_config.json's
        chat_template, or a chat_template.jinja file), or None."""
        if not isinstance(spec, str) or spec.startswith(CHAT_PREFIX) or not spec.endswith("tokenizer.json"):
            return None
        folder = Path(spec).parent
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
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

        return cls(source, token("bos_token"), token("eos_token"))


def chat_pieces(messages, tok, template=None, add_generation_prompt=False) -> list[tuple[list[int], bool]]:
    """A conversation as token pieces [(ids, is an answer)]: an answer is an assistant message's
    content with what closes its turn (transformers marks the same spans with
    return_assistant_tokens_mask). Joined, the pieces are the conversation's ids. template: an
    HFChatTemplate, else nanollm's own, <|role|> content <|end|> per message, which needs a
    ChatTokenizer; content is encoded as plain text, so a user cannot forge a turn by typing
    "<|assistant|>". add_generation_prompt appends the opening of an assistant turn."""
    if template is not None:
        # segment by segment, so a token never straddles an answer's edge (the edges sit at the
        # template's special tokens and newlines, where BPE splits anyway)
        return [(tok.encode(text) if text else [], answer)
                for text, answer in template.segments(messages, add_generation_prompt)]
    if not isinstance(tok, ChatTokenizer):
        raise NanoError(f"tokenizer {tok.spec[:40]!r} has no chat tokens (wrap it: ChatTokenizer(tok), "
                        "or finetune the model with sft.py first)")
    pieces = []
    for m in messages:  # the role token opens the turn: given, never part of the answer
        pieces += [([tok.role_id[m["role"]]], False),
                   (tok.encode_ordinary(m["content"]) + [tok.end_id], m["role"] == "assistant")]
    if add_generation_prompt:
        pieces.append(([tok.assistant_id], False))
    return pieces


def apply_chat_template(messages, tok, template=None, add_generation_prompt=False) -> list[int]:
    """The conversation's ids, as transformers' tokenizer.apply_chat_template gives them; with
    add_generation_prompt, the prompt a chat model answers (serve.py)."""
    return [i for ids, _ in chat_pieces(messages, tok, template, add_generation_prompt) for i in ids]


def load_chat(spec):
    """(tokenizer, template) for a checkpoint's tokenizer spec: the chat tokens of a "chat:"
    spec (template None), or a Hugging Face tokenizer with its chat_template."""
    tok = load_tokenizer(spec)
    template = HFChatTemplate.find(spec)
    if template is None and not isinstance(tok, ChatTokenizer):
        raise NanoError(f"tokenizer {str(spec)[:40]!r} has no chat template (finetune the model with sft.py first)")
    return tok, template


def stop_id(tok, template=None) -> int:
    """The token that ends an assistant turn: <|end|>, or the template's eos token."""
    if template is None:
        return tok.end_id
    ids = tok.encode(template.eos_token) if template.eos_token else []
    if len(ids) != 1:
        raise NanoError(f"the chat template's eos_token {template.eos_token!r} is not one token "
                        "(check tokenizer_config.json)")
    return ids[0]


# A checkpoint carries the file of a file-based tokenizer (a bpe.py model is a few hundred KB),
# so moving or deleting data/ never orphans it; the path stays in the spec as a hint.


def tokenizer_file(spec) -> Path | None:
    """The file a spec names (a bpe.py model or a tokenizer.json, also under chat:), or None."""
    base = spec[len(CHAT_PREFIX):] if isinstance(spec, str) and spec.startswith(CHAT_PREFIX) else spec
    if not isinstance(base, str) or base.startswith("char:") or not Path(base).is_file():
        return None
    return Path(base)


def pack_tokenizer(spec) -> dict | None:
    """{"name", "data"} of the spec's tokenizer file, for a checkpoint; None for other specs."""
    path = tokenizer_file(spec)
    return {"name": path.name, "data": path.read_bytes()} if path else None


def unpack_tokenizer(spec, packed: dict | None):
    """The spec to load a checkpoint's tokenizer with: the recorded path while it still holds the
    same bytes, else a copy of the packed file under ~/.cache/nanollm/tokenizers (by content hash)."""
    if not packed or not isinstance(spec, str):
        return spec
    path = tokenizer_file(spec)
    if path is not None and path.read_bytes() == packed["data"]:
        return spec
    import hashlib

    digest = hashlib.sha256(packed["data"]).hexdigest()[:16]
    folder = nanollm_cache() / "tokenizers"
    copy = folder / f"{digest}-{Path(packed['name']).name}"
    if not copy.is_file():
        atomic_write(copy, lambda tmp: tmp.write_bytes(packed["data"]))
    chat = spec.startswith(CHAT_PREFIX)
    return (CHAT_PREFIX if chat else "") + str(copy)


def read_checkpoint(path, device="cpu") -> dict:
    """A checkpoint's dict (gpt.save_checkpoint's), checked; its tokenizer spec points at a file
    that holds the tokenizer (the packed copy where the recorded path no longer does)."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"checkpoint {path} not found (train one with train.py or check the path)")
    try:
        # weights_only: a downloaded checkpoint is data, it must not be able to run code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip or unpickler errors
        raise NanoError(f"{path} is not a readable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise NanoError(f"{path} is not a nanollm checkpoint (needs 'model' and 'config')")
    ckpt["tokenizer"] = unpack_tokenizer(ckpt.get("tokenizer"), ckpt.get("tokenizer_file"))
    return ckpt


def read_text_file(path, option: str = "") -> str:
    """The file as UTF-8 text, or one NanoError line naming the file (and the option that gave it)
    and the offset of the first byte that is not text."""
    path, which = Path(path), f"; check {option}" if option else ""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NanoError(f"cannot read {path} ({e.strerror}{which})") from None
    nul = raw.find(b"\0")  # valid UTF-8 all the same, but text has no NUL bytes (binaries and UTF-16 do)
    if nul >= 0:
        raise NanoError(f"{path} is not UTF-8 text (NUL byte at offset {nul}: a binary or UTF-16 file; "
                        "convert it to UTF-8 text)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanoError(f"{path} is not UTF-8 text (bad byte at offset {e.start}; convert it to UTF-8)") from None


# ----------------------------------------------------------------------------------------
# Downloads


def download(url: str, dest, expected_size: int | None = None, hint: str = "check the network",
             headers: dict | None = None) -> Path:
    """Stream url to dest through a temp file, so an interrupted download never looks
    complete; the size is checked against expected_size or the server's Content-Length."""
    dest = Path(dest)
    if dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    import requests  # imported here: only downloads need it

    print(f"downloading {url} -> {dest}", file=sys.stderr)
    # identity encoding, so Content-Length counts the bytes we write (not gzip's)
    headers = {"Accept-Encoding": "identity", **(headers or {})}

    def fetch(tmp):
        with requests.get(url, stream=True, timeout=60, headers=headers) as r:
            r.raise_for_status()
            expected = expected_size or int(r.headers.get("Content-Length", 0))
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        got = tmp.stat().st_size
        if expected and got != expected:
            raise NanoError(f"{url} arrived with {got} of {expected} bytes (run again)")

    try:
        atomic_write(dest, fetch)  # a per-process temp file: DDP ranks may race
    except requests.RequestException as e:
        raise NanoError(f"could not download {url} ({e.__class__.__name__}; {hint})") from None
    return dest


# ----------------------------------------------------------------------------------------
# Hugging Face model folders: config.json, tensor names and shapes, safetensors shards,
# downloads. gpt.py builds the model and asks these to fill it (gpt.load_pretrained).

HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def hf_config_fields(hf: dict) -> dict:
    """gpt.GPTConfig's fields from a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise NanoError(f"model_type {kind!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)})")
    if kind == "gpt2":
        gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}.get(hf.get("activation_function", "gelu_new"))
        if gelu is None:
            raise NanoError(f"gpt2 config.json with activation_function {hf['activation_function']!r} is not supported "
                            "(gelu_new or gelu)")
        return dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                    n_head=hf["n_head"], n_embd=hf["n_embd"], mlp_hidden=hf.get("n_inner") or 0,
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), gelu=gelu)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    bias = hf.get("attention_bias", False)
    unsupported = [what for what, bad in (
        (f"rope type {rope_type!r}", rope_type not in ("default", "llama3")),
        (f"hidden_act {hf.get('hidden_act')!r}", hf.get("hidden_act", "silu") != "silu"),
        ("sliding-window layers", hf.get("use_sliding_window", False)),
        ("attention_bias != mlp_bias", kind == "llama" and bias != hf.get("mlp_bias", False))) if bad]
    if unsupported:
        raise NanoError(f"{kind} config.json with {unsupported[0]} is not supported (only what Llama 3, "
                        "Mistral, Qwen2/3 use)")
    block_size = hf.get("max_position_embeddings", 2048)
    if kind == "mistral" and hf.get("sliding_window"):  # a window of W keys = block_size W (sample.py slides it)
        block_size = min(block_size, hf["sliding_window"])
    llama3 = dict(rope_scaling=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                  rope_high_freq_factor=rope["high_freq_factor"],
                  rope_original_max_position=rope["original_max_position_embeddings"]) if rope_type == "llama3" else {}
    return dict(**llama3,
        arch="llama", block_size=block_size, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], bias=bias and kind != "qwen2",
        mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim") or 0,
        qkv_bias=kind == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False), qk_norm=kind == "qwen3")


def gpt2_config_fields(shapes: dict) -> dict:
    """GPTConfig's fields read off a GPT-2 state dict's tensor shapes (names without "transformer.")."""
    if "wte.weight" not in shapes:
        raise NanoError("not a GPT-2 state dict (no wte.weight; pass the config of another model)")
    vocab_size, n_embd = shapes["wte.weight"]
    if n_embd % 64:  # the weights do not say how many heads; every released GPT-2 has 64-dim heads
        raise NanoError(f"n_embd {n_embd} is not a multiple of 64: pass a GPTConfig with n_head")
    return dict(block_size=shapes["wpe.weight"][0], vocab_size=vocab_size, n_embd=n_embd, n_head=n_embd // 64,
                n_layer=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("h.")), bias="ln_f.bias" in shapes)


# Hugging Face's GPT-2 stores these projections as Conv1D, weight (in, out): transposed
# relative to nn.Linear's (out, in) whenever weights cross between the two
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Llama's family, HF -> ours: the containers and block norms are renamed (so every script
# finds transformer.h[i].attn, .mlp, .ln_1); the projections keep HF's names
HF_LLAMA_NAMES = (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."),
                  ("model.norm.", "transformer.ln_f."), (".self_attn.", ".attn."),
                  (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."))


def from_hf_name(name: str, arch: str) -> str:
    if arch == "gpt2":
        return name if name == "lm_head.weight" else "transformer." + name.removeprefix("transformer.")
    for theirs, ours in HF_LLAMA_NAMES:
        name = name.replace(theirs, ours)
    return name


def to_hf_name(name: str, arch: str) -> str:
    """One of our tensor names in Hugging Face's spelling (e.g. for PEFT adapters)."""
    for theirs, ours in HF_LLAMA_NAMES if arch != "gpt2" else ():
        name = name.replace(ours, theirs)
    return name


def fill(model, key: str, tensor):
    """Put a loaded tensor in place of parameter `key` (GPT-2's Conv1D weights transposed)."""
    if model.config.arch == "gpt2" and key.endswith(HF_CONV1D_WEIGHTS):
        tensor = tensor.t().contiguous()
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))


def hf_plan(model, shapes: dict, where="the state dict") -> dict:
    """{HF name: our name} of every tensor to load, after checking names and shapes against
    the model: one-line NanoError for a foreign, mis-shaped or missing tensor."""
    arch, ours, plan = model.config.arch, dict(model.named_parameters()), {}
    for name, shape in shapes.items():
        key = from_hf_name(name, arch)
        if name.endswith((".attn.bias", ".attn.masked_bias")) and key not in ours:
            continue  # causal-mask buffers of old HF GPT-2 versions
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # the same matrix as the token embedding
        if key not in ours:
            raise NanoError(f"unexpected tensor {name!r} in {where} (not a {arch} model of this config)")
        want = tuple(ours[key].shape)[::-1] if arch == "gpt2" and key.endswith(HF_CONV1D_WEIGHTS) \
            else tuple(ours[key].shape)
        if tuple(shape) != want:
            raise NanoError(f"{name} in {where} has shape {tuple(shape)}, the config wants {want} "
                            "(weights of another model size?)")
        plan[name] = key
    missing = sorted(set(ours) - set(plan.values()))
    if missing:
        raise NanoError(f"{where} lacks {len(missing)} tensors, e.g. {to_hf_name(missing[0], arch)} "
                        "(a shard missing, or weights of another model)")
    return plan


def nanollm_cache() -> Path:
    """Where downloads and restored tokenizers go (read at call time: HOME may change)."""
    return Path.home() / ".cache" / "nanollm"


def is_hub_name(name: str) -> bool:
    """"owner/name" as the hub spells a repository: not a path here, nor a checkpoint file's name."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and Path(name).suffix not in (".pt", ".pth")


def hf_folder(name_or_dir: str, cache_dir=None) -> tuple[Path, dict, list[str], str | None]:
    """(folder, its config.json as a dict, its safetensors files, tokenizer spec) of a Hugging Face
    model folder, a hub name (downloaded into ~/.cache/nanollm) or a GPT-2 size; checked before any
    weight is read. The spec is the folder's tokenizer.json, "gpt2" for the GPT-2 sizes, else None."""
    cache = Path(cache_dir) if cache_dir else nanollm_cache()
    folder, spec = Path(name_or_dir), None
    if name_or_dir in GPT2_SIZES and not folder.is_dir():
        folder, spec = download_hf(f"openai-community/{name_or_dir}", cache / name_or_dir, tokenizer=False), "gpt2"
    elif not folder.is_dir():
        if not is_hub_name(name_or_dir):
            raise NanoError(f"unknown model {name_or_dir!r} (a Hugging Face folder, a hub name like "
                            f"HuggingFaceTB/SmolLM2-135M, or one of {', '.join(GPT2_SIZES)})")
        folder = download_hf(name_or_dir, cache / name_or_dir)
    if not (folder / "config.json").is_file():
        raise NanoError(f"{folder} has no config.json (a Hugging Face model folder needs one)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoError(f"{folder / 'config.json'} is not valid JSON ({e.__class__.__name__}; download it again)") from None
    files = weight_files(folder)
    for name in files:
        if not (folder / name).is_file():
            raise NanoError(f"{folder} lacks {name} of {len(files)} weight file(s) (download it again)")
    if spec is None and (folder / "tokenizer.json").is_file():
        spec = str(folder / "tokenizer.json")
    return folder, config, files, spec


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a folder: the shards its index lists, or the one model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def download_hf(repo: str, folder: Path, tokenizer=True) -> Path:
    """config.json, the safetensors (one file or the shards its index lists) and tokenizer.json of
    a hub repository into folder; files already there are not fetched again. HF_TOKEN, when set,
    is sent for gated repositories (Llama)."""
    base = f"https://huggingface.co/{repo}/resolve/main/"
    hint = "check the name; a gated model needs HF_TOKEN set and its licence accepted"
    auth = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else None
    get = functools.partial(download, hint=hint, headers=auth)
    get(base + "config.json", folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if not (folder / "model.safetensors").is_file():
        try:
            get(base + index.name, index)
        except NanoError:  # no index: one file
            pass
    for name in weight_files(folder):
        get(base + name, folder / name)
    if tokenizer:
        try:
            get(base + "tokenizer.json", folder / "tokenizer.json")
        except NanoError:  # the weights are usable without it; gpt.load_pretrained's spec says None
            pass
    return folder


# safetensors: an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
# "data_offsets"}}, then the raw tensor bytes

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def safetensors_header(path) -> tuple[dict, int]:
    """The header {name: {"dtype", "shape", "data_offsets"}} and where the tensor bytes begin."""
    with open(path, "rb") as f:
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > os.path.getsize(path):
                raise ValueError
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError):
            raise NanoError(f"{path} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise NanoError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    return header, 8 + header_len


def read_safetensors(path, names=None) -> dict:
    """Every tensor of the file (or those in `names`), each read straight into its own memory."""
    header, base = safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            if end - start != t.numel() * t.element_size():
                raise NanoError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']} (corrupt file)")
            f.seek(base + start)
            if end > start and f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise NanoError(f"{path} is truncated at tensor {name} (download it again)")
            tensors[name] = t
    return tensors


def write_safetensors(path, tensors: dict):
    """Write tensors as one safetensors file: the header first, then each tensor's bytes
    streamed straight from its memory (no copy of the whole model is built), through a temp
    file renamed at the end."""
    dtype_names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so tensor data is 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for t in tensors.values():
                t = t.detach().cpu().contiguous()
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------
# Token bins shared by train.py, fsdp2_train.py, moe.py, lora.py, ...


def token_dtype(vocab_size: int) -> str:
    """Bins hold uint16 ids (GPT-2's 50257 fit, half the bytes of uint32); larger vocabularies
    (Llama 3's 128,256, Qwen's 151,936) need uint32. meta.json records which."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_tokens(path, ids, dtype="uint16"):
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and arr.max() > np.iinfo(dtype).max:
        raise NanoError(f"token id {arr.max()} does not fit {dtype} bins (the tokenizer's vocab_size is too small)")
    atomic_write(path, arr.astype(dtype).tofile)


VAL_FRACTION = 0.1  # the last 10% of a text is its validation split


def prepare_dataset(name: str, input=None, tokenizer=None, data_root="data", val_fraction=VAL_FRACTION) -> Path:
    """Tokenize a dataset once into data_root/<name>/{train,val}.bin + meta.json; returns the folder.

    name: "shakespeare_char" (characters), "shakespeare" (GPT-2 BPE), "fineweb_edu"
    (FineWeb-Edu sample-10BT, 100M-token shards), or "text:<path>" (any local text file,
    tokenizer spec from `tokenizer`, default gpt2). input: another copy of the raw text
    instead of the shipped Tiny Shakespeare."""
    if name.startswith("text:"):
        src = Path(name[len("text:"):])
        folder = Path(data_root) / ("text_" + src.stem)
        spec = tokenizer or "gpt2"
    elif name in ("shakespeare_char", "shakespeare"):
        folder, src = Path(data_root) / name, input
        spec = tokenizer or ("gpt2" if name == "shakespeare" else None)
    elif name == "fineweb_edu":
        return prepare_fineweb(Path(data_root) / name, tokenizer or "gpt2")
    else:
        raise NanoError(f"unknown dataset {name!r} (shakespeare_char, shakespeare, fineweb_edu, text:<path>)")
    if src is None:
        src = SHAKESPEARE_PATH
        if not src.is_file():  # a copy of the code without assets/: fetch the canonical file
            src = download(SHAKESPEARE_URL, Path(data_root) / "tinyshakespeare.txt",
                           hint="check the network or pass --input PATH to a local copy")
    src = Path(src)
    meta_path = folder / "meta.json"
    if meta_path.exists():  # prepared before: reuse it unless the tokenizer or the source changed
        meta = json.loads(meta_path.read_text())
        if (spec is None or meta["tokenizer"] == spec) and meta["source"] == str(src) and "val_bytes" in meta:
            return folder
    if not src.is_file():
        raise NanoError(f"input file {src} not found (check --input / the text: path)")
    text = read_text_file(src)
    if not text:
        raise NanoError(f"input file {src} is empty")
    if spec is None:  # character level: the alphabet is the set of characters in the text
        spec = "char:" + "".join(sorted(set(text)))
    tok = load_tokenizer(spec)
    split = int(len(text) * (1 - val_fraction))
    folder.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = tok.encode(text[:split]), tok.encode(text[split:])
    dtype = token_dtype(tok.vocab_size)
    write_tokens(folder / "train.bin", train_ids, dtype)
    write_tokens(folder / "val.bin", val_ids, dtype)
    meta = {"tokenizer": spec, "vocab_size": tok.vocab_size, "token_dtype": dtype, "source": str(src),
            "train_tokens": len(train_ids), "val_tokens": len(val_ids),  # bytes: for bits per byte
            "train_bytes": len(text[:split].encode("utf-8")), "val_bytes": len(text[split:].encode("utf-8"))}
    # meta.json is what says "prepared": written last, atomically
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    print(f"prepared {folder}: {len(train_ids):,} train and {len(val_ids):,} val tokens", file=sys.stderr)
    return folder


_worker_tokenizer = None


def _init_worker(spec):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)  # once per worker process, not once per document


def _tokenize_doc(text):
    tok = _worker_tokenizer  # documents are delimited by the end-of-text token
    return np.asarray([tok.eot_id] + tok.encode(text), dtype=token_dtype(tok.vocab_size))


def prepare_fineweb(folder: Path, spec: str, n_files: int = 14) -> Path:
    """FineWeb-Edu sample-10BT (its 14 parquet files, ~10B GPT-2 tokens): downloaded with
    requests, read with pyarrow (optional dependency), tokenized by a worker pool, written in
    100M-token shards; the first shard is the validation split (as in build-nanogpt)."""
    if (folder / "meta.json").exists():
        return folder
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NanoError("fineweb_edu needs pyarrow (pip install pyarrow)") from None
    import multiprocessing as mp

    tok = load_tokenizer(spec)
    if tok.eot_id is None:
        raise NanoError(f"tokenizer {spec!r} has no end-of-text token to delimit FineWeb's documents (use one that has)")
    folder.mkdir(parents=True, exist_ok=True)
    shard, buf, n_buf, total, dtype = 0, [], 0, 0, token_dtype(tok.vocab_size)

    def flush():
        nonlocal shard, buf, n_buf
        write_tokens(folder / f"{'val' if shard == 0 else 'train'}_{shard:06d}.bin", np.concatenate(buf), dtype)
        shard, buf, n_buf = shard + 1, [], 0

    with mp.Pool(max(1, os.cpu_count() // 2), initializer=_init_worker, initargs=(spec,)) as pool:
        for i in range(n_files):
            path = download(FINEWEB_URL.format(i), folder / "raw" / f"{i:03d}.parquet")
            texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
            for ids in pool.imap(_tokenize_doc, texts, chunksize=16):
                buf.append(ids)
                n_buf += len(ids)
                total += len(ids)
                if n_buf >= FINEWEB_SHARD_TOKENS:
                    flush()
                    print(f"fineweb_edu: {total:,} tokens", file=sys.stderr)
    if buf:
        flush()
    (folder / "meta.json").write_text(json.dumps({"tokenizer": spec, "vocab_size": tok.vocab_size, "token_dtype": dtype,
                                                  "shards": shard, "tokens": total}, indent=1))
    return folder


def read_meta(data_dir) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise NanoError(f"{path} not found (prepare the dataset first)")
    return json.loads(path.read_text())


class TokenBins:
    """Every `<split>*.bin` shard in a folder, memory-mapped, sampled as random windows."""

    def __init__(self, data_dir, split):
        paths = sorted(Path(data_dir).glob(f"{split}*.bin"))
        if not paths:
            raise NanoError(f"no {split}*.bin in {data_dir} (prepare the dataset first)")
        meta = Path(data_dir) / "meta.json"  # uint16 unless it says otherwise (a large vocabulary)
        dtype = json.loads(meta.read_text()).get("token_dtype", "uint16") if meta.is_file() else "uint16"
        self.shards = [np.memmap(p, dtype=dtype, mode="r") for p in paths]
        self.sizes = torch.tensor([len(s) for s in self.shards], dtype=torch.float64)

    def get_batch(self, batch_size, block_size, generator, device="cpu"):
        """x, y: int64 (B, T), y shifted by one. The generator's state is the data position."""
        usable = (self.sizes - block_size - 1).clamp(min=0)
        if usable.sum() == 0:
            raise NanoError(f"the data is shorter than block_size + 1 = {block_size + 1} tokens")
        shard_ids = torch.multinomial(usable, batch_size, replacement=True, generator=generator)
        offsets = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * usable[shard_ids]).long()
        rows = [torch.from_numpy(self.shards[s][o:o + block_size + 1].astype(np.int64))
                for s, o in zip(shard_ids.tolist(), offsets.tolist())]
        xy = torch.stack(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if "cuda" in str(device):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
