"""What the machine can do, read at run time: CPU model and flags, native bfloat16, BLAS.

The same code runs on CPUs that differ in what they multiply fast (AVX2-only machines, where
float32 is the fast dtype, and AVX512_BF16 / AMX ones, where bfloat16 matmul is several times
faster), so nothing here is assumed: it is read from /proc/cpuinfo and torch.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

import torch

from slimtune.choices import AUTO, COMPUTE_DTYPES
from slimtune.errors import SlimtuneError

# The flags that decide which kernels are fast; every benchmark records them.
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """The name config files and flags use for `dtype`: "bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def _cpuinfo_field(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `keys` (the first
    processor's), or None where there is no such line or file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(keys):
            return line.split(":", 1)[1].strip()
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    return frozenset((_cpuinfo_field("flags", "Features") or "").split())


def cpu_model() -> str:
    model = _cpuinfo_field("model name")
    return model if model is not None else platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo names it ("AuthenticAMD", "GenuineIntel"), or ""."""
    return _cpuinfo_field("vendor_id") or ""


# Variables that keep torch's kernels (and slimtune's C kernels) below what the CPU has: set
# together they run the AVX2 code paths on an AVX-512 machine, and every report names them.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
              "SLIMTUNE_NATIVE_ARCH")  # fmt: skip


def isa_limits() -> dict[str, str]:
    """The instruction-set limits set in this process's environment."""
    return {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX) and oneDNN, which
    runs torch's bfloat16 matmuls, is not held below it (ONEDNN_MAX_CPU_ISA=AVX2, say)."""
    flags = cpu_flags()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    allowed = limit in ("", "ALL", "DEFAULT") or any(k in limit for k in ("BF16", "AMX", "AVX10"))
    return allowed and ("avx512_bf16" in flags or "amx_bf16" in flags)


def device_has_native_bf16(device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_compute_dtype(
    name: str | torch.dtype, device: torch.device | str = "cpu"
) -> torch.dtype:
    """`auto` -> bfloat16 where `device` multiplies it natively, else float32; names -> dtypes."""
    if isinstance(name, torch.dtype):
        return name
    if name == AUTO:
        return torch.bfloat16 if device_has_native_bf16(device) else torch.float32
    if name not in TORCH_DTYPES:
        expected = ", ".join((AUTO, *COMPUTE_DTYPES))
        raise SlimtuneError(f"compute_dtype: unknown value {name!r}; expected one of {expected}")
    return TORCH_DTYPES[name]


def blas_name() -> str:
    """The BLAS torch multiplies with on the CPU (MKL, OpenBLAS, ...), from torch's build config."""
    config = torch.__config__.show()
    for name in ("mkl", "openblas", "blis", "accelerate"):
        if f"blas_info={name}" in config.lower() or f"use_{name}=on" in config.lower():
            return name
    return "unknown"


def machine_record() -> dict[str, Any]:
    """What a benchmark must record so that figures from different machines are never mixed."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpu_flags": {flag: flag in flags for flag in NOTABLE_FLAGS},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "blas": blas_name(),
        "isa_limits": isa_limits(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_summary() -> str:
    """One line for the top of a report: model, the notable flags it has, threads, BLAS."""
    record = machine_record()
    have = [flag for flag, present in record["cpu_flags"].items() if present]
    limits = " ".join(f"{name}={value}" for name, value in record["isa_limits"].items())
    return (
        f"{record['cpu']} ({', '.join(have) or 'no notable flags'}; torch capability "
        f"{record['cpu_capability']}), {record['torch_threads']} threads, BLAS {record['blas']}"
        + (f"; instruction sets limited by {limits}" if limits else "")
    )
