"""Serving load test: N requests at concurrency C over 3 adapters, on loopback only.

Starts `slimtune serve`'s app (SmolLM2-135M-Instruct, fp32, 2 threads) on 127.0.0.1 with three
LoRA adapters (r=16, all linear layers, random weights: the speed does not depend on what they
learned) and sends /v1/completions requests from C concurrent clients, round-robin over the
adapters, from a child process (so that the clients never hold the server's GIL). It measures
throughput and p50/p99 latency twice, side by side in one run:
- mixed: requests for different adapters share one forward pass (per-sample adapters);
- one adapter at a time: a batch only takes requests for one adapter (the others wait).
Bounded: every run stops at --requests or after --time-limit seconds. Writes
benchmarks/reports/serve.md.

    .venv/bin/python benchmarks/bench_serve.py [--requests 1000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from slimtune.runtime import short_openmp_spins  # noqa: E402

short_openmp_spins(os.environ)  # the thread policy `slimtune serve` runs under

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ["risk", "research", "compliance"]
TOPICS = ["interest rates", "a bond ladder", "credit risk", "the quarterly report", "inflation",
          "a loan covenant", "market liquidity", "a compliance audit"]  # fmt: skip


def make_adapters(model, folder: Path) -> dict[str, Path]:
    from slimtune.lora import LoraConfig, delete_adapter, inject_adapter, save_adapter

    paths = {}
    for seed, name in enumerate(ADAPTERS):
        inject_adapter(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"), name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f"lora_B.{name}." in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
        paths[name] = save_adapter(model, folder / name, name)
        delete_adapter(model, name)
    return paths


def prompt(i: int) -> str:
    return f"Note {i} on {TOPICS[i % 8]}:"


async def load(url: str, requests: int, concurrency: int, max_tokens: int, limit: float) -> dict:
    import httpx

    latencies: list[float] = []
    failures = 0
    tokens = 0
    errors: list[str] = []
    counter = iter(range(requests))
    deadline = time.monotonic() + limit

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures, tokens
        for i in counter:
            if time.monotonic() > deadline:
                return
            body = {"model": ADAPTERS[i % 3], "prompt": prompt(i), "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/completions", json=body)
                ok = response.status_code == 200
                if ok:
                    tokens += response.json()["usage"]["completion_tokens"]
                else:
                    errors.append(f"{response.status_code} {response.text[:200]}")
            except httpx.HTTPError as error:
                ok = False
                errors.append(repr(error))
            latencies.append(time.perf_counter() - start)
            failures += not ok

    limits = httpx.Limits(max_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "done": len(latencies),
        "failures": failures,
        "seconds": seconds,
        "req_per_s": len(latencies) / seconds,
        "tok_per_s": tokens / seconds,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors[:5],
    }


def load_in_child(url: str, requests: int, concurrency: int, max_tokens: int, limit: float) -> dict:
    """`load` run by a child process: the clients' Python work must not take the server's GIL
    (in one process, every torch call of the engine thread waits for the clients' turn)."""
    command = [sys.executable, __file__, "--client", url, "--requests", str(requests),
               "--concurrency", str(concurrency), "--max-tokens", str(max_tokens),
               "--time-limit", str(limit)]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # the child's URL
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds per run at most")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 is faster on a crowded machine)"
    )
    parser.add_argument(
        "--qlora",
        action="store_true",
        help="base in NF4, computing from the packed codes (as `slimtune serve --qlora`)",
    )
    parser.add_argument(
        "--compute-dtype",
        default="float32",
        help="with --qlora: the 4-bit layers' compute dtype (as `slimtune serve --compute-dtype`)",
    )
    parser.add_argument("--modes", default="mixed,single", help="mixed, single or both")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/serve.md")
    args = parser.parse_args()
    if args.client:
        run = load(args.client, args.requests, args.concurrency, args.max_tokens, args.time_limit)
        print(json.dumps(asyncio.run(run)))
        return 0
    torch.set_num_threads(args.threads)

    from slimtune.models import load_model
    from slimtune.serve import AdapterRegistry, Engine, create_app
    from slimtune.serve.server import BackgroundServer

    quant = None
    if args.qlora:
        from slimtune.hardware import resolve_compute_dtype
        from slimtune.quant import QuantConfig

        quant = QuantConfig(compute_dtype=resolve_compute_dtype(args.compute_dtype))
    model, tokenizer = load_model(quant=quant)
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    paths = make_adapters(model, folder)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=1024)
    if args.qlora:
        from slimtune.infer import inference_context

        context = inference_context(model)
        context.__enter__()
        engine.on_stop.append(lambda: context.__exit__(None, None, None))
    registry = AdapterRegistry("base", folder)
    for name, path in paths.items():
        engine.load_adapter(name, path).result()  # the loop is not running yet: loads now
        registry.paths[name] = path
    rows = []

    def drive() -> None:  # the HTTP server and the load runs, beside the engine's loop
        try:
            with BackgroundServer(create_app(engine, registry)) as server:
                load_in_child(server.url, 32, args.concurrency, args.max_tokens, 300)  # warm-up
                for repeat in range(args.repeats):
                    for mixed in [m == "mixed" for m in args.modes.split(",")]:
                        engine.mixed_batches = mixed
                        steps = engine.steps
                        counts, seconds = dict(engine.pass_counts), dict(engine.pass_seconds)
                        result = load_in_child(server.url, args.requests, args.concurrency,
                                               args.max_tokens, args.time_limit)  # fmt: skip
                        result.update(mode="mixed" if mixed else "one adapter at a time",
                                      repeat=repeat + 1, steps=engine.steps - steps)  # fmt: skip
                        for kind in counts:  # mean ms a pass of each kind, and how many
                            n = engine.pass_counts[kind] - counts[kind]
                            ms = (engine.pass_seconds[kind] - seconds[kind]) / max(n, 1) * 1e3
                            result[f"{kind}_passes"], result[f"{kind}_ms"] = n, ms
                        rows.append(result)
                        print(result, flush=True)
        finally:
            engine.stop()

    threading.Thread(target=drive, name="drive").start()
    engine.run()  # on the thread that loaded the model, as `slimtune serve` runs it
    write_report(args, rows)
    return 0 if all(r["failures"] == 0 and r["done"] == args.requests for r in rows) else 1


