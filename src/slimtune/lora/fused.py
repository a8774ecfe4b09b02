"""Shared-input LoRA: one A product for the adapters of projections that read the same input.

q_proj, k_proj and v_proj read the same hidden states, and so do gate_proj and up_proj. Each
adapter's first product, dropout(x) @ A.T, is a rank-r matmul, (tokens x in) by (in x r): a
skinny shape that BLAS runs far below its speed, and backward makes two more (the gradients of
A and of x). Here the A matrices of a group are stacked into one (sum of ranks x in) matrix and
x is read once: one matmul forward, one for the gradient of A and one for the gradient of x,
per group instead of per adapter.

Dropout stays independent per adapter: each draws its own positions, in member order (the
order the projections are called in), so the outputs equal those of the layers one by one under
the same seed. On the CPU the product is taken on x undropped and each adapter's dropped values
are subtracted from its own columns (the loops of `slimtune.lora.sparse_dropout`); gradients are
corrected the same way. Elsewhere (a GPU, or with neither C nor numba) adapters with dropout get
their own dropped copy and product.

The B product stays per adapter (its output is each projection's own) and is added with one
addmm in the base output's dtype. The A product runs in float32, the adapter's dtype, whatever
the base computes in: a bfloat16 input is widened (exactly) inside, and only the narrow
(tokens x r) result is float32. Nothing is stored differently: the stacked A is made per call
from the adapters' own A matrices, so state dicts and PEFT files are unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.lora.sparse_dropout import _kernels, _new_seed, drop_positions
from slimtune.quant.kernels import as_numpy

# Sibling projections that read one input, in the order transformers calls them.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def down_products(x: Tensor, weights: list[Tensor], ps: list[float], sparse: bool = True):
    """[dropout_p_i(x) @ A_i.T] side by side: (tokens x sum of ranks), in A's dtype (float32).

    `ps`: each adapter's dropout probability (0: none). `sparse`: draw the dropped positions as
    `SparseDropoutLora` does (False: nn.functional.dropout's masks, one copy per adapter)."""
    x2d = x.reshape(-1, x.shape[-1])
    dtype = weights[0].dtype
    if any(ps) and not (sparse and _in_place(x2d, dtype)):
        # Independent masks need a dropped copy each: the products cannot share x here.
        return torch.cat(
            [F.linear(_dropout(x2d.to(dtype), p), a) for a, p in zip(weights, ps, strict=True)], 1
        )
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    if not any(ps) and x2d.dtype == dtype:
        return F.linear(x2d, stacked)  # saves x by reference, as the base layer does
    ranks = tuple(a.shape[0] for a in weights)
    return _DownProjection.apply(x2d, stacked, ranks, tuple(ps))


def add_up(result: Tensor, low: Tensor, B: Tensor, scaling: float) -> Tensor:
    """result + scaling * low @ B.T in one addmm, in result's dtype (low: tokens x r)."""
    if result.dtype != low.dtype:
        low, B = low.to(result.dtype), B.to(result.dtype)
    out = torch.addmm(result.reshape(-1, B.shape[0]), low, B.t(), alpha=scaling)
    return out.view(result.shape)


def _dropout(x: Tensor, p: float) -> Tensor:
    return F.dropout(x, p, training=True) if p > 0 else x


def _in_place(x2d: Tensor, dtype: torch.dtype) -> bool:
    """Whether the dropout loops (C or numba) can correct a product on x undropped: CPU, float32
    adapter."""
    return x2d.device.type == "cpu" and dtype == torch.float32 and _kernels() is not None


class _DownProjection(torch.autograd.Function):
    """The stacked product with per-adapter sparse dropout; x of any float dtype (saved as it
    is, shared with the base layer, and widened to float32 for the products)."""

    @staticmethod
    def forward(ctx, x2d: Tensor, stacked: Tensor, ranks: tuple, ps: tuple) -> Tensor:
        x32 = x2d.float().contiguous()
        low = x32 @ stacked.t()
        positions = []
        if any(ps):
            remove_from_low = _kernels()[0]
            for (start, stop), p in zip(_spans(ranks), ps, strict=True):
                found = drop_positions(x32.numel(), p, _new_seed()) if p > 0 else _NONE
                if p > 0:
                    # The loops run 2-3x faster on an adapter's own contiguous columns.
                    columns = low[:, start:stop].contiguous()
                    a_t = stacked.detach()[start:stop].t().contiguous()
                    remove_from_low(columns.numpy(), x32.numpy(), as_numpy(a_t), found.numpy())
                    low[:, start:stop] = columns.mul_(1.0 / (1.0 - p))
                positions.append(found)
        ctx.save_for_backward(x2d, stacked, *positions)
        ctx.ranks, ctx.ps = ranks, ps
        return low

    @staticmethod
    def backward(ctx, g_low: Tensor):
        x2d, stacked, *positions = ctx.saved_tensors
        x32 = x2d.float().contiguous()
        g = g_low.contiguous()
        # (column span, p, positions) of the adapters that dropped anything
        dropped = []
        if positions:
            for span, p, pos in zip(_spans(ctx.ranks), ctx.ps, positions, strict=True):
                if p > 0:
                    dropped.append((span, p, pos))
        if dropped:
            g = g.clone()
            for (start, stop), p, _ in dropped:
                g[:, start:stop].mul_(1.0 / (1.0 - p))
        grad_x = grad_a = None
        kernels = _kernels()
        # Each adapter's columns are copied out contiguous for the loops (2-3x faster).
        g_parts = [g[:, start:stop].contiguous() for (start, stop), _, _ in dropped]
        if ctx.needs_input_grad[1]:
            grad_a_t = x32.t() @ g
            for ((start, stop), _, pos), g_part in zip(dropped, g_parts, strict=True):
                part = grad_a_t[:, start:stop].contiguous()
                kernels[1](part.numpy(), x32.numpy(), g_part.numpy(), pos.numpy())
                grad_a_t[:, start:stop] = part
            grad_a = grad_a_t.t()
        if ctx.needs_input_grad[0]:
            grad_x = g @ stacked
            for ((start, stop), _, pos), g_part in zip(dropped, g_parts, strict=True):
                a_t = stacked.detach()[start:stop].t().contiguous()
                kernels[3](grad_x.numpy(), g_part.numpy(), as_numpy(a_t), pos.numpy())
            grad_x = grad_x.to(x2d.dtype)
        return grad_x, grad_a, None, None


_NONE = torch.empty(0, dtype=torch.int64)


def _spans(ranks: tuple) -> list[tuple[int, int]]:
    """The column range of each adapter in the stacked product."""
    spans, start = [], 0
    for r in ranks:
        spans.append((start, start + r))
        start += r
    return spans


# ------------------------------------------------------------------------------ groups


class SharedInput:
    """The LoRA layers of one module that read the same input (q/k/v, or gate/up).

    The first member called with an input computes the A products of every member's live
    adapters at once; the others take their columns when they are called with that same input
    (the same tensor, unmodified, under the same grad mode, with the same A). A member called
    with another input computes afresh, so a model that feeds them different inputs stays
    right; it only loses the sharing."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._pending: tuple | None = None  # (x, key, members, {member index: [(name, low)]})

    def add(self, layer: nn.Module, x: Tensor, result: Tensor) -> Tensor:
        """`layer`'s output: the base `result` plus its adapters, for input `x`."""
        lows = self._take(layer, x)
        if lows is None:
            lows = self._compute(layer, x)
        for name, low in lows:
            result = add_up(result, low, layer.lora_B[name].weight, layer.scaling[name])
        return result

    @staticmethod
    def _key(x: Tensor, members: list[nn.Module]) -> tuple:
        """What must not have changed for a pending product to be reused (besides x itself)."""
        versions = tuple(m.lora_A[n].weight._version for m in members for n in m._live)
        names = tuple(tuple(m._live) for m in members)
        return (x._version, torch.is_grad_enabled(), versions, names)

    def _take(self, layer: nn.Module, x: Tensor) -> list | None:
        if self._pending is None:
            return None
        source, key, members, lows = self._pending
        index = self.members.index(layer)
        if index not in lows or source is not x or key != self._key(x, members):
            return None
        found = lows.pop(index)
        if not lows:
            self._pending = None  # all taken: hold no tensors between forward passes
        return found

    def _compute(self, layer: nn.Module, x: Tensor) -> list:
        members = [m for m in self.members if m is layer or _joins(m, layer)]
        weights, ps, owners = [], [], []
        for m in members:
            for name in m._live:
                weights.append(m.lora_A[name].weight)
                ps.append(dropout_p(m, name))
                owners.append((self.members.index(m), name))
        low = down_products(x, weights, ps, sparse=layer.sparse_dropout)
        lows: dict[int, list] = {}
        for (index, name), (start, stop) in zip(
            owners, _spans([w.shape[0] for w in weights]), strict=True
        ):
            lows.setdefault(index, []).append((name, low[:, start:stop]))
        mine = lows.pop(self.members.index(layer), [])
        self._pending = (x, self._key(x, members), members, lows) if lows else None
        return mine

    def __deepcopy__(self, memo):
        # Pending products are autograd tensors of one forward pass: never copied.
        clone = SharedInput.__new__(SharedInput)
        memo[id(self)] = clone
        clone.members = [copy.deepcopy(m, memo) for m in self.members]
        clone._pending = None
        return clone

    def __getstate__(self):
        return {"members": self.members, "_pending": None}


def fusable(layer: nn.Module) -> bool:
    """Whether `layer`'s live adapters can join a shared product: plain LoRA (no DoRA), and
    sparse dropout when dropout runs (PEFT-exact masks are drawn per adapter)."""
    if any(name in layer.lora_magnitude_vector for name in layer._live):
        return False
    if layer.training and not layer.sparse_dropout:
        return not any(dropout_p(layer, name) for name in layer._live)
    return True


def _joins(member: nn.Module, layer: nn.Module) -> bool:
    """Whether a sibling takes part in the product `layer` starts."""
    idle = member.disabled or member.sample_groups is not None or not member._live
    return not idle and member.training == layer.training and fusable(member)


def dropout_p(layer: nn.Module, name: str) -> float:
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if layer.training and isinstance(dropout, nn.Dropout) else 0.0
