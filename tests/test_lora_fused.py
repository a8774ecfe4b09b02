"""Shared-input LoRA (one A product for q/k/v and for gate/up): the same outputs and gradients
as the layers one by one, dropout included, and the same adapter files."""

import copy

import pytest
import torch
from conftest import make_tiny_llama

from slimtune.lora import (
    LoraConfig,
    LoraLinear,
    fuse_shared_inputs,
    inject_adapter,
    save_adapter,
    set_sparse_dropout,
)
from slimtune.lora import fused as fused_module
from slimtune.lora.fused import down_products
from slimtune.lora.sparse_dropout import _new_seed, drop_positions

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_llama(dropout: float = 0.1, r: int = 8):
    model = make_tiny_llama(initializer_range=0.3)
    torch.manual_seed(1)
    config = LoraConfig(r=r, alpha=16, dropout=dropout, target_modules="all-linear")
    inject_adapter(model, config)
    with torch.no_grad():  # B = 0 at init would hide every A and input gradient
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.lora_B["default"].weight.normal_(std=0.1)
    return model


def output_and_grads(model, seed: int, train: bool = True):
    model.train(train)
    ids = torch.randint(0, 128, (3, 19), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-4)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


def count_products(monkeypatch) -> list:
    calls = []
    real = fused_module.down_products

    def counting(x, weights, ps, sparse=True):
        calls.append(len(weights))
        return real(x, weights, ps, sparse)

    monkeypatch.setattr(fused_module, "down_products", counting)
    return calls


@pytest.mark.parametrize("train", [True, False])
def test_fused_equals_the_layers_one_by_one(train, monkeypatch):
    plain = lora_llama()
    fused = copy.deepcopy(plain)
    assert fuse_shared_inputs(fused) == 4  # q/k/v and gate/up in each of the 2 layers
    calls = count_products(monkeypatch)
    # The same seed draws the same dropout positions: each adapter keeps its own.
    got = output_and_grads(fused, seed=5, train=train)
    assert calls == [3, 2, 3, 2]  # one stacked product per group and forward pass
    assert_same(got, output_and_grads(plain, seed=5, train=train))


def test_dropout_differs_between_adapters_and_seeds():
    fused = lora_llama(dropout=0.3)
    fuse_shared_inputs(fused)
    out_a, _ = output_and_grads(fused, seed=5)
    out_b, _ = output_and_grads(fused, seed=6)
    out_c, _ = output_and_grads(fused, seed=5)
    assert not torch.allclose(out_a, out_b)
    torch.testing.assert_close(out_a, out_c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_product_with_sparse_dropout_equals_dropped_copies(dtype):
    """The in-place corrections (forward, gradient of A, gradient of x) against explicit
    dropped copies at the very positions drawn, for adapters of different ranks and rates."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 96).to(dtype).requires_grad_()
    weights = [torch.randn(r, 96, requires_grad=True) for r in (4, 8, 2)]
    ps = [0.0, 0.25, 0.5]
    torch.manual_seed(11)
    low = down_products(x, weights, ps)
    grad = torch.randn_like(low)
    low.backward(grad)

    torch.manual_seed(11)
    x_ref = x.detach().float().requires_grad_()
    refs = [w.detach().clone().requires_grad_() for w in weights]
    parts = []
    for a, p in zip(refs, ps, strict=True):
        h = x_ref.reshape(-1, 96)
        if p > 0:
            positions = drop_positions(h.numel(), p, _new_seed())
            keep = torch.ones(h.numel()).index_fill_(0, positions, 0.0).view(h.shape)
            h = h * keep / (1 - p)
        parts.append(h @ a.t())
    expected = torch.cat(parts, 1)
    expected.backward(grad)
    torch.testing.assert_close(low, expected, rtol=1e-5, atol=1e-5)
    for w, ref in zip(weights, refs, strict=True):
        torch.testing.assert_close(w.grad, ref.grad, rtol=1e-4, atol=1e-4)
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else {}
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tolerance)


def test_members_called_with_other_inputs_or_new_weights_recompute():
    plain = lora_llama(dropout=0.0)
    fused = copy.deepcopy(plain)
    fuse_shared_inputs(fused)
    attn, attn_ref = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn.q_proj(x), attn_ref.q_proj(x))
        torch.testing.assert_close(attn.k_proj(other), attn_ref.k_proj(other))  # not x's columns
        attn.v_proj.lora_A["default"].weight.mul_(2)  # an optimizer step in between
        attn_ref.v_proj.lora_A["default"].weight.mul_(2)
        torch.testing.assert_close(attn.v_proj(x), attn_ref.v_proj(x))
        x.add_(1)  # modified in place: its pending columns are stale
        torch.testing.assert_close(attn.k_proj(x), attn_ref.k_proj(x))


def test_saved_adapter_is_unchanged_and_copies_are_independent(tmp_path):
    plain = lora_llama()
    fused = copy.deepcopy(plain)
    fuse_shared_inputs(fused)
    output_and_grads(fused, seed=1)
    save_adapter(plain, tmp_path / "plain")
    save_adapter(fused, tmp_path / "fused")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("q_proj.lora_A.weight" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key])
    clone = copy.deepcopy(fused)
    q = clone.model.layers[0].self_attn.q_proj
    assert q.shared is not fused.model.layers[0].self_attn.q_proj.shared
    assert all(m in list(clone.modules()) for m in q.shared.members)
    assert_same(output_and_grads(clone, seed=2), output_and_grads(fused, seed=2))


def test_dense_fallback_gives_each_adapter_its_own_mask(monkeypatch):
    # Where the in-place loops cannot run (a GPU, no numba), each adapter with dropout gets its
    # own dropped copy, its mask drawn by nn.functional.dropout as nn.Dropout draws it.
    monkeypatch.setattr(fused_module, "_in_place", lambda x2d, dtype: False)
    x = torch.randn(6, 32)
    weights = [torch.randn(4, 32), torch.randn(4, 32)]
    torch.manual_seed(3)
    low = down_products(x, weights, [0.5, 0.5])
    torch.manual_seed(3)
    expected = [torch.nn.functional.dropout(x, 0.5) @ a.t() for a in weights]
    torch.testing.assert_close(low, torch.cat(expected, 1))
    assert fused_module.fusable(lora_llama().model.layers[0].self_attn.q_proj)
    exact = lora_llama()
    set_sparse_dropout(exact, False)  # PEFT-exact masks: layer by layer
    assert not fused_module.fusable(exact.model.layers[0].self_attn.q_proj.train())


def test_fused_under_gradient_checkpointing():
    plain = lora_llama()
    fused = copy.deepcopy(plain)
    fuse_shared_inputs(fused)
    for model in (plain, fused):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(output_and_grads(fused, seed=8), output_and_grads(plain, seed=8))
