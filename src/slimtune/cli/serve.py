"""`slimtune serve`: an OpenAI-compatible HTTP server for a base model and many LoRA adapters."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slimtune.cli._inference import (
    add_device_argument,
    add_inference_arguments,
    add_quant_arguments,
    base_quant,
    compute_dtype,
    device,
)
from slimtune.errors import SlimtuneError

HELP = "Serve a model and its LoRA adapters behind an OpenAI-compatible HTTP API."

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2)")
    parser.add_argument(
        "--qlora", action="store_true", help="hold the base model in 4 bits (format: below)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve as model NAME (repeatable)",
    )
    parser.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        help="enables POST /v1/adapters; adapters load only from under this folder",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SLIMTUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $SLIMTUNE_API_KEY)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the base model's name in the API"
    )
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows in one forward pass")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    parser.add_argument(
        "--one-adapter-per-batch",
        action="store_true",
        help="do not mix adapters in a batch (a baseline for benchmarks)",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        help="chatml, llama3, gemma or a Jinja file for /v1/chat/completions (default: the "
        "model's own)",
    )
    add_inference_arguments(parser, quant=False)
    add_device_argument(parser)
    add_quant_arguments(parser, "with --qlora: how the base is held, as `slimtune train` has it")


def run(args: argparse.Namespace) -> int:
    from slimtune.serve import create_app
    from slimtune.serve.adapters import parse_adapter_flag
    from slimtune.serve.build import build_engine
    from slimtune.serve.server import serve_forever

    if args.max_batch_size < 1 or args.max_queue < 0:
        raise SlimtuneError("--max-batch-size must be >= 1 and --max-queue >= 0")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key", file=sys.stderr)
    engine, registry = build_engine(
        args.model,
        qlora=base_quant(args) if args.qlora else False,
        four_bit=args.four_bit,
        compute_dtype=compute_dtype(args),
        device=device(args),
        adapters=[parse_adapter_flag(value) for value in args.adapter],
        adapter_dir=args.adapter_dir,
        base_name=args.served_model_name,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        mixed_batches=not args.one_adapter_per_batch,
        chat_template=args.chat_template,
        start=False,  # serve_forever runs the loop on this thread, which loaded the model
    )
    names = ", ".join([registry.base_name, *registry.names()])
    print(f"serving {names} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        serve_forever(create_app(engine, registry, api_key=args.api_key), args.host, args.port)
    finally:
        engine.stop()
    return 0
