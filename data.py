"""Data plumbing: datasets tokenized once into token bins, sampled as random windows.

Datasets are tokenized once into `data/<name>/{train,val}.bin` (uint16 ids; uint32 past 65,536) plus
`meta.json`, then sampled as random windows by `TokenBins`. Tiny Shakespeare ships in
assets/, so the default runs need no network; FineWeb-Edu and others are downloaded
(common.download). Tokenizers by spec live in tokenizer.py.

Run (train.py does it for you): python -c "import data; data.prepare_dataset('shakespeare_char')"

This file imports `common` and `tokenizer`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from common import NanoError, atomic_write, download
from tokenizer import load_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
SHAKESPEARE_PATH = ASSETS / "tinyshakespeare.txt"  # Tiny Shakespeare (public domain), 1,115,394 bytes
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_URL = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/{:03d}_00000.parquet"
FINEWEB_SHARD_TOKENS = 100_000_000
# TinyStories (Eldan & Li 2023, arXiv:2305.07759; CDLA-Sharing-1.0): GPT-4's short stories in a child's
# words, ~470M GPT-2 tokens, one file per split; assets/ ships five of them for tests
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"
TINYSTORIES_SAMPLE = ASSETS / "tinystories_sample.txt"


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
    (FineWeb-Edu sample-10BT, 100M-token shards), "tinystories" (TinyStoriesV2-GPT4), or "text:<path>" (any local text file,
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
    elif name == "tinystories":
        return prepare_tinystories(Path(data_root) / name, tokenizer or "gpt2", input, val_fraction)
    else:
        raise NanoError(f"unknown dataset {name!r} (shakespeare_char, shakespeare, fineweb_edu, tinystories, "
                        "text:<path>)")
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


def stories(path):
    """The stories of a TinyStories file, one at a time: they are separated by <|endoftext|> lines."""
    story = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() == "<|endoftext|>":
                if "".join(story).strip():
                    yield "".join(story).strip("\n")
                story = []
            else:
                story.append(line)
    if "".join(story).strip():
        yield "".join(story).strip("\n")


def prepare_tinystories(folder: Path, spec: str, input=None, val_fraction=VAL_FRACTION) -> Path:
    """TinyStoriesV2-GPT4's train and valid files (2.2 GB and 22 MB, downloaded), or one local file
    (`input`, e.g. the shipped sample: its last val_fraction of stories is the val split), each story
    after an end-of-text token, tokenized by a worker pool with progress on stderr."""
    source = str(input) if input else TINYSTORIES_URL.format("*")
    meta_path = folder / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("source") == source:
        return folder
    tok = load_tokenizer(spec)
    if tok.eot_id is None:
        raise NanoError(f"tokenizer {spec!r} has no end-of-text token to delimit the stories (use one that has)")
    if input:
        if not Path(input).is_file():
            raise NanoError(f"input file {input} not found (check --input)")
        texts = list(stories(input))
        if len(texts) < 2:
            raise NanoError(f"{input} holds {len(texts)} stories (a train and a val split need two, "
                            "separated by <|endoftext|> lines)")
        n_val = max(1, int(len(texts) * val_fraction))
        splits = {"train": texts[:-n_val], "val": texts[-n_val:]}
    else:
        splits = {split: stories(download(TINYSTORIES_URL.format(name), folder / "raw" / f"{name}.txt"))
                  for split, name in (("train", "train"), ("val", "valid"))}
    import multiprocessing as mp

    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    meta = {"tokenizer": spec, "vocab_size": tok.vocab_size, "token_dtype": dtype, "source": source}
    with mp.Pool(max(1, os.cpu_count() // 2), initializer=_init_worker, initargs=(spec,)) as pool:
        for split, texts in splits.items():
            parts, sizes = [], []  # token ids and UTF-8 bytes per story (bytes: for bits per byte)
            feed = (sizes.append(len(text.encode("utf-8"))) or text for text in texts)
            for ids in pool.imap(_tokenize_doc, feed, chunksize=64):
                parts.append(ids)
                if len(parts) % 100_000 == 0:
                    print(f"tinystories {split}: {len(parts):,} stories, {sum(map(len, parts)):,} tokens", file=sys.stderr)
            write_tokens(folder / f"{split}.bin", np.concatenate(parts), dtype)
            print(f"tinystories {split}: {len(parts):,} stories, {sum(map(len, parts)):,} tokens", file=sys.stderr)
            meta[f"{split}_tokens"], meta[f"{split}_bytes"] = sum(map(len, parts)), sum(sizes)
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
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
        # a window is block_size + 1 tokens (x and y shifted by one): starts 0 .. size - block_size - 1,
        # size - block_size of them per shard, the last one included (as nanoGPT's randint(len - block_size))
        usable = (self.sizes - block_size).clamp(min=0)
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
