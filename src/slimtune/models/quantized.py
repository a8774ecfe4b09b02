"""Load a 4-bit model folder (bitsandbytes layout, as `save_quantized_model` writes it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.models.skeleton import build_skeleton, checkpoint_name, finish, set_tensor
from slimtune.models.source import safetensors_files
from slimtune.quant import Linear4bit, QuantConfig, load_quantized_state_dict

QUANT_MARK = ".weight.quant_state.bitsandbytes__"


def load_4bit_folder(
    folder: Path,
    *,
    dtype: torch.dtype,
    trust_remote_code: bool,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild the model with Linear4bit layers holding exactly the stored 4-bit tensors.

    `compute_dtype` defaults to the folder's `bnb_4bit_compute_dtype`.
    """
    model = build_skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
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
    compute_dtype = compute_dtype or _stored_compute_dtype(folder)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = compute_dtype
    return finish(model, folder)


def _stored_compute_dtype(folder: Path) -> torch.dtype:
    settings = json.loads((folder / "config.json").read_text())["quantization_config"]
    name = str(settings.get("bnb_4bit_compute_dtype") or "float32")
    return QuantConfig(compute_dtype=name).compute_dtype
