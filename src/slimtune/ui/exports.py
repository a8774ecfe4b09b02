"""Export a finished run: merge its adapter into the base model (float, or re-quantized to NF4),
write it as GGUF (where slimtune has `slimtune export`), and measure the share of the
fine-tune's gain each export keeps (slimtune.export.survival).

Each export is a process of its own, like training: `python -m slimtune merge ...` writes
`<run>/export-<kind>/`, and `python -m slimtune.export.survival` scores the exports on the
run's eval data.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.ui import jobs
from slimtune.ui.runs import read_config

# kind -> (title, slimtune subcommand, its extra flags, what it writes under the run folder).
KINDS: dict[str, tuple[str, str, list[str], str]] = {
    "merged": ("merged model (fp32 safetensors)", "merge", [], "export-merged"),
    "nf4": ("merged, re-quantized to NF4 4 bits", "merge", ["--quantize", "nf4"], "export-nf4"),
    # Offered where slimtune has its GGUF writer (`slimtune export`); given eval rows, it reports
    # the share of the gain the GGUF file keeps itself (in its log).
    "gguf": ("GGUF for llama.cpp and Ollama (f16)", "export", [], "export-gguf/model.gguf"),
}
GGUF_COMMAND = "slimtune.cli.export"
SURVIVAL = "survival"


def offered() -> list[str]:
    has_gguf = importlib.util.find_spec(GGUF_COMMAND) is not None
    return [k for k in KINDS if k != "gguf" or has_gguf]


def available() -> dict[str, Any]:
    return {
        "kinds": {k: KINDS[k][0] for k in offered()},
        "gguf": "gguf" in offered(),
    }


def _record(run: Path, kind: str) -> Path:
    return run / f"ui-export-{kind}.json"


def start_export(run: Path, kind: str, cwd: Path) -> dict:
    if kind not in offered():
        raise SlimtuneError(f"unknown export {kind!r}; expected one of {', '.join(offered())}")
    _check_ready(run, kind)
    config = read_config(run)
    _, subcommand, extra, target = KINDS[kind]
    output = run / target
    folder = output.parent if output.suffix else output
    if folder.exists() and any(folder.iterdir()):
        raise SlimtuneError(f"{folder.name} exists already: delete it to export again")
    folder.mkdir(parents=True, exist_ok=True)
    command = ["slimtune", subcommand, "--adapter", str(run), "--output", str(output)]
    command += _base_flags(config) + extra
    if kind == "gguf" and config.get("eval_data"):
        command += ["--eval", config["eval_data"], "--eval-limit", "64"]
    log = run / f"export-{kind}.log"
    return jobs.start(command, _record(run, kind), log, cwd, output=str(output))


def start_survival(run: Path, cwd: Path, limit: int = 64) -> dict:
    """Score base, fine-tune and both exports on the run's eval data (written to a JSON file)."""
    _check_ready(run, SURVIVAL)
    config = read_config(run)
    if not config.get("eval_data"):
        raise SlimtuneError("the share of the gain kept needs eval data (the run's eval_data)")
    command = ["slimtune.export.survival", "--adapter", str(run), "--test", config["eval_data"]]
    command += _base_flags(config) + ["--limit", str(limit)]
    # survival prints its JSON result on stdout, after anything else: the log is parsed at the end.
    return jobs.start(command, _record(run, SURVIVAL), run / f"export-{SURVIVAL}.log", cwd)


def _check_ready(run: Path, kind: str) -> None:
    if not (run / "adapter_config.json").is_file():
        raise SlimtuneError(f"{run.name} has no adapter yet: exports need a finished run")
    info = jobs.poll(_record(run, kind))
    if info and info["running"]:
        raise SlimtuneError(f"the {kind} export of {run.name} is running")


def _base_flags(config: dict) -> list[str]:
    flags = ["--model", config["model"]] if config.get("model") else []
    return flags + (["--qlora"] if config.get("method") == "qlora" else [])


def export_status(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in [*offered(), SURVIVAL]:
        info = jobs.poll(_record(run, kind))
        if info is None:
            out[kind] = {"state": "none"}
            continue
        code = info.get("returncode")
        state = "running" if info["running"] else ("done" if code == 0 else "failed")
        item: dict[str, Any] = {"state": state, "output": info.get("output")}
        log = run / f"export-{kind}.log"
        if state == "failed" or (state == "done" and kind != SURVIVAL):
            item["log"] = _tail(log)
        if state == "done" and kind == SURVIVAL:
            item["result"] = _json_at_end(log)
        out[kind] = item
    return out


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _json_at_end(log: Path) -> dict | None:
    """The JSON object survival printed last (it starts at a line that is just '{')."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    start = text.rfind("\n{\n")
    start = start + 1 if start >= 0 else (0 if text.startswith("{\n") else -1)
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None
