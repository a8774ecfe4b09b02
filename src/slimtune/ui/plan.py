"""The memory planner's estimate for the settings on the form, against the machine's memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

from slimtune.hardware import device_has_native_bf16
from slimtune.memory import builtin_architecture, estimate, resolve_architecture
from slimtune.train.config import TrainConfig, load_config

DEFAULT_ARCHITECTURE = "smollm2-135m"  # the default model's


def memory_plan(settings: dict[str, Any], model: Path | None) -> dict[str, Any]:
    """`{"total_bytes", "parts", "memory_bytes", "fits", ...}` for the form's settings, read as
    `slimtune train` reads them (where the run goes: this machine's CPU)."""
    arch = resolve_architecture(str(model)) if model else builtin_architecture(DEFAULT_ARCHITECTURE)
    result = estimate(arch, plan_config(settings), "cpu", auto_dtype=_auto_dtype())
    memory = psutil.virtual_memory()
    return {
        "model": arch.name,
        "total_bytes": result.total,
        "parts": result.parts,
        "trainable_params": result.trainable_params,
        "total_params": arch.num_params(),
        "memory_bytes": memory.total,
        "available_bytes": memory.available,
        "fits": result.total <= memory.available,
        "notes": result.notes,
    }


def plan_config(settings: dict[str, Any]) -> TrainConfig:
    """The training config of the form's settings, every key checked as `slimtune train` checks
    it; the model and file paths play no part in the plan."""
    values = {
        key: value
        for key, value in settings.items()
        if value not in (None, "") and key in TrainConfig.model_fields
    }
    values.pop("model", None)
    if isinstance(values.get("targets"), str) and "," in values["targets"]:
        values["targets"] = [t.strip() for t in values["targets"].split(",") if t.strip()]
    return load_config(None, values)


def _auto_dtype() -> str:
    return "bfloat16" if device_has_native_bf16("cpu") else "float32"
