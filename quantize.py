"""Post-training quantization: store a trained GPT's weights in 8 or 4 bits, from scratch.

Batch-1 decode reads every weight once per token, so bytes per weight are the speed; a weight
in 4 bits is 8x fewer bytes than in fp32. The question is what the rounding costs. In order:

1. absmax (symmetric) and zero-point (asymmetric) int8, with one scale per tensor, per output
   channel or per group of consecutive weights: the finer the scale, the smaller the round-trip
   error ||W - W_hat|| / ||W|| (`python quantize.py --method absmax` prints the table).
2. LLM.int8 (Dettmers et al. 2022, arXiv:2208.07339): the activations are quantized too, row by
   row, and multiplied int8 x int8 -> int32; the few input columns holding a value >= 6.0 (the
   "emergent outliers" of large models) would wreck their row's scale, so they stay in float.
   Equal to bitsandbytes' Linear8bitLt (threshold 6.0) within its fp16 rounding.
3. RTN: round to nearest, 4 bits with a scale and zero point per group of 32/64/128 weights.
4. GPTQ (Frantar et al. 2022, arXiv:2210.17323; IST-DASLab/gptq's gptq.py): quantize one input
   column at a time and spread its rounding error over the columns not yet quantized, weighted by
   the inverse Hessian of the layer's output error, H = 2 X X^T over calibration inputs X.
5. AWQ (Lin et al. 2023, arXiv:2306.00978): weights that meet large activations matter most, so
   scale input channel j up by s_j = mean|x_j|^alpha before RTN (and the activations down by the
   same s, folded into the previous norm or linear: the float model is unchanged); alpha is the
   one of a grid that gives the least output error on calibration data. Then each group's range
   is shrunk (its largest weights clipped) where that lowers the group's output error.

The layers (`QuantLinear`, `LLMInt8Linear`) run on CPU through our own kernels where a C compiler
and AVX-512 VNNI are here (quantize_kernels.c: the activations quantized in blocks of 32 as
llama.cpp's q8_0 does, then int8 or 4-bit x int8 dot products that never turn a weight into a
float, reading the weights at the memory's speed), else through torch's weight-only kernels with
bf16 activations (int8: `torch._weight_int8pack_mm`, per-channel scales; int4:
`_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu`, as gpt-fast's
quantize.py), elsewhere through a plain dequantize + F.linear. Calibration text is the model's
own training text (or --calib text:FILE): N random windows of T tokens. A quantized checkpoint
is gpt.py's format plus a "quantization" entry; `load_quantized` reads it.

Run:
  python quantize.py --ckpt out/ckpt.pt --method gptq --bits 4 --group_size 128 --out out/ckpt-gptq4.pt
  python quantize.py --ckpt out/ckpt.pt --method absmax        # int8 per channel, prints the int8 table
  python quantize.py --ckpt out/ckpt.pt --method awq --calib text:data.txt --n_calib 64 --calib_len 256
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import gpt
from common import NanoError, cli

# ----------------------------------------------------------------------------------------
# 1. int8: absmax and zero-point, one scale per tensor, channel or group

GRANULARITIES = ("tensor", "channel", "group")


def scale_rows(w: torch.Tensor, granularity: str, group_size: int = 128) -> torch.Tensor:
    """w (N, K) as rows that each share one scale: the whole tensor (1 row), each output channel
    (N rows), or each group of group_size consecutive weights of a channel (N * ceil(K / g) rows).
    A channel's last group, shorter where g does not divide K, is padded by repeating its last
    weight, which leaves its min and max as they were."""
    if granularity == "tensor":
        return w.reshape(1, -1)
    if granularity == "channel":
        return w
    if granularity != "group":
        raise NanoError(f"unknown granularity {granularity!r} ({', '.join(GRANULARITIES)})")
    pad = -w.shape[1] % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(-1, group_size)


def from_rows(rows: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of scale_rows: back to (N, K), padding dropped."""
    return rows.reshape(shape[0], -1)[:, :shape[1]]


def absmax_quantize(w, bits=8, granularity="channel", group_size=128):
    """Symmetric: scale = max|w| / (2^(bits-1) - 1), q = round(w / scale) in [-127, 127]. Zero
    stays exactly zero; a row whose values are all on one side wastes half of the codes.
    Returns (q int8 rows, scale (rows, 1))."""
    rows = scale_rows(w.float(), granularity, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = rows.abs().amax(dim=1, keepdim=True) / qmax
    q = torch.round(rows / torch.where(scale == 0, 1.0, scale)).clamp(-qmax, qmax)
    return q.to(torch.int8), scale


def absmax_dequantize(q, scale, shape):
    return from_rows(q.float() * scale, shape)


def zeropoint_quantize(w, bits=8, granularity="channel", group_size=128):
    """Asymmetric: the row's [min, max] is mapped onto [0, 2^bits - 1], the zero point z being the
    code of 0.0: q = round(w / scale) + z. Uses every code when values are one-sided.
    Returns (q uint8 rows, scale (rows, 1), zero (rows, 1))."""
    rows = scale_rows(w.float(), granularity, group_size)
    qmax = 2 ** bits - 1
    lo, hi = rows.amin(dim=1, keepdim=True).clamp(max=0), rows.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, 1.0, scale)
    zero = torch.round(-lo / scale)
    q = (torch.round(rows / scale) + zero).clamp(0, qmax)
    return q.to(torch.uint8), scale, zero


def zeropoint_dequantize(q, scale, zero, shape):
    return from_rows((q.float() - zero) * scale, shape)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat|| / ||W||: the round-trip error, relative to the weights' own size."""
    return ((w.float() - w_hat.float()).norm() / w.float().norm().clamp(min=1e-30)).item()


def int8_error_table(weights: dict, group_size=128) -> dict:
    """Mean round-trip error over the given weights of each scheme x granularity:
    {("absmax", "tensor"): 0.012, ...}."""
    table = {}
    for granularity in GRANULARITIES:
        for scheme in ("absmax", "zeropoint"):
            errors = []
            for w in weights.values():
                if scheme == "absmax":
                    q, s = absmax_quantize(w, 8, granularity, group_size)
                    errors.append(relative_error(w, absmax_dequantize(q, s, w.shape)))
                else:
                    q, s, z = zeropoint_quantize(w, 8, granularity, group_size)
                    errors.append(relative_error(w, zeropoint_dequantize(q, s, z, w.shape)))
            table[scheme, granularity] = sum(errors) / len(errors)
    return table


