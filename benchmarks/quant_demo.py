"""The quantization demo: SmolLM2-135M-Instruct in NF4 + double quantization answers a question.

.venv/bin/python benchmarks/quant_demo.py [--prompt "..."] [--max-new-tokens 24] [--quant-type nf4]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from slimtune.models import load_model
from slimtune.quant import QUANT_TYPES, QuantConfig, quantize_model, storage_report


def run_demo(prompt: str, max_new_tokens: int, quant_type: str, double_quant: bool) -> str:
    model, tokenizer = load_model()
    float_model = copy.deepcopy(model)
    start = time.perf_counter()
    quantize_model(model, QuantConfig(quant_type, 64, double_quant))
    seconds = time.perf_counter() - start
    report = storage_report(model)
    lines = [f"quantized {len(report.layers)} layers in {seconds:.1f} s", report.format()]

    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    for name, network in (("float32", float_model), (f"{quant_type} (4-bit)", model)):
        with torch.no_grad():
            out = network.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        lines.append(f"{name} greedy answer: {answer!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--quant-type", default="nf4", choices=QUANT_TYPES)
    parser.add_argument("--no-double-quant", action="store_true")
    args = parser.parse_args(argv)
    print(f"prompt: {args.prompt!r}")
    print(run_demo(args.prompt, args.max_new_tokens, args.quant_type, not args.no_double_quant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
