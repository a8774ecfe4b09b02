"""Checkpoints that a killed run can resume from exactly, written without pickle.

A checkpoint is a folder `checkpoints/step-000042/` holding:
- `trainable.safetensors`: every trainable parameter by name (the LoRA matrices);
- `optimizer.safetensors` + `optimizer.json`: the optimizer's state dict, tensors and the rest;
- `rng.safetensors`: torch's RNG states (dropout draws continue where they stopped);
- `trainer_state.json`: the step (which fixes the data position and the learning rate), the
  epoch and the config digest.
Each file is written to a temporary name and renamed; the folder is assembled under a temporary
name and renamed into place last, so a folder named `step-N` is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimtune.errors import SlimtuneError

STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------- atomic files


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # safetensors refuses views that share storage (tied weights): store plain copies.
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- optimizer


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split torch's optimizer state dict into tensors (safetensors) and everything else (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            elif isinstance(value, (int, float, bool, str)) or value is None:
                scalars.setdefault(str(index), {})[key] = value
            else:
                raise TypeError(f"optimizer state {index}.{key} has unsupported type {type(value)}")
    groups = [_jsonable(group) for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


# ------------------------------------------------------------------------------- save / load


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under `folder` atomically, then delete all but the last `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    atomic_save_tensors(trainable, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    atomic_save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    atomic_write_text(tmp / "optimizer.json", json.dumps(opt_meta))
    atomic_save_tensors(_rng_states(), tmp / "rng.safetensors")
    atomic_write_text(tmp / "trainer_state.json", json.dumps({**trainer_state, "step": step}))
    if final.exists():  # a rerun of the same step (resume from an older checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(folder, keep)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    steps = _checkpoints(folder)
    return steps[-1] if steps else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the trainable parameters, optimizer and RNG; return the trainer state."""
    if not (path / "trainer_state.json").is_file():
        raise SlimtuneError(f"{path} is not a slimtune checkpoint (no trainer_state.json)")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(trainable):
        missing = sorted(set(trainable) - set(saved))[:3]
        extra = sorted(set(saved) - set(trainable))[:3]
        raise SlimtuneError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing {missing}, unexpected {extra}): same model, method and targets?"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    meta = json.loads((path / "optimizer.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    _set_rng_states(load_file(str(path / "rng.safetensors")))
    return json.loads((path / "trainer_state.json").read_text())


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(folder: Path, keep: int) -> None:
    for old in _checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in folder.glob(".step-*.tmp-*"):  # left by a run killed while saving
        shutil.rmtree(partial, ignore_errors=True)


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = state
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