# ----------------------------------------------------------------------------------------
# 2. LLM.int8: activations in int8 too, outlier columns in float


def int8_rowwise(a: torch.Tensor, threshold: float = 0.0):
    """bitsandbytes' int8_vectorwise_quant: each row of a (M, K) gets its own absmax scale.
    With a threshold, values with |a| >= threshold are left out of the scales and their whole
    columns get code 0 (they are multiplied in float instead). Returns (q int8 (M, K), absmax
    fp32 (M,), outlier column indices or None)."""
    a = a.float()
    cols = None
    if threshold > 0:
        outliers = a.abs() >= threshold
        cols = outliers.any(dim=0).nonzero().view(-1)
        a = a.masked_fill(outliers, 0.0)
    absmax = a.abs().amax(dim=1)
    q = torch.round(a * torch.where(absmax > 0, 127.0 / absmax, 0.0)[:, None]).to(torch.int8)
    if cols is not None:
        q[:, cols] = 0
    return q, absmax, cols


def int8_matmul(a: torch.Tensor, b: torch.Tensor, packed=None) -> torch.Tensor:
    """a (M, K) int8 @ b (N, K)^T int8 -> the int32 sums: on CPU oneDNN's int8 GEMM (VNNI/AMX) on
    b reordered once (packed = int8_pack(b)), else torch._int_mm; elsewhere an fp32 product, exact
    while every sum stays below 2^24. (oneDNN hands the sums back as fp32, the type they are scaled
    in next anyway; 1-row products measured 1.2-2.2x faster than torch._int_mm here.)"""
    if a.device.type != "cpu":
        return (a.float() @ b.float().t()).to(torch.int32)
    if packed is None:
        return torch._int_mm(a, b.t())
    weight, ones, zeros = packed
    return torch.ops.onednn.qlinear_pointwise(a, 1.0, 0, weight, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")


def int8_pack(b: torch.Tensor):
    """b (N, K) int8 in oneDNN's blocked layout for int8_matmul, with unit scales and zero points (no
    scaling: the bare sums), or None where oneDNN is absent."""
    if b.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.onednn.qlinear_prepack(b, None), torch.ones(b.shape[0]), torch.zeros(b.shape[0], dtype=torch.long)


def llm_int8_linear(x, cb, scb, bias=None, threshold=6.0, packed=None):
    """y = x W^T the LLM.int8 way. W is stored as cb (N, K) int8 with row absmax scb (N,). The
    rows of x are quantized on the fly (scale absmax/127 each), multiplied int8 x int8 -> int32
    and scaled back by row scale x column scale (bitsandbytes' 1/127^2 constant); the outlier
    columns of x, kept in float, meet W's same columns dequantized (as Linear8bitLt does)."""
    a = x.reshape(-1, x.shape[-1]).float()
    ca, sca, cols = int8_rowwise(a, threshold)
    y = int8_matmul(ca, cb, packed) * (sca[:, None] * scb[None, :]) * 6.200124e-05
    if cols is not None and cols.numel():
        w_cols = cb[:, cols].float() * scb[:, None] * 7.874015718698502e-3  # * 1/127
        y = y + a[:, cols] @ w_cols.t()
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], cb.shape[0])


class LLMInt8Linear(nn.Module):
    """A Linear whose weight is int8 per output row (absmax) and whose forward is llm_int8_linear."""

    def __init__(self, cb, scb, bias=None, threshold=6.0):
        super().__init__()
        self.out_features, self.in_features = cb.shape
        self.threshold = threshold
        self.register_buffer("cb", cb)
        self.register_buffer("scb", scb)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._packed = None  # (where, version, cb for oneDNN): made again when cb moves or changes

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold=6.0):
        cb, scb, _ = int8_rowwise(linear.weight.detach())  # the weight's rows quantized as bnb does
        return cls(cb, scb, linear.bias, threshold)

    def dequantized_weight(self, dtype=torch.float32):
        return (self.cb.float() * self.scb[:, None] / 127).to(dtype)

    def forward(self, x):
        if self._packed is None or self._packed[:2] != (self.cb.data_ptr(), self.cb._version):  # new or changed
            self._packed = (self.cb.data_ptr(), self.cb._version, int8_pack(self.cb))
        return llm_int8_linear(x, self.cb, self.scb, self.bias, self.threshold, self._packed[2])

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


# ----------------------------------------------------------------------------------------
# 3. 4-bit (and 3-bit) groupwise round to nearest: the grid RTN, GPTQ and AWQ share


def minmax_params(w: torch.Tensor, bits: int):
    """GPTQ's quantizer (sym=False): per row of w, the range [min(w, 0), max(w, 0)] on 2^bits
    levels. Returns (scale, zero), each (rows,); the zero point is an integer code."""
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    both_zero = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
    scale = (hi - lo) / (2 ** bits - 1)
    return scale, torch.round(-lo / scale)


def quantize_codes(w, scale, zero, bits):
    """Integer codes in [0, 2^bits - 1]: clamp(round(w / scale) + zero)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def dequantize_groups(codes, scale, zero, group_size):
    """codes (N, K), scale and zero (N, ceil(K / g)) -> W_hat (N, K) = scale * (code - zero)."""
    K = codes.shape[1]
    s = scale.repeat_interleave(group_size, dim=1)[:, :K]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :K]
    return s * (codes.float() - z)


def rtn_quantize(w: torch.Tensor, bits=4, group_size=128):
    """Round every weight to the nearest level of its group's min-max grid.
    Returns (codes uint8 (N, K), scale fp32 (N, G), zero (N, G))."""
    N, K = w.shape
    rows = scale_rows(w.detach().float(), "group", group_size)  # (N * G, g)
    scale, zero = minmax_params(rows, bits)
    codes = from_rows(quantize_codes(rows, scale[:, None], zero[:, None], bits), (N, K))
    return codes.to(torch.uint8), scale.view(N, -1), zero.view(N, -1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> (N, ceil(K / 2)) bytes: even column low nibble, odd column high."""
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1)[:, :K]


# ----------------------------------------------------------------------------------------
# 4. GPTQ


