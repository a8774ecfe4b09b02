#!/usr/bin/env python3
"""Training's sparse dropout on the CPU: the C draws and loops (slimtune/lora/dropout.c) against
numpy's draws and numba's loops (the fallback), alternating in one process.

1. One projection's dropout at SmolLM2's shapes (4 x 256 tokens; inputs of 576 and 1536, LoRA
   r 16, p 0.05): drawing the positions, then the three correction loops of a forward and
   backward pass.
2. With `--step`: whole QLoRA steps of bench_train.py's workload (forward and backward), in
   float32 compute (bfloat16 too where the CPU multiplies it natively), switching
   implementations between steps.

    .venv/bin/python benchmarks/bench_dropout.py --rounds 7 --step --out report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention import alternating, arguments, report, summary  # noqa: E402

P, RANK, TOKENS = 0.05, 16, 1024


def implementations() -> dict:
    """name -> (the loops, the draw): "slimtune" the C ones, "numba" the fallback."""
    from slimtune.lora import sparse_dropout

    if sparse_dropout._library() is None:
        raise SystemExit("the C kernels do not build here: nothing to compare")
    return {
        "numba": (sparse_dropout._numba_loops(), sparse_dropout._numpy_positions),
        "slimtune": (sparse_dropout._kernels(), sparse_dropout.drop_positions),
    }


def projection_times(width: int, rounds: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    x = torch.randn(TOKENS, width)
    a_t, g_low = torch.randn(width, RANK), torch.randn(TOKENS, RANK)

    def run(loops, draw) -> None:
        remove_from_low, remove_from_grad_a_t, _, remove_from_grad_x = loops
        positions = draw(x.numel(), P, 7).numpy()
        remove_from_low((x @ a_t).numpy(), x.numpy(), a_t.numpy(), positions)
        remove_from_grad_a_t((x.t() @ g_low).numpy(), x.numpy(), g_low.numpy(), positions)
        remove_from_grad_x((g_low @ a_t.t()).numpy(), g_low.numpy(), a_t.numpy(), positions)

    runs = {name: (lambda pair=pair: run(*pair)) for name, pair in implementations().items()}
    return alternating(runs, rounds)


def switch_to(loops, draw):
    """A setup for alternating_steps: the model's dropout through these loops and draw."""
    from slimtune.lora import fused, sparse_dropout

    def setup(model: torch.nn.Module) -> None:
        for module in (sparse_dropout, fused):
            module._kernels = lambda: loops
            module.drop_positions = draw

    return setup


def main() -> None:
    args = arguments(__doc__)
    from slimtune.hardware import machine_record

    results = {"machine": machine_record(), "layer": {}, "step": {}}
    for width in (576, 1536):
        results["layer"][f"input {width}"] = summary(projection_times(width, args.rounds), "numba")
        print(f"one projection, input {width}: {json.dumps(results['layer'][f'input {width}'])}",
              flush=True)  # fmt: skip
    setups = {name: switch_to(*pair) for name, pair in implementations().items()}
    report(args, results, setups, "numba")


if __name__ == "__main__":
    main()
