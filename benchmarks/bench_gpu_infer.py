#!/usr/bin/env python3
"""On a CUDA GPU: generating from 4 bits, slimtune against transformers (+ bitsandbytes).

    python benchmarks/bench_gpu_infer.py [--new-tokens 128] [--streams 16] [--out FILE]

- memory bandwidth: a device-to-device copy of 1 GiB (bytes read + written per second);
- the 4-bit product of one and of 16 input rows (NF4 + double quant, bfloat16) at SmolLM2's and
  LLaMA-2-7B's shapes: slimtune's fused Triton product, bitsandbytes' `matmul_4bit` (its GEMV
  kernel for one row) and decode-then-matmul; microseconds and the codes' GB/s;
- decoding of a SmolLM2-135M-shaped LLaMA with random weights (the GGUF model does not travel to
  a GPU machine without a network), NF4 + double quant: one stream of --new-tokens greedy tokens
  after a 32-token prompt, and --streams streams of 32 new tokens, for slimtune's decode loop
  (bfloat16 and float32 compute), transformers + bitsandbytes NF4 (bfloat16 compute) and
  transformers in bfloat16. Every contestant makes exactly the tokens asked (no end token).
  The memory-bandwidth bound of one stream: the bandwidth over the bytes one token reads (the
  4-bit codes and absmax, the float32 output layer).

Every contestant runs in this one process, in turn, after a warm-up; times are medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from functools import partial

import torch

from slimtune.hardware import machine_record

SHAPES = {"SmolLM2 gate/up": (1536, 576), "7B attention": (4096, 4096), "7B gate/up": (11008, 4096)}


def cuda_ms(fn, repeats: int = 50, warmup: int = 5) -> float:
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


def bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() / (ms / 1000) / 1e9


def _decode_then_matmul(x, packed, state):
    from slimtune.quant import dequantize_4bit

    return x @ dequantize_4bit(packed, state, x.dtype).t()


def bench_products() -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from slimtune.quant import gpu_matmul, quantize_4bit

    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
        ref_packed, ref_state = bnbf.quantize_4bit(
            w.bfloat16(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        code_bytes = packed.numel() + state.absmax.numel()
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timed = {
                "slimtune_fused": partial(gpu_matmul.matmul, x, packed, state),
                "bnb_matmul_4bit": partial(bnb.matmul_4bit, x, ref_packed.t(), ref_state),
                "decode_then_matmul": partial(_decode_then_matmul, x, packed, state),
            }
            row = dict(what=f"4-bit product {name} {n}x{k}, {m} row(s), bf16")
            for label, fn in timed.items():
                ms = cuda_ms(fn)
                row[f"{label}_us"] = round(ms * 1000, 1)
                row[f"{label}_codes_gbs"] = round(code_bytes / (ms / 1000) / 1e9)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def smollm2_shaped():
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
    return LlamaForCausalLM(config)


def slimtune_generator(model_fp, dtype):
    from slimtune.infer.loop import decode
    from slimtune.quant import Linear4bit, QuantConfig, quantize_model

    # As `slimtune generate` holds it: 4-bit layers computing in `dtype`, the float layers
    # left (embeddings, norms, the output layer) in float32.
    config = QuantConfig(double_quant=True, compute_dtype=dtype)
    model = quantize_model(copy.deepcopy(model_fp), config).cuda().eval()

    def generate(ids, n):
        return decode(model, ids, max_new_tokens=n, compute_dtype=dtype).new_tokens

    codes = sum(
        b.numel() * b.element_size()
        for m in model.modules()
        if isinstance(m, Linear4bit)
        for b in m.buffers()
    )
    head = model.lm_head.weight
    return generate, codes + head.numel() * head.element_size()


def transformers_generator(folder, dtype, quantized):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = dict(dtype=dtype, device_map="cuda")
    if quantized:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(folder, **options).eval()

    def generate(ids, n):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    return generate, None


def timed_tokens(generate, ids, n, repeats=3) -> tuple[float, int]:
    """(median seconds, new tokens) of generate(ids, n)."""
    generate(ids, 8)  # warm-up: kernels compiled, caches allocated
    seconds, tokens = [], 0
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = generate(ids, n)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), tokens


def bench_decoding(args, bandwidth: float) -> list[dict]:
    model_fp = smollm2_shaped()
    vocab = model_fp.config.vocab_size
    one = torch.randint(3, vocab, (1, 32), device="cuda")
    many = torch.randint(3, vocab, (args.streams, 32), device="cuda")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model_fp.to(torch.bfloat16).save_pretrained(folder)
        model_fp.float()
        contestants = {
            "slimtune NF4, bf16 compute": lambda: slimtune_generator(model_fp, torch.bfloat16),
            "slimtune NF4, fp32 compute": lambda: slimtune_generator(model_fp, torch.float32),
            "transformers + bitsandbytes NF4, bf16": lambda: transformers_generator(
                folder, torch.bfloat16, quantized=True
            ),
            "transformers bf16": lambda: transformers_generator(
                folder, torch.bfloat16, quantized=False
            ),
        }
        for name, build in contestants.items():
            torch.cuda.empty_cache()
            generate, bytes_per_token = build()
            s1, n1 = timed_tokens(generate, one, args.new_tokens)
            sm, nm = timed_tokens(generate, many, 32)
            row = dict(
                what=name,
                one_stream_tokens_per_s=round(n1 / s1, 1),
                one_stream_tokens=n1,
                streams=args.streams,
                streams_tokens_per_s=round(nm / sm, 1),
                streams_tokens=nm,
            )
            if bytes_per_token is not None:
                row["bytes_per_token"] = bytes_per_token
                bound = bandwidth * 1e9 / row["bytes_per_token"]
                row["bandwidth_bound_tokens_per_s"] = round(bound)
                row["share_of_bound"] = round(row["one_stream_tokens_per_s"] / bound, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del generate
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_infer.py needs a CUDA device")
    bandwidth = bandwidth_gbs()
    print(json.dumps(dict(bandwidth_gbs=round(bandwidth))), flush=True)
    results = dict(
        device=torch.cuda.get_device_name(),
        machine=machine_record(),
        bandwidth_gbs=round(bandwidth),
        products=bench_products(),
        decoding=bench_decoding(args, bandwidth),
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
