"""GPT-2, the one shared model file of nanollm.

The model is GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"): token + learned position embeddings, a stack of pre-LayerNorm transformer
blocks (causal self-attention, then a GELU MLP), a final LayerNorm and a language-model
head that shares its weight with the token embedding. Module names are those of nanoGPT
and of Hugging Face's GPT-2, so real GPT-2 weights load by name.

Besides the model, this file holds the small contracts every other script shares:
- a memory-efficient loss: lm_head + cross-entropy chunk by chunk, recomputed in backward,
  so the (B*T, vocab) logits never exist at once (the trick of Liger-Kernel / Apple's
  "Cut Your Losses in Large-Vocabulary Language Models", 2024, written in plain PyTorch);
- loading GPT-2 weights from the Hugging Face hub with an own safetensors reader;
- checkpoints (one format, written atomically), tokenizers (tiktoken gpt2, characters,
  or a bpe.py file), token-bin datasets, and a dataclass -> argparse helper.

Run: python gpt.py --init_from gpt2 --prompt "Hello"  (a 20-token smoke test of the
model; sample.py is the real generator).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import struct
import sys
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise SystemExit(f"error: {name} must be positive (got {getattr(self, name)})")
        if self.n_embd % self.n_head:
            raise SystemExit(
                f"error: n_embd {self.n_embd} is not divisible by n_head {self.n_head} "
                "(pick n_embd = n_head * head_dim)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise SystemExit(f"error: dropout must be in [0, 1) (got {self.dropout})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, input_pos=None, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): every head attends independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            # The cache writes this step's keys/values into its slots and hands back every
            # slot (B, n_head, S, head_dim); prefill (T = prompt) and decode (T = 1) are the
            # same code, only the mask says which slots each query may see.
            k, v = kv_cache.update(input_pos, k, v)
            if attn_mask is None:  # query at slot p sees slots 0..p: the causal mask from positions
                slots = torch.arange(k.shape[2], device=x.device)
                attn_mask = (slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, S)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None and kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, input_pos=None, attn_mask=None):
        # pre-LN: normalise the input of each sublayer, keep the residual stream untouched
        x = x + self.attn(self.ln_1(x), kv_cache, input_pos, attn_mask)
        return x + self.mlp(self.ln_2(x))


# Hugging Face's GPT-2 stores these projections as Conv1D, weight (in, out): transposed
# relative to nn.Linear's (out, in) whenever weights cross between the two
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.loss_chunk_size = 1024  # rows of (B*T) per chunk of the memory-efficient loss
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the input embedding and the output projection
        # are one matrix, as in GPT-2; it saves vocab_size * n_embd parameters.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            # Each block adds two projections to the residual stream; scaling them by
            # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth (GPT-2 paper).
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, kv_cache=None, input_pos=None, position_ids=None, attn_mask=None):
        """Run the transformer on idx (B, T) and return the final hidden states (B, T, n_embd)."""
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        if position_ids is None:
            position_ids = input_pos  # (T,), broadcast over the batch
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache[i] if kv_cache is not None else None, input_pos, attn_mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None, input_pos=None, position_ids=None, attn_mask=None):
        x = self.hidden_states(idx, kv_cache, input_pos, position_ids, attn_mask)
        if targets is None:
            return self.lm_head(x), None
        loss = chunked_cross_entropy(
            x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), self.loss_chunk_size
        )
        return None, loss

    def num_params(self, non_embedding=True):
        """Parameter count; the position embedding is left out by default (as nanoGPT),
        the token embedding stays in because it is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # Decay matrices (Linear weights, embeddings); never biases or LayerNorm gains,
        # whose scale carries meaning that decay would pull towards zero. A parameter of
        # 2+ dims that is a bias all the same (e.g. MoE's stacked expert biases) says so
        # with `p.no_weight_decay = True`.
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p.dim() >= 2 and not getattr(p, "no_weight_decay", False) for p in params]
        groups = [
            {"params": [p for p, d in zip(params, decay) if d], "weight_decay": weight_decay},
            {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the weights (forward 2N, backward 4N) plus the
        attention scores, 12 * n_layer * n_embd * T (PaLM paper, appendix B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak.
        fwdbwd_per_iter = sequences of block_size processed per iteration; dt in seconds."""
        if not peak_flops or dt <= 0:
            return None
        return self.flops_per_token() * self.config.block_size * fwdbwd_per_iter / dt / peak_flops

    def crop_block_size(self, block_size):
        """Shrink the context window (e.g. GPT-2's 1024 to a small block): keep the first positions."""
        if block_size < self.config.block_size:
            self.config.block_size = block_size
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Plain sampling without a cache, as in nanoGPT: re-reads the whole window for every
        new token. sample.py teaches the fast way (KV cache, prefill/decode)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :]
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    @classmethod
    def from_hf_state_dict(cls, sd, config: GPTConfig | None = None):
        """Build a GPT from a Hugging Face GPT-2 state dict (GPT2LMHeadModel or GPT2Model names)."""
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        if "wte.weight" not in sd:
            raise SystemExit("error: not a GPT-2 state dict (no wte.weight)")
        if config is None:
            vocab_size, n_embd = sd["wte.weight"].shape
            n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
            head_dim = 64  # the weights do not say how many heads; every released GPT-2 uses 64-dim heads
            if n_embd % head_dim:
                raise SystemExit(f"error: n_embd {n_embd} is not a multiple of 64: pass a GPTConfig with n_head")
            config = GPTConfig(block_size=sd["wpe.weight"].shape[0], vocab_size=vocab_size,
                               n_layer=n_layer, n_head=n_embd // head_dim, n_embd=n_embd,
                               bias="ln_f.bias" in sd)
        model = cls(config)
        ours = model.state_dict()
        converted = {}
        for k, v in sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue  # causal-mask buffers of old HF versions; the head is tied to wte
            key = "transformer." + k
            if key not in ours:
                raise SystemExit(f"error: unexpected tensor {k!r} in the GPT-2 state dict")
            converted[key] = v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v
        missing = set(ours) - set(converted) - {"lm_head.weight"}
        if missing:
            raise SystemExit(f"error: GPT-2 state dict lacks {sorted(missing)[:3]}...")
        for k, v in converted.items():
            if v.shape != ours[k].shape:
                raise SystemExit(f"error: shape of {k} is {tuple(v.shape)}, the config wants {tuple(ours[k].shape)}")
        with torch.no_grad():
            for k, v in converted.items():
                ours[k].copy_(v.to(ours[k].dtype))
        return model

    @classmethod
    def from_pretrained(cls, name: str, cache_dir: str | None = None):
        """Download OpenAI's GPT-2 weights from the Hugging Face hub and load them."""
        sizes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                 "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
        if name not in sizes:
            raise SystemExit(f"error: unknown model {name!r} (choose one of {', '.join(sizes)})")
        n_layer, n_head, n_embd = sizes[name]
        config = GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        url = f"https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
        cache = Path(cache_dir or Path.home() / ".cache" / "nanollm") / name / "model.safetensors"
        download(url, cache)
        return cls.from_hf_state_dict(read_safetensors(cache), config)


# ----------------------------------------------------------------------------------------
# Memory-efficient loss


class _ChunkedLoss(torch.autograd.Function):
    """sum_c loss_fn(x_c @ W.T, t_c) / n_valid without keeping any chunk's logits.

    Forward keeps only x, W and the targets; backward re-runs each chunk's forward and
    differentiates it (torch.func.vjp, the way torch.utils.checkpoint recomputes), so at
    most one (chunk, V) block of logits and its gradient exist at any moment. Nothing is
    derived by hand: any per-chunk loss function works."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, loss_fn):
        ctx.save_for_backward(x, weight, targets)
        ctx.chunk_size, ctx.loss_fn = chunk_size, loss_fn
        n_valid = (targets != -1).sum().clamp(min=1)
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], chunk_size):
            end = start + chunk_size
            total = total + loss_fn(x[start:end] @ weight.t(), targets[start:end])
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, targets = ctx.saved_tensors
        n_valid = (targets != -1).sum().clamp(min=1)
        scale = (grad_out / n_valid).to(torch.float32)
        need_w = ctx.needs_input_grad[1]  # a frozen head (LoRA, QLoRA) skips the V x C gradient
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, x.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            t = targets[start:end]
            if need_w:
                _, vjp_fn = torch.func.vjp(lambda xc, w: ctx.loss_fn(xc @ w.t(), t), x[start:end], weight)
                gx, gw = vjp_fn(scale)
                grad_w += gw
            else:
                _, vjp_fn = torch.func.vjp(lambda xc: ctx.loss_fn(xc @ weight.t(), t), x[start:end])
                (gx,) = vjp_fn(scale)
            grad_x[start:end] = gx
        return grad_x, grad_w.to(weight.dtype) if need_w else None, None, None, None


def cross_entropy_sum(logits, targets):
    # fp32 softmax even under bf16 autocast: the loss of a 50k-way softmax needs the precision
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")


def chunked_cross_entropy(x, weight, targets, chunk_size=1024, loss_fn=cross_entropy_sum):
    """Mean cross-entropy of logits = x @ weight.T over targets != -1, computed chunk by chunk.
    x: (N, C), weight: (V, C), targets: (N,)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedLoss.apply(x, weight, targets, chunk_size, loss_fn)


# ----------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header, then raw tensor bytes

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def read_safetensors(path) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + header_len])
    except (struct.error, ValueError, UnicodeDecodeError):
        raise SystemExit(f"error: {path} is not a safetensors file (bad header)") from None
    data = memoryview(raw)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise SystemExit(f"error: {path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        flat = torch.frombuffer(bytearray(data[start:end]), dtype=_ST_DTYPES[info["dtype"]]) \
            if end > start else torch.empty(0, dtype=_ST_DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def write_safetensors(path, tensors: dict):
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so tensor data is 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    os.replace(tmp, path)


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
            raise SystemExit(f"error: {url} arrived with {got} of {expected} bytes (run again)")
        os.replace(tmp, dest)
    except requests.RequestException as e:
        raise SystemExit(f"error: could not download {url} ({e.__class__.__name__}; {hint})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------------------
# Checkpoints: {"model", "config", "tokenizer", "step", ...}, written atomically


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a kill at any moment
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def clean_state_dict(model: nn.Module) -> dict:
    # torch.compile wraps the model and prefixes every key with "_orig_mod."
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


def save_checkpoint(path, model, tokenizer_spec, step=0, **extra):
    raw = getattr(model, "_orig_mod", model)
    atomic_save({"model": clean_state_dict(raw), "config": asdict(raw.config),
                 "tokenizer": tokenizer_spec, "step": step, **extra}, path)


def read_checkpoint(path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found (train one with train.py or check the path)")
    try:
        # weights_only: a downloaded checkpoint is data, it must not be able to run code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip or unpickler errors
        raise SystemExit(f"error: {path} is not a readable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise SystemExit(f"error: {path} is not a nanollm checkpoint (needs 'model' and 'config')")
    return ckpt


def model_from_checkpoint(ckpt: dict, path="checkpoint") -> GPT:
    try:
        config = GPTConfig(**ckpt["config"])
    except TypeError as e:
        raise SystemExit(f"error: {path} has a config this GPT does not know ({e})") from None
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise SystemExit(f"error: {path} does not match its config ({first})") from None
    return model


def load_checkpoint(path, device="cpu"):
    """Returns (model, tokenizer_spec) from a checkpoint written by save_checkpoint."""
    ckpt = read_checkpoint(path, device)
    return model_from_checkpoint(ckpt, path).to(device), ckpt.get("tokenizer")


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
            raise SystemExit(f"error: character {e.args[0]!r} is not in the model's alphabet") from None

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


class TiktokenTokenizer:
    def __init__(self, name="gpt2"):
        import tiktoken

        self.enc = tiktoken.get_encoding(name)
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token
        self.spec = name

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(list(ids))


class BPEFileTokenizer:
    """A tokenizer trained and saved by bpe.py (imported lazily: gpt.py imports nothing of ours)."""

    def __init__(self, path):
        import bpe

        self.tok = bpe.Tokenizer.load(path)
        self.vocab_size, self.eot_id = self.tok.vocab_size, self.tok.eot_id
        self.spec = str(path)

    def encode(self, text):
        return self.tok.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.tok.decode(list(ids))


def load_tokenizer(spec: str):
    if spec is None:
        raise SystemExit("error: no tokenizer recorded (pass one, e.g. 'gpt2' or 'char:abc')")
    if spec.startswith("char:"):
        return CharTokenizer(spec[len("char:"):])
    if spec in ("gpt2", "r50k_base", "cl100k_base", "o200k_base"):
        return TiktokenTokenizer(spec)
    if Path(spec).is_file():
        return BPEFileTokenizer(spec)
    raise SystemExit(f"error: tokenizer {spec!r} is neither 'gpt2', 'char:<alphabet>' nor a bpe.py file")


# ----------------------------------------------------------------------------------------
# Data: token bins shared by train.py, fsdp2_train.py, moe.py, lora.py

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_URL = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/{:03d}_00000.parquet"
FINEWEB_SHARD_TOKENS = 100_000_000


def write_tokens(path, ids):
    """Tokens go to disk as uint16 (every vocabulary here is < 65536)."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and arr.max() >= 2**16:
        raise SystemExit(f"error: token id {arr.max()} does not fit uint16 bins (vocab must be < 65536)")
    tmp = Path(f"{path}.tmp")
    arr.astype(np.uint16).tofile(tmp)
    os.replace(tmp, path)


def prepare_dataset(name: str, input=None, tokenizer=None, data_root="data", val_fraction=0.1) -> Path:
    """Tokenize a dataset once into data_root/<name>/{train,val}.bin + meta.json; returns the folder.

    name: "shakespeare_char" (characters), "shakespeare" (GPT-2 BPE), "fineweb_edu"
    (FineWeb-Edu sample-10BT, 100M-token shards), or "text:<path>" (any local text file,
    tokenizer spec from `tokenizer`, default gpt2). input: a local copy of the raw text
    instead of the download."""
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
        raise SystemExit(f"error: unknown dataset {name!r} (shakespeare_char, shakespeare, fineweb_edu, text:<path>)")
    meta_path = folder / "meta.json"
    if meta_path.exists():  # prepared before: reuse it unless the tokenizer or the source changed
        meta = json.loads(meta_path.read_text())
        if (spec is None or meta["tokenizer"] == spec) and (src is None or meta["source"] == str(src)):
            return folder
    if src is None:
        src = download(SHAKESPEARE_URL, Path(data_root) / "tinyshakespeare.txt",
                       hint="check the network or pass --input PATH to a local copy")
    src = Path(src)
    if not src.is_file():
        raise SystemExit(f"error: input file {src} not found (check --input / the text: path)")
    text = src.read_text(encoding="utf-8")
    if not text:
        raise SystemExit(f"error: input file {src} is empty")
    if spec is None:  # character level: the alphabet is the set of characters in the text
        spec = "char:" + "".join(sorted(set(text)))
    tok = load_tokenizer(spec)
    split = int(len(text) * (1 - val_fraction))
    folder.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = tok.encode(text[:split]), tok.encode(text[split:])
    write_tokens(folder / "train.bin", train_ids)
    write_tokens(folder / "val.bin", val_ids)
    meta = {"tokenizer": spec, "vocab_size": tok.vocab_size, "source": str(src),
            "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    meta_path.write_text(json.dumps(meta, indent=1))
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
        raise SystemExit("error: fineweb_edu needs pyarrow (pip install pyarrow)") from None
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
        raise SystemExit(f"error: {path} not found (prepare the dataset first)")
    return json.loads(path.read_text())


class TokenBins:
    """Every `<split>*.bin` shard in a folder, memory-mapped, sampled as random windows."""

    def __init__(self, data_dir, split):
        paths = sorted(Path(data_dir).glob(f"{split}*.bin"))
        if not paths:
            raise SystemExit(f"error: no {split}*.bin in {data_dir} (prepare the dataset first)")
        self.shards = [np.memmap(p, dtype=np.uint16, mode="r") for p in paths]
        self.sizes = torch.tensor([len(s) for s in self.shards], dtype=torch.float64)

    def get_batch(self, batch_size, block_size, generator, device="cpu"):
        """x, y: int64 (B, T), y shifted by one. The generator's state is the data position."""
        usable = (self.sizes - block_size - 1).clamp(min=0)
        if usable.sum() == 0:
            raise SystemExit(f"error: the data is shorter than block_size + 1 = {block_size + 1} tokens")
        shard_ids = torch.multinomial(usable, batch_size, replacement=True, generator=generator)
        offsets = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * usable[shard_ids]).long()
        rows = [torch.from_numpy(self.shards[s][o:o + block_size + 1].astype(np.int64))
                for s, o in zip(shard_ids.tolist(), offsets.tolist())]
        xy = torch.stack(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if "cuda" in str(device):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------
# Small shared helpers: CLI from a dataclass, device and precision


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def parse_config(config_cls, argv=None, description=None):
    """Turn a dataclass into an argparse CLI: every field is an option `--name` with its
    default shown in --help; booleans take a value (`--compile False`, `--compile=False`)."""
    parser = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        optional = type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        convert = _parse_bool if kind is bool else kind
        if optional:
            convert = (lambda c: lambda s: None if s.lower() == "none" else c(s))(convert)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", type=convert, default=default, metavar=kind.__name__.upper(),
                            help=(f.metadata.get("help", "").replace("%", "%%") + " (default: %(default)r)").lstrip())
    args = parser.parse_args(argv)
    return config_cls(**vars(args))


def pick_device(name="auto") -> str:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but CUDA is not available (use --device cpu or auto)")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, name="auto") -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        if "cuda" in device:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in table:
        raise SystemExit(f"error: unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return table[name]


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in bf16/fp16, weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def cosine_lr(it, max_lr, min_lr, warmup_iters, decay_iters):
    """nanoGPT's schedule: linear warmup to max_lr over warmup_iters, cosine decay to min_lr
    at decay_iters, then flat. Warmup starts above zero so step 0 already learns."""
    if it < warmup_iters:
        return max_lr * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def set_seed(seed: int):
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# dense bf16 tensor-core peaks (no sparsity) from NVIDIA's datasheets
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(device: str, dtype=torch.bfloat16, override=None):
    """The device's peak FLOP/s for MFU: --peak_flops if given, else the datasheet figure
    of a known GPU, else None (MFU is then not reported)."""
    if override:
        return float(override)
    if "cuda" in device and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2  # TF32 runs at half rate
    return None


@dataclass
class SmokeConfig:
    init_from: str = "gpt2"
    prompt: str = "Hello, I'm a language model,"
    max_new_tokens: int = 20


def main(argv=None):
    cfg = parse_config(SmokeConfig, argv, __doc__)
    if cfg.init_from.endswith(".pt"):
        model, spec = load_checkpoint(cfg.init_from)
    else:
        model, spec = GPT.from_pretrained(cfg.init_from), "gpt2"
    tok = load_tokenizer(spec)
    model.eval()
    idx = model.generate(torch.tensor([tok.encode(cfg.prompt)]), cfg.max_new_tokens, temperature=0)
    print(tok.decode(idx[0].tolist()))


if __name__ == "__main__":
    main()
