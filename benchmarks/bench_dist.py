"""Data parallel training throughput on this machine: 1 process vs 2 processes under torchrun.

    .venv/bin/python benchmarks/bench_dist.py [--model PATH] [--steps 6] [--repeats 2]

Every configuration trains the same QLoRA adapter on the bundled demo data with the same
global batch (1 process x batch 2b, or 2 processes x batch b) for the same steps:

- 1 x 1: one process, one torch thread (the baseline of data parallel scaling);
- 1 x 2: one process, two threads (intra-op parallelism over the 2 cores);
- 2 x 1: two processes under `torchrun`, one thread each (data parallelism over the cores).

The throughput is the median of the per-step `tokens_per_s` in metrics.jsonl (input tokens of
all ranks / step time; the first steps skipped as warm-up). The wall time includes start-up
and model loading. Configurations alternate within each repeat so that machine noise hits
them alike, and the load average after each run is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slimtune.hardware import machine_summary

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2
LAYOUTS = ((1, 1), (1, 2), (2, 1))  # (processes, threads per process)


def _config(folder: Path, args: argparse.Namespace) -> Path:
    from slimtune.data.demo import demo_data_path

    lines = [
        f"data: {demo_data_path('train')}",
        "method: qlora",
        f"rank: {args.rank}",
        "dropout: 0.0",
        f"max_length: {args.max_length}",
        f"max_steps: {args.steps}",
        "grad_accum: 1",
        "lr_scheduler: constant",
        "warmup_ratio: 0.0",
    ]
    if args.model:
        lines.append(f"model: {args.model}")
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(config: Path, output: Path, nproc: int, threads: int, global_batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*launcher, "-m", "slimtune", "train", str(config), f"--output={output}"]
    command += [f"--batch-size={global_batch // nproc}", f"--threads={threads}", "--no-progress"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    load = os.getloadavg()[0]  # the machine is shared: say how busy it was
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][WARMUP_STEPS:]
    losses = [r["loss"] for r in records if "loss" in r]
    return dict(tokens_per_s=statistics.median(speeds), wall_s=wall, losses=losses, load=load)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default SmolLM2)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")

    results: dict[tuple[int, int], list[dict]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp), args)
        for repeat in range(args.repeats):
            for nproc, threads in LAYOUTS:
                output = Path(tmp) / f"out-{nproc}x{threads}-{repeat}"
                run = _run(config, output, nproc, threads, args.global_batch)
                results[nproc, threads].append(run)
                print(f"  {nproc} x {threads}, run {repeat + 1}: {run['tokens_per_s']:.0f} tok/s, "
                      f"wall {run['wall_s']:.0f} s, load average {run['load']:.1f}", flush=True)  # fmt: skip

    model = args.model or "SmolLM2-135M"
    print(f"\nMachine: {machine_summary()}")
    print(f"\n{model} QLoRA r{args.rank}, global batch {args.global_batch} rows, "
          f"{args.steps} steps (median of steps {WARMUP_STEPS + 1}..{args.steps})\n")  # fmt: skip
    print("| processes x threads | tokens/s (median) | runs | wall s (incl. load) |")
    print("|---|---|---|---|")
    median = {}
    for (nproc, threads), runs in results.items():
        speeds = [r["tokens_per_s"] for r in runs]
        median[nproc, threads] = statistics.median(speeds)
        walls = statistics.median(r["wall_s"] for r in runs)
        print(f"| {nproc} x {threads} | {median[nproc, threads]:.0f} | "
              f"{', '.join(f'{s:.0f}' for s in speeds)} | {walls:.0f} |")  # fmt: skip
    print(f"\n2 x 1 over 1 x 1 (data parallel scaling): {median[2, 1] / median[1, 1]:.2f}x")
    print(f"2 x 1 over 1 x 2 (processes vs threads):  {median[2, 1] / median[1, 2]:.2f}x")
    # Same data, seed and global batch: the loss curves must agree (a correctness check).
    curves = [runs[0]["losses"] for runs in results.values()]
    worst = max(abs(a - b) for curve in curves[1:] for a, b in zip(curves[0], curve, strict=True))
    print(f"largest loss difference between the layouts: {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
