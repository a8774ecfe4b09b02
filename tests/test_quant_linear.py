"""Linear4bit against bitsandbytes' Linear4bit: same bytes, same forward, same input gradient."""

from __future__ import annotations

import copy
import json

import bitsandbytes as bnb  # a required oracle: missing, the suite fails
import pytest
import torch
from torch import nn

from slimtune.quant import Linear4bit, QuantConfig

# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(quant_type, double_quant, bias=True, in_features=256, out_features=96):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    ref = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")  # bitsandbytes quantizes on the move to a device
    ours = Linear4bit.from_linear(linear, QuantConfig(quant_type, 64, double_quant))
    return linear, ref, ours


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_bitsandbytes_layout(quant_type, double_quant):
    _, ref, ours = _pair(quant_type, double_quant)
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype, key
        assert torch.equal(mine[key], theirs[key]), key
    meta = json.loads(bytes(mine[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert meta["shape"] == [96, 256] and meta["blocksize"] == 64


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_match_bitsandbytes(quant_type, double_quant, bias):
    _, ref, ours = _pair(quant_type, double_quant, bias)
    x = torch.randn(2, 7, 256)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_forward_is_the_linear_with_the_dequantized_weight():
    linear, _, ours = _pair("nf4", True)
    x = torch.randn(5, 256)
    expected = nn.functional.linear(x, ours.dequantize(), linear.bias)
    torch.testing.assert_close(ours(x), expected)
    # and 4 bits stay close to the float layer
    assert (ours(x) - linear(x)).abs().mean() < 0.1 * linear(x).abs().mean()


def test_never_a_weight_grad_nor_a_saved_float_weight():
    _, _, ours = _pair("nf4", True)
    assert [name for name, _ in ours.named_parameters()] == ["bias"]
    assert not ours.bias.requires_grad
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ours(x)
    # Nothing of the weight's size is kept for backward: backward decodes it again.
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 96 * 256]
    y.sum().backward()
    assert x.grad is not None and ours.weight.grad is None
    assert ours.weight.dtype == torch.uint8


def test_trainable_bias_gets_its_grad():
    linear, _, ours = _pair("nf4", False)
    ours.bias.requires_grad_(True)
    x = torch.randn(3, 4, 256)
    ours(x).pow(2).sum().backward()
    w = ours.dequantize()
    ref_bias = linear.bias.detach().clone().requires_grad_()
    nn.functional.linear(x, w, ref_bias).pow(2).sum().backward()
    torch.testing.assert_close(ours.bias.grad, ref_bias.grad)


def test_moving_and_casting_keep_the_format():
    _, _, ours = _pair("nf4", False)
    absmax = ours.absmax.clone()
    ours = ours.to(torch.bfloat16)
    assert ours.absmax.dtype == torch.float32 and torch.equal(ours.absmax, absmax)
    assert ours.bias.dtype == torch.bfloat16
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert ours(x).dtype == torch.bfloat16  # computed in float32, returned in the input dtype
    clone = copy.deepcopy(ours)
    assert torch.equal(clone(x), ours(x))


def test_bf16_compute_dtype():
    linear, _, _ = _pair("nf4", True)
    layer = Linear4bit.from_linear(linear, QuantConfig(compute_dtype=torch.bfloat16))
    x = torch.randn(3, 256)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = nn.functional.linear(
        x.bfloat16(), layer.dequantize(torch.bfloat16), linear.bias.bfloat16()
    )
    torch.testing.assert_close(y, expected.float())


def test_load_state_dict_into_an_empty_layer():
    _, ref, ours = _pair("fp4", True)
    empty = Linear4bit(256, 96, bias=True)  # default config: nf4, different state sizes
    empty.load_state_dict(ref.state_dict())
    assert empty.quant_type == "fp4" and empty.double_quant
    x = torch.randn(3, 256)
    assert torch.equal(empty(x), ours(x))
    wrong = Linear4bit(128, 96)
    with pytest.raises(RuntimeError, match="shape"):
        wrong.load_state_dict(ref.state_dict())


def test_gpt2_conv1d_is_quantized_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 256)  # nf=out, nx=in; weight is (in, out)
    layer = Linear4bit.from_linear(conv, QuantConfig(double_quant=False))
    assert (layer.in_features, layer.out_features) == (256, 96)
    x = torch.randn(2, 256)
    assert (layer(x) - conv(x)).abs().mean() < 0.1 * conv(x).abs().mean()


@pytest.mark.parametrize("bias", [True, False])
def test_large_layer_decoded_in_bands_matches_bitsandbytes(bias, monkeypatch):
    # Forward in row bands (128 + 64 rows), input grad in column bands (320 + 192 columns).
    from slimtune.quant import matmul

    monkeypatch.setattr(matmul, "BAND_VALUES", 1 << 16)
    _, ref, ours = _pair("nf4", True, bias, in_features=512, out_features=192)
    assert matmul._banded(ours.weight, ours.quant_state)
    x = torch.randn(2, 3, 512)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_stored_as_parameters_the_layer_is_the_same(double_quant):
    """For FSDP, which shards parameters: the same tensors as frozen parameters, the same
    forward and state dict, and a dtype cast still leaves the format alone."""
    _, _, ours = _pair("nf4", double_quant)
    x = torch.randn(3, 256)
    expected, state = ours(x), ours.state_dict()
    ours.store_as_parameters()
    names = {"weight", "absmax", "nested_absmax"} if double_quant else {"weight", "absmax"}
    assert {n for n, _ in ours.named_parameters()} == names | {"bias"}
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n != "bias")
    assert torch.equal(ours(x), expected)
    assert ours.state_dict().keys() == state.keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
    ours.to(torch.bfloat16)
    assert ours.weight.dtype == torch.uint8 and torch.equal(ours.absmax, state["weight.absmax"])
    if double_quant:
        assert ours.nested_absmax.dtype == torch.float32
