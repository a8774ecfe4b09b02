#!/usr/bin/env python3
"""Training's SwiGLU: slimtune's C passes (slimtune.models.swiglu) against torch's elementwise
kernels, alternating in one process so both see the same machine load.

1. One MLP's silu(gate) * up, forward and backward, at SmolLM2's shape (4 x 256 tokens x 1536),
   float32 (the dtype of gate and up in both training modes).
2. With `--step`: whole QLoRA steps of bench_train.py's workload (SmolLM2, 4 x 256 tokens, LoRA
   r 16 on all 7 projections, forward and backward), in float32 and bfloat16 compute, the lean
   MLPs switching between the two between steps.

    .venv/bin/python benchmarks/bench_swiglu.py --rounds 7 --step --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention import alternating_steps, summary  # noqa: E402


def layer_times(rounds: int) -> dict[str, list[float]]:
    from slimtune.models.lean_mlp import SwiGLU
    from slimtune.models.swiglu import NativeSwiGLU

    torch.manual_seed(0)
    gate = torch.randn(4, 256, 1536, requires_grad=True)
    up = torch.randn(4, 256, 1536, requires_grad=True)
    grad = torch.randn(4, 256, 1536)
    runs = {name: (lambda f=function: f.apply(gate, up).backward(grad))
            for name, function in (("torch", SwiGLU), ("slimtune", NativeSwiGLU))}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(5):
                run()
            times[name].append((time.perf_counter() - start) / 5)
    return times


def native_mlps(on: bool):
    def setup(model: torch.nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, "_lean_native"):
                module._lean_native = on

    return setup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step", action="store_true", help="also whole training steps")
    parser.add_argument("--out", default="", help="write the results JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from slimtune.hardware import machine_record, machine_summary

    results = {"machine": machine_record(), "layer": {}, "step": {}}
    results["layer"]["float32"] = summary(layer_times(args.rounds), "torch")
    print(f"one MLP, float32: {json.dumps(results['layer']['float32'])}", flush=True)
    if args.step:
        for bf16 in (False, True):
            name = "bfloat16" if bf16 else "float32"
            setups = {"torch": native_mlps(False), "slimtune": native_mlps(True)}
            results["step"][name] = summary(alternating_steps(bf16, args.rounds, setups), "torch")
            print(f"training step, {name}: {json.dumps(results['step'][name])}", flush=True)
    print(machine_summary())
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
