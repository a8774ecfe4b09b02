"""The 4-bit inference kernels equal decode-then-matmul (to float rounding), for every format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtune.quant import (
    Linear4bit,
    QuantConfig,
    dequantize_4bit,
    gemv,
    inference,
    native,
    quantize_4bit,
)
from slimtune.quant.gemv import banded_linear, fused_usable, linear_4bit_inference
from slimtune.quant.inference import inference_4bit


@pytest.fixture(params=["native", "numba"])
def kernel(request, monkeypatch):
    """Each test twice: with the C kernel, and with the numba kernels it stands in for where no
    compiler is found."""
    if request.param == "numba":
        monkeypatch.setattr(gemv, "native_layout", lambda state: False)
        monkeypatch.setattr(inference, "native_layout", lambda state: False)
    else:
        assert native.library() is not None, "the C kernel did not build"
    return request.param


# (out, in, blocksize): blocks within rows; rows not a multiple of the chunk; blocks that
# span rows (in_features not a multiple of the blocksize); more rows than one band.
SHAPES = [(96, 128, 64), (70, 256, 32), (24, 40, 64), (5, 96, 32), (300, 512, 128)]


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # float32 sums in another order: a few ulps of the largest partial sum
    scale = ref.abs().max().clamp(min=1.0)
    assert (y - ref).abs().max() <= 2e-5 * scale, float((y - ref).abs().max() / scale)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_equals_decode_then_matmul(quant_type, double_quant, shape, rows, kernel, one_thread):
    out_features, in_features, blocksize = shape
    generator = torch.Generator().manual_seed(out_features + rows)
    w = torch.randn(out_features, in_features, generator=generator)
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
    x = torch.randn(rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    ref = x @ dequantize_4bit(packed, state, torch.float32).t() + bias
    y = linear_4bit_inference(x, packed, state, bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    _close(y, ref)


def test_one_row_takes_the_fused_kernel_where_blocks_stay_in_rows():
    w = torch.randn(64, 128)
    _, state = quantize_4bit(w, "nf4", 64, True)
    assert fused_usable(torch.zeros(1, 128), state)
    assert not fused_usable(torch.zeros(2, 128), state)  # prompts: banded
    _, odd = quantize_4bit(torch.randn(24, 40), "nf4", 64)
    assert not fused_usable(torch.zeros(1, 40), odd)  # blocks span rows: banded


def test_bands_never_decode_the_whole_weight(monkeypatch):
    monkeypatch.setattr(gemv, "BAND_VALUES", 1024)
    sizes = []
    real = gemv.decode_blocks

    def spy(codes, *args, **kwargs):
        sizes.append(codes.numel() * 2)
        return real(codes, *args, **kwargs)

    monkeypatch.setattr(gemv, "decode_blocks", spy)
    w = torch.randn(100, 128)
    packed, state = quantize_4bit(w, "nf4", 64, False)
    x = torch.randn(4, 128)
    y = banded_linear(x, packed, state, torch.float32)
    _close(y, x @ dequantize_4bit(packed, state, torch.float32).t())
    assert max(sizes) <= 1024 and sum(sizes) == w.numel()


def test_bfloat16_compute(kernel):
    w = torch.randn(64, 128)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(5, 128)
    y = linear_4bit_inference(x, packed, state, None, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    ref = x @ dequantize_4bit(packed, state, torch.float32).t()
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=5e-2 * ref.abs().max().item())


def test_inference_4bit_switches_forward_and_back(kernel, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    config = QuantConfig(double_quant=True)
    model[0] = Linear4bit.from_linear(model[0], config)
    model[2] = Linear4bit.from_linear(model[2], config)
    x = torch.randn(1, 128)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    with inference_4bit(model) as switched:
        assert switched == 2
        y = model(x)
        assert not y.requires_grad
    _close(y, ref)
    assert "forward" not in model[0].__dict__  # the class forward again
    assert list(model.state_dict()) == keys


def test_layers_sharing_an_input_share_its_table(monkeypatch, one_thread):
    monkeypatch.setattr(inference, "native_layout", lambda state: False)  # numba's tables
    built = []
    real = inference.input_table
    monkeypatch.setattr(inference, "input_table", lambda x, q: built.append(1) or real(x, q))
    layers = nn.ModuleList(Linear4bit.from_linear(nn.Linear(64, 32)) for _ in range(3))
    x = torch.randn(1, 64)
    with inference_4bit(layers):
        outs = [layer(x) for layer in layers]
        x.add_(1.0)  # modified in place: a new table
        again = layers[0](x)
    assert len(built) == 2
    for layer, y in zip(layers, outs, strict=True):
        _close(y, (x - 1.0) @ layer.dequantize().t() + layer.bias)
    _close(again, x @ layers[0].dequantize().t() + layers[0].bias)


def test_inference_4bit_blocks_nest(one_thread):
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    with inference_4bit(layer) as outer:
        with inference_4bit(layer) as inner:
            assert (outer, inner) == (1, 0)
        assert "forward" in layer.__dict__
    assert "forward" not in layer.__dict__


def test_the_kernel_weight_holds_decoded_scales_and_is_made_once_a_block(one_thread):
    """Double-quantized scales are decoded once into the kernel's weight, and inside
    `inference_4bit` the layer's forward and the C decode step read the same one."""
    layer = Linear4bit.from_linear(nn.Linear(128, 32), QuantConfig(double_quant=True))
    state = layer.quant_state
    weight = gemv.native_weight(layer.weight, state)
    scales = weight._keep[2]
    assert scales.dtype == torch.float32 and torch.equal(scales, state.block_absmax())
    assert inference.kernel_weight(layer) is not inference.kernel_weight(layer)  # made anew
    with inference_4bit(layer):
        assert inference.kernel_weight(layer) is inference.kernel_weight(layer)
        assert inference.kernel_weight(layer) is layer.forward.kernel_weight


