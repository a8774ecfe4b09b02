"""llama.cpp's K-quant block types Q4_K and Q6_K, quantized byte for byte as llama.cpp does.

A port of `quantize_row_q4_K_ref` and `quantize_row_q6_K_ref` (ggml/src/ggml-quants.c), the
quantizers `llama-quantize` runs for these types when it has no importance matrix: from the same
float32 weights, a file written here holds the bytes llama.cpp's would. The `gguf` package can
read these types but not write them.

Equal bytes need the C code's float32 arithmetic step for step, so the port keeps it:
- every product and sum is rounded to float32 in the C code's order; sums run left to right
  (`float_sum`), where numpy's `sum` would pair the terms up and round differently;
- rounding to an integer is ggml's `nearest_int`, scales go through float16 as ggml stores them;
- the searches over candidate scales keep the C code's strict comparisons, so ties resolve alike.
The loops over blocks are vectorized; the loops over candidate scales (21 for Q4_K, 18 for
Q6_K) stay loops, each pass over every block at once.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per super-block, both types
Q4_K_BYTES = 144  # f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit codes
Q6_K_BYTES = 210  # 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, f16 d
GROUP_MAX_EPS = np.float32(1e-15)  # ggml's threshold for an all-zero group
CHUNK = 2048  # super-blocks quantized at once: bounds the temporaries to a few MB

F32 = np.float32


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: adding 1.5 * 2**23 in float32 rounds to an integer (half to even)
    in the mantissa's low bits, which are read back. Emulated bit for bit, out-of-range inputs
    included."""
    bits = (values.astype(F32, copy=False) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def float_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis as C's `float s = 0; for (...) s += t;` computes it: float32,
    left to right (cumsum accumulates in order; the + 0 makes an all-(-0.0) sum +0.0 as in C)."""
    return np.cumsum(terms, axis=-1, dtype=F32)[..., -1] + F32(0.0)


def to_fp16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the float16 ggml stores, the float32 it reads back): ggml's FP32->FP16 conversion rounds
    to nearest even, as numpy's does."""
    half = values.astype(np.float16)
    return half, half.astype(F32)


def fp16_bytes(half: np.ndarray) -> np.ndarray:
    return half.astype("<f2").view(np.uint8).reshape(-1, 2)


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """Rows of `array` (float32, length a multiple of 256) as Q4_K blocks: shape (..., n) ->
    (..., n / 256 * 144) uint8, laid out as gguf.quants.quantize lays out other types."""
    return _by_chunks(array, _q4_k_blocks, Q4_K_BYTES)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """Rows of `array` as Q6_K blocks: shape (..., n) -> (..., n / 256 * 210) uint8."""
    return _by_chunks(array, _q6_k_blocks, Q6_K_BYTES)


def _by_chunks(array: np.ndarray, blocks_of, block_bytes: int) -> np.ndarray:
    *lead, n = array.shape
    if n % QK_K:
        raise ValueError(f"row length {n} is not a multiple of {QK_K}")
    flat = np.ascontiguousarray(array, dtype=F32).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], block_bytes), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, flat.shape[0], CHUNK):
            out[start : start + CHUNK] = blocks_of(flat[start : start + CHUNK])
    return out.reshape(*lead, n // QK_K * block_bytes)


# --- Q4_K: 8 groups of 32 values, x ~ d * scale_j * q - dmin * min_j, q in 0..15 ---


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    groups = x.reshape(-1, 32)
    # Each value weighted by its magnitude plus the group's RMS, as llama.cpp weights them.
    rms = np.sqrt(float_sum(groups * groups) / F32(32))
    weights = rms[:, None] + np.abs(groups)
    scales, mins, codes = make_qkx2_quants(groups, weights, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)

    # The groups' scales and mins as 6-bit multiples of two f16 super-block scales.
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    scale_codes = _six_bits(np.where(max_scale > 0, F32(63) / max_scale, F32(0)), scales)
    min_codes = _six_bits(np.where(max_min > 0, F32(63) / max_min, F32(0)), mins)
    d_half, d = to_fp16(max_scale / F32(63))
    dmin_half, dmin = to_fp16(max_min / F32(63))

    # Codes again against the scales as stored; a group whose scale is 0 keeps its first codes.
    step = (d[:, None] * scale_codes)[:, :, None]
    offset = (dmin[:, None] * min_codes)[:, :, None]
    requantized = np.clip(nearest_int((x.reshape(-1, 8, 32) + offset) / step), 0, 15)
    codes = np.where(step != 0, requantized, codes.reshape(-1, 8, 32)).astype(np.uint8)

    packed = _pack_scales_k4(scale_codes, min_codes)
    header = np.concatenate([fp16_bytes(d_half), fp16_bytes(dmin_half), packed], axis=1)
    return np.concatenate([header, _q4_k_code_bytes(codes)], axis=1)


def _q4_k_code_bytes(codes: np.ndarray) -> np.ndarray:
    """A super-block's 256 codes (0..15) in 128 bytes: per 64 values, the first 32 in the low
    nibbles of 32 bytes, the next 32 in the high ones."""
    pairs = codes.reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def with_q4_k_codes(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Q4_K `blocks` (n, 144) with their codes replaced by `codes` (n, 256; 0..15), their scales
    and mins kept."""
    return np.concatenate([blocks[:, :16], _q4_k_code_bytes(codes.astype(np.uint8))], axis=1)


def _six_bits(inverse: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`MIN(63, (uint8_t)nearest_int(inverse * value))`, the cast's wrap-around included."""
    return np.minimum(nearest_int(inverse[:, None] * values).astype(np.uint8), 63)


def _pack_scales_k4(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins in 12 bytes (ggml's `get_scale_min_k4` layout):
    groups 0-3 whole in bytes 0-7; groups 4-7 as low nibbles in bytes 8-11, high bits on top of
    bytes 0-7."""
    packed = np.zeros((scales.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (scales[:, 4:] & 0xF) | ((mins[:, 4:] & 0xF) << 4)
    return packed


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's `make_qkx2_quants` (weighted squared error), for every row of `x` at once: codes
    L in 0..nmax with x ~ scale * L - min. A first guess from the row's range, then nstep + 1
    wider or narrower grids, each refitted by weighted least squares; a refit replaces the best
    so far only if its error is strictly smaller. Returns (scale, min, codes)."""
    low = np.minimum(x.min(axis=1), F32(0))  # the offset never goes above 0
    high = x.max(axis=1)
    flat = high == low
    sum_w = float_sum(weights)
    sum_x = float_sum(weights * x)

    iscale = F32(nmax) / (high - low)
    scale = F32(1) / iscale
    codes = _codes_from(iscale, x, low, nmax)
    best_error = _weighted_error(scale, low, codes, x, weights)
    for step in range(nstep + 1):
        # `low` moves with the best fit, and the next grids start from it (as in the C code).
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (high - low)
        trial = _codes_from(iscale, x, low, nmax)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = float_sum(wl), float_sum(wl * trial), float_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = trial_min > 0  # an offset above 0 is clamped and the scale refitted
        trial_min = np.where(positive, F32(0), trial_min)
        trial_scale = np.where(positive, sum_xl / sum_l2, trial_scale)
        error = _weighted_error(trial_scale, trial_min, trial, x, weights)
        better = (det > 0) & (error < best_error) & ~flat
        codes = np.where(better[:, None], trial, codes)
        best_error = np.where(better, error, best_error)
        scale = np.where(better, trial_scale, scale)
        low = np.where(better, trial_min, low)
    codes = np.where(flat[:, None], F32(0), codes)
    return np.where(flat, F32(0), scale), -low, codes.astype(np.uint8)


def _codes_from(iscale: np.ndarray, x: np.ndarray, low: np.ndarray, nmax: int) -> np.ndarray:
    """nearest_int(iscale * (x - low)) clamped to 0..nmax, as float32 (the C code's `float` l)."""
    codes = nearest_int(iscale[:, None] * (x - low[:, None]))
    return np.clip(codes, 0, nmax).astype(F32)


def _weighted_error(scale, low, codes, x, weights) -> np.ndarray:
    diff = scale[:, None] * codes + low[:, None] - x
    return float_sum(weights * (diff * diff))


# --- Q6_K: 16 groups of 16 values, x ~ d * scale_j * (q - 32), q in 0..63 ---


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    scales, codes = make_qx_quants(x.reshape(-1, 16), 32)
    scales, codes = scales.reshape(-1, 16), codes.reshape(-1, 16, 16)

    # The groups' scales as int8 multiples of one f16 scale, set by the largest in magnitude.
    largest = _first_largest(scales)
    zero = np.abs(largest) < GROUP_MAX_EPS
    iscale = F32(-128) / largest
    d_half, d = to_fp16(F32(1) / iscale)
    scale_codes = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)

    # Codes again against the scales as stored; a group whose scale is 0 keeps its first codes.
    step = (d[:, None] * scale_codes)[:, :, None]
    requantized = np.clip(nearest_int(x.reshape(-1, 16, 16) / step), -32, 31) + 32
    codes = np.where(step != 0, requantized, codes).astype(np.uint8)

    blocks = np.concatenate(
        [_q6_k_code_bytes(codes), scale_codes.view(np.uint8), fp16_bytes(d_half)], axis=1
    )
    blocks[zero] = 0  # an all-zero super-block is stored as zeros, d included
    return blocks


def _q6_k_code_bytes(codes: np.ndarray) -> np.ndarray:
    """A super-block's 256 codes (0..63) in 192 bytes. Per 128 values, four runs of 32 (q0..q3):
    low nibbles of q0/q2 and q1/q3 share bytes, the four high 2-bit parts share one byte."""
    q = codes.reshape(-1, 2, 4, 32)
    low_bits = np.concatenate(
        [
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(-1, 128)
    high_bits = (
        (q[:, :, 0] >> 4)
        | ((q[:, :, 1] >> 4) << 2)
        | ((q[:, :, 2] >> 4) << 4)
        | ((q[:, :, 3] >> 4) << 6)
    ).reshape(-1, 64)
    return np.concatenate([low_bits, high_bits], axis=1)


def with_q6_k_codes(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Q6_K `blocks` (n, 210) with their codes replaced by `codes` (n, 256; 0..63), their scales
    and d kept."""
    return np.concatenate([_q6_k_code_bytes(codes.astype(np.uint8)), blocks[:, 192:]], axis=1)


def _first_largest(values: np.ndarray) -> np.ndarray:
    """Per row, the first value of largest magnitude (the C loops' strict `>` keeps the first)."""
    index = np.argmax(np.abs(values), axis=1)
    return values[np.arange(values.shape[0]), index]


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qx_quants` with rmse_type 1 and no importance weights, for every row of `x`
    at once: codes L in 0..2 nmax - 1 with x ~ scale * (L - nmax), the grid set by the value of
    largest magnitude; 18 slightly wider or narrower grids are tried, each scored by the
    x^2-weighted least-squares fit. Returns (scale, codes); an all-zero row gets 0 and 0s."""
    peak = _first_largest(x)
    zero = np.abs(peak) < GROUP_MAX_EPS
    weights = x * x

    def fit(iscale):
        level = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        sum_lx = float_sum(weights * x * level)
        sum_l2 = float_sum(weights * level * level)
        return level, sum_lx, sum_l2

    level, sum_lx, sum_l2 = fit(F32(-nmax) / peak)
    codes = level + F32(nmax)
    scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0))
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        level, sum_lx, sum_l2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        codes = np.where(better[:, None], level + F32(nmax), codes)
        scale = np.where(better, sum_lx / sum_l2, scale)
        best = np.where(better, scale * sum_lx, best)
    codes = np.where(zero[:, None], F32(0), codes)
    return np.where(zero, F32(0), scale), codes.astype(np.int8)
