"""GPT-2 and the Llama family in one model file, the one shared model of nanollm.

GPT-2 (Radford et al. 2019): token + learned position embeddings, pre-LayerNorm blocks (causal
self-attention, written out in `naive_attention` or run by a fused kernel, then a GELU MLP), a final
LayerNorm, a head tied to the token embedding. The Llama family (arXiv:2307.09288, 2407.21783;
Mistral, Qwen2/3, SmolLM) swaps parts, one GPTConfig switch each: RMSNorm, rotary positions (RoPE,
arXiv:2104.09864), SwiGLU (arXiv:2002.05202), grouped-query attention (arXiv:2305.13245), no biases,
an untied head, QK-norm, sliding-window attention (Mistral: a band mask), RoPE stretched past the
pretraining context (linear, dynamic NTK, Llama 3.1's, YaRN: arXiv:2309.00071). Module names are
Hugging Face's, so weights load by name and PEFT's LoRA targets apply. After the model: the chunked
loss (the (B*T, vocab) logits never exist at once: Wijmans et al. 2024, arXiv:2411.09009), Hugging
Face weights both ways, checkpoints. Use:
`gpt.GPT.from_pretrained("gpt2")`, `model, spec = gpt.load_checkpoint("out/ckpt.pt")`,
`python sample.py --init_from gpt2`.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import common
import hf_io
from common import NanoError


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence trained on (GPT-2: also the rows of its position table)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2: biases in every Linear and LayerNorm; Llama: none
    attn_impl: str = "sdpa"  # PyTorch's fused kernel; "naive": softmax attention written out; "flash":
    # flash_attention.py's own Triton kernel where no KV cache is used (all three compute the same)
    # What the Llama family does instead of GPT-2, one switch each (the defaults are GPT-2's):
    arch: str = "gpt2"  # GPT-2: fused c_attn, GELU MLP (c_fc, c_proj); "llama": q/k/v/o_proj, SwiGLU MLP (gate/up/down_proj)
    mlp_hidden: int = 0  # 0: GPT-2's 4*n_embd; SwiGLU 8/3*n_embd (3 matrices: the same parameters); Llama-3-8B 14336
    norm: str = "layernorm"  # GPT-2: LayerNorm (centre, scale by 1/std, bias); Llama: "rmsnorm" (scale by 1/RMS only)
    norm_eps: float = 1e-5  # GPT-2 and Llama 1e-5; Qwen, SmolLM, Mistral 1e-6
    rope_theta: float = 0.0  # GPT-2: 0 = learned positions; Llama: rotary positions of this base (1e4; Llama 3: 5e5)
    rope_type: str = "default"  # how rope_scaling stretches RoPE: "llama3" (Llama 3.1), "linear", "dynamic" (NTK), "yarn"
    rope_scaling: float = 0.0  # the stretch factor (Llama 3.1: 8; the context grows by about this); 0 = off
    rope_low_freq_factor: float = 1.0  # llama3 / yarn (beta_slow): channels turning fewer times than this per
    rope_high_freq_factor: float = 4.0  # original context slowed, above high (yarn: beta_fast 32) kept, blended between
    rope_original_max_position: int = 8192  # llama3, yarn, dynamic: the context length of pretraining
    rope_attention_factor: float = 1.0  # yarn: cos and sin times this (0.1 ln(factor) + 1): sharper attention
    rope_truncate: bool = True  # yarn: round the blend's ends to whole channels (transformers' default)
    sliding_window: int = 0  # Mistral: each query sees only the last sliding_window keys (a band mask); 0 = all
    n_kv_head: int = 0  # GPT-2: 0 -> n_head, own keys/values per head; Llama 3: 8 shared by groups (GQA; 1 = MQA)
    head_dim: int = 0  # 0 -> n_embd // n_head (GPT-2, Llama); Qwen3 sets its own (128 at n_embd 1024, 16 heads)
    qkv_bias: bool = False  # Qwen2: biases on q, k and v only (with bias False); GPT-2 and Llama: no such case
    attn_bias: bool = False  # attention_bias of Llama/Qwen3 configs: q, k, v and o_proj (not the MLP)
    tie_embeddings: bool = True  # GPT-2: lm_head is the token embedding; Llama-3-8B: its own (small ones: tied)
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k before RoPE; GPT-2 and Llama: none
    gelu: str = "tanh"  # GPT-2's MLP: the tanh approximation (HF "gelu_new"); "exact": erf, as nanoGPT; "relu2": ReLU²

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
        for name, allowed in (("attn_impl", ("sdpa", "naive", "flash")), ("arch", ("gpt2", "llama")),
                              ("norm", ("layernorm", "rmsnorm")), ("gelu", ("tanh", "exact", "relu2")),
                              ("rope_type", hf_io.ROPE_TYPES)):
            if getattr(self, name) not in allowed:
                raise NanoError(f"unknown {name} {getattr(self, name)!r} ({' or '.join(allowed)})")
        if min(self.rope_theta, self.rope_scaling, self.head_dim, self.mlp_hidden, self.sliding_window) < 0:
            raise NanoError("rope_theta, rope_scaling, head_dim, mlp_hidden, sliding_window must be >= 0 (0: off/default)")
        if self.rope_scaling and self.rope_type == "default":
            self.rope_type = "llama3"  # checkpoints from before rope_type: a factor meant llama3
        if self.rope_type in ("llama3", "yarn") and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            raise NanoError(f"{self.rope_type} rope scaling needs rope_high_freq_factor > rope_low_freq_factor > 0")
        # 0 means "as GPT-2": from here on both hold the number every caller uses (as HF's configs do)
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head


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
    position * theta^(-2i/head_dim), so q_m . k_n depends on m - n only (past the pretraining
    context, rope_scaling stretches the slow channels: hf_io.rope_inv_freq). Computed from the
    position ids (T,) or (B, T), not read from a table: any position works (sample.py's sliding
    window). Returns cos, sin of shape (T, head_dim) or (B, 1, T, head_dim)."""
    inv_freq = hf_io.rope_inv_freq(config, position_ids.max() + 1)  # stretched as rope_scaling says
    angles = position_ids[..., None].float() * inv_freq  # (..., T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, head_dim): one set of positions per row, all heads
    yarn = config.rope_scaling and config.rope_type == "yarn"
    scale = config.rope_attention_factor if yarn else 1.0  # yarn: on q and k, so the scores grow by scale^2
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):  # x: (B, heads, T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_mask(T, window, device):
    """(T, T) bool, True = may attend: query t sees keys t - window < s <= t (window 0: all s <= t).
    A sliding window (Mistral): each layer looks back window - 1 tokens, n_layer layers that many times."""
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return mask.triu(1 - window) if window else mask


