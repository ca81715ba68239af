"""QLoRA: finetune a frozen 4-bit NF4 model through LoRA adapters (Dettmers et al. 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314).

LoRA (lora.py) freezes the base weights, so they never need gradients or optimizer state:
QLoRA goes further and stores them in 4 bits. Every Linear weight is cut into blocks of
64 values; each block keeps its absolute maximum (absmax) and each value the index of the
nearest of 16 levels of NormalFloat4 (NF4), levels placed at quantiles of N(0, 1) so that
normally distributed weights use every level about equally often. Two indices share a
byte. Double quantization then stores the absmax values themselves in 8 bits (minus their
mean, blockwise over 256 of them with an fp32 scale each), which brings the overhead from
0.5 to about 0.127 bits per weight. In forward the weight is dequantized on the fly to
bf16/fp32 and multiplied; gradients flow only into the input (and so into the adapters).

The format is bitsandbytes' byte for byte (its `quantize_4bit(quant_type="nf4",
compress_statistics=True)`, checked in tests/test_qlora_nf4.py): a model quantized here
loads into bitsandbytes and the reverse (`QuantState.to_bnb_state_dict`/`from_bnb_state_dict`).
On CUDA the dequantization is one own Triton kernel (`dequantize_nf4_triton`); on CPU the
plain PyTorch reference runs; both are the torch.library op `nanollm::dequantize_nf4`, so
torch.compile(fullgraph=True) traces a QLoRA model without graph breaks.

The finetuning is finetune.py's (`finetune.train`, the loop `python lora.py` runs): QLoRA =
`quantize_model` + `lora.apply_lora` + the same loop; only the base differs.

Run:
  python qlora_nf4.py --init_from gpt2 --data data.txt           # GPT-2 in NF4 + LoRA
  python qlora_nf4.py --init_from out/ckpt.pt --data chat.jsonl  # prompt/response pairs
  python qlora_nf4.py --init_from path/to/hf_folder --data data.txt  # e.g. a Llama: config.json,
                                                    # *.safetensors, tokenizer.json
  -> prints fp32/bf16 vs NF4 weight memory; writes out-qlora/adapter.pt and metrics.jsonl
     (--merge True also writes out-qlora/ckpt_merged.pt: the adapter merged into the
     full-precision base, a plain checkpoint for sample.py)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import NanoError, cli
import finetune
import gpt
import lora
import tokenizer

try:  # Triton is optional: without it (macOS, Windows) the PyTorch reference runs everywhere
    import triton
    import triton.language as tl
except ImportError:
    triton = None
# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when this file is imported:
# with it set, the kernel runs on CPU tensors through Triton's interpreter (slow, for tests).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ----------------------------------------------------------------------------------------
# The two code tables
#
# NF4 (QLoRA, section 3): the 16 levels are quantiles of N(0, 1) rescaled to [-1, 1]. An
# asymmetric grid gives an exact zero and 8 positive / 7 negative levels: the positive
# ones are Phi^-1 at 8 evenly spaced probabilities from 0.9677083 down to 0.5 (exclusive),
# the negative ones -Phi^-1 at 7 of them from 0.9677083 to 0.5; 0.9677083 is chosen so the
# outermost level sits at the center of the last quantile bin ((1 - 1/(2*15) + 1 - 1/(2*16))
# / 2). Divided by the largest, the table is the one below; `nf4_from_normal_quantiles`
# recomputes it (torch.special.ndtri = Phi^-1) and a test checks they are bit-identical.

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def nf4_from_normal_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # 8 levels
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 levels
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 levels of the 8-bit dynamic data type (Dettmers 2015, arXiv:1511.04561) that
    double quantization uses for the absmax values, sorted ascending.

    A code is a sign bit, then a run of zero bits e (a decimal exponent: 10^-e), a 1 bit,
    then a linear fraction in the bits left. So exponent i (0..6 counted up to the top)
    gets 2^i fraction steps (2^(i+1) unsigned, the sign bit being free): the midpoints of a
    linear grid on [0.1, 1] times 10^(i - 6); small magnitudes get coarse steps, large ones
    fine steps. Signed: 2 * 127 values, plus 0 and 1. (The same fp32 operations as
    bitsandbytes, so the table is bit-identical; a test checks it.)"""
    levels = []
    for i in range(7):
        n_steps = 2 ** (i if signed else i + 1)
        edges = torch.linspace(0.1, 1, n_steps + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        levels += ((10 ** (i - 6)) * means).tolist()
        if signed:
            levels += (-(10 ** (i - 6)) * means).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map(signed=True)
NESTED_BLOCKSIZE = 256  # absmax values per fp32 scale in double quantization (bitsandbytes')

_tables: dict = {}


def _code_tables(device):
    """Per device: NF4 levels (16,), the 8-bit map (256,), byte -> its two NF4 values (256, 2)."""
    device = torch.device(device)
    if device not in _tables:
        byte = torch.arange(256)
        pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1)  # high nibble first
        _tables[device] = (NF4_CODE.to(device), DYNAMIC_CODE.to(device), pairs.to(device))
    return _tables[device]


