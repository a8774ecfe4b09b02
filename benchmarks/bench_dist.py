"""Data parallel training throughput: 1 process vs 2 processes under torchrun, same global batch.

    .venv/bin/python benchmarks/bench_dist.py [--model PATH] [--steps 8] [--repeats 2]

Both configurations train the same QLoRA adapter on the bundled demo data with the same global
batch (1 process x batch 2b, or 2 processes x batch b) and the same number of steps, on the
same cores: 1 process gets `cores` torch threads, each of the 2 processes gets `cores / 2`.
The throughput is the median of the per-step `tokens_per_s` in metrics.jsonl (input tokens of
all ranks / step time, the first steps skipped as warm-up); the wall time includes start-up
and model loading. Runs alternate (1, 2, 1, 2, ...) so that machine noise hits both alike.
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

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2


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


def _run(config: Path, output: Path, nproc: int, global_batch: int, cores: int) -> dict:
    threads = max(1, cores // nproc)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*launcher, "-m", "slimtune", "train", str(config), f"--output={output}"]
    command += [f"--batch-size={global_batch // nproc}", f"--threads={threads}"]
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
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()

    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp), args)
        for repeat in range(args.repeats):
            for nproc in (1, 2):
                output = Path(tmp) / f"out-{nproc}-{repeat}"
                run = _run(config, output, nproc, args.global_batch, args.cores)
                results[nproc].append(run)
                print(f"  {nproc} process(es), run {repeat + 1}: {run['tokens_per_s']:.0f} tok/s, "
                      f"wall {run['wall_s']:.1f} s, load average {run['load']:.1f}", flush=True)  # fmt: skip

    print(f"\nSmolLM2-135M QLoRA r{args.rank}, global batch {args.global_batch} rows, "
          f"{args.steps} steps, {args.cores} cores\n")  # fmt: skip
    print("| processes x threads | tokens/s (median of runs) | runs | wall s (incl. load) |")
    print("|---|---|---|---|")
    for nproc, runs in results.items():
        speeds = [r["tokens_per_s"] for r in runs]
        walls = [r["wall_s"] for r in runs]
        threads = max(1, args.cores // nproc)
        print(f"| {nproc} x {threads} | {statistics.median(speeds):.0f} | "
              f"{', '.join(f'{s:.0f}' for s in speeds)} | {statistics.median(walls):.1f} |")  # fmt: skip
    ratio = statistics.median(r["tokens_per_s"] for r in results[2]) / statistics.median(
        r["tokens_per_s"] for r in results[1]
    )
    print(f"\n2 processes / 1 process throughput: {ratio:.2f}x")
    # Same data, same seed, same global batch: the loss curves must agree (a correctness check).
    first, second = results[1][0]["losses"], results[2][0]["losses"]
    worst = max(abs(a - b) for a, b in zip(first, second, strict=True))
    print(f"largest loss difference between 1 and 2 processes: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
