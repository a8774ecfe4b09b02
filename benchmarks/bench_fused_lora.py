#!/usr/bin/env python3
"""What the shared-input LoRA product (lora/fused.py) gains, measured within one process.

bench_train.py runs each variant in a fresh process, one after the other; on a shared machine
the load changes between them by more than the effect measured here. This script trains one
SmolLM2 QLoRA model (bench_train's workload and settings) and alternates steps with and without
the shared-input groups, so both see the same load; it reports the median of each and their
ratio, and checks that the losses agree.

    .venv/bin/python benchmarks/bench_fused_lora.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import bench_train
    import torch

    from slimtune.hardware import machine_record, machine_summary
    from slimtune.lora import LoraLinear
    from slimtune.train.forward import summed_loss

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="compute_dtype bfloat16")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model, tokenizer = bench_train.slimtune_model("qlora", False, args, bf16=args.bf16)
    model.train()
    groups = {m: m.shared for m in model.modules() if isinstance(m, LoraLinear) and m.shared}
    x = bench_train.batches(tokenizer, 1, args.batch, args.seq)[0]
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}

    def step(fused: bool) -> tuple[float, float]:
        for layer, group in groups.items():
            layer.shared = group if fused else None
        torch.manual_seed(0)  # the same dropout draws in both modes
        start = time.perf_counter()
        loss = summed_loss(model, batch)
        loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds, float(loss)

    step(True), step(False)  # warm-up (numba, allocator)
    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * args.rounds):
        fused = i % 2 == 0 if (i // 2) % 2 == 0 else i % 2 == 1  # ABBA order
        seconds, loss = step(fused)
        times[fused].append(seconds)
        losses[fused].append(loss)
    result = dict(
        groups=len({id(g) for g in groups.values()}),
        fused_s=statistics.median(times[True]),
        unfused_s=statistics.median(times[False]),
        times={"fused": times[True], "unfused": times[False]},
        loss_fused=losses[True][0],
        loss_unfused=losses[False][0],
        tokens=args.batch * args.seq,
        bf16=args.bf16,
        loadavg=os.getloadavg(),
        machine=machine_record(),
    )
    print(machine_summary())
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    print(
        f"forward+backward, median of {args.rounds}: fused {result['fused_s']:.3f} s, "
        f"unfused {result['unfused_s']:.3f} s ({result['unfused_s'] / result['fused_s']:.3f}x); "
        f"loss {result['loss_fused']:.5f} vs {result['loss_unfused']:.5f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
