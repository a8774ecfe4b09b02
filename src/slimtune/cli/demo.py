"""`slimtune demo`: QLoRA fine-tune the default model on the bundled task, before and after."""

from __future__ import annotations

import argparse

HELP = "fine-tune SmolLM2 on a bundled task and show the accuracy before and after (~6 min)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="slimtune-demo", help="where the adapter goes")
    parser.add_argument("--max-steps", type=int, default=None, help="fewer steps (a quick look)")
    parser.add_argument("--eval-rows", type=int, default=None, help="test rows to score")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from slimtune.train.demo import demo_config, run_demo

    overrides = {}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.eval_rows:
        overrides["eval_max_rows"] = args.eval_rows
    run_demo(demo_config(args.output, **overrides), progress=not args.no_progress)
    return 0
