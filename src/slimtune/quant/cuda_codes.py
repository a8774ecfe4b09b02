"""How bitsandbytes' CUDA kernels choose codes, which is not quite how its CPU kernels do.

The formats are the same; the rounding at the edges is not. On a GPU bitsandbytes picks 4-bit
codes with a decision tree whose thresholds are float32 literals (one of them, 0.583333 for FP4,
a little below the true midpoint 0.5833...), splits FP4's two zero codes by the sign of the
value (the CPU kernel gives tiny positive values the other one), and picks double-quantization
codes by a binary search of the 8-bit map rather than the CPU's 65536-bin table. A block of
zeros becomes code 0 (0 * 1/0 is NaN, and NaN fails every comparison of the tree).

bitsandbytes builds its CUDA kernels with --use_fast_math: 1 / absmax is the GPU's approximate
reciprocal (rcp.approx.ftz.f32), which can differ from the exact one in the last bit, and
that bit decides values that sit exactly between two codes (frequent with bfloat16 and float16
weights: 7/24 lies midway between FP4's 1/4 and 1/3). `approx_reciprocal` computes it with the
same instruction through Triton; denormal products are flushed to zero, as -ftz does.

We follow the CPU kernels on the CPU and these rules elsewhere, so that a model quantized on
either device holds the same bytes as one bitsandbytes quantized on that device. The values
decoded from the two agree except where a value sits on a threshold.
"""

from __future__ import annotations

from functools import cache

import torch

FLOAT32_TINY = torch.finfo(torch.float32).tiny  # below this -ftz flushes to zero

# Thresholds of bitsandbytes' dQuantizeNF4 (csrc), ascending: code i for values in
# (threshold[i - 1], threshold[i]].
NF4_THRESHOLDS = (
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
)
# Thresholds of dQuantizeFP4 on |x|, ascending, and the magnitude code of each interval.
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_MAGNITUDE_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
FP4_SIGN = 0b1000


def _table(values, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def scale_blocks_cuda(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Each row of `blocks` times 1 / its absmax, in the float32 steps of the CUDA kernel."""
    scaled = blocks * approx_reciprocal(absmax)[:, None]
    return scaled.masked_fill_(scaled.abs() < FLOAT32_TINY, 0.0)


def approx_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 / x (float32) as a kernel built with --use_fast_math computes it on an NVIDIA GPU;
    the exact 1 / x where that instruction is not at hand (no Triton, not NVIDIA, a CPU)."""
    kernel = _approx_reciprocal_kernel() if x.is_cuda and torch.version.hip is None else None
    if kernel is None:
        return 1.0 / x
    x = x.contiguous()
    out = torch.empty_like(x)
    block = 1024
    kernel[((x.numel() + block - 1) // block,)](x, out, x.numel(), BLOCK=block)
    return out


@cache
def _approx_reciprocal_kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def reciprocal(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside, other=1.0)
        y = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
        tl.store(out_ptr + offsets, y, mask=inside)

    return reciprocal


def nearest_code_cuda(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """uint8 4-bit codes of float32 `scaled` (x * (1 / block absmax)), as the CUDA kernel
    picks them. A value above a threshold takes the code above it (torch.bucketize counts the
    thresholds strictly below each value)."""
    zero_block = scaled.isnan()  # an all-zero block: 0 * inf
    if quant_type == "nf4":
        q = torch.bucketize(scaled, _table(NF4_THRESHOLDS, scaled.device), out_int32=True)
    elif quant_type == "fp4":
        step = torch.bucketize(scaled.abs(), _table(FP4_THRESHOLDS, scaled.device), out_int32=True)
        q = _table(FP4_MAGNITUDE_CODES, scaled.device, torch.int32)[step]
        q += (scaled < 0).to(torch.int32) * FP4_SIGN
    else:
        raise ValueError(f"bitsandbytes has no CUDA rule for {quant_type!r}")
    return q.masked_fill_(zero_block, 0).to(torch.uint8)


def nearest_dynamic_code_cuda(normed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 codes of `normed` (values in [-1, 1]) in the 256-value ascending map `code`: the
    CUDA kernel's binary search (7 halvings from the middle), then the nearer of the two
    neighbours, ties to the searched one."""
    code = code.to(normed.device)
    pivot = torch.full(normed.shape, 127, dtype=torch.int64, device=normed.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(normed, -1.0), torch.full_like(normed, 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = normed > value
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, value, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, value)
        pivot = torch.where(up, pivot + step, pivot - step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = normed > value
    take_upper = above & (normed > (upper + value) * 0.5)
    take_lower = ~above & (normed < (lower + value) * 0.5)
    chosen = torch.where(take_upper, upper_pivot, torch.where(take_lower, lower_pivot, pivot))
    return chosen.to(torch.uint8)