def gptq_quantize(w, H, bits=4, group_size=128, block_size=128, percdamp=0.01, act_order=False):
    """Quantize W (N, K) column by column, each column's rounding error pushed onto the columns
    after it so that the layer's output on the calibration inputs moves as little as possible.

    H = 2 X X^T / n (K, K) is the Hessian of ||W X - W_hat X||^2. After quantizing column i the
    optimal update of the remaining columns is -err_i / [H^-1]_ii * [H^-1]_i,i: (the OBS step);
    those rows of H^-1 are the rows of the upper Cholesky factor of H^-1 (scaled), computed once.
    Damping adds percdamp * mean(diag H) to the diagonal (H may be singular); a column no input
    ever used (diag 0) is set to zero. Lazy batches: the update is applied inside a block of
    block_size columns at once, and to the rest of W once per block (memory-bound -> matmul).
    Groups: a group's scale and zero are taken when its first column comes up, from W as the
    lazy updates have left it (as gptq.py does). act_order: columns in order of decreasing
    diag(H) (the inputs with the most energy first); the groups' parameters are then fixed up
    front from the original order (gptq.py's static_groups), so groups stay contiguous.
    group_size 0: one scale per output channel. Returns (codes (N, K), scale (N, G), zero (N, G))
    in the original column order."""
    W = w.detach().float().clone()
    N, K = W.shape
    g = group_size or K
    G = math.ceil(K / g)
    scale, zero = torch.zeros(N, G), torch.zeros(N, G)
    if not group_size:
        scale[:, 0], zero[:, 0] = minmax_params(W, bits)  # from W as given, as gptq.py
    H = H.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order and bool(group_size)
    if static:
        for j in range(G):
            scale[:, j], zero[:, j] = minmax_params(W[:, j * g:(j + 1) * g], bits)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(N, K, dtype=torch.uint8)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i].item()  # this column's place in the original order
            if group_size and not static and col % g == 0:
                scale[:, col // g], zero[:, col // g] = minmax_params(W[:, col:col + g], bits)
            s, z = scale[:, col // g], zero[:, col // g]
            w_col = W1[:, i]
            q = quantize_codes(w_col, s, z, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w_col - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return codes, scale, zero


class HessianAccumulator:
    """H = 2 X X^T / n over every input row X seen so far (rows of the (B, T, K) inputs)."""

    def __init__(self, K: int):
        self.sum, self.n = torch.zeros(K, K, dtype=torch.float64), 0

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += x.t() @ x
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2 * self.sum / max(self.n, 1)).float()


# ----------------------------------------------------------------------------------------
# 5. AWQ: activation-aware scales, searched on the output error, folded away


def awq_search(weights: list, x: torch.Tensor, bits=4, group_size=128, n_grid=20):
    """The per-input-channel scale s for the Linears `weights` (each (N_i, K)) that read x (M, K):
    s = mean|x|^alpha (normalised so that max(s) * min(s) = 1), alpha in {0, 1/n_grid, ...}, the
    one whose RTN of W * s (then / s) gives the least mean squared error of x W^T. alpha = 0 is
    plain RTN, so AWQ is never worse than RTN on these inputs. Returns (s (K,), alpha, error)."""
    x = x.reshape(-1, x.shape[-1]).float()
    w = torch.cat([w.detach().float() for w in weights])
    x_mean = x.abs().mean(dim=0)
    y = x @ w.t()
    best = (None, None, float("inf"))
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        w_hat = fake_quantize(w * s, bits, group_size) / s
        err = (y - x @ w_hat.t()).pow(2).mean().item()
        if err < best[2]:
            best = (s, alpha, err)
    return best


def fake_quantize(w: torch.Tensor, bits=4, group_size=128) -> torch.Tensor:
    """RTN there and back: what W looks like to the kernel (quantize, then dequantize)."""
    return dequantize_groups(*rtn_quantize(w, bits, group_size), group_size)


def awq_clip(w: torch.Tensor, x: torch.Tensor, bits=4, group_size=128, n_grid=20, max_shrink=0.5, chunk=1024):
    """AWQ's second search (llm-awq's auto_clip): a group's largest weights stretch its grid, so
    shrinking its range [min, max] to f * [min, max] (the weights beyond it clipped) rounds the
    rest finer. For every output channel and group, f in {1, 0.95, ..., 0.55}: the one whose
    RTN gives the least error of that group's share of the output, x_g w_g^T, on the rows x (M, K).
    Returns W with each group clipped to its best range (then quantized by plain RTN)."""
    N, K = w.shape
    G = math.ceil(K / group_size)
    pad = G * group_size - K  # zero columns: they neither move a range that holds 0 nor add output
    xg = F.pad(x.reshape(-1, K).float(), (0, pad)).view(-1, G, group_size).transpose(0, 1)  # (G, M, g)
    out = []
    for n0 in range(0, N, chunk):  # a chunk of output channels at a time: (G, M, chunk) outputs
        wg = F.pad(w[n0:n0 + chunk].detach().float(), (0, pad)).view(-1, G, group_size).transpose(0, 1)  # (G, n, g)
        y = xg @ wg.transpose(1, 2)
        lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
        best, best_err = wg, torch.full((G, wg.shape[1]), float("inf"))
        for i in range(int(max_shrink * n_grid)):
            f = 1 - i / n_grid
            clipped = torch.maximum(torch.minimum(wg, hi * f), lo * f)
            w_hat = fake_quantize(clipped.reshape(-1, group_size), bits, group_size).view_as(wg)
            err = (xg @ w_hat.transpose(1, 2) - y).pow(2).mean(dim=1)  # (G, n)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], clipped, best)
        out.append(best.transpose(0, 1).reshape(best.shape[1], -1)[:, :K])
    return torch.cat(out)


def scale_output_down(module: nn.Module, s: torch.Tensor, rows: slice | None = None):
    """Divide the outputs (rows) of a norm or Linear by s: its next Linear, whose input columns are
    multiplied by s, then computes the same function. Only ops linear in their output can absorb
    this: a norm's gain (and bias), a Linear's rows; not a GELU."""
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            rows = rows or slice(None)
            module.weight[rows] /= s[:, None]
            if module.bias is not None:
                module.bias[rows] /= s
        else:  # LayerNorm / RMSNorm: y = gain * normalised (+ bias)
            module.weight /= s
            if getattr(module, "bias", None) is not None:
                module.bias /= s


def awq_pairs(block: nn.Module) -> list:
    """(previous op, its output rows, [Linears reading them]) for each AWQ fold of a block.
    GPT-2's MLP output projection reads a GELU: nothing linear to fold into, plain RTN there;
    the attention output projection folds into v only when every query head has its own v."""
    attn, mlp = block.attn, block.mlp
    own_v = attn.n_kv_head == attn.n_head
    if hasattr(attn, "c_attn"):  # GPT-2: q, k, v in one matrix; v's rows are the last ones
        q_dim, kv_dim, _ = attn.split
        return [(block.ln_1, None, [attn.c_attn])] + \
            ([(attn.c_attn, slice(q_dim + kv_dim, None), [attn.c_proj])] if own_v else []) + \
            [(block.ln_2, None, [mlp.c_fc])]
    pairs = [(block.ln_1, None, [attn.q_proj, attn.k_proj, attn.v_proj])]
    pairs += [(attn.v_proj, None, [attn.o_proj])] if own_v else []
    return pairs + [(block.ln_2, None, [mlp.gate_proj, mlp.up_proj]), (mlp.up_proj, None, [mlp.down_proj])]


def awq_clip_targets(block: nn.Module) -> list:
    """(Linear, its rows) that AWQ clips: all but the query and key rows, as llm-awq (a clipped
    q or k moves the attention scores, which the per-Linear error does not see)."""
    attn = block.attn
    if hasattr(attn, "c_attn"):
        q_dim, kv_dim, _ = attn.split
        keep = [(attn.c_attn, slice(q_dim + kv_dim, None))]
    else:
        keep = [(attn.v_proj, slice(None))]
    qkv = {id(m) for m in (getattr(attn, n, None) for n in ("c_attn", "q_proj", "k_proj", "v_proj")) if m is not None}
    return keep + [(m, slice(None)) for m in block.modules() if isinstance(m, nn.Linear) and id(m) not in qkv]


# ----------------------------------------------------------------------------------------
# The layers and their CPU kernels: our own (quantize_kernels.c), else torch's

KERNELS_C = Path(__file__).with_name("quantize_kernels.c")
KERNEL_BLOCK, KERNEL_TILES = 32, 8  # quantize_kernels.c's BLOCK (inputs per activation scale) and S


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@functools.cache
def own_kernels():
    """quantize_kernels.c built for this CPU and loaded (ctypes), or None where it cannot run: no
    AVX-512 VNNI, no C compiler, or NANOLLM_OWN_KERNELS=0 (torch's kernels then). Built once per
    source, flags and CPU into ~/.cache/nanollm/kernels (a few tenths of a second)."""
    flags = cpu_flags()
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if os.environ.get("NANOLLM_OWN_KERNELS", "1") == "0" or not {"avx512_vnni", "avx512bw"} <= flags or not compiler:
        return None
    options = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]  # OpenMP: the runtime torch has loaded
    key = hashlib.sha256(KERNELS_C.read_bytes() + " ".join(options + sorted(flags)).encode()).hexdigest()[:16]
    path = common.nanollm_cache() / "kernels" / f"quantize_kernels-{key}.so"
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # never a half-written library under the name
            built = subprocess.run([compiler, *options, str(KERNELS_C), "-o", str(tmp)], capture_output=True, text=True)
            if built.returncode:
                first = (built.stderr.strip().splitlines() or ["no message"])[0]
                print(f"note: {KERNELS_C.name} did not build ({first}); torch's kernels run instead", file=sys.stderr)
                return None
            os.replace(tmp, path)
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.quant_linear.argtypes = [I, P, I, I, I, I, P, P, P, P, P, I, P, P, P]
    return lib


def pack_int8_tiles(q: torch.Tensor, scales: torch.Tensor):
    """(N, K) int8 -> quantize_kernels.c's int8 layout: w + 128 as uint8 in tiles of 16 outputs,
    4 consecutive inputs of an output side by side; zero pads to whole blocks and tile groups."""
    N, K = q.shape
    Kp, Np = -(-K // KERNEL_BLOCK) * KERNEL_BLOCK, -(-N // (16 * KERNEL_TILES)) * 16 * KERNEL_TILES
    w = (F.pad(q, (0, Kp - K, 0, Np - N)).to(torch.int16) + 128).to(torch.uint8)
    w = w.view(Np // 16, 16, Kp // 4, 4).permute(0, 2, 1, 3)  # (tile, output, k4, 4) -> (tile, k4, output, 4)
    return w.contiguous(), F.pad(scales.float(), (0, Np - N)).contiguous(), None, Kp


def pack_int4_tiles(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    """(N, K) codes 0..15 -> quantize_kernels.c's 4-bit layout: per tile of 16 outputs and 8 inputs,
    64 bytes whose byte c of output i holds input c (low nibble) and c + 4 (high); the scales and
    zero points (N, G) as (tiles, G, 16)."""
    N, K = codes.shape
    Kp, Np = -(-K // group_size) * group_size, -(-N // (16 * KERNEL_TILES)) * 16 * KERNEL_TILES
    c = F.pad(codes, (0, Kp - K, 0, Np - N)).view(Np // 16, 16, Kp // 8, 2, 4)  # (tile, output, k8, low/high, 4)
    w = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3)  # (tile, k8, output, 4)

    def per_tile(t):  # (N, G) -> (tiles, G, 16)
        return F.pad(t.float(), (0, 0, 0, Np - N)).view(Np // 16, 16, -1).transpose(1, 2).contiguous()
    return w.contiguous(), per_tile(scales), per_tile(zeros), Kp


def own_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bias: torch.Tensor | None, Kp: int, bits: int, group_size: int, N: int) -> torch.Tensor:
    """y (M, N) fp32 = x (M, K) W^T (+ bias fp32) by quantize_kernels.c, on (w, scales, zeros, Kp)
    from pack_int8_tiles / pack_int4_tiles."""
    x = x.float().contiguous()
    (M, K), lib = x.shape, own_kernels()
    y = torch.empty(M, N)
    xq = torch.empty(M, Kp, dtype=torch.int8)  # the kernel's scratch: activation codes, block scales and sums
    xs, xsum = torch.empty(M, Kp // KERNEL_BLOCK), torch.empty(M, Kp // KERNEL_BLOCK, dtype=torch.int32)
    lib.quant_linear(bits, x.data_ptr(), M, K, Kp, group_size, w.data_ptr(), scales.data_ptr(),
                     None if zeros is None else zeros.data_ptr(), None if bias is None else bias.data_ptr(),
                     y.data_ptr(), N, xq.data_ptr(), xs.data_ptr(), xsum.data_ptr())
    return y


# The op torch.compile sees (sample.py --compile on a quantized checkpoint): opaque to the compiler,
# register_fake gives its output's shape and dtype, so the decode step compiles in one graph. Eager
# calls go straight to own_linear: the dispatcher costs ~12 us a call, 0.6 ms a 124M decode step.
own_linear_op = torch.library.custom_op("nanollm::quant_linear", own_linear, mutates_args=())


@own_linear_op.register_fake
def _(x, w, scales, zeros, bias, Kp, bits, group_size, N):
    return x.new_empty(x.shape[0], N, dtype=torch.float32)


def block_quantized(x: torch.Tensor) -> torch.Tensor:
    """What own_linear multiplies: x with each block of KERNEL_BLOCK inputs of a row rounded to
    int8 on its absmax scale (the plain PyTorch statement of quantize_blocks, for the tests)."""
    K = x.shape[-1]
    blocks = F.pad(x.float(), (0, -K % KERNEL_BLOCK)).unflatten(-1, (-1, KERNEL_BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0.0))
    return (codes * (amax / 127)).flatten(-2)[..., :K]


class QuantLinear(nn.Module):
    """A frozen Linear with its weight in `bits` bits. bits 8: qweight int8 (N, K), one scale per
    output channel (absmax). bits 2..4: two codes a byte (pack_nibbles), a scale and an integer
    zero point per group of group_size inputs (RTN, GPTQ, AWQ). On CPU, `kernel` "auto" runs our
    own kernel (own_linear: activations in int8 blocks, outputs in the input's dtype) where it
    runs here and the group is a multiple of KERNEL_BLOCK, else torch's weight-only kernels
    (bf16 activations; "torch" asks for them); "none", or another device, dequantizes the weight
    to the input's dtype for F.linear."""

    def __init__(self, in_features, out_features, bits, group_size=0, bias=False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(N, device=device))
        else:
            G = math.ceil(K / group_size)
            self.register_buffer("qweight", torch.empty(N, (K + 1) // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(N, G, device=device))
            self.register_buffer("zeros", torch.empty(N, G, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(N, device=device), requires_grad=False) if bias else None
        self.kernel = "auto"

    @property
    def kernel(self) -> str:
        return self._kernel_choice

    @kernel.setter
    def kernel(self, choice: str):
        self._kernel_choice, self._kernel = choice, None  # what the kernel reads is made again on next use

    @classmethod
    def from_int8(cls, q, scale, bias=None):
        layer = cls(q.shape[1], q.shape[0], 8, 0, bias is not None)
        layer.qweight.copy_(q)
        layer.scales.copy_(scale.view(-1))
        return layer._set_bias(bias)

    @classmethod
    def from_codes(cls, codes, scale, zero, bits, group_size, bias=None):
        layer = cls(codes.shape[1], codes.shape[0], bits, group_size, bias is not None)
        layer.qweight.copy_(pack_nibbles(codes))
        layer.scales.copy_(scale)
        layer.zeros.copy_(zero)
        return layer._set_bias(bias)

    def _set_bias(self, bias):
        if bias is not None:
            self.bias.data.copy_(bias.detach())
        return self

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.bits == 8:
            return (self.qweight.float() * self.scales[:, None]).to(dtype)
        codes = unpack_nibbles(self.qweight, self.in_features)
        return dequantize_groups(codes, self.scales, self.zeros, self.group_size).to(dtype)

    def kernel_kind(self) -> str:
        """"own", "torch" or "none": which forward runs (see the class docstring)."""
        if self.kernel == "none" or self.qweight.device.type != "cpu":
            return "none"
        own = own_kernels() is not None and (self.bits == 8 or self.group_size % KERNEL_BLOCK == 0)
        return "own" if own and self.kernel != "torch" else "torch"

    def own_kernel_weights(self):
        """The weight in quantize_kernels.c's tiles, and the bias in fp32 (made once)."""
        if self.bits == 8:
            packed = pack_int8_tiles(self.qweight, self.scales)
        else:
            packed = pack_int4_tiles(unpack_nibbles(self.qweight, self.in_features), self.scales, self.zeros,
                                     self.group_size)
        return packed, None if self.bias is None else self.bias.float().contiguous()

    def torch_kernel_weights(self):
        """What torch's kernels read, made once: bf16 scales (int8), or (int4) the codes in the
        kernel's own packing plus bf16 (scale, zero) pairs (G, N, 2), where its w = (q - 8) *
        scale + zero, so zero = scale * (8 - our zero point). The int4 kernel wants N a multiple
        of 16 and K of the group: the pads are zero rows (cut from the output) and columns (which
        meet zero activations). The int8 kernel gives garbage unless K is a multiple of 16
        (measured, torch 2.13): an odd K gets zero columns the same way."""
        N, K, g = self.out_features, self.in_features, self.group_size
        if self.bits == 8:
            pad_k = -K % 16
            return (F.pad(self.qweight, (0, pad_k)) if pad_k else self.qweight), self.scales.to(torch.bfloat16), pad_k
        pad_n, pad_k = -N % 16, -K % g
        codes = F.pad(unpack_nibbles(self.qweight, K), (0, pad_k, 0, pad_n)).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        pairs = torch.stack([self.scales, self.scales * (8 - self.zeros.float())], dim=-1)
        pairs = F.pad(pairs, (0, 0, 0, 0, 0, pad_n)).transpose(0, 1).contiguous().to(torch.bfloat16)
        return packed, pairs, pad_k

    def forward(self, x):
        if self._kernel is None:  # chosen and made once (a compiled step finds it made by the eager prefill)
            kind = self.kernel_kind()
            made = {"own": self.own_kernel_weights, "torch": self.torch_kernel_weights}.get(kind, lambda: None)()
            self._kernel = (kind, made)
        kind = self._kernel[0]
        if kind == "none":
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        a = x.reshape(-1, self.in_features)
        if kind == "own":
            (w, scales, zeros, Kp), bias = self._kernel[1]
            linear = own_linear_op if torch.compiler.is_compiling() else own_linear
            y = linear(a, w, scales, zeros, bias, Kp, self.bits, self.group_size, self.out_features)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        weight, scales, pad_k = self._kernel[1]
        a = a.to(torch.bfloat16).contiguous()  # one cast (none for bf16 input)
        a = F.pad(a, (0, pad_k)) if pad_k else a
        if self.bits == 8:
            y = torch._weight_int8pack_mm(a, weight, scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, weight, self.group_size, scales)
            y = y[:, :self.out_features] if y.shape[1] != self.out_features else y
        y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None and self.bias.dtype == x.dtype:
            return torch.add(self.bias, y)  # the cast back to x's dtype happens inside the add (type promotion)
        y = y.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def _apply(self, fn, recurse=True):
        self._kernel = None  # a move or cast: remake the kernel's copies on next use
        return super()._apply(fn, recurse)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
                + (f", group_size={self.group_size}" if self.bits < 8 else ""))


def set_kernel(model: nn.Module, kind: str) -> nn.Module:
    """Every QuantLinear of model runs `kind`: "auto" (ours where it runs), "torch" or "none"."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernel = kind
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (a tied weight once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------
# Whole models: which Linears, calibration inputs block by block, the methods

METHODS = ("absmax", "llm_int8", "rtn", "gptq", "awq")


def target_linears(model: gpt.GPT, head: bool = True) -> list[str]:
    """Every nn.Linear of the blocks (attention and MLP projections), and lm_head if `head`.
    The embedding stays float: a decode step reads one row of it, not all of it."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer.h.")]
    return names + (["lm_head"] if head else [])


def set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class _Captured(Exception):
    pass


@torch.no_grad()
def block_inputs(model: gpt.GPT, calib: torch.Tensor, batch=8):
    """The residual stream entering block 0 for every calibration sequence (N, T, C), and the other
    arguments the blocks get (cache, positions, mask, rotary angles: the same for every batch)."""
    seen = []

    def grab(module, args):
        seen.append(args)
        raise _Captured

    hook = model.transformer.h[0].register_forward_pre_hook(grab)
    try:
        for start in range(0, calib.shape[0], batch):
            try:
                model.hidden_states(calib[start:start + batch])
            except _Captured:
                pass
    finally:
        hook.remove()
    return torch.cat([a[0] for a in seen]), seen[0][1:]


@torch.no_grad()
def run_block(block, x, args, batch=8):
    return torch.cat([block(x[i:i + batch], *args) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def layer_inputs(module: nn.Module, names: list[str], fn, stride=0):
    """Run fn() with hooks on the named Linears of module. Returns ({name: HessianAccumulator}
    (GPTQ), or with a stride {name: every stride-th input row} (AWQ), fn's output)."""
    hessians, rows, hooks = {}, {}, []
    for name in names:
        linear = module.get_submodule(name)
        if not stride:
            hessians[name] = HessianAccumulator(linear.in_features)

        def hook(m, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if not stride:
                hessians[name].add(x)
            else:
                rows.setdefault(name, []).append(x[::stride])

        hooks.append(linear.register_forward_pre_hook(hook))
    try:
        out = fn()
    finally:
        for h in hooks:
            h.remove()
    if stride:
        return {k: torch.cat(v) for k, v in rows.items()}, out
    return hessians, out


def make_layer(linear: nn.Linear, method: str, bits: int, group_size: int, threshold=6.0, H=None, cfg=None):
    """The quantized replacement of one Linear (H: GPTQ's Hessian)."""
    w, bias = linear.weight.detach(), linear.bias
    if method == "absmax":
        q, scale = absmax_quantize(w, 8, "channel")
        return QuantLinear.from_int8(q, scale, bias)
    if method == "llm_int8":
        return LLMInt8Linear.from_linear(linear, threshold)
    if method == "gptq":
        codes, scale, zero = gptq_quantize(w, H, bits, group_size, cfg.block_size, cfg.damp, cfg.act_order)
    else:  # rtn, and awq once its scales are folded in
        codes, scale, zero = rtn_quantize(w, bits, group_size)
    return QuantLinear.from_codes(codes, scale, zero, bits, group_size, bias)


def output_error(x, w, w_hat) -> float:
    """||X W^T - X W_hat^T|| / ||X W^T|| on the rows x: what a layer's quantization costs its output."""
    y = x.float() @ w.float().t()
    return ((y - x.float() @ w_hat.float().t()).norm() / y.norm().clamp(min=1e-30)).item()


@torch.no_grad()
def quantize_gptq(model: gpt.GPT, calib: torch.Tensor, cfg: QuantizeConfig, log=print):
    """GPTQ block by block, as gptq.py: the calibration inputs of block i come out of the already
    quantized blocks before it, so each block corrects the error that reaches it. Every Linear of
    a block gets its Hessian from one pass of the block's float weights."""
    x, args = block_inputs(model, calib)
    stages = [(f"transformer.h.{i}", block) for i, block in enumerate(model.transformer.h)]
    for prefix, block in stages:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        hessians, _ = layer_inputs(block, names, lambda: run_block(block, x, args))
        for name in names:
            linear = block.get_submodule(name)
            layer = make_layer(linear, "gptq", cfg.bits, cfg.group_size, H=hessians[name].hessian(), cfg=cfg)
            set_module(block, name, layer)
            log(f"{prefix}.{name}: weight error {relative_error(linear.weight, layer.dequantized_weight()):.4f}")
        x = run_block(block, x, args)
    if cfg.quantize_head:
        h = HessianAccumulator(model.config.n_embd)
        h.add(model.transformer.ln_f(x))
        model.lm_head = make_layer(model.lm_head, "gptq", cfg.bits, cfg.group_size, H=h.hessian(), cfg=cfg)
    return model


@torch.no_grad()
def quantize_awq(model: gpt.GPT, calib: torch.Tensor, cfg: QuantizeConfig, log=print):
    """AWQ block by block on the float model. (1) Each fold's scale s is searched and folded away:
    the float model still computes the same function, so one pass per block gives the next block's
    inputs. (2) Each Linear's clipping ranges are searched on its inputs as they now are (divided
    by s) and its weight clipped. Then plain RTN of everything."""
    x, args = block_inputs(model, calib)
    stride = max(1, x.shape[0] * x.shape[1] // cfg.awq_rows)  # awq_rows rows, spread over every sequence
    for i, block in enumerate(model.transformer.h):
        names = {id(m): n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        rows, out = layer_inputs(block, list(names.values()), lambda: run_block(block, x, args), stride=stride)
        for prev, prev_rows, linears in awq_pairs(block):
            s, alpha, _ = awq_search([m.weight for m in linears], rows[names[id(linears[0])]], cfg.bits, cfg.group_size)
            scale_output_down(prev, s, prev_rows)
            for m in linears:
                m.weight.mul_(s)
                rows[names[id(m)]] = rows[names[id(m)]] / s  # what it reads from now on
            log(f"transformer.h.{i}.{names[id(linears[0])]}: AWQ alpha {alpha:.2f}")
        for linear, clip_rows in awq_clip_targets(block):
            linear.weight[clip_rows] = awq_clip(linear.weight[clip_rows], rows[names[id(linear)]], cfg.bits, cfg.group_size)
        x = out
    if cfg.quantize_head:  # ln_f feeds only the head
        # the head's outputs are the whole vocabulary: its searches run on an eighth of the rows
        hidden = model.transformer.ln_f(x).reshape(-1, model.config.n_embd)[::stride * 8]
        if model.config.tie_embeddings:  # the head gets its own copy: the embedding must not be scaled
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        s, alpha, _ = awq_search([model.lm_head.weight], hidden, cfg.bits, cfg.group_size)
        scale_output_down(model.transformer.ln_f, s)
        model.lm_head.weight.mul_(s)
        model.lm_head.weight.copy_(awq_clip(model.lm_head.weight, hidden / s, cfg.bits, cfg.group_size))
        log(f"lm_head: AWQ alpha {alpha:.2f}")
    return quantize_plain(model, "rtn", cfg, log)


@torch.no_grad()
def quantize_plain(model: gpt.GPT, method: str, cfg: QuantizeConfig, log=print):
    """absmax, llm_int8 and rtn: each Linear on its own, no calibration data."""
    for name in target_linears(model, cfg.quantize_head):
        linear = model.get_submodule(name)
        layer = make_layer(linear, method, cfg.bits, cfg.group_size, cfg.threshold)
        set_module(model, name, layer)
        log(f"{name}: weight error {relative_error(linear.weight, layer.dequantized_weight()):.4f}")
    return model


def quantization_record(model: gpt.GPT, cfg: QuantizeConfig) -> dict:
    """What load_quantized needs to rebuild the layers, and how they were made."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = {"kind": "weight_only", "bits": m.bits, "group_size": m.group_size, "bias": m.bias is not None}
        elif isinstance(m, LLMInt8Linear):
            layers[name] = {"kind": "llm_int8", "threshold": m.threshold, "bias": m.bias is not None}
    options = {k: v for k, v in asdict(cfg).items() if k not in ("ckpt", "out", "device")}
    return {"method": cfg.method, "options": options, "layers": layers}


def quantize_model(model: gpt.GPT, cfg: QuantizeConfig, calib: torch.Tensor | None = None, log=print) -> gpt.GPT:
    """Replace the model's Linears by quantized ones, in place, as cfg.method says (gptq and awq
    need calib (N, T) token ids). Returns the model, with `model.quantization` recorded."""
    check_config(cfg)
    model.eval()
    if cfg.method in ("gptq", "awq"):
        if calib is None:
            raise NanoError(f"--method {cfg.method} needs calibration data (pass calib token ids)")
        (quantize_gptq if cfg.method == "gptq" else quantize_awq)(model, calib, cfg, log)
    else:
        quantize_plain(model, cfg.method, cfg, log)
    model.quantization = quantization_record(model, cfg)
    return model


# ----------------------------------------------------------------------------------------
# Checkpoints: gpt.py's format plus {"quantization": {...}}


def is_quantized(ckpt: dict) -> bool:
    """A checkpoint dict written by save_quantized (gpt.load_checkpoint cannot read it)."""
    return isinstance(ckpt, dict) and "quantization" in ckpt


def save_quantized(path, model: gpt.GPT, tokenizer_spec, **extra):
    """gpt.save_checkpoint (atomic, tokenizer packed) of the quantized state dict."""
    gpt.save_checkpoint(path, model, tokenizer_spec, quantization=model.quantization, **extra)


def empty_layer(info: dict, linear: nn.Linear) -> nn.Module:
    K, N = linear.in_features, linear.out_features
    if info["kind"] == "llm_int8":
        layer = LLMInt8Linear(torch.empty(N, K, dtype=torch.int8, device="meta"), torch.empty(N, device="meta"),
                              torch.empty(N, device="meta") if info["bias"] else None, info["threshold"])
        return layer
    return QuantLinear(K, N, info["bits"], info["group_size"], info["bias"], device="meta")


def load_quantized(path_or_ckpt, device="cpu"):
    """(model in eval mode, tokenizer spec) of a quantized checkpoint (a path or its dict). The
    model is built without memory (meta device), its Linears replaced by empty quantized layers,
    then every tensor is assigned from the file: no float copy of a quantized weight exists."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else gpt.read_checkpoint(path_or_ckpt)
    where = "checkpoint" if isinstance(path_or_ckpt, dict) else str(path_or_ckpt)
    if not is_quantized(ckpt):
        raise NanoError(f"{where} is not a quantized checkpoint (load it with gpt.load_checkpoint)")
    try:
        model = gpt.empty_model(gpt.GPTConfig(**ckpt["config"]))
    except TypeError as e:
        raise NanoError(f"{where} has a config this GPT does not know ({e})") from None
    layers = ckpt["quantization"]["layers"]
    for name, info in layers.items():
        set_module(model, name, empty_layer(info, model.get_submodule(name)))
    try:
        model.load_state_dict(ckpt["model"], assign=True)
    except RuntimeError as e:
        raise NanoError(f"{where} does not match its quantization record ({str(e).strip().splitlines()[-1].strip()})") from None
    if "lm_head" not in layers:
        model.tie_weights()
    model.quantization = ckpt["quantization"]
    return model.to(device).eval(), ckpt.get("tokenizer")


# ----------------------------------------------------------------------------------------
# Calibration data and loss


def training_text(ckpt: dict) -> tuple[str, str]:
    """(text, where from) of the text the model was trained on, from train.py's train_config:
    Tiny Shakespeare (or its --input), a text: file; without a record, Tiny Shakespeare."""
    train = ckpt.get("train_config") or {}
    dataset = train.get("dataset", "")
    if dataset.startswith("text:"):
        path = Path(dataset[len("text:"):])
    elif dataset in ("shakespeare", "shakespeare_char") and train.get("input"):
        path = Path(train["input"])
    else:
        if dataset and dataset not in ("shakespeare", "shakespeare_char"):
            raise NanoError(f"calibration from the {dataset} training data is not supported (pass --calib text:FILE)")
        path = data.SHAKESPEARE_PATH
    return data.read_text_file(path, "--calib"), str(path)


def token_windows(ids: torch.Tensor, n: int, T: int, seed: int) -> torch.Tensor:
    """n random windows of T tokens of ids (N, T), from a private generator."""
    if len(ids) < T + 1:
        raise NanoError(f"the calibration text has {len(ids)} tokens, fewer than --calib_len {T} + 1 (use more text)")
    starts = torch.randint(0, len(ids) - T, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s:s + T] for s in starts.tolist()])


def calibration_ids(ckpt: dict, spec: str, calib: str, split: str = "train") -> torch.Tensor:
    """All token ids of the calibration text: --calib auto takes the training text, text:FILE a file;
    split "train" is its first 90% (data.py's split), "val" the rest."""
    if calib == "auto":
        text, _ = training_text(ckpt)
    elif calib.startswith("text:"):
        text = data.read_text_file(Path(calib[len("text:"):]), "--calib")
    else:
        raise NanoError(f"unknown --calib {calib!r} (auto or text:FILE)")
    cut = int(len(text) * (1 - data.VAL_FRACTION))
    text = text[:cut] if split == "train" else text[cut:]
    return torch.tensor(data.load_tokenizer(spec).encode(text), dtype=torch.long)


@torch.no_grad()
def eval_loss(model: gpt.GPT, x: torch.Tensor, y: torch.Tensor, batch: int = 1) -> float:
    """Mean cross-entropy of model on (x, y) through model.lm_head (whatever layer it is), a few
    rows at a time so the (rows, T, V) logits stay small."""
    total = 0.0
    for i in range(0, x.shape[0], batch):
        logits = model.lm_head(model.hidden_states(x[i:i + batch]))
        total += F.cross_entropy(logits.float().flatten(0, 1), y[i:i + batch].flatten(), reduction="sum").item()
    return total / y.numel()


# ----------------------------------------------------------------------------------------
# CLI


@dataclass
class QuantizeConfig:
    ckpt: str = field(default="out/ckpt.pt", metadata={"help": "checkpoint to quantize (train.py, lora.py --merge, ...)"})
    method: str = field(default="gptq", metadata={"help": "absmax (int8 per channel) | llm_int8 | rtn | gptq | awq"})
    bits: int = field(default=4, metadata={"help": "rtn/gptq/awq: 2, 3 or 4 (absmax and llm_int8 are 8-bit)"})
    group_size: int = field(default=128, metadata={"help": "rtn/gptq/awq: weights per scale and zero point (32, 64, 128, 256)"})
    act_order: bool = field(default=False, metadata={"help": "gptq: columns in order of decreasing Hessian diagonal"})
    damp: float = field(default=0.01, metadata={"help": "gptq: damping, a fraction of the mean Hessian diagonal"})
    block_size: int = field(default=128, metadata={"help": "gptq: columns per lazy batch update"})
    threshold: float = field(default=6.0, metadata={"help": "llm_int8: |activation| from which a column stays float"})
    awq_rows: int = field(default=2048, metadata={"help": "awq: calibration rows per layer in the searches, spread over all sequences (the head: 1/8)"})
    quantize_head: bool = field(default=True, metadata={"help": "quantize lm_head too (the largest matrix of a small model)"})
    calib: str = field(default="auto", metadata={"help": "auto (the model's training text) | text:FILE"})
    n_calib: int = field(default=64, metadata={"help": "gptq/awq: calibration sequences"})
    calib_len: int = field(default=256, metadata={"help": "gptq/awq: tokens per calibration sequence (at most block_size)"})
    seed: int = field(default=1337, metadata={"help": "picks the calibration windows"})
    out: str = field(default="", metadata={"help": "output checkpoint ('': <ckpt>-<method><bits>.pt beside --ckpt)"})


def check_config(cfg: QuantizeConfig):
    if cfg.method not in METHODS:
        raise NanoError(f"unknown --method {cfg.method!r} ({', '.join(METHODS)})")
    if cfg.method in ("rtn", "gptq", "awq"):
        if cfg.bits not in (2, 3, 4):
            raise NanoError(f"--bits {cfg.bits} is not supported by {cfg.method} (2, 3 or 4; 8 bits: --method absmax)")
        if cfg.group_size not in (32, 64, 128, 256):
            raise NanoError(f"--group_size must be 32, 64, 128 or 256 (got {cfg.group_size}; the CPU int4 kernel's sizes)")
    common.check_options(cfg, positive=("n_calib", "calib_len", "block_size", "awq_rows", "threshold"),
                         ranges={"damp": (0.0, 1.0)})


@cli
def main(argv=None):
    cfg = common.parse_config(QuantizeConfig, argv, __doc__)
    check_config(cfg)
    out = Path(cfg.out or Path(cfg.ckpt).with_name(f"{Path(cfg.ckpt).stem}-{cfg.method}"
                                                   f"{cfg.bits if cfg.method in ('rtn', 'gptq', 'awq') else 8}.pt"))
    ckpt = gpt.read_checkpoint(cfg.ckpt)
    if is_quantized(ckpt):
        raise NanoError(f"{cfg.ckpt} is quantized already (quantize the float checkpoint)")
    model, spec = gpt.model_from_checkpoint(ckpt, cfg.ckpt).eval(), ckpt.get("tokenizer")
    calib = None
    if cfg.method in ("gptq", "awq"):
        T = min(cfg.calib_len, model.config.block_size)
        calib = token_windows(calibration_ids(ckpt, spec, cfg.calib), cfg.n_calib, T, cfg.seed)
        print(f"calibration: {cfg.n_calib} sequences of {T} tokens ({cfg.calib})")
    if cfg.method == "absmax":
        weights = {n: model.get_submodule(n).weight.detach() for n in target_linears(model, cfg.quantize_head)}
        print("int8 round-trip error ||W - W_hat|| / ||W||, mean over the Linears:")
        for (scheme, granularity), err in int8_error_table(weights, cfg.group_size).items():
            print(f"  {scheme:<9} per {granularity:<7}{f' ({cfg.group_size})' if granularity == 'group' else '':<6} {err:.5f}")
    before, t0 = quantized_bytes(model), time.perf_counter()
    quantize_model(model, cfg, calib)
    save_quantized(out, model, spec)
    print(f"wrote {out}: {before / 2**20:,.1f} -> {quantized_bytes(model) / 2**20:,.1f} MiB of tensors "
          f"in {time.perf_counter() - t0:.1f} s")
    return out


if __name__ == "__main__":
    main()
