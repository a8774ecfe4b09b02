"""The CPU decode kernel: packed 4-bit codes -> float32 or bfloat16 values, in one pass, by numba.

With torch ops a decode takes three passes over memory (bytes -> int32 index, gather through a
byte -> pair table, scale by the block's absmax); this loop reads each byte once and writes its
two values once, which is what bitsandbytes' C kernel does. The result is bit for bit the same
(float32 code value times float32 absmax). Without numba (an unsupported platform) `kernel()`
returns None and callers use the torch ops.

bfloat16 is written straight from the float32 product (rounded to nearest even, as torch's
`.to(torch.bfloat16)` does), so a bfloat16 compute dtype costs one pass writing half the bytes,
not a float32 pass and a conversion pass.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def kernel():
    """The compiled (decode, decode_scales) functions, or None when numba is not importable."""
    try:
        import numba
        import numpy as np
    except ImportError:
        return None
    # Which thread pool runs the parallel loops is the process's choice (slimtune.runtime).

    @numba.njit(parallel=True, cache=True, nogil=True)
    def decode(codes, absmax, pairs, out):  # pragma: no cover - compiled, not traced
        rows, width = codes.shape
        blocks = absmax.shape[1]
        per_block = width // blocks  # bytes per block
        for r in numba.prange(rows):
            for b in range(blocks):
                scale = absmax[r, b]
                for j in range(b * per_block, (b + 1) * per_block):
                    byte = codes[r, j]
                    out[r, 2 * j] = pairs[byte, 0] * scale
                    out[r, 2 * j + 1] = pairs[byte, 1] * scale

    @numba.njit(parallel=True, cache=True, nogil=True)
    def decode_bf16(codes, absmax, pairs, out):  # pragma: no cover - compiled
        # out: the bfloat16 result's bits (uint16). Each float32 product is rounded to nearest
        # even on its top 16 bits (no NaN or inf can occur here). Written out twice rather than
        # through a helper: numba does not cache a function that calls a closure.
        rows, width = codes.shape
        blocks = absmax.shape[1]
        per_block = width // blocks
        for r in numba.prange(rows):
            for b in range(blocks):
                scale = absmax[r, b]
                for j in range(b * per_block, (b + 1) * per_block):
                    byte = codes[r, j]
                    hi = np.int64(np.float32(pairs[byte, 0] * scale).view(np.uint32))
                    lo = np.int64(np.float32(pairs[byte, 1] * scale).view(np.uint32))
                    out[r, 2 * j] = np.uint16((hi + 0x7FFF + ((hi >> 16) & 1)) >> 16)
                    out[r, 2 * j + 1] = np.uint16((lo + 0x7FFF + ((lo >> 16) & 1)) >> 16)

    @numba.njit(cache=True, nogil=True)
    def decode_scales(codes, code, nested, per_nested, offset, out):  # pragma: no cover
        n = codes.shape[0]
        for g in range(nested.shape[0]):
            scale = nested[g]
            for i in range(g * per_nested, min(n, (g + 1) * per_nested)):
                out[i] = code[codes[i]] * scale + offset

    return decode, decode_scales, decode_bf16


def as_numpy(tensor: torch.Tensor):
    """A numpy view of a CPU tensor, for the compiled loops. Not `Tensor.numpy()`: that marks
    the tensor's storage not resizable for good, and FSDP frees and refills a gathered
    parameter's storage in place (by resizing it) between uses."""
    import numpy as np

    return np.from_dlpack(tensor)


def usable(tensor: torch.Tensor) -> bool:
    """Whether the compiled kernels can decode `tensor`: a CPU tensor, and numba importable."""
    return tensor.device.type == "cpu" and kernel() is not None


OUT_DTYPES = (torch.float32, torch.bfloat16)  # what decode_rows writes directly


def decode_rows(codes: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor):
    """Fill `out` (rows, 2 * width), float32 or bfloat16, from `codes` (rows, width) uint8, any
    strides, whose blocks along each row share the float32 `absmax` (rows, blocks); `pairs`
    (256, 2) float32 holds each byte's (high nibble, low nibble) code values. CPU tensors only."""
    _set_threads(torch.get_num_threads())
    if out.dtype == torch.bfloat16:  # numpy has no bfloat16: the kernel writes its bits
        bits = out.view(torch.uint16)
        kernel()[2](as_numpy(codes), as_numpy(absmax), pairs.numpy(), bits.numpy())
    else:
        kernel()[0](as_numpy(codes), as_numpy(absmax), pairs.numpy(), out.numpy())
    return out


def decode_absmax(
    codes: torch.Tensor, code: torch.Tensor, nested: torch.Tensor, per_nested: int, offset
) -> torch.Tensor:
    """float32 absmax from double quantization: code[c] * nested[i // per_nested] + offset,
    every step in float32 (offset: a one-value float32 tensor)."""
    out = torch.empty(codes.shape, dtype=torch.float32)
    offset32 = offset.reshape(1).numpy()[0]  # a numpy float32 scalar keeps the add in float32
    codes, nested = as_numpy(codes), as_numpy(nested)
    kernel()[1](codes, code.numpy(), nested, per_nested, offset32, out.numpy())
    return out


def _set_threads(n: int) -> None:
    """As many threads as torch uses (a test's one thread, a worker's share of the cores)."""
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
