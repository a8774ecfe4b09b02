"""Many adapters in one batch, in inference (serving).

A serving batch mixes rows for several adapters. Gathering each adapter's rows, running its two
small products and scattering them back costs a copy of the layer's whole output per adapter.
Two ways around it:

- By slices: where the batch is ordered by adapter (the engine orders its prefills so), each
  adapter's rows are one slice; its two products run on a view of them and add in place.
- Stacked, for any order: the adapters' A matrices are stacked into one (sum of ranks, in)
  matrix and their B matrices into one (out, sum of ranks). Every row runs through all the A's,
  a gate keeps only its own adapter's columns (scaled), and one product by the stacked B adds
  the result. With a few adapters the extra products are rank-sized, far cheaper than the
  copies they replace.

    h += ((x @ A_all.T) * gate) @ B_all.T,   gate[row, columns of adapter a] = scaling_a
                                             where row uses a, else 0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (adapter name, its rows, or None for every row): as per_sample_adapters groups them.
Groups = list[tuple[str, torch.Tensor | None]]


def add_stacked(layer, groups: Groups, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h plus each row's adapter of `layer` (a LoraLinear) applied to x; rows (dim 0) of no
    group get nothing."""
    A = torch.cat([layer.lora_A[name].weight for name, _ in groups])
    B = torch.cat([layer.lora_B[name].weight for name, _ in groups], dim=1)
    low = F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A)
    low *= _gate(layer, groups, x.shape[0], low).view(x.shape[0], *[1] * (x.dim() - 2), -1)
    delta = F.linear(low, B)
    # In place: h is the base layer's fresh output, and no gradient is recorded (inference_only).
    return h.add_(delta if delta.dtype == h.dtype else delta.to(h.dtype))


def _gate(layer, groups: Groups, rows: int, like: torch.Tensor) -> torch.Tensor:
    """(rows, sum of ranks): each adapter's scaling in its own columns of the rows using it."""
    gate = like.new_zeros(rows, like.shape[-1])
    start = 0
    for name, members in groups:
        end = start + layer.lora_A[name].weight.shape[0]
        if members is None:
            gate[:, start:end] = layer.scaling[name]
        else:
            gate[members, start:end] = layer.scaling[name]
        start = end
    return gate


def add_by_slices(
    layer, groups: Groups, spans: list[slice], x: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """The same sum where each adapter's rows are one slice (a batch ordered by adapter): each
    adapter's two products on its own rows, added in place. `groups` and `spans` as
    per_sample_adapters set them (adapters the layer lacks are skipped)."""
    for (name, _), rows in zip(groups, spans, strict=True):
        if name in layer.lora_A:
            part = h[rows]
            part.add_(layer._delta(name, x[rows], part))
    return h


def inference_only(layer, groups: Groups) -> bool:
    """No dropout, no gradients, some adapter, plain LoRA (no DoRA) of one dtype: the sum may
    land in the base output in place."""
    if layer.training or torch.is_grad_enabled() or not groups:
        return False
    names = [name for name, _ in groups]
    if any(name in layer.lora_magnitude_vector for name in names):  # DoRA
        return False
    return len({layer.lora_A[name].weight.dtype for name in names}) == 1


def stackable(groups: Groups) -> bool:
    """More than one adapter, or one on a part of the rows (one on every row needs no gate);
    with `inference_only` already true."""
    return not (len(groups) == 1 and groups[0][1] is None)
