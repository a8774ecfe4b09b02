"""Is the bundled demo data set a good demo? Base exact match, then a short LoRA fine-tune.

    .venv/bin/python benchmarks/data_demo_feasibility.py                 # base model only
    .venv/bin/python benchmarks/data_demo_feasibility.py --steps 60      # + LoRA with PEFT

The fine-tune uses PEFT (r=16, all linear layers of the blocks, fp32) as an independent
reference for "a short LoRA run learns this", and slimtune.data for the batches. Exact match
is greedy generation through the chat template, the stripped output against the reference.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from slimtune.data import (
    Collator,
    demo_data_path,
    load_dataset,
    pad_token_id,
    read_rows,
    split_prompt_answer,
)


def exact_match(model, tokenizer, rows: list[dict], batch_size: int = 40) -> tuple[float, list]:
    pairs = [split_prompt_answer(row, tokenizer) for row in rows]
    tokenizer.padding_side = "left"
    outputs = []
    model.eval()
    for i in range(0, len(pairs), batch_size):
        prompts = [p for p, _ in pairs[i : i + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=16, do_sample=False, pad_token_id=pad_token_id(tokenizer)
            )
        outputs += tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
    tokenizer.padding_side = "right"
    hits = [o.strip() == a.strip() for o, (_, a) in zip(outputs, pairs, strict=True)]
    return sum(hits) / len(hits), list(zip(outputs, [a for _, a in pairs], strict=True))


def finetune(model, tokenizer, steps: int, lr: float, batch_size: int, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, config)
    data = load_dataset(demo_data_path("train"), tokenizer, max_length=64).train
    collate = Collator(pad_token_id(tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch = collate([data[order.pop()] for _ in range(batch_size)])
        tokens += int(batch["attention_mask"].sum())
        for group in optimizer.param_groups:  # linear decay to 10% of lr
            group["lr"] = lr * (1 - 0.9 * (step - 1) / steps)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps:
            elapsed, used = time.perf_counter() - start, time.process_time() - cpu
            print(f"step {step:4d}  loss {loss.item():.4f}  {elapsed:6.1f}s  cpu {used:6.1f}s")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"model": model, "seconds": seconds, "cpu": cpu, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="LoRA steps (0: base model only)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2 via slimtune)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        from slimtune.models import load_model

        model, tokenizer = load_model()
    print(f"loaded in {time.perf_counter() - t:.1f}s")
    test = read_rows(demo_data_path("test"))

    t, cpu = time.perf_counter(), time.process_time()
    base, samples = exact_match(model, tokenizer, test)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(f"base exact match {base:.3f} on {len(test)} test rows ({wall:.0f}s, cpu {cpu:.0f}s)")
    for output, answer in samples[:5]:
        print(f"  {output!r}  (reference {answer!r})")
    if args.steps:
        result = finetune(model, tokenizer, args.steps, args.lr, args.batch_size, args.seed)
        tuned, samples = exact_match(result["model"], tokenizer, test)
        print(
            f"LoRA {args.steps} steps x {args.batch_size} rows (lr {args.lr}): "
            f"{result['seconds']:.0f}s (cpu {result['cpu']:.0f}s), {result['tokens']} tokens; "
            f"exact match {base:.3f} -> {tuned:.3f}"
        )
        wrong = [(o, a) for o, a in samples if o.strip() != a]
        for output, answer in wrong[:8]:
            print(f"  wrong: {output!r}  (reference {answer!r})")


if __name__ == "__main__":
    main()
