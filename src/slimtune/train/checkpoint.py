"""Checkpoints that a killed run can resume from exactly, written without pickle.

A checkpoint is a folder `checkpoints/step-000042/` holding:
- `trainable.safetensors`: every trainable parameter by name (the LoRA matrices);
- `optimizer.safetensors`: the optimizer's state dict (slimtune.optim.save_optimizer_state);
- `rng.safetensors`: torch's RNG states (dropout draws continue where they stopped);
- `trainer_state.json`: the step (which fixes the data position and the learning rate), the
  epoch and the config digest.
The folder is filled under a temporary name and renamed into place (slimtune.files), so a
folder named `step-N` is always complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimtune.errors import SlimtuneError
from slimtune.files import atomic_folder
from slimtune.optim import load_optimizer_state, save_optimizer_state

STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under `folder` atomically, then delete all but the last `keep`.
    `optimizer`: the optimizer or its state dict (a sharded one gathered whole)."""
    final = folder / f"step-{step:06d}"
    # replace: a rerun of the same step (resume from an older checkpoint) writes it again.
    with atomic_folder(final, replace=True) as tmp:
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        _save_tensors(trainable, tmp / "trainable.safetensors")
        save_optimizer_state(optimizer, tmp / "optimizer.safetensors")
        _save_tensors(_rng_states(), tmp / "rng.safetensors")
        state = json.dumps({**trainer_state, "step": step})
        (tmp / "trainer_state.json").write_text(state)
    _prune(folder, keep)
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses views that share storage (tied weights): store plain copies.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))


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
    load_optimizer_state(optimizer, path / "optimizer.safetensors")
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
    # A run killed while saving leaves a folder under slimtune.files' temporary name.
    for partial in folder.glob(".step-*.tmp-*"):
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
