"""LoraLinear: a frozen base layer plus any number of named low-rank adapters.

    y = base(x) + sum over live adapters of scaling * B(A(dropout(x)))

The adapters live in `lora_A` / `lora_B` ModuleDicts keyed by adapter name, exactly as in PEFT, so
our state dict maps one-to-one onto PEFT's adapter files. A and B stay float32 whatever the base is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimtune.devices import device_of
from slimtune.errors import SlimtuneError
from slimtune.lora import fused, stacked
from slimtune.lora import init as inits
from slimtune.lora.bases import dense_weight, features
from slimtune.lora.dora import Magnitude, dora_delta, row_norm
from slimtune.lora.sparse_dropout import SparseDropoutLora
from slimtune.quant import Linear4bit, QuantConfig, frozen_linear


class LoraLinear(nn.Module):
    # The SharedInput group of sibling layers reading the same input (see lora/fused.py), if any.
    shared = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Training-mode dropout through SparseDropoutLora (fast, keeps no dropped copy). False:
        # masks drawn by nn.Dropout, exactly as PEFT draws them. See set_sparse_dropout.
        self.sparse_dropout = True
        # per_sample_adapters: [(name, row indices or None for the whole batch)], and the batch size
        self.sample_groups: list[tuple[str, torch.Tensor | None]] | None = None
        self.sample_batch = 0
        # ... and each group's rows as a slice, where all of them are consecutive (else None)
        self.sample_spans: list[slice] | None = None
        self._live: list[str] = []  # active, present here, not merged: what forward adds
        self._merge_state: dict[str, tuple[nn.Module | None, torch.Tensor | None]] = {}
        # PiSSA adapters: their starting (A, B), which the base gives back in pissa_to_lora
        self.pissa_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------- adapters

    @torch.no_grad()
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        init: str = "kaiming",
        loftq: tuple | None = None,
    ) -> None:
        """Create adapter `name` (A [r, in], B [out, r], float32); `loftq`: (quant_config, iters)."""
        if r > min(self.in_features, self.out_features) and init in ("pissa", "loftq"):
            raise SlimtuneError(f"init={init!r} needs r <= min(in, out) of the layer, got r={r}")
        device = device_of(self.base_layer)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "kaiming":
            inits.kaiming_(A)
            B.zero_()
        elif init == "gaussian":
            inits.gaussian_(A, r)
            B.zero_()
        elif init == "pissa":
            self._init_pissa(name)
        elif init == "loftq":
            self._init_loftq(name, *loftq)
        if use_dora:
            weight = dense_weight(self.base_layer).float()
            norm = row_norm(weight + scaling * (B @ A))
            self.lora_magnitude_vector[name] = Magnitude(norm)
        self._refresh()

    def _init_pissa(self, name: str) -> None:
        if not isinstance(self.base_layer, nn.Linear | Conv1D):
            raise SlimtuneError(
                "init='pissa' rewrites the base weight: inject it into a float model"
            )
        A, B, residual = inits.pissa(
            dense_weight(self.base_layer), self.r[name], self.scaling[name]
        )
        self.lora_A[name].weight.copy_(A)
        self.lora_B[name].weight.copy_(B)
        self._write_dense(residual)
        self.pissa_start[name] = (A.clone(), B.clone())

    @torch.no_grad()
    def pissa_to_lora(self, name: str, alpha: float) -> None:
        """Turn PiSSA adapter `name` into a plain LoRA adapter of twice the rank on the original
        weight, with the same output; `alpha`: its alpha at that rank (see slimtune.lora.pissa)."""
        if name in self.merged_adapters:
            raise SlimtuneError(f"adapter {name!r} is merged: unmerge it first")
        A0, B0 = self.pissa_start.pop(name)
        scaling = self.scaling[name]
        self._write_dense(dense_weight(self.base_layer).float() + scaling * (B0 @ A0))
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        r, trains = 2 * self.r[name], A.requires_grad
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=A.device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=B.device)
        self.lora_A[name].weight.copy_(torch.cat([A, -A0]))
        self.lora_B[name].weight.copy_(torch.cat([B, B0], dim=1))
        self.lora_A[name].requires_grad_(trains)
        self.lora_B[name].requires_grad_(trains)
        self.r[name], self.lora_alpha[name] = r, alpha

    def _init_loftq(self, name: str, quant_config, iters: int) -> None:
        if type(self.base_layer) is not nn.Linear:
            raise SlimtuneError(
                "init='loftq' quantizes the base itself from its float weight: inject it into a "
                f"float model (nn.Linear), got {type(self.base_layer).__name__}"
            )
        base = self.base_layer
        A, B, to_quantize = inits.loftq(
            base.weight, self.r[name], self.scaling[name], quant_config, iters
        )
        self.lora_A[name].weight.copy_(A)
        self.lora_B[name].weight.copy_(B)
        dense = frozen_linear(to_quantize.to(base.weight.dtype), base.bias)
        self.base_layer = Linear4bit.from_linear(dense, quant_config)
        self.base_layer.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise SlimtuneError(f"adapter {name!r} is merged: unmerge it before deleting it")
        for store in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.pissa_start):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._refresh()

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = list(names)
        self._refresh()

    def _refresh(self) -> None:
        self._live = [
            a for a in self.active_adapters if a in self.lora_A and a not in self.merged_adapters
        ]

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = base(x) + scaling * B(A(dropout(x))), summed over the live adapters. The plain path
        ends the loop; the fast paths (below) compute the same sum."""
        h = self.base_layer(x)
        if self.disabled:
            return h
        if self.sample_groups is not None:  # fast path: per-sample adapters
            return self._forward_per_sample(x, h)
        if self.shared is not None and fused.fusable(self):  # fast path: shared-input products
            return self.shared.add(self, x, h)
        for name in self._live:
            if (fast := self._fast_path(name, x, h)) is not None:  # DoRA, bf16, sparse dropout
                h = fast(name, x, h)
                continue
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            x_in, _ = self._lora_input(name, x, A.dtype)  # dropout(x)
            h = _fused_addmm(h, F.linear(x_in, A), B, self.scaling[name])  # h + s * B(A(x_in))
        return h

    # ---------------------------------------------------------------- fast paths
    #
    # Each computes the plain sum (PEFT's, within float rounding) with less memory traffic or
    # fewer matmuls; tests/test_lora*.py hold each against PEFT.
    # - fused addmm (_fused_addmm, in the plain path too): the add and the scaling ride on B's
    #   matmul, one pass over the wide output instead of three.
    # - shared-input products (lora/fused.py, `self.shared`): q/k/v (gate/up) adapters read one
    #   input; their A matrices are stacked into one matmul.
    # - per-sample adapters (_forward_per_sample): each batch row its own adapter (serving);
    #   in inference each adapter on its slice of a batch ordered by adapter, else all of a
    #   batch's adapters as one stacked pair (lora/stacked.py).
    # - DoRA (_add_dora): reuses the base output instead of a second matmul by the weight.
    # - low-precision base (_add_low_precision): a bfloat16/float16 base, the adapter in float32.
    # - sparse dropout (_add_sparse_dropout): drops positions drawn sparsely, keeps no dropped
    #   copy of x (lora/sparse_dropout.py).

    def _fast_path(self, name: str, x: torch.Tensor, h: torch.Tensor) -> Callable | None:
        """The method that adds adapter `name` to `h` in place of the plain path, or None."""
        if name in self.lora_magnitude_vector:
            return self._add_dora
        A = self.lora_A[name].weight
        if h.dtype != A.dtype:
            return self._add_low_precision
        dropout = self.lora_dropout[name]
        # On a GPU dropout's own kernel is fast and the positions would have to be copied over.
        sparse = self.sparse_dropout and self.training and x.dtype == A.dtype and not x.is_cuda
        if sparse and isinstance(dropout, nn.Dropout) and 0 < dropout.p < 1:
            return self._add_sparse_dropout
        return None

    def _add_dora(self, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self._delta(name, x, h)

    def _add_low_precision(self, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """A bfloat16/float16 base: A(x) in float32, B in the base's dtype."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        p = fused.dropout_p(self, name)
        low = fused.down_products(x, [A], [p], sparse=self.sparse_dropout)
        return fused.add_up(h, low, B, self.scaling[name])

    def _add_sparse_dropout(self, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        p = self.lora_dropout[name].p
        return SparseDropoutLora.apply(h, x, A, B, self.scaling[name], p)

    def _delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output `result` for input `x`."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        h, dropped = self._lora_input(name, x, A.dtype)
        if name in self.lora_magnitude_vector:
            base_out = None if dropped else _minus_bias(result, self.base_layer)
            weight = dense_weight(self.base_layer).to(h.dtype)
            magnitude = self.lora_magnitude_vector[name].weight
            delta = dora_delta(h, A, B, self.scaling[name], magnitude, weight, base_out)
        else:
            # Scale the narrow [.., r] intermediate rather than the wide output.
            delta = F.linear(F.linear(h, A) * self.scaling[name], B)
        return delta if delta.dtype == result.dtype else delta.to(result.dtype)

    def _lora_input(
        self, name: str, x: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, bool]:
        """(dropout(x) in the adapter's dtype, whether dropout ran): no call, no copy when p = 0."""
        dropout = self.lora_dropout[name]
        dropped = self.training and isinstance(dropout, nn.Dropout)
        h = dropout(x) if dropped else x
        return (h if h.dtype == dtype else h.to(dtype)), dropped

    def _forward_per_sample(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] != self.sample_batch and x.shape[0] % self.sample_batch == 0:
            # Tokens flattened batch-major, (B x T, H), as mixture-of-experts blocks pass them.
            rows = (self.sample_batch, -1)
            out = self._forward_per_sample(
                x.view(*rows, x.shape[-1]), result.view(*rows, result.shape[-1])
            )
            return out.view(result.shape)
        if x.shape[0] != self.sample_batch:
            raise SlimtuneError(
                f"per_sample_adapters was given {self.sample_batch} adapter names but the batch "
                f"has {x.shape[0]} rows"
            )
        groups = [(name, rows) for name, rows in self.sample_groups if name in self.lora_A]
        if stacked.inference_only(self, groups):
            if self.sample_spans is not None:  # rows ordered by adapter: each on its own slice
                return stacked.add_by_slices(self, self.sample_groups, self.sample_spans, x, result)
            if stacked.stackable(groups):
                return stacked.add_stacked(self, groups, x, result)
        for name, rows in groups:
            if rows is None:  # the whole batch uses this adapter: no gather/scatter
                result = result + self._delta(name, x, result)
            else:
                delta = self._delta(name, x.index_select(0, rows), result.index_select(0, rows))
                result = result.index_add(0, rows, delta)
        return result

    # ---------------------------------------------------------------- merge

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A as a float32 [out, in] tensor."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    @torch.no_grad()
    def merge(self, name: str, requantize: bool = False) -> tuple[float, float] | None:
        """Fold adapter `name` into the base weight. For a 4-bit base the merged layer is float, or
        re-quantized when `requantize`: then returns (squared error re-quantization added, squared
        norm of the merged weight) so callers can report a relative error."""
        if name in self.merged_adapters:
            raise SlimtuneError(f"adapter {name!r} is already merged")
        base = self.base_layer
        weight = dense_weight(base).float()
        merged, norm = self._merged_weight(name, weight)
        report = None
        if requantize and not isinstance(base, Linear4bit):
            raise SlimtuneError("requantize=True needs a 4-bit base layer")
        if isinstance(base, Linear4bit):
            self.base_layer = frozen_linear(merged.to(base.compute_dtype), base.bias)
            if requantize:
                self.base_layer = Linear4bit.from_linear(self.base_layer, _quant_config(base))
                requant = self.base_layer.dequantize().float()
                report = (float((requant - merged).square().sum()), float(merged.square().sum()))
            self.base_layer.requires_grad_(False)
            # Keep the 4-bit original: unmerge puts it back, bit for bit.
            self._merge_state[name] = (base, norm)
        else:
            self._write_dense(merged)
            self._merge_state[name] = (None, norm)
        self.merged_adapters.append(name)
        self._refresh()
        return report

    def _merged_weight(
        self, name: str, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta = self.delta_weight(name)
        if name not in self.lora_magnitude_vector:
            return weight + delta, None
        norm = row_norm(weight + delta)  # DoRA: kept to undo the rescaling exactly
        factor = self.lora_magnitude_vector[name].weight / norm
        return factor[:, None] * (weight + delta), norm

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise SlimtuneError(f"adapter {name!r} is not merged")
        if self.merged_adapters[-1] != name:
            raise SlimtuneError(
                f"unmerge adapters in reverse order of merging: {self.merged_adapters[-1]!r} "
                f"was merged after {name!r}"
            )
        original, norm = self._merge_state.pop(name)
        if original is not None:
            self.base_layer = original
        else:
            weight = dense_weight(self.base_layer).float()
            if norm is not None:
                weight = weight * (norm / self.lora_magnitude_vector[name].weight)[:, None]
            self._write_dense(weight - self.delta_weight(name))
        self.merged_adapters.pop()
        self._refresh()

    def _write_dense(self, weight: torch.Tensor) -> None:
        """Write a float [out, in] weight back into the (float) base layer, in its dtype."""
        target = self.base_layer.weight
        target.copy_(weight.t() if self.fan_in_fan_out else weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}"


def set_sparse_dropout(model: nn.Module, enabled: bool) -> int:
    """Draw the training dropout of every LoRA layer in `model` sparsely (the default) or, with
    `enabled` False, with nn.Dropout's masks as PEFT does; returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.sparse_dropout = enabled
    return len(layers)


def _fused_addmm(
    h: torch.Tensor, low: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """h + scaling * low @ B.T in one addmm (low: [.., r]), the shape of h."""
    out = torch.addmm(h.reshape(-1, B.shape[0]), low.reshape(-1, B.shape[1]), B.t(), alpha=scaling)
    return out.view(h.shape)


def _minus_bias(result: torch.Tensor, base: nn.Module) -> torch.Tensor:
    bias = getattr(base, "bias", None)
    return result if bias is None else result - bias


def _quant_config(layer: Linear4bit) -> QuantConfig:
    """The QuantConfig a Linear4bit was built with."""
    return QuantConfig(
        quant_type=layer.quant_type,
        blocksize=layer.blocksize,
        double_quant=layer.double_quant,
        compute_dtype=layer.compute_dtype,
    )
