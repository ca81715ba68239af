"""GPT-2, the one shared model file of nanollm.

The model is GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"): token + learned position embeddings, a stack of pre-LayerNorm transformer
blocks (causal self-attention, then a GELU MLP), a final LayerNorm and a language-model
head that shares its weight with the token embedding. Module names are those of nanoGPT
and of Hugging Face's GPT-2, so real GPT-2 weights load by name.

After the model come three things every script shares:
- a memory-efficient loss: lm_head + any per-chunk loss (cross-entropy, distillation)
  chunk by chunk, recomputed in backward, so the (B*T, vocab) logits never exist at once
  (the trick of Liger-Kernel / Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary
  Language Models", arXiv:2411.09009, written in plain PyTorch);
- Hugging Face GPT-2 weights both ways, read from the hub with an own safetensors reader;
- checkpoints: one format, written atomically, read without running code.

Use: `model, spec = gpt.load_checkpoint("out/ckpt.pt")` or `gpt.GPT.from_pretrained("gpt2")`;
sample.py generates from either (`python sample.py --init_from gpt2`).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from common import NanoError
from data import download



@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    attn_impl: str = "sdpa"  # "flash": flash_attention.py's own Triton kernel where no KV cache is used

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise NanoError(f"{name} must be positive (got {getattr(self, name)})")
        if self.n_embd % self.n_head:
            raise NanoError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head} "
                "(pick n_embd = n_head * head_dim)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise NanoError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.attn_impl not in ("sdpa", "flash"):
            raise NanoError(f"unknown attn_impl {self.attn_impl!r} (sdpa or flash)")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
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
        if self.attn_impl == "flash" and attn_mask is None and kv_cache is None and dropout_p == 0.0:
            from flash_attention import flash_attention  # imported only when asked for

            y = flash_attention(q, k, v, causal=True)
        elif attn_mask is None and kv_cache is None:
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
            raise NanoError("not a GPT-2 state dict (no wte.weight)")
        if config is None:
            vocab_size, n_embd = sd["wte.weight"].shape
            n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
            head_dim = 64  # the weights do not say how many heads; every released GPT-2 uses 64-dim heads
            if n_embd % head_dim:
                raise NanoError(f"n_embd {n_embd} is not a multiple of 64: pass a GPTConfig with n_head")
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
                raise NanoError(f"unexpected tensor {k!r} in the GPT-2 state dict")
            converted[key] = v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v
        missing = set(ours) - set(converted) - {"lm_head.weight"}
        if missing:
            raise NanoError(f"GPT-2 state dict lacks {sorted(missing)[:3]}...")
        for k, v in converted.items():
            if v.shape != ours[k].shape:
                raise NanoError(f"shape of {k} is {tuple(v.shape)}, the config wants {tuple(ours[k].shape)}")
        with torch.no_grad():
            for k, v in converted.items():
                ours[k].copy_(v.to(ours[k].dtype))
        return model

    def to_hf_state_dict(self) -> dict:
        """The inverse of from_hf_state_dict: GPT2LMHeadModel's tensor names, Conv1D weights
        transposed back to (in, out); the tied lm_head.weight is included, as HF saves it."""
        sd = {}
        for k, v in self.state_dict().items():
            k = k.replace("_orig_mod.", "")
            sd[k] = v.t().contiguous() if k.endswith(HF_CONV1D_WEIGHTS) else v
        return sd

    @classmethod
    def from_pretrained(cls, name: str, cache_dir: str | None = None):
        """Download OpenAI's GPT-2 weights from the Hugging Face hub and load them."""
        sizes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                 "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
        if name not in sizes:
            raise NanoError(f"unknown model {name!r} (choose one of {', '.join(sizes)})")
        n_layer, n_head, n_embd = sizes[name]
        config = GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        url = f"https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
        cache = Path(cache_dir or Path.home() / ".cache" / "nanollm") / name / "model.safetensors"
        download(url, cache)
        return cls.from_hf_state_dict(read_safetensors(cache), config)