# ----------------------------------------------------------------------------------------
# Quantization state, in bitsandbytes' layout


@dataclass
class QuantState:
    """All a packed NF4 tensor needs to be dequantized.
    absmax: per block, uint8 codes of DYNAMIC_CODE (double quant) or fp32 values;
    nested_absmax: fp32, one scale per 256 absmax codes; offset: fp32 scalar, their mean."""
    shape: torch.Size
    dtype: torch.dtype  # dtype of the weight that was quantized (dequantize's default)
    blocksize: int
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.absmax, self.nested_absmax, self.offset)
                   if t is not None)

    def to_bnb_state_dict(self, packed: torch.Tensor, prefix: str = "") -> dict:
        """The entries bitsandbytes' Linear4bit writes for its weight, in its order: the
        packed bytes as a (n_bytes, 1) uint8 `weight`, the statistics and both code tables,
        and the scalars as a JSON string stored in a uint8 tensor."""
        p = prefix + "weight"
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        sd = {p: packed.reshape(-1, 1), f"{p}.absmax": self.absmax, f"{p}.quant_map": NF4_CODE.to(packed.device)}
        if self.double_quant:
            sd[f"{p}.nested_absmax"] = self.nested_absmax
            sd[f"{p}.nested_quant_map"] = DYNAMIC_CODE.to(packed.device)
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        sd[f"{p}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "") -> tuple[torch.Tensor, QuantState]:
        """(packed uint8 bytes, QuantState) from the entries of a bitsandbytes 4-bit Linear."""
        p = prefix + "weight"
        packed_keys = [k for k in sd if k.startswith(f"{p}.quant_state.bitsandbytes__")]
        if len(packed_keys) != 1 or p not in sd:
            raise NanoError(f"no bitsandbytes 4-bit weight under {p!r} (expected {p} and "
                             f"{p}.quant_state.bitsandbytes__nf4)")
        meta = json.loads(bytes(sd[packed_keys[0]].cpu().tolist()).decode())
        quant_type = meta.get("quant_type", packed_keys[0].rsplit("__", 1)[1])
        if quant_type != "nf4":
            raise NanoError(f"{p} is quantized as {quant_type!r}, not 'nf4' (only NF4 loads here; "
                             "re-quantize the model with quant_type='nf4')")
        shape, blocksize = torch.Size(meta["shape"]), meta["blocksize"]
        check_blocksize(blocksize)
        packed = sd[p].contiguous().view(torch.uint8).reshape(-1)  # other quant_storage dtypes: same bytes
        n_blocks = math.ceil(shape.numel() / blocksize)
        if packed.numel() != (shape.numel() + 1) // 2 or sd[f"{p}.absmax"].numel() != n_blocks:
            raise NanoError(f"{p} holds {packed.numel()} bytes and {sd[f'{p}.absmax'].numel()} absmax "
                             f"values, not those of shape {tuple(shape)} with blocksize {blocksize}")
        if not torch.equal(sd[f"{p}.quant_map"].float().cpu(), NF4_CODE):
            raise NanoError(f"{p}.quant_map is not the standard NF4 table (custom maps are not supported)")
        state = cls(shape, getattr(torch, meta["dtype"]), blocksize, sd[f"{p}.absmax"])
        if f"{p}.nested_absmax" in sd:
            if not torch.equal(sd[f"{p}.nested_quant_map"].float().cpu(), DYNAMIC_CODE) or \
                    meta["nested_blocksize"] != NESTED_BLOCKSIZE:
                raise NanoError(f"{p} uses a nested quantization other than bitsandbytes' default "
                                 "(8-bit dynamic map, blocksize 256)")
            state.nested_absmax = sd[f"{p}.nested_absmax"].float()
            state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
        return packed, state


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------
# Quantize and dequantize: the plain PyTorch reference


def check_blocksize(blocksize: int):
    if not (isinstance(blocksize, int) and 32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise NanoError(f"blocksize {blocksize} is not a power of two in [32, 4096] "
                         "(64 is QLoRA's choice)")


def scale_blocks(flat: torch.Tensor, blocksize: int):
    """Split fp32 `flat` into blocks (the last may be short) and scale each by its absmax
    into [-1, 1]. Returns (scaled values, absmax per block).

    The arithmetic is bitsandbytes' reference, so borderline values round the same way:
    full blocks are multiplied by 1 / absmax but the short last block is divided by its
    absmax; an all-zero block keeps absmax 0 (the last one stores it clamped to 1e-38)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).view(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return scaled, absmax


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of the sorted `code` for each value. bucketize against
    the midpoints puts a value exactly on a midpoint into the lower level."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """w (any shape, fp32/fp16/bf16) -> (packed uint8 (ceil(numel/2),), QuantState).
    Element 2i goes to the high nibble of byte i, element 2i+1 to the low nibble."""
    check_blocksize(blocksize)
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise NanoError(f"cannot quantize a {w.dtype} tensor (needs float32, float16 or bfloat16)")
    if w.numel() == 0:
        raise NanoError("cannot quantize an empty tensor")
    nf4, dynamic, _ = _code_tables(w.device)
    scaled, absmax = scale_blocks(w.detach().reshape(-1).float(), blocksize)
    if not torch.isfinite(absmax).all():  # a NaN or Inf anywhere makes its block's absmax NaN or Inf
        bad = (~torch.isfinite(w)).sum().item()
        raise NanoError(f"the weight holds {bad} NaN/Inf values (4-bit codes cannot represent them; "
                         "fix or reload the checkpoint)")
    scaled = F.pad(scaled, (0, scaled.numel() % 2))  # odd count: a zero fills the last low nibble
    q = _nearest_code(scaled, nf4)
    packed = (q[0::2] << 4) | q[1::2]
    state = QuantState(w.shape, w.dtype, blocksize, absmax)
    if double_quant:
        # Absmax values are all positive and similar: subtract their mean, then store them
        # like 8-bit optimizer states (blockwise over 256, signed dynamic map, fp32 scales).
        state.offset = absmax.mean()
        scaled_absmax, state.nested_absmax = scale_blocks(absmax - state.offset, NESTED_BLOCKSIZE)
        state.absmax = _nearest_code(scaled_absmax, dynamic)
    return packed, state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """fp32 absmax per block: code * its 256-block scale, then + offset (two fp32 roundings,
    in that order, as bitsandbytes does: no fused multiply-add)."""
    if not state.double_quant:
        return state.absmax.float()
    _, dynamic, _ = _code_tables(state.absmax.device)
    scales = state.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:state.absmax.numel()]
    return dynamic[state.absmax.long()] * scales + state.offset


def dequantize_nf4(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain PyTorch reference: packed bytes -> weight of state.shape in `dtype`
    (default: the dtype it was quantized from). Each value is one fp32 product
    level * absmax, then cast (round to nearest even)."""
    _, _, pairs = _code_tables(packed.device)
    n, blocksize = state.shape.numel(), state.blocksize
    absmax = dequantize_absmax(state)  # (n_blocks,)
    levels = F.embedding(packed.reshape(-1).int(), pairs).view(-1)  # (2 * n_bytes,) in element order
    if levels.numel() < absmax.numel() * blocksize:  # short last block: zeros up to a full one
        levels = F.pad(levels, (0, absmax.numel() * blocksize - levels.numel()))
    levels = levels.view(-1, blocksize).mul_(absmax[:, None])  # (n_blocks, blocksize); in place: a fresh tensor
    return levels.view(-1)[:n].to(dtype or state.dtype).view(state.shape)


# ----------------------------------------------------------------------------------------
# The Triton kernel: one launch from packed bytes to the finished weight

if triton is not None:

    @triton.jit
    def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dynamic_ptr, out_ptr,
                               n_elements, n_bytes, LOG2_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                               OUT_KIND: tl.constexpr, BYTES_PER_PROGRAM: tl.constexpr):
        # each program turns BYTES_PER_PROGRAM bytes into twice as many output values
        pid = tl.program_id(0).to(tl.int64)
        byte_idx = pid * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)
        in_range = byte_idx < n_bytes
        byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0).to(tl.int32)
        # both elements of a byte share a block (blocksizes are even)
        block = (byte_idx * 2) >> LOG2_BLOCKSIZE
        if DOUBLE_QUANT:
            code = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(nested_ptr + (block >> 8), mask=in_range, other=0.0)  # 256 absmax per scale
            absmax = tl.load(dynamic_ptr + code) * scale + tl.load(offset_ptr)  # launched without fma
        else:
            absmax = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
        high = tl.load(nf4_ptr + (byte >> 4)) * absmax  # element 2i
        low = tl.load(nf4_ptr + (byte & 15)) * absmax  # element 2i + 1
        values = tl.interleave(high, low)  # (2 * BYTES_PER_PROGRAM,) fp32 in element order
        out_idx = pid * 2 * BYTES_PER_PROGRAM + tl.arange(0, 2 * BYTES_PER_PROGRAM)
        keep = out_idx < n_elements
        if OUT_KIND == 2:
            # bf16 = the top 16 bits of fp32, rounded to nearest even with integer ops (the
            # interpreter's .to(tl.bfloat16) truncates; this is the same on CPU and GPU)
            bits = values.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_ptr + out_idx, (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=keep)
        elif OUT_KIND == 1:
            tl.store(out_ptr + out_idx, values.to(tl.float16), mask=keep)
        else:
            tl.store(out_ptr + out_idx, values, mask=keep)


