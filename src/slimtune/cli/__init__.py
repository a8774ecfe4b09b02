"""The `slimtune` command: a thin layer over the library.

Every public module in this package is one subcommand. It defines
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. `slimtune --help` imports
every one of them, so each imports the library (and with it torch) inside `run`, not at its top.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from slimtune.errors import SlimtuneError

# The order commands are listed in `slimtune --help`; modules not listed come after.
ORDER = ["demo", "train", "eval", "generate", "quantize", "merge", "serve", "estimate"]
ORDER.insert(ORDER.index("merge") + 1, "export")
# Commands that train: they run under the lean-heap malloc settings (slimtune.memory.heap).
TRAINING = {"demo", "train"}


def _command_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtune", description="LoRA and QLoRA fine-tuning of language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _command_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads spin by default: on a machine with other work running, every parallel
    # op then waits for a descheduled spinner (a QLoRA step of the demo measured 47 s instead of
    # 4.4 s). Set before torch loads OpenMP; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if argv is None and args.command in TRAINING:  # a process of its own, not a library call
        from slimtune.memory.heap import reexec_with_lean_heap

        reexec_with_lean_heap([sys.executable, "-m", "slimtune", *sys.argv[1:]])
    try:
        return int(args._run(args) or 0)
    except SlimtuneError as error:
        print(f"slimtune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
