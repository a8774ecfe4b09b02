"""The `slimtune` command: a thin layer over the library.

Every public module in this package is one subcommand. It defines
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. `slimtune --help` imports
every one of them, so each imports the library (and with it torch) inside `run`, not at its top.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from slimtune.errors import SlimtuneError
from slimtune.runtime import tune_process

# The order commands are listed in `slimtune --help`; modules not listed come after.
ORDER = ["demo", "train", "eval", "generate", "quantize", "merge", "serve", "estimate"]
ORDER.insert(ORDER.index("merge") + 1, "export")
# Commands that train: they run under the lean-heap malloc settings (slimtune.runtime.heap).
TRAINING = {"demo", "train"}
# Commands that decode token by token: short OpenMP spins instead of passive waits.
DECODING = {"generate", "eval", "serve"}


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
    args = build_parser().parse_args(argv)  # loads no torch yet: the thread settings still apply
    # The one place process tuning starts.
    tune_process(_restart_command(args.command, argv), decoding=args.command in DECODING)
    try:
        return int(args._run(args) or 0)
    except SlimtuneError as error:
        print(f"slimtune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _restart_command(command: str, argv: list[str] | None) -> list[str] | None:
    """The argv that starts this run again under the lean heap: training commands in a process
    of their own (`main()` given no argv), not a library call of `main(argv)`."""
    if argv is not None or command not in TRAINING:
        return None
    return [sys.executable, "-m", "slimtune", *sys.argv[1:]]
