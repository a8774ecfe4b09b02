"""Optimizer state as safetensors + JSON: tensors in one file, everything else as JSON.

`torch.optim.Optimizer.state_dict()` is a nested dict of tensors and plain values that is
usually pickled. We split it: every tensor goes under a flat key `state.<index>.<name>`, and the
rest (param groups, non-tensor state entries) into a JSON document stored in the safetensors
header, so one file holds the lot and nothing is ever unpickled. Training checkpoints
(slimtune.train.checkpoint) store the optimizer this way.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from slimtune.errors import SlimtuneError
from slimtune.files import atomic_file

METADATA_KEY = "slimtune.optimizer"


def flatten_state_dict(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-serializable document."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    groups = [_plain(group) for group in state_dict["param_groups"]]
    document = {"param_groups": groups, "plain_state": plain}
    json.dumps(document)  # fail here, not half-way through writing, if something is not JSON
    return tensors, document


def _plain(value: Any) -> Any:
    """`value` with tensors (e.g. a tensor learning rate) as numbers, for JSON."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value.item() if torch.is_tensor(value) else value


def unflatten_state_dict(tensors: dict[str, torch.Tensor], document: dict) -> dict[str, Any]:
    """The inverse of `flatten_state_dict`: a state dict `Optimizer.load_state_dict` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in document.get("plain_state", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = [
        dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in document["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def save_optimizer_state(
    optimizer: torch.optim.Optimizer | dict[str, Any], path: str | os.PathLike
) -> None:
    """Write `optimizer.state_dict()` (or that state dict, given) to one safetensors file,
    atomically."""
    from safetensors.torch import save_file

    state_dict = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, document = flatten_state_dict(state_dict)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(document)})


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Restore a state written by `save_optimizer_state` into `optimizer` (same parameters)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if METADATA_KEY not in metadata:
            raise SlimtuneError(
                f"{path}: not a slimtune optimizer state (no {METADATA_KEY!r} header)"
            )
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    document = json.loads(metadata[METADATA_KEY])
    try:
        optimizer.load_state_dict(unflatten_state_dict(tensors, document))
    except (ValueError, KeyError) as error:
        raise SlimtuneError(f"{path}: optimizer state does not match this run: {error}") from error
