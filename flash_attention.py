"""FlashAttention-2: exact attention that never builds the T x T score matrix, as tiled loops in
PyTorch and as Triton kernels, forward and backward (Dao et al. 2022, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", arXiv:2205.14135; Dao 2023, "FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", arXiv:2307.08691).

Attention computed the plain way, O = softmax(Q K^T * scale + mask) V with scale = 1/sqrt(d),
writes the (T, T) scores S and probabilities P to memory (a GPU's HBM), reads them back for
P V, and keeps P for the backward pass. A score costs 2d FLOPs but 4-8 bytes of traffic each
way, so the kernel waits on memory, and the memory grows as T^2 (T = 8k, 16 heads: 4 GiB of
fp32 scores per layer and sequence).

FlashAttention cuts Q into row tiles and K, V into column tiles. A program owns one Q tile and
walks over the K/V tiles; each tile of scores S_ij = Q_i K_j^T lives only in on-chip memory
(registers, SRAM). A softmax row needs all its scores, so it is computed online: every row keeps
a running max m and a running sum l of exp(s - m). When a tile raises the max to m', what was
summed so far is rescaled by exp(m - m'), then the tile's exp(s - m') joins l and exp(s - m') V_j
joins the partial output. After the last tile O_i = acc / l is exactly softmax(S_i) V, not an
approximation. The forward keeps only O and the per-row logsumexp L = m + log l: T numbers per
head instead of T^2.

The backward recomputes each tile of probabilities from Q, K and L, P_ij = exp(Q_i K_j^T scale
- L_i), instead of reading a stored P. Given dO: dV_j = sum_i P_ij^T dO_i; dP_ij = dO_i V_j^T; the
softmax Jacobian gives dS_ij = P_ij * (dP_ij - D_i) with D_i = rowsum(dO_i * O_i) (equal to
rowsum(P_i * dP_i), one number per row, computed once up front); then dQ_i = scale sum_j dS_ij K_j
and dK_j = scale sum_i dS_ij^T Q_i. Recomputing costs one more Q K^T product and saves the
O(T^2) memory and its traffic. Causal masking skips the tiles wholly above the diagonal (half the
work) and masks only the tiles that cross it.

What FlashAttention-2 changed over v1, all visible in the kernels below: the K/V loop is the
inner loop of a program that owns a Q tile (its output stays in registers and is written once);
the division by l happens once at the end; the work is spread over batch x heads x query tiles;
the backward is one program per K/V tile accumulating dK, dV and one per Q tile accumulating dQ,
so no atomic additions are needed.

Here:
- `flash_attention_reference(q, k, v, causal)`: the tiled algorithm in plain PyTorch loops (an
  autograd.Function whose backward is the tiled recomputation), readable, any head size, and the
  CPU fallback of the kernels.
- `flash_attention(q, k, v, causal)`: one Triton forward kernel and two backward kernels behind
  the torch.library ops `nanollm::flash_attention_forward` / `_backward`, so torch.compile
  (fullgraph=True) traces a model using it without a graph break. CUDA tensors run the kernels;
  CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1 was set before this file
  was imported (slow: the tests), and otherwise run the PyTorch reference.
Shapes: q (B, H, T, D), k and v (B, H_kv, S, D) where H_kv divides H (grouped-query attention:
query head h reads K/V head h // (H / H_kv)); the kernels take D in {16, 32, 64, 128} and any T;
fp32, fp16 or bf16 inputs, fp32 accumulation, output in the input dtype. `scale` defaults to
1/sqrt(D). `window=W` (causal): query t sees keys t - W < s <= t only (sliding-window attention,
Mistral); the tiles wholly before every query's window are skipped, those crossing its edge masked.
gpt.py uses it with `attn_impl="flash"`.

Run:
  python flash_attention.py                        # kernel (or reference) vs naive attention
  python flash_attention.py --T 4096 --D 128 --dtype bfloat16 --device cuda
  python -m pytest tests/test_flash_attention.py  # on CPU the kernels run in Triton's interpreter
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from common import NanoError, cli, median_ms, parse_config, pick_device

try:  # Triton is optional: without it (macOS, Windows) the PyTorch reference runs everywhere
    import triton
    import triton.language as tl
except ImportError:
    triton = None
# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when this file is imported: with
# it set, the kernels run on CPU tensors through Triton's interpreter (slow, for tests).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # the kernels use exp2: e^x = 2^(x * log2(e)) is one instruction
KERNEL_HEAD_DIMS = (16, 32, 64, 128)


def naive_attention(q, k, v, causal=False, scale=None, window=0):
    """softmax(Q K^T * scale + mask) V with the whole (B, H, T, S) score matrix: the baseline.
    K/V heads are repeated for grouped-query attention. window (with causal): query t sees only
    keys t - window < s <= t (sliding-window attention, Mistral); 0 = all s <= t."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(_masked(0, T, 0, S, window, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _repeat_kv(kv, n_head):
    """(B, H_kv, S, D) -> (B, H, S, D): query head h reads K/V head h // (H / H_kv)."""
    return kv.repeat_interleave(n_head // kv.shape[1], dim=1)


# ----------------------------------------------------------------------------------------
# The algorithm in plain PyTorch: tiles of queries x tiles of keys, vectorised over (B, H)


def _tiles(n, size):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _masked(q0, q1, k0, k1, window, device):
    """True where key position > query position, or (window) <= query position - window, for
    one tile: those scores are -inf."""
    back = torch.arange(q0, q1, device=device)[:, None] - torch.arange(k0, k1, device=device)[None, :]
    return (back < 0) | (back >= window) if window else back < 0


def _outside(q0, q1, k0, k1, causal, window):
    """Whether a tile of queries [q0, q1) x keys [k0, k1) is wholly masked (skipped), and whether
    it needs the mask at all (it crosses the diagonal or the window's edge)."""
    skip = causal and (q1 <= k0 or bool(window) and k1 - 1 <= q0 - window)
    return skip, causal and (k1 - 1 > q0 or bool(window) and k0 <= q1 - 1 - window)


def reference_forward(q, k, v, causal, scale, block_size=128, window=0):
    """(o, lse): o (B, H, T, D) in q's dtype, lse (B, H, T) the logsumexp of each row of scores.
    fp32 accumulation (fp64 for fp64 inputs)."""
    B, H, T, D = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    k, v = _repeat_kv(k, H).to(acc_dtype), _repeat_kv(v, H).to(acc_dtype)  # (B, H, S, D)
    S = k.shape[2]
    o = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=acc_dtype, device=q.device)
    for q0, q1 in _tiles(T, block_size):
        q_i = q[:, :, q0:q1].to(acc_dtype)
        m = torch.full((B, H, q1 - q0), float("-inf"), dtype=acc_dtype, device=q.device)  # running max
        l = torch.zeros(B, H, q1 - q0, dtype=acc_dtype, device=q.device)  # running sum of exp(s - m)
        acc = torch.zeros(B, H, q1 - q0, D, dtype=acc_dtype, device=q.device)  # running sum of exp(s - m) V
        for k0, k1 in _tiles(q1 if causal else S, block_size):  # causal: keys past the tile's last query never count
            skip, crosses = _outside(q0, q1, k0, k1, causal, window)
            if skip:  # (window) keys before every query's window
                continue
            s = (q_i @ k[:, :, k0:k1].transpose(-2, -1)) * scale  # (B, H, bq, bk): the only scores that exist
            if crosses:  # the tile crosses the diagonal or the window's edge
                s = s.masked_fill(_masked(q0, q1, k0, k1, window, q.device), float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            # -inf where a row has seen no key yet (a window starts later): subtract 0 then, not -inf (NaN)
            shift = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp(s - shift[..., None])
            alpha = torch.exp(m - shift)  # rescales what was summed under the old max
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v[:, :, k0:k1]
            m = m_new
        o[:, :, q0:q1] = acc / l[..., None]  # the division by l, once per row at the end
        lse[:, :, q0:q1] = m + torch.log(l)
    return o, lse


def reference_backward(do, q, k, v, o, lse, causal, scale, block_size=128, window=0):
    """(dq, dk, dv) from the tensors the forward kept: every probability tile is recomputed
    from Q, K and the saved logsumexp, P = exp(Q K^T scale - L)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    in_dtype, acc_dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    k_full, v_full = _repeat_kv(k, H).to(acc_dtype), _repeat_kv(v, H).to(acc_dtype)  # (B, H, S, D)
    do, q = do.to(acc_dtype), q.to(acc_dtype)
    delta = (do * o.to(acc_dtype)).sum(dim=-1)  # D_i = rowsum(dO_i * O_i), (B, H, T)
    dq = torch.zeros(B, H, T, D, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(B, H, S, D, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(B, H, S, D, dtype=acc_dtype, device=q.device)
    for k0, k1 in _tiles(S, block_size):
        k_j, v_j = k_full[:, :, k0:k1], v_full[:, :, k0:k1]
        for q0, q1 in _tiles(T, block_size):
            skip, crosses = _outside(q0, q1, k0, k1, causal, window)
            if skip:  # every query of this tile is before every key (or past its window): all masked
                continue
            s = (q[:, :, q0:q1] @ k_j.transpose(-2, -1)) * scale  # (B, H, bq, bk)
            if crosses:
                s = s.masked_fill(_masked(q0, q1, k0, k1, window, q.device), float("-inf"))
            p = torch.exp(s - lse[:, :, q0:q1, None])  # the forward's probabilities, recomputed
            do_i = do[:, :, q0:q1]
            dv[:, :, k0:k1] += p.transpose(-2, -1) @ do_i
            dp = do_i @ v_j.transpose(-2, -1)
            ds = p * (dp - delta[:, :, q0:q1, None])  # softmax backward, (B, H, bq, bk)
            dq[:, :, q0:q1] += (ds @ k_j) * scale
            dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ q[:, :, q0:q1]) * scale
    # grouped-query attention: a K/V head's gradient sums over the query heads that read it
    dk = dk.view(B, H_kv, H // H_kv, S, D).sum(dim=2)
    dv = dv.view(B, H_kv, H // H_kv, S, D).sum(dim=2)
    return dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype)


class _TiledAttention(torch.autograd.Function):
    """The reference as one autograd node: the backward is the tiled recomputation above,
    not autograd through the loops (which would keep every tile of P)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_size, window):
        o, lse = reference_forward(q, k, v, causal, scale, block_size, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = causal, scale, block_size, window
        return o

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = reference_backward(do, *ctx.saved_tensors, *ctx.args)
        return dq, dk, dv, None, None, None, None


def flash_attention_reference(q, k, v, causal=False, scale=None, block_size=128, window=0):
    """FlashAttention in plain PyTorch: memory O(T * block_size) per head instead of O(T^2)."""
    scale = _check_inputs(q, k, v, causal, scale, kernel=False, window=window)
    return _TiledAttention.apply(q, k, v, causal, scale, block_size, window)


# ----------------------------------------------------------------------------------------
# The Triton kernels. Each program owns one tile and loops over the other dimension; tiles
# that may hold masked positions (the diagonal, the ragged end) run the same loop body with
# MASK set, so the full tiles skip the comparisons. Tensors arrive contiguous: q, o, dO
# (B*H, T, D), k, v (B*H_kv, S, D), lse and D (B*H, T); a row is D adjacent values.

if triton is not None:
    LOG2E_CONST = tl.constexpr(LOG2E)

    def _device_function(fn):
        """@triton.jit for a function the kernels call. The interpreter re-patches
        triton.language on every call of a jit'd device function (~3 ms, most of a test's
        time): there it stays a plain Python function, which the interpreted kernel calls."""
        return fn if TRITON_INTERPRET else triton.jit(fn)

    @_device_function
    def _dot(a, b, acc, INTERPRET: tl.constexpr):
        """acc + a @ b, accumulated in fp32 (acc None: a @ b)."""
        if INTERPRET:  # the interpreter multiplies bf16 bit patterns as integers: widen (exact)
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        elif a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")  # true fp32, not TF32's 10-bit mantissa
        else:
            return tl.dot(a, b, acc)  # fp16 / bf16 tensor cores

    @_device_function
    def _cast_like(x, like, INTERPRET: tl.constexpr):
        """fp32 x -> like's dtype, rounding to nearest even. The interpreter's bf16 cast
        truncates; there the rounding is done with integer ops on the fp32 bits (the same
        result as the GPU's cast)."""
        if INTERPRET and like.dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(like.dtype)
        return y

    @_device_function
    def _key_tiles(start_m, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """The key tiles of a query tile [start_m, start_m + BLOCK_M): [lo, band_end) may hold keys
        before some query's window (masked), [band_end, full_end) are seen by every query (no mask),
        [full_end, end) cross the diagonal or the end (masked). Without a window, window > S."""
        if CAUSAL:  # full tiles: every key <= the tile's first query; then the diagonal, masked
            full_end = (start_m + 1) // BLOCK_N * BLOCK_N
            end = tl.minimum(start_m + BLOCK_M, S)  # later keys: after every query, skipped
            lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N  # earlier: before every window
            band_end = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
            band_end = tl.minimum(tl.maximum(band_end, lo), full_end)
        else:  # full tiles, then the ragged last one
            lo, band_end, full_end, end = 0, 0, S // BLOCK_N * BLOCK_N, S
        return lo, band_end, full_end, end

    @_device_function
    def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, offs_m, lo, hi, S, qk_scale, window,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                   INTERPRET: tl.constexpr):
        """The online softmax of one query tile over the key tiles in [lo, hi). Scores are in
        log2 units (qk_scale = scale * log2(e)), so exp is exp2."""
        offs_n = lo + tl.arange(0, BLOCK_N)  # the keys of the current tile
        k_ptrs = k_base + offs_n[:, None] * D + tl.arange(0, D)[None, :]  # (BLOCK_N, D)
        v_ptrs = v_base + offs_n[:, None] * D + tl.arange(0, D)[None, :]
        for _ in range(lo, hi, BLOCK_N):
            k = tl.load(k_ptrs, mask=offs_n[:, None] < S, other=0.0)
            s = _dot(q, tl.trans(k), None, INTERPRET) * qk_scale  # (BLOCK_M, BLOCK_N), on chip only
            if MASK:  # keys past the end, and (causal) keys after the query or before its window
                keep = offs_n[None, :] < S
                if CAUSAL:
                    back = offs_m[:, None] - offs_n[None, :]
                    keep = keep & (back >= 0) & (back < window)
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            shift = m_new
            if MASK:  # -inf for a row that has seen no key yet (its window starts later): subtract 0, no NaN
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - shift[:, None])
            alpha = tl.exp2(m_i - shift)  # rescales what was summed under the old max
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
            acc = _dot(_cast_like(p, v, INTERPRET), v, acc * alpha[:, None], INTERPRET)
            m_i = m_new
            offs_n += BLOCK_N
            k_ptrs += BLOCK_N * D
            v_ptrs += BLOCK_N * D
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, T, S, qk_scale, window, GROUP: tl.constexpr, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                         INTERPRET: tl.constexpr):
        # grid (cdiv(T, BLOCK_M), B * H): BLOCK_M query rows of one (batch, head)
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)  # b * H + h
        bh_kv = bh // GROUP  # = b * H_kv + h // GROUP: the K/V head this query head reads
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_t = offs_m < T
        q_ptrs = Q + bh * T * D + offs_m[:, None] * D + tl.arange(0, D)[None, :]
        q = tl.load(q_ptrs, mask=in_t[:, None], other=0.0)  # rows past T: zeros, never stored
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(s - m)
        acc = tl.zeros([BLOCK_M, D], tl.float32)  # running sum of exp(s - m) V
        lo, band_end, full_end, end = _key_tiles(start_m, S, window, BLOCK_M, BLOCK_N, CAUSAL)
        k_base, v_base = K + bh_kv * S * D, V + bh_kv * S * D
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, offs_m, lo, band_end, S, qk_scale, window,
                                   D, BLOCK_N, CAUSAL, True, INTERPRET)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, offs_m, band_end, full_end, S, qk_scale,
                                   window, D, BLOCK_N, CAUSAL, False, INTERPRET)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, offs_m, full_end, end, S, qk_scale, window,
                                   D, BLOCK_N, CAUSAL, True, INTERPRET)
        tl.store(LSE + bh * T + offs_m, (m_i + tl.log2(l_i)) / LOG2E_CONST, mask=in_t)  # natural log
        o_ptrs = O + bh * T * D + offs_m[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(o_ptrs, _cast_like(acc / l_i[:, None], q, INTERPRET), mask=in_t[:, None])

    @_device_function
    def _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo, hi, T, qk_scale, window,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, INTERPRET: tl.constexpr):
        """dK, dV of one key tile from the query tiles in [lo, hi), computed transposed (keys as
        rows: P^T, dP^T, dS^T), so no tile needs a transpose. Query rows past T load as zeros
        (q = dO = L = D = 0), which makes their P^T dO and dS^T Q exactly zero."""
        offs_m = lo + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * D + tl.arange(0, D)[None, :]  # (BLOCK_M, D)
        do_ptrs = do_base + offs_m[:, None] * D + tl.arange(0, D)[None, :]
        for _ in range(lo, hi, BLOCK_M):
            in_t = offs_m < T
            q = tl.load(q_ptrs, mask=in_t[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=in_t[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=in_t, other=0.0) * LOG2E_CONST
            delta = tl.load(delta_base + offs_m, mask=in_t, other=0.0)
            s_t = _dot(k, tl.trans(q), None, INTERPRET) * qk_scale  # (BLOCK_N, BLOCK_M)
            if MASK:  # causal: key after query, or before the query's window
                back = offs_m[None, :] - offs_n[:, None]
                s_t = tl.where((back >= 0) & (back < window), s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse[None, :])  # P^T: the forward's probabilities, recomputed
            dv = _dot(_cast_like(p_t, do, INTERPRET), do, dv, INTERPRET)  # dV_j += P^T dO
            dp_t = _dot(v, tl.trans(do), None, INTERPRET)  # dP^T = (dO V^T)^T
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward
            dk = _dot(_cast_like(ds_t, q, INTERPRET), q, dk, INTERPRET)  # dK_j += dS^T Q (scale later)
            offs_m += BLOCK_M
            q_ptrs += BLOCK_M * D
            do_ptrs += BLOCK_M * D
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, T, S, qk_scale, scale, window, GROUP: tl.constexpr,
                              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CAUSAL: tl.constexpr, INTERPRET: tl.constexpr):
        # grid (cdiv(S, BLOCK_N), B * H_kv): one key tile of one K/V head, summed over the GROUP
        # query heads that read it, so grouped-query attention needs no atomics
        start_n = tl.program_id(0) * BLOCK_N
        bh_kv = tl.program_id(1).to(tl.int64)  # b * H_kv + h_kv
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_s = offs_n[:, None] < S
        kv_offs = bh_kv * S * D + offs_n[:, None] * D + tl.arange(0, D)[None, :]
        k = tl.load(K + kv_offs, mask=in_s, other=0.0)  # keys past S: zeros, never stored
        v = tl.load(V + kv_offs, mask=in_s, other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        if CAUSAL:  # queries before start_n see none of these keys: start at their tile; the
            # tiles holding a query before the tile's last key are masked, and (window) so are those
            # holding a query past the first key's window; queries past the last key's window: skipped
            lo = start_n // BLOCK_M * BLOCK_M
            diag_end = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, T)
            hi = tl.minimum(start_n + BLOCK_N - 1 + window, T)
            band_start = tl.maximum(diag_end, tl.minimum((start_n + window) // BLOCK_M * BLOCK_M, hi))
        else:
            lo, diag_end, band_start, hi = 0, 0, T, T
        for g in range(GROUP):
            bh = bh_kv * GROUP + g  # the query head b * H + h
            q_base, do_base = Q + bh * T * D, DO + bh * T * D
            lse_base, delta_base = LSE + bh * T, DELTA + bh * T
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo, diag_end,
                                     T, qk_scale, window, D, BLOCK_M, True, INTERPRET)
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, diag_end,
                                     band_start, T, qk_scale, window, D, BLOCK_M, False, INTERPRET)
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, band_start, hi,
                                     T, qk_scale, window, D, BLOCK_M, True, INTERPRET)
        tl.store(DK + kv_offs, _cast_like(dk * scale, k, INTERPRET), mask=in_s)
        tl.store(DV + kv_offs, _cast_like(dv, v, INTERPRET), mask=in_s)

    @_device_function
    def _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, lo, hi, S, qk_scale, window,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                      INTERPRET: tl.constexpr):
        """dQ of one query tile from the key tiles in [lo, hi): the forward's loop once more."""
        offs_n = lo + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * D + tl.arange(0, D)[None, :]  # (BLOCK_N, D)
        v_ptrs = v_base + offs_n[:, None] * D + tl.arange(0, D)[None, :]
        for _ in range(lo, hi, BLOCK_N):
            k = tl.load(k_ptrs, mask=offs_n[:, None] < S, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
            s = _dot(q, tl.trans(k), None, INTERPRET) * qk_scale
            if MASK:
                keep = offs_n[None, :] < S
                if CAUSAL:
                    back = offs_m[:, None] - offs_n[None, :]
                    keep = keep & (back >= 0) & (back < window)
                s = tl.where(keep, s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(v), None, INTERPRET)
            ds = p * (dp - delta[:, None])
            dq = _dot(_cast_like(ds, k, INTERPRET), k, dq, INTERPRET)  # dQ_i += dS K (scale later)
            offs_n += BLOCK_N
            k_ptrs += BLOCK_N * D
            v_ptrs += BLOCK_N * D
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, T, S, qk_scale, scale, window, GROUP: tl.constexpr,
                            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            CAUSAL: tl.constexpr, INTERPRET: tl.constexpr):
        # grid (cdiv(T, BLOCK_M), B * H): one query tile, the key tiles as in the forward
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        bh_kv = bh // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_t = offs_m < T
        q_offs = bh * T * D + offs_m[:, None] * D + tl.arange(0, D)[None, :]
        q = tl.load(Q + q_offs, mask=in_t[:, None], other=0.0)
        do = tl.load(DO + q_offs, mask=in_t[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + offs_m, mask=in_t, other=0.0) * LOG2E_CONST
        delta = tl.load(DELTA + bh * T + offs_m, mask=in_t, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        lo, band_end, full_end, end = _key_tiles(start_m, S, window, BLOCK_M, BLOCK_N, CAUSAL)
        k_base, v_base = K + bh_kv * S * D, V + bh_kv * S * D
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, lo, band_end, S, qk_scale, window,
                           D, BLOCK_N, CAUSAL, True, INTERPRET)
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, band_end, full_end, S, qk_scale, window,
                           D, BLOCK_N, CAUSAL, False, INTERPRET)
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, full_end, end, S, qk_scale, window,
                           D, BLOCK_N, CAUSAL, True, INTERPRET)
        tl.store(DQ + q_offs, _cast_like(dq * scale, q, INTERPRET), mask=in_t[:, None])


