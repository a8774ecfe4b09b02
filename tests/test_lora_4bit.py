"""LoRA over a 4-bit base: PEFT over bitsandbytes' Linear4bit (on CPU) is the oracle, holding the
very same packed weights as our slimtune Linear4bit."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import peft
import pytest
import torch
from helpers import (
    PEFT_PREFIX,
    bnb_quantize,
    copy_peft_weights,
    ids,
    lora_grads,
    make_tiny_llama,
    peft_config,
)
from oracles import assert_close_to_bnb
from torch import nn

from slimtune.lora import (
    LoraConfig,
    count_parameters,
    delete_adapter,
    find_targets,
    inject_adapter,
    load_adapter,
    merge_adapter,
    unmerge_adapter,
)
from slimtune.quant import Linear4bit, QuantConfig, dequantize_4bit, load_quantized_state_dict

# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def quantized_twins(config: LoraConfig):
    """(float base, PEFT over bitsandbytes, slimtune over slimtune Linear4bit), equal weights."""
    base = make_tiny_llama()
    theirs_base = bnb_quantize(copy.deepcopy(base))
    ours_base = load_quantized_state_dict(copy.deepcopy(base), theirs_base.state_dict())
    assert isinstance(ours_base.model.layers[0].mlp.up_proj, Linear4bit)
    theirs = peft.get_peft_model(theirs_base, peft_config(config, init_lora_weights=False))
    ours = inject_adapter(ours_base, config)
    copy_peft_weights(theirs, ours)
    return base, theirs, ours


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, alpha=8),
        LoraConfig(r=4, alpha=8, use_rslora=True, rank_pattern={"o_proj": 2}),
        LoraConfig(r=4, alpha=8, use_dora=True),
    ],
    ids=["lora", "rslora", "dora"],
)
def test_4bit_outputs_and_gradients_match_peft_over_bitsandbytes(config):
    _, theirs, ours = quantized_twins(config)
    theirs.train(), ours.train()
    x = ids()
    a, b = theirs(x).logits, ours(x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    theirs_grads, ours_grads = lora_grads(theirs, PEFT_PREFIX), lora_grads(ours)
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_4bit_weights_count_as_their_logical_size():
    base, _, ours = quantized_twins(LoraConfig(r=4))
    lora = sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n)
    assert count_parameters(ours) == (lora, sum(p.numel() for p in base.parameters()) + lora)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_4bit_merge_in_float_and_unmerge_restores_the_bytes(dora):
    _, _, ours = quantized_twins(LoraConfig(r=4, alpha=8, use_dora=dora))
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    x = ids()
    adapted = ours(x).logits
    report = merge_adapter(ours, "default")
    assert report.requantized == 0 and report.layers == 14
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer) is nn.Linear
    torch.testing.assert_close(ours(x).logits, adapted, rtol=1e-4, atol=1e-4)
    unmerge_adapter(ours, "default")
    after = {k: v for k, v in ours.state_dict().items() if "base_layer" in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_4bit_requantized_merge_matches_peft_bytes_and_reports_the_error():
    _, theirs, ours = quantized_twins(LoraConfig(r=4, alpha=8))
    x = ids()
    adapted = ours(x).logits
    report = merge_adapter(ours, "default", requantize=True)
    theirs.merge_adapter()  # PEFT re-quantizes bitsandbytes layers when merging
    assert report.requantized == report.layers == 14
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer.base_layer, Linear4bit)
    their_layer = theirs.base_model.model.model.layers[1].mlp.down_proj.base_layer
    assert torch.equal(layer.base_layer.weight, their_layer.weight.data)  # same 4-bit codes
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    # The reported error is the one re-quantization adds to the float merge.
    errors = norms = 0.0
    for name in find_targets(ours, LoraConfig(r=4)):
        module = ours.get_submodule(name)
        original, _ = module._merge_state["default"]
        merged = original.dequantize() + module.delta_weight("default")
        errors += (module.base_layer.dequantize() - merged).square().sum().item()
        norms += merged.square().sum().item()
    assert report.requant_rel_error == pytest.approx((errors / norms) ** 0.5, rel=1e-4)
    assert 0.01 < report.requant_rel_error < 0.2  # NF4 on random weights: a few percent
    assert not torch.allclose(ours(x).logits, adapted, atol=1e-4)


def test_loftq_cancels_quantization_error_and_quantizes_the_base():
    base = make_tiny_llama()
    quant = QuantConfig()
    errors = {}
    for iters in (1, 3):
        model = inject_adapter(
            copy.deepcopy(base), LoraConfig(r=8, init="loftq", loftq_iters=iters, loftq_quant=quant)
        )
        layer = model.model.layers[0].mlp.down_proj
        assert isinstance(layer.base_layer, Linear4bit)
        W = base.model.layers[0].mlp.down_proj.weight
        approx = layer.base_layer.dequantize() + layer.delta_weight("default")
        errors[iters] = (W - approx).norm().item()
    plain = Linear4bit.from_linear(base.model.layers[0].mlp.down_proj, quant)
    zero_b = (W - plain.dequantize()).norm().item()  # Q(W) with B = 0: plain QLoRA
    assert errors[1] < 0.95 * zero_b
    assert errors[3] <= errors[1] * 1.001


def test_dequantize_matches_bitsandbytes_in_the_oracle_setup():
    """Guard for the oracle itself: both sides decode the same float weight."""
    base = make_tiny_llama()
    theirs = bnb_quantize(copy.deepcopy(base))
    ours = load_quantized_state_dict(copy.deepcopy(base), theirs.state_dict())
    bl = theirs.model.layers[0].self_attn.v_proj
    ol = ours.model.layers[0].self_attn.v_proj
    expected = bnb.functional.dequantize_4bit(bl.weight.data, bl.weight.quant_state)
    assert torch.equal(dequantize_4bit(ol.weight, ol.quant_state, torch.float32), expected)


@pytest.mark.slow
def test_loftq_reduces_the_error_on_real_smollm2_layers(smollm2):
    """The figures in docs/lora.md come from benchmarks/lora_loftq.py; this checks their sign."""
    from slimtune.lora.init import loftq

    model, _ = smollm2
    quant = QuantConfig()
    for module in (model.model.layers[0].self_attn.k_proj, model.model.layers[29].mlp.up_proj):
        W = module.weight.detach().float()  # read only: the fixture is shared
        plain = Linear4bit.from_linear(module, quant).dequantize()
        A, B, W_q = loftq(W, 16, 1.0, quant, iters=2)
        q = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            q.weight.copy_(W_q)
        approx = Linear4bit.from_linear(q, quant).dequantize() + B @ A
        assert (W - approx).norm() < 0.95 * (W - plain).norm()


def test_a_qlora_adapter_saved_by_peft_loads_on_our_4bit_base(tmp_path):
    _, theirs, ours = quantized_twins(LoraConfig(r=4, alpha=8, use_dora=True))
    theirs.eval().save_pretrained(tmp_path)
    delete_adapter(ours, "default")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Linear4bit)  # unwrapped again
    load_adapter(ours, tmp_path)
    x = ids()
    with torch.no_grad():
        ours_logits = ours.eval()(x).logits
    assert_close_to_bnb(ours_logits, theirs, lambda: theirs(x).logits, atol=1e-5, rtol=1e-5)