_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dequantize_triton(packed, absmax, nested_absmax, offset, blocksize, shape, dtype):
    if triton is None:
        raise NanoError("Triton is not installed (pip install triton, or use dequantize_nf4)")
    if not packed.is_cuda and not TRITON_INTERPRET:
        raise NanoError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "importing qlora_nf4, to run it on CPU in Triton's interpreter)")
    if dtype not in _OUT_KIND:
        raise NanoError(f"cannot dequantize to {dtype} (float32, float16 or bfloat16)")
    nf4, dynamic, _ = _code_tables(packed.device)
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    double_quant = nested_absmax is not None
    bytes_per_program = 1024
    grid = (triton.cdiv(packed.numel(), bytes_per_program),)
    _dequantize_nf4_kernel[grid](
        packed, absmax, nested_absmax if double_quant else absmax, offset if double_quant else absmax,
        nf4, dynamic, out.view(torch.int16) if dtype == torch.bfloat16 else out, n, packed.numel(),
        LOG2_BLOCKSIZE=blocksize.bit_length() - 1, DOUBLE_QUANT=double_quant, OUT_KIND=_OUT_KIND[dtype],
        BYTES_PER_PROGRAM=bytes_per_program, num_warps=4,
        enable_fp_fusion=False,  # keep code * scale + offset two roundings, like the reference
    )
    return out


