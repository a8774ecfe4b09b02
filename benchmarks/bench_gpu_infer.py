#!/usr/bin/env python3
"""On a CUDA GPU: generating from 4 bits, slimtune against transformers (+ bitsandbytes).

    python benchmarks/bench_gpu_infer.py [--new-tokens 128] [--streams 16] [--out FILE]

- memory bandwidth: a device-to-device copy of 1 GiB (bytes read + written per second);
- the 4-bit product of one input row (NF4 + double quant, bfloat16) at SmolLM2's and
  LLaMA-2-7B's shapes: slimtune's fused Triton product (and its tile shapes), bitsandbytes'
  `matmul_4bit` (its GEMV kernel) and decode-then-matmul: microseconds a call as Python
  launches it, and the GPU's own time a call inside a CUDA graph (no launch costs) with the
  codes' GB/s;
- decoding of a SmolLM2-135M-shaped LLaMA with random weights (the GGUF model does not travel to
  a GPU machine without a network), NF4 + double quant: one stream of --new-tokens greedy tokens
  after a 32-token prompt, and --streams streams of 32 new tokens, for slimtune's decode loop
  (bfloat16 and float32 compute), transformers + bitsandbytes NF4 (bfloat16 compute) and
  transformers in bfloat16. Every contestant makes exactly the tokens asked (no end token).
  The memory-bandwidth bound of one stream: the bandwidth over the bytes one token reads (the
  4-bit codes and absmax, the float32 output layer).
- with --tokenizer (SmolLM2's tokenizer folder): the serving engine on the GPU, 3 adapters,
  --streams clients, --requests requests of 32 new tokens.

Every contestant runs in this one process, in turn, after a warm-up; times are medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu's and bench_serve's parts
import bench_gpu  # noqa: E402

from slimtune.hardware import machine_record  # noqa: E402

SHAPES = {"SmolLM2 gate/up": (1536, 576), "7B attention": (4096, 4096), "7B gate/up": (11008, 4096)}


def cuda_ms(fn, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of fn() on the GPU (bench_gpu's timer, more repeats by default)."""
    return bench_gpu.cuda_ms(fn, repeats, warmup)


def graph_us(fn, calls: int = 20) -> float:
    """Microseconds of GPU time per fn() call, without the host's launch costs: `calls` calls
    recorded in one CUDA graph, replayed."""
    fn()  # compiled and warm before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_ms(graph.replay, repeats=20) * 1000 / calls


def bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() / (ms / 1000) / 1e9


def _decode_then_matmul(x, packed, state):
    from slimtune.quant import dequantize_4bit

    return x @ dequantize_4bit(packed, state, x.dtype).t()


# The fused product's tiles timed: (outputs per program, packed bytes per step, absmax per
# block). The default (16, 256, True) was chosen from this list's first run.
TILES = [(16, 256, True), (16, 128, False), (16, 128, True), (4, 128, True), (8, 128, True),
         (32, 128, True), (4, 256, True), (8, 256, True), (4, 128, False)]  # fmt: skip


def bench_products() -> list[dict]:
    """One input row (a decode step of one stream), bfloat16."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from slimtune.quant import gpu_matmul, quantize_4bit

    rows = []
    default = (gpu_matmul.BLOCK_N, gpu_matmul.BLOCK_K, gpu_matmul.BLOCK_SCALES)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
        ref_packed, ref_state = bnbf.quantize_4bit(
            w.bfloat16(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        code_bytes = packed.numel() + state.absmax.numel()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        timed = {
            "slimtune_fused": partial(gpu_matmul.matmul, x, packed, state),
            "bnb_matmul_4bit": partial(bnb.matmul_4bit, x, ref_packed.t(), ref_state),
            "decode_then_matmul": partial(_decode_then_matmul, x, packed, state),
        }
        row = dict(what=f"4-bit product {name} {n}x{k}, 1 row, bf16")
        for label, fn in timed.items():
            row[f"{label}_us"] = round(cuda_ms(fn) * 1000, 1)
            try:
                us = graph_us(fn)
            except RuntimeError as error:  # a kernel that cannot be captured
                row[f"{label}_in_graph_error"] = str(error)[:200]
                continue
            row[f"{label}_in_graph_us"] = round(us, 1)
            row[f"{label}_in_graph_codes_gbs"] = round(code_bytes / us / 1e3)
        tiles = {}
        for tile in TILES:
            gpu_matmul.BLOCK_N, gpu_matmul.BLOCK_K, gpu_matmul.BLOCK_SCALES = tile
            label = "{}x{} {}".format(*tile[:2], "block" if tile[2] else "byte")
            try:
                tiles[label] = round(graph_us(timed["slimtune_fused"]), 1)
            except Exception as error:  # a tile that does not compile is reported, not fatal
                tiles[label] = f"{type(error).__name__}: {str(error)[-160:]}"
        gpu_matmul.BLOCK_N, gpu_matmul.BLOCK_K, gpu_matmul.BLOCK_SCALES = default
        row["slimtune_tiles_in_graph_us"] = tiles
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


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


def timed_tokens(generate, ids, n, repeats=2) -> tuple[float, int]:
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
    model_fp = bench_gpu.smollm2_shaped(torch.float32)
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


def bench_serving(args, model_fp) -> dict:
    """`slimtune serve --qlora --device cuda`'s engine (float32 compute, its defaults) over 3
    adapters: --requests requests of 32 new tokens from --streams clients that each send the
    next as soon as one is answered; tokens/s in all, latency p50/p99."""
    from bench_serve import ADAPTERS, make_adapters, prompt
    from transformers import AutoTokenizer

    from slimtune.serve import GenerationRequest
    from slimtune.serve.build import build_engine

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        model_fp.save_pretrained(root / "model")
        tokenizer.save_pretrained(root / "model")
        adapters = make_adapters(copy.deepcopy(model_fp), root / "adapters")
        engine, _ = build_engine(
            str(root / "model"),
            qlora=True,
            adapters=list(adapters.items()),
            device="cuda",
            max_batch_size=args.streams,
        )
        try:

            def one(i: int) -> tuple[float, int]:
                ids = tokenizer(prompt(i))["input_ids"]
                request = GenerationRequest(ids, ADAPTERS[i % 3], max_tokens=32, ignore_eos=True)
                start = time.perf_counter()
                finish = engine.submit(request).result(600)
                return time.perf_counter() - start, len(finish.token_ids)

            one(0)  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(args.streams) as pool:
                done = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
        finally:
            engine.stop()
    latencies = sorted(seconds for seconds, _ in done)
    row = dict(
        what=f"serve engine, 4-bit base, 3 adapters, {args.streams} clients, 32 new tokens",
        requests=len(done),
        tokens=sum(n for _, n in done),
        tokens_per_s=round(sum(n for _, n in done) / wall, 1),
        p50_s=round(statistics.median(latencies), 3),
        p99_s=round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
    )
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument(
        "--tokenizer", default="", help="a tokenizer folder (SmolLM2's): runs the serving part"
    )
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
    if args.tokenizer:
        results["serving"] = bench_serving(args, bench_gpu.smollm2_shaped(torch.float32))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
