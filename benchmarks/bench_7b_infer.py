"""A LLaMA-2-7B-shaped model with a LoRA adapter generates and evaluates from 4 bits: peak RSS.

The model is built straight into NF4 + double quantization with random weights
(`bench_7b.build_4bit`: one float weight at a time, the float model never exists), a rank-16
LoRA adapter goes on every linear layer of the blocks (as after `slimtune train --method qlora`),
then, with the 4-bit layers computing from their packed codes:
- `decode`: a prompt of --prompt tokens and --new-tokens greedy tokens (KV cache);
- `evaluate`: the loss of one row of --eval-length tokens.
Peak RSS (VmHWM) is read after the build and again, after a reset, for generation + evaluation.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_7b_infer.py [--layers 32] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_7b import SHAPE, build_4bit, reset_peak, status_mib  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--eval-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/reports/infer_7b.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slimtune.hardware import machine_record
    from slimtune.infer import decode
    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.quant import storage_report
    from slimtune.train.evaluate import evaluate

    began = time.perf_counter()
    model = build_4bit(args.layers, torch.float32)
    torch.manual_seed(0)
    inject_adapter(model, LoraConfig(r=16, alpha=16, target_modules="all-linear"))
    model.eval()
    build_s = time.perf_counter() - began
    build_peak = status_mib("VmHWM")
    model_mib = storage_report(model).total_bytes / 2**20
    reset_peak()

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, args.prompt), generator=generator)
    out = decode(model, ids, max_new_tokens=args.new_tokens)
    steps = len(out.tokens[0]) - 1
    row = torch.randint(0, SHAPE["vocab_size"], (args.eval_length,), generator=generator).tolist()
    start = time.perf_counter()
    result = evaluate(model, None, examples=[{"input_ids": row, "labels": row}], pad_token_id=0)
    eval_s = time.perf_counter() - start
    run_peak = status_mib("VmHWM")
    record = {
        "machine": machine_record(),
        "shared_machine": True,
        "layers": args.layers,
        "shape": SHAPE,
        "model_mib": model_mib,
        "build_s": build_s,
        "build_peak_rss_mib": build_peak,
        "prompt_tokens": args.prompt,
        "new_tokens": len(out.tokens[0]),
        "prefill_s": out.prefill_seconds,
        "decode_s_per_token": (out.seconds - out.prefill_seconds) / max(steps, 1),
        "eval_tokens": args.eval_length,
        "eval_s": eval_s,
        "eval_loss": result.loss,
        "generate_and_eval_peak_rss_mib": run_peak,
        "peak_rss_gib": max(build_peak, run_peak) / 1024,
    }
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine", "shape")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
