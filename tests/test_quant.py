"""Code books and blockwise 4-bit (de)quantization, checked bit for bit against bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from oracles import bnb_dequantize_is_wrong, bnbf, dequantize_reference, format_dequantize

from slimtune.errors import SlimtuneError
from slimtune.quant import codebook, dequantize_4bit, dynamic_map, quantize_4bit
from slimtune.quant.codebook import sorted_codes

# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _bnb(x, quant_type, blocksize, double_quant):
    return bnbf.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def assert_same_as_bnb(x, quant_type, blocksize, double_quant):
    packed_ref, state_ref = _bnb(x, quant_type, blocksize, double_quant)
    packed, state = quantize_4bit(x, quant_type, blocksize, double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == (x.numel() // 2, 1)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(state.absmax, state_ref.absmax)
    if double_quant:
        assert state.absmax.dtype == torch.uint8
        assert torch.equal(state.nested_absmax, state_ref.state2.absmax)
        assert torch.equal(state.offset, state_ref.offset)
    values = dequantize_4bit(packed, state)
    assert values.dtype == x.dtype and values.shape == x.shape
    # The format's definition, float32 then rounded once to x's dtype, bit for bit...
    absmax = state.block_absmax() if double_quant else state.absmax
    definition = format_dequantize(packed, state.code, absmax, x.shape, blocksize)
    assert torch.equal(values, definition.to(x.dtype))
    # ...which is what bitsandbytes computes, except where its AVX-512 kernel misplaces absmax.
    values_bnb = bnbf.dequantize_4bit(packed_ref, state_ref).view(x.shape)
    if bnb_dequantize_is_wrong(tuple(x.shape), blocksize):
        assert not torch.equal(values_bnb, values), "bitsandbytes' known CPU bug is gone: update"
    else:
        assert torch.equal(values, values_bnb)
    assert torch.equal(values, dequantize_reference(packed_ref, state_ref))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codebooks_are_bitsandbytes_values(quant_type):
    ref = bnbf.get_4bit_type(quant_type, device="cpu")
    assert codebook(quant_type).dtype == torch.float32
    assert torch.equal(codebook(quant_type), ref)


def test_dynamic_map_is_bitsandbytes_signed_map():
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


def test_int4_is_symmetric_round_to_nearest():
    x = torch.randn(8, 64)
    packed, state = quantize_4bit(x, "int4", 64)
    scale = x.abs().amax(dim=1, keepdim=True)
    expected = torch.round(x / scale * 7).clamp(-7, 7) / 7 * scale
    torch.testing.assert_close(dequantize_4bit(packed, state), expected)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], 1).view(-1)
    assert codes.min() >= 1  # -8/7 is never used: the grid is symmetric


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_random_tensors_match_bitsandbytes(quant_type, blocksize, dtype, double_quant):
    torch.manual_seed(blocksize)
    # 300 blocks: the nested (256-block) grouping ends with a partial group.
    blocks = 300 if blocksize < 4096 else 6
    x = (torch.randn(blocks * blocksize // 96, 96) * 0.03).to(dtype)
    assert_same_as_bnb(x, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_between_two_codes_round_like_bitsandbytes(quant_type):
    # Each block holds its absmax (1.0) then the exact midpoints between neighbouring codes,
    # and values one float32 step on either side of them.
    bounds, _ = sorted_codes(quant_type)
    ties = torch.cat(
        [bounds, torch.nextafter(bounds, bounds + 1), torch.nextafter(bounds, bounds - 1)]
    )
    block = torch.cat([torch.ones(1), ties, torch.zeros(64 - 1 - ties.numel())])
    x = torch.stack([block, -block, block * 0.37])
    packed, _ = quantize_4bit(x, quant_type, 64)
    assert torch.equal(packed, _bnb(x, quant_type, 64, False)[0])
    assert_same_as_bnb(x, quant_type, 64, True)


def test_double_quant_constants_and_zero_blocks():
    x = torch.randn(64 * 256 * 2 + 64 * 7)
    x[:640] = 0.0  # all-zero blocks: absmax 0, codes of zero
    assert_same_as_bnb(x, "nf4", 64, True)
    packed, state = quantize_4bit(x, "nf4", 64, double_quant=True)
    absmax = x.view(-1, 64).abs().amax(1)
    assert state.nested_absmax.numel() == 3  # ceil(519 / 256)
    assert torch.allclose(state.offset, absmax.mean())
    # 8-bit absmax: close for real blocks; zero blocks stay exact zeros (their codes are 0.0).
    torch.testing.assert_close(state.block_absmax()[10:], absmax[10:], atol=0, rtol=2e-2)
    assert torch.equal(dequantize_4bit(packed, state)[:640], torch.zeros(640))


def test_first_element_goes_to_the_high_nibble():
    x = torch.zeros(64)
    x[0], x[1], x[3] = 1.0, -1.0, 1.0  # nf4 codes 15, 0, then 7 (zero), 15
    packed, _ = quantize_4bit(x, "nf4", 64)
    assert packed[:2, 0].tolist() == [0xF0, 0x7F]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensors_dequantized_in_chunks_match_bitsandbytes(dtype, monkeypatch):
    from slimtune.quant import blockwise

    monkeypatch.setattr(blockwise, "CHUNK_BYTES", 1 << 14)  # 4.5 chunks below
    x = torch.randn(288, 256).to(dtype)
    assert_same_as_bnb(x, "nf4", 64, True)


def test_dequantize_to_another_dtype():
    x = torch.randn(32, 64)
    packed, state = quantize_4bit(x, "nf4", 64, double_quant=True)
    as_bf16 = dequantize_4bit(packed, state, torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, dequantize_4bit(packed, state).to(torch.bfloat16))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quantize_4bit(torch.randn(100)), "multiple of the blocksize"),
        (lambda: quantize_4bit(torch.randint(0, 9, (128,))), "dtype torch.int64"),
        (lambda: quantize_4bit(torch.randn(128), quant_type="nf3"), "unknown quant_type 'nf3'"),
        (lambda: quantize_4bit(torch.randn(128), blocksize=48), "invalid blocksize 48"),
        (lambda: quantize_4bit(torch.randn(8192), blocksize=8192), "invalid blocksize 8192"),
    ],
)
def test_bad_input_is_explained(call, message):
    with pytest.raises(SlimtuneError, match=message):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_real_smollm2_weights_match_bitsandbytes(smollm2, quant_type):
    model, _ = smollm2
    layer = model.model.layers[3]
    weights = [
        layer.self_attn.q_proj.weight,
        layer.self_attn.k_proj.weight,
        layer.mlp.down_proj.weight,
    ]
    for weight, (blocksize, dtype, dq) in zip(
        weights,
        [(64, torch.float32, True), (128, torch.bfloat16, False), (64, torch.float16, True)],
        strict=True,
    ):
        assert_same_as_bnb(weight.detach().to(dtype), quant_type, blocksize, dq)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False), (4096, True)])
def test_compiled_and_torch_decoders_agree(quant_type, blocksize, double_quant, monkeypatch):
    """The numba kernel (CPU) and the torch ops (GPUs, or no numba) decode bit for bit alike,
    whole tensors and column bands of a weight (the 4-bit matmul's backward decodes those)."""
    from slimtune.quant import kernels
    from slimtune.quant.blockwise import decode_blocks

    assert kernels.kernel() is not None  # numba is a dependency: the CPU path is the kernel
    x = torch.randn(96, 8192)
    packed, state = quantize_4bit(x, quant_type, blocksize, double_quant)
    codes = packed.view(96, 4096)
    absmax = state.block_absmax().view(96, -1)
    band = slice(2048, 4096)  # bytes 2048.. of each row: its values 4096..8191
    blocks = slice(4096 // blocksize, 8192 // blocksize)

    def both():
        whole = dequantize_4bit(packed, state)
        half = decode_blocks(codes[:, band], absmax[:, blocks], blocksize, quant_type)
        as_bf16 = dequantize_4bit(packed, state, torch.bfloat16)
        return whole, half.view(96, 4096), as_bf16

    compiled = both()
    monkeypatch.setattr(kernels, "kernel", lambda: None)
    for ours, theirs in zip(compiled, both(), strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(compiled[1], compiled[0][:, 4096:])


def test_cuda_rounding_rules_differ_from_the_cpu_only_at_the_edges():
    """bitsandbytes' CUDA rules (slimtune.quant.cuda_codes), run here on CPU tensors: its FP4
    threshold 0.583333 sits below the midpoint, an exact zero takes +0 and a tiny negative -0,
    and a zero block (NaN after scaling) code 0. tests/gpu checks them against the GPU."""
    from slimtune.quant.blockwise import nearest_code
    from slimtune.quant.cuda_codes import nearest_code_cuda, nearest_dynamic_code_cuda

    x = torch.tensor([0.5833331, 0.0, -1e-9, float("nan"), 0.9, -0.2])
    assert nearest_code_cuda(x, "fp4").tolist() == [0b010, 0, 0b1000, 0, 0b011, 0b1110]
    assert nearest_code(x[:1], "fp4").tolist() == [0b101]  # the CPU kernel's exact midpoint
    torch.manual_seed(0)
    scaled = torch.rand(20_000) * 2 - 1
    assert torch.equal(nearest_code_cuda(scaled, "nf4"), nearest_code(scaled, "nf4"))
    # FP4 has two zeros: the CPU kernel gives tiny positives the one, CUDA the other.
    on_gpu, on_cpu = nearest_code_cuda(scaled, "fp4"), nearest_code(scaled, "fp4")
    assert 0 < int((on_gpu != on_cpu).sum()) < 100
    fp4 = codebook("fp4")
    assert torch.equal(fp4[on_gpu.long()], fp4[on_cpu.long()])
    code = dynamic_map()
    nearest = (scaled[:, None] - code[None]).abs().argmin(dim=1)
    assert torch.equal(nearest_dynamic_code_cuda(scaled, code).long(), nearest)
