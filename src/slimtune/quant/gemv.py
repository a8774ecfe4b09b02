"""Inference matmuls straight from packed 4-bit codes: never a float copy of a whole weight.

Paths, chosen by how many rows the input has:
- up to `NATIVE_ROWS` rows on a CPU (decode steps of up to that many streams): the C kernel
  (`slimtune.quant.native`), vector table lookups straight into multiply-adds. Where it cannot
  be compiled, one row takes the numba kernel below and more rows take bands.
- one row, numba (a decode step of one stream): a fused decode + matrix-vector product. The
  input is turned once into a table per byte position j: T[j, byte] = code[high] * x[2j] +
  code[low] * x[2j + 1], so every packed byte of the weight costs one table load and one add, and
  each block's sum is scaled once by its absmax (decoded from its 8-bit code per block when double
  quantized). Rows are split between threads; within a thread the columns are walked block by
  block so the slice of the table in use stays in the L1 cache. Layers that share an input
  (q/k/v, gate/up) share the table (`TableCache`).
- several rows (prompts, batches): bands of weight rows are decoded into a small float scratch
  that stays in cache, and each band is one matmul (BLAS).
- on a GPU with Triton: one row takes the fused Triton product (`slimtune.quant.gpu_matmul`);
  more rows decode the layer once into the compute dtype (`gpu_kernels`) for one matmul, a copy
  of one layer that lives for one call.
Both equal decode-then-matmul up to float rounding (the order of the sums differs).
"""

from __future__ import annotations

from functools import cache
from math import gcd

import torch

from slimtune.quant import gpu_kernels, gpu_matmul, kernels, native
from slimtune.quant.blockwise import QuantState, decode_blocks, dequantize_4bit
from slimtune.quant.codebook import codebook, pair_table

# Values decoded per band on a CPU: 256K float32 values (1 MiB, the size of a core's L2 cache).
# Smaller bands were slower at SmolLM2's shapes (16 rows): more calls per layer.
BAND_VALUES = 1 << 18
# Bands on a GPU: decoding is cheap there, launches are not.
GPU_BAND_VALUES = 1 << 24
# Input rows up to which the C kernel takes the product. It multiplies every decoded vector
# into 8 rows at most and decodes the weight again for the next 8; towards 512 rows decoding
# bands for BLAS catches up (benchmarks/reports/rows.md, SmolLM2's shapes, AVX-512: the kernel
# 1.2-1.6x the bands at 256 rows, 3-4x at 48; with AVX2 the two are even from about 96 rows).
# Prompts of a serving batch stay here too.
NATIVE_ROWS = 256
# Rows of a thread's chunk in the fused kernel (the chunk's partial sums stay in registers/L1).
_CHUNK_ROWS = 64


