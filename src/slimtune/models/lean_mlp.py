"""A leaner training forward for gated SiLU MLPs (LLaMA, Mistral, Qwen2, SmolLM2 ...).

    down(silu(gate(x)) * up(x))

Autograd keeps four (tokens x intermediate) tensors per layer for the backward pass: gate(x)
for SiLU, silu(gate(x)) and up(x) for the product, and the product itself as the input of
`down` (its LoRA adapter needs it). Only gate(x) and up(x) are needed: the rest is one cheap
elementwise pass away. Here SwiGLU keeps just those two, and the product that `down` saves is
recomputed from them when backward asks for it. Same values, half the MLP's activation memory
(on SmolLM2 4 x 256 tokens: 360 of 1,264 MB of saved activations).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only its two inputs for backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_up = grad * nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def _lean_forward(self: nn.Module, x: Tensor) -> Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (torch.is_grad_enabled() and self.training):
        return self.down_proj(nn.functional.silu(gate) * up)
    product = SwiGLU.apply(gate, up)
    if _outer_saving_hooks():
        return self.down_proj(product)  # checkpointing (or a caller) already manages saving

    # The hooks live as long as what they pack: they must not hold `product` itself.
    address, numel = product.data_ptr(), product.numel()

    def pack(tensor: Tensor):
        if tensor.data_ptr() == address and tensor.numel() == numel:
            return tensor.shape  # a recipe, not the tensor: rebuilt from gate and up
        return tensor

    def unpack(packed):
        if isinstance(packed, torch.Size):
            return (nn.functional.silu(gate) * up).view(packed)
        return packed

    with saved_tensors_hooks(pack, unpack):
        return self.down_proj(product)


def _outer_saving_hooks() -> bool:
    """Whether saved-tensor hooks are already active (gradient checkpointing installs some): ours
    must not nest inside them. torch keeps this query private; without it, assume they are."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if not all(hasattr(module, name) for name in parts):
        return False
    act = module.act_fn
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_lean_mlp(model: nn.Module) -> int:
    """Give every gated SiLU MLP of `model` the lean training forward; returns how many.
    Outputs and gradients are unchanged; idempotent."""
    count = 0
    for module in model.modules():
        if _is_gated_silu_mlp(module):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
