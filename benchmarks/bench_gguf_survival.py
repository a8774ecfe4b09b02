"""How much of a fine-tune's gain each GGUF export type keeps, side by side on the same rows.

    .venv/bin/python benchmarks/bench_gguf_survival.py --adapter slimtune-demo [--qlora]
        [--test ROWS] [--limit 40] [--types f16,q8_0,q4_0,q4_k_m] [--threads 2]
        [--calibration-rows 256 [--train ROWS]] [--no-adapter-gguf]

Exact match of greedy answers (the demo's measure) for the base, the fine-tune (base + adapter
as trained), and every merged GGUF type read back by transformers' GGUF reader; the adapter
GGUF (f16) is scored as the float base plus the adapter's f16-rounded weights (unless
--no-adapter-gguf). With --calibration-rows, each 4-bit type asked for (q4_0, q4_k_m) is also
written with GPTQ rounding on Hessians from that many training rows, beside its plain rounding.
Prints JSON with the machine record.
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
    from slimtune.export import gain_kept, write_gguf
    from slimtune.export.gguf import GPTQ_QTYPES
    from slimtune.export.survival import exact_match
    from slimtune.export.to_gguf import (
        calibration_hessians,
        load_gguf_model,
        merged_model,
        source_gguf,
    )
    from slimtune.hardware import machine_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--qlora", action="store_true", help="the adapter was trained on NF4")
    parser.add_argument("--test", default=None, help="rows to score (default: demo test set)")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", default=None, help="calibration rows (default: demo train)")
    parser.add_argument("--calibration-rows", type=int, default=0,
                        help="also score the 4-bit types rounded by GPTQ on this many training "
                             "rows")  # fmt: skip
    parser.add_argument("--no-adapter-gguf", action="store_true",
                        help="score the merged exports only (saves three scorings)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = read_rows(args.test or demo_data_path("test"))[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="slimtune-gguf-survival-"))
    start = time.perf_counter()
    network, tokenizer, _, (base, tuned) = merged_model(
        args.model, args.adapter, qlora=args.qlora, eval_rows=rows
    )
    scores = {"base": base, "fine-tune (base + adapter)": tuned}
    write_seconds = {}
    for qtype in args.types.split(","):
        began = time.perf_counter()
        path = write_gguf(network, tokenizer, work / f"merged-{qtype}.gguf", qtype,
                          source_gguf=source_gguf(args.model))  # fmt: skip
        write_seconds[qtype] = round(time.perf_counter() - began, 1)
        scores[f"merged GGUF {qtype}"] = exact_match(load_gguf_model(path), tokenizer, rows)
        path.unlink()
    gptq_types = [qtype for qtype in args.types.split(",") if qtype in GPTQ_QTYPES]
    if args.calibration_rows and gptq_types:
        calibration = read_rows(args.train or demo_data_path("train"))[: args.calibration_rows]
        hessians = calibration_hessians(network, tokenizer, calibration)
        for qtype in gptq_types:
            began = time.perf_counter()
            path = write_gguf(network, tokenizer, work / f"merged-{qtype}-gptq.gguf", qtype,
                              source_gguf=source_gguf(args.model), hessians=hessians)  # fmt: skip
            write_seconds[f"{qtype}, GPTQ"] = round(time.perf_counter() - began, 1)
            name = f"merged GGUF {qtype}, GPTQ"
            scores[name] = exact_match(load_gguf_model(path), tokenizer, rows)
            path.unlink()
        del hessians
    del network
    kept = {name: gain_kept(base, tuned, value) for name, value in scores.items()}
    report = {"machine": machine_record(), "adapter": args.adapter, "qlora": args.qlora,
              "rows": len(rows), "accuracy": scores, "gain_kept": kept,
              "write_seconds": write_seconds}  # fmt: skip
    if not args.no_adapter_gguf:
        report["adapter_gguf"] = adapter_gguf_survival(args, rows, work)
    report["seconds"] = round(time.perf_counter() - start)
    print(json.dumps(report, indent=2))
    return 0


def adapter_gguf_survival(args, rows, work: Path) -> dict:
    from slimtune.export import export_adapter_gguf

    # llama.cpp applies an adapter GGUF to the float base GGUF it is given (never NF4): scored
    # against that base with the adapter, whatever the adapter was trained on.
    survival = export_adapter_gguf(args.model, args.adapter, work / "adapter", "f16",
                                   eval_rows=rows).survival  # fmt: skip
    return {
        "float base": survival.base,
        "float base + adapter": survival.tuned,
        "float base + adapter GGUF f16": survival.exported,
        "gain_kept": survival.kept,
    }


if __name__ == "__main__":
    raise SystemExit(main())
