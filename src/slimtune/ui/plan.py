"""The memory planner's estimate for the settings on the form, against the machine's memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

from slimtune.memory import PlanSettings, builtin_architecture, estimate, resolve_architecture

DEFAULT_ARCHITECTURE = "smollm2-135m"  # the default model's


def memory_plan(settings: dict[str, Any], model: Path | None) -> dict[str, Any]:
    """`{"total_bytes", "parts", "memory_bytes", "fits", ...}` for the form's settings."""
    arch = resolve_architecture(str(model)) if model else builtin_architecture(DEFAULT_ARCHITECTURE)
    targets = settings.get("targets") or "all-linear"
    if isinstance(targets, str) and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    plan = PlanSettings(
        method=settings.get("method", "qlora"),
        rank=int(settings.get("rank", 64)),
        targets=targets,
        batch_size=int(settings.get("batch_size", 4)),
        max_length=int(settings.get("max_length", 512)),
        gradient_checkpointing=bool(settings.get("gradient_checkpointing", False)),
        optimizer=settings.get("optimizer", "adamw"),
        dropout=float(settings.get("dropout", 0.05)),
        quant_type=settings.get("quant_type", "nf4"),
        double_quant=bool(settings.get("double_quant", True)),
    )
    result = estimate(arch, plan)
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
