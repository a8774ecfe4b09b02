"""Peak RSS and time of a DPO step against a supervised step at the same batch (QLoRA, SmolLM2).

Each mode runs in a fresh process: load SmolLM2-135M-Instruct in 4 bits (NF4 + double
quantization), inject LoRA on every linear layer of the blocks, then reset the kernel's
peak-RSS counter and run a few steps as `slimtune train` does:

    sft       summed_loss over B rows (prompt + chosen answer), backward, optimizer step
    dpo       preference_backward over B pairs, one side's activations at a time (the default)
    dpo-joint preference_backward over B pairs as one batch of 2B rows (as TRL does)
    trl-dpo   TRL's DPOTrainer.compute_loss on the same pairs (transformers + peft +
              bitsandbytes NF4 with double quantization, float32 compute, the same LoRA), the
              reference from the base with the adapter off, as slimtune's; backward, AdamW step

The reference log-probs are cached before the counter is reset (they are computed once per
pair for the whole run). Rows are random tokens of the given lengths.

    .venv/bin/python benchmarks/bench_preference.py --batch 4 --prompt 128 --answer 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_memory import _reset_peak, _status_kib  # noqa: E402

MODES = ("sft", "dpo", "dpo-joint", "trl-dpo")


def measure(mode: str, batch: int, prompt: int, answer: int, steps: int, rank: int) -> dict:
    if mode == "trl-dpo":
        return measure_trl(batch, prompt, answer, steps, rank)
    import torch

    from slimtune.dist import DistInfo
    from slimtune.models.lean_mlp import use_lean_mlp
    from slimtune.optim import build_optimizer
    from slimtune.train.config import TrainConfig
    from slimtune.train.forward import summed_loss
    from slimtune.train.preference import PreferenceObjective, cache_reference, preference_backward
    from slimtune.train.setup import build_model

    torch.manual_seed(0)
    model, _ = build_model(TrainConfig(method="qlora", rank=rank, alpha=16, dropout=0.05))
    use_lean_mlp(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("adamw", params, lr=2e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    pairs = []
    for _ in range(batch):
        p, c, r = tokens(prompt), tokens(answer), tokens(answer)
        pairs.append(
            dict(
                chosen_input_ids=p + c,
                chosen_labels=[-100] * prompt + c,
                rejected_input_ids=p + r,
                rejected_labels=[-100] * prompt + r,
            )
        )
    objective = PreferenceObjective("dpo", beta=0.1)
    if mode != "sft":
        cache_reference(model, pairs, 0)
    ids = torch.tensor([p["chosen_input_ids"] for p in pairs])
    sft = {
        "input_ids": ids,
        "labels": torch.tensor([p["chosen_labels"] for p in pairs]),
        "attention_mask": torch.ones_like(ids),
    }
    _reset_peak()
    start_rss = _status_kib("VmRSS") * 1024
    began = time.perf_counter()
    for _ in range(steps):
        if mode == "sft":
            (summed_loss(model, sft) / (batch * answer)).backward()
        else:
            preference_backward(
                model, [pairs], objective, DistInfo(), 0, one_side_at_a_time=mode == "dpo"
            )
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _record(mode, batch, prompt, answer, rank, steps, began, start_rss)


def measure_trl(batch: int, prompt: int, answer: int, steps: int, rank: int) -> dict:
    import tempfile

    import torch
    from bench_train import TARGETS, peer_base
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    torch.manual_seed(0)
    model, tokenizer = peer_base("qlora", ckpt=False, bf16=False)
    lora = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, beta=0.1, report_to=[], use_cpu=True,
                           per_device_train_batch_size=batch)  # fmt: skip
        rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}] * batch
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)  # fmt: skip
    model = trainer.model
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    pairs = [dict(prompt_ids=tokens(prompt), chosen_ids=tokens(answer), rejected_ids=tokens(answer))
             for _ in range(batch)]  # fmt: skip
    inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id or 0)(pairs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    _reset_peak()
    start_rss = _status_kib("VmRSS") * 1024
    began = time.perf_counter()
    for _ in range(steps):
        trainer.compute_loss(model, inputs).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _record("trl-dpo", batch, prompt, answer, rank, steps, began, start_rss)


def _record(mode, batch, prompt, answer, rank, steps, began: float, start_rss: int) -> dict:
    import torch

    return dict(
        mode=mode,
        batch=batch,
        prompt_tokens=prompt,
        answer_tokens=answer,
        rank=rank,
        steps=steps,
        threads=torch.get_num_threads(),
        seconds_per_step=(time.perf_counter() - began) / steps,
        rss_after_setup_bytes=start_rss,
        peak_rss_bytes=_status_kib("VmHWM") * 1024,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--answer", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = measure(args.one, args.batch, args.prompt, args.answer, args.steps, args.rank)
        print(json.dumps(row))
        return 0
    from slimtune.hardware import machine_record
    from slimtune.runtime.heap import lean_heap_environment

    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--batch", str(args.batch),
               "--prompt", str(args.prompt), "--answer", str(args.answer),
               "--steps", str(args.steps), "--rank", str(args.rank)]  # fmt: skip
        env = lean_heap_environment(dict(os.environ)) or dict(os.environ)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    sft = next((r for r in rows if r["mode"] == "sft"), None)
    mib = 2**20
    print(json.dumps({"machine": machine_record()}, default=str))
    print("| mode | batch | tokens/row | peak RSS MiB | x SFT | s/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["peak_rss_bytes"] / sft["peak_rss_bytes"] if sft else float("nan")
        print(
            f"| {r['mode']} | {r['batch']} | {r['prompt_tokens']}+{r['answer_tokens']} "
            f"| {r['peak_rss_bytes'] / mib:.0f} | {ratio:.2f} | {r['seconds_per_step']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
