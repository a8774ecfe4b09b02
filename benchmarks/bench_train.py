#!/usr/bin/env python3
"""Training step speed and memory: slimtune vs transformers + peft + bitsandbytes, side by side.

SmolLM2-135M, batch 4 x 256 tokens of text (CPython's docs, every token trained), LoRA r=16
alpha=32 dropout 0.05 on q,k,v,o,gate,up,down, AdamW lr 2e-4, 2 threads; median of the timed
steps after the warm-up steps. Every variant runs in a fresh process, so peak RSS
(getrusage) is its own. The peer is measured as ../shared/peer/peer_bench.py does (same model
files, same recipe: prepare_model_for_kbit_training for QLoRA, model(labels=) loss).

    .venv/bin/python benchmarks/bench_train.py                 # all variants, a table
    .venv/bin/python benchmarks/bench_train.py --only slimtune-qlora,peer-qlora
    .venv/bin/python benchmarks/bench_train.py --one slimtune-qlora   # one variant, JSON
    .venv/bin/python benchmarks/bench_train.py --only slimtune-qlora,peer-qlora --rounds 4

On a machine whose speed drifts from one process to the next, `--rounds` runs the chosen
variants several times over in turn and reports the median of the rounds, and for the QLoRA
pair the ratio round by round: both stacks then sample the same hours.

The "floor" entry bounds what any implementation could reach here: the step's own matmuls, each
at the best speed this CPU reaches on its shape, and nothing else (see matmul_floor).

Compute dtypes: `+bf16` runs slimtune with compute_dtype bfloat16 (the frozen base in bf16, LoRA
in fp32) and the peer with bitsandbytes' compute dtype bfloat16 (the QLoRA recipe: model loaded
in bf16, prepare_model_for_kbit_training); without it both compute in float32. `+nofuse` runs
slimtune without the shared-input LoRA product (lora/fused.py), to show what it gains; `+sdpa`
with torch's SDPA in place of its C attention (models/attention.py). Every
result carries `slimtune.hardware.machine_record()`: the CPU, its flags (avx512_bf16, amx_bf16
decide whether bf16 is fast), threads and BLAS.

    .venv/bin/python benchmarks/bench_train.py --only slimtune-qlora,slimtune-qlora+bf16,peer-qlora,peer-qlora+bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = [
    "slimtune-lora",
    "slimtune-qlora",
    "peer-lora",
    "peer-qlora",
    "slimtune-lora+ckpt",
    "slimtune-qlora+ckpt",
    "peer-lora+ckpt",
    "peer-qlora+ckpt",
]
# The compute-dtype pair: on a CPU with native bf16 the peer's bf16 mode is its fastest.
VARIANTS += ["slimtune-qlora+bf16", "peer-qlora+bf16"]
# Not in the default set: the peer under slimtune's lean-heap malloc settings, to show how much of
# the memory gap is the allocator setting alone; slimtune without the shared-input LoRA product;
# slimtune with torch's SDPA in place of its C attention.
EXTRA_VARIANTS = [
    "peer-lora+lean",
    "peer-qlora+lean",
    "peer-qlora+ckpt+lean",
    "slimtune-qlora+nofuse",
    "slimtune-qlora+bf16+nofuse",
    "slimtune-qlora+sdpa",
    "slimtune-qlora+bf16+sdpa",
]
FLOOR = "floor"  # the fastest a QLoRA step could be on this CPU (see matmul_floor)
FLOOR_BF16 = "floor+bf16"  # the same with every product in bfloat16 (a CPU with native bf16)
FLOORS = [FLOOR, FLOOR_BF16]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def batches(tokenizer, n: int, batch: int, seq: int):
    import pydoc_data.topics as topics

    import torch

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: n * batch * seq]
    return torch.tensor(ids, dtype=torch.long).view(n, batch, seq)


def slimtune_model(
    method: str, ckpt: bool, args, bf16: bool = False, fuse: bool = True, attend: bool = True
):
    from slimtune.lora import fuse_shared_inputs
    from slimtune.models.attention import use_native_attention
    from slimtune.models.lean_mlp import use_lean_mlp
    from slimtune.train import TrainConfig
    from slimtune.train.precision import cast_frozen, training_dtype
    from slimtune.train.setup import build_model

    config = TrainConfig(
        method=method,
        rank=args.r,
        alpha=args.alpha,
        dropout=0.05,
        targets=TARGETS,
        gradient_checkpointing=ckpt,
        compute_dtype="bfloat16" if bf16 else "float32",
    )
    model, tokenizer = build_model(config)
    # As slimtune.train.train does: the compute dtype, the lean MLP, the C attention, the
    # shared-input product.
    cast_frozen(model, training_dtype(config.compute_dtype, method))
    use_lean_mlp(model, native=True)
    if attend:
        use_native_attention(model)
    if fuse:
        fuse_shared_inputs(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def peer_model(method: str, ckpt: bool, args, bf16: bool = False):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = peer_base(method, ckpt, bf16)
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=0.05,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), tokenizer


def peer_base(method: str, ckpt: bool, bf16: bool = False):
    """The peer's model before LoRA, as peer_bench.py loads it: float, or NF4 + double
    quantization through bitsandbytes with prepare_model_for_kbit_training; and its tokenizer."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from slimtune.models.gguf_cache import cached_folder
    from slimtune.models.paths import default_model_file

    folder = cached_folder(default_model_file())
    dtype = torch.bfloat16 if bf16 else torch.float32
    options = dict(dtype=dtype)
    if method == "qlora":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        options["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, **options)
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs=kwargs
        )
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, AutoTokenizer.from_pretrained(folder)