def kernel_tiles(D: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings per kernel, chosen by compiling for sm_90 and sm_80 offline
    (no GPU was at hand to time them): for 16-bit inputs the largest tiles whose registers do not
    spill, within an A100's shared memory. fp32 (the exact path: its products run on the FMA
    units, not tensor cores) takes small tiles. The interpreter uses the same."""
    if dtype == torch.float32:
        small = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
        return dict(forward=small, dkdv=small, dq=small)
    stages = dict(num_stages=3)
    if D <= 64:
        return dict(forward=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, **stages),
                    dkdv=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, **stages),
                    dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, **stages))
    return dict(forward=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, **stages),
                dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, **stages),
                dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, **stages))


def _kernel_available(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or TRITON_INTERPRET)


def _forward_triton(q, k, v, causal, scale, window):
    q, k, v = (t.contiguous() for t in (q, k, v))  # the kernels index rows of D contiguous values
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    tiles = kernel_tiles(D, q.dtype)["forward"]
    grid = (triton.cdiv(T, tiles["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](q, k, v, o, lse, T, S, scale * LOG2E, window or S + T, GROUP=H // H_kv, D=D, CAUSAL=causal,
                           INTERPRET=TRITON_INTERPRET, **tiles)
    return o, lse


def _backward_triton(do, q, k, v, o, lse, causal, scale, window):
    do, q, k, v = (t.contiguous() for t in (do, q, k, v))
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    delta = (do.float() * o.float()).sum(dim=-1)  # D_i = rowsum(dO_i * O_i), (B, H, T): one cheap pass
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tiles = kernel_tiles(D, q.dtype)
    common_args = dict(GROUP=H // H_kv, D=D, CAUSAL=causal, INTERPRET=TRITON_INTERPRET)
    grid = (triton.cdiv(S, tiles["dkdv"]["BLOCK_N"]), B * H_kv)
    _attn_bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, T, S, scale * LOG2E, scale, window or S + T,
                                **common_args, **tiles["dkdv"])
    grid = (triton.cdiv(T, tiles["dq"]["BLOCK_M"]), B * H)
    _attn_bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, T, S, scale * LOG2E, scale, window or S + T,
                              **common_args, **tiles["dq"])
    return dq, dk, dv


# The ops torch.compile sees: opaque to the compiler (register_fake gives output shapes and
# dtypes), so the kernels run as written and a model using them compiles as one graph.
@torch.library.custom_op("nanollm::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_available(q):
        return _forward_triton(q, k, v, causal, scale, window)
    o, lse = reference_forward(q, k, v, causal, scale, window=window)
    return o, lse.float()


@_forward_op.register_fake
def _(q, k, v, causal, scale, window):
    B, H, T, D = q.shape
    return q.new_empty(B, H, T, D), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nanollm::flash_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, causal: bool, scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _kernel_available(q):
        return _backward_triton(do, q, k, v, o, lse, causal, scale, window)
    return reference_backward(do, q, k, v, o, lse, causal, scale, window=window)


@_backward_op.register_fake
def _(do, q, k, v, o, lse, causal, scale, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window):
        o, lse = _forward_op(q, k, v, causal, scale, window)
        ctx.save_for_backward(q, k, v, o, lse)  # O(T * D): no (T, T) tensor is kept
        ctx.args = causal, scale, window
        return o

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = _backward_op(do, *ctx.saved_tensors, *ctx.args)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=False, scale=None, window=0):
    """softmax(q k^T * scale + causal mask) v for q (B, H, T, D), k, v (B, H_kv, S, D), by the
    Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1), else by the PyTorch reference.
    window > 0 (causal only): query t sees keys t - window < s <= t; the tiles wholly outside
    the band are skipped, so the work grows as T * window, not T^2."""
    scale = _check_inputs(q, k, v, causal, scale, kernel=True, window=window)
    return _FlashAttention.apply(q, k, v, causal, scale, window)


def _check_inputs(q, k, v, causal, scale, kernel: bool, window=0) -> float:
    """Bad shapes fail here, in one line, before any kernel starts. Returns the scale. `kernel`:
    the limits of the Triton kernels apply (also where the reference stands in for them)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise NanoError(f"q, k, v must be 4-D (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                        f"{tuple(v.shape)} (from (B, T, H, D) use .transpose(1, 2))")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise NanoError(f"k and v must be (B={B}, H_kv, S, D={D}) alike, got {tuple(k.shape)} and {tuple(v.shape)} "
                        "(same batch and head size as q)")
    if H % k.shape[1]:
        raise NanoError(f"{k.shape[1]} K/V heads do not divide {H} query heads (grouped-query attention needs "
                        "H a multiple of H_kv)")
    if min(T, k.shape[2], B, H) == 0:
        raise NanoError(f"empty attention input {tuple(q.shape)} / {tuple(k.shape)} (needs at least one query and key)")
    if causal and k.shape[2] != T:
        raise NanoError(f"causal attention needs as many keys as queries, got T={T} and S={k.shape[2]} "
                        "(pass causal=False for cross-attention)")
    if not q.dtype == k.dtype == v.dtype or not (q.device == k.device == v.device):
        raise NanoError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device} (cast them alike)")
    dtypes = (torch.float32, torch.float16, torch.bfloat16) + (() if kernel else (torch.float64,))
    if q.dtype not in dtypes:
        raise NanoError(f"cannot attend over {q.dtype} tensors (float32, float16 or bfloat16)")
    if kernel and D not in KERNEL_HEAD_DIMS:
        raise NanoError(f"head size {D} is not one the kernels take {KERNEL_HEAD_DIMS} "
                        "(pad the head size, or use flash_attention_reference)")
    if window and not (causal and isinstance(window, int) and window > 0):
        raise NanoError(f"window {window!r} needs causal=True and a positive int (0: no window)")
    scale = 1 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise NanoError(f"scale must be a finite number, got {scale}")
    return scale


