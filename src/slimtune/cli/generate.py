"""`slimtune generate`: continue a prompt with a model (+ adapter), streaming the tokens."""

from __future__ import annotations

import argparse
import json

from slimtune.cli._inference import (
    add_device_argument,
    add_inference_arguments,
    compute_dtype,
    device,
)
from slimtune.errors import SlimtuneError

HELP = "generate text from a prompt (chat template for chat models), streamed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt (a user message for chat models)")
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="a system message (chat models)")
    parser.add_argument("--raw", action="store_true", help="no chat template")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object: text, tokens, seconds, tokens/s"
    )
    add_inference_arguments(parser)
    add_device_argument(parser)

    parser.add_argument(
        "--chat-template",
        default=None,
        help="chatml, llama3, gemma or a Jinja file (default: the adapter's, else the model's)",
    )


def run(args: argparse.Namespace) -> int:
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SlimtuneError("--temperature must be >= 0 and --top-p in (0, 1]")
    from slimtune.infer import generate_result
    from slimtune.train.generation import load_for_inference

    dtype, where = compute_dtype(args), device(args)
    model, tokenizer = load_for_inference(
        args.model, args.adapter, quant=args.quant, compute_dtype=dtype, device=where
    )
    from slimtune.models.chat_templates import set_chat_template

    set_chat_template(tokenizer, args.chat_template)
    result = generate_result(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stream=not args.json,
        chat=False if args.raw else None,
        system=args.system,
        four_bit=args.four_bit,
        compute_dtype=dtype,
    )
    if args.json:
        facts = {"compute_dtype": str(dtype).removeprefix("torch."), "device": where.type}
        print(json.dumps(result.to_dict() | facts))
    return 0