def run_one(variant: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stack, rest = variant.split("-", 1)
    method, *flags = rest.split("+")
    ckpt, bf16 = "ckpt" in flags, "bf16" in flags
    t0 = time.perf_counter()
    if stack == "slimtune":
        model, tokenizer = slimtune_model(
            method, ckpt, args, bf16, fuse="nofuse" not in flags, attend="sdpa" not in flags
        )
    else:
        model, tokenizer = peer_model(method, ckpt, args, bf16)
    load_s = time.perf_counter() - t0
    model.train()
    data = batches(tokenizer, args.warmup + args.steps, args.batch, args.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    if stack == "slimtune":
        from slimtune.train.forward import summed_loss

        mask = torch.ones(args.batch, args.seq, dtype=torch.long)

        def loss_of(x):
            batch = {"input_ids": x, "attention_mask": mask, "labels": x}
            return summed_loss(model, batch) / (args.batch * (args.seq - 1))
    else:

        def loss_of(x):
            return model(input_ids=x, labels=x).loss

    times, losses = [], []
    for x in data:
        t = time.perf_counter()
        loss = loss_of(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
    step = statistics.median(times[args.warmup :])
    return dict(
        variant=variant,
        s_per_step=round(step, 3),
        tokens_per_s=round(args.batch * args.seq / step, 1),
        peak_rss_mb=round(peak_rss_mb(), 1),
        load_s=round(load_s, 1),
        step_times=[round(t, 2) for t in times],
        losses=losses,
        trainable=sum(p.numel() for p in params),
        threads=torch.get_num_threads(),
        loadavg=[round(v, 1) for v in os.getloadavg()],
        machine=machine_record(),
    )


def machine_record() -> dict:
    from slimtune.hardware import machine_record as record

    return record()


def matmul_floor(args, bf16: bool = False) -> dict:
    """The fastest a QLoRA step could possibly be on this CPU: its matmuls alone, each at the
    best speed this CPU's BLAS reaches on that very shape.

    `bf16`: the step of `slimtune-qlora+bf16`, and every product (the adapters' too) timed in
    bfloat16, the fastest dtype on a CPU that multiplies it natively.

    One real slimtune step runs under torch.profiler; every aten mm/addmm it makes is timed
    again alone (median of repeats, the fastest of the four operand layouts) and the times are
    summed. Causal attention (a fused kernel the profiler cannot split) is added as its FLOPs at
    the best rate of the step's large matmuls. Everything else a step does (norms, activations,
    rotary, dropout, decoding 4-bit weights, the loss's exp, the optimizer) is left out, so the
    true minimum is higher still."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from slimtune.train.forward import summed_loss

    torch.set_num_threads(args.threads)
    model, tokenizer = slimtune_model("qlora", False, args, bf16=bf16)
    model.train()
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = batches(tokenizer, 1, args.batch, args.seq)[0]
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    summed_loss(model, batch).backward()  # warm-up: the profiled step is a steady one
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        summed_loss(model, batch).backward()
    calls: dict[tuple[int, int, int], int] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        shapes = event.input_shapes
        if event.key == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
        elif event.key == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
        else:
            continue
        calls[(m, k, n)] = calls.get((m, k, n), 0) + event.count

    def best_seconds(m: int, k: int, n: int) -> float:
        layouts = []
        for a in (torch.randn(m, k, dtype=dtype), torch.randn(k, m, dtype=dtype).t()):
            for b in (torch.randn(k, n, dtype=dtype), torch.randn(n, k, dtype=dtype).t()):
                times = []
                for _ in range(7 if m * k * n > 10**9 else 25):
                    start = time.perf_counter()
                    torch.mm(a, b)
                    times.append(time.perf_counter() - start)
                layouts.append(statistics.median(times[2:]))
        return min(layouts)

    seconds = {shape: best_seconds(*shape) for shape in calls}
    matmul_s = sum(count * seconds[shape] for shape, count in calls.items())
    flops = sum(2 * m * k * n * count for (m, k, n), count in calls.items())
    best_rate = max(2 * m * k * n / seconds[(m, k, n)] for (m, k, n) in calls)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # Causal attention, forward (QK^T, PV) and backward (4 products): 6 B H D S (S + 1) / layer.
    attention = 6 * args.batch * config.num_attention_heads * head_dim * args.seq * (args.seq + 1)
    attention *= config.num_hidden_layers
    floor_s = matmul_s + attention / best_rate
    tokens = args.batch * args.seq
    return dict(
        variant=FLOOR_BF16 if bf16 else FLOOR,
        s_per_step=round(floor_s, 3),
        tokens_per_s=round(tokens / floor_s, 1),
        gflop_per_step=round((flops + attention) / 1e9, 1),
        matmul_calls=sum(calls.values()),
        distinct_shapes=len(calls),
        best_gflop_per_s=round(best_rate / 1e9, 1),
        mean_gflop_per_s=round((flops + attention) / floor_s / 1e9, 1),
        peak_rss_mb=round(peak_rss_mb(), 1),
        loadavg=[round(v, 1) for v in os.getloadavg()],
    )


def run_all(args) -> list[dict]:
    """Every chosen variant in a fresh process, `args.rounds` times over in turn (slimtune,
    then the peer, then slimtune again ...), so that both stacks see the same hours of a noisy
    machine; with more than one round the records are merged by merge_rounds."""
    chosen = args.only.split(",") if args.only else VARIANTS + FLOORS
    rounds = []
    for number in range(args.rounds):
        if args.rounds > 1:
            print(f"=== round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
        rounds.append([run_process(variant, args) for variant in chosen])
    return rounds[0] if len(rounds) == 1 else merge_rounds(rounds)


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One record a variant from several rounds: its s/step is the median of the rounds'
    medians, `round_s_per_step` keeps each round's, peak RSS is the largest seen. A variant
    that failed in any round is reported failed."""
    merged = []
    for records in zip(*rounds, strict=True):
        failed = [r for r in records if "failed" in r]
        if failed:
            merged.append(failed[0])
            continue
        steps = [r["s_per_step"] for r in records]
        step = statistics.median(steps)
        tokens = records[0]["tokens_per_s"] * records[0]["s_per_step"]
        merged.append(
            dict(
                records[-1],
                s_per_step=round(step, 3),
                tokens_per_s=round(tokens / step, 1),
                peak_rss_mb=max(r["peak_rss_mb"] for r in records),
                round_s_per_step=steps,
                round_loadavg=[r["loadavg"] for r in records],
                loadavg=max((r["loadavg"] for r in records), key=lambda v: v[0]),
            )
        )
    return merged


def run_process(variant: str, args) -> dict:
    """One variant's record (run_one's JSON) from a fresh process."""
    from slimtune.runtime.heap import lean_heap_environment

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        variant,
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
    ]
    print(f"=== {variant}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    if variant.startswith("slimtune") or variant.endswith("+lean"):
        # slimtune's CLI trains under these malloc settings (slimtune.runtime.heap).
        env = lean_heap_environment(env) or env
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        return dict(variant=variant, failed=proc.returncode)
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(record), file=sys.stderr, flush=True)
    return record


def table(results: list[dict]) -> str:
    rows = [
        "| variant | s/step (median) | tokens/s | peak RSS MB | load avg |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "failed" in r:
            rows.append(f"| {r['variant']} | failed (rc {r['failed']}) | | | |")
        else:
            rows.append(
                f"| {r['variant']} | {r['s_per_step']} | {r['tokens_per_s']} | "
                f"{r['peak_rss_mb']} | {r['loadavg'][0]} |"
            )
    by = {r["variant"]: r for r in results if "failed" not in r}
    rows += dtype_rows(by)
    for suffix in ("", "+ckpt"):
        q, pq, lo = (
            by.get(f"{s}{suffix}") for s in ("slimtune-qlora", "peer-qlora", "slimtune-lora")
        )
        if q and pq:
            rows.append(
                f"\nQLoRA{suffix} tokens/s, slimtune / peer: "
                f"{q['tokens_per_s'] / pq['tokens_per_s']:.2f}x (target >= 2)"
            )
            rows.append(
                f"QLoRA{suffix} peak RSS, slimtune / peer: "
                f"{q['peak_rss_mb'] / pq['peak_rss_mb']:.2f} (target <= 0.5)"
            )
        floor = by.get(FLOOR)
        if floor and pq and not suffix:
            rows.append(
                f"Fastest possible QLoRA step on this CPU (its {floor['matmul_calls']} matmuls "
                f"alone, {floor['gflop_per_step']} GFLOP, each at its shape's best speed: "
                f"{floor['mean_gflop_per_s']} GFLOP/s on average): {floor['s_per_step']} s, so at "
                f"most {floor['tokens_per_s'] / pq['tokens_per_s']:.2f}x the peer's tokens/s"
            )
        if q and lo:
            rows.append(
                f"slimtune QLoRA / LoRA step{suffix}: "
                f"{q['s_per_step'] / lo['s_per_step']:.2f} (target <= 1.1)"
            )
    return "\n".join(rows)


def round_ratios(slow: dict, fast: dict) -> list[float]:
    """slow's s/step over fast's in each round where both ran (--rounds), else []."""
    if "round_s_per_step" not in slow or "round_s_per_step" not in fast:
        return []
    pairs = zip(slow["round_s_per_step"], fast["round_s_per_step"], strict=True)
    return [a / b for a, b in pairs]


def dtype_rows(by: dict) -> list[str]:
    """slimtune's best mode against the peer's best and the peer's fp32, with the targets that
    apply to this CPU (bf16 in hardware: >= 3x the peer's best; AVX2 only: >= 1.6x its fp32)."""
    ours = [by[v] for v in ("slimtune-qlora", "slimtune-qlora+bf16") if v in by]
    peers = [by[v] for v in ("peer-qlora", "peer-qlora+bf16") if v in by]
    if not ours or not peers:
        return []
    best = max(ours, key=lambda r: r["tokens_per_s"])
    peer_best = max(peers, key=lambda r: r["tokens_per_s"])
    native = any(best["machine"]["cpu_flags"].get(f) for f in ("avx512_bf16", "amx_bf16"))
    rows = [
        f"\nslimtune's best QLoRA mode ({best['variant']}) / the peer's best "
        f"({peer_best['variant']}): {best['tokens_per_s'] / peer_best['tokens_per_s']:.2f}x"
        + (" (target on a CPU with bf16: >= 3)" if native else "")
    ]
    if floor := by.get(FLOOR_BF16):
        rows.append(
            f"Fastest possible bf16 QLoRA step on this CPU ({floor['matmul_calls']} matmuls "
            f"alone, each at its shape's best bf16 speed: {floor['mean_gflop_per_s']} GFLOP/s on "
            f"average): {floor['s_per_step']} s, so at most "
            f"{floor['tokens_per_s'] / peer_best['tokens_per_s']:.2f}x the peer's best mode"
        )
    if "peer-qlora" in by:
        target = "" if native else " (target on an AVX2-only CPU: >= 1.6)"
        rows.append(
            f"slimtune's best QLoRA mode / the peer's fp32: "
            f"{best['tokens_per_s'] / by['peer-qlora']['tokens_per_s']:.2f}x{target}"
        )
        if per_round := round_ratios(by["peer-qlora"], best):
            rows.append(
                "  round by round: "
                + ", ".join(f"{r:.2f}x" for r in per_round)
                + f" (median {statistics.median(per_round):.2f}x)"
            )
    pairs = [("slimtune-qlora", "slimtune-qlora+nofuse")]
    pairs.append(("slimtune-qlora+bf16", "slimtune-qlora+bf16+nofuse"))
    for fused, plain in pairs:
        if fused in by and plain in by:
            rows.append(
                f"{fused}: shared-input LoRA product {by[plain]['s_per_step']} -> "
                f"{by[fused]['s_per_step']} s/step"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--one", choices=VARIANTS + EXTRA_VARIANTS + FLOORS, help="run one variant, print JSON"
    )
    parser.add_argument("--only", default="", help="comma list of variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the variants this many times over, in turn"
    )
    parser.add_argument("--out", default="", help="write the results JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.one:
        if args.one in FLOORS:
            print(json.dumps(matmul_floor(args, bf16=args.one == FLOOR_BF16)))
        else:
            print(json.dumps(run_one(args.one, args)))
        return
    results = run_all(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine_record(), results=results), f, indent=1)
    from slimtune.hardware import machine_summary

    print(machine_summary())
    print(table(results))


if __name__ == "__main__":
    main()
