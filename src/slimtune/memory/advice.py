"""When a run does not fit: change one setting at a time, cheapest loss first, until it does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimtune.memory.architecture import Architecture
from slimtune.memory.batch import RowSizes
from slimtune.memory.planner import MemoryEstimate, estimate, planned_compute_dtype

if TYPE_CHECKING:
    from slimtune.train.config import TrainConfig


def _changed(config: TrainConfig, **update: Any) -> TrainConfig | None:
    """`config` with `update`, or None where the trainer would refuse the result (a PiSSA run
    cannot become QLoRA, for one)."""
    try:
        return type(config)(**{**config.model_dump(), **update})
    except ValueError:  # pydantic's ValidationError
        return None


def _candidates(config: TrainConfig, auto_dtype: str) -> list[tuple[str, TrainConfig | None]]:
    """Changes in the order we would make them: free first, then slower, then lossier."""
    out: list[tuple[str, TrainConfig | None]] = []
    if not config.gradient_checkpointing:
        out.append(("--gradient-checkpointing", _changed(config, gradient_checkpointing=True)))
    if not config.optimizer.endswith("8bit"):
        name = "paged_adamw8bit" if config.optimizer.startswith("paged") else "adamw8bit"
        out.append((f"--optimizer {name}", _changed(config, optimizer=name)))
    if config.method != "qlora":
        out.append(("--method qlora", _changed(config, method="qlora")))
    if config.batch_size > 1:
        out.append(("--batch-size 1 (raise --grad-accum to keep the effective batch)",
                    _changed(config, batch_size=1)))  # fmt: skip
    if config.method != "full" and planned_compute_dtype(config, auto_dtype) == "float32":
        out.append(("--compute-dtype bfloat16", _changed(config, compute_dtype="bfloat16")))
    if config.method != "full" and config.rank > 8:
        out.append(("--rank 8", _changed(config, rank=8)))
    if config.max_length > 256:
        out.append(("--max-length 256", _changed(config, max_length=256)))
    return out


def suggest(
    arch: Architecture,
    config: TrainConfig,
    budget: int,
    device: str = "cpu",
    auto_dtype: str = "float32",
    rows: RowSizes | None = None,
    tokenizer_bytes: int = 0,
) -> list[tuple[str, MemoryEstimate]]:
    """Cumulative changes, each with the estimate after it; stops as soon as one fits.
    `rows`, `tokenizer_bytes`: the training rows and the tokenizer, as `estimate` takes them."""
    steps: list[tuple[str, MemoryEstimate]] = []
    current = config
    while True:
        best = None
        now = estimate(arch, current, device, auto_dtype, 1, rows, tokenizer_bytes).total
        for flag, candidate in _candidates(current, auto_dtype):
            if candidate is None:
                continue
            result = estimate(arch, candidate, device, auto_dtype, 1, rows, tokenizer_bytes)
            if result.total < 0.98 * now:  # worth a flag: saves at least 2%
                best = (flag, candidate, result)
                break  # the first change that helps, in our order of preference
        if best is None:
            return steps
        flag, current, result = best
        steps.append((flag, result))
        if result.total <= budget:
            return steps
