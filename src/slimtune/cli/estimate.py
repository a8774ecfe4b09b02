"""`slimtune estimate`: how much memory a training run needs, before running it."""

from __future__ import annotations

import argparse
import json

from slimtune.choices import COMPUTE_DTYPES, METHODS, OBJECTIVES, OPTIMIZERS

HELP = "predict the memory of a training run (weights, adapters, optimizer, activations)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_arg", nargs="?", metavar="MODEL",
                        help="a model folder, config.json, .gguf file, or a built-in name "
                             "(see --list); default: the default model, smollm2-135m")  # fmt: skip
    parser.add_argument("--model", help="same as MODEL")
    parser.add_argument("--list", action="store_true", help="list the built-in model names")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="sft",
        help="dpo / orpo: --batch-size counts preference pairs",
    )
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="all-linear",
                        help="'all-linear', a regex, or comma-separated layer names")  # fmt: skip
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=False)  # fmt: skip
    parser.add_argument("--optimizer", default="adamw",
                        choices=OPTIMIZERS)  # fmt: skip
    dtypes = COMPUTE_DTYPES
    parser.add_argument("--weight-dtype", choices=dtypes, default="float32",
                        help="dtype of the weights that are not quantized")  # fmt: skip
    parser.add_argument("--adapter-dtype", choices=dtypes, default="float32",
                        help="dtype of the LoRA weights and their gradients")  # fmt: skip
    parser.add_argument("--compute-dtype", choices=dtypes, default="float32",
                        help="dtype of the activations")  # fmt: skip
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where it runs: the framework's own overhead differs")  # fmt: skip
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="e.g. 24GB or 16GiB: say whether the run fits, and what to change")  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", help="print JSON (total_bytes, <part>_bytes)"
    )


def run(args: argparse.Namespace) -> int:
    from slimtune.errors import SlimtuneError
    from slimtune.memory import BUILTIN, PlanSettings, estimate, parse_bytes, resolve_architecture
    from slimtune.memory.advice import suggest

    if args.list:
        for name, arch in BUILTIN.items():
            print(f"{name:16s} {arch.num_params() / 1e9:7.2f}B parameters")
        return 0
    if args.model and args.model_arg and args.model != args.model_arg:
        raise SlimtuneError(f"two models given: {args.model_arg!r} and --model {args.model!r}")
    source = args.model or args.model_arg
    arch = resolve_architecture(source) if source else _default_architecture()
    targets = args.targets
    if "," in targets or targets in {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    settings = PlanSettings(
        method=args.method, rank=args.rank, targets=targets, batch_size=args.batch_size,
        max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer, dropout=args.dropout, weight_dtype=args.weight_dtype,
        adapter_dtype=args.adapter_dtype, compute_dtype=args.compute_dtype,
        double_quant=args.double_quant, blocksize=args.blocksize, device=args.device,
        objective=args.objective,
    )  # fmt: skip
    result = estimate(arch, settings)
    budget = parse_bytes(args.device_memory) if args.device_memory else None
    steps = suggest(arch, settings, budget) if budget is not None and result.total > budget else []
    if args.json:
        out = result.to_dict()
        if budget is not None:
            out["device_memory_bytes"] = budget
            out["fits"] = result.total <= budget
            out["suggestions"] = [
                {"change": flag, "total_bytes": r.total, "fits": r.total <= budget}
                for flag, r in steps
            ]
        print(json.dumps(out, indent=2))
    else:
        print(_table(result))
        if budget is not None:
            print(_verdict(result.total, budget, steps, args.device_memory))
    return 0


def _default_architecture():
    from slimtune.memory import builtin_architecture

    return builtin_architecture("smollm2-135m")


def _table(result) -> str:
    from slimtune.memory import format_bytes

    s = result.settings
    arch = result.architecture
    ckpt = "on" if s.gradient_checkpointing else "off"
    lines = [
        f"{arch.name}: {arch.num_params() / 1e9:.3g}B parameters, {result.trainable_params / 1e6:.3g}M trainable",
        f"{s.method}, rank {s.rank}, batch {s.batch_size} x {s.max_length}, "
        f"checkpointing {ckpt}, {s.optimizer}, on {s.device}",
        "",
    ]
    width = max(len(name) for name in result.parts) + 2
    for name, value in result.parts.items():
        share = value / result.total if result.total else 0.0
        lines.append(f"  {name.replace('_', ' '):{width}s}{format_bytes(value):>11s}  {share:6.1%}")
    lines.append(f"  {'total':{width}s}{format_bytes(result.total):>11s}")
    lines.append(_band(result))
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)


def _band(result) -> str:
    from slimtune.memory import format_bytes

    if result.error_band is None:
        return (
            f"  not calibrated on {result.settings.device}: the analytic count (activations, an "
            "assumed 1 GiB runtime), never measured against this device: a rough guide"
        )
    low, high = result.error_band
    lo_bytes, hi_bytes = result.likely_range()
    return (
        f"  likely peak {format_bytes(lo_bytes)} to {format_bytes(hi_bytes)}: measured out of "
        f"sample on a CPU, the planner was off by {low:+.1%} to {high:+.1%}"
    )


def _verdict(total: int, budget: int, steps, text: str) -> str:
    from slimtune.memory import format_bytes

    size = f"{text} ({format_bytes(budget)})"
    if total <= budget:
        return f"\nfits in {size}: {format_bytes(budget - total)} to spare"
    lines = [f"\ndoes not fit in {size}: needs {format_bytes(total - budget)} more"]
    if steps:
        lines.append("try, in this order:")
        for flag, r in steps:
            mark = "fits" if r.total <= budget else "still too big"
            lines.append(f"  {flag:60s} -> {format_bytes(r.total)} ({mark})")
    if not steps or steps[-1][1].total > budget:
        lines.append("no combination of these settings fits: a smaller model, or more memory")
    return "\n".join(lines)
