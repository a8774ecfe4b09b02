#!/usr/bin/env python3
"""bfloat16 against float32 training on SmolLM2: the demo's eval losses and exact match.

Runs the demo (`slimtune.train.demo`: QLoRA on the bundled date task) twice with the same seed,
compute_dtype float32 then bfloat16, and compares the eval loss at every evaluation (target:
within 2%) and the exact match after training (target: within 2 points).

On a CPU without native bfloat16 (AVX2 only) torch multiplies bfloat16 matrices in a slow
fallback (measured ~50x slower than float32), so there `--emulate` (the default on such CPUs)
runs every bfloat16 matmul as float32 on the bfloat16 operands with the product rounded to
bfloat16: what a native bf16 GEMM computes (bf16 inputs, float32 accumulation, one rounding),
up to the order of its float32 sums. Everything else (norms, attention, activations, the 4-bit
decode, the LoRA path) runs as it does natively. The report says which was used. The exact
match after training is measured as the demo measures it (evaluation computes in float32).

    .venv/bin/python benchmarks/bf16_fidelity.py --max-steps 30 --eval-every 10

`--probes` then runs the demo again with one part of the step changed at a time, to see where the
gap comes from and how big a perturbation moves it: bfloat16 with the output layer in float32,
with the 4-bit base's forward in float32, with its input gradient in float32; float32 with
every matmul computed in float64 (more exact than float32); and float32 with the adapters'
initial A rounded to bfloat16 (one bfloat16-sized change, made once, to a float32 run).
`--probe NAME` runs only the probes named.

`--seeds K` runs both dtypes with seeds 0 .. K-1 (seed 0 is the demo's): how far the float32
curve itself moves with the seed (adapter init, dropout masks, data order), each seed's gap,
and the gap between the two dtypes' mean curves, which separates a bias of bfloat16 from
the run-to-run spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}


class WidenedMatmul(TorchDispatchMode):
    """Matmuls whose tensors `applies` to, computed on operands cast to `wide` and rounded once
    to `narrow` (written into `out` when the call gives one)."""

    wide: torch.dtype
    narrow: torch.dtype

    def applies(self, tensors: list[torch.Tensor], kwargs: dict) -> bool:
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func.overloadpacket not in MATMULS or not self.applies(tensors, kwargs):
            return func(*args, **kwargs)
        wide = [a.to(self.wide) if isinstance(a, torch.Tensor) else a for a in args]
        out = kwargs.pop("out", None)
        result = func.overloadpacket.default(*wide, **kwargs).to(self.narrow)
        return result if out is None else out.copy_(result)


class EmulatedBf16Matmul(WidenedMatmul):
    """bfloat16 matmuls as float32 on the bfloat16 operands, the product rounded to bfloat16."""

    wide, narrow = torch.float32, torch.bfloat16

    def applies(self, tensors, kwargs):
        return any(t.dtype == torch.bfloat16 for t in tensors)


class Float64Matmul(WidenedMatmul):
    """float32 matmuls computed in float64 and rounded once to float32."""

    wide, narrow = torch.float64, torch.float32

    def applies(self, tensors, kwargs):
        return (
            "out" not in kwargs and bool(tensors) and all(t.dtype == torch.float32 for t in tensors)
        )


def _float32_forward(linear_4bit):
    def forward(x, packed, state, bias, dtype):
        bias = None if bias is None else bias.float()
        return linear_4bit(x.float(), packed, state, bias, torch.float32).to(x.dtype)

    return forward


def _float32_input_grad(input_grad_4bit):
    def backward(grad_out, packed, state, dtype):
        return input_grad_4bit(grad_out.float(), packed, state, torch.float32).to(grad_out.dtype)

    return backward


def _bf16_rounded_init(kaiming_):
    def init(A):
        kaiming_(A)
        with torch.no_grad():
            A.copy_(A.bfloat16().float())

    return init


def probes() -> dict:
    """name -> (compute dtype, a context that changes one part of the step)."""
    from slimtune.lora import init
    from slimtune.quant import linear
    from slimtune.train import precision

    return {
        "bfloat16, output layer in float32": (
            "bfloat16",
            lambda: mock.patch.object(precision, "_frozen_output_layer", lambda m: None),
        ),
        "bfloat16, 4-bit base forward in float32": (
            "bfloat16",
            lambda: mock.patch.object(linear, "linear_4bit", _float32_forward(linear.linear_4bit)),
        ),
        "bfloat16, 4-bit base input gradient in float32": (
            "bfloat16",
            lambda: mock.patch.object(
                linear, "input_grad_4bit", _float32_input_grad(linear.input_grad_4bit)
            ),
        ),
        "float32, every matmul in float64": ("float32", Float64Matmul),
        "float32, initial A rounded to bfloat16": (
            "float32",
            lambda: mock.patch.object(init, "kaiming_", _bf16_rounded_init(init.kaiming_)),
        ),
    }


def run(dtype: str, args, output: Path, change=contextlib.nullcontext, seed: int = 0) -> dict:
    from slimtune.train.demo import demo_config, run_demo

    torch.set_num_threads(args.threads)
    config = demo_config(
        output=str(output),
        compute_dtype=dtype,
        max_steps=args.max_steps,
        eval_every=args.eval_every,
        save_every=None,
        seed=seed,
    )
    lines: list[str] = []
    start = time.perf_counter()
    emulate = dtype == "bfloat16" and args.emulate
    with EmulatedBf16Matmul() if emulate else contextlib.nullcontext(), change():
        result = run_demo(config, show=0, progress=False, echo=lines.append)
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return dict(
        compute_dtype=dtype,
        seed=seed,
        emulated_matmuls=emulate,
        eval_loss={r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
        train_loss=[r["loss"] for r in records if "loss" in r],
        recorded_dtype=sorted({r["compute_dtype"] for r in records if "compute_dtype" in r}),
        exact_match_before=result.before,
        exact_match_after=result.after,
        test_rows=result.n,
        seconds=round(time.perf_counter() - start, 1),
    )


def main() -> None:
    from slimtune.hardware import cpu_has_native_bf16, machine_record, machine_summary

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=30, help="the demo's own: 30")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--emulate",
        action=argparse.BooleanOptionalAction,
        default=not cpu_has_native_bf16(),
        help="bf16 matmuls as float32 with rounded products (default: on CPUs without bf16)",
    )
    parser.add_argument("--probes", action="store_true", help="also the runs that locate the gap")
    parser.add_argument(
        "--probe", action="append", default=[], help="only this probe (repeatable; with --probes)"
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="also seeds 1 .. K-1, and the gap of the mean curves"
    )
    parser.add_argument("--out", default="", help="write the results JSON here")
    parser.add_argument(
        "--fp32-from", default="", help="take the float32 run from this earlier --out JSON"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.fp32_from:  # the same settings, run earlier: float32 results do not change
            fp32 = json.loads(Path(args.fp32_from).read_text())["runs"][0]
            fp32["eval_loss"] = {int(k): v for k, v in fp32["eval_loss"].items()}
        else:
            fp32 = run("float32", args, Path(tmp) / "float32")
        bf16 = run("bfloat16", args, Path(tmp) / "bfloat16")
        seeded = [
            (run("float32", args, Path(tmp) / f"f{seed}", seed=seed),
             run("bfloat16", args, Path(tmp) / f"b{seed}", seed=seed))
            for seed in range(1, args.seeds)
        ]  # fmt: skip
        probed = {}
        chosen = {name: probe for name, probe in probes().items()
                  if args.probes and (not args.probe or name in args.probe)}  # fmt: skip
        for i, (name, (dtype, change)) in enumerate(chosen.items()):
            probed[name] = run(dtype, args, Path(tmp) / f"probe{i}", change)
    runs = [fp32, bf16]
    steps = sorted(fp32["eval_loss"])
    worst = max(abs(bf16["eval_loss"][s] / fp32["eval_loss"][s] - 1) for s in steps)
    points = 100 * abs(bf16["exact_match_after"] - fp32["exact_match_after"])
    report = dict(machine=machine_record(), runs=runs, worst_eval_loss_gap=worst, em_gap=points,
                  probes=probed)  # fmt: skip
    if seeded:
        report["seeds"] = seed_summary([(fp32, bf16), *seeded], steps)
        runs.extend(r for pair in seeded for r in pair)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(machine_summary())
    print("| step | eval loss float32 | eval loss bfloat16 | gap |")
    print("|---|---|---|---|")
    for s in steps:
        a, b = fp32["eval_loss"][s], bf16["eval_loss"][s]
        print(f"| {s} | {a:.4f} | {b:.4f} | {100 * (b / a - 1):+.2f}% |")
    print(
        f"exact match after training: float32 {100 * fp32['exact_match_after']:.1f}%, "
        f"bfloat16 {100 * bf16['exact_match_after']:.1f}% ({fp32['test_rows']} rows; base "
        f"{100 * fp32['exact_match_before']:.1f}%)"
    )
    print(
        f"worst eval-loss gap {100 * worst:.2f}% (target <= 2%), exact-match gap {points:.1f} "
        f"points (target <= 2); bf16 matmuls {'emulated' if bf16['emulated_matmuls'] else 'native'}"
    )
    print(f"seconds: float32 {fp32['seconds']}, bfloat16 {bf16['seconds']}")
    if seeded:
        print_seeds(report["seeds"], steps)
    if probed:
        print("\n| run | " + " | ".join(f"step {s}" for s in steps) + " | exact match | s |")
        print("|---|" + "---|" * (len(steps) + 2))
        for name, r in {"bfloat16": bf16, **probed}.items():
            gaps = [100 * (r["eval_loss"][s] / fp32["eval_loss"][s] - 1) for s in steps]
            cells = " | ".join(
                f"{r['eval_loss'][s]:.6f} ({g:+.2f}%)" for s, g in zip(steps, gaps, strict=True)
            )
            print(f"| {name} | {cells} | {100 * r['exact_match_after']:.1f}% | {r['seconds']} |")


def seed_summary(pairs: list[tuple[dict, dict]], steps: list[int]) -> dict:
    """Per step: each seed's gap, the float32 curve's own spread over seeds, and the gap of the
    mean curves; and the exact match of each run."""

    def mean(values):
        return sum(values) / len(values)

    table = {}
    for s in steps:
        fp32 = [a["eval_loss"][s] for a, _ in pairs]
        bf16 = [b["eval_loss"][s] for _, b in pairs]
        table[s] = dict(
            float32=fp32,
            bfloat16=bf16,
            gaps=[b / a - 1 for a, b in zip(fp32, bf16, strict=True)],
            float32_spread=(max(fp32) - min(fp32)) / mean(fp32),
            mean_gap=mean(bf16) / mean(fp32) - 1,
        )
    return dict(
        seeds=[a.get("seed", 0) for a, _ in pairs],
        steps=table,
        exact_match=[(a["exact_match_after"], b["exact_match_after"]) for a, b in pairs],
        worst_mean_gap=max(abs(t["mean_gap"]) for t in table.values()),
    )


def print_seeds(summary: dict, steps: list[int]) -> None:
    seeds = summary["seeds"]
    print(f"\nseeds {seeds[0]} .. {seeds[-1]}")
    print("| step | float32 mean | bfloat16 mean | gap of the means | float32 spread over seeds | "
          "gap per seed |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for s in steps:
        t = summary["steps"][s]
        each = ", ".join(f"{100 * g:+.1f}%" for g in t["gaps"])
        print(
            f"| {s} | {sum(t['float32']) / len(seeds):.4f} | {sum(t['bfloat16']) / len(seeds):.4f}"
            f" | {100 * t['mean_gap']:+.2f}% | {100 * t['float32_spread']:.1f}% | {each} |"
        )
    matches = ", ".join(f"{100 * a:.1f}/{100 * b:.1f}" for a, b in summary["exact_match"])
    print(f"exact match after training per seed (float32/bfloat16 %): {matches}")


if __name__ == "__main__":
    main()
