"""When a run does not fit: change one setting at a time, cheapest loss first, until it does."""

from __future__ import annotations

from dataclasses import replace

from slimtune.memory.architecture import Architecture
from slimtune.memory.planner import MemoryEstimate, PlanSettings, estimate


def _candidates(s: PlanSettings) -> list[tuple[str, PlanSettings]]:
    """Changes in the order we would make them: free first, then slower, then lossier."""
    out: list[tuple[str, PlanSettings]] = []
    if not s.gradient_checkpointing:
        out.append(("--gradient-checkpointing", replace(s, gradient_checkpointing=True)))
    if not s.optimizer.endswith("8bit"):
        name = "paged_adamw8bit" if s.optimizer.startswith("paged") else "adamw8bit"
        out.append((f"--optimizer {name}", replace(s, optimizer=name)))
    if s.method != "qlora":
        out.append(("--method qlora", replace(s, method="qlora")))
    if s.batch_size > 1:
        out.append(("--batch-size 1 (raise --grad-accum to keep the effective batch)",
                    replace(s, batch_size=1)))  # fmt: skip
    for key in ("weight_dtype", "adapter_dtype"):
        if getattr(s, key) in ("float32", "fp32"):
            flag = "--" + key.replace("_", "-")
            out.append((f"{flag} bfloat16", replace(s, **{key: "bfloat16"})))
    if s.method != "full" and s.rank > 8:
        out.append(("--rank 8", replace(s, rank=8)))
    if s.max_length > 256:
        out.append(("--max-length 256", replace(s, max_length=256)))
    return out


def suggest(
    arch: Architecture, settings: PlanSettings, budget: int
) -> list[tuple[str, MemoryEstimate]]:
    """Cumulative changes, each with the estimate after it; stops as soon as one fits."""
    steps: list[tuple[str, MemoryEstimate]] = []
    current = settings
    while True:
        best = None
        now = estimate(arch, current).total
        for flag, candidate in _candidates(current):
            result = estimate(arch, candidate)
            if result.total < 0.98 * now:  # worth a flag: saves at least 2%
                best = (flag, candidate, result)
                break  # the first change that helps, in our order of preference
        if best is None:
            return steps
        flag, current, result = best
        steps.append((flag, result))
        if result.total <= budget:
            return steps
