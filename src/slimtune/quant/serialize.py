"""State dicts of 4-bit models in bitsandbytes' key layout, and their safetensors files.

A Linear4bit at `model.layers.0.mlp.up_proj` is stored as bitsandbytes stores its own Linear4bit:
`...up_proj.weight` (packed uint8), `.weight.absmax`, `.weight.quant_map`, with double
quantization `.weight.nested_absmax` and `.weight.nested_quant_map`, and
`.weight.quant_state.bitsandbytes__nf4` (uint8 bytes of a JSON object: quant_type, blocksize,
dtype, shape, nested_blocksize, nested_dtype, nested_offset). transformers + bitsandbytes read
these files, and we read theirs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.files import atomic_file
from slimtune.quant.config import QuantConfig
from slimtune.quant.linear import Linear4bit
from slimtune.quant.model import _is_linear

_META_MARK = ".weight.quant_state.bitsandbytes__"


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict; its Linear4bit layers in bitsandbytes' layout."""
    return dict(model.state_dict())


def _quantized_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{module name: its JSON quant state} for every 4-bit weight in the state dict."""
    found = {}
    for key, value in state_dict.items():
        if _META_MARK in key:
            meta = json.loads(bytes(value.tolist()).decode("utf-8"))
            found[key[: key.index(_META_MARK)]] = meta
    return found


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """{name: other names of the same tensor} for parameters shared between modules."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {n: [m for m in names if m != n] for names in by_tensor.values() for n in names}


def load_quantized_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, whole: bool = True
) -> nn.Module:
    """Load a state dict written by quantized_state_dict (or by bitsandbytes) into `model`.

    Linear layers that are still float in `model` but 4-bit in the state dict are replaced by
    Linear4bit first, so a freshly built float model can take a 4-bit checkpoint directly.
    `whole=False`: the state dict is a part of the model's (e.g. one layer), and the model's
    tensors it lacks are not missing.
    """
    for name, meta in _quantized_prefixes(state_dict).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SlimtuneError(
                f"state dict has a 4-bit weight for {name!r}, the model has no such module"
            ) from None
        if isinstance(module, Linear4bit):
            continue
        if not _is_linear(module):
            raise SlimtuneError(
                f"state dict has a 4-bit weight for {name!r}, a {type(module).__name__}"
            )
        config = QuantConfig(
            quant_type=meta["quant_type"],
            blocksize=meta["blocksize"],
            double_quant="nested_offset" in meta,
        )
        out_features, in_features = meta["shape"]
        device = module.weight.device if module.weight.device.type != "meta" else "cpu"
        layer = Linear4bit(
            in_features, out_features, module.bias is not None, config, device=device
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)

    result = model.load_state_dict(state_dict, strict=False)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if not any(t in state_dict for t in tied.get(k, []))]
    missing = missing if whole else []
    if missing or result.unexpected_keys:
        raise SlimtuneError(
            "state dict does not fit the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def save_quantized_safetensors(
    model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write the model's quantized state dict to a safetensors file, atomically.

    Tied parameters are written once (under their first name), as transformers does.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state_dict = quantized_state_dict(model)
    tied = _tied_names(model)
    tensors = {}
    for key, value in state_dict.items():
        if any(t in tensors for t in tied.get(key, [])):
            continue
        tensors[key] = value.contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    return path


def load_quantized_safetensors(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"no such safetensors file: {path}")
    return load_quantized_state_dict(model, load_file(str(path)))
