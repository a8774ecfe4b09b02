"""The C kernels, built for every instruction set they have a path for (AVX-512, AVX2, plain C)
where this CPU runs it: decoding equals the torch decode bit for bit, products equal
decode-then-matmul to float rounding."""

from __future__ import annotations

import platform

import pytest
import torch

from slimtune.hardware import cpu_flags
from slimtune.quant import dequantize_4bit, gemv, native, quantize_4bit
from slimtune.quant.codebook import codebook

# -march target -> (the CPU flags it needs, the float lanes its path uses)
TARGETS = {"x86-64": (set(), 1), "x86-64-v3": ({"avx2", "fma"}, 8),
           "x86-64-v4": ({"avx512f", "avx512bw", "avx512vl"}, 16)}  # fmt: skip


def _targets():
    if platform.machine() != "x86_64" or native.compiler() is None:
        return ["native"]
    return ["native"] + [t for t, (flags, _) in TARGETS.items() if flags <= cpu_flags()]


@pytest.fixture(scope="module", params=_targets())
def lib(request):
    lib = native.load(request.param)
    if request.param in TARGETS:
        assert native.lanes(lib) == TARGETS[request.param][1]
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_decode_is_the_float32_product_rounded_once(lib, dtype, quant_type, blocksize):
    w = torch.randn(48, 512) * 3
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant=True)
    codes = packed.view(48, 256)
    scales = state.block_absmax().view(48, -1)
    out = torch.empty(48, 512, dtype=dtype)
    native.decode_rows(codes, scales, codebook(quant_type), out, threads=2, lib=lib)
    lut = codebook(quant_type).float()
    nibbles = torch.stack([codes // 16, codes % 16], dim=-1).view(48, 512).long()
    ref = (lut[nibbles].view(48, -1, blocksize) * scales[:, :, None]).view(48, 512).to(dtype)
    assert torch.equal(out, ref)


def test_decode_reads_a_band_of_columns(lib):
    """Training's input gradient decodes a band of columns: rows of codes a stride apart."""
    w = torch.randn(16, 256)
    packed, state = quantize_4bit(w, "nf4", 64)
    codes = packed.view(16, 128)[:, 32:96]
    scales = state.absmax.view(16, 4)[:, 1:3]
    out = torch.empty(16, 128)
    native.decode_rows(codes, scales, codebook("nf4"), out, threads=1, lib=lib)
    assert torch.equal(out, dequantize_4bit(packed, state, torch.float32)[:, 64:192])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matmul_equals_decode_then_matmul(lib, rows, double_quant):
    w = torch.randn(37, 320)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant)
    x = torch.randn(rows, 320)
    ref = x @ dequantize_4bit(packed, state, torch.float32).t()
    for _ in _lookups(lib):
        y = native.matmul(x, gemv.native_weight(packed, state), threads=2, lib=lib)
        assert (y - ref).abs().max() <= 2e-5 * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize(("quant_type", "blocksize"), [("nf4", 64), ("fp4", 128), ("nf4", 32)])
def test_one_hot_inputs_give_the_decoded_columns_exactly(lib, rows, quant_type, blocksize):
    """An input row with a single 1 picks one column of W: one product, no sum to round, so the
    result is that column's decoded weights bit for bit, whatever order the kernel reads the
    columns in (AVX2's byte-plane products reorder them for up to 7 input rows)."""
    w = torch.randn(40, 384)
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant=True)
    weight, decoded = gemv.native_weight(packed, state), dequantize_4bit(packed, state)
    eye = torch.eye(384)
    for planes in _lookups(lib):
        for start in range(0, 384, rows):
            columns = list(range(start, min(start + rows, 384)))
            y = native.matmul(eye[columns], weight, threads=2, lib=lib)
            assert torch.equal(y, decoded[:, columns].t()), planes


def _lookups(lib):
    """Both ways AVX2 looks codes up for a few rows (byte planes, vpermps), the kernels set to
    each in turn and back as `native` set them; one pass elsewhere."""
    if native.lanes(lib) != 8:
        yield None
        return
    try:
        for planes in (1, 0):
            lib.slim_q4_byte_planes(planes)
            yield planes
    finally:
        lib.slim_q4_byte_planes(int(native.byte_planes_pay()))


def test_libraries_open_with_byte_planes_where_they_pay(lib):
    """On for AVX2 kernels on AMD CPUs (measured faster there), off elsewhere."""
    expected = native.lanes(lib) == 8 and native.byte_planes_pay()
    assert lib.slim_q4_byte_planes(-1) == expected


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16, 21])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(("quant_type", "blocksize"), [("nf4", 64), ("fp4", 128), ("nf4", 32)])
def test_bf16_matmul_is_the_bfloat16_decode_then_matmul(
    lib, rows, double_quant, quant_type, blocksize
):
    """Where the CPU multiplies bfloat16 (and blocks hold whole 64-weight steps), bf16 products
    are a bfloat16 decode-then-matmul's: weights and input rounded to bfloat16, sums in
    float32. Elsewhere they are the float32 products."""
    w = torch.randn(37, 384)
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
    x = torch.randn(rows, 384)
    y = native.matmul(x, gemv.native_weight(packed, state), threads=2, lib=lib, bf16=True)
    if native.bf16_dot(lib) and blocksize % 64 == 0:
        ref = x.bfloat16().float() @ dequantize_4bit(packed, state, torch.bfloat16).float().t()
    else:
        ref = x @ dequantize_4bit(packed, state, torch.float32).t()
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_dequantize_uses_the_c_decode(monkeypatch):
    """`dequantize_4bit` on a CPU goes through the C decode where it is built."""
    calls = []
    real = native.decode_rows
    monkeypatch.setattr(native, "decode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    packed, state = quantize_4bit(torch.randn(8, 128), "nf4", 64)
    dequantize_4bit(packed, state, torch.bfloat16)
    assert calls == ([1] if native.library() is not None else [])


@pytest.mark.skipif("x86-64-v3" not in _targets(), reason="needs an x86-64 CPU with AVX2")
def test_the_environment_can_hold_the_kernels_to_avx2(monkeypatch):
    """SLIMTUNE_NATIVE_ARCH builds for an older CPU than the host: the AVX2 kernels, measured
    on an AVX-512 machine."""
    monkeypatch.setenv(native.ARCH_SWITCH, "x86-64-v3")
    assert native.lanes(native.load()) == 8
    monkeypatch.delenv(native.ARCH_SWITCH)
    assert native.lanes(native.load()) == (16 if "avx512f" in cpu_flags() else 8)
