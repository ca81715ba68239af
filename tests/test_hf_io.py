"""hf_io.py: safetensors written and read back (header layout, dtypes, empty tensors), byte for
byte the reference package's format, bad files as one-line errors; config.json fields and tensor
names both ways."""

import json
import math
import struct

import pytest
import torch

import gpt
import hf_io
from common import NanoError


def test_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2, 2).bfloat16(),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    hf_io.write_safetensors(path, tensors)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["a"] == {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}
    back = hf_io.read_safetensors(path)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_safetensors_matches_reference_package(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors not installed: format parity not checked")
    tensors = {"w": torch.randn(4, 6), "h": torch.randn(3).half(), "b": torch.randn(5).bfloat16()}
    st.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    for k, v in hf_io.read_safetensors(tmp_path / "ref.safetensors").items():
        assert torch.equal(v, tensors[k])
    hf_io.write_safetensors(tmp_path / "ours.safetensors", tensors)
    for k, v in st.load_file(tmp_path / "ours.safetensors").items():
        assert torch.equal(v, tensors[k])


def test_bad_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 40)
    with pytest.raises(NanoError, match="not a safetensors file"):
        hf_io.read_safetensors(path)


def test_safetensors_header_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    hf_io.write_safetensors(path, {"a": torch.randn(4, 4)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])  # cut off mid-download
    with pytest.raises(NanoError, match=r"cover 64 of 54 data bytes \(truncated"):
        hf_io.read_safetensors(path)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["a"]["dtype"] = "F64"
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    with pytest.raises(NanoError, match="unsupported dtype F64"):
        hf_io.safetensors_header(path)


def lying_header(header):
    """A file of two 2x2 float32 tensors (32 data bytes) under the given header."""
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + bytes(range(32))


OK = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}
LIES = {  # what Hugging Face's safetensors refuses, and the line we answer with
    "negative offset": ({**OK, "a": {**OK["a"], "data_offsets": [-16, 0]}}, "data_offsets \\[-16, 0\\]"),
    "overlap": ({**OK, "b": {**OK["b"], "data_offsets": [8, 24]}}, "starts at byte 8, not 16"),
    "duplicated": ({**OK, "b": {**OK["b"], "data_offsets": [0, 16]}}, "starts at byte 0, not 16"),
    "past the end": ({**OK, "b": {**OK["b"], "shape": [2, 4], "data_offsets": [16, 48]}}, "cover 48 of 32"),
    "size vs shape": ({**OK, "b": {**OK["b"], "shape": [3, 2]}}, "data_offsets \\[16, 32\\] for shape \\[3, 2\\]"),
    "gap": ({"a": OK["a"], "b": {**OK["b"], "shape": [2], "data_offsets": [24, 32]}}, "starts at byte 24, not 16"),
    "string offsets": ({**OK, "a": {**OK["a"], "data_offsets": ["0", "16"]}}, "header entry of a is malformed"),
    "no dtype": ({**OK, "a": {"shape": [2, 2], "data_offsets": [0, 16]}}, "unsupported dtype None"),
    "entry not an object": ({**OK, "a": [0, 16]}, "header entry of a is malformed"),
    "negative dim": ({**OK, "a": {**OK["a"], "shape": [-2, -2]}}, "header entry of a is malformed"),
}


@pytest.mark.parametrize("lie", LIES)
def test_lying_headers_are_refused_as_safetensors_does(tmp_path, lie):
    header, message = LIES[lie]
    path = tmp_path / "lie.safetensors"
    path.write_bytes(lying_header(OK))
    assert set(hf_io.read_safetensors(path)) == {"a", "b"}  # the honest file reads
    path.write_bytes(lying_header(header))
    with pytest.raises(NanoError, match=f"lie.safetensors: .*{message}"):
        hf_io.read_safetensors(path)
    st = pytest.importorskip("safetensors.torch", reason="the safetensors package is the reference")
    with pytest.raises(Exception):  # the reference refuses the same file
        st.load_file(path)


def test_names_both_ways(tiny_config):
    for arch, config in (("gpt2", tiny_config), ("llama", gpt.llama_config(vocab_size=64, block_size=16, n_layer=2,
                                                                             n_head=2, n_embd=32))):
        model = gpt.empty_model(config)
        for name, _ in model.named_parameters():
            assert hf_io.from_hf_name(hf_io.to_hf_name(name, arch), arch) == name
    assert hf_io.to_hf_name("transformer.h.0.attn.q_proj.weight", "llama") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_io.is_hub_name("HuggingFaceTB/SmolLM2-135M") and not hf_io.is_hub_name("out/ckpt.pt")


LLAMA = dict(model_type="llama", vocab_size=10, num_hidden_layers=2, num_attention_heads=2, hidden_size=8,
             intermediate_size=16, max_position_embeddings=64)


@pytest.mark.parametrize("extra, want", [
    (dict(model_type="mistral", sliding_window=16), dict(sliding_window=16, block_size=64)),
    (dict(model_type="mistral", sliding_window=None), dict(sliding_window=0)),
    (dict(model_type="qwen2", use_sliding_window=False, sliding_window=16), dict(sliding_window=0)),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2), dict(sliding_window=0)),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=0), dict(sliding_window=16)),
    (dict(attention_bias=True), dict(attn_bias=True, bias=False)),
    (dict(attention_bias=True, mlp_bias=True), dict(attn_bias=False, bias=True)),
    (dict(model_type="qwen3", attention_bias=True), dict(attn_bias=True, qk_norm=True)),
    (dict(rope_scaling=dict(type="linear", factor=4.0)), dict(rope_type="linear", block_size=256)),
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)),
     dict(rope_type="dynamic", block_size=128, rope_original_max_position=64)),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1e4)),
     dict(rope_type="yarn", block_size=128, rope_original_max_position=32, rope_high_freq_factor=32.0,
          rope_attention_factor=0.1 * math.log(4.0) + 1)),
    (dict(rope_parameters=dict(rope_type="yarn", original_max_position_embeddings=16, rope_theta=1e4, mscale=1.0,
                               mscale_all_dim=1.0)), dict(rope_scaling=4.0, rope_attention_factor=1.0)),
])
def test_config_json_fields(extra, want):
    """What config.json spellings become (the models themselves: tests/test_llama.py against transformers)."""
    fields = hf_io.hf_config_fields({**LLAMA, **extra})
    for key, value in want.items():
        assert fields[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    gpt.GPTConfig(**fields)  # a valid config