def test_parallel_kernel_equals_serial(kernel):
    """Two threads take the parallel entry point; each row's sums are the same either way."""
    w = torch.randn(200, 256)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(1, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_4bit_inference(x, packed, state, None)
        torch.set_num_threads(2)
        two = linear_4bit_inference(x, packed, state, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 21])
def test_c_kernel_takes_every_tile_of_rows(rows):
    """Rows go through tiles of 16, 8, 4, 2 and 1 input rows; each equals decode-then-matmul."""
    w = torch.randn(40, 192)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(rows, 192)
    y = native.matmul(x, gemv.native_weight(packed, state), threads=2)
    _close(y, x @ dequantize_4bit(packed, state, torch.float32).t())


def test_c_kernel_refuses_blocks_it_cannot_read():
    assert not gemv.native_layout(quantize_4bit(torch.randn(24, 40), "nf4", 64)[1])  # spans rows
    assert gemv.native_layout(quantize_4bit(torch.randn(8, 64), "nf4", 64)[1])


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 21])
def test_dense_kernel_equals_matmul(rows):
    """Every tile of input rows (eights by pairs of W's rows, the rest alone); 71 rows of W: a
    thread's share ends on a row without its pair."""
    w = torch.randn(71, 100)  # 100: a tail after the last whole vector
    x = torch.randn(rows, 100)
    _close(native.dense_matmul(x, w, threads=2), x @ w.t())


@pytest.mark.skipif(not native.bf16_dot(), reason="the CPU has no bfloat16 dot products")
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 21])
def test_bf16_dense_kernel_is_the_bfloat16_matmul(rows):
    """A bfloat16 weight: the products of bfloat16 operands, summed in float32 (from 16 input
    rows by pairs of W's rows; 71 of them: a thread's share ends on a row without its pair)."""
    w = torch.randn(71, 100).bfloat16()  # 100: a masked tail after three whole steps of 32
    x = torch.randn(rows, 100)
    y = native.dense_matmul(x, w, threads=2)
    ref = x.bfloat16().float() @ w.float().t()
    assert (y - ref).abs().max() <= 2e-6 * ref.abs().max()
    assert (x @ w.float().t() - ref).abs().max() > 1e-4 * ref.abs().max()  # x was rounded


def test_bf16_compute_reads_a_bfloat16_copy_of_the_big_float_layer(monkeypatch):
    """In bfloat16 compute the output layer multiplies a bfloat16 copy where the CPU has
    bfloat16 dot products, its own float32 weight elsewhere; the model's weight is untouched."""
    monkeypatch.setattr(inference, "DENSE_MIN_VALUES", 64 * 32)
    seen = []
    real = native.dense_matmul
    monkeypatch.setattr(native, "dense_matmul", lambda x, w: seen.append(w.dtype) or real(x, w))
    model = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 128))  # the second one is big
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    with inference_4bit(model, torch.bfloat16):
        y = model(x)
        model(x)
    if native.library() is None:
        assert seen == []
    else:
        expected = torch.bfloat16 if native.bf16_dot() else torch.float32
        assert seen == [expected, expected]
        assert model[1].weight.dtype == torch.float32
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert "forward" not in model[1].__dict__


@pytest.mark.skipif(native.library() is None, reason="no C kernel here")
def test_the_output_layer_computes_as_the_4bit_layers_when_no_dtype_is_given(monkeypatch):
    """A model quantized to compute in bfloat16, switched without a dtype: the output layer
    follows its 4-bit layers (a bfloat16 copy where the CPU multiplies bfloat16)."""
    monkeypatch.setattr(inference, "DENSE_MIN_VALUES", 64 * 32)
    seen = []
    real = native.dense_matmul
    monkeypatch.setattr(native, "dense_matmul", lambda x, w: seen.append(w.dtype) or real(x, w))
    config = QuantConfig(compute_dtype=torch.bfloat16)
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 64), config), nn.Linear(64, 32))
    with inference_4bit(model), torch.no_grad():
        model(torch.randn(1, 64))
    assert seen == [torch.bfloat16 if native.bf16_dot() else torch.float32]


def test_inference_4bit_sends_the_big_float_layer_to_the_c_kernel(monkeypatch):
    monkeypatch.setattr(inference, "DENSE_MIN_VALUES", 64 * 32)
    calls = []
    real = native.dense_matmul
    monkeypatch.setattr(native, "dense_matmul", lambda x, w: calls.append(1) or real(x, w))
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 64)), nn.Linear(64, 32))
    x = torch.randn(1, 64)
    with torch.no_grad():
        ref = model(x)
    with inference_4bit(model):
        y = model(x)
        batch = model(torch.randn(inference.DENSE_ROWS + 1, 64))  # more rows: plain linear
    assert batch.shape == (inference.DENSE_ROWS + 1, 32)
    assert calls == ([1] if native.library() is not None else [])
    _close(y, ref)
    assert "forward" not in model[1].__dict__
