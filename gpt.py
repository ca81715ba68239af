"""GPT-2 and the Llama family in one model file, the one shared model of nanollm.

GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): token +
learned position embeddings, pre-LayerNorm blocks (causal self-attention, then a GELU MLP),
a final LayerNorm and a head tied to the token embedding, with nanoGPT's and Hugging Face's
module names, so its weights load by name. The Llama family (Llama 2/3, arXiv:2307.09288 and
2407.21783; Mistral, Qwen2/3, SmolLM) is the same pre-norm block with other parts, one
GPTConfig switch each: RMSNorm, rotary positions (RoPE, arXiv:2104.09864), a SwiGLU MLP
(arXiv:2002.05202), grouped-query attention (arXiv:2305.13245), no biases (Qwen2: q, k, v),
an untied head, QK-norm (Qwen3). Its projections carry Hugging Face's names (q_proj ...
down_proj), so weights load by name and PEFT's LoRA targets apply. `llama_config()` starts one.

After the model come three things every script shares:
- a memory-efficient loss: lm_head + any per-chunk loss (cross-entropy, distillation)
  chunk by chunk, recomputed in backward, so the (B*T, vocab) logits never exist at once
  (the trick of Liger-Kernel / Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary
  Language Models", arXiv:2411.09009, written in plain PyTorch);
- Hugging Face weights both ways; `load_pretrained` reads a model folder or hub name
  (config.json + safetensors shards, an own reader) into a model built on the meta device;
- checkpoints: one format, written atomically, read without running code.

Use: `model, spec = gpt.load_checkpoint("out/ckpt.pt")`, `gpt.GPT.from_pretrained("gpt2")` or
`model, spec = gpt.load_pretrained("HuggingFaceTB/SmolLM2-135M")` (spec: its tokenizer.json);
sample.py generates from any of them (`python sample.py --init_from gpt2`).
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
    block_size: int = 1024  # longest sequence trained on (GPT-2: also the rows of its position table)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2: biases in every Linear and LayerNorm; Llama: none
    attn_impl: str = "sdpa"  # "flash": flash_attention.py's own Triton kernel where no KV cache is used
    # What the Llama family does instead of GPT-2, one switch each (the defaults are GPT-2's):
    arch: str = "gpt2"  # GPT-2: fused c_attn, GELU MLP (c_fc, c_proj); "llama": q/k/v/o_proj, SwiGLU MLP (gate/up/down_proj)
    mlp_hidden: int = 0  # 0: GPT-2's 4*n_embd; SwiGLU 8/3*n_embd (3 matrices: the same parameters); Llama-3-8B 14336
    norm: str = "layernorm"  # GPT-2: LayerNorm (centre, scale by 1/std, bias); Llama: "rmsnorm" (scale by 1/RMS only)
    norm_eps: float = 1e-5  # GPT-2 and Llama 1e-5; Qwen, SmolLM, Mistral 1e-6
    rope_theta: float = 0.0  # GPT-2: 0 = learned positions; Llama: rotary positions of this base (1e4; Llama 3: 5e5)
    rope_scaling: float = 0.0  # Llama 3.1+ rope_scaling "llama3": long wavelengths slowed by this factor (8); 0 = off
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_position / this are slowed
    rope_high_freq_factor: float = 4.0  # llama3: below original_max_position / this kept; in between blended
    rope_original_max_position: int = 8192  # llama3: the context length of pretraining
    n_kv_head: int = 0  # GPT-2: 0 = n_head, own keys/values per head; Llama 3: 8 shared by groups (GQA; 1 = MQA)
    head_dim: int = 0  # 0 = n_embd // n_head (GPT-2, Llama); Qwen3 sets its own (128 at n_embd 1024, 16 heads)
    qkv_bias: bool = False  # Qwen2: biases on q, k and v only (with bias False); GPT-2 and Llama: no such case
    tie_embeddings: bool = True  # GPT-2: lm_head is the token embedding; Llama-3-8B: its own (small ones: tied)
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k before RoPE; GPT-2 and Llama: none

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise NanoError(f"{name} must be positive (got {getattr(self, name)})")
        if not self.head_dim and self.n_embd % self.n_head:
            raise NanoError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head} "
                            "(pick n_embd = n_head * head_dim)")
        if self.n_kv_head < 0 or self.n_head % (self.n_kv_head or self.n_head):
            raise NanoError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head} "
                            "(each key/value head serves a whole group of query heads)")
        if not 0.0 <= self.dropout < 1.0:
            raise NanoError(f"dropout must be in [0, 1) (got {self.dropout})")
        for name, allowed in (("attn_impl", ("sdpa", "flash")), ("arch", ("gpt2", "llama")),
                              ("norm", ("layernorm", "rmsnorm"))):
            if getattr(self, name) not in allowed:
                raise NanoError(f"unknown {name} {getattr(self, name)!r} ({' or '.join(allowed)})")
        if min(self.rope_theta, self.rope_scaling, self.head_dim, self.mlp_hidden) < 0:
            raise NanoError("rope_theta, rope_scaling, head_dim and mlp_hidden must be >= 0 (0: off or default)")
        if self.rope_scaling and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            raise NanoError("llama3 rope scaling needs rope_high_freq_factor > rope_low_freq_factor > 0")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head


def llama_config(**fields) -> GPTConfig:
    """A Llama-family config for training from scratch: every switch on (override any field)."""
    return GPTConfig(**{**dict(arch="llama", norm="rmsnorm", rope_theta=10000.0, bias=False), **fields})


class RMSNorm(nn.Module):
    """Llama's norm (Zhang & Sennrich 2019, arXiv:1910.07467): x / RMS(x) * gain, no centring,
    no bias. In fp32 whatever the input dtype, as Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(config: GPTConfig, dim):
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_angles(config: GPTConfig, position_ids, dtype):
    """RoPE: channel i of a head and channel i + head_dim/2 (Hugging Face's pairing) rotate by
    position * theta^(-2i/head_dim), so q_m . k_n depends on m - n only. Computed from the
    position ids (T,) or (B, T), not read from a table: any position works (sample.py's
    sliding window). Returns cos, sin of shape (T, head_dim) or (B, 1, T, head_dim)."""
    hd = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, device=position_ids.device).float() / hd)
    if config.rope_scaling:  # Llama 3.1: slow down the channels that turn < low_freq_factor times
        c = config  # per pretraining context by rope_scaling, keep those > high_freq_factor, blend between
        turns = c.rope_original_max_position / (2 * math.pi / inv_freq)  # context / wavelength
        keep = ((turns - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)).clamp(0, 1)
        inv_freq = (1 - keep) * inv_freq / c.rope_scaling + keep * inv_freq
    angles = position_ids[..., None].float() * inv_freq  # (..., T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, head_dim): one set of positions per row, all heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):  # x: (B, heads, T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        self.fused = config.arch == "gpt2"
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        if self.fused:
            self.c_attn = nn.Linear(config.n_embd, sum(self.split), bias=config.bias)  # q, k, v at once
            self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        else:  # Hugging Face's Llama names: its weights load by name, PEFT's target names apply
            qkv_bias = config.bias or config.qkv_bias
            self.q_proj = nn.Linear(config.n_embd, q_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=qkv_bias)
            self.o_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        (self.c_proj if self.fused else self.o_proj).RESIDUAL_SCALE_INIT = True
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, config.norm_eps), RMSNorm(self.head_dim, config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, input_pos=None, attn_mask=None, rope=None):
        B, T, C = x.shape
        if self.fused:
            q, k, v = self.c_attn(x).split(self.split, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): every head attends independently
        q = q.view(B, T, self.n_head, self.head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:  # rotate q and k by their positions (keys enter the cache rotated)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            # The cache writes this step's keys/values into its slots and hands back every
            # slot (B, n_kv_head, S, head_dim); prefill (T = prompt) and decode (T = 1) are the
            # same code, only the mask says which slots each query may see.
            k, v = kv_cache.update(input_pos, k, v)
            if attn_mask is None:  # query at slot p sees slots 0..p: the causal mask from positions
                slots = torch.arange(k.shape[2], device=x.device)
                attn_mask = (slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, S)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head  # each key/value head serves n_head // n_kv_head query heads
        if self.attn_impl == "flash" and attn_mask is None and kv_cache is None and dropout_p == 0.0:
            from flash_attention import flash_attention  # imported only when asked for

            if gqa:
                k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            y = flash_attention(q, k, v, causal=True)
        elif attn_mask is None and kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y) if self.fused else self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), a learned gate on every hidden unit. Three
    matrices, so 8/3 * n_embd hidden units (rounded up to 64) hold GPT-2's 4x MLP's parameters."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden or 64 * math.ceil(8 * config.n_embd / 3 / 64)
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.down_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)  # Hugging Face's Llama: input_layernorm
        self.attn = CausalSelfAttention(config)  # self_attn
        self.ln_2 = make_norm(config, config.n_embd)  # post_attention_layernorm
        self.mlp = MLP(config) if config.arch == "gpt2" else SwiGLU(config)

    def forward(self, x, kv_cache=None, input_pos=None, attn_mask=None, rope=None):
        # pre-LN: normalise the input of each sublayer, keep the residual stream untouched
        x = x + self.attn(self.ln_1(x), kv_cache, input_pos, attn_mask, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.loss_chunk_size = 1024  # rows of (B*T) per chunk of the memory-efficient loss
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rope_theta:  # GPT-2's learned positions; RoPE needs no table
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **parts,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
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
        """Run the transformer on idx (B, T) and return the final hidden states (B, T, n_embd).
        input_pos: the cache slots written; position_ids (T,) or (B, T): the positions (default: input_pos)."""
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise NanoError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        if position_ids is None:
            position_ids = input_pos  # (T,), broadcast over the batch
        x, rope = self.transformer.wte(idx), None
        if self.config.rope_theta:
            rope = rope_angles(self.config, position_ids, x.dtype)
        else:
            x = x + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache[i] if kv_cache is not None else None, input_pos, attn_mask, rope)
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
        """Parameter count; by default without the position table (as nanoGPT) and without an
        untied input embedding (a lookup, not a matmul); a tied one is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(self.transformer[k].weight.numel() for k in ("wpe", "wte") if k in self.transformer
                     and (k == "wpe" or not self.config.tie_embeddings))
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
            if "wpe" in self.transformer:
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
    def from_hf_state_dict(cls, sd, config: GPTConfig | None = None, dtype=None):
        """A GPT from a Hugging Face state dict (GPT2LMHeadModel/GPT2Model names, or with a
        config of arch "llama" LlamaForCausalLM's and its family's); tensors are copied."""
        if config is None:  # GPT-2: the shapes are read off the tensors
            sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
            if "wte.weight" not in sd:
                raise NanoError("not a GPT-2 state dict (no wte.weight; pass the config of another model)")
            vocab_size, n_embd = sd["wte.weight"].shape
            n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
            head_dim = 64  # the weights do not say how many heads; every released GPT-2 uses 64-dim heads
            if n_embd % head_dim:
                raise NanoError(f"n_embd {n_embd} is not a multiple of 64: pass a GPTConfig with n_head")
            config = GPTConfig(block_size=sd["wpe.weight"].shape[0], vocab_size=vocab_size,
                               n_layer=n_layer, n_head=n_embd // head_dim, n_embd=n_embd,
                               bias="ln_f.bias" in sd)
        model = empty_model(config)
        for name, key in hf_plan(model, {k: v.shape for k, v in sd.items()}).items():
            fill(model, key, sd[name].to(dtype or sd[name].dtype, copy=True))
        return model.tie_weights()

    def to_hf_state_dict(self) -> dict:
        """The inverse of from_hf_state_dict: Hugging Face's names (GPT-2's Conv1D weights transposed
        back to (in, out)); a tied lm_head.weight is included, as HF's state_dict() has it."""
        sd = {}
        for k, v in clean_state_dict(self).items():
            gpt2_conv = self.config.arch == "gpt2" and k.endswith(HF_CONV1D_WEIGHTS)
            sd[to_hf_name(k, self.config.arch)] = v.t().contiguous() if gpt2_conv else v
        return sd

    def tie_weights(self):
        if self.config.tie_embeddings:  # assigning a loaded tensor to one name unties the two
            self.lm_head.weight = self.transformer.wte.weight
        return self

    @classmethod
    def from_pretrained(cls, name_or_dir: str, cache_dir: str | None = None, dtype=None):
        """OpenAI's GPT-2 ("gpt2" ... "gpt2-xl"), a Hugging Face folder or hub name: see load_pretrained."""
        return load_pretrained(name_or_dir, cache_dir, dtype)[0]