# ----------------------------------------------------------------------------------------
# CLI: check the kernel against naive attention on random inputs and time them


@dataclass
class FlashConfig:
    B: int = 2
    H: int = 4
    H_kv: int = 4  # K/V heads (fewer than H: grouped-query attention)
    T: int = 256
    D: int = 64
    causal: bool = True
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    repeat: int = 3  # timed runs (median)
    seed: int = 0


@cli
def main(argv=None):
    cfg = parse_config(FlashConfig, argv, __doc__)
    device = pick_device(cfg.device)
    dtype = {"auto": torch.bfloat16 if "cuda" in device else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        raise NanoError(f"unknown dtype {cfg.dtype!r} (auto, float32, bfloat16, float16)")
    if min(cfg.B, cfg.H, cfg.H_kv, cfg.T, cfg.D, cfg.repeat) <= 0:
        raise NanoError("B, H, H_kv, T, D and repeat must be positive")
    torch.manual_seed(cfg.seed)
    q = torch.randn(cfg.B, cfg.H, cfg.T, cfg.D, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(cfg.B, cfg.H_kv, cfg.T, cfg.D, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    _check_inputs(q, k, v, cfg.causal, None, kernel=True)
    if not _kernel_available(q):
        which = "the PyTorch tiled reference (TRITON_INTERPRET=1 runs the kernels on CPU)"
    else:
        which = "Triton kernels" + ("" if q.is_cuda else " in the interpreter")
    print(f"flash_attention on {device}, {str(dtype).removeprefix('torch.')}: {which}")
    do = torch.randn_like(q)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_exact = naive_attention(*exact, causal=cfg.causal)
    grads_exact = torch.autograd.grad(out_exact, exact, do.double())
    out = flash_attention(q, k, v, causal=cfg.causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_exact, *grads_exact)):
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        print(f"  {name}: max |error| / max |value| vs naive fp64 = {err:.2e}")

    def fwd_bwd(attn):
        return lambda: torch.autograd.grad(attn(q, k, v, causal=cfg.causal), (q, k, v), do)

    def naive(q, k, v, causal):
        return naive_attention(q, k, v, causal=causal)

    for name, attn in (("flash_attention", flash_attention), ("naive attention", naive)):
        ms = median_ms(fwd_bwd(attn), cfg.repeat)
        print(f"  {name:<16} forward+backward {ms:9.2f} ms")
    scores = cfg.B * cfg.H * cfg.T * cfg.T * 4
    print(f"  score matrix flash_attention never builds: {scores / 2**20:,.1f} MiB in fp32")


if __name__ == "__main__":
    main()
