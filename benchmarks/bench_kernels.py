"""The 4-bit kernels side by side: C (slimtune.quant.native) against the numba kernels it
replaces, and the output layer's product against torch's, at SmolLM2-135M's shapes.

- products from the codes, for 1, 4 and 16 input rows: the C kernel; the numba one-row kernel;
  decoding bands for BLAS (what more rows take);
- decoding a whole weight into float32 and bfloat16 (training's bands): C against numba;
- the output layer (49152 x 576 float32) for one row: C against torch's linear.
Every figure is the best of --repeats, for the 7 layers of a block times 30 blocks (one token of
the whole model), in milliseconds, with 1 and 2 threads. Writes benchmarks/reports/kernels.json
and kernels.md.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
BLOCKS = 30


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def layers():
    from slimtune.quant import quantize_4bit
    from slimtune.quant.gemv import Prepared, native_weight

    out = []
    generator = torch.Generator().manual_seed(0)
    for rows, cols in SHAPES:
        packed, state = quantize_4bit(torch.randn(rows, cols, generator=generator), "nf4", 64, True)
        out.append((packed, state, native_weight(packed, state), Prepared(packed, state)))
    return out


def measure(threads: int, repeats: int) -> dict:
    from slimtune.quant import native
    from slimtune.quant.blockwise import decode_blocks
    from slimtune.quant.gemv import banded_linear, fused_gemv, input_table

    torch.set_num_threads(threads)
    model = layers()
    x = {576: torch.randn(16, 576), 1536: torch.randn(16, 1536)}

    def per_token(step):
        return lambda: [step(*layer) for _ in range(BLOCKS) for layer in model]

    figures = {}
    for rows in (1, 4, 16):
        figures[f"c matmul, {rows} rows"] = best_ms(
            per_token(lambda p, s, w, pr, n=rows: native.matmul(x[s.shape[1]][:n], w)), repeats
        )
        figures[f"banded decode + BLAS, {rows} rows"] = best_ms(
            per_token(lambda p, s, w, pr, n=rows: banded_linear(x[s.shape[1]][:n], p, s, torch.float32)),
            repeats,
        )  # fmt: skip
    figures["numba one-row kernel"] = best_ms(
        per_token(lambda p, s, w, pr: fused_gemv(input_table(x[s.shape[1]][:1], "nf4"), p, s, pr)),
        repeats,
    )  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        # Into a buffer made once, as training's bands are: the decode, not the page faults.
        outs = [torch.empty(s.numel, dtype=dtype) for _, s, _, _ in model]
        absmax = [s.block_absmax() for _, s, _, _ in model]

        def decode(p, s, w, pr, outs=outs, absmax=absmax):
            i = next(i for i, layer in enumerate(model) if layer[0] is p)
            decode_blocks(p.view(-1), absmax[i], s.blocksize, s.quant_type, outs[i])

        figures[f"c decode to {name}"] = best_ms(per_token(decode), repeats)
        library = native.library
        native.library = lambda: None  # the numba decode, as on a machine without a compiler
        try:
            figures[f"numba decode to {name}"] = best_ms(per_token(decode), repeats)
        finally:
            native.library = library
    head = torch.randn(49152, 576)
    row = torch.randn(1, 576)
    figures["output layer, c"] = best_ms(lambda: native.dense_matmul(row, head), repeats * 5)
    figures["output layer, torch linear"] = best_ms(
        lambda: torch.nn.functional.linear(row, head), repeats * 5
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/reports/kernels.json")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/kernels.md")
    args = parser.parse_args()
    from slimtune.hardware import machine_record, machine_summary
    from slimtune.quant import native

    weights = sum(r * c for r, c in SHAPES) * BLOCKS
    record = {
        "machine": machine_record(),
        "kernel_lanes": native.lanes(),
        "weights_per_token": weights,
        "ms": {threads: measure(threads, args.repeats) for threads in (1, 2)},
    }
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# 4-bit kernels: C against numba and torch",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/bench_kernels.py "
        f"{' '.join(sys.argv[1:])}`".rstrip()
        + "  ",
        f"Machine: {machine_summary()}; C kernel lanes: {record['kernel_lanes']}.  ",
        f"SmolLM2-135M's 4-bit layers (7 a block x 30 blocks, {weights / 1e6:.0f}M weights, NF4 "
        "with double quantization): milliseconds for one token of the whole model, best of "
        f"{args.repeats}. The output layer is 49152 x 576 float32, one row.",
        "",
        "| kernel | 1 thread ms | 2 threads ms | ns a weight (2 threads) |",
        "|---|---|---|---|",
    ]
    for name, ms in record["ms"][2].items():
        values = weights if not name.startswith("output") else 49152 * 576
        lines.append(
            f"| {name} | {record['ms'][1][name]:.2f} | {ms:.2f} | {ms * 1e6 / values:.4f} |"
        )
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
