"""Jobs the UI starts (training, export) run as processes of their own.

A job is `python -m slimtune ...` in a new session (its own process group): closing the browser
or stopping the UI leaves it running, and a crash in it leaves the UI standing. What the UI
knows of a job is written next to its output (`ui-job.json`: pid, command, exit code), so a
restarted UI still finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from slimtune.files import write_text

_children: dict[int, subprocess.Popen] = {}  # started by this UI: reaped for their exit code


def start(command: list[str], record: Path, log: Path, cwd: Path, **extra) -> dict:
    """Start `python -m slimtune <command>` with output to `log`; describe it in `record`."""
    argv = [sys.executable, "-m", *command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        child = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[child.pid] = child
    info = {"pid": child.pid, "argv": argv, "started": time.time(), **extra}
    write_text(record, json.dumps(info))
    return info


def read(record: Path) -> dict | None:
    try:
        return json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def update(record: Path, **values) -> dict:
    info = {**(read(record) or {}), **values}
    write_text(record, json.dumps(info))
    return info


def poll(record: Path) -> dict | None:
    """The record with `running` set and, once the job has ended, its `returncode` if known."""
    info = read(record)
    if info is None:
        return None
    pid = info.get("pid")
    child = _children.get(pid)
    if child is not None:
        code = child.poll()
        if code is not None:
            _children.pop(pid, None)
            info = update(record, returncode=code, ended=time.time())
    info["running"] = "returncode" not in info and _alive(info)
    return info


def stop(record: Path) -> bool:
    """Interrupt the job (SIGINT to its process group, as Ctrl-C would); False if not running."""
    info = poll(record)
    if not info or not info["running"]:
        return False
    update(record, stopped=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(info["pid"], signal.SIGINT)
    return True


def _alive(info: dict) -> bool:
    """The pid still runs the command we started (not a later process given the same pid)."""
    try:
        process = psutil.Process(info["pid"])
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - info["started"]) < 5 and "slimtune" in " ".join(
            process.cmdline()
        )
    except (psutil.Error, KeyError, TypeError):
        return False
