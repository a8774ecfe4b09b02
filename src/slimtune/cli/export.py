"""`slimtune export`: a fine-tune as GGUF for llama.cpp and Ollama (merged, or adapter + base)."""

from __future__ import annotations

import argparse

from slimtune.choices import GGUF_TYPES
from slimtune.cli._inference import add_quant_arguments, base_quant
from slimtune.errors import SlimtuneError

HELP = "Export a fine-tune as GGUF for llama.cpp and Ollama (merged model, or LoRA adapter)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="base model folder or .gguf (default: SmolLM2)"
    )
    parser.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    parser.add_argument(
        "--output",
        required=True,
        help="merged: the .gguf file to write; --as-adapter: a new folder for adapter.gguf, "
        "Modelfile (and base.gguf when the base is not a GGUF file)",
    )
    parser.add_argument(
        "--type",
        default="f16",
        choices=GGUF_TYPES,
        help="GGUF weight type (merged: all; adapter: f32, f16, bf16, q8_0); q4_k_m mixes "
        "Q4_K, Q6_K and fallbacks per tensor as llama.cpp's llama-quantize does (f16)",
    )
    parser.add_argument(
        "--as-adapter",
        action="store_true",
        help="write the LoRA adapter as llama.cpp's LoRA GGUF for an unchanged base",
    )
    parser.add_argument(
        "--qlora",
        action="store_true",
        help="the adapter was trained on a 4-bit base: merge into its dequantized weights, in "
        "the format the adapter's config.yaml (or the flags below) gives",
    )
    parser.add_argument(
        "--eval",
        default=None,
        help="rows (JSONL/JSON/CSV/Parquet) to measure the share of the fine-tune's gain that "
        "the export keeps (exact match)",
    )
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="score the first N eval rows only"
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="with --type q4_0 or q4_k_m: training rows to round the merged weights with error "
        "compensation (GPTQ), which keeps more of the fine-tune than plain rounding",
    )
    parser.add_argument(
        "--calibration-rows", type=int, default=256, help="calibration rows to use (256)"
    )

    add_quant_arguments(parser, "with --qlora: the 4-bit format it was trained on")


def run(args: argparse.Namespace) -> int:
    import sys

    from slimtune.data import read_rows
    from slimtune.export import export_adapter_gguf, export_merged_gguf

    rows = read_rows(args.eval)[: args.eval_limit] if args.eval else None
    calibration = None
    if args.calibration:
        calibration = read_rows(args.calibration)[: args.calibration_rows]
    if args.as_adapter:
        if calibration:
            raise SlimtuneError(
                "--calibration applies to a merged q4_0 or q4_k_m export, not --as-adapter"
            )
        if args.qlora:
            raise SlimtuneError("--as-adapter with --qlora: llama.cpp applies the adapter to a "
                                "float base; merge it instead (drop --as-adapter)")  # fmt: skip
        result = export_adapter_gguf(
            args.model, args.adapter, args.output, args.type, eval_rows=rows
        )
    else:
        result = export_merged_gguf(args.model, args.adapter, args.output, args.type,
                                    qlora=base_quant(args, args.adapter) if args.qlora else False,
                                    eval_rows=rows, calibration=calibration)  # fmt: skip
    print(result)
    if result.survival is None:
        print("pass --eval ROWS to measure how much of the fine-tune's gain the export keeps")
    elif result.survival.lost_too_much:
        print(f"warning: the export keeps {result.survival.kept:.1%} of the fine-tune's gain",
              file=sys.stderr)  # fmt: skip
    return 0
