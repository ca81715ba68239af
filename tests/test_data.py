"""data.py: token bins (windows, targets shifted by one, uint32 for large vocabularies), a dataset
prepared once and reused, text files read as UTF-8 or refused in one line."""

import pytest
import torch

import data
from common import NanoError


def test_token_bins(tmp_path):
    data.write_tokens(tmp_path / "train.bin", list(range(100)))
    bins = data.TokenBins(tmp_path, "train")
    x, y = bins.get_batch(4, 8, torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive tokens: targets are the inputs shifted by one
    x2, _ = bins.get_batch(4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_token_bins_of_a_large_vocabulary_are_uint32(tmp_path):
    """Llama 3's 128k or Qwen's 152k ids do not fit uint16: such a dataset is written and read as uint32."""
    alphabet = "".join(chr(0x10000 + i) for i in range(70_000))  # 70,000 characters outside the BMP
    src = tmp_path / "wide.txt"
    src.write_text(alphabet * 2, encoding="utf-8")
    folder = data.prepare_dataset("text:" + str(src), tokenizer="char:" + alphabet, data_root=tmp_path / "data")
    assert data.read_meta(folder)["token_dtype"] == "uint32"
    bins = data.TokenBins(folder, "train")
    assert bins.shards[0].tolist() == list(range(70_000)) + list(range(70_000 - 14_000))  # 90% of the text
    x, y = bins.get_batch(3, 16, torch.Generator().manual_seed(0))
    assert torch.equal(y, (x + 1) % 70_000)


def test_prepared_once_and_reused(tmp_path, char_data):
    meta = data.read_meta(char_data)
    assert meta["tokenizer"].startswith("char:") and meta["train_tokens"] + meta["val_tokens"] == 100_000
    stamp = (char_data / "train.bin").stat().st_mtime_ns
    src = tmp_path / "shakespeare_100k.txt"
    assert data.prepare_dataset("shakespeare_char", input=src, data_root=tmp_path / "data") == char_data
    assert (char_data / "train.bin").stat().st_mtime_ns == stamp  # not tokenized again
    with pytest.raises(NanoError, match="unknown dataset"):
        data.prepare_dataset("nope", data_root=tmp_path / "data")
    with pytest.raises(NanoError, match="prepare the dataset first"):
        data.read_meta(tmp_path / "nowhere")


@pytest.mark.parametrize("raw, says", [(b"to be\x00", "NUL byte at offset 5"), ("naïve".encode("latin-1"), "bad byte at offset 2")])
def test_read_text_file(tmp_path, raw, says):
    path = tmp_path / "t.txt"
    path.write_bytes(raw)
    with pytest.raises(NanoError, match=says):
        data.read_text_file(path, "--data")
    path.write_text("naïve", encoding="utf-8")
    assert data.read_text_file(path) == "naïve"


def test_get_batch_draws_every_window(tmp_path):
    """Every start 0 .. size - block_size - 1 of every shard is drawn (the last window too, as
    nanoGPT's randint(len(data) - block_size)), and a file of exactly block_size + 1 tokens is enough."""
    data.write_tokens(tmp_path / "train_000.bin", list(range(20)))
    data.write_tokens(tmp_path / "train_001.bin", list(range(100, 109)))  # 9 tokens: block 8 has one window
    bins = data.TokenBins(tmp_path, "train")
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(100):
        x, y = bins.get_batch(16, 8, g)
        assert torch.equal(y, x + 1)
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(20 - 8)) | {100}
    data.write_tokens(tmp_path / "val.bin", list(range(9)))
    x, y = data.TokenBins(tmp_path, "val").get_batch(3, 8, g)
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3
    with pytest.raises(NanoError, match="shorter than block_size"):
        data.TokenBins(tmp_path, "val").get_batch(3, 9, g)


def test_tinystories_sample(tmp_path):
    """--dataset tinystories on the shipped sample: GPT-2 tokens, each story after an end-of-text
    token (as tiktoken encodes it), the last story held out, bytes counted for bits per byte."""
    import tiktoken

    folder = data.prepare_dataset("tinystories", input=data.TINYSTORIES_SAMPLE, data_root=tmp_path)
    texts = list(data.stories(data.TINYSTORIES_SAMPLE))
    assert len(texts) == 5 and all(t.startswith(("Once", "One")) and "<|endoftext|>" not in t for t in texts)
    enc = tiktoken.get_encoding("gpt2")
    expected = {"train": [i for t in texts[:4] for i in [enc.eot_token] + enc.encode(t)],
                "val": [enc.eot_token] + enc.encode(texts[4])}
    meta = data.read_meta(folder)
    for split, ids in expected.items():
        assert data.TokenBins(folder, split).shards[0].tolist() == ids
        assert meta[f"{split}_tokens"] == len(ids)
    assert meta["val_bytes"] == len(texts[4].encode()) and meta["tokenizer"] == "gpt2"
    with pytest.raises(NanoError, match="not found"):
        data.prepare_dataset("tinystories", input=tmp_path / "none.txt", data_root=tmp_path / "other")
