"""Decode steps of SmolLM2-135M in NF4, side by side in one run: the lean forward (Python over
the model's modules, 4-bit kernels) against the C decode step (slimtune.infer.native_step).

- float32 and bfloat16 compute (the 4-bit products in bfloat16 where the CPU has it);
- 1 row with one adapter (a `generate` step) and 16 rows over 3 adapters (a `serve --qlora`
  step; the lean forward runs them as per-sample adapters, the C step as slots);
- each adapter r=16 on every linear layer of the blocks, random (speed does not depend on what
  they learned); a 64-token context already in the KV cache;
- milliseconds a step, best of --repeats (each a mean over --steps steps), alternating the two
  paths, and the output layer's share (timed alone);
- and a prefill of one prompt of 64 to 1024 tokens through each (best of --prefill-repeats).
Writes benchmarks/reports/step.json and step.md.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_step.py [--repeats 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from slimtune.runtime import short_openmp_spins  # noqa: E402

short_openmp_spins(os.environ)  # the thread policy of the commands that decode

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ["a", "b", "c"]
CONTEXT = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the layers' compute dtype


def model_with_adapters():
    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.models import load_model
    from slimtune.quant import QuantConfig

    model, _ = load_model(quant=QuantConfig())
    generator = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        inject_adapter(model, LoraConfig(r=16, alpha=32), name)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f"lora_B.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return model.eval()


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def paths(model, rows: int, steps: int, dtype: torch.dtype):
    """(lean step, C step) closures for `rows` rows, each over its own cache with CONTEXT
    columns filled, room for the steps of every repeat."""
    from slimtune.infer.llama import KVCache, Rotary, lean_forward
    from slimtune.infer.native_step import NativeDecoder
    from slimtune.lora import lora_layers, per_sample_adapters

    names = ADAPTERS[:1] * rows if rows == 1 else [ADAPTERS[i % 3] for i in range(rows)]
    capacity = CONTEXT + steps + 1
    rotary = Rotary(model, capacity, torch.float32)
    ids = torch.randint(100, 40000, (rows, CONTEXT), generator=torch.Generator().manual_seed(1))
    layers = [layer for _, layer in lora_layers(model)]
    caches = []
    for _ in range(2):
        cache = KVCache.empty(model, rows, capacity, torch.float32)
        with per_sample_adapters(model, names, layers):
            lean_forward(model, ids, torch.arange(CONTEXT).expand(rows, -1), cache, rotary, None)
        caches.append(cache)
    token = ids[:, -1:]
    native = NativeDecoder.build(model, dtype, ADAPTERS)
    slots = [ADAPTERS.index(n) for n in names]

    def lean():
        cache = caches[0]
        with per_sample_adapters(model, names, layers):
            at = torch.full((rows, 1), cache.length)
            lean_forward(model, token, at, cache, rotary, None)

    def c_step():
        native.step(token.view(-1).tolist(), caches[1], rotary, slots=slots)

    return lean, c_step


def measure(model, rows: int, repeats: int, steps: int, dtype: torch.dtype) -> dict:
    from slimtune.quant.inference import inference_4bit

    with inference_4bit(model, dtype), torch.inference_mode():
        lean, c_step = paths(model, rows, steps * (repeats + 1), dtype)
        best = {"lean forward": float("inf"), "C step": float("inf")}
        for _ in range(repeats + 1):  # the first round warms up
            for name, step in (("lean forward", lean), ("C step", c_step)):
                best[name] = min(best[name], timed(step, steps))
        head = model.lm_head
        x = torch.randn(rows, model.config.hidden_size)
        head_ms = min(timed(lambda: head(x), steps) for _ in range(repeats))
    return {**best, "output layer": head_ms}


PREFILL_WIDTHS = (64, 256, 512, 1024)  # around native_step.prefill_columns


def prefill(model, width: int, repeats: int, dtype: torch.dtype) -> dict:
    """Milliseconds of one prompt of `width` tokens (adapter "a") through the lean forward and
    through the C call, best of `repeats`, alternating."""
    from slimtune.infer.llama import KVCache, Rotary, lean_forward
    from slimtune.infer.native_step import NativeDecoder
    from slimtune.lora import lora_layers, per_sample_adapters
    from slimtune.quant.inference import inference_4bit

    ids = torch.randint(100, 40000, (1, width), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(1, width, dtype=torch.bool)
    layers = [layer for _, layer in lora_layers(model)]
    best = {"lean forward": float("inf"), "C": float("inf")}
    with inference_4bit(model, dtype), torch.inference_mode():
        rotary = Rotary(model, width, torch.float32)
        native = NativeDecoder.build(model, dtype, ADAPTERS)

        def lean():
            cache = KVCache.empty(model, 1, width, torch.float32)
            with per_sample_adapters(model, ["a"], layers):
                lean_forward(model, ids, torch.arange(width)[None], cache, rotary, None)

        def in_c():
            native.prefill(ids, valid, KVCache.empty(model, 1, width, torch.float32), rotary)

        for _ in range(repeats + 1):  # the first round warms up
            for name, run in (("lean forward", lean), ("C", in_c)):
                best[name] = min(best[name], timed(run, 1))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument(
        "--widths", default=",".join(map(str, PREFILL_WIDTHS)), help="prompt lengths to prefill"
    )
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="compute dtypes to run")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/reports/step.json")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/step.md")
    args = parser.parse_args()
    from slimtune.hardware import machine_record, machine_summary

    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    widths = [int(w) for w in args.widths.split(",")]
    model = model_with_adapters()
    load = os.getloadavg()[0]
    record = {
        "machine": machine_record(),
        "load_average_before": load,
        "ms": {
            f"{rows} {name}": measure(model, rows, args.repeats, args.steps, DTYPES[name])
            for name in dtypes
            for rows in (1, 16)
        },
        "prefill_ms": {
            f"{width} {name}": prefill(model, width, args.prefill_repeats, DTYPES[name])
            for name in dtypes
            for width in widths
        },
    }
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# Decode steps: the lean forward against the C step",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/bench_step.py "
        f"{' '.join(sys.argv[1:])}`".rstrip()
        + "  ",
        f"Machine: {machine_summary()}; load average {load:.1f} when it started.  ",
        "SmolLM2-135M-Instruct in NF4 (double quantization), adapters r=16 on every linear layer "
        f"of the blocks, {CONTEXT} tokens in the KV cache; milliseconds a step, best of "
        f"{args.repeats} means over {args.steps} steps.",
        "",
        "| rows | adapters | compute | lean forward ms | C step ms | speed-up | tokens/s (C) "
        "| output layer ms (in both) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, ms in record["ms"].items():
        rows, dtype = key.split()
        rows = int(rows)
        adapters = "1" if rows == 1 else "3, mixed"
        lines.append(
            f"| {rows} | {adapters} | {dtype} | {ms['lean forward']:.2f} | {ms['C step']:.2f} | "
            f"{ms['lean forward'] / ms['C step']:.2f}x | {rows * 1e3 / ms['C step']:.0f} | "
            f"{ms['output layer']:.2f} |"
        )
    lines += [
        "",
        "## Prefill of one prompt: the lean forward against the C call",
        "",
        "One prompt with adapter `a`, into an empty cache; milliseconds, best of "
        f"{args.prefill_repeats}. The C call's attention runs per row over the row's columns, "
        "quadratic in the prompt: `native_step.prefill_columns` is where it stops paying.",
        "",
        "| tokens | compute | lean forward ms | C ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for key, ms in record["prefill_ms"].items():
        width, dtype = key.split()
        lean, in_c = ms["lean forward"], ms["C"]
        lines.append(f"| {width} | {dtype} | {lean:.1f} | {in_c:.1f} | {lean / in_c:.2f}x |")
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
