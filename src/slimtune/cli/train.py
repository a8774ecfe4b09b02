"""`slimtune train [CONFIG.yaml] [--flags]`: fine-tune with LoRA or QLoRA."""

from __future__ import annotations

import argparse

from slimtune.train.config import add_config_arguments, load_config, overrides_from_args

HELP = "fine-tune a model with LoRA or QLoRA (config file and/or flags)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a YAML file of options")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides_from_args(args))

    from slimtune.train import train

    result = train(config, progress=not args.no_progress)
    if not result.is_main:
        return 0
    if result.evals:
        last = result.evals[-1]
        accuracy = last.get("eval_accuracy")
        tail = f", exact match {100 * accuracy:.1f}%" if accuracy is not None else ""
        if "eval_reward_accuracy" in last:  # preference tuning
            tail = f", preference accuracy {100 * last['eval_reward_accuracy']:.1f}%"
        print(f"final eval: loss {last['eval_loss']:.4f}{tail}")
    print(f"adapter, metrics.jsonl, loss.png and checkpoints/ in {result.output}")
    return 0
