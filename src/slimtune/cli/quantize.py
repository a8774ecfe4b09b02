"""`slimtune quantize`: write a 4-bit model folder (bitsandbytes layout) from a float model."""

from __future__ import annotations

import argparse

from slimtune.cli._inference import add_quant_arguments

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
        "--trust-remote-code",
        action="store_true",
        help="allow Python code shipped in the model folder to run",
    )
    add_quant_arguments(
        parser, "4-bit format, as `slimtune train` reads it (int4 folders load in slimtune only)"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimtune.cli._inference import base_quant
    from slimtune.models import load_model, save_quantized_model
    from slimtune.models.saving import check_output_dir
    from slimtune.quant import storage_report

    check_output_dir(Path(args.output))  # before the minutes of loading, not after

    config = base_quant(args)
    model, tokenizer = load_model(
        args.model, quant=config, trust_remote_code=args.trust_remote_code
    )
    folder = save_quantized_model(model, tokenizer, args.output)
    report = storage_report(model)
    print(
        f"wrote {folder} ({config.quant_type}, blocksize {config.blocksize}, "
        f"double quant {'on' if config.double_quant else 'off'})"
    )
    print(report.format())
    return 0