def write_report(args, rows: list[dict]) -> None:
    from slimtune.hardware import machine_summary

    command = "PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])
    lines = [
        "# Serving benchmark: many adapters on one model",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine_summary()}, shared with "
        "other jobs (noisy: compare the two modes of one run, not runs of different days).  ",
        f"Model: SmolLM2-135M-Instruct "
        f"{f'NF4 (4-bit kernels, {args.compute_dtype} compute)' if args.qlora else 'fp32'}; "
        "3 adapters r=16 on all linear layers; "
        f"{args.requests} requests of {args.max_tokens} new tokens each (greedy, `ignore_eos`) "
        f"at concurrency "
        f"{args.concurrency}, round-robin over the adapters; --max-batch-size "
        f"{args.max_batch_size}; the clients in a child process, over 127.0.0.1.",
        "",
        "| run | mode | requests | failures | seconds | req/s | tokens/s | p50 latency s "
        "| p99 latency s | forward passes | prefills: n, ms each | decode steps: n, ms each |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['repeat']} | {r['mode']} | {r['done']} | {r['failures']} | {r['seconds']:.1f} "
            f"| {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} "
            f"| {r['steps']} | {r['prefill_passes']}, {r['prefill_ms']:.0f} "
            f"| {r['decode_passes']}, {r['decode_ms']:.1f} |"
        )
    mixed = [r["req_per_s"] for r in rows if r["mode"] == "mixed"]
    single = [r["req_per_s"] for r in rows if r["mode"] != "mixed"]
    if mixed and single:
        ratio = statistics.mean(mixed) / statistics.mean(single)
        lines += [
            "",
            f"Mixed-adapter batching throughput / one-adapter-at-a-time: **{ratio:.2f}x**",
        ]
    errors = [e for r in rows for e in r["errors"]]
    if errors:
        lines += ["", "First errors: " + "; ".join(f"`{e}`" for e in errors[:5])]
    args.report.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.report}")


if __name__ == "__main__":
    raise SystemExit(main())
