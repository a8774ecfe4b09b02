"""Training runs: start one as `python -m slimtune train config.yaml`, find every run folder,
and read a run's progress from the files it writes (metrics.jsonl, its log, its checkpoints)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import yaml

from slimtune.errors import SlimtuneError
from slimtune.train.config import TrainConfig, load_config
from slimtune.ui import jobs
from slimtune.ui.paths import Allowed, safe_name

RECORD = "ui-job.json"  # written by the UI next to a run it started
LOG = "train.log"  # the run's stdout and stderr
RUNS_FOLDER = "runs"  # new runs go to <first allowed folder>/runs/<name>
# Folders never searched for runs (large, or not the user's runs).
_SKIP = {"checkpoints", "node_modules", "__pycache__", "site-packages"}
# tqdm's line: "training:  40%|####      | 4/10 [00:03<00:05,  1.20step/s, ...]"
_TQDM = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<(?:(?:(\d+):)?(\d+):(\d+)|\?)")


def run_folder(allowed: Allowed, name: str) -> Path:
    return allowed.resolve(allowed.home / RUNS_FOLDER / safe_name(name, "run name"))


def start_run(allowed: Allowed, name: str, settings: dict[str, Any]) -> Path:
    """Write `<run>/config.yaml` from the form's settings and start training on it."""
    folder = run_folder(allowed, name)
    if folder.exists() and any(folder.iterdir()):
        raise SlimtuneError(f"run {name!r} exists already ({allowed.display(folder)}): pick a name")
    values = {k: v for k, v in settings.items() if v not in (None, "")}
    for key in ("data", "eval_data"):
        if key in values:
            values[key] = str(allowed.resolve(values[key]))
    if isinstance(values.get("targets"), str) and "," in values["targets"]:
        values["targets"] = [t.strip() for t in values["targets"].split(",") if t.strip()]
    if values.get("model"):
        values["model"] = str(allowed.resolve(values["model"]))
    values["output"] = str(folder)
    config = load_config(None, values)  # every key checked as `slimtune train` checks it
    if config.data is None:
        raise SlimtuneError("choose a data file")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config.to_yaml())
    _launch(allowed, folder, resume=False)
    return folder


def resume_run(allowed: Allowed, folder: Path) -> None:
    """Continue a stopped or crashed run from its latest checkpoint."""
    now = status(folder)
    if now["state"] in ("running", "stopping"):
        raise SlimtuneError(f"{allowed.display(folder)} is still running")
    if now["state"] == "finished":
        raise SlimtuneError(f"{allowed.display(folder)} has finished: nothing to resume")
    if not now["can_resume"]:
        raise SlimtuneError(
            f"{allowed.display(folder)} has no checkpoint to resume from yet "
            "(a run writes one every `save_every` steps)"
        )
    _launch(allowed, folder, resume=True)


def _launch(allowed: Allowed, folder: Path, resume: bool) -> None:
    command = ["slimtune", "train", str(folder / "config.yaml")]
    if resume:
        command.append("--resume")
    jobs.start(command, folder / RECORD, folder / LOG, cwd=allowed.home, resumed=resume)


def stop_run(folder: Path) -> bool:
    return jobs.stop(folder / RECORD)


# ------------------------------------------------------------------------------- finding runs


def find_runs(allowed: Allowed, depth: int = 3) -> list[Path]:
    """Every folder under the allowed ones that holds a run (a config.yaml and what a run
    writes), newest first."""
    found: list[Path] = []
    for root in allowed.roots:
        _walk(root, depth, found)
    return sorted(set(found), key=lambda p: _mtime(p), reverse=True)


def _walk(folder: Path, depth: int, found: list[Path]) -> None:
    if is_run(folder):
        found.append(folder)
        return
    if depth == 0:
        return
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith(".") or child.name in _SKIP or child.is_symlink():
            continue
        if child.is_dir():
            _walk(child, depth - 1, found)


def is_run(folder: Path) -> bool:
    if not (folder / "config.yaml").is_file():
        return False
    return any((folder / n).exists() for n in (RECORD, "metrics.jsonl", "adapter_config.json"))


