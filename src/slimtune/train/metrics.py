"""metrics.jsonl (one JSON object per logged step or evaluation) and loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slimtune.files import atomic_file, write_text


class MetricsLog:
    """Appends records to `metrics.jsonl`, flushing each line so a killed run keeps its log."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []

    def truncate_after(self, step: int) -> None:
        """On resume: keep the records up to `step`, drop those the killed run wrote later."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
        self.records = kept
        if self.enabled:
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _clean(value):
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    return value


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Train loss per step and eval loss per evaluation, one figure (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), float)]
    preference = any("reward_margin" in r or "eval_reward_margin" in r for r in records)
    if preference:  # DPO / ORPO: a second panel with rewards and preference accuracy
        fig, (ax, low) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        _plot_preference(low, records)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if preference else "loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _plot_preference(ax, records: list[dict[str, Any]]) -> None:
    """Reward margin (left axis) and preference accuracy (right axis), train and eval."""
    for key, style, label in (
        ("reward_margin", "-", "train reward margin"),
        ("eval_reward_margin", "o-", "eval reward margin"),
    ):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), float)]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    for key, style, label in (
        ("reward_accuracy", "--", "train preference accuracy"),
        ("eval_reward_accuracy", "s--", "eval preference accuracy"),
    ):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            right.plot(
                *zip(*points, strict=True),
                style,
                label=label,
                linewidth=1,
                color="C3" if "eval" in key else "C2",
            )
    right.set_ylim(-0.02, 1.02)
    right.set_ylabel("preference accuracy")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