def naive_attention(q, k, v, mask, dropout_p=0.0):
    """Softmax attention written out, as nanoGPT's model.py: every query scores every key,
    softmax(q k^T / sqrt(head_dim)) weighs the values. q (B, heads, T, hd), k and v (B, heads, S, hd),
    mask (T, S) or (B, 1, T, S) bool, True = may attend. SDPA and flash compute the same."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, heads, T, S) scores
    att = att.masked_fill(~mask, float("-inf"))  # no weight on the future (or on masked slots)
    att = F.softmax(att, dim=-1)  # each query's weights over the keys sum to 1
    att = F.dropout(att, dropout_p, training=dropout_p > 0)
    return att @ v  # (B, heads, T, hd): a weighted sum of the values


def repeat_kv(x, group):
    """(B, n_kv_head, S, hd) -> (B, n_kv_head * group, S, hd): key/value head j serves query heads
    j * group .. (j + 1) * group - 1 (Hugging Face's repeat_kv)."""
    return x.repeat_interleave(group, dim=1) if group > 1 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout, self.attn_impl, self.fused = config.dropout, config.attn_impl, config.arch == "gpt2"
        self.window = config.sliding_window  # Mistral: keys more than window - 1 back are masked too
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        if self.fused:  # GPT-2: q, k, v in one matrix
            self.c_attn = nn.Linear(config.n_embd, sum(self.split), bias=config.bias)
            self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        else:  # Hugging Face's Llama names: its weights load by name, PEFT's target names apply
            qkv_bias = config.bias or config.qkv_bias or config.attn_bias
            self.q_proj = nn.Linear(config.n_embd, q_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=qkv_bias)
            self.o_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias or config.attn_bias)
        (self.c_proj if self.fused else self.o_proj).RESIDUAL_SCALE_INIT = True
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, config.norm_eps), RMSNorm(self.head_dim, config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, input_pos=None, attn_mask=None, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=2) if self.fused else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): every head attends independently
        q = q.view(B, T, self.n_head, self.head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:  # rotate q and k by their positions (keys enter the cache rotated)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            # The cache writes this step's keys/values into its slots and hands back all (B, n_kv_head, S, hd);
            # prefill (T = prompt) and decode (T = 1) are the same code, the mask says which slots each query sees.
            k, v = kv_cache.update(input_pos, k, v)
            if attn_mask is None:  # query at slot p sees slots 0..p (p - window < s): the causal mask from positions
                back = input_pos[:, None] - torch.arange(k.shape[2], device=x.device)[None, :]
                attn_mask = ((back >= 0) & ((back < self.window) if self.window else True))[None, None]  # (1, 1, T, S)
        causal = attn_mask is None and kv_cache is None  # a whole sequence: query t sees keys 0..t
        band = self.window if causal and self.window < T else 0  # ... and only t - window < s (sliding window)
        dropout_p = self.dropout if self.training else 0.0
        group = self.n_head // self.n_kv_head  # GQA: each key/value head serves this many query heads
        if self.attn_impl == "naive":
            mask = causal_mask(T, band, x.device) if causal else attn_mask
            y = naive_attention(q, repeat_kv(k, group), repeat_kv(v, group), mask, dropout_p)
        elif self.attn_impl == "flash" and causal and dropout_p == 0.0:
            from flash_attention import flash_attention  # imported only when asked for

            y = flash_attention(q, repeat_kv(k, group), repeat_kv(v, group), causal=True, window=band)
        else:  # PyTorch's fused kernel (SDPA): the same softmax attention, GQA without copies
            if band:  # SDPA's is_causal has no window: the band as a mask
                attn_mask, causal = causal_mask(T, band, x.device), False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=causal, enable_gqa=group > 1)
        y = y.transpose(1, 2).reshape(B, T, -1)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y) if self.fused else self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        # relu2: ReLU squared (So et al. 2021, arXiv:2109.08668), as modded-nanogpt; in llama's block too
        self.gelu = (lambda x: F.relu(x).square()) if config.gelu == "relu2" else gelu
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
        self.mlp = MLP(config) if config.arch == "gpt2" or config.gelu == "relu2" else SwiGLU(config)

    def forward(self, x, kv_cache=None, input_pos=None, attn_mask=None, rope=None):
        # pre-LN: normalise the input of each sublayer, keep the residual stream untouched
        x = x + self.attn(self.ln_1(x), kv_cache, input_pos, attn_mask, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.loss_chunk_size = 1024  # rows of (B*T) per chunk of the memory-efficient loss
        # The chunked loss recomputes the logits in backward: it saves memory and costs time, so
        # where the logits are small (up to 2^24 of them, 64 MiB in fp32) the plain loss runs.
        self.plain_loss_max_logits = 2**24
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rope_theta:  # GPT-2's learned positions; RoPE needs no table
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(**parts, drop=nn.Dropout(config.dropout),
                                              h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                                              ln_f=make_norm(config, config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the input embedding and the output projection
        # are one matrix, as in GPT-2; it saves vocab_size * n_embd parameters.
        self.tie_weights()
        if not self.lm_head.weight.is_meta:  # on the meta device the weights are about to be loaded
            self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            # Each block adds two projections to the residual stream; scaling them by
            # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth (GPT-2 paper).
            scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "RESIDUAL_SCALE_INIT", False) else 1
            nn.init.normal_(module.weight, mean=0.0, std=0.02 * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self):
        if self.config.tie_embeddings:  # also after loading: assigning a tensor to one name unties them
            self.lm_head.weight = self.transformer.wte.weight
        return self

    def hidden_states(self, idx, kv_cache=None, input_pos=None, position_ids=None, attn_mask=None):
        """Run the transformer on idx (B, T) and return the final hidden states (B, T, n_embd).
        input_pos: the cache slots written; position_ids (T,) or (B, T): the positions (default: input_pos)."""
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise NanoError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        position_ids = input_pos if position_ids is None else position_ids  # (T,): broadcast over the batch
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
        x, targets = x.view(-1, x.size(-1)), targets.reshape(-1)  # (B*T, C), (B*T,)
        if targets.numel() * self.config.vocab_size <= self.plain_loss_max_logits:  # small logits: in one go
            return None, cross_entropy_sum(self.lm_head(x), targets) / (targets != -1).sum().clamp(min=1)
        return None, chunked_cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk_size)

    def num_params(self, non_embedding=True):
        """Parameter count; by default without the position table (as nanoGPT) and without an
        untied input embedding (a lookup, not a matmul); a tied one is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(self.transformer[k].weight.numel() for k in ("wpe", "wte") if k in self.transformer
                     and (k == "wpe" or not self.config.tie_embeddings))
        return n

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # Decay matrices (Linear weights, embeddings); never biases or norm gains, whose scale
        # carries meaning that decay would pull towards zero. A parameter of 2+ dims that is a
        # bias all the same (MoE's stacked expert biases) says so with `p.no_weight_decay = True`.
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p.dim() >= 2 and not getattr(p, "no_weight_decay", False) for p in params]
        groups = [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": weight_decay},
                  {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}]
        # fused: one kernel per parameter instead of ~10 ops each (CUDA; CPU since torch 2.4)
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
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

    @classmethod
    def from_hf_state_dict(cls, sd, config: GPTConfig | None = None, dtype=None):
        """A GPT from a Hugging Face state dict (GPT2LMHeadModel/GPT2Model names, or with a
        config of arch "llama" LlamaForCausalLM's and its family's); tensors are copied."""
        return hf_io.fill_from_state_dict(lambda fields: empty_model(config or GPTConfig(**fields)), sd, dtype, config is None)

    def to_hf_state_dict(self) -> dict:
        """The inverse of from_hf_state_dict (hf_io.to_hf_state_dict: Hugging Face's names)."""
        return hf_io.to_hf_state_dict(clean_state_dict(self), self.config.arch)

    @classmethod
    def from_pretrained(cls, name_or_dir: str, cache_dir: str | None = None, dtype=None):
        """OpenAI's GPT-2 ("gpt2" ... "gpt2-xl"), a Hugging Face folder or hub name: see load_pretrained."""
        return load_pretrained(name_or_dir, cache_dir, dtype)[0]


# ----------------------------------------------------------------------------------------
# Memory-efficient loss


class _ChunkedLoss(torch.autograd.Function):
    """sum_c loss_fn(x_c @ W.T, t_c, *rows_c) / n_valid without keeping any chunk's logits: backward
    re-runs each chunk's forward and differentiates it (torch.func.vjp, as checkpointing does), so
    one (chunk, V) block of logits exists at a time, for any loss_fn. Row tensors (N, ...), e.g. a
    teacher's hidden states, are cut into the same chunks and get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, loss_fn, *rows):
        ctx.save_for_backward(x, weight, targets, *rows)
        ctx.chunk_size, ctx.loss_fn = chunk_size, loss_fn
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], chunk_size):
            end = start + chunk_size
            total = total + loss_fn(x[start:end] @ weight.t(), targets[start:end], *(r[start:end] for r in rows))
        return total / (targets != -1).sum().clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, targets, *rows = ctx.saved_tensors
        scale = (grad_out / (targets != -1).sum().clamp(min=1)).to(torch.float32)
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
# Hugging Face weights: names and shapes (hf_io.py reads the folders: config.json, safetensors)

def empty_model(config: GPTConfig) -> GPT:
    """A GPT whose tensors have shapes but no memory (the meta device), for `fill` to load into."""
    with torch.device("meta"):
        return GPT(config)


def load_pretrained(name_or_dir: str, cache_dir: str | None = None, dtype=None):
    """(model, tokenizer spec) from a Hugging Face model folder, a hub name or a GPT-2 size, in the
    checkpoint's dtype (or `dtype`): built on the meta device, filled one tensor at a time after
    every name and shape was checked (hf_io.load_folder), so peak memory is the model plus one tensor."""
    return hf_io.load_folder(lambda fields: empty_model(GPTConfig(**fields)), name_or_dir, cache_dir, dtype)


# ----------------------------------------------------------------------------------------
# Checkpoints: {"model", "config", "tokenizer", "tokenizer_file", "step", ...}, written atomically


def clean_state_dict(model: nn.Module) -> dict:
    # torch.compile wraps the model and prefixes every key with "_orig_mod."
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


CHAT_SPECS = ("chat:tools:", "chat:")  # tokenizer.TOOLS_PREFIX, CHAT_PREFIX: + the base tokenizer's spec


def tokenizer_file(spec) -> Path | None:
    """The file a spec names (a bpe.py model or a tokenizer.json, also after "chat:"), or None."""
    base = spec.removeprefix(chat_prefix(spec)) if isinstance(spec, str) else None
    return Path(base) if base and not base.startswith("char:") and Path(base).is_file() else None


def pack_tokenizer(spec) -> dict | None:
    """{"name", "data"} of the spec's tokenizer file, for a checkpoint; None for other specs."""
    path = tokenizer_file(spec)
    return {"name": path.name, "data": path.read_bytes()} if path else None


def unpack_tokenizer(spec, packed: dict | None):
    """The spec to load a checkpoint's tokenizer with: the recorded path while it holds the same bytes, else a copy."""
    path = tokenizer_file(spec)
    if not packed or (path is not None and path.read_bytes() == packed["data"]):
        return spec
    digest = hashlib.sha256(packed["data"]).hexdigest()[:16]
    copy = common.nanollm_cache() / "tokenizers" / f"{digest}-{Path(packed['name']).name}"
    if not copy.is_file():
        common.atomic_write(copy, lambda tmp: tmp.write_bytes(packed["data"]))
    return chat_prefix(spec) + str(copy)


def chat_prefix(spec: str) -> str:
    return next((p for p in CHAT_SPECS if spec.startswith(p)), "")


def save_checkpoint(path, model, tokenizer_spec, step=0, **extra):
    """The weights, config and tokenizer spec; a file-based tokenizer travels inside (pack_tokenizer)."""
    raw = getattr(model, "_orig_mod", model)
    common.atomic_save({"model": clean_state_dict(raw), "config": asdict(raw.config), "tokenizer": tokenizer_spec,
                        "tokenizer_file": pack_tokenizer(tokenizer_spec), "step": step, **extra}, path)


def model_from_checkpoint(ckpt: dict, path="checkpoint") -> GPT:
    try:
        config = GPTConfig(**ckpt["config"])
    except TypeError as e:
        raise NanoError(f"{path} has a config this GPT does not know ({e})") from None
    # shapes first, on the meta device: a lying config (n_embd 2**17) must not allocate 200 GB
    wanted = {k: tuple(v.shape) for k, v in empty_model(config).state_dict().items()}
    saved = {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in ckpt["model"].items()}
    for key in sorted(wanted.keys() | saved.keys(), key=lambda k: (k not in saved, k not in wanted, k)):
        if wanted.get(key) != saved.get(key):
            raise NanoError(f"{path} does not match its config ({key}: {saved.get(key, 'missing')} in the "
                            f"file, {wanted.get(key, 'unexpected')} for the config)")
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    return model


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
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in ("model", "config")):
        raise NanoError(f"{path} is not a nanollm checkpoint (needs 'model' and 'config' dicts)")
    packed = ckpt.get("tokenizer_file")
    if not isinstance(ckpt.get("tokenizer"), (str, type(None))) or packed is not None and not (
            isinstance(packed, dict) and isinstance(packed.get("data"), bytes) and isinstance(packed.get("name"), str)):
        raise NanoError(f"{path} has a damaged tokenizer record (save the checkpoint again)")
    ckpt["tokenizer"] = unpack_tokenizer(ckpt.get("tokenizer"), ckpt.get("tokenizer_file"))
    return ckpt


def load_checkpoint(path, device="cpu"):
    """Returns (model, tokenizer_spec) from a checkpoint written by save_checkpoint."""
    ckpt = read_checkpoint(path, device)
    return model_from_checkpoint(ckpt, path).to(device), ckpt["tokenizer"]
