"""The C kernels for packed 4-bit codes, compiled once for the CPU they run on.

Decoding a 4-bit code is a 16-entry table lookup. A vector permute does 16 of them in one
instruction (AVX-512 `vpermps`; two and a blend on AVX2, or byte lookups with `vpshufb` for
AVX2 decode steps), but numba (LLVM from Python loops) never emits them, so the numba kernels
do one scalar load per weight. `q4_matmul.c` holds three kernels written with those intrinsics:
a matmul straight from the codes for a few input rows (decode steps), a decode into float32 or
bfloat16 (training's bands), and a few-row product with a float32 weight (the output layer). It
is compiled on first use with the system C compiler for the host CPU (`-march=native`: AVX2 or
AVX-512 is whatever the machine has) into slimtune's cache folder, under a name keyed by the
source, the compiler and the CPU's flags, and loaded with ctypes. It runs on torch's own OpenMP
threads (see q4_matmul.c). Where there is no compiler, or `SLIMTUNE_NATIVE=0`, `library()` is
None and callers use the numba kernels. `SLIMTUNE_NATIVE_ARCH` (a `-march` value, e.g.
`haswell`) builds for an older CPU than the host: the AVX2 kernels measured on an AVX-512
machine.
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
from slimtune.hardware import cpu_flags, cpu_vendor

SOURCE = Path(__file__).with_name("q4_matmul.c")
HEADER = SOURCE.with_name("q4.h")  # what other C files built with the kernels include
ENV_SWITCH = "SLIMTUNE_NATIVE"
ARCH_SWITCH = "SLIMTUNE_NATIVE_ARCH"
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int


class Weight4(ctypes.Structure):
    """`Weight4` of q4_matmul.c, field for field."""

    _fields_ = [("packed", _p), ("out", _i64), ("in_", _i64), ("blocksize", _i64), ("lut", _p),
                ("absmax", _p)]  # fmt: skip


_SIGNATURES = {
    "slim_q4_matmul": [ctypes.POINTER(Weight4), _p, _i64, _p, _int, _int],
    "slim_f32_matmul": [_p, _i64, _i64, _p, _i64, _p, _int],
    "slim_bf16_matmul": [_p, _i64, _i64, _p, _i64, _p, _int],
    "slim_q4_decode": [_p, _i64, _i64, _i64, _p, _i64, _i64, _p, _p, _int, _int],
    "slim_q4_lanes": [],
    "slim_q4_byte_planes": [_int],
    "slim_q4_bf16_dot": [],
}


def compiler() -> str | None:
    """The C compiler: $CC, the one Python was built with, else `cc`, if it is installed."""
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        if name and shutil.which(name.split()[0]):
            return name.split()[0]
    return None


def library_path(
    cc: str, arch: str = "native", sources: tuple[Path, ...] = (SOURCE,), name: str = "q4_matmul"
) -> Path:
    """Where the library compiled from these sources, compiler, target and CPU lives."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in (HEADER, *sources)), version.encode(),
                 " ".join(_FLAGS).encode(), arch.encode(),
                 " ".join(sorted(cpu_flags())).encode()):  # fmt: skip
        key.update(part)
    return cache_dir() / "kernels" / f"{name}-{arch}-{key.hexdigest()[:16]}.so"


def build(
    cc: str, target: Path, arch: str = "native", sources: tuple[Path, ...] = (SOURCE,)
) -> None:
    """Compile `sources` for `-march=arch` into `target` (atomically: concurrent first uses
    each write a whole file)."""
    with atomic_file(target) as tmp:
        command = [cc, *_FLAGS, f"-march={arch}", f"-I{HEADER.parent}", *map(str, sources)]
        subprocess.run([*command, "-o", str(tmp)],
                       check=True, capture_output=True, text=True, timeout=300)  # fmt: skip


def load(
    arch: str | None = None,
    sources: tuple[Path, ...] = (SOURCE,),
    name: str = "q4_matmul",
    signatures: dict[str, list] | None = None,
) -> ctypes.CDLL:
    """The kernels compiled for `arch` (default: $SLIMTUNE_NATIVE_ARCH, else the host CPU; built
    first if needed), with the C files in `sources` beside them (their `signatures`: argument
    types of functions returning int). Raises where they cannot be built."""
    arch = arch or os.environ.get(ARCH_SWITCH) or "native"
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC)")
    sources = (SOURCE, *(s for s in sources if s != SOURCE))
    path = library_path(cc, arch, sources, name)
    if not path.is_file():
        build(cc, path, arch, sources)
    return open_library(path, signatures)


def open_library(path: Path, signatures: dict[str, list] | None = None) -> ctypes.CDLL:
    """A built kernel library, its functions' argument types set (the kernels', and
    `signatures` for functions of companion C files)."""
    lib = ctypes.CDLL(str(path))
    for function, argtypes in {**_SIGNATURES, **(signatures or {})}.items():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = _int
    lib.slim_q4_byte_planes(int(byte_planes_pay()))
    return lib


def byte_planes_pay() -> bool:
    """Whether AVX2 products of a few rows should look codes up byte by byte (`vpshufb`) rather
    than through `vpermps` (q4_matmul.c). On AMD Zen 3 the two run on different pipes and the
    byte planes were 1.3-2.2x faster (benchmarks/reports/infer.md); Intel cores before Ice Lake
    run both on one port, and no Intel CPU has been measured, so Intel keeps `vpermps`."""
    return cpu_vendor() == "AuthenticAMD"


