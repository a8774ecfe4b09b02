"""The training-time savings: sparse LoRA dropout and the lean gated MLP.

Both change how a step is computed, never what: the sparse dropout is checked against the
dense formula with the same mask, and the lean MLP against the stock forward, bit for bit.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import adapter_twins, make_tiny

from slimtune.lora import LoraConfig, inject_adapter, lora_layers
from slimtune.lora.sparse_dropout import SparseDropoutLora, drop_positions
from slimtune.models import lean_mlp
from slimtune.models.lean_mlp import use_lean_mlp


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drop_positions_are_a_bernoulli_draw(p):
    n = 200_000
    positions = drop_positions(n, p, seed=7)
    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all())  # distinct, ascending
    assert int(positions.min()) >= 0 and int(positions.max()) < n
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(positions.numel() - n * p) < 5 * sigma
    # Independent positions: drops among even indices occur at the same rate as among odd ones.
    even = int((positions % 2 == 0).sum())
    assert abs(2 * even - positions.numel()) < 5 * (positions.numel() ** 0.5)
    assert torch.equal(drop_positions(n, p, seed=7), positions)
    assert not torch.equal(drop_positions(n, p, seed=8)[:100], positions[:100])


def test_sparse_dropout_lora_is_the_dense_formula_with_its_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, requires_grad=True)
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(32, 4, requires_grad=True)
    result = torch.randn(3, 7, 32, requires_grad=True)
    torch.manual_seed(3)
    out = SparseDropoutLora.apply(result, x, A, B, 2.0, 0.3)

    # The same mask: the function draws its seed from torch's generator.
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = torch.ones(x.numel())
    keep[drop_positions(x.numel(), 0.3, seed)] = 0
    twins = [t.detach().clone().requires_grad_() for t in (result, x, A, B)]
    r2, x2, A2, B2 = twins
    expected = r2 + 2.0 * ((x2 * keep.view(x.shape) / 0.7) @ A2.t()) @ B2.t()
    # Equal up to float32 rounding: the dropped values' share is subtracted from x @ A.T.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for ours, theirs in zip((result, x, A, B), twins, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)


def _trained_pair(dropout: float, arch: str = "llama"):
    """The stock model and its twin with the lean MLP."""
    model, lean = adapter_twins(dropout, arch)
    assert use_lean_mlp(lean) == len(lean.model.layers)
    return model, lean


# llama: SiLU-gated; gemma3: GELU-tanh-gated (gelu_pytorch_tanh)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_mlp_gives_the_same_outputs_and_gradients(dropout, arch):
    stock, lean = _trained_pair(dropout, arch)
    ids = torch.randint(0, 100, (2, 16))
    losses = []
    for model in (stock, lean):
        torch.manual_seed(1)
        loss = model(ids).logits.square().mean()
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    grads = [
        {n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (stock, lean)
    ]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_lean_mlp_does_not_keep_the_product(monkeypatch):
    """silu(gate) * up is dropped after forward (backward rebuilds it), yet backward works."""
    _, lean = _trained_pair(0.1)
    products = []
    apply = lean_mlp.SwiGLU.apply

    def recording_apply(gate, up):
        out = apply(gate, up)
        products.append(weakref.ref(out))
        return out

    monkeypatch.setattr(lean_mlp.SwiGLU, "apply", recording_apply)
    loss = lean(torch.randint(0, 100, (2, 16))).logits.square().mean()
    assert len(products) == len(lean.model.layers)
    assert all(ref() is None for ref in products)
    loss.backward()
    assert all(p.grad is not None for n, p in lean.named_parameters() if "lora_A" in n)


def test_lean_mlp_leaves_gradient_checkpointing_alone():
    stock, lean = _trained_pair(0.0)
    for model in (stock, lean):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 100, (2, 16))
    stock(ids).logits.sum().backward()
    lean(ids).logits.sum().backward()
    for (name, a), (_, b) in zip(stock.named_parameters(), lean.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_lean_mlp_takes_only_activations_it_computes_exactly():
    from transformers.activations import ACT2FN, GELUTanh, NewGELUActivation

    mlp = make_tiny("gemma3").model.layers[0].mlp
    assert lean_mlp.gated_function(mlp) is lean_mlp.GeGLUTanh
    mlp.act_fn = ACT2FN["gelu"]
    assert lean_mlp.gated_function(mlp) is lean_mlp.GeGLU
    mlp.act_fn = torch.nn.SiLU()
    assert lean_mlp.gated_function(mlp) is lean_mlp.SwiGLU
    # Python formulas of GELU round differently from torch's kernel: left to the stock forward.
    for act in (GELUTanh(use_gelu_tanh_python=True), NewGELUActivation(), torch.nn.ReLU()):
        mlp.act_fn = act
        assert lean_mlp.gated_function(mlp) is None


class _GivenMask(torch.nn.Module):
    """Inverted dropout with a mask handed in, in place of PEFT's nn.Dropout."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep / (1 - self.p)


