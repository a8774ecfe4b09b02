"""4-bit dequantization and Linear4bit forward+backward: slimtune vs bitsandbytes vs fp32 nn.Linear.

    .venv/bin/python benchmarks/bench_quant.py [--repeats 15] [--threads 2] [--tokens 1024]

All contestants run interleaved in one process (round robin, same inputs), so a busy machine
slows them alike; we report medians and the ratios that matter:
  dequantize  ours / bitsandbytes                     (target <= 1.0)
  fwd+bwd     ours / fp32 nn.Linear (frozen weight)   (target <= 1.15)
fwd+bwd is y = layer(x); y.backward(g) with x requiring grad and the weight frozen: the base
layer of QLoRA, where only the input gradient is needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from slimtune.hardware import machine_summary

SHAPES = [(576, 1536), (4096, 4096)]  # (in_features, out_features)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(contestants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run round robin after one warm-up call each."""
    for fn in contestants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, fn in contestants.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def layers(in_features: int, out_features: int):
    import bitsandbytes as bnb

    from slimtune.quant import Linear4bit, QuantConfig

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).requires_grad_(False)
    theirs = bnb.nn.Linear4bit(
        in_features,
        out_features,
        compute_dtype=torch.float32,
        compress_statistics=True,
        quant_type="nf4",
    )
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu").requires_grad_(False)
    ours = Linear4bit.from_linear(linear, QuantConfig("nf4", 64, double_quant=True))
    return linear, theirs, ours


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None
        layer(x).backward(grad)

    return step


def bench_shape(in_features: int, out_features: int, tokens: int, repeats: int) -> None:
    import bitsandbytes.functional as bnbf

    from slimtune.quant import dequantize_4bit

    linear, theirs, ours = layers(in_features, out_features)
    state_ref, state = theirs.weight.quant_state, ours.quant_state
    t = interleaved(
        {
            "ours": lambda: dequantize_4bit(ours.weight, state, torch.float32),
            "bnb": lambda: bnbf.dequantize_4bit(theirs.weight, state_ref),
        },
        repeats,
    )
    name = f"{out_features} x {in_features}"
    print(
        f"| {name} | dequantize | {t['ours'] * 1e3:.2f} | {t['bnb'] * 1e3:.2f} | - "
        f"| {t['ours'] / t['bnb']:.2f} | - |"
    )
    x = torch.randn(tokens, in_features, requires_grad=True)
    grad = torch.randn(tokens, out_features)
    t = interleaved(
        {
            "ours": fwd_bwd(ours, x, grad),
            "bnb": fwd_bwd(theirs, x, grad),
            "fp32": fwd_bwd(linear, x, grad),
        },
        repeats,
    )
    print(
        f"| {name} | forward+backward | {t['ours'] * 1e3:.2f} | {t['bnb'] * 1e3:.2f} "
        f"| {t['fp32'] * 1e3:.2f} | {t['ours'] / t['bnb']:.2f} | {t['ours'] / t['fp32']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"Machine: {machine_summary()}")
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.tokens} tokens, "
        f"median of {args.repeats}, NF4 + double quantization, blocksize 64, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| weight (out x in) | op | slimtune ms | bitsandbytes ms | fp32 nn.Linear ms "
        "| slimtune / bnb | slimtune / fp32 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for in_features, out_features in SHAPES:
        bench_shape(in_features, out_features, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