# ----------------------------------------------------------------------------------------
# Hugging Face weights: names, configs, folders

# Hugging Face's GPT-2 stores these projections as Conv1D, weight (in, out): transposed
# relative to nn.Linear's (out, in) whenever weights cross between the two
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Llama's family, HF -> ours: the containers and block norms are renamed (so every script
# finds transformer.h[i].attn, .mlp, .ln_1); the projections keep HF's names
HF_LLAMA_NAMES = (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."),
                  ("model.norm.", "transformer.ln_f."), (".self_attn.", ".attn."),
                  (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."))
HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
# every Linear of a block, by arch: what LoRA adapts and QLoRA quantizes by default
BLOCK_LINEARS = {"gpt2": ("c_attn", "c_proj", "c_fc"),
                 "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def from_hf_name(name: str, arch: str) -> str:
    if arch == "gpt2":
        return name if name == "lm_head.weight" else "transformer." + name.removeprefix("transformer.")
    for theirs, ours in HF_LLAMA_NAMES:
        name = name.replace(theirs, ours)
    return name


def to_hf_name(name: str, arch: str) -> str:
    """One of our tensor names in Hugging Face's spelling (e.g. for PEFT adapters)."""
    if arch != "gpt2":
        for theirs, ours in HF_LLAMA_NAMES:
            name = name.replace(ours, theirs)
    return name


def empty_model(config: GPTConfig) -> GPT:
    """A GPT whose tensors have shapes but no memory (the meta device), for `fill` to load into."""
    with torch.device("meta"):
        return GPT(config)


def fill(model: nn.Module, key: str, tensor):
    """Put a loaded tensor in place of parameter `key` (GPT-2's Conv1D weights transposed)."""
    if model.config.arch == "gpt2" and key.endswith(HF_CONV1D_WEIGHTS):
        tensor = tensor.t().contiguous()
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))


def hf_plan(model: GPT, shapes: dict, where="the state dict") -> dict:
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


def config_from_hf(hf: dict) -> GPTConfig:
    """GPTConfig from a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise NanoError(f"model_type {kind!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)})")
    if kind == "gpt2":
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], mlp_hidden=hf.get("n_inner") or 0,
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5))
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
    return GPTConfig(**llama3,
        arch="llama", block_size=block_size, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], bias=bias and kind != "qwen2",
        mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim") or 0,
        qkv_bias=kind == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False), qk_norm=kind == "qwen3")


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a folder: the shards its index lists, or the one model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def download_hf(repo: str, folder: Path, tokenizer=True) -> Path:
    """config.json, the safetensors (one file or the shards its index lists) and tokenizer.json of
    a hub repository into folder; files already there are not fetched again."""
    base = f"https://huggingface.co/{repo}/resolve/main/"
    hint = "check the name; a gated model needs HF_TOKEN set and its licence accepted"
    download(base + "config.json", folder / "config.json", hint=hint)
    index = folder / "model.safetensors.index.json"
    if not (folder / "model.safetensors").is_file():
        try:
            download(base + index.name, index, hint=hint)
        except NanoError:  # no index: one file
            pass
    for name in weight_files(folder):
        download(base + name, folder / name, hint=hint)
    if tokenizer:
        try:
            download(base + "tokenizer.json", folder / "tokenizer.json", hint=hint)
        except NanoError:  # the weights are usable without it; load_pretrained's spec says None
            pass
    return folder


def load_pretrained(name_or_dir: str, cache_dir: str | None = None, dtype=None):
    """(model, tokenizer spec) from a Hugging Face model folder, a hub name (downloaded into
    ~/.cache/nanollm) or a GPT-2 size. config.json says the architecture; the weights come in
    the checkpoint's dtype (or `dtype`), from one safetensors file or the shards of
    model.safetensors.index.json. Names and shapes are all checked from the file headers
    before any weight is read; the model is built on the meta device and filled one tensor at
    a time, so peak memory is the model plus one tensor. The spec is the folder's
    tokenizer.json (data.load_tokenizer reads it), "gpt2" for the GPT-2 sizes (tiktoken)."""
    cache = Path(cache_dir or Path.home() / ".cache" / "nanollm")
    folder, spec = Path(name_or_dir), None
    if name_or_dir in GPT2_SIZES and not folder.is_dir():
        folder, spec = download_hf(f"openai-community/{name_or_dir}", cache / name_or_dir, tokenizer=False), "gpt2"
    elif not folder.is_dir():
        if name_or_dir.count("/") != 1 or name_or_dir.startswith((".", "/")):
            raise NanoError(f"unknown model {name_or_dir!r} (a Hugging Face folder, a hub name like "
                            f"HuggingFaceTB/SmolLM2-135M, or one of {', '.join(GPT2_SIZES)})")
        folder = download_hf(name_or_dir, cache / name_or_dir)
    if not (folder / "config.json").is_file():
        raise NanoError(f"{folder} has no config.json (a Hugging Face model folder needs one)")
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    files = weight_files(folder)
    for name in files:
        if not (folder / name).is_file():
            raise NanoError(f"{folder} lacks {name} of {len(files)} weight file(s) (download it again)")
    headers = {name: safetensors_header(folder / name)[0] for name in files}
    model = empty_model(config)
    plan = hf_plan(model, {k: v["shape"] for h in headers.values() for k, v in h.items()}, str(folder))
    for name in files:  # one shard at a time, one tensor at a time
        for key, tensor in read_safetensors(folder / name, names=plan).items():
            fill(model, plan[key], tensor.to(dtype) if dtype else tensor)
    if spec is None and (folder / "tokenizer.json").is_file():
        spec = str(folder / "tokenizer.json")
    return model.tie_weights(), spec or ("gpt2" if config.arch == "gpt2" else None)


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
        if info["dtype"] not in _ST_DTYPES:
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
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            if end - start != t.numel() * t.element_size():
                raise NanoError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']} (corrupt file)")
            f.seek(base + start)
            if end > start and f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise NanoError(f"{path} is truncated at tensor {name} (download it again)")
            tensors[name] = t
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
