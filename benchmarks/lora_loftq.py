"""LoftQ on real SmolLM2-135M layers: how much of the 4-bit quantization error A, B cancel.

For each weight W: plain QLoRA starts from Q(W) with B = 0, error ||W - Q(W)||; LoftQ starts
from Q(W_q) + scaling * B @ A, error ||W - (Q(W_q) + scaling * B @ A)||. Reported relative to
||W||, averaged over the chosen layers, per projection. Usage:

    .venv/bin/python benchmarks/lora_loftq.py [--layers 0 10 20 29] [--ranks 16 64] [--iters 1 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slimtune.hardware import machine_summary
from slimtune.lora.init import loftq
from slimtune.models import load_model
from slimtune.quant import QuantConfig, dequantize_4bit, quantize_4bit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel(W: torch.Tensor, approx: torch.Tensor) -> float:
    return ((W - approx).norm() / W.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"Machine: {machine_summary()}")
    model, _ = load_model()
    quant = QuantConfig()  # NF4, blocksize 64, double quantization: QLoRA's recipe
    rows = {p: {} for p in PROJECTIONS}
    start = time.perf_counter()
    for index in args.layers:
        block = model.model.layers[index]
        for proj in PROJECTIONS:
            module = getattr(block.self_attn, proj, None) or getattr(block.mlp, proj)
            W = module.weight.detach().float()
            packed, state = quantize_4bit(W, quant.quant_type, quant.blocksize, quant.double_quant)
            rows[proj].setdefault("zero-init B", []).append(rel(W, dequantize_4bit(packed, state)))
            for r in args.ranks:
                for iters in args.iters:
                    A, B, W_q = loftq(W, r, 1.0, quant, iters)
                    p, s = quantize_4bit(W_q, quant.quant_type, quant.blocksize, quant.double_quant)
                    approx = dequantize_4bit(p, s, torch.float32) + B @ A
                    rows[proj].setdefault(f"r{r} it{iters}", []).append(rel(W, approx))
    columns = list(next(iter(rows.values())))
    print(f"layers {args.layers}; relative error ||W - approx|| / ||W||, mean over layers")
    print("| projection | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for proj, cols in rows.items():
        cells = [f"{statistics.mean(cols[c]):.4f}" for c in columns]
        print(f"| {proj} | " + " | ".join(cells) + " |")
    means = [statistics.mean(v for p in rows for v in rows[p][c]) for c in columns]
    print("| **all** | " + " | ".join(f"**{m:.4f}**" for m in means) + " |")
    base = means[0]
    print(
        "reduction vs zero-init B: "
        + ", ".join(f"{c}: {1 - m / base:.1%}" for c, m in zip(columns[1:], means[1:], strict=True))
    )
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
