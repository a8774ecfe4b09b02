"""The codes inside GGUF's quantized blocks, apart from the scales around them: what GPTQ
rounding (`gptq.gguf_gptq_codes`) needs to choose new codes for blocks a quantizer has made while
keeping every scale that quantizer picked.

In every block type the exports write, each group of values decodes as low + step * code, with
codes 0..top and (low, step) set by the block's stored scales (and mins):

    Q4_0  d * (q - 8)             groups of 32, q in 0..15
    Q5_0  d * (q - 16)            groups of 32, q in 0..31
    Q8_0  d * q                   groups of 32, q in -127..127 (code q + 127 here)
    Q4_K  d * sc * q - dmin * m   groups of 32 (8 per super-block), q in 0..15
    Q6_K  d * sc * (q - 32)       groups of 16 (16 per super-block), q in 0..63

`code_grid` reads (low, step) by decoding the blocks with every code set to 0 and to 1, with the
`gguf` package's decoder (which reads these types as llama.cpp's `dequantize_row_*` does), so no
second decoder is written here. Q8_0 stays within -127..127, the range its quantizer uses:
llama.cpp's AVX2 dot products take the magnitude of int8 values, and -128 has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from slimtune.export.kquants import with_q4_k_codes, with_q6_k_codes

T = gguf.GGMLQuantizationType


def _with_q4_0_codes(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Q4_0 (n, 18): f16 d, then value j in the low nibble and j + 16 in the high one."""
    nibbles = codes[:, :16] | (codes[:, 16:] << 4)
    return np.concatenate([blocks[:, :2], nibbles], axis=1)


def _with_q5_0_codes(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Q5_0 (n, 22): f16 d, the 32 fifth bits (little-endian), the low nibbles as in Q4_0."""
    fifth_bits = np.packbits(codes >> 4, axis=1, bitorder="little")
    nibbles = (codes[:, :16] & 0xF) | (codes[:, 16:] << 4)
    return np.concatenate([blocks[:, :2], fifth_bits, nibbles], axis=1)


def _with_q8_0_codes(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Q8_0 (n, 34): f16 d, 32 int8 values (code - 127)."""
    signed = (codes.astype(np.int16) - 127).astype(np.int8).view(np.uint8)
    return np.concatenate([blocks[:, :2], signed], axis=1)


@dataclass(frozen=True)
class CodeLayout:
    group: int  # consecutive values of a row sharing one (low, step)
    top: int  # codes are 0..top
    write: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (blocks, codes per block) -> blocks


LAYOUTS = {
    T.Q4_0: CodeLayout(32, 15, _with_q4_0_codes),
    T.Q5_0: CodeLayout(32, 31, _with_q5_0_codes),
    T.Q8_0: CodeLayout(32, 254, _with_q8_0_codes),
    T.Q4_K: CodeLayout(32, 15, with_q4_k_codes),
    T.Q6_K: CodeLayout(16, 63, with_q6_k_codes),
}


def with_codes(blocks: np.ndarray, codes: np.ndarray, ggml_type) -> np.ndarray:
    """`blocks` (rows of `ggml_type` bytes, as `gguf.quants.quantize` returns them) with the codes
    of a (rows, columns) matrix written in; every scale byte is kept."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    flat = np.ascontiguousarray(blocks).reshape(-1, block_bytes)
    chunks = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, block_values)
    return LAYOUTS[ggml_type].write(flat, chunks).reshape(blocks.shape)


def code_grid(blocks: np.ndarray, ggml_type, shape: tuple[int, int]):
    """(low, step), float32 arrays (rows, columns / group): group g of row r decodes code q to
    low[r, g] + step[r, g] * q."""

    def decode_all(code: int) -> np.ndarray:
        every = with_codes(blocks, np.full(shape, code, np.uint8), ggml_type)
        return gguf.quants.dequantize(every, ggml_type).reshape(shape)

    group = LAYOUTS[ggml_type].group
    low = decode_all(0)
    step = decode_all(1) - low
    return low[:, ::group].copy(), step[:, ::group].copy()