def dequantize_nf4_triton(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same result as dequantize_nf4, bit for bit, from one Triton kernel launch."""
    return _dequantize_triton(packed.reshape(-1), state.absmax, state.nested_absmax, state.offset,
                              state.blocksize, list(state.shape), dtype or state.dtype)


# The op torch.compile sees: opaque to the compiler (register_fake tells it the output's
# shape and dtype), so the kernel runs as written and a QLoRA model compiles in one graph.
@torch.library.custom_op("nanollm::dequantize_nf4", mutates_args=())
def _dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   offset: torch.Tensor | None, blocksize: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    if packed.is_cuda and triton is not None:
        return _dequantize_triton(packed, absmax, nested_absmax, offset, blocksize, shape, dtype)
    state = QuantState(torch.Size(shape), dtype, blocksize, absmax, nested_absmax, offset)
    return dequantize_nf4(packed, state, dtype)


@_dequantize_op.register_fake
def _(packed, absmax, nested_absmax, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton on CUDA, the PyTorch reference elsewhere (torch.ops.nanollm.dequantize_nf4)."""
    return _dequantize_op(packed.reshape(-1), state.absmax, state.nested_absmax, state.offset,
                          state.blocksize, list(state.shape), dtype or state.dtype)


# ----------------------------------------------------------------------------------------
# The 4-bit Linear layer


class _NF4Linear(torch.autograd.Function):
    """y = x @ dequantize(W).T + b. Backward dequantizes W again instead of saving it:
    keeping the full-precision copy of every layer for backward would cost more memory
    than the 4-bit model saves. No gradient for W or b: they are frozen."""

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, offset, bias, blocksize, shape):
        w = _dequantize_op(packed, absmax, nested_absmax, offset, blocksize, shape, x.dtype)
        ctx.save_for_backward(packed, absmax, nested_absmax, offset)
        ctx.blocksize, ctx.shape, ctx.dtype = blocksize, shape, x.dtype
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, nested_absmax, offset = ctx.saved_tensors
        w = _dequantize_op(packed, absmax, nested_absmax, offset, ctx.blocksize, ctx.shape, ctx.dtype)
        return grad_out.to(w.dtype) @ w, None, None, None, None, None, None, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear stored in NF4: `weight` is the packed uint8 bytes (a frozen
    parameter, so FSDP2 shards it; never viewed as float), `absmax`, `nested_absmax` and
    `offset` are buffers. Forward dequantizes to compute_dtype (default: the autocast dtype,
    else the input's) and multiplies; the output has the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                 compute_dtype: torch.dtype | None = None, double_quant: bool = True):
        super().__init__()
        packed, state = quantize_nf4(weight, blocksize, double_quant)
        self._store(packed, state, bias, compute_dtype)

    def _store(self, packed, state, bias, compute_dtype):
        self.out_features, self.in_features = state.shape
        self.blocksize, self.weight_dtype, self.compute_dtype = state.blocksize, state.dtype, compute_dtype
        self.weight = nn.Parameter(packed.reshape(-1), requires_grad=False)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.register_buffer("offset", state.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, compute_dtype=None, double_quant=True):
        return cls(linear.weight.data, linear.bias.data if linear.bias is not None else None,
                   blocksize, compute_dtype, double_quant)

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "", compute_dtype=None) -> Linear4bit:
        """Build the layer from a bitsandbytes Linear4bit's state dict entries (no re-quantizing)."""
        packed, state = QuantState.from_bnb_state_dict(sd, prefix)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._store(packed, state, sd.get(prefix + "bias"), compute_dtype)
        return layer

    @property
    def quant_state(self) -> QuantState:
        return QuantState(torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.blocksize,
                          self.absmax, self.nested_absmax, self.offset)

    def bnb_state_dict(self, prefix: str = "") -> dict:
        """What bitsandbytes' Linear4bit.state_dict() holds for the same weight."""
        sd = self.quant_state.to_bnb_state_dict(self.weight.data, prefix)
        if self.bias is not None:
            sd = {prefix + "weight": sd.pop(prefix + "weight"), prefix + "bias": self.bias.data, **sd}
        return sd

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        return dequantize(self.weight, self.quant_state, dtype)

    def forward(self, x):
        dtype = self.compute_dtype
        if dtype is None:
            device_type = x.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        out = _NF4Linear.apply(x.to(dtype), self.weight, self.absmax, self.nested_absmax, self.offset,
                               self.bias, self.blocksize, [self.out_features, self.in_features])
        return out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts float buffers; the fp32 statistics are part of the
        # 4-bit format (fp32 in bitsandbytes too) and must follow the device, never the dtype.
        fp32_stats = {k: b for k, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for k, b in fp32_stats.items():
            self._buffers[k] = b.to(self._buffers[k].device)
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}")


