"""Per-process peak RSS of a QLoRA step: 1 process, 2 processes data parallel, 2 with --fsdp.

    .venv/bin/python benchmarks/bench_fsdp.py [--shape small|7b] [--steps 2] [--json out.json]

Each process builds the model straight into 4 bits (bench_7b.build_4bit: random weights,
NF4 with double quantization, one float weight at a time), puts a LoRA adapter on every block
linear and calls `slimtune.train.train` with the config `slimtune train` would use: under
`torchrun` for 2 processes, with `fsdp: true` for the sharded runs. With `--fsdp` the build
keeps only this process's part of every tensor as it goes (slimtune.dist.LoadedPart, what
`slimtune train --fsdp` loads with); the layout "2 processes --fsdp (loaded whole)" builds the
whole model in every process and shards it after, as slimtune did before loading was sharded.
Every process trains `--batch-size` rows a step, so the activations per process are the same
in every layout.

Figures per process, from /proc/self/status:
- `build`: peak RSS while building the 4-bit model (whole, or this process's part of it);
- `base`: bytes of the 4-bit base (codes and scales) this process holds during training;
- `shard peak`: peak RSS from the end of the build (the peak is reset there) to the moment the
  model is sharded and the optimizer made: what sharding adds;
- `ready`: RSS at that moment (the peak is reset again, by wrapping the loop's
  `build_optimizer`, which it calls right after sharding);
- `step peak`: peak RSS from there to the end of training (steps and saving the adapter).

`--shape 7b` is LLaMA-2-7B (6.7B parameters; the 4-bit base is ~3.6 GiB, the float32
embeddings and output layer 1 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # A small, deep LLaMA whose blocks outweigh the rest, as in a large model: 403M parameters
    # in 32 blocks (a 6 MiB 4-bit layer), 8M in the embeddings and the output layer.
    "small": dict(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "7b": None,  # bench_7b.SHAPE
}
# (name, processes, --fsdp, load in parts)
LAYOUTS = (
    ("1 process", 1, False, False),
    ("2 processes", 2, False, False),
    ("2 processes --fsdp", 2, True, True),
    ("2 processes --fsdp (loaded whole)", 2, True, False),
)


def _mib(field: str) -> float:
    from bench_7b import status_mib

    return status_mib(field)


def _base_bytes(model: torch.nn.Module) -> int:
    """Bytes of 4-bit codes and scales this process holds (its shards, under FSDP)."""
    from torch.distributed.tensor import DTensor

    from slimtune.quant import Linear4bit

    total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for tensor in (module.weight, module.absmax, module.nested_absmax):
                if tensor is not None:
                    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                    total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    """One process of a layout: build, train `--steps` steps, print its figures."""
    import bench_7b

    from slimtune.dist import LoadedPart
    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.train import TrainConfig, train
    from slimtune.train import loop as train_loop
    from slimtune.train.setup import TrainData

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape] or bench_7b.SHAPE
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    keep_part = LoadedPart(rank, world_size) if args.parts else None
    model = bench_7b.build_4bit(shape["num_hidden_layers"], torch.float32, shape, keep_part)
    model.config.use_cache = False
    torch.manual_seed(0)
    inject_adapter(model, LoraConfig(r=args.rank, alpha=16, dropout=0.0))
    build_peak = _mib("VmHWM")
    bench_7b.reset_peak()

    ready = {}
    make_optimizer = train_loop.build_optimizer

    def optimizer_then_reset(*a, **k):  # called by the loop right after sharding
        optimizer = make_optimizer(*a, **k)
        ready["peak"] = _mib("VmHWM")
        bench_7b.reset_peak()
        ready["rss"] = _mib("VmRSS")
        return optimizer

    train_loop.build_optimizer = optimizer_then_reset
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(args.batch_size * world_size * args.steps):
        ids = torch.randint(3, shape["vocab_size"], (args.length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    config = TrainConfig(
        method="qlora",
        rank=args.rank,
        dropout=0.0,
        batch_size=args.batch_size,
        max_length=args.length,
        max_steps=args.steps,
        warmup_ratio=0.0,
        compute_dtype=args.compute_dtype,
        threads=args.threads,
        fsdp=args.fsdp,
        output=args.output,
    )
    train(config, model=model, data=TrainData(train=rows), progress=False)
    figures = dict(
        rank=rank,
        build_peak_mib=build_peak,
        base_mib=_base_bytes(model) / 2**20,
        shard_peak_mib=ready["peak"],
        ready_mib=ready["rss"],
        step_peak_mib=_mib("VmHWM"),
    )
    (Path(args.output) / f"figures-{figures['rank']}.json").write_text(json.dumps(figures))


def run_layout(args: argparse.Namespace, processes: int, fsdp: bool, parts: bool) -> list[dict]:
    from slimtune.runtime import lean_heap_environment, numba_prefers_openmp, passive_openmp_waits

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(args.threads)
    # What `slimtune train` sets for itself (slimtune.runtime): the thread policy, the lean heap.
    passive_openmp_waits(env)
    numba_prefers_openmp(env)
    env = lean_heap_environment(env) or env
    if args.mmap_threshold:  # a fixed threshold: glibc no longer raises it as blocks are freed
        tunable = f"glibc.malloc.mmap_threshold={args.mmap_threshold}"
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), tunable]))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    with tempfile.TemporaryDirectory() as output:
        command = [*launcher, __file__, "--worker", f"--output={output}", *_worker_flags(args)]
        command += ["--fsdp"] if fsdp else []
        command += ["--parts"] if parts else []
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(
                f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        found = [json.loads(p.read_text()) for p in Path(output).glob("figures-*.json")]
    return sorted(found, key=lambda r: r["rank"])


def _worker_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--shape={args.shape}",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--length={args.length}",
        f"--rank={args.rank}",
        f"--threads={args.threads}",
        f"--compute-dtype={args.compute_dtype}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="rows per process and step")
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help="bytes: also fix glibc's mmap threshold in the processes (default: slimtune's heap)",
    )
    parser.add_argument(
        "--layouts",
        default=",".join(name for name, *_ in LAYOUTS[:3]),
        help="comma list of the layouts to run (default: the first three)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from slimtune.hardware import machine_record, machine_summary

    print(machine_summary())
    heap = f"mmap threshold {args.mmap_threshold}" if args.mmap_threshold else "lean heap"
    steps = f"{args.steps} steps of {args.batch_size} x {args.length} per process"
    print(f"shape {args.shape}, {steps}, {heap}\n")
    print("| layout | rank | build peak | 4-bit base held | shard peak | ready | step peak |")
    print("|---|---|---|---|---|---|---|")
    record = dict(machine=machine_record(), settings=vars(args) | {"json": None}, layouts={})
    chosen = args.layouts.split(",")
    for name, processes, fsdp, parts in [layout for layout in LAYOUTS if layout[0] in chosen]:
        figures = run_layout(args, processes, fsdp, parts)
        record["layouts"][name] = figures
        for f in figures:
            print(
                f"| {name} | {f['rank']} | {f['build_peak_mib']:.0f} MiB | {f['base_mib']:.0f} MiB "
                f"| {f['shard_peak_mib']:.0f} MiB | {f['ready_mib']:.0f} MiB "
                f"| {f['step_peak_mib']:.0f} MiB |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
