"""Load a 4-bit model folder (bitsandbytes layout, as `save_quantized_model` writes it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.models.skeleton import build_skeleton, checkpoint_name, finish, set_tensor
from slimtune.models.source import safetensors_files
from slimtune.models.streaming import KeepPart, read_tensor, tensor_keys
from slimtune.quant import Linear4bit, QuantConfig, load_quantized_state_dict

QUANT_MARK = ".weight.quant_state.bitsandbytes__"


def load_4bit_folder(
    folder: Path,
    *,
    dtype: torch.dtype,
    trust_remote_code: bool,
    compute_dtype: torch.dtype | None = None,
    keep_part: KeepPart | None = None,
) -> nn.Module:
    """Rebuild the model with Linear4bit layers holding exactly the stored 4-bit tensors.

    `compute_dtype` defaults to the folder's `bnb_4bit_compute_dtype`. With `keep_part`
    (slimtune.dist.LoadedPart) the tensors are read one at a time, a 4-bit layer's together,
    and each is cut by `keep_part` once in place: the file is never whole in memory.
    """
    model = build_skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    if keep_part is None:
        _load_whole(model, folder, dtype)
    else:
        _load_in_parts(model, folder, dtype, keep_part)
    compute_dtype = compute_dtype or _stored_compute_dtype(folder)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = compute_dtype
    return finish(model, folder)


def _load_whole(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    expected = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        state.update(load_file(path))  # the 4-bit file is small: read it whole
    quantized = {key[: key.index(QUANT_MARK)] for key in state if QUANT_MARK in key}

    # Float tensors go straight into the skeleton (no copy into meta parameters); the 4-bit
    # layers are built and filled by slimtune.quant from their bitsandbytes keys.
    for key, tensor in state.items():
        if any(key.startswith(f"{q}.") for q in quantized):
            continue
        name = checkpoint_name(model, key, expected)
        if name is not None:
            set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    model.tie_weights()  # before loading: a tied output layer has no key of its own
    load_quantized_state_dict(model, state)


def _load_in_parts(model: nn.Module, folder: Path, dtype: torch.dtype, keep_part: KeepPart) -> None:
    expected = set(model.state_dict().keys())
    files = {path: tensor_keys(path) for path in safetensors_files(folder)}
    layer_keys = _keys_by_layer([key for keys in files.values() for key in keys])
    read: dict[str, dict[str, torch.Tensor]] = {layer: {} for layer in layer_keys}
    for path, keys in files.items():
        for key in keys:
            layer = _layer_of(key, layer_keys)
            name = checkpoint_name(model, key, expected) if layer is None else None
            if layer is None and name is None:
                continue  # a tensor the model has no place for
            tensor = read_tensor(path, key)
            if name is not None:  # a float tensor
                set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                module_name, _, attr = name.rpartition(".")
                keep_part(model.get_submodule(module_name), attr)
                continue
            read[layer][key] = tensor
            if len(read[layer]) == len(layer_keys[layer]):  # the layer is complete: build it
                load_quantized_state_dict(model, read.pop(layer), whole=False)
                for tensor_name in ("bias", *Linear4bit.SHARDABLE):
                    keep_part(model.get_submodule(layer), tensor_name)


def _keys_by_layer(keys: list[str]) -> dict[str, set[str]]:
    """{4-bit layer: all its keys} (a layer is named by its quant-state key)."""
    layers: dict[str, set[str]] = {k[: k.index(QUANT_MARK)]: set() for k in keys if QUANT_MARK in k}
    for key in keys:
        if (layer := _layer_of(key, layers)) is not None:
            layers[layer].add(key)
    return layers


def _layer_of(key: str, layers: dict[str, set[str]]) -> str | None:
    """The 4-bit layer whose tensor `key` is (`key` starts with its name and a dot), if any."""
    parts = key.split(".")
    for end in range(1, len(parts)):
        if (prefix := ".".join(parts[:end])) in layers:
            return prefix
    return None


def _stored_compute_dtype(folder: Path) -> torch.dtype:
    settings = json.loads((folder / "config.json").read_text())["quantization_config"]
    name = str(settings.get("bnb_4bit_compute_dtype") or "float32")
    return QuantConfig(compute_dtype=name).compute_dtype