def quantize_model(model: nn.Module, blocksize: int = 64, compute_dtype=None, double_quant: bool = True,
                   skip=("lm_head",)) -> nn.Module:
    """Replace every nn.Linear except those named in `skip` by a Linear4bit, in place: all
    attention and MLP projections (GPT-2's c_attn/c_proj/c_fc, Llama's q/k/v/o, gate/up/down).
    lm_head stays float: GPT's loss multiplies by its weight directly, and in GPT-2 that
    weight is the token embedding (tied). (bitsandbytes' transformers integration keeps
    the head unquantized as well.)"""
    check_blocksize(blocksize)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(parent, name, Linear4bit.from_linear(child, blocksize, compute_dtype, double_quant))
    return model


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of every Linear4bit's weight storage: packed codes + absmax + scales + offset."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, Linear4bit)
               for t in (m.weight, m.absmax, m.nested_absmax, m.offset) if t is not None)


# ----------------------------------------------------------------------------------------
# QLoRA = quantize the base, put LoRA adapters on the 4-bit layers, run finetune.py's loop


@dataclass
class QLoRAConfig(finetune.FinetuneConfig):
    out_dir: str = field(default="out-qlora", metadata={"help": "adapter.pt, metrics.jsonl (ckpt_merged.pt) go here"})
    blocksize: int = field(default=64, metadata={"help": "weights per NF4 block (power of two in [32, 4096])"})
    double_quant: bool = field(default=True, metadata={"help": "store the absmax values in 8 bits too"})
    merge: bool = field(default=False, metadata={"help": "also write out_dir/ckpt_merged.pt: the adapter merged "
                                                         "into the full-precision base"})


