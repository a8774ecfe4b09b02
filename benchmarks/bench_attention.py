#!/usr/bin/env python3
"""Training's causal attention: slimtune's C kernel (slimtune.models.attention) against torch's
SDPA, alternating in one process so both see the same machine load.

1. One layer's attention, forward and backward, at SmolLM2's shapes (batch 4 x 256 positions,
   9 query heads over 3 key/value heads, 64 wide), in float32 and bfloat16.
2. With `--step`: whole QLoRA steps of bench_train.py's workload (SmolLM2, 4 x 256 tokens,
   LoRA r 16 on all 7 projections, forward and backward), the model switching its attention
   implementation between steps.

    .venv/bin/python benchmarks/bench_attention.py --rounds 7 --step --out report.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))


def layer_times(dtype: torch.dtype, rounds: int) -> dict[str, list[float]]:
    from slimtune.models.attention import CausalAttention

    batch, heads, kv_heads, length, width = 4, 9, 3, 256, 64
    torch.manual_seed(0)
    q = torch.randn(batch, heads, length, width, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, width, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, width, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, length, heads, width, dtype=dtype)

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.transpose(1, 2).backward(grad)

    def native():
        CausalAttention.apply(q, k, v, width**-0.5).backward(grad)

    return alternating({"sdpa": sdpa, "slimtune": native}, rounds)


def alternating(runs: dict, rounds: int, calls: int = 5) -> dict[str, list[float]]:
    """Seconds a call of each of `runs` (name -> a function), after one warm-up call each: per
    round, the mean of `calls` calls, the runs taking turns."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def alternating_steps(bf16: bool, rounds: int, setups: dict) -> dict[str, list[float]]:
    """Seconds of forward + backward of bench_train.py's QLoRA step, one list per entry of
    `setups` (name -> a function that sets the model up for it), the entries taking turns."""
    import bench_train

    from slimtune.train.forward import summed_loss

    class Args:
        r, alpha, batch, seq = 16, 32, 4, 256

    model, tokenizer = bench_train.slimtune_model("qlora", False, Args, bf16=bf16)
    model.train()
    x = bench_train.batches(tokenizer, 1, Args.batch, Args.seq)[0]
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(rounds + 1):  # the first round warms up
        for name, setup in setups.items():
            setup(model)
            start = time.perf_counter()
            summed_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]], baseline: str = "sdpa") -> dict:
    out = {
        name: dict(median_ms=round(statistics.median(t) * 1e3, 2), best_ms=round(min(t) * 1e3, 2))
        for name, t in times.items()
    }
    out[f"{baseline}_over_slimtune"] = round(
        statistics.median(times[baseline]) / statistics.median(times["slimtune"]), 2
    )
    return out


def arguments(doc: str) -> argparse.Namespace:
    """The options of this benchmark and of bench_swiglu.py; sets torch's threads."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step", action="store_true", help="also whole training steps")
    parser.add_argument("--out", default="", help="write the results JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def report(args: argparse.Namespace, results: dict, setups: dict, baseline: str) -> None:
    """With --step, whole steps (`setups`: the `alternating_steps` entries) in float32, and in
    bf16 where the CPU multiplies it natively: emulated, a bf16 step takes minutes. Then the
    machine, and the JSON where --out says."""
    from slimtune.hardware import cpu_has_native_bf16, machine_summary

    if args.step:
        for bf16 in (False, True) if cpu_has_native_bf16() else (False,):
            name = "bfloat16" if bf16 else "float32"
            steps = alternating_steps(bf16, args.rounds, setups)
            results["step"][name] = summary(steps, baseline)
            print(f"training step, {name}: {json.dumps(results['step'][name])}", flush=True)
    print(machine_summary())
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def main() -> None:
    args = arguments(__doc__)
    from slimtune.hardware import machine_record
    from slimtune.models.attention import NAME

    results = {"machine": machine_record(), "layer": {}, "step": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        results["layer"][name] = summary(layer_times(dtype, args.rounds))
        print(f"one layer, {name}: {json.dumps(results['layer'][name])}", flush=True)
    report(args, results, {
        "sdpa": lambda model: model.set_attn_implementation("sdpa"),
        "slimtune": lambda model: model.set_attn_implementation(NAME),
    }, "sdpa")  # fmt: skip


if __name__ == "__main__":
    main()
