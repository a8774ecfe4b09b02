"""The compute dtype of a training run: the frozen base's matmuls run in it, the rest in float32.

What torch.autocast does for linear layers, set up once on the model instead of per op:

- 4-bit layers decode NF4/FP4 straight into the compute dtype and multiply in it
  (`Linear4bit.compute_dtype`); frozen float base layers under a LoRA adapter (`method: lora`)
  are stored in it and multiply in it. Each takes its input to the compute dtype and gives its
  output back in the input's dtype;
- a frozen output layer multiplies in it too, giving float32 logits to the loss (the chunked
  loss of `slimtune.train.loss` reads its `compute_dtype`): on a small model such as SmolLM2
  that product is a large share of a float32 QLoRA step;
- everything else stays float32: the residual stream, norms, attention, the loss (softmax
  included), and the adapter: LoRA A and B are the master weights the optimizer updates (its
  state follows them), multiplied in float32.

On SmolLM2 a bfloat16 residual stream (the whole frozen model cast) moved the loss of the
untrained model over a hundred times more than bfloat16 matmuls with a float32 stream
(benchmarks/reports/train.md). Buffers are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.hardware import cpu_model, device_has_native_bf16, dtype_name, resolve_compute_dtype
from slimtune.quant import Linear4bit
from slimtune.targets import output_head
from slimtune.train.head import release_loss_buffers


def training_dtype(name: str, method: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a run computes in. Full fine-tuning trains every weight: it stays float32
    (`auto`), and asking it for a low-precision dtype is an error (no master copies kept)."""
    dtype = resolve_compute_dtype(name, device)
    if method == "full" and dtype != torch.float32:
        if name == "auto":
            return torch.float32
        raise SlimtuneError(
            f"compute_dtype: {name} needs a frozen base (method lora or qlora); method full "
            "trains every weight in float32"
        )
    return dtype


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Make the frozen base layers of `model` multiply in `dtype` (see the module doc); returns
    how many layers. Idempotent; `dtype` float32 puts float bases back in float32."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = dtype
            count += 1
        elif _is_frozen_float_base(module):
            base = module.base_layer
            for param in base.parameters():
                param.data = param.data.to(dtype)
            if not getattr(base, "_slimtune_casts", False):
                base.register_forward_pre_hook(_input_to_weight_dtype)
                base.register_forward_hook(_output_to_input_dtype)
                base._slimtune_casts = True
            count += 1
    head = _frozen_output_layer(model)
    if head is not None:
        head.compute_dtype = dtype
        release_loss_buffers(head)  # what the loss kept for the dtype before
        count += 1
    return count


def _frozen_output_layer(model: nn.Module) -> nn.Module | None:
    """The output layer of a causal LM whose weights do not train, else None."""
    head = output_head(model)
    if head is None or any(p.requires_grad for p in head.parameters()):
        return None
    return head


@contextlib.contextmanager
def float32_compute(model: nn.Module) -> Iterator[None]:
    """4-bit layers and the output layer compute in float32 inside the block (evaluation decodes
    the 4-bit layers into float32 copies that take the float32 hidden states as they are, and
    scores in float32 whatever dtype training ran in), and go back after."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    head = _frozen_output_layer(model)
    if head is not None and hasattr(head, "compute_dtype"):
        layers.append(head)
    before = [m.compute_dtype for m in layers]
    for layer in layers:
        layer.compute_dtype = torch.float32
    try:
        yield
    finally:
        for layer, dtype in zip(layers, before, strict=True):
            layer.compute_dtype = dtype


def _is_frozen_float_base(module: nn.Module) -> bool:
    """A LoRA layer's frozen nn.Linear base (method lora)."""
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear:
        return False
    return not any(p.requires_grad for p in base.parameters())


def _input_to_weight_dtype(module: nn.Module, args: tuple):
    x = args[0]
    module._slimtune_in_dtype = x.dtype
    return (x.to(module.weight.dtype), *args[1:])


def _output_to_input_dtype(module: nn.Module, args: tuple, output: torch.Tensor):
    return output.to(module._slimtune_in_dtype)


def describe_compute_dtype(name: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """The line a run prints before training: the dtype and, for `auto`, what decided it."""
    text = f"compute dtype: {dtype_name(dtype)}"
    if name != "auto":
        return text
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    native = "native" if device_has_native_bf16(device) else "no native"
    return text + f" (auto; {where}: {native} bfloat16)"
