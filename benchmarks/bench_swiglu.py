#!/usr/bin/env python3
"""Training's SwiGLU: slimtune's C passes (slimtune.models.swiglu) against torch's elementwise
kernels, alternating in one process so both see the same machine load.

1. One MLP's silu(gate) * up, forward and backward, at SmolLM2's shape (4 x 256 tokens x 1536),
   float32 (the dtype of gate and up in both training modes).
2. With `--step`: whole QLoRA steps of bench_train.py's workload (SmolLM2, 4 x 256 tokens, LoRA
   r 16 on all 7 projections, forward and backward), in float32 compute (bfloat16 too where the
   CPU multiplies it natively), the lean MLPs switching between the two between steps.

    .venv/bin/python benchmarks/bench_swiglu.py --rounds 7 --step --out report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention import alternating, arguments, report, summary  # noqa: E402


def layer_times(rounds: int) -> dict[str, list[float]]:
    from slimtune.models.lean_mlp import SwiGLU
    from slimtune.models.swiglu import NativeSwiGLU

    torch.manual_seed(0)
    gate = torch.randn(4, 256, 1536, requires_grad=True)
    up = torch.randn(4, 256, 1536, requires_grad=True)
    grad = torch.randn(4, 256, 1536)
    runs = {name: (lambda f=function: f.apply(gate, up).backward(grad))
            for name, function in (("torch", SwiGLU), ("slimtune", NativeSwiGLU))}  # fmt: skip
    return alternating(runs, rounds)


def native_mlps(on: bool):
    def setup(model: torch.nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, "_lean_native"):
                module._lean_native = on

    return setup


def main() -> None:
    args = arguments(__doc__)
    from slimtune.hardware import machine_record

    results = {"machine": machine_record(), "layer": {}, "step": {}}
    results["layer"]["float32"] = summary(layer_times(args.rounds), "torch")
    print(f"one MLP, float32: {json.dumps(results['layer']['float32'])}", flush=True)
    report(args, results, {"torch": native_mlps(False), "slimtune": native_mlps(True)}, "torch")


if __name__ == "__main__":
    main()
