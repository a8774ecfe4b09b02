"""Measured peak RSS of LoRA / QLoRA training steps against `slimtune estimate`'s prediction.

Each case runs in a fresh process: build the model (random weights with the real shapes),
quantize it (qlora), inject LoRA on every linear layer of the blocks, then reset the kernel's
peak-RSS counter (`/proc/self/clear_refs`) and run training steps exactly as `slimtune train`
does (slimtune.train.forward.summed_loss, the chunked loss, clip-norm, the optimizer, set-to-none
zero_grad). The peak over those steps is what the planner predicts (model loading transients are
the loader's business and are not counted).

    .venv/bin/python benchmarks/bench_memory.py            # all cases, a markdown table
    .venv/bin/python benchmarks/bench_memory.py --cases smollm2 --json
    .venv/bin/python benchmarks/bench_memory.py --validate --json   # out of sample, see below
    .venv/bin/python benchmarks/bench_memory.py --repredict reports/memory_validation.json

The planner's constants were fitted on the default cases (rank 16, AdamW, each case's batch and
length). `--validate` runs a disjoint set (other ranks, batch sizes, lengths and optimizers,
checkpointing on and off) and reports the planner's error on it: the band `slimtune estimate`
prints. `--repredict` sets the current planner against the peaks a `--json` report recorded
(no training runs): the band again after a change to the planner's arithmetic.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

CASES = {
    # name: (architecture for the planner, overrides of LlamaConfig, batch, length)
    "tiny": ("tiny", dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), 2, 64),
    "small": ("small", dict(vocab_size=4096, hidden_size=256, intermediate_size=688,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4), 4, 512),
    "smollm2": ("smollm2-135m", {}, 1, 512),
}  # fmt: skip

SETTINGS = [(m, c) for m in ("lora", "qlora") for c in (False, True)]

# Out of sample: none of these (rank, optimizer, batch, length) was used to fit the planner.
# (case, method, checkpointing, rank, optimizer, batch, length)
VALIDATION = [
    ("small", "qlora", False, 8, "adamw8bit", 2, 1024),
    ("small", "lora", True, 64, "paged_adamw", 8, 256),
    ("small", "qlora", True, 32, "paged_adamw8bit", 8, 128),
    ("small", "lora", False, 4, "adamw", 1, 2048),
    ("smollm2", "qlora", False, 64, "adamw8bit", 2, 256),
    ("smollm2", "qlora", True, 8, "adamw", 4, 512),
    ("smollm2", "lora", False, 32, "paged_adamw8bit", 1, 1024),
    ("smollm2", "lora", True, 16, "adamw8bit", 2, 768),
]


def _llama_config(case: str):
    from transformers import LlamaConfig

    from slimtune.memory.architecture import builtin_architecture

    _, overrides, _, _ = CASES[case]
    if case == "smollm2":
        arch = builtin_architecture("smollm2-135m")
        overrides = dict(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         intermediate_size=arch.intermediate_size,
                         num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                         num_key_value_heads=arch.num_kv_heads, tie_word_embeddings=True)  # fmt: skip
    overrides.setdefault("tie_word_embeddings", False)
    return LlamaConfig(max_position_embeddings=2048, **overrides)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so it is not counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def measure(
    case: str, method: str, checkpointing: bool, rank: int, optimizer: str, steps: int,
    batch: int | None = None, length: int | None = None,
):  # fmt: skip
    """Run one case in this process; return the measured figures."""
    import torch
    from transformers import LlamaForCausalLM

    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.models.lean_mlp import use_lean_mlp
    from slimtune.optim import build_optimizer
    from slimtune.train.forward import summed_loss

    torch.set_num_threads(2)
    _, _, case_batch, case_length = CASES[case]
    batch, length = batch or case_batch, length or case_length
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(case))
    model.config.use_cache = False
    if method == "qlora":
        from slimtune.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(quant_type="nf4", double_quant=True))
    inject_adapter(model, LoraConfig(r=rank, alpha=16, dropout=0.05, target_modules="all-linear"))
    use_lean_mlp(model, native=True)  # as slimtune.train.train does
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr=2e-4, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    data = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    _reset_peak()
    start_rss = _status_kib("VmRSS") * 1024
    began = time.perf_counter()
    for _ in range(steps):
        loss = summed_loss(model, data) / (batch * (length - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "case": case, "method": method, "gradient_checkpointing": checkpointing,
        "rank": rank, "optimizer": optimizer, "batch_size": batch, "max_length": length,
        "steps": steps, "seconds_per_step": (time.perf_counter() - began) / steps,
        "rss_after_setup_bytes": start_rss, "peak_rss_bytes": _status_kib("VmHWM") * 1024,
    }  # fmt: skip


def predict(
    case: str, method: str, checkpointing: bool, rank: int, optimizer: str,
    batch: int | None = None, length: int | None = None,
) -> dict:  # fmt: skip
    from slimtune.memory import estimate
    from slimtune.memory.architecture import architecture_from_config
    from slimtune.train import TrainConfig

    _, _, case_batch, case_length = CASES[case]
    batch, length = batch or case_batch, length or case_length
    arch = architecture_from_config(_llama_config(case).to_dict(), name=case)
    # measure() runs the step in float32, as `slimtune train --compute-dtype float32` does
    settings = TrainConfig(method=method, rank=rank, batch_size=batch, max_length=length,
                           gradient_checkpointing=checkpointing, optimizer=optimizer,
                           compute_dtype="float32")  # fmt: skip
    return estimate(arch, settings).to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--methods", nargs="*", default=["lora", "qlora"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--batch", type=int, help="override the case's batch size")
    parser.add_argument("--length", type=int, help="override the case's sequence length")
    parser.add_argument("--validate", action="store_true", help="the out-of-sample set")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repredict", metavar="REPORT.json",
                        help="the current planner against a --json report's measured peaks")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: case,method,ckpt
    args = parser.parse_args()
    if args.repredict:
        return repredict(args.repredict)
    if args.one:  # one case in this process (a fresh one: the caller's job), with the prediction
        case, method, ckpt = args.one.split(",")
        shape = dict(batch=args.batch, length=args.length)
        row = measure(case, method, ckpt == "1", args.rank, args.optimizer, args.steps, **shape)
        row["predicted"] = predict(case, method, ckpt == "1", args.rank, args.optimizer, **shape)
        row["error"] = row["predicted"]["total_bytes"] / row["peak_rss_bytes"] - 1
        print(json.dumps(row))
        return 0
    from slimtune.hardware import machine_record

    if args.validate:
        runs = [(c, m, k, r, o, ["--batch", str(b), "--length", str(n)])
                for c, m, k, r, o, b, n in VALIDATION if c in args.cases]  # fmt: skip
    else:
        runs = [(case, method, ckpt, args.rank, args.optimizer, [])
                for case in args.cases for method, ckpt in SETTINGS
                if method in args.methods and args.checkpointing != ("off" if ckpt else "on")]  # fmt: skip
    rows = [row for run in runs if (row := _run_one(*run, steps=args.steps, json_out=args.json))]
    if args.json:
        errors = [row["error"] for row in rows]
        summary = {"min_error": min(errors), "max_error": max(errors)} if errors else {}
        print(json.dumps({"machine": machine_record(), "rows": rows, **summary}, indent=1))
    return 0


def repredict(path: str) -> int:
    """Each recorded row's error under the current planner, then the band over them."""
    errors = []
    with open(path) as report:
        rows = json.load(report)["rows"]
    for row in rows:
        shape = dict(batch=row["batch_size"], length=row["max_length"])
        settings = (row["case"], row["method"], row["gradient_checkpointing"], row["rank"],
                    row["optimizer"])  # fmt: skip
        predicted = predict(*settings, **shape)["total_bytes"]
        errors.append(predicted / row["peak_rss_bytes"] - 1)
        print(*settings, f"{shape['batch']}x{shape['length']}",
              f"measured {row['peak_rss_bytes'] / 2**20:.0f} MiB, predicted "
              f"{predicted / 2**20:.0f} MiB, error {errors[-1]:+.1%}")  # fmt: skip
    print(f"band: {min(errors):+.1%} to {max(errors):+.1%}")
    return 0


def _run_one(case, method, ckpt, rank, optimizer, extra, *, steps, json_out) -> dict | None:
    """One case in a fresh process, under the malloc settings `slimtune train` runs with."""
    from slimtune.runtime.heap import lean_heap_environment

    cmd = [sys.executable, __file__, "--one", f"{case},{method},{int(ckpt)}", "--rank", str(rank),
           "--optimizer", optimizer, "--steps", str(steps), *extra]  # fmt: skip
    env = lean_heap_environment(dict(os.environ)) or dict(os.environ)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{case} {method} ckpt={ckpt}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if not json_out:
        print(_line(row), flush=True)
    return row


def _line(row: dict) -> str:
    mib = 2**20
    p = row["predicted"]
    return (
        f"| {row['case']} | {row['method']} | {'on' if row['gradient_checkpointing'] else 'off'} "
        f"| {row['batch_size']}x{row['max_length']} | {row['peak_rss_bytes'] / mib:.0f} "
        f"| {p['total_bytes'] / mib:.0f} | {row['error']:+.1%} "
        f"| {p['activations_bytes'] / mib:.0f} | {row['seconds_per_step']:.1f} |"
    )


if __name__ == "__main__":
    sys.exit(main())
