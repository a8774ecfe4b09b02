"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to zero.

The rate is a pure function of the step number, so a resumed run needs no scheduler state
beyond the step it stopped at.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    if warmup_steps is not None:
        return warmup_steps
    return math.ceil(total_steps * warmup_ratio)


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup:
        return base_lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr schedule {schedule!r}")
