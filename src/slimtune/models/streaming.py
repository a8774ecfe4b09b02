"""Load a float checkpoint straight into 4 bits, one tensor at a time.

The skeleton holds no float weights (meta device). Tensors stream from the safetensors files;
each targeted Linear is quantized as soon as its weight (and bias) have arrived, and the float
copy is dropped, so at most one float layer is alive besides the parts that stay in float
(embeddings, norms, the output layer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.models.skeleton import build_skeleton, checkpoint_name, finish, set_tensor
from slimtune.models.source import safetensors_files
from slimtune.quant import Linear4bit, QuantConfig, select_linear_layers


def load_streaming_4bit(
    folder: Path, config: QuantConfig, *, dtype: torch.dtype, trust_remote_code: bool
) -> nn.Module:
    """Build `folder`'s model with its targeted Linear layers quantized to 4 bits."""
    model = build_skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    # The same layers quantize_model picks: every Linear (or Conv1D) but the output layer.
    targets = {name: model.get_submodule(name) for name in select_linear_layers(model)}
    expected = set(model.state_dict().keys())
    pending: dict[str, dict[str, torch.Tensor]] = {}  # target name -> its tensors so far

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = checkpoint_name(model, key, expected)
                if name is None:
                    continue  # e.g. rotary caches some checkpoints carry
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                module_name, _, attr = name.rpartition(".")
                if module_name not in targets:
                    set_tensor(model, name, tensor)
                    continue
                parts = pending.setdefault(module_name, {})
                parts[attr] = tensor
                if _complete(targets[module_name], parts):
                    # pop: this dict must not keep the float layer alive once it is replaced.
                    skeleton = targets.pop(module_name)
                    _quantize_in_place(model, module_name, skeleton, parts, config)
                    del pending[module_name], parts, skeleton

    if pending:
        raise SlimtuneError(f"model folder {folder}: incomplete tensors for {sorted(pending)}")
    return finish(model, folder)


def _complete(linear: nn.Module, parts: dict[str, torch.Tensor]) -> bool:
    return "weight" in parts and (linear.bias is None or "bias" in parts)


def _quantize_in_place(
    model: nn.Module,
    name: str,
    skeleton: nn.Module,
    parts: dict[str, torch.Tensor],
    config: QuantConfig,
) -> None:
    # Fill the skeleton layer (nn.Linear or Conv1D: from_linear knows both) for one moment;
    # it is dropped when its 4-bit replacement takes its place.
    for attr, tensor in parts.items():
        skeleton._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, Linear4bit.from_linear(skeleton, config))
