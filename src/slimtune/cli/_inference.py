"""Flags `generate`, `eval` and `serve` share: how the base is held and what it computes in."""

from __future__ import annotations

import argparse

# slimtune.train.generation.QUANT_CHOICES (not imported: `slimtune --help` stays light)
QUANT_CHOICES = ("auto", "nf4", "fp4", "int4", "none")


def add_inference_arguments(parser: argparse.ArgumentParser, quant: bool = True) -> None:
    if quant:
        parser.add_argument(
            "--quant",
            choices=QUANT_CHOICES,
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
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of the matmuls (auto: bfloat16 where the hardware multiplies it natively)",
    )


def compute_dtype(args: argparse.Namespace):
    from slimtune.hardware import resolve_compute_dtype

    return resolve_compute_dtype(args.compute_dtype)
