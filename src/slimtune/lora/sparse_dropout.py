"""The adapter branch with dropout, result + scaling * B(A(dropout(x))), as one autograd function.

nn.Dropout draws a random number for every input value (7 ns each on our CPU: a sixth of a
QLoRA training step for SmolLM2) and autograd keeps both the mask and a dropped copy of the input
for the backward pass (the largest share of the activations). Here:

- the dropped positions are drawn as gaps between drops (Geometric(p)), which is the same i.i.d.
  Bernoulli(p) process but needs ~p x numel draws instead of numel;
- nothing wide is stored: the input `x` is saved by reference (the base layer and sibling
  adapters often share it), with the drop positions (int64, p x 8 bytes per value instead of
  the 5 bytes of mask and copy), and 1 / (1 - p) scales the narrow (tokens x r) side instead of
  the wide input.

The seed of each draw comes from torch's default generator, so `torch.manual_seed` and a saved
RNG state reproduce a run exactly, as with nn.Dropout (the masks themselves differ from it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def drop_positions(numel: int, p: float, seed: int) -> Tensor:
    """Flat indices (int64, ascending) of the values to drop: each index with probability p."""
    rng = np.random.Generator(np.random.SFC64(seed))
    mean = numel * p
    chunk = int(mean + 8 * math.sqrt(mean) + 16)  # one draw covers numel but for ~1e-15 odds
    found, last = [], -1
    while last < numel - 1:
        ends = np.cumsum(rng.geometric(p, chunk)) + last  # geometric gaps are >= 1
        found.append(ends)
        last = int(ends[-1])
    positions = np.concatenate(found)
    return torch.from_numpy(positions[: np.searchsorted(positions, numel)])


def _new_seed() -> int:
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _dropped(x: Tensor, positions: Tensor) -> Tensor:
    """A copy of x (flattened to 2-D) with the values at `positions` set to zero."""
    out = x.reshape(-1, x.shape[-1]).clone()
    out.view(-1).index_fill_(0, positions, 0.0)
    return out


class SparseDropoutLora(torch.autograd.Function):
    """result + scaling * B(A(dropout_p(x))) for float tensors of one dtype; p in (0, 1)."""

    @staticmethod
    def forward(ctx, result, x, A, B, scaling: float, p: float):
        # Drawn on the CPU (numpy), used where x lives.
        positions = drop_positions(x.numel(), p, _new_seed()).to(x.device)
        keep_scale = 1.0 / (1.0 - p)
        low = (_dropped(x, positions) @ A.t()).mul_(keep_scale)
        out = torch.addmm(result.reshape(-1, B.shape[0]), low, B.t(), alpha=scaling)
        ctx.save_for_backward(x, positions, low, A, B)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, positions, low, A, B = ctx.saved_tensors
        g = grad_out.reshape(-1, B.shape[0])
        grad_B = grad_x = grad_A = None
        if ctx.needs_input_grad[3]:
            grad_B = (g.t() @ low).mul_(ctx.scaling)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_low = (g @ B).mul_(ctx.scaling * ctx.keep_scale)
            if ctx.needs_input_grad[2]:
                grad_A = g_low.t() @ _dropped(x, positions)
            if ctx.needs_input_grad[1]:
                grad_x = (g_low @ A).view(-1).index_fill_(0, positions, 0.0).view(x.shape)
        return grad_out, grad_x, grad_A, grad_B, None, None
