"""Run a model's 4-bit layers through the inference kernels for as long as a block runs.

`inference_4bit(model)` gives every Linear4bit an inference forward (`slimtune.quant.gemv`): no
autograd record, products straight from the codes for new tokens, banded decode + matmul for
prompts. The layers stay what they are (same objects, buffers and state dict); only their
`forward` is replaced inside the block, so LoRA wrappers, hooks and the training path are
untouched. Where the numba kernel runs, layers fed the same input tensor (q/k/v, gate/up) build
the input's table once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from slimtune.quant import native
from slimtune.quant.gemv import (
    Prepared,
    fused_layout,
    input_table,
    linear_4bit_inference,
    native_layout,
    native_weight,
)
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
    weight = prepared = None
    if layer.weight.device.type == "cpu" and native_layout(state):
        weight = native_weight(layer.weight, state)
    elif layer.weight.device.type == "cpu" and fused_layout(state):
        prepared = Prepared(layer.weight, state)

    def forward(x: torch.Tensor) -> torch.Tensor:
        table = None
        if prepared is not None and x.numel() == layer.in_features and x.device.type == "cpu":
            table = tables.get(x, layer.quant_type)
        # Decoding runs without gradients already: entering no_grad costs a few us a call.
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            y = linear_4bit_inference(
                x, layer.weight, state, layer.bias, compute, table, prepared, weight
            )
        return y if y.dtype == x.dtype else y.to(x.dtype)

    forward.kernel_weight = weight
    return forward


def kernel_weight(layer: Linear4bit) -> native.Weight:
    """What the C kernel reads of `layer`: the weight its inference forward holds inside
    `inference_4bit` (made once for both), else a new one."""
    weight = getattr(layer.__dict__.get("forward"), "kernel_weight", None)
    return weight if weight is not None else native_weight(layer.weight, layer.quant_state)


# Float layers at least this big (the output layer) take the C kernel for a few input rows:
# BLAS's matrix-vector product runs on one core and leaves half the memory bandwidth unused, and
# up to 16 rows (a serving batch) the kernel's tiles read the weight once and beat BLAS too.
DENSE_MIN_VALUES = 1 << 22
DENSE_ROWS = 16


def _big_float_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.numel() >= DENSE_MIN_VALUES
        and native.library() is not None
    )


def _dense_forward(layer: nn.Linear, dtype: torch.dtype | None):
    # In bfloat16 compute, where the CPU multiplies bfloat16, the kernel reads a bfloat16 copy
    # of the weight (made on the first call): half the bytes a token, twice the products an
    # instruction. The float32 weight stays the model's (tied embeddings read it).
    bf16 = dtype == torch.bfloat16 and native.bf16_dot()
    copy: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, layer.in_features)
        if x2d.shape[0] > DENSE_ROWS or x.dtype != torch.float32:
            return nn.functional.linear(x, layer.weight, layer.bias)
        with torch.no_grad():
            if bf16 and not copy:
                copy.append(layer.weight.to(torch.bfloat16))
            y = native.dense_matmul(x2d, copy[0] if bf16 else layer.weight)
            if layer.bias is not None:
                y += layer.bias
        return y.view(*x.shape[:-1], layer.out_features)

    return forward


@contextlib.contextmanager
def inference_4bit(model: nn.Module, compute_dtype: torch.dtype | None = None) -> Iterator[int]:
    """Inside the block every Linear4bit of `model` computes with the inference kernels, in
    `compute_dtype` (default: each layer's own), and big float32 layers (the output layer) take
    the C kernel for a few rows, in `compute_dtype` or the one all 4-bit layers share. Yields
    how many layers were switched (blocks nest: an inner block leaves the layers an outer one
    switched as they are). No gradients flow through the switched layers: use it for
    generation and evaluation only."""
    tables = TableCache()
    # Layers an enclosing block already switched stay as that block set them.
    free = [m for m in model.modules() if "forward" not in m.__dict__]
    layers = [m for m in free if isinstance(m, Linear4bit)]
    dense = [m for m in free if _big_float_layer(m)]
    for layer in layers:
        layer.forward = _inference_forward(layer, compute_dtype, tables)
    for layer in dense:
        layer.forward = _dense_forward(layer, compute_dtype or _common_dtype(layers))
    try:
        yield len(layers)
    finally:
        for layer in layers + dense:
            del layer.forward


def _common_dtype(layers: list[Linear4bit]) -> torch.dtype | None:
    # With no compute dtype given, the output layer computes as the 4-bit layers do.
    dtypes = {layer.compute_dtype for layer in layers}
    return dtypes.pop() if len(dtypes) == 1 else None


def has_4bit_layers(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())
