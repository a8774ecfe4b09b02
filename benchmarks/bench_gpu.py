#!/usr/bin/env python3
"""On a CUDA GPU: slimtune vs bitsandbytes (and transformers + peft + bitsandbytes), side by side.

    python benchmarks/bench_gpu.py [--steps 10] [--batch 4] [--seq 256] [--out FILE]

- dequantize: NF4 + double quant, 4096 x 4096, to bfloat16 and float32 (ms, median).
- Linear4bit forward + backward (input gradient), 4096 tokens through 4096 x 4096, bf16 compute.
- One QLoRA training step of a SmolLM2-135M-shaped LLaMA with random weights (the GGUF model
  does not travel to a GPU machine without a network), batch x seq tokens, r=16 alpha=32 on all
  7 linear kinds, AdamW: s/step, tokens/s, peak GPU memory, for float32 and bfloat16 compute.
  The peer loads the same weights from a safetensors folder with BitsAndBytesConfig and wraps
  them with peft, as ../shared/peer/peer_bench.py does on the CPU.

Every contestant runs in this one process, in turn, timed with CUDA events after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile

import torch

from slimtune.hardware import machine_record

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cuda_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_dequantize() -> list[dict]:
    import bitsandbytes.functional as bnbf

    from slimtune.quant import dequantize_4bit, quantize_4bit

    w = torch.randn(4096, 4096, device="cuda") * 0.02
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    ref_packed, ref_state = bnbf.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        ours = cuda_ms(lambda d=dtype: dequantize_4bit(packed, state, d))
        ref_state.dtype = dtype
        theirs = cuda_ms(lambda: bnbf.dequantize_4bit(ref_packed, ref_state))
        rows.append(dict(what=f"dequantize 4096x4096 -> {dtype}", slimtune_ms=ours, bnb_ms=theirs))
    return rows


def bench_linear() -> list[dict]:
    import bitsandbytes as bnb

    from slimtune.quant import Linear4bit, QuantConfig

    dense = torch.nn.Linear(4096, 4096, bias=False)
    config = QuantConfig(compute_dtype=torch.bfloat16)
    ours = Linear4bit.from_linear(dense, config).cuda()
    theirs = bnb.nn.Linear4bit(
        4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
    )
    theirs.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    theirs = theirs.cuda()
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def step(layer):
        return lambda: layer(x).backward(grad)

    return [
        dict(
            what="Linear4bit fwd+bwd 4096 tokens, 4096x4096, bf16",
            slimtune_ms=cuda_ms(step(ours)),
            bnb_ms=cuda_ms(step(theirs)),
        )
    ]


def smollm2_shaped(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def slimtune_step(model_fp, dtype):
    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.models.lean_mlp import use_lean_mlp
    from slimtune.quant import QuantConfig, quantize_model
    from slimtune.train.forward import summed_loss

    model = quantize_model(copy.deepcopy(model_fp).cuda(), QuantConfig(compute_dtype=dtype))
    inject_adapter(model, LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=TARGETS))
    model.config.use_cache = False
    model.train()
    use_lean_mlp(model)

    def loss_of(x):
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        return summed_loss(model, batch) / x[:, 1:].numel()

    return model, loss_of


def peer_step(folder, dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=quant, device_map="cuda"
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.train()
    return model, lambda x: model(input_ids=x, labels=x).loss


def bench_training(args) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model_fp = smollm2_shaped(dtype)
        with tempfile.TemporaryDirectory() as folder:
            model_fp.save_pretrained(folder)
            for stack, build in (("slimtune", slimtune_step), ("peer", peer_step)):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                model, loss_of = build(model_fp if stack == "slimtune" else folder, dtype)
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=2e-4)
                x = torch.randint(0, 49152, (args.batch, args.seq), device="cuda")

                def step(loss_of=loss_of, optimizer=optimizer, x=x):
                    loss_of(x).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                ms = cuda_ms(step, repeats=args.steps, warmup=2)
                rows.append(
                    dict(
                        what=f"QLoRA step {args.batch}x{args.seq}, {dtype} compute",
                        stack=stack,
                        s_per_step=round(ms / 1000, 4),
                        tokens_per_s=round(args.batch * args.seq / (ms / 1000)),
                        peak_gpu_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
                del model, optimizer, params
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    results = dict(device=torch.cuda.get_device_name(), machine=machine_record(), rows=[])
    for part in (bench_dequantize, bench_linear):
        for row in part():
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
    results["rows"] += bench_training(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
