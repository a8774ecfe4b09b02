"""SwiGLU's elementwise work in C (`gated.c`) for float32 training on the CPU.

torch computes silu(gate) * up as two passes over the (tokens x intermediate) tensors, and its
gradients as four more (silu again, two products, silu's backward), each reading and writing
whole tensors. `gated.c` does the forward in one pass and both gradients in another, with
torch's formulas; only e^x is computed differently (within 2 ulp).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from slimtune.quant import native

SOURCE = Path(__file__).with_name("gated.c")
_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@cache
def library() -> ctypes.CDLL | None:
    """The SwiGLU kernels; None where the C kernels are off or cannot build."""
    signatures = {"slim_swiglu_forward": [_p, _p, _p, _i64, _int],
                  "slim_swiglu_backward": [_p, _p, _p, _p, _p, _i64, _int]}  # fmt: skip
    return native.companion(SOURCE, "gated", signatures, "the C SwiGLU")


def fits(gate: Tensor, up: Tensor) -> bool:
    """Whether the kernels take this pair: contiguous float32 CPU tensors of one shape."""
    return (
        gate.dtype == up.dtype == torch.float32
        and gate.device.type == up.device.type == "cpu"
        and gate.shape == up.shape
        and gate.is_contiguous()
        and up.is_contiguous()
        and library() is not None
    )


def product(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (no autograd)."""
    out = torch.empty_like(gate)
    library().slim_swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                  torch.get_num_threads())  # fmt: skip
    return out


def gradients(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of gate and up, given the gradient of silu(gate) * up."""
    grad = grad.contiguous().float()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    library().slim_swiglu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(),
                                   grad_gate.data_ptr(), grad_up.data_ptr(), gate.numel(),
                                   torch.get_num_threads())  # fmt: skip
    return grad_gate, grad_up


class NativeSwiGLU(torch.autograd.Function):
    """silu(gate) * up through `gated.c`, keeping only gate and up for backward."""

    product = staticmethod(product)  # the same without autograd

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return product(gate, up)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = gradients(grad, gate, up)
        return (grad_gate if ctx.needs_input_grad[0] else None,
                grad_up if ctx.needs_input_grad[1] else None)  # fmt: skip
