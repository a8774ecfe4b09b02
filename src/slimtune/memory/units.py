"""Byte sizes as people write them: 24GB (decimal), 24GiB (binary), 512M, 1.5T; bytes per dtype."""

from __future__ import annotations

import re

from slimtune.errors import SlimtuneError

# Bytes per element of the dtypes the planner knows, by the names settings use.
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'24GB' -> 24e9, '24GiB' -> 24 * 2**30, '512M' -> 512e6, '1000' -> 1000."""
    match = _PATTERN.match(str(text))
    if not match:
        raise SlimtuneError(f"--device-memory: cannot read {text!r} as a size (e.g. 24GB, 16GiB)")
    number, prefix, binary, _ = match.groups()
    prefix = prefix.lower()
    scale = 1024 ** "bkmgt".index(prefix or "b") if binary else _UNITS[prefix]
    return int(float(number) * scale)


def format_bytes(n: int) -> str:
    """Binary units with three significant figures: 5.43 GiB, 812 MiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} B"