def _peft_layer(p: float):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    config = PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"])
    layer = get_peft_model(net, config).base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 would hide A's gradient
    return layer.train()


def _sparse(layer, x, p):
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return SparseDropoutLora.apply(layer.base_layer(x), x, A, B, layer.scaling["default"], p)


def test_sparse_dropout_equals_peft_given_the_same_mask():
    p = 0.3
    layer = _peft_layer(p)
    x = torch.randn(3, 7, 64, requires_grad=True)
    torch.manual_seed(5)
    ours = _sparse(layer, x, p)
    torch.manual_seed(5)  # the positions SparseDropoutLora drew
    keep = torch.ones(x.numel())
    keep[drop_positions(x.numel(), p, int(torch.randint(0, 2**62, (), dtype=torch.int64)))] = 0
    grad = torch.randn_like(ours)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    ours_grads = torch.autograd.grad(ours, params, grad)
    layer.lora_dropout["default"] = _GivenMask(keep.view(x.shape), p)
    theirs = layer(x)
    theirs_grads = torch.autograd.grad(theirs, params, grad)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sparse_dropout_has_peft_dropouts_expectation_and_drop_counts():
    p, draws = 0.2, 400
    layer = _peft_layer(p)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = layer.eval()(x)  # E[dropout(x)] = x: the layer without dropout
        layer.train()
        ours = torch.stack([_sparse(layer, x, p) for _ in range(draws)])
        theirs = torch.stack([layer(x) for _ in range(draws)])
    # Both means approach the dropout-free output; their gap is within 5 standard errors.
    for samples in (ours, theirs):
        error = samples.std(0) / draws**0.5
        assert ((samples.mean(0) - expected).abs() <= 5 * error + 1e-6).float().mean() > 0.99
    # Drop counts: Binomial(n, p) for slimtune's positions and for torch's nn.Dropout alike.
    n = 100_000
    sigma = (n * p * (1 - p)) ** 0.5
    ours_count = drop_positions(n, p, seed=11).numel()
    theirs_count = int((torch.nn.functional.dropout(torch.ones(n), p) == 0).sum())
    assert abs(ours_count - n * p) < 5 * sigma and abs(theirs_count - n * p) < 5 * sigma


@pytest.mark.parametrize("on", [True, False], ids=["default", "switched-off"])
def test_train_applies_both_as_its_config_says(tmp_path, on):
    from helpers import make_tiny

    from slimtune.train import TrainConfig, TrainData, train

    model = inject_adapter(make_tiny("llama"), LoraConfig(r=4, alpha=8, dropout=0.1))
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}] * 4
    settings = dict(lean_mlp=on, sparse_dropout=on) if not on else {}  # True is the default
    config = TrainConfig(output=str(tmp_path), method="lora", max_steps=1, batch_size=2, **settings)
    trained = train(config, model=model, data=TrainData(train=rows), progress=False).model
    mlps = [block.mlp for block in trained.model.layers]
    assert [hasattr(mlp, "_lean_gated") for mlp in mlps] == [on] * len(mlps)
    if on:  # SwiGLU in C where it builds
        assert all(mlp._lean_native for mlp in mlps)
    layers = [layer for _, layer in lora_layers(trained)]
    assert layers and all(layer.sparse_dropout is on for layer in layers)
