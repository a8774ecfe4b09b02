"""Run a model's 4-bit layers through the inference kernels for as long as a block runs.

`inference_4bit(model)` gives every Linear4bit an inference forward (`slimtune.quant.gemv`): no
autograd record, one fused decode + matrix-vector product per new token, banded decode + matmul
for prompts. The layers stay what they are (same objects, buffers and state dict); only their
`forward` is replaced inside the block, so LoRA wrappers, hooks and the training path are
untouched. Layers fed the same input tensor (q/k/v, gate/up) build the input's table once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from slimtune.quant.gemv import Prepared, fused_layout, input_table, linear_4bit_inference
from slimtune.quant.linear import Linear4bit


class TableCache:
    """The input table of the last one-row input, reused while the same tensor comes back."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None
        self._source: torch.Tensor | None = None

    def get(self, x: torch.Tensor, quant_type: str) -> torch.Tensor:
        # Inference-mode tensors keep no version counter; the layers sharing one (q/k/v of a
        # block) are called back to back, with nothing writing into their input between them.
        version = None if x.is_inference() else x._version
        key = (quant_type, version, tuple(x.shape), x.data_ptr())
        if self._source is not x or self._key != key:
            self._table = input_table(x, quant_type)
            self._source, self._key = x, key
        return self._table


def _inference_forward(layer: Linear4bit, dtype: torch.dtype | None, tables: TableCache):
    # The buffers do not change inside the block: their state and numpy views are made once.
    state = layer.quant_state
    compute = dtype or layer.compute_dtype
    prepared = None
    if layer.weight.device.type == "cpu" and fused_layout(state):
        prepared = Prepared(layer.weight, state)

    def forward(x: torch.Tensor) -> torch.Tensor:
        table = None
        if prepared is not None and x.numel() == layer.in_features and x.device.type == "cpu":
            table = tables.get(x, layer.quant_type)
        with torch.no_grad():
            y = linear_4bit_inference(x, layer.weight, state, layer.bias, compute, table, prepared)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    return forward


@contextlib.contextmanager
def inference_4bit(model: nn.Module, compute_dtype: torch.dtype | None = None) -> Iterator[int]:
    """Inside the block every Linear4bit of `model` computes with the inference kernels, in
    `compute_dtype` (default: each layer's own). Yields how many layers were switched (blocks
    nest: an inner block leaves the layers an outer one switched as they are). No
    gradients flow through the switched layers: use it for generation and evaluation only."""
    tables = TableCache()
    # Layers an enclosing block already switched stay as that block set them.
    layers = [
        m for m in model.modules() if isinstance(m, Linear4bit) and "forward" not in m.__dict__
    ]
    for layer in layers:
        layer.forward = _inference_forward(layer, compute_dtype, tables)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def has_4bit_layers(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())