def _mtime(folder: Path) -> float:
    times = [(folder / n).stat().st_mtime for n in (RECORD, "metrics.jsonl", "config.yaml")
             if (folder / n).exists()]  # fmt: skip
    return max(times, default=0.0)


# ------------------------------------------------------------------------------- one run


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line being written (cut short) is left out."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_config(folder: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return values if isinstance(values, dict) else {}


def status(folder: Path) -> dict[str, Any]:
    """Where the run stands: state, step of total, loss, tokens/s, ETA, and its evals."""
    info = jobs.poll(folder / RECORD)
    records = read_metrics(folder)
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if "eval_loss" in r]
    config = read_config(folder)
    last = train[-1] if train else {}
    step = int(last.get("step", 0))
    bar = _tqdm(folder / LOG) if info else None
    total = bar["total"] if bar else _total_steps(config, last)
    state = _state(folder, info)
    eta = None
    if state == "running" and total and step < total:
        eta = bar["eta_s"] if bar and bar["eta_s"] is not None else _eta(info, step, total)
    has_checkpoint = (folder / "checkpoints").is_dir() and any(
        p.name.startswith("step-") for p in (folder / "checkpoints").iterdir()
    )
    return {
        "state": state,
        "step": step,
        "total_steps": total,
        "loss": last.get("loss"),
        "lr": last.get("lr"),
        "tokens_per_s": last.get("tokens_per_s"),
        "eta_s": eta,
        "epoch": last.get("epoch"),
        "losses": [[r["step"], r["loss"]] for r in train],
        "evals": evals,
        "model": config.get("model"),
        "method": config.get("method"),
        "data": config.get("data"),
        "eval_data": config.get("eval_data"),
        "has_adapter": (folder / "adapter_model.safetensors").is_file(),
        "can_resume": state in ("stopped", "failed") and has_checkpoint,
        "error": _error(folder) if state == "failed" else None,
        "started": info.get("started") if info else None,
    }


def _state(folder: Path, info: dict | None) -> str:
    finished = (folder / "adapter_model.safetensors").is_file() and (folder / "loss.png").is_file()
    if info is None:
        return "finished" if finished else "incomplete"
    if info["running"]:
        return "stopping" if info.get("stopped") else "running"
    code = info.get("returncode")
    if info.get("stopped") or code in (130, -2):
        return "stopped"
    if code == 0 or (code is None and finished):
        return "finished"
    return "failed" if code is not None else "stopped"


def _tqdm(log: Path) -> dict | None:
    """The last progress line training printed: step, total and tqdm's own ETA."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    matches = list(_TQDM.finditer(tail))
    if not matches:
        return None
    g = matches[-1].groups()
    eta = None
    if g[7] is not None:
        eta = int(g[5] or 0) * 3600 + int(g[6]) * 60 + int(g[7])
    return {"step": int(g[0]), "total": int(g[1]), "eta_s": eta}


def _total_steps(config: dict, last: dict) -> int | None:
    """From a logged record: epoch = whole epochs + k / steps_per_epoch at step k of it."""
    step, epoch = last.get("step"), last.get("epoch")
    if not step or not epoch:
        return config.get("max_steps")
    per_epoch = round(step / epoch)
    total = per_epoch * int(config.get("epochs") or 1)
    return min(total, config["max_steps"]) if config.get("max_steps") else total


def _eta(info: dict | None, step: int, total: int) -> float | None:
    if not info or not step:
        return None
    elapsed = time.time() - info["started"]
    return elapsed / step * (total - step) if math.isfinite(elapsed) else None


def _error(folder: Path) -> str | None:
    """The last lines of the log, where a failed run says why."""
    try:
        lines = (folder / LOG).read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return None
    lines = [line for line in lines if line.strip() and not _TQDM.search(line)]
    return "\n".join(lines[-6:]) or None


def defaults() -> dict[str, Any]:
    """The training settings the form shows, with `slimtune train`'s defaults."""
    return TrainConfig().model_dump()
