"""Where the C kernel's products from the codes stop beating decoded bands for BLAS, by input
rows: the measurement behind `slimtune.quant.gemv.NATIVE_ROWS`.

For each of SmolLM2-135M's three weight shapes (NF4, double quantization) and each compute
dtype, `x @ W.T` for a number of input rows through the C kernel (`native.matmul`) and through
`banded_linear` (bands of the weight decoded, then torch's matmul), alternating, best of
--repeats. Writes benchmarks/reports/rows.json and rows.md: the time of the bands over the
kernel's (above 1: the kernel is faster).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_rows.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(1536, 576), (576, 1536), (576, 576)]  # gate/up, down, q/o
ROWS = [16, 48, 96, 160, 256, 384, 512]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def ratio(shape: tuple[int, int], dtype: torch.dtype, rows: int, repeats: int) -> float:
    """bands ms / kernel ms for one weight shape."""
    from slimtune.quant import native, quantize_4bit
    from slimtune.quant.gemv import banded_linear, native_weight

    packed, state = quantize_4bit(torch.randn(*shape), "nf4", 64, True)
    weight = native_weight(packed, state)
    x = torch.randn(rows, shape[1])
    paths = {
        "kernel": lambda: native.matmul(x, weight, bf16=dtype == torch.bfloat16),
        "bands": lambda: banded_linear(x.to(dtype), packed, state, dtype),
    }
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats + 1):  # the first round warms up
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["bands"] / best["kernel"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/reports/rows.json")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/rows.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from slimtune.hardware import machine_record, machine_summary
    from slimtune.quant import native

    if native.library() is None:
        raise SystemExit("the C kernels did not build: nothing to compare")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    dtypes = {n: d for n, d in DTYPES.items() if d == torch.float32 or native.bf16_dot()}
    record = {
        "machine": machine_record(),
        "load_average_before": load,
        "shapes": SHAPES,
        "bands_over_kernel": {
            name: {rows: [ratio(s, dtype, rows, args.repeats) for s in SHAPES] for rows in ROWS}
            for name, dtype in dtypes.items()
        },
    }
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    shapes = " | ".join(f"{o} x {i}" for o, i in SHAPES)
    lines = [
        "# 4-bit products by input rows: the C kernel against decoded bands",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/bench_rows.py "
        f"{' '.join(sys.argv[1:])}`".rstrip()
        + "  ",
        f"Machine: {machine_summary()}; load average {load:.1f} when it started.  ",
        "NF4 with double quantization, SmolLM2-135M's weight shapes; the time of the bands over "
        f"the kernel's, best of {args.repeats} (above 1: the kernel is faster).",
        "",
        f"| compute | rows | {shapes} |",
        "|---|---|" + "---|" * len(SHAPES),
    ]
    for name, by_rows in record["bands_over_kernel"].items():
        for rows, values in by_rows.items():
            lines.append(f"| {name} | {rows} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
