"""Large fresh tensors on transparent huge pages.

A fresh 64 MiB tensor is a fresh mmap: the kernel zeroes it page by page on first touch, 16,384
faults of 4 KiB. Asking for huge pages (madvise MADV_HUGEPAGE, honoured when the system's THP
setting is `madvise` or `always`) makes that 32 faults of 2 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache
from pathlib import Path

import torch

HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14
MIN_BYTES = 4 * HUGE_PAGE  # below this malloc usually reuses heap memory anyway


@cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    if "[never]" in setting:
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def empty_large(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """torch.empty(shape), on huge pages where it is big enough and the system allows."""
    out = torch.empty(shape, dtype=dtype, device=device)
    madvise = _madvise() if out.device.type == "cpu" and out.nbytes >= MIN_BYTES else None
    if madvise is not None:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # whole huge pages inside it
        end = (out.data_ptr() + out.nbytes) // HUGE_PAGE * HUGE_PAGE
        madvise(start, end - start, MADV_HUGEPAGE)  # advice only: failure changes nothing
    return out