def enabled() -> bool:
    """Whether the C kernels are on and a compiler is at hand (without building anything)."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and compiler() is not None


@cache
def library() -> ctypes.CDLL | None:
    """The kernels for this CPU; None where they cannot be had (callers then use numba)."""
    if not enabled():
        return None
    return _built(load, "the C 4-bit kernels did not build; using numba")


def companion(
    source: Path, name: str, signatures: dict[str, list], what: str
) -> ctypes.CDLL | None:
    """`source` (a C file of another package) built into a library with the kernels, its
    functions given `signatures`; None where the kernels are off, or where it cannot build
    (then with a warning that `what` did not build)."""
    if library() is None:
        return None
    return _built(lambda: load(sources=(source,), name=name, signatures=signatures),
                  f"{what} did not build")  # fmt: skip


def _built(build_and_load, failure: str) -> ctypes.CDLL | None:
    try:
        return build_and_load()
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"{failure} ({detail})", stacklevel=3)
        return None


@cache
def lanes(lib: ctypes.CDLL | None = None) -> int:
    """Float lanes of the kernels: 16 (AVX-512), 8 (AVX2) or 1 (plain C); 0 without them."""
    lib = lib or library()
    return lib.slim_q4_lanes() if lib is not None else 0


def _threads(threads: int | None) -> int:
    return threads or torch.get_num_threads()


class Weight:
    """What the matmul kernel reads of one packed weight, made once per layer. The tensors are
    kept alive here: the kernel holds their addresses. `absmax`: the float32 scale of every
    block (a double-quantized weight's decoded once, `QuantState.block_absmax()`)."""

    def __init__(self, packed: torch.Tensor, shape: tuple[int, int], blocksize: int,
                 lut: torch.Tensor, absmax: torch.Tensor):  # fmt: skip
        self.out_features, self.in_features = shape
        lut = lut.to(torch.float32).contiguous()
        absmax = absmax.to(torch.float32).contiguous()
        self._keep = [packed, lut, absmax]
        self.struct = Weight4(packed=packed.data_ptr(), out=self.out_features,
                              in_=self.in_features, blocksize=blocksize, lut=lut.data_ptr(),
                              absmax=absmax.data_ptr())  # fmt: skip


@cache
def bf16_dot(lib: ctypes.CDLL | None = None) -> bool:
    """Whether the kernels multiply in bfloat16 here (AVX512_BF16)."""
    lib = lib or library()
    return lib is not None and bool(lib.slim_q4_bf16_dot())


def matmul(
    x2d: torch.Tensor,
    weight: Weight,
    threads: int | None = None,
    lib: ctypes.CDLL | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """x2d @ W.T as float32 (rows, out_features), x2d (rows, in_features) any float dtype.
    `bf16`: the products a bfloat16 decode-then-matmul makes (weights and input rounded to
    bfloat16, sums in float32), where `bf16_dot()`; float32 products elsewhere."""
    x = x2d.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    status = (lib or library()).slim_q4_matmul(
        ctypes.byref(weight.struct), x.data_ptr(), x.shape[0], y.data_ptr(), _threads(threads),
        int(bf16),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"the 4-bit kernel cannot read a {tuple(x.shape)} x {weight.in_features}")
    return y


def dense_matmul(
    x2d: torch.Tensor, weight: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """x2d @ weight.T as float32 for a float32 or bfloat16 `weight` (out, in), x2d (rows, in):
    a few rows against a big weight (the output layer), where BLAS's matrix-vector product
    uses one core. A bfloat16 weight needs `bf16_dot()`; x2d is then rounded to bfloat16."""
    x = x2d.to(torch.float32).contiguous()
    w = weight.contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    kernel = library().slim_bf16_matmul if w.dtype == torch.bfloat16 else library().slim_f32_matmul
    status = kernel(
        w.data_ptr(), w.shape[0], w.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(),
        _threads(threads),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"the dense kernel cannot take a {w.dtype} weight here")
    return y


def decodes(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `decode_rows` takes these: CPU tensors, float32 or bfloat16 out, bytes in rows
    of unit stride, whole steps of the kernel per block."""
    if library() is None or codes.device.type != "cpu" or out.dtype not in OUT_DTYPES:
        return False
    rows, width = codes.shape
    blocks = scales.shape[1]
    step = max(1, lanes() // 2)
    return (
        codes.stride(1) == 1
        and scales.stride(1) == 1
        and out.is_contiguous()
        and width % blocks == 0
        and (width // blocks) % step == 0
    )


OUT_DTYPES = (torch.float32, torch.bfloat16)


def decode_rows(
    codes: torch.Tensor,
    scales: torch.Tensor,
    lut: torch.Tensor,
    out: torch.Tensor,
    threads: int | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """Fill `out` (rows, 2 * width), float32 or bfloat16, from `codes` (rows, width) uint8
    whose blocks along each row share the float32 `scales` (rows, blocks); `lut`: the 16 code
    values. Each value is the float32 product, rounded to nearest even for bfloat16."""
    rows, width = codes.shape
    lut = lut.to(torch.float32).contiguous()
    status = (lib or library()).slim_q4_decode(
        codes.data_ptr(), rows, width, codes.stride(0), scales.data_ptr(), scales.shape[1],
        scales.stride(0), lut.data_ptr(), out.data_ptr(), int(out.dtype == torch.bfloat16),
        _threads(threads),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"the decode kernel cannot read {tuple(codes.shape)} codes")
    return out
