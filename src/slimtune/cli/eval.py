"""`slimtune eval`: loss, perplexity and exact-match accuracy of a model (+ adapter) on a file."""

from __future__ import annotations

import argparse
import json

from slimtune.cli._inference import (
    add_device_argument,
    add_inference_arguments,
    compute_dtype,
    device,
)

HELP = "loss, perplexity and exact-match accuracy on a data file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format)")
    parser.add_argument("--data", required=True, help="JSONL, JSON, CSV or Parquet file")
    parser.add_argument("--max-length", type=int, default=512, help="truncate rows to this")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length")
    parser.add_argument("--max-rows", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_inference_arguments(parser)
    add_device_argument(parser)

    parser.add_argument(
        "--chat-template",
        default=None,
        help="chatml, llama3, gemma or a Jinja file (default: the adapter's, else the model's)",
    )


def run(args: argparse.Namespace) -> int:
    from slimtune.data import load_dataset, pad_token_id, split_prompt_answer
    from slimtune.train.evaluate import evaluate
    from slimtune.train.generation import load_for_inference

    dtype = compute_dtype(args)
    model, tokenizer = load_for_inference(
        args.model, args.adapter, quant=args.quant, compute_dtype=dtype, device=device(args)
    )
    from slimtune.models.chat_templates import set_chat_template

    set_chat_template(tokenizer, args.chat_template)
    splits = load_dataset(args.data, tokenizer, max_length=args.max_length)
    examples, rows = splits.train, splits.train_rows
    if args.max_rows:
        examples, rows = examples[: args.max_rows], rows[: args.max_rows]
    pairs = []
    if splits.fmt != "text":
        pairs = [split_prompt_answer(row, tokenizer, splits.fmt) for row in rows]
    result = evaluate(
        model,
        tokenizer,
        examples=examples,
        pairs=pairs,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=pad_token_id(tokenizer),
        four_bit=args.four_bit,
        compute_dtype=dtype,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"rows: {result.n}")
        print(f"loss: {result.loss:.4f}")
        print(f"perplexity: {result.perplexity:.3f}")
        if result.exact_match is not None:
            print(f"exact match: {100 * result.exact_match:.1f}% of {result.n_generated}")
    return 0
