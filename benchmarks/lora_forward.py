"""LoraLinear vs PEFT's lora.Linear: forward + backward time on SmolLM2 layer shapes (CPU).

Both wrap the same nn.Linear with the same adapter; timings are interleaved (A, B, A, B, ...) so
machine noise hits both alike, and the ratio is what to read.
With `--threads 1` (default) the clock is the process CPU time, which stays meaningful when the shared machine is overloaded; with more threads
it is wall time. Usage:

    .venv/bin/python benchmarks/lora_forward.py [--rounds 5] [--tokens 1024] [--r 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch
from torch import nn

from slimtune.hardware import machine_summary
from slimtune.lora import LoraConfig, inject_adapter, set_active_adapters

SHAPES = {"q_proj 576->576": (576, 576), "up_proj 576->1536": (576, 1536)}


class One(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def step_time(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    for _ in range(iters):
        model(x).square().mean().backward()
    return (clock() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine_summary()}")
    print(
        f"tokens {args.tokens}, r {args.r}, threads {args.threads}, "
        f"{args.rounds} interleaved rounds x {args.iters} steps, forward + backward"
    )
    print("| layer | adapters | base alone ms | slimtune ms | peft ms | peft / slimtune |")
    print("|---|---|---|---|---|---|")
    for label, (d_in, d_out) in SHAPES.items():
        for n_adapters in (1, 2):
            torch.manual_seed(0)
            base = One(d_in, d_out)
            names = [f"a{i}" for i in range(n_adapters)]
            cfg = peft.LoraConfig(r=args.r, lora_alpha=32, target_modules=["proj"])
            theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
            ours = inject_adapter(copy.deepcopy(base), LoraConfig(r=args.r, alpha=32), names[0])
            for name in names[1:]:
                theirs.add_adapter(name, cfg)
                inject_adapter(ours, LoraConfig(r=args.r, alpha=32), name)
            theirs.base_model.set_adapter(names)
            set_active_adapters(ours, names)
            theirs.train(), ours.train()
            x = torch.randn(args.tokens // 256, 256, d_in, requires_grad=True)
            base.requires_grad_(False)
            step_time(ours, x, 2), step_time(theirs, x, 2)  # warm up
            t_base, t_ours, t_theirs = [], [], []
            for _ in range(args.rounds):
                t_base.append(step_time(base, x, args.iters))
                t_ours.append(step_time(ours, x, args.iters))
                t_theirs.append(step_time(theirs, x, args.iters))
            z, a, b = (statistics.median(t) * 1e3 for t in (t_base, t_ours, t_theirs))
            print(f"| {label} | {n_adapters} | {z:.2f} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