@cache
def _compiled():
    """The compiled (build_table, serial gemv, parallel gemv), or None without numba."""
    if kernels.kernel() is None:
        return None
    import numba
    import numpy as np

    # One thread: the table is small (in_features * 128 values) and a parallel region's
    # hand-off costs more than building it.
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def build_table(x, high, low, table):  # pragma: no cover - compiled, not traced
        for j in range(x.shape[0] // 2):
            x0, x1 = x[2 * j], x[2 * j + 1]
            row = j * 256
            for b in range(256):
                table[row + b] = high[b] * x0 + low[b] * x1

    @numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
    def rows_chunk(
        table, words, absmax, absmax_codes, nested, offset, nested_code, double, out, chunk
    ):  # pragma: no cover - compiled, not traced
        # words: (rows, in // 8) uint32, four packed bytes each (little endian: byte 0 lowest).
        rows, width = words.shape
        blocks = absmax_codes.shape[0] // rows if double else absmax.shape[0] // rows
        per = width // blocks  # words per block
        r0 = chunk * _CHUNK_ROWS
        r1 = min(rows, r0 + _CHUNK_ROWS)
        for r in range(r0, r1):
            out[r] = 0.0
        for b in range(blocks):
            for r in range(r0, r1):
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for q in range(b * per, (b + 1) * per):
                    w = words[r, q]
                    base = q * 1024
                    s0 += table[base + (w & 255)]
                    s1 += table[base + 256 + ((w >> 8) & 255)]
                    s2 += table[base + 512 + ((w >> 16) & 255)]
                    s3 += table[base + 768 + (w >> 24)]
                i = r * blocks + b
                if double:  # the block's absmax from its 8-bit code, as decode_absmax does
                    scale = nested_code[absmax_codes[i]] * nested[i >> 8] + offset
                else:
                    scale = absmax[i]
                out[r] += ((s0 + s1) + (s2 + s3)) * scale

    # Two entry points (distinct functions, so numba's on-disk cache keeps both): one thread
    # runs the serial loop, since entering a parallel region costs more than small work.
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def serial(
        table, words, absmax, absmax_codes, nested, offset, nested_code, double, out
    ):  # pragma: no cover - compiled, not traced
        chunks = (words.shape[0] + _CHUNK_ROWS - 1) // _CHUNK_ROWS
        for chunk in range(chunks):
            rows_chunk(table, words, absmax, absmax_codes, nested, offset, nested_code, double,
                       out, chunk)  # fmt: skip

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def parallel(
        table, words, absmax, absmax_codes, nested, offset, nested_code, double, out
    ):  # pragma: no cover - compiled, not traced
        chunks = (words.shape[0] + _CHUNK_ROWS - 1) // _CHUNK_ROWS
        for chunk in numba.prange(chunks):
            rows_chunk(table, words, absmax, absmax_codes, nested, offset, nested_code, double,
                       out, chunk)  # fmt: skip

    return build_table, serial, parallel


def fused_layout(state: QuantState) -> bool:
    """Whether the fused kernel reads this weight: blocks within rows, the nested blocksize
    bitsandbytes uses (256), numba present."""
    in_features = state.shape[1]
    return (
        in_features % state.blocksize == 0
        and (not state.double_quant or state.nested_blocksize == 256)
        and _compiled() is not None
    )


def native_layout(state: QuantState) -> bool:
    """Whether the C kernel reads this weight: whole blocks in a row, 32 weights at least."""
    return (
        native.library() is not None
        and state.blocksize % 32 == 0
        and state.shape[1] % state.blocksize == 0
    )


def native_weight(packed: torch.Tensor, state: QuantState) -> native.Weight:
    """What the C kernel reads of this weight (make it once per layer). Double-quantized scales
    are decoded here, once (4 bytes a block, half a bit a weight at blocks of 64, held while
    the weight is): decoding a block's scale at every product cost a tenth of a decode step."""
    scales = state.block_absmax(compiled=False)
    return native.Weight(packed, tuple(state.shape), state.blocksize, codebook(state.quant_type),
                         scales)  # fmt: skip


def native_usable(x2d: torch.Tensor, state: QuantState) -> bool:
    """Whether the C kernel takes this call: a few input rows on a CPU, a weight it reads."""
    return x2d.shape[0] <= NATIVE_ROWS and x2d.device.type == "cpu" and native_layout(state)


def fused_usable(x2d: torch.Tensor, state: QuantState) -> bool:
    """Whether the fused kernel takes this call: one input row on a CPU, a weight it reads."""
    return x2d.shape[0] == 1 and x2d.device.type == "cpu" and fused_layout(state)


@cache
def _high_low(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = pair_table(quant_type)
    return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def input_table(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """T[j, byte] for the one input row `x` (float32, in_features), flat."""
    build_table = _compiled()[0]
    x = x.reshape(-1).to(torch.float32).contiguous()
    table = torch.empty(x.numel() * 128, dtype=torch.float32)
    high, low = _high_low(quant_type)
    build_table(x.numpy(), high.numpy(), low.numpy(), table.numpy())
    return table


_EMPTY_F32 = torch.zeros(1)
_EMPTY_U8 = torch.zeros(1, dtype=torch.uint8)


class Prepared:
    """The numpy views the fused kernel reads, made once per layer (they alias the buffers)."""

    def __init__(self, packed: torch.Tensor, state: QuantState):
        out_features, in_features = state.shape
        words = packed.view(torch.uint8).view(out_features, in_features // 2)
        self.words = words.view(torch.int32).numpy().view("uint32")
        self.out_features = out_features
        self.double = state.double_quant
        if self.double:
            self.absmax = _EMPTY_F32.numpy()
            self.codes = state.absmax.numpy()
            self.nested = state.nested_absmax.numpy()
            self.offset = state.offset.reshape(1).numpy()[0]  # float32: the add stays float32
            self.nested_code = state.nested_code.numpy()
        else:
            self.absmax = state.absmax.numpy()
            self.codes = _EMPTY_U8.numpy()
            self.nested = _EMPTY_F32.numpy()
            self.offset = _EMPTY_F32.numpy()[0]
            self.nested_code = _EMPTY_F32.numpy()


def fused_gemv(
    table: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    prepared: Prepared | None = None,
) -> torch.Tensor:
    """W @ x as float32 (out_features,), from the table of x and the packed codes of W."""
    threads = torch.get_num_threads()
    gemv = _compiled()[1 if threads == 1 else 2]
    p = prepared or Prepared(packed, state)
    out = torch.empty(p.out_features, dtype=torch.float32)
    if threads > 1:
        kernels._set_threads(threads)
    gemv(table.numpy(), p.words, p.absmax, p.codes, p.nested, p.offset, p.nested_code,
         p.double, out.numpy())  # fmt: skip
    return out


def banded_linear(
    x2d: torch.Tensor, packed: torch.Tensor, state: QuantState, dtype: torch.dtype
) -> torch.Tensor:
    """x2d @ W.T in `dtype`, W decoded band by band (bands of whole blocks, any shape)."""
    out_features, in_features = state.shape
    bs = state.blocksize
    unit = bs // gcd(in_features, bs)  # rows whose values are a whole number of blocks
    budget = BAND_VALUES if packed.device.type == "cpu" else GPU_BAND_VALUES
    rows = max(unit, budget // in_features // unit * unit)
    rows = min(rows, out_features)
    codes = packed.view(-1)
    absmax = state.block_absmax()
    y = torch.empty(x2d.shape[0], out_features, dtype=dtype, device=x2d.device)
    scratch = torch.empty(rows * in_features, dtype=torch.float32, device=x2d.device)
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        values = (r1 - r0) * in_features
        band = decode_blocks(
            codes[r0 * in_features // 2 : r1 * in_features // 2],
            absmax[r0 * in_features // bs : r1 * in_features // bs],
            bs,
            state.quant_type,
            scratch[:values],
        ).view(r1 - r0, in_features)
        if band.dtype != dtype:
            band = band.to(dtype)
        y[:, r0:r1] = x2d @ band.t()
    return y


def linear_4bit_inference(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    table: torch.Tensor | None = None,
    prepared: Prepared | None = None,
    weight: native.Weight | None = None,
) -> torch.Tensor:
    """x @ W.T + bias for a packed 4-bit W, x (..., in_features); the result is in `dtype`.
    Kept by a caller that calls again: `weight`, `native_weight(packed, state)`; `prepared`,
    `Prepared(packed, state)`; `table`, `input_table(x)` (layers sharing an input)."""
    out_features, in_features = state.shape
    x2d = x.reshape(-1, in_features)
    if native_usable(x2d, state):
        bf16 = dtype == torch.bfloat16
        y = native.matmul(x2d, weight or native_weight(packed, state), bf16=bf16).to(dtype)
    elif fused_usable(x2d, state):
        if table is None:
            table = input_table(x2d, state.quant_type)
        y = fused_gemv(table, packed, state, prepared).view(1, out_features).to(dtype)
    elif gpu_matmul.usable(x2d, packed, state):
        y = gpu_matmul.matmul(x2d.to(dtype), packed, state)
    elif gpu_kernels.usable(packed):
        y = x2d.to(dtype) @ dequantize_4bit(packed, state, dtype).t()
    else:
        y = banded_linear(x2d.to(dtype), packed, state, dtype)
    if bias is not None:
        y += bias.to(dtype)
    return y.view(*x.shape[:-1], out_features)
