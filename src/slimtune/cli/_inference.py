"""Flags `generate`, `eval` and `serve` share: how the base is held and what it computes in."""

from __future__ import annotations

import argparse

from slimtune.choices import AUTO, COMPUTE_DTYPES, INFERENCE_QUANTS


def add_inference_arguments(parser: argparse.ArgumentParser, quant: bool = True) -> None:
    if quant:
        parser.add_argument(
            "--quant",
            choices=INFERENCE_QUANTS,
            default="auto",
            help="hold the base in 4 bits (auto: as the adapter was trained; none: float)",
        )
    parser.add_argument(
        "--float",
        dest="four_bit",
        action="store_false",
        help="4-bit layers: decode float copies for the run instead of computing from the codes",
    )
    parser.add_argument(
        "--compute-dtype",
        default="float32",
        choices=(AUTO, *COMPUTE_DTYPES),
        help="dtype of the matmuls (auto: bfloat16 where the hardware multiplies it natively)",
    )


def compute_dtype(args: argparse.Namespace):
    from slimtune.hardware import resolve_compute_dtype

    return resolve_compute_dtype(args.compute_dtype)
