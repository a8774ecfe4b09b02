"""`slimtune quantize`: write a 4-bit model folder (bitsandbytes layout) from a float model."""

from __future__ import annotations

import argparse

HELP = "Quantize a model to 4 bits and write it as a model folder (bitsandbytes layout)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model folder (safetensors) or .gguf file; default: SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--output", required=True, help="folder to write (must not exist, or be empty)"
    )
    parser.add_argument(
        "--quant-type",
        choices=("nf4", "fp4", "int4"),
        default="nf4",
        help="4-bit code book; int4 folders load in slimtune only, not in transformers",
    )
    parser.add_argument("--blocksize", type=int, default=64, help="values per absmax (64)")
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="keep the absmax in float32 instead of 8 bits",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow Python code shipped in the model folder to run",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimtune.models import load_model, save_quantized_model
    from slimtune.models.saving import check_output_dir
    from slimtune.quant import QuantConfig, storage_report

    check_output_dir(Path(args.output))  # before the minutes of loading, not after

    config = QuantConfig(
        quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant
    )
    model, tokenizer = load_model(
        args.model, quant=config, trust_remote_code=args.trust_remote_code
    )
    folder = save_quantized_model(model, tokenizer, args.output)
    report = storage_report(model)
    print(
        f"wrote {folder} ({args.quant_type}, blocksize {args.blocksize}, "
        f"double quant {'on' if args.double_quant else 'off'})"
    )
    print(report.format())
    return 0
