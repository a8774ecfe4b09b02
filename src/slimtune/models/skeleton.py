"""A model skeleton whose parameters take no memory, ready to receive tensors one at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Create parameters on the meta device (no memory); buffers stay real.

    Buffers must stay real: non-persistent ones, such as rotary `inv_freq`, are computed at
    construction and are not in the checkpoint, so a meta buffer could never be filled in.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(folder: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model class of `folder`'s config, every parameter on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # The skeleton is a float model; a 4-bit folder's quantization_config describes its file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    return model


def checkpoint_name(model: nn.Module, key: str, expected: set[str]) -> str | None:
    """The model's name for checkpoint `key`, allowing a missing or extra base-model prefix."""
    if key in expected:
        return key
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if f"{prefix}{key}" in expected:
        return f"{prefix}{key}"
    if key.startswith(prefix) and key[len(prefix) :] in expected:
        return key[len(prefix) :]
    return None


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of parameter or buffer `name` (assigning, not copying)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def finish(model: nn.Module, folder: Path) -> nn.Module:
    """Re-tie shared weights and check that no parameter was left empty."""
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    missing += [name for name, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise SlimtuneError(f"model folder {folder}: the weights have no tensor for {shown}")
    return model
