"""The compute dtype of a training run: the frozen base computes in it, the adapter stays float32.

What torch.autocast does, done once and explicitly on the model instead of per op:

- every frozen floating parameter (embeddings, norms, the output layer, float base weights) is
  cast to the compute dtype, so the hidden states, attention and the big matmuls run in it;
- 4-bit layers decode their weights straight into it (`Linear4bit.compute_dtype`);
- trainable parameters (LoRA A and B, whatever else trains) stay float32: they are the master
  weights the optimizer updates, and its state follows them. The adapter's narrow product A(x)
  runs in float32 from the (exactly widened) input; `slimtune.lora` casts back where it adds;
- the loss takes the logits to float32 before the softmax (`slimtune.train.loss`); norms compute
  their variance in float32 (transformers does so in every RMSNorm/LayerNorm).

Buffers are left alone: rotary frequencies and the like keep their precision.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.hardware import resolve_compute_dtype

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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
    """Put the frozen part of `model` in `dtype` (see the module doc); returns how many frozen
    parameters were cast. Idempotent; tied weights stay tied (the Parameter is cast in place)."""
    cast = 0
    seen: set[int] = set()
    for module in model.modules():
        if hasattr(module, "compute_dtype") and hasattr(module, "dequantize"):  # Linear4bit
            module.compute_dtype = dtype
        for param in module._parameters.values():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad or not param.is_floating_point() or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def describe_compute_dtype(name: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """The line a run prints before training: the dtype and, for `auto`, what decided it."""
    from slimtune.hardware import cpu_model, device_has_native_bf16

    text = f"compute dtype: {dtype_name(dtype)}"
    if name != "auto":
        return text
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    native = "native" if device_has_native_bf16(device) else "no native"
    return text + f" (auto; {where}: {native} bfloat16)"
