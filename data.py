"""Data plumbing: tokenizers by spec, token-bin datasets, downloads.

Tokenizer specs (what a checkpoint records and `load_tokenizer` reads):
- "gpt2" (also r50k_base, cl100k_base, o200k_base): tiktoken; GPT-2's files ship in assets/,
  so "gpt2" works offline;
- "char:<alphabet>": one id per character of the alphabet;
- "chat:<base spec>": the base tokenizer plus sft.py's four chat tokens;
- a path to a tokenizer saved by bpe.py, or to a Hugging Face tokenizer.json (Llama 3,
  Qwen, SmolLM, ...: byte-level BPE, read by bpe.py).

Datasets are tokenized once into `data/<name>/{train,val}.bin` (uint16 token ids) plus
`meta.json`, then sampled as random windows by `TokenBins`. Tiny Shakespeare ships in
assets/, so the default runs need no network; FineWeb-Edu and others are downloaded.

This file imports `common` (and `bpe` lazily, for a saved bpe.py tokenizer).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from common import NanoError

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

        self.tok = bpe.Tokenizer.from_tokenizer_json(path) if str(path).endswith(".json") else bpe.Tokenizer.load(path)
        self.vocab_size, self.eot_id = self.tok.vocab_size, self.tok.eot_id
        self.spec = str(path)

    def encode(self, text):
        return self.tok.encode(text, allowed_special="all")

    def decode(self, ids):
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
# Downloads


def download(url: str, dest, expected_size: int | None = None, hint: str = "check the network") -> Path:
    """Stream url to dest through a temp file, so an interrupted download never looks
    complete; the size is checked against expected_size or the server's Content-Length."""
    dest = Path(dest)
    if dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    import requests  # imported here: only downloads need it

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")  # per process: DDP ranks may race
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        # identity encoding, so Content-Length counts the bytes we write (not gzip's)
        with requests.get(url, stream=True, timeout=60, headers={"Accept-Encoding": "identity"}) as r:
            r.raise_for_status()
            expected = expected_size or int(r.headers.get("Content-Length", 0))
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        got = tmp.stat().st_size
        if expected and got != expected:
            raise NanoError(f"{url} arrived with {got} of {expected} bytes (run again)")
        os.replace(tmp, dest)
    except requests.RequestException as e:
        raise NanoError(f"could not download {url} ({e.__class__.__name__}; {hint})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------------------
# Token bins shared by train.py, fsdp2_train.py, moe.py, lora.py, ...


def write_tokens(path, ids):
    """Tokens go to disk as uint16 (every vocabulary here is < 65536)."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and arr.max() >= 2**16:
        raise NanoError(f"token id {arr.max()} does not fit uint16 bins (vocab must be < 65536)")
    tmp = Path(f"{path}.tmp")
    arr.astype(np.uint16).tofile(tmp)
    os.replace(tmp, path)


def prepare_dataset(name: str, input=None, tokenizer=None, data_root="data", val_fraction=0.1) -> Path:
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
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NanoError(f"{src} is not UTF-8 text (bad byte at offset {e.start}; convert it to UTF-8)") from None
    if not text:
        raise NanoError(f"input file {src} is empty")
    if spec is None:  # character level: the alphabet is the set of characters in the text
        spec = "char:" + "".join(sorted(set(text)))
    tok = load_tokenizer(spec)
    split = int(len(text) * (1 - val_fraction))
    folder.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = tok.encode(text[:split]), tok.encode(text[split:])
    write_tokens(folder / "train.bin", train_ids)
    write_tokens(folder / "val.bin", val_ids)
    meta = {"tokenizer": spec, "vocab_size": tok.vocab_size, "source": str(src),
            "train_tokens": len(train_ids), "val_tokens": len(val_ids),  # bytes: for bits per byte
            "train_bytes": len(text[:split].encode("utf-8")), "val_bytes": len(text[split:].encode("utf-8"))}
    tmp = meta_path.with_name("meta.json.tmp")  # meta.json is what says "prepared": written last, atomically
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    print(f"prepared {folder}: {len(train_ids):,} train and {len(val_ids):,} val tokens", file=sys.stderr)
    return folder


_worker_tokenizer = None


def _init_worker(spec):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)  # once per worker process, not once per document


def _tokenize_doc(text):
    tok = _worker_tokenizer
    return np.asarray([tok.eot_id] + tok.encode(text), dtype=np.uint16)  # documents are delimited by <|endoftext|>


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

    folder.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(spec)
    shard, buf, n_buf, total = 0, [], 0, 0

    def flush():
        nonlocal shard, buf, n_buf
        write_tokens(folder / f"{'val' if shard == 0 else 'train'}_{shard:06d}.bin", np.concatenate(buf))
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
    (folder / "meta.json").write_text(json.dumps({"tokenizer": spec, "vocab_size": tok.vocab_size,
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
        self.shards = [np.memmap(p, dtype=np.uint16, mode="r") for p in paths]
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
