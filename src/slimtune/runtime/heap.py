"""Keep glibc's heap from holding freed memory: every call slimtune makes into glibc's malloc.

Two remedies for training, both for glibc (Linux):

- `lean_heap_environment()`: the GLIBC_TUNABLES that turn off malloc's per-thread cache and its
  fast bins. Their small free chunks are never merged with their neighbours, so they split the
  heap that a training step frees into thousands of pieces too small for the next step's
  activations, and the heap grows; without them a SmolLM2 QLoRA step peaks about half as high
  again, at the same speed (benchmarks/reports/train.md). Tunables are read when a process
  starts: the CLI re-executes itself once with them (`reexec_with_lean_heap`).
- `limit_heap_fragmentation()`: serve large blocks with mmap, described below. It frees memory
  at once but pays a page fault per fresh page, which slows a step about twofold for a little
  less peak (benchmarks/reports/memory.md); `benchmarks/bench_7b.py --heap mmap` uses it.

And one for loading: `release_freed_memory()` (malloc_trim) hands back the pages a streamed load
leaves free between the small tensors that stay.

glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, so
after a few steps most activation tensors come from the brk heap, which is only returned to
the system from its top. Under gradient checkpointing each block's small kept input lands
above the block's freed temporaries and pins them: a checkpointed forward pass grows RSS by
over ten times as much with glibc's defaults as with a fixed 64 KiB threshold
(benchmarks/reports/memory.md, benchmarks/bench_7b.py shapes).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h


def limit_heap_fragmentation(threshold: int = 64 * 1024) -> bool:
    """Serve allocations of `threshold` bytes or more with mmap (freed at once); fixing the
    threshold also stops glibc from raising it. True if applied (glibc), False elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


LEAN_HEAP_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
_OPT_OUT = "SLIMTUNE_LEAN_HEAP"  # set to 0 to keep glibc's defaults


def lean_heap_environment(env: dict[str, str]) -> dict[str, str] | None:
    """`env` plus the lean-heap tunables, or None when there is nothing to do (not glibc,
    already set, or the user opted out with SLIMTUNE_LEAN_HEAP=0)."""
    if platform.libc_ver()[0] != "glibc" or env.get(_OPT_OUT) == "0":
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" in current or "glibc.malloc.mxfast" in current:
        return None  # the user's (or our earlier) choice stands
    joined = f"{current}:{LEAN_HEAP_TUNABLES}" if current else LEAN_HEAP_TUNABLES
    return {**env, "GLIBC_TUNABLES": joined}


def reexec_with_lean_heap(command: list[str]) -> None:
    """Replace this process with `command` (an argv whose first item is the program) under the
    lean-heap tunables: same pid, same environment otherwise. Returns only when that does not
    apply (see lean_heap_environment)."""
    env = lean_heap_environment(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Each layer a streamed load quantizes leaves float temporaries behind, interleaved on the heap
    with the small 4-bit tensors that stay; glibc keeps such fragmented pages, so RSS would creep
    up layer by layer (by ~180 MiB over SmolLM2's 210 layers) although the memory is free.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
