"""How much of a fine-tune's accuracy gain survives merging and NF4 re-quantization.

Exact-match accuracy on a test set (default: the bundled demo test set) of
- the base model, and the base held in NF4 (what QLoRA trains on),
- base + adapter, unmerged (the fine-tune itself),
- the merged fp32 export, and the merged export re-quantized to NF4 (`--quantize nf4`).
The gain of an export is (its accuracy - base) / (fine-tune - base): 100% means nothing was lost.

    python -m slimtune.export.survival --adapter DIR [--model M] [--qlora] [--limit N]

`Survival` and `gain_kept` are the library side: every `slimtune export` given eval rows
reports the share of the gain its output keeps, and warns below `WARN_BELOW`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune import infer
from slimtune.data import demo_data_path, read_rows, split_prompt_answer
from slimtune.export.merge import merge_to_folder
from slimtune.lora import load_adapter
from slimtune.models import load_model
from slimtune.quant import QuantConfig

WARN_BELOW = 0.9  # an export that loses more than 10% of the fine-tune's gain is flagged


def gain_kept(base: float, tuned: float, exported: float) -> float:
    """(exported - base) / (tuned - base); NaN when the fine-tune gained nothing."""
    gain = tuned - base
    return (exported - base) / gain if gain > 0 else float("nan")


@dataclass
class Survival:
    """Exact-match accuracies of the base, the fine-tune and one export on the same rows."""

    base: float
    tuned: float
    exported: float
    n: int
    what: str = "export"

    @property
    def kept(self) -> float:
        return gain_kept(self.base, self.tuned, self.exported)

    @property
    def lost_too_much(self) -> bool:
        return not math.isnan(self.kept) and self.kept < WARN_BELOW

    def __str__(self) -> str:
        scores = (f"base {self.base:.1%}, fine-tune {self.tuned:.1%}, {self.what} "
                  f"{self.exported:.1%} exact match on {self.n} rows")  # fmt: skip
        if math.isnan(self.kept):
            return f"fine-tune gain kept: n/a, the fine-tune gained nothing ({scores})"
        text = f"fine-tune gain kept by the {self.what}: {self.kept:.1%} ({scores})"
        if self.lost_too_much:
            text += f"\nWARNING: the {self.what} lost {1 - self.kept:.1%} of the fine-tune's gain"
        return text


def exact_match(model, tokenizer, rows: list[dict]) -> float | None:
    """The share of `rows` (data rows) whose greedy answer is exactly the row's answer."""
    pairs = [split_prompt_answer(row, tokenizer) for row in rows]
    return infer.exact_match(model, tokenizer, pairs)


def measure(
    model: str | None,
    adapter: str | Path,
    rows: list[dict],
    *,
    qlora: bool = False,
    work_dir: Path | None = None,
) -> dict:
    """Accuracies of the variants above and the share of the gain each export keeps."""
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="slimtune-survival-"))
    scores = {}
    network, tokenizer = load_model(model)
    scores["base fp32"] = exact_match(network, tokenizer, rows)
    if not qlora:
        load_adapter(network, adapter)
        scores["base + adapter"] = exact_match(network, tokenizer, rows)
    del network
    network, _ = load_model(model, quant=QuantConfig())
    scores["base nf4"] = exact_match(network, tokenizer, rows)
    if qlora:
        load_adapter(network, adapter)
        scores["base + adapter"] = exact_match(network, tokenizer, rows)
    del network
    for name, quantize in [("merged fp32", None), ("merged, re-quantized nf4", "nf4")]:
        folder = work_dir / name.replace(" ", "_").replace(",", "")
        report = merge_to_folder(model, adapter, folder, quantize=quantize, qlora=qlora)
        network, _ = load_model(folder)
        scores[name] = exact_match(network, tokenizer, rows)
        if report.requant_rel_error is not None:
            scores["re-quantization relative weight error"] = report.requant_rel_error
        del network
    kept = {
        name: gain_kept(scores["base fp32"], scores["base + adapter"], scores[name])
        for name in ("merged fp32", "merged, re-quantized nf4")
    }
    return {"accuracy": scores, "gain_kept": kept, "n": len(rows), "qlora": qlora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--test", default=None, help="test rows (default: the demo test set)")
    parser.add_argument("--qlora", action="store_true", help="the adapter was trained on NF4")
    parser.add_argument("--limit", type=int, default=None, help="score the first N rows only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = read_rows(args.test or demo_data_path("test"))[: args.limit]
    result = measure(args.model, args.adapter, rows, qlora=args.qlora)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
