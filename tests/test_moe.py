"""LoRA on the experts of a mixture of experts against PEFT's `target_parameters` (the oracle):
files both ways, outputs and gradients, 4-bit experts, per-sample adapters, merging."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import ids, make_tiny

from slimtune.errors import SlimtuneError
from slimtune.lora import (
    LoraConfig,
    inject_adapter,
    load_adapter,
    merge_adapter,
    per_sample_adapters,
    save_adapter,
    set_active_adapters,
    stacked,
)
from slimtune.models.experts import ExpertList, fuse_experts, unfuse_experts
from slimtune.quant import Linear4bit, QuantConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = ["mixtral", "qwen2_moe"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _peft(base, seed=0, **extra):
    """PEFT's adapter on attention and the fused experts, every weight random."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS,
        init_lora_weights=False, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    return peft.get_peft_model(copy.deepcopy(base), config)


@pytest.mark.parametrize("arch", MOE)
def test_unfused_experts_compute_what_the_fused_ones_do(arch):
    model = make_tiny(arch)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        assert unfuse_experts(model) == 2
        assert all(isinstance(model.get_submodule(f"model.layers.{i}.mlp.experts"), ExpertList)
                   for i in range(2))  # fmt: skip
        # transformers' default grouped matmul rounds differently from its eager loop
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        assert fuse_experts(model) == 2
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", MOE)
def test_we_load_what_peft_saves_and_gradients_match(arch, tmp_path):
    base = make_tiny(arch)
    theirs = _peft(base)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    set_active_adapters(ours, ["default"])  # trainable
    theirs.train(), ours.train()
    x = ids()
    a, b = theirs(x).logits, ours(x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    # PEFT's fused gradients, rebuilt from ours per expert.
    for name, module in theirs.named_modules():
        if not isinstance(module, peft.tuners.lora.ParamWrapper):
            continue
        owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
        experts = ours.get_submodule(f"{owner}.{module.parameter_name}")
        grad_a = torch.cat([layer.lora_A["default"].weight.grad for layer in experts])
        grad_b = torch.stack([layer.lora_B["default"].weight.grad for layer in experts], -1)
        torch.testing.assert_close(grad_a, module.lora_A["default"].weight.grad, rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
        torch.testing.assert_close(grad_b.flatten(1), module.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("arch", MOE)
def test_peft_loads_what_we_save_on_4bit_experts(arch, tmp_path):
    """QLoRA on a mixture of experts: experts in 4 bits, LoRA on them and on attention; PEFT,
    given the same decoded base, computes what slimtune computes from our file."""
    base = make_tiny(arch)
    config = LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS
    )
    quantized = quantize_model(_unfused(copy.deepcopy(base)), QuantConfig())
    assert isinstance(quantized.model.layers[0].mlp.experts.down_proj[0], Linear4bit)
    ours = inject_adapter(quantized, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_decoded(copy.deepcopy(ours), base), tmp_path).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x).logits, theirs(x).logits, rtol=1e-4, atol=1e-4)


def _unfused(model):
    unfuse_experts(model)
    return model


def _decoded(quantized, reference):
    """A float transformers model holding the 4-bit model's decoded weights."""
    from slimtune.export.merge import dequantize_layers, unwrap_lora_layers

    unwrap_lora_layers(quantized)
    dequantize_layers(quantized)
    fuse_experts(quantized)
    model = copy.deepcopy(reference)
    model.load_state_dict(quantized.state_dict())
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_per_sample_adapters_reach_the_experts(mode, monkeypatch):
    """Rows of one batch with different adapters (the serving engine's batches) equal each row
    alone, experts included; in eval mode each adapter runs on its slice of the rows (ordered
    by adapter, as the engine's prefills are), the experts on their tokens' groups."""
    slices = []
    real = stacked.add_by_slices
    monkeypatch.setattr(stacked, "add_by_slices", lambda *a: slices.append(1) or real(*a))
    base = make_tiny("mixtral")
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    model = inject_adapter(copy.deepcopy(base), config, "a")
    inject_adapter(model, config, "b")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.train(mode == "train")
    x = ids(batch=3)
    names = ["a", None, "b"]
    with torch.no_grad(), per_sample_adapters(model, names):
        together = model(x).logits
    alone = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                alone.append(base(x[i : i + 1]).logits)
            else:
                set_active_adapters(model, [name])
                alone.append(model(x[i : i + 1]).logits)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], alone[2])  # the adapters differ, experts included
    assert bool(slices) == (mode == "eval")


def test_merge_then_fuse_gives_peft_merged_model(tmp_path):
    base = make_tiny("qwen2_moe")
    theirs = _peft(base)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    merge_adapter(ours, "default")
    from slimtune.export.merge import unwrap_lora_layers

    unwrap_lora_layers(ours)
    fuse_experts(ours)
    merged = theirs.merge_and_unload()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, merged(x).logits, rtol=1e-4, atol=1e-4)


def test_dora_on_experts_and_4bit_expert_folders_are_refused(tmp_path):
    config = LoraConfig(r=4, use_dora=True, target_modules=["q_proj"], target_parameters=EXPERTS)
    with pytest.raises(SlimtuneError, match="DoRA does not apply to the experts"):
        inject_adapter(make_tiny("mixtral"), config)
    from slimtune.models import save_quantized_model

    model = quantize_model(_unfused(make_tiny("mixtral")), QuantConfig())
    with pytest.raises(SlimtuneError, match="4-bit experts .* cannot be written"):
        save_quantized_model(model, None, tmp_path / "out")
