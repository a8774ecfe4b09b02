"""`slimtune merge`: fold a LoRA adapter into its base model and write a standalone model folder."""

from __future__ import annotations

import argparse

from slimtune.choices import MERGED_DTYPES
from slimtune.cli._inference import add_quant_arguments, base_quant
from slimtune.errors import SlimtuneError

HELP = "Merge a LoRA adapter into its base model and write a standalone model folder."


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="base model folder or .gguf (default: SmolLM2)"
    )
    parser.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    parser.add_argument(
        "--output", required=True, help="folder to write (must not exist or be empty)"
    )
    parser.add_argument("--dtype", choices=MERGED_DTYPES, default="fp32")
    parser.add_argument(
        "--quantize", choices=("nf4",), default=None, help="write the merged model in NF4 4 bits"
    )
    parser.add_argument(
        "--qlora",
        action="store_true",
        help="the adapter was trained on a 4-bit base: merge into its dequantized weights, in "
        "the format the adapter's config.yaml (or the flags below) gives",
    )
    parser.add_argument(
        "--max-shard-size", type=_size, default="2GB", help="largest safetensors file (2GB)"
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="with --quantize nf4: training rows to round the merged weights with error "
        "compensation (GPTQ), which keeps the fine-tune that plain rounding erases",
    )
    parser.add_argument(
        "--calibration-rows", type=int, default=256, help="calibration rows to use (256)"
    )

    add_quant_arguments(parser, "with --qlora: the 4-bit format it was trained on")


def run(args: argparse.Namespace) -> int:
    from slimtune.export import merge_to_folder

    calibration = None
    if args.calibration:
        from slimtune.data import read_rows

        if args.quantize != "nf4":
            raise SlimtuneError("--calibration rounds to NF4: it needs --quantize nf4")
        calibration = read_rows(args.calibration)[: args.calibration_rows]
    report = merge_to_folder(
        args.model,
        args.adapter,
        args.output,
        dtype=args.dtype,
        quantize=args.quantize,
        qlora=base_quant(args, args.adapter) if args.qlora else False,
        max_shard_bytes=args.max_shard_size,
        calibration=calibration,
    )
    print(report)
    return 0
