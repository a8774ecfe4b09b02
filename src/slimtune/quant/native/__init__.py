"""The C kernel for matmuls from packed 4-bit codes, compiled once for the CPU it runs on.

Decoding a 4-bit code is a 16-entry table lookup. A vector permute does 16 of them in one
instruction (AVX-512 `vpermps`; two and a blend on AVX2), but numba (LLVM from Python loops)
never emits it, so the numba kernels do one scalar load per weight. `q4_matmul.c` is ~250 lines
of C with those intrinsics; it is compiled on first use with the system C compiler for the host
CPU (`-march=native`, so AVX2 or AVX-512 is whatever the machine has) into slimtune's cache
folder, under a name keyed by the source, the compiler and the CPU's flags, and loaded with
ctypes. Where there is no compiler, or `SLIMTUNE_NATIVE=0`, `library()` is None and callers use
the numba kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sysconfig
import warnings
from functools import cache
from pathlib import Path

import torch

from slimtune.cache import cache_dir
from slimtune.files import atomic_file
from slimtune.hardware import cpu_flags
from slimtune.quant.blockwise import QuantState
from slimtune.quant.codebook import codebook

SOURCE = Path(__file__).with_name("q4_matmul.c")
ENV_SWITCH = "SLIMTUNE_NATIVE"
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"]

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


class _Weight4(ctypes.Structure):
    """`Weight4` of q4_matmul.c, field for field."""

    _fields_ = [("packed", _p), ("out", _i64), ("in_", _i64), ("blocksize", _i64), ("lut", _p),
                ("absmax", _p), ("absmax_codes", _p), ("nested", _p), ("nested_code", _p),
                ("offset", ctypes.c_float), ("nested_blocksize", _i64)]  # fmt: skip


def compiler() -> str | None:
    """The C compiler: $CC, the one Python was built with, else `cc`, if it is installed."""
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        if name and shutil.which(name.split()[0]):
            return name.split()[0]
    return None


def _version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


def library_path(cc: str) -> Path:
    """Where the compiled kernel for this source, compiler and CPU lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _version(cc).encode(), " ".join(_FLAGS).encode(),
                 " ".join(sorted(cpu_flags())).encode()):  # fmt: skip
        key.update(part)
    return cache_dir() / "kernels" / f"q4_matmul-{key.hexdigest()[:16]}.so"


def build(cc: str, target: Path) -> None:
    """Compile the kernel into `target` (atomically: concurrent first uses each write whole)."""
    with atomic_file(target) as tmp:
        subprocess.run([cc, *_FLAGS, str(SOURCE), "-o", str(tmp)], check=True,
                       capture_output=True, text=True, timeout=300)  # fmt: skip


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, compiled first if needed; None where it cannot be had."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        return None
    path = library_path(cc)
    try:
        if not path.is_file():
            build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"the C 4-bit kernel did not build; using numba ({detail})", stacklevel=2)
        return None
    lib.slim_q4_matmul.argtypes = [ctypes.POINTER(_Weight4), _p, _i64, _p, ctypes.c_int]
    lib.slim_f32_matmul.argtypes = [_p, _i64, _i64, _p, _i64, _p, ctypes.c_int]
    lib.slim_q4_lanes.restype = ctypes.c_int
    return lib


def lanes() -> int:
    """Float lanes of the compiled kernel: 16 (AVX-512), 8 (AVX2) or 1 (plain C); 0 without it."""
    lib = library()
    return lib.slim_q4_lanes() if lib is not None else 0


def usable(state: QuantState) -> bool:
    """Whether the kernel reads this weight: whole blocks in a row, 32 weights at least."""
    out_features, in_features = state.shape
    return (
        library() is not None and state.blocksize % 32 == 0 and in_features % state.blocksize == 0
    )


class Weight:
    """What the kernel reads for one packed weight, made once per layer (the tensors are kept
    alive here: the kernel holds their addresses)."""

    def __init__(self, packed: torch.Tensor, state: QuantState):
        self.out_features, self.in_features = state.shape
        lut = codebook(state.quant_type).to(torch.float32).contiguous()
        self._keep = [packed, lut]
        fields = dict(packed=packed.data_ptr(), out=self.out_features, in_=self.in_features,
                      blocksize=state.blocksize, lut=lut.data_ptr())  # fmt: skip
        if state.double_quant:
            nested_code = state.nested_code.to(torch.float32).contiguous()
            self._keep += [state.absmax, state.nested_absmax, nested_code]
            fields.update(absmax_codes=state.absmax.data_ptr(),
                          nested=state.nested_absmax.data_ptr(), nested_code=nested_code.data_ptr(),
                          offset=float(state.offset), nested_blocksize=state.nested_blocksize)  # fmt: skip
        else:
            absmax = state.absmax.to(torch.float32).contiguous()
            self._keep.append(absmax)
            fields.update(absmax=absmax.data_ptr())
        self.struct = _Weight4(**fields)


def _threads(threads: int | None) -> int:
    return threads or torch.get_num_threads()


def matmul(x2d: torch.Tensor, weight: Weight, threads: int | None = None) -> torch.Tensor:
    """x2d @ W.T as float32 (rows, out_features), x2d (rows, in_features) any float dtype."""
    x = x2d.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    status = library().slim_q4_matmul(
        ctypes.byref(weight.struct), x.data_ptr(), x.shape[0], y.data_ptr(), _threads(threads)
    )
    if status != 0:
        raise ValueError(f"the 4-bit kernel cannot read a {tuple(x.shape)} x {weight.in_features}")
    return y


def dense_matmul(
    x2d: torch.Tensor, weight: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """x2d @ weight.T as float32 for a float32 `weight` (out, in), x2d (rows, in): a few rows
    against a big weight (the output layer), where BLAS's matrix-vector product uses one core."""
    x = x2d.to(torch.float32).contiguous()
    w = weight.contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    library().slim_f32_matmul(
        w.data_ptr(), w.shape[0], w.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(),
        _threads(threads),
    )  # fmt: skip
    return y