# ----------------------------------------------------------------------------------------
# Memory-efficient loss


class _ChunkedLoss(torch.autograd.Function):
    """sum_c loss_fn(x_c @ W.T, t_c, *rows_c) / n_valid without keeping any chunk's logits.

    Forward keeps only x, W, the targets and the row tensors; backward re-runs each chunk's
    forward and differentiates it (torch.func.vjp, the way torch.utils.checkpoint
    recomputes), so at most one (chunk, V) block of logits and its gradient exist at any
    moment. Nothing is derived by hand: any per-chunk loss function works. Row tensors
    (N, ...) are cut into the same chunks and get no gradient (e.g. a teacher's hidden states)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, loss_fn, *rows):
        ctx.save_for_backward(x, weight, targets, *rows)
        ctx.chunk_size, ctx.loss_fn = chunk_size, loss_fn
        n_valid = (targets != -1).sum().clamp(min=1)
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], chunk_size):
            end = start + chunk_size
            total = total + loss_fn(x[start:end] @ weight.t(), targets[start:end], *(r[start:end] for r in rows))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, targets, *rows = ctx.saved_tensors
        n_valid = (targets != -1).sum().clamp(min=1)
        scale = (grad_out / n_valid).to(torch.float32)
        need_w = ctx.needs_input_grad[1]  # a frozen head (LoRA, QLoRA) skips the V x C gradient
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, x.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            t, r = targets[start:end], [row[start:end] for row in rows]
            if need_w:
                _, vjp_fn = torch.func.vjp(lambda xc, w: ctx.loss_fn(xc @ w.t(), t, *r), x[start:end], weight)
                gx, gw = vjp_fn(scale)
                grad_w += gw
            else:
                _, vjp_fn = torch.func.vjp(lambda xc: ctx.loss_fn(xc @ weight.t(), t, *r), x[start:end])
                (gx,) = vjp_fn(scale)
            grad_x[start:end] = gx
        return (grad_x, grad_w.to(weight.dtype) if need_w else None, None, None, None) + (None,) * len(rows)


def cross_entropy_sum(logits, targets):
    # fp32 softmax even under bf16 autocast: the loss of a 50k-way softmax needs the precision
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")


def chunked_loss(x, weight, targets, loss_fn, *rows, chunk_size=1024):
    """sum over chunks of loss_fn(x_c @ weight.T, targets_c, *rows_c), divided by the number
    of targets != -1. x: (N, C), weight: (V, C), targets: (N,), each row tensor (N, ...).
    loss_fn returns the SUM of its chunk's losses over rows whose target is not -1."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedLoss.apply(x, weight, targets, chunk_size, loss_fn, *rows)


def chunked_cross_entropy(x, weight, targets, chunk_size=1024):
    """Mean cross-entropy of logits = x @ weight.T over targets != -1, computed chunk by chunk."""
    return chunked_loss(x, weight, targets, cross_entropy_sum, chunk_size=chunk_size)


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
        raise NanoError(f"{path} is not a safetensors file (bad header)") from None
    data = memoryview(raw)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise NanoError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
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
        raise NanoError(f"checkpoint {path} not found (train one with train.py or check the path)")
    try:
        # weights_only: a downloaded checkpoint is data, it must not be able to run code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip or unpickler errors
        raise NanoError(f"{path} is not a readable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise NanoError(f"{path} is not a nanollm checkpoint (needs 'model' and 'config')")
    return ckpt


def model_from_checkpoint(ckpt: dict, path="checkpoint") -> GPT:
    try:
        config = GPTConfig(**ckpt["config"])
    except TypeError as e:
        raise NanoError(f"{path} has a config this GPT does not know ({e})") from None
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise NanoError(f"{path} does not match its config ({first})") from None
    return model


def load_checkpoint(path, device="cpu"):
    """Returns (model, tokenizer_spec) from a checkpoint written by save_checkpoint."""
    ckpt = read_checkpoint(path, device)
    return model_from_checkpoint(ckpt, path).to(device), ckpt.get("tokenizer")
