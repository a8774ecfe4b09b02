"""Flags commands share: how the base is held (`generate`, `eval`, `serve`, `merge`, `export`,
`quantize`) and what it computes in."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from slimtune.choices import AUTO, COMPUTE_DTYPES, INFERENCE_DEVICES, INFERENCE_QUANTS
from slimtune.train.config import QUANT_KEYS, add_config_arguments

if TYPE_CHECKING:  # the command modules import torch only when they run
    from slimtune.quant import QuantConfig


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
        help="dtype of the matmuls (auto: bfloat16 where the device multiplies it natively)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=INFERENCE_DEVICES,
        default=AUTO,
        help="where the model runs (auto: a CUDA GPU when there is one, else the CPU)",
    )


def device(args: argparse.Namespace):
    from slimtune.devices import resolve_device

    return resolve_device(args.device)


def compute_dtype(args: argparse.Namespace):
    """--compute-dtype; `auto` asks the device the model runs on (--device)."""
    from slimtune.hardware import resolve_compute_dtype

    where = device(args) if hasattr(args, "device") else "cpu"
    return resolve_compute_dtype(args.compute_dtype, where)


def add_quant_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    """--quant-type, --blocksize, --double-quant: the training config's keys, with its names,
    defaults and checks."""
    add_config_arguments(parser, QUANT_KEYS, title)


def base_quant(args: argparse.Namespace, adapter: str | None = None) -> QuantConfig:
    """The 4-bit format of a base: the flags given, else what `adapter` was trained with (the
    config.yaml beside it), else the training defaults."""
    from slimtune.train.config import load_config, overrides_from_args
    from slimtune.train.generation import trained_config
    from slimtune.train.setup import quant_config

    trained = trained_config(adapter)
    values = {}
    if trained is not None and trained.method == "qlora":
        values = {key: getattr(trained, key) for key in QUANT_KEYS}
    values.update(overrides_from_args(args, QUANT_KEYS))
    return quant_config(load_config(None, values))