def quantize_base(model: nn.Module, cfg: QLoRAConfig) -> nn.Module:
    """quantize_model with the CLI's options, printing the weight memory before and after."""
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("lm_head"))
    quantize_model(model, cfg.blocksize, double_quant=cfg.double_quant)
    nf4 = nf4_bytes(model)
    print(f"Linear weights ({n:,} values): fp32 {4 * n / 2**20:,.1f} MiB, bf16 {2 * n / 2**20:,.1f} MiB, "
          f"NF4 {nf4 / 2**20:,.1f} MiB incl. absmax and scales ({nf4 / (2 * n):.3f}x of bf16, "
          f"{8 * nf4 / n:.3f} bits per weight)")
    return model


def save_merged(cfg: QLoRAConfig, spec: str, device: str):
    """Merge the adapter into the full-precision base (as PEFT users do after QLoRA):
    rounding the merged weight to NF4 again would throw most of the small update away."""
    full, _, _ = finetune.load_base(cfg.init_from, device)
    merged = lora.merge_lora(lora.load_lora(full, Path(cfg.out_dir) / "adapter.pt"))
    gpt.save_checkpoint(Path(cfg.out_dir) / "ckpt_merged.pt", merged, spec, step=cfg.max_iters)
    print(f"saved merged checkpoint to {Path(cfg.out_dir) / 'ckpt_merged.pt'}")


@cli
def main(argv=None):
    cfg = common.parse_config(QLoRAConfig, argv, __doc__)
    finetune.check_config(cfg)  # every option, before anything is loaded
    check_blocksize(cfg.blocksize)
    device = common.pick_device(cfg.device)
    common.pick_dtype(device, cfg.dtype)
    common.set_seed(cfg.seed)
    model, spec, base = finetune.load_base(cfg.init_from, device, dtype=None)  # HF weights: as stored (bf16)
    tok = tokenizer.load_tokenizer(spec)
    dataset = finetune.load_finetune_data(model, tok, cfg)  # checked before the quantization
    quantize_base(model, cfg)
    finetune.add_adapters(model, cfg, base)
    nf4 = {"blocksize": cfg.blocksize, "double_quant": cfg.double_quant}  # how the base was quantized
    val_loss = finetune.train(model, tok, cfg, cfg.out_dir, dataset, adapter_extra={"nf4": nf4})
    if cfg.merge:
        save_merged(cfg, spec, device)
    return val_loss


if __name__ == "__main__":
    main()
