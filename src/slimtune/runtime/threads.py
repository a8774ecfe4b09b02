"""Thread policy: how the OpenMP pools of torch and numba wait and which pool numba uses.

Both are environment settings that their runtimes read when they load, so they are set before
torch and numba are imported. A value the user has set wins.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping

OPENMP_WAIT_POLICY = "OMP_WAIT_POLICY"
OPENMP_SPIN_COUNT = "GOMP_SPINCOUNT"  # libgomp's: how long an idle thread spins before sleeping
DECODING_SPINS = "20000"
NUMBA_LAYER_PRIORITY = "NUMBA_THREADING_LAYER_PRIORITY"
OPENMP_FIRST = ["omp", "tbb", "workqueue"]


def passive_openmp_waits(env: MutableMapping[str, str]) -> bool:
    """Idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE) unless `env`
    already names a policy; True if set here.

    Spinning threads are the default: on a machine with other work running, every parallel op
    then waits for a descheduled spinner (a QLoRA step of the demo took 47 s instead of 4.4 s).
    OpenMP reads the policy when torch loads it.
    """
    if _policy_named(env):
        return False
    env[OPENMP_WAIT_POLICY] = "PASSIVE"
    return True


def short_openmp_spins(env: MutableMapping[str, str]) -> bool:
    """Idle OpenMP threads spin briefly, then sleep (GOMP_SPINCOUNT=20000), unless `env` already
    names a policy or a spin count; True if set here. For commands that decode.

    A decode step runs hundreds of small parallel regions (the 4-bit kernels, torch's ops) a few
    microseconds apart. Sleeping threads take tens of microseconds to wake for each: passive
    waits more than halve the tokens per second (SmolLM2 in NF4: 36 against 80-89). A short
    spin covers the gaps within a step and still ends well within a time slice when other
    work wants the core. Training, whose regions are big, keeps passive waits (with two busy
    processes beside it a step took 6.3 s with these spins, 4.2 s with passive waits).
    """
    if _policy_named(env):
        return False
    env[OPENMP_SPIN_COUNT] = DECODING_SPINS
    return True


def _policy_named(env: MutableMapping[str, str]) -> bool:
    """Whether the user chose how idle OpenMP threads wait: their choice wins."""
    return OPENMP_WAIT_POLICY in env or OPENMP_SPIN_COUNT in env


def numba_prefers_openmp(env: MutableMapping[str, str]) -> bool:
    """numba's parallel kernels (the CPU 4-bit decode) on the OpenMP pool first, unless `env`
    already orders the layers; True if set here. (A layer named by NUMBA_THREADING_LAYER is
    used whatever the order.)

    numba's own default tries TBB first; its "workqueue" pool took twice as long per decode call
    as OpenMP (0.54 vs 0.26 ms for a 1536 x 576 weight), and OpenMP's threads follow
    OMP_WAIT_POLICY as torch's do.
    """
    if NUMBA_LAYER_PRIORITY in env:
        return False
    env[NUMBA_LAYER_PRIORITY] = " ".join(OPENMP_FIRST)
    numba = sys.modules.get("numba")
    if numba is not None:  # already loaded: it read its settings then
        numba.config.THREADING_LAYER_PRIORITY = list(OPENMP_FIRST)
    return True
