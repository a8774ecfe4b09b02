"""Process tuning: how a slimtune process uses glibc's allocator and its thread pools.

These are settings of the whole process, kept out of the library's math and switched on in one
place: the CLI's `main()` calls `tune_process()` before any command loads torch. Each has an
off switch:

    passive OpenMP waits   OMP_WAIT_POLICY=PASSIVE        off: set OMP_WAIT_POLICY yourself
      (commands that decode: short spins, GOMP_SPINCOUNT=20000; off: set either yourself)
    numba on OpenMP        NUMBA_THREADING_LAYER_PRIORITY off: set it (or NUMBA_THREADING_LAYER)
    lean heap (training)   GLIBC_TUNABLES, one re-exec    off: SLIMTUNE_LEAN_HEAP=0

A library caller (a notebook, a script calling `train()`) gets the same by calling
`tune_process()` before importing torch, or by setting the variables itself. The training-time
model changes that keep a step lean are `TrainConfig` flags (`lean_mlp`, `sparse_dropout`),
applied by `train()`.
"""

from __future__ import annotations

import os

from slimtune.runtime.heap import (
    LEAN_HEAP_TUNABLES,
    lean_heap_environment,
    limit_heap_fragmentation,
    reexec_with_lean_heap,
    release_freed_memory,
)
from slimtune.runtime.threads import (
    numba_prefers_openmp,
    passive_openmp_waits,
    short_openmp_spins,
)


def tune_process(restart: list[str] | None = None, decoding: bool = False) -> None:
    """Switch on the thread policy (short spins for a command that decodes, `decoding`; else
    passive waits) and, given `restart`, the lean heap.

    `restart` is the argv that starts this same program again (its first item the executable):
    glibc reads its tunables only when a process starts, so the process is replaced by `restart`
    under them (same pid; this call then never returns) unless they are set already or switched
    off. The thread settings are made first, so the new process inherits them.
    """
    if decoding:
        short_openmp_spins(os.environ)
    else:
        passive_openmp_waits(os.environ)
    numba_prefers_openmp(os.environ)
    if restart is not None:
        reexec_with_lean_heap(restart)


__all__ = [
    "LEAN_HEAP_TUNABLES",
    "lean_heap_environment",
    "limit_heap_fragmentation",
    "numba_prefers_openmp",
    "passive_openmp_waits",
    "reexec_with_lean_heap",
    "release_freed_memory",
    "short_openmp_spins",
    "tune_process",
]
