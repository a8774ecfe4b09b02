"""SwiGLU in C (slimtune.models.swiglu): torch's formulas in one pass forward and one backward.

Checked against float64 (what both C and torch approximate) and against torch's float32
kernels, then inside the lean MLP of a tiny model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_twins

from slimtune.models import swiglu
from slimtune.models.lean_mlp import use_lean_mlp

pytestmark = pytest.mark.skipif(swiglu.library() is None, reason="no C compiler")


def _reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """silu(gate) * up and its gradients in float64."""
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    out = torch.nn.functional.silu(g) * u
    out.backward(grad.double())
    return out.detach(), g.grad, u.grad


# sizes around the kernel's tasks (8192 values) and vector widths; 1 and 2 threads
@pytest.mark.parametrize("numel", [1, 17, 8191, 8193, 3 * 8192 + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_values_and_gradients_match_float64_as_torch_does(numel, threads):
    torch.manual_seed(numel)
    gate, up, grad = torch.randn(3, numel) * 4, torch.randn(3, numel), torch.randn(3, numel)
    expected = _reference(gate, up, grad)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = (swiglu.product(gate, up), *swiglu.gradients(grad, gate, up))
    finally:
        torch.set_num_threads(previous)
    torch_out = torch.nn.functional.silu(gate) * up
    torch_grads = (
        torch.ops.aten.silu_backward(grad * up, gate),
        grad * torch.nn.functional.silu(gate),
    )
    for mine, theirs, truth in zip(ours, (torch_out, *torch_grads), expected, strict=True):
        assert mine.dtype == torch.float32 and mine.shape == gate.shape
        # Within a few float32 roundings of the exact value, as torch's own kernels are.
        scale = truth.abs().max()
        assert (mine.double() - truth).abs().max() <= 4e-7 * scale
        assert (theirs.double() - truth).abs().max() <= 4e-7 * scale
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6 * float(scale))


def test_large_gates_saturate_like_torch():
    gate = torch.tensor([-200.0, -90.0, -30.0, -1.0, 0.0, 1.0, 30.0, 90.0, 200.0])
    up, grad = torch.full_like(gate, 2.0), torch.full_like(gate, 3.0)
    out = swiglu.product(gate, up)
    grad_gate, grad_up = swiglu.gradients(grad, gate, up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(grad_up, grad * torch.nn.functional.silu(gate), rtol=1e-6,
                               atol=1e-30)  # fmt: skip
    torch.testing.assert_close(grad_gate, torch.ops.aten.silu_backward(grad * up, gate),
                               rtol=1e-6, atol=1e-30)  # fmt: skip
    assert torch.isfinite(torch.stack([out, grad_gate, grad_up])).all()


def test_only_contiguous_float32_cpu_pairs_fit():
    a = torch.randn(4, 6)
    assert swiglu.fits(a, a.clone())
    assert not swiglu.fits(a.bfloat16(), a.bfloat16())
    assert not swiglu.fits(a.t(), a.t().clone())
    assert not swiglu.fits(a, a[:, :3])


def _pair(dropout: float):
    """Twins with the lean MLP: torch's SwiGLU, and the C one."""
    torch_mlp, native = adapter_twins(dropout)
    use_lean_mlp(torch_mlp)
    use_lean_mlp(native, native=True)
    return torch_mlp, native


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_lean_mlp_in_c_keeps_loss_and_gradients(monkeypatch, dropout):
    torch_mlp, native = _pair(dropout)
    calls = {"product": 0, "gradients": 0}
    for name in calls:
        original = getattr(swiglu, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(swiglu, name, counted)
    monkeypatch.setattr(swiglu.NativeSwiGLU, "product", staticmethod(swiglu.product))
    ids = torch.randint(0, 100, (2, 16))
    losses = []
    for model in (torch_mlp, native):
        torch.manual_seed(1)
        loss = model(ids).logits.square().mean()
        loss.backward()
        losses.append(loss)
    layers = len(native.model.layers)
    # forward, and the product rebuilt for down_proj's backward; one backward pass each
    assert calls == {"product": 2 * layers, "gradients": layers}
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None}
             for m in (torch_mlp, native)]  # fmt: skip
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        # e^x within 2 ulp moves gradients of order 1 by a few 1e-6 through the layers
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_eval_and_bf16_calls_stay_correct():
    torch_mlp, native = _pair(0.0)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(native.eval()(ids).logits, torch_mlp.eval()(ids).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    # bfloat16 gate and up are torch's: the same bits as without the kernel.
    mlp, mlp_torch = native.model.layers[0].mlp, torch_mlp.model.layers[0].mlp
    x = torch.randn(2, 5, mlp.gate_proj.in_features, dtype=torch.bfloat16)
    for m in (mlp, mlp_torch):
        m.to(torch.bfloat16).train()
    assert torch.equal(mlp(x), mlp_torch(x))
