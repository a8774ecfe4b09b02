#!/usr/bin/env python3
"""A kernel change, A/B: the 4-bit products of two builds of q4_matmul.c in one process.

    git show REV:src/slimtune/quant/native/q4_matmul.c > /tmp/before.c
    PYTHONPATH=src .venv/bin/python benchmarks/bench_kernel_ab.py /tmp/before.c
    PYTHONPATH=src .venv/bin/python benchmarks/bench_kernel_ab.py /tmp/before.c --arch x86-64-v3
    PYTHONPATH=src .venv/bin/python benchmarks/bench_kernel_ab.py /tmp/before.c --byte-planes on

"before" is built from the given file, "after" from the working tree's, both with the
working tree's q4.h, for the same -march. The weights have SmolLM2-135M's 4-bit layer shapes
(q, k, v, o, gate, up, down) x 30 blocks, NF4 with double quantization, random values: one
pass is one token's products, each layer called alone. With --dense the product is the float32
output layer's instead (49152 x 576, `slim_f32_matmul`), 10 calls a pass. The builds take turns pass by pass,
each first every other time (a noisy machine slows both alike), best of `--repeats`. The
results of the two builds are compared too (largest difference relative to the largest
output). Where both run the same code for a row count, their ratio shows the noise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import torch

from slimtune.hardware import machine_record, machine_summary
from slimtune.quant import gemv, native, quantize_4bit

# SmolLM2-135M's 4-bit layers, (out, in): q, k, v, o, gate, up, down.
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
BLOCKS = 30


def build(source: Path, arch: str) -> ctypes.CDLL:
    """The kernel library compiled from `source` (beside the working tree's q4.h), opened as
    slimtune opens it where `source` is the working tree's; an older source may lack newer
    functions, so only its matmul is declared."""
    cc = native.compiler()
    if cc is None:
        raise SystemExit("no C compiler found (set CC)")
    target = native.library_path(cc, arch, (source,), name="q4_matmul-ab")
    if not target.is_file():
        native.build(cc, target, arch, (source,))
    if source == native.SOURCE:
        return native.open_library(target)
    lib = ctypes.CDLL(str(target))
    for name in ("slim_q4_matmul", "slim_f32_matmul"):
        getattr(lib, name).argtypes = native._SIGNATURES[name]
        getattr(lib, name).restype = ctypes.c_int
    return lib


def product(lib, x: torch.Tensor, w, threads: int) -> torch.Tensor:
    """x @ W.T by `lib`: from the codes for a 4-bit W, by `slim_f32_matmul` for a float32 one."""
    if isinstance(w, torch.Tensor):
        y = torch.empty(x.shape[0], w.shape[0])
        lib.slim_f32_matmul(w.data_ptr(), w.shape[0], w.shape[1], x.data_ptr(), x.shape[0],
                            y.data_ptr(), threads)  # fmt: skip
        return y
    return native.matmul(x, w, threads=threads, lib=lib)


def in_features(w) -> int:
    return w.shape[1] if isinstance(w, torch.Tensor) else w.in_features


def one_pass(lib, weights: list, inputs: dict, threads: int) -> float:
    start = time.perf_counter()
    for w in weights:
        product(lib, inputs[in_features(w)], w, threads)
    return time.perf_counter() - start


def compare(
    before: Path,
    arch: str,
    rows: list[int],
    threads: int,
    repeats: int,
    planes: str = "auto",
    dense: bool = False,
) -> list[dict]:
    libs = {"before": build(before, arch), "after": build(native.SOURCE, arch)}
    if planes != "auto":  # AVX2's byte-plane lookups forced on or off in the working tree's
        libs["after"].slim_q4_byte_planes(int(planes == "on"))
    torch.manual_seed(0)
    weights = []
    if dense:
        weights = [torch.randn(49152, 576) * 0.02] * 10
    for _ in range(0 if dense else BLOCKS):
        for out, inp in SHAPES:
            packed, state = quantize_4bit(torch.randn(out, inp), "nf4", 64, double_quant=True)
            weights.append(gemv.native_weight(packed, state))
    results = []
    for n in rows:
        inputs = {size: torch.randn(n, size) for size in {in_features(w) for w in weights}}
        times = {name: [] for name in libs}
        for repeat in range(repeats):
            order = list(libs.items())
            for name, lib in order if repeat % 2 == 0 else order[::-1]:
                times[name].append(one_pass(lib, weights, inputs, threads))
        outputs = {
            name: [product(lib, inputs[in_features(w)], w, threads) for w in weights[: len(SHAPES)]]
            for name, lib in libs.items()
        }
        diff = max(
            ((a - b).abs().max() / a.abs().max()).item()
            for a, b in zip(outputs["before"], outputs["after"], strict=True)
        )
        before_ms, after_ms = 1e3 * min(times["before"]), 1e3 * min(times["after"])
        results.append(dict(rows=n, before_ms=round(before_ms, 2), after_ms=round(after_ms, 2),
                            speedup=round(before_ms / after_ms, 2), relative_difference=diff))  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path, help="the q4_matmul.c to compare against")
    parser.add_argument("--arch", default="native", help="-march for both builds")
    parser.add_argument("--rows", default="1,2,3,4,16", help="input rows a product")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--byte-planes",
        choices=["auto", "on", "off"],
        default="auto",
        help="AVX2 byte-plane lookups in the working tree's build (auto: as slimtune sets them, "
        "on AMD CPUs only)",
    )
    parser.add_argument(
        "--dense", action="store_true", help="the float32 output layer's product instead"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    results = compare(
        args.before, args.arch, rows, args.threads, args.repeats, args.byte_planes, args.dense
    )
    what = "the float32 output layer" if args.dense else "one token's 4-bit products"
    print(
        f"{machine_summary()}; {what}; -march={args.arch}; {args.threads} threads, "
        f"best of {args.repeats}"
    )
    print("| input rows | before ms | after ms | before / after | relative difference |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['before_ms']} | {r['after_ms']} | {r['speedup']:.2f}x | "
              f"{r['relative_difference']:.1e} |")  # fmt: skip
    if args.json:
        record = dict(machine=machine_record(), arch=args.arch, threads=args.threads,
                      repeats=args.repeats, byte_planes=args.byte_planes, dense=args.dense,
                      results=results)  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
