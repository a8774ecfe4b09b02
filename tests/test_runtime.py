"""Process tuning (slimtune.runtime): the CLI switches it on in one place, each switch has an off
switch, and the library's own code touches none of these process-wide settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest

import slimtune.cli as cli
from slimtune.runtime import (
    LEAN_HEAP_TUNABLES,
    lean_heap_environment,
    numba_prefers_openmp,
    passive_openmp_waits,
    short_openmp_spins,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "slimtune"
GLIBC = platform.libc_ver()[0] == "glibc"
TUNING_VARIABLES = ("GLIBC_TUNABLES", "SLIMTUNE_LEAN_HEAP", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                    "NUMBA_THREADING_")  # fmt: skip


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )


def _untuned_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(TUNING_VARIABLES)}


# ------------------------------------------------------------------------ one place


def test_process_settings_are_made_only_in_slimtune_runtime():
    """No library module sets allocator or thread-pool policy; the CLI alone starts the tuning."""
    process_wide = (
        "GLIBC_TUNABLES",
        "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT",
        "THREADING_LAYER",
        "malloc_trim",
        "mallopt",
    )
    offenders, starters = [], []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC).as_posix()
        text = path.read_text()
        if not relative.startswith("runtime/"):
            offenders += [f"{relative}: {word}" for word in process_wide if word in text]
            if "tune_process(" in text:
                starters.append(relative)
    assert offenders == []
    assert starters == ["cli/__init__.py"]


class _Stop(Exception):
    pass


@pytest.fixture
def tune_calls(monkeypatch) -> list:
    """What main() hands to tune_process; the command itself is never run."""
    calls = []

    def record(restart=None, decoding=False):
        calls.append((restart, decoding))
        raise _Stop

    monkeypatch.setattr(cli, "tune_process", record)
    return calls


def test_a_training_command_restarts_under_the_lean_heap(tune_calls, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["slimtune", "train", "run.yaml", "--max-steps", "3"])
    with pytest.raises(_Stop):
        cli.main()
    assert tune_calls == [
        ([sys.executable, "-m", "slimtune", "train", "run.yaml", "--max-steps", "3"], False)
    ]


@pytest.mark.parametrize(
    "argv", [["generate", "Hi"], ["eval", "--data", "test.jsonl"], ["serve"]], ids=lambda a: a[0]
)
def test_decoding_commands_spin_briefly(tune_calls, argv):
    with pytest.raises(_Stop):
        cli.main(argv)
    assert tune_calls == [(None, True)]


@pytest.mark.parametrize(
    "words, argv",
    [(["estimate", "smollm2-135m"], None), (["train", "run.yaml"], ["train", "run.yaml"])],
    ids=["not-training", "library-call"],
)
def test_other_commands_and_library_calls_tune_threads_only(tune_calls, monkeypatch, words, argv):
    monkeypatch.setattr(sys, "argv", ["slimtune", *words])
    with pytest.raises(_Stop):
        cli.main(argv)
    assert tune_calls == [(None, False)]


def test_parsing_the_command_line_loads_no_torch():
    """OpenMP reads OMP_WAIT_POLICY when torch loads it: main() tunes after parsing, so parsing
    must not import torch."""
    code = (
        "import sys; from slimtune.cli import build_parser; build_parser(); "
        "print([m for m in ('torch', 'numba') if m in sys.modules])"
    )
    done = _python(code, dict(os.environ))
    assert done.stdout.strip() == "[]", done.stderr


# ------------------------------------------------------------------------ each switch, on and off


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_tune_process_sets_everything_and_each_off_switch_holds():
    show = (
        "import os; print(*(os.environ.get(k) for k in "
        "('OMP_WAIT_POLICY', 'NUMBA_THREADING_LAYER_PRIORITY', 'GLIBC_TUNABLES')), sep='|')"
    )
    # The restarted process shows its settings; when there is no restart, this one does.
    code = (
        "import sys; from slimtune.runtime import tune_process; "
        f"tune_process([sys.executable, '-c', {show!r}]); {show}"
    )
    env = _untuned_environment()
    tuned = _python(code, env)
    assert tuned.stdout.strip() == f"PASSIVE|omp tbb workqueue|{LEAN_HEAP_TUNABLES}", tuned.stderr
    off = {
        "OMP_WAIT_POLICY": "ACTIVE",
        "NUMBA_THREADING_LAYER_PRIORITY": "workqueue omp tbb",
        "SLIMTUNE_LEAN_HEAP": "0",
    }
    untouched = _python(code, {**env, **off})
    assert untouched.stdout.strip() == "ACTIVE|workqueue omp tbb|None", untouched.stderr


def test_passive_openmp_waits_unless_a_policy_is_set():
    env: dict[str, str] = {}
    assert passive_openmp_waits(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not passive_openmp_waits(env) and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_short_openmp_spins_unless_a_policy_or_count_is_set():
    env: dict[str, str] = {}
    assert short_openmp_spins(env) and env == {"GOMP_SPINCOUNT": "20000"}
    for mine in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(mine)
        assert not short_openmp_spins(env) and env == mine
    assert not passive_openmp_waits({"GOMP_SPINCOUNT": "100"})


def test_numba_prefers_openmp_also_once_loaded(monkeypatch):
    fake = types.SimpleNamespace(config=types.SimpleNamespace(THREADING_LAYER_PRIORITY=["tbb"]))
    monkeypatch.setitem(sys.modules, "numba", fake)
    env: dict[str, str] = {}
    assert numba_prefers_openmp(env)
    assert env == {"NUMBA_THREADING_LAYER_PRIORITY": "omp tbb workqueue"}
    assert fake.config.THREADING_LAYER_PRIORITY == ["omp", "tbb", "workqueue"]
    fake.config.THREADING_LAYER_PRIORITY = ["tbb"]
    assert not numba_prefers_openmp({"NUMBA_THREADING_LAYER_PRIORITY": "tbb omp workqueue"})
    assert fake.config.THREADING_LAYER_PRIORITY == ["tbb"]


# ------------------------------------------------------------------------ the heap


def test_limit_heap_fragmentation_applies_on_glibc():
    code = "from slimtune.runtime import limit_heap_fragmentation as f; print(f())"
    done = _python(code, dict(os.environ))
    assert done.stdout.strip() == ("True" if sys.platform == "linux" else "False"), done.stderr


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_reexec_runs_the_command_under_the_lean_heap_tunables():
    show = "import os; print(os.environ['GLIBC_TUNABLES'])"
    code = (
        "import sys; from slimtune.runtime import reexec_with_lean_heap as r; "
        f"r([sys.executable, '-c', {show!r}]); print('not replaced')"
    )
    env = _untuned_environment()
    done = _python(code, env)
    assert done.stdout.strip() == LEAN_HEAP_TUNABLES, done.stderr
    opted_out = _python(code, {**env, "SLIMTUNE_LEAN_HEAP": "0"})
    assert opted_out.stdout.strip() == "not replaced", opted_out.stderr


def test_lean_heap_environment_keeps_a_users_tunables():
    if not GLIBC:
        assert lean_heap_environment({}) is None
        return
    assert lean_heap_environment({"GLIBC_TUNABLES": "glibc.malloc.mxfast=64"}) is None
    merged = lean_heap_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert merged == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{LEAN_HEAP_TUNABLES}", "X": "1"}
