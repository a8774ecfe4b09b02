"""`slimtune estimate`: how much memory a training run needs, before running it."""

from __future__ import annotations

import argparse
import gc
import json
import os

from slimtune.errors import SlimtuneError
from slimtune.memory.planner import DEVICES

HELP = "predict the memory of a training run (weights, adapters, optimizer, activations)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimtune.train.config import add_config_arguments

    parser.add_argument("source", nargs="?", metavar="CONFIG.yaml | MODEL",
                        help="the training config `slimtune train` reads, or a model: a folder, "
                             "config.json, .gguf file or built-in name (see --list); default: "
                             "the config's model, else smollm2-135m")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the built-in model names")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where it runs: the framework's own overhead differs")  # fmt: skip
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="processes torchrun starts; with --fsdp: memory of each")  # fmt: skip
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="e.g. 24GB or 16GiB: say whether the run fits, and what to change")  # fmt: skip
    parser.add_argument("--full-rows", action="store_true",
                        help="plan for rows filling --max-length, every position trained, "
                             "whatever the --data rows hold (the worst case the settings allow)")  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", help="print JSON (total_bytes, <part>_bytes)"
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from slimtune.memory import BUILTIN, estimate, parse_bytes, resolve_architecture
    from slimtune.memory.advice import suggest
    from slimtune.train.config import load_config, overrides_from_args

    if args.list:
        for name, arch in BUILTIN.items():
            print(f"{name:16s} {arch.num_params() / 1e9:7.2f}B parameters")
        return 0
    config_file, model = _config_or_model(args.source)
    overrides = overrides_from_args(args)
    if model is not None:
        if overrides.get("model", model) != model:
            raise SlimtuneError(f"two models given: {model!r} and --model {overrides['model']!r}")
        overrides["model"] = model
    config = load_config(config_file, overrides)  # what `slimtune train` would run
    arch = resolve_architecture(config.model) if config.model else _default_architecture()
    auto = _auto_dtype(args.device)
    if args.processes < 1:
        raise SlimtuneError(f"--processes: expected 1 or more, got {args.processes}")
    tokenizer, tokenizer_bytes, no_tokenizer = _measured_tokenizer(config)
    rows, no_rows = (None, None) if args.full_rows else _training_rows(config, tokenizer)
    result = estimate(arch, config, args.device, auto, args.processes, rows, tokenizer_bytes)
    result.notes += [why for why in (no_tokenizer, no_rows) if why]
    budget = parse_bytes(args.device_memory) if args.device_memory else None
    steps = []
    if budget is not None and result.total > budget:
        steps = suggest(arch, config, budget, args.device, auto, rows, tokenizer_bytes)
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


def _config_or_model(source: str | None) -> tuple[str | None, str | None]:
    """(config file, model) from the positional argument: a YAML file is a config."""
    if source is not None and source.lower().endswith((".yaml", ".yml")):
        return source, None
    return None, source


def _measured_tokenizer(config):
    """(the tokenizer `slimtune train` would load, the resident memory it took to load it here,
    None); (None, 0, why not) where the model has no tokenizer to load (a built-in name)."""
    from slimtune.models.chat_templates import set_chat_template
    from slimtune.models.loading import tokenizer_of
    from slimtune.runtime import release_freed_memory

    release_freed_memory()  # what the tokenizer allocates then comes in fresh pages
    before = _resident_bytes()
    try:
        tokenizer = tokenizer_of(config.model)
    except SlimtuneError as error:  # a folder with a config only; the default model missing
        return None, 0, f"the tokenizer is not counted: {error}"
    if tokenizer is None:
        return (
            None,
            0,
            (f"the tokenizer is not counted: {config.model!r} is no model folder or .gguf file"),
        )
    set_chat_template(tokenizer, config.chat_template)
    gc.collect()  # what loading it left behind does not stay with the run
    release_freed_memory()
    return tokenizer, max(0, _resident_bytes() - before), None


def _resident_bytes() -> int:
    """This process's resident memory (Linux; elsewhere 0: the tokenizer is then not counted)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _training_rows(config, tokenizer):
    """(the rows `slimtune train` would batch, None) from the config's data, tokenized with the
    model's tokenizer; (None, why not) where they cannot be read: the plan is then for rows
    filling max_length."""
    from slimtune.memory.batch import RowSizes

    if config.data is None:
        return None, None
    if config.objective != "sft":
        return None, f"{config.objective}: pairs planned to fill max_length; the data is not read"
    if tokenizer is None:
        return None, "the data is not read without a tokenizer: planned for rows filling max_length"
    from slimtune.train.setup import build_data

    data = build_data(config, tokenizer)  # the rows train would train on, packed where it packs
    return RowSizes.of(data.train, str(config.data)), None


def _auto_dtype(device: str) -> str:
    """What compute_dtype auto resolves to on `device`, as `slimtune train` decides it here; for
    a GPU this machine lacks, bfloat16 (every GPU since Ampere multiplies it natively)."""
    import torch

    from slimtune.hardware import device_has_native_bf16

    if device == "cuda" and not torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if device_has_native_bf16(device) else "float32"


def _default_architecture():
    from slimtune.memory import builtin_architecture

    return builtin_architecture("smollm2-135m")


def _table(result) -> str:
    from slimtune.memory import format_bytes

    s = result.config
    arch = result.architecture
    ckpt = "on" if s.gradient_checkpointing else "off"
    lines = [
        f"{arch.name}: {arch.num_params() / 1e9:.3g}B parameters, {result.trainable_params / 1e6:.3g}M trainable",
        f"{s.method}, rank {s.rank}, batch {s.batch_size} x {s.max_length}, "
        f"checkpointing {ckpt}, {s.optimizer}, compute {result.compute_dtype}, on {result.device}",
        _describe_shape(result.shape),
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


def _describe_shape(shape) -> str:
    from slimtune.memory.batch import FULL_ROWS

    where = (
        "rows filling max_length" if shape.source == FULL_ROWS else f"the rows of {shape.source}"
    )
    return (
        f"largest micro-batch, for {where}: {shape.rows} x {shape.length} tokens, "
        f"{shape.trained} trained positions"
    )


def _band(result) -> str:
    from slimtune.memory import format_bytes

    if result.error_band is None:
        return (
            f"  not calibrated on {result.device}: the analytic count (activations, an "
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
