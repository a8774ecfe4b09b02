"""A merged fine-tune back in NF4: plain rounding vs error-compensated (GPTQ) rounding, side by
side on the same rows.

    .venv/bin/python benchmarks/bench_gptq_survival.py --adapter slimtune-demo --qlora \\
        [--train ROWS] [--test ROWS] [--calibration-rows 256] [--limit 40] [--threads 2]

Exact match of greedy answers for the base, the fine-tune (base + adapter as trained), and the
merged model written as an NF4 folder (bitsandbytes' layout) by plain rounding and by GPTQ on
Hessians from the first training rows; prints JSON with the machine record.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    from slimtune.data import demo_data_path, read_rows
    from slimtune.export import gain_kept, merge_to_folder
    from slimtune.export.survival import exact_match
    from slimtune.hardware import machine_record
    from slimtune.lora import load_adapter
    from slimtune.models import load_model
    from slimtune.quant import QuantConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--qlora", action="store_true", help="the adapter was trained on NF4")
    parser.add_argument("--train", default=None, help="calibration rows (default: demo train)")
    parser.add_argument("--test", default=None, help="rows to score (default: demo test set)")
    parser.add_argument("--calibration-rows", type=int, default=256)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = read_rows(args.test or demo_data_path("test"))[: args.limit]
    calibration = read_rows(args.train or demo_data_path("train"))[: args.calibration_rows]
    work = Path(tempfile.mkdtemp(prefix="slimtune-gptq-"))
    network, tokenizer = load_model(args.model, quant=QuantConfig() if args.qlora else None)
    scores = {"base": exact_match(network, tokenizer, rows)}
    load_adapter(network, args.adapter)
    scores["fine-tune (base + adapter)"] = exact_match(network, tokenizer, rows)
    del network
    seconds, errors = {}, {}
    for name, rows_for_gptq in [("merged NF4, plain rounding", None),
                                ("merged NF4, GPTQ rounding", calibration)]:  # fmt: skip
        start = time.perf_counter()
        folder = work / name.split(", ")[1].replace(" ", "_")
        report = merge_to_folder(args.model, args.adapter, folder, quantize="nf4",
                                 qlora=args.qlora, calibration=rows_for_gptq)  # fmt: skip
        seconds[name] = round(time.perf_counter() - start)
        errors[name] = report.requant_rel_error
        merged, _ = load_model(folder)
        scores[name] = exact_match(merged, tokenizer, rows)
        del merged
    base, tuned = scores["base"], scores["fine-tune (base + adapter)"]
    kept = {name: gain_kept(base, tuned, value) for name, value in scores.items()}
    print(json.dumps({"machine": machine_record(), "adapter": args.adapter, "qlora": args.qlora,
                      "rows": len(rows), "calibration_rows": len(calibration),
                      "accuracy": scores, "gain_kept": kept, "relative_weight_error": errors,
                      "export_seconds": seconds}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
