"""Which rows each optimizer step trains on.

The order is a pure function of (seed, epoch), and a step's rows a pure function of the step
number, so the data position of a checkpoint is just its step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    """Optimizer step -> micro-batches of row indices (each micro-batch one global batch)."""

    n_rows: int
    rows_per_micro: int  # batch_size x world_size: the rows all ranks train on together
    grad_accum: int
    epochs: int
    seed: int
    max_steps: int | None = None
    drop_last: bool = False  # data parallel: every rank must get a full share

    @property
    def micro_per_epoch(self) -> int:
        if self.drop_last:
            return self.n_rows // self.rows_per_micro
        return math.ceil(self.n_rows / self.rows_per_micro)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def is_epoch_end(self, step: int) -> bool:
        """True if optimizer step `step` (0-based) is the last of its epoch."""
        return (step + 1) % self.steps_per_epoch == 0

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n_rows, generator=generator).tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        first = within * self.grad_accum
        last = min(first + self.grad_accum, self.micro_per_epoch)
        size = self.rows_per_micro
        return [order[i * size : (i + 1) * size] for i in range(first, last)]
