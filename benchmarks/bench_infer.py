"""One-stream decode speed from 4 bits, side by side in one process, against the memory bound.

SmolLM2-135M-Instruct, one chat prompt, 128 greedy new tokens (the end token ignored so every
engine makes exactly 128), each engine run --repeats times, alternating, best run kept:
- slimtune: NF4 + double quantization, slimtune's decode loop (`slimtune.infer`), 4-bit layers
  computing from their packed codes (`slimtune.quant.gemv`);
- transformers + bitsandbytes NF4 (double quantization, float32 compute): `generate`;
- transformers fp32: `generate`;
- slimtune fp32: the decode loop on the float model (what the loop alone gains);
- slimtune nf4 bf16 (on CPUs with AVX512_BF16): the NF4 model computing in bfloat16 (4-bit
  products as a bfloat16 decode-then-matmul, a bfloat16 copy of the output layer).
The memory bound: bytes one new token must read (the 4-bit layers' codes and absmax, the float
head, norms) divided by the bytes/s this process streams from a 512 MiB buffer, measured in the
same run. Peak RSS of `slimtune generate --quant nf4` is read from a child process (ru_maxrss).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_infer.py [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from slimtune.runtime import short_openmp_spins  # noqa: E402

short_openmp_spins(os.environ)  # the thread policy `slimtune generate` runs under

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Explain in a few sentences why the sky is blue."
NEW_TOKENS = 128


def stream_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s read by a sum over a buffer much larger than the caches (best of `repeats`)."""
    buffer = torch.ones(mib * (1 << 20) // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def bytes_per_token(model) -> int:
    """What one decode step reads: every 4-bit layer's codes + absmax state, every float
    parameter except the embedding (one row of it is read)."""
    from slimtune.quant import Linear4bit

    total = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for tensor in (module.weight, module.absmax, module.nested_absmax):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for param in model.parameters():
        if id(param) in seen or (param is embed and param is not head):
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def head_bytes(model) -> int:
    head = model.get_output_embeddings().weight
    return head.numel() * head.element_size()


def prompt_ids(tokenizer) -> torch.Tensor:
    from slimtune.infer import format_prompt

    text = format_prompt(tokenizer, PROMPT)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def run_slimtune(model, ids, compute_dtype: torch.dtype | None = None) -> dict:
    from slimtune.infer import decode

    # No end token: exactly NEW_TOKENS.
    out = decode(model, ids, max_new_tokens=NEW_TOKENS, compute_dtype=compute_dtype)
    assert len(out.tokens[0]) == NEW_TOKENS
    steps = NEW_TOKENS - 1
    return {
        "seconds": out.seconds,
        "tok_per_s": NEW_TOKENS / out.seconds,
        "decode_tok_per_s": steps / (out.seconds - out.prefill_seconds),
        "tokens": out.tokens[0],
    }


def run_transformers(model, ids) -> dict:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=0,
        )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tok_per_s": NEW_TOKENS / seconds, "decode_tok_per_s": None,
            "tokens": out[0, ids.shape[1]:].tolist()}  # fmt: skip


def runner(name: str):
    if name == "slimtune nf4 bf16":
        return lambda model, ids: run_slimtune(model, ids, torch.bfloat16)
    return run_slimtune if name.startswith("slimtune") else run_transformers


def load_engines(engines: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimtune.models import load_model
    from slimtune.models.source import resolve_model
    from slimtune.quant import QuantConfig

    folder = resolve_model(None)
    loaded = {}
    if "slimtune nf4" in engines or "slimtune nf4 bf16" in engines:
        loaded["slimtune nf4"] = loaded["slimtune nf4 bf16"] = load_model(quant=QuantConfig())[0]
    if "transformers+bnb nf4" in engines:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        loaded["transformers+bnb nf4"] = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
        ).eval()
    if "transformers fp32" in engines or "slimtune fp32" in engines:
        float_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        loaded["transformers fp32"] = float_model
        loaded["slimtune fp32"] = float_model
    return {name: loaded[name] for name in engines}


# Runs `-m module args...` or `-c code` and writes the process's own peak RSS (VmHWM, kB) to
# the file named by $PEAK_FILE at exit. A forked child's ru_maxrss starts at its parent's RSS
# (Linux keeps the high-water mark across exec), so wait4's figure would include this process.
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    kib = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]
    open(os.environ["PEAK_FILE"], "w").write(kib)
atexit.register(_peak)
mode, target, *rest = sys.argv[1:]
if mode == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(target)
"""


def _child_peak(command: list[str], env: dict) -> tuple[int, str]:
    """(peak RSS in bytes of the child running `command` (`-m ...` or `-c ...`), its stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak_file:
        full = [sys.executable, "-c", _PEAK_WRAPPER, *command]
        result = subprocess.run(full, env=dict(env, PEAK_FILE=peak_file.name), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}")
        return int(open(peak_file.name).read()) * 1024, result.stdout


# The runtime constant: everything `generate` loads but the weights. Python, torch, numba,
# slimtune, the tokenizer, and transformers' code for the model (its config and module tree,
# built on the meta device: importing the model's modules costs tens of MiB, holding no weight).
RUNTIME_ONLY = """
import torch, transformers, numba, slimtune.infer, slimtune.models, slimtune.cli
from slimtune.models.loading import load_tokenizer
from slimtune.models.skeleton import build_skeleton
from slimtune.models.source import resolve_model
folder = resolve_model(None)
build_skeleton(folder, dtype=torch.float32, trust_remote_code=False)
load_tokenizer(folder)
"""


def generate_peak_rss(threads: int) -> dict:
    """Peak RSS of the `slimtune generate` command (4-bit base, 128 tokens) in a child, and of a
    child that loads all it runs on but the weights (`RUNTIME_ONLY`, the runtime constant)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
    command = ["-m", "slimtune", "generate", PROMPT, "--quant", "nf4",
               "--max-new-tokens", str(NEW_TOKENS), "--json"]  # fmt: skip
    peak, out = _child_peak(command, env)
    baseline, _ = _child_peak(["-c", RUNTIME_ONLY], env)
    return {
        "peak_rss_bytes": peak,
        "runtime_peak_rss_bytes": baseline,
        "generate_json": json.loads(out.strip().splitlines()[-1]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--engines",
        default="slimtune nf4,transformers+bnb nf4,transformers fp32,slimtune fp32,"
        "slimtune nf4 bf16",
        help="comma-separated subset (slimtune nf4 bf16 only runs where the CPU has AVX512_BF16)",
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the generate child")
    parser.add_argument(
        "--rss-only", type=Path, default=None, help="only the generate child; JSON to this file"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="(fewer: smoke tests)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/reports/infer.json")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/infer.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    globals()["NEW_TOKENS"] = args.new_tokens
    if args.rss_only:
        from slimtune.hardware import machine_record
        from slimtune.models import load_model
        from slimtune.quant import QuantConfig, storage_report

        record = generate_peak_rss(args.threads)
        record["four_bit_model_bytes"] = storage_report(
            load_model(quant=QuantConfig())[0]
        ).total_bytes
        record["machine"] = machine_record()
        args.rss_only.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1))
        return 0

    from slimtune.hardware import machine_record, machine_summary
    from slimtune.models import load_model
    from slimtune.models.loading import load_tokenizer
    from slimtune.models.source import resolve_model
    from slimtune.quant import QuantConfig, native, storage_report

    engines = [e.strip() for e in args.engines.split(",")]
    if not native.bf16_dot():
        engines = [e for e in engines if e != "slimtune nf4 bf16"]
    models = load_engines(engines)
    ids = prompt_ids(load_tokenizer(resolve_model(None)))
    slim = models.get("slimtune nf4") or load_model(quant=QuantConfig())[0]
    need = bytes_per_token(slim)
    model_bytes = storage_report(slim).total_bytes
    results: dict[str, list[dict]] = {name: [] for name in engines}
    bandwidths = []
    for name in engines:  # warm-up: compile kernels, fault pages in
        runner(name)(models[name], ids[:, :8])
    for repeat in range(args.repeats):
        bandwidths.append(stream_bandwidth())
        for name in engines:
            result = runner(name)(models[name], ids)
            results[name].append(result)
            print(f"{repeat + 1} {name}: {result['tok_per_s']:.1f} tokens/s", flush=True)
    bandwidth = max(bandwidths)
    bound = bandwidth / need
    best = {name: max(runs, key=lambda r: r["tok_per_s"]) for name, runs in results.items()}
    record = {
        "machine": machine_record(),
        "shared_machine": True,
        "threads": args.threads,
        "prompt_tokens": ids.shape[1],
        "new_tokens": NEW_TOKENS,
        "stream_bandwidth_bytes_per_s": bandwidth,
        "bytes_per_token_nf4": need,
        "bandwidth_bound_tok_per_s": bound,
        # bfloat16 compute reads a bfloat16 copy of the output layer instead
        "bytes_per_token_nf4_bf16": need - head_bytes(slim) // 2,
        "four_bit_model_bytes": model_bytes,  # every parameter and buffer of the NF4 model
        "engines": {
            name: {k: v for k, v in r.items() if k != "tokens"}
            | {"runs": [x["tok_per_s"] for x in results[name]]}
            for name, r in best.items()
        },
    }
    # The same weights (bitsandbytes' NF4 bytes equal slimtune's): the same greedy tokens?
    if {"slimtune nf4", "transformers+bnb nf4"} <= set(best):
        same = best["slimtune nf4"]["tokens"] == best["transformers+bnb nf4"]["tokens"]
        record["greedy_tokens_equal_slimtune_nf4_and_bnb_nf4"] = same
    if not args.no_rss:
        record["generate"] = generate_peak_rss(args.threads)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    write_report(args, record, machine_summary())
    return 0


def write_report(args, record: dict, machine: str) -> None:
    engines = record["engines"]
    lines = [
        "# One-stream decode from 4 bits",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/bench_infer.py "
        f"{' '.join(sys.argv[1:])}`".rstrip()
        + "  ",
        f"Machine: {machine}; shared with other jobs (compare engines within this run only).  ",
        f"SmolLM2-135M-Instruct, a {record['prompt_tokens']}-token chat prompt, "
        f"{record['new_tokens']} greedy new tokens, best of {args.repeats} alternating runs.",
        "",
        "| engine | tokens/s (prompt + 128 tokens) | decode-only tokens/s | runs |",
        "|---|---|---|---|",
    ]
    for name, r in engines.items():
        decode = f"{r['decode_tok_per_s']:.1f}" if r["decode_tok_per_s"] else "-"
        runs = ", ".join(f"{x:.1f}" for x in r["runs"])
        lines.append(f"| {name} | {r['tok_per_s']:.1f} | {decode} | {runs} |")
    bound = record["bandwidth_bound_tok_per_s"]
    lines += [
        "",
        f"Memory bound: one token reads {record['bytes_per_token_nf4'] / 2**20:.1f} MiB (4-bit "
        f"codes + absmax, float head and norms); this process streamed "
        f"{record['stream_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, so at most "
        f"**{bound:.0f} tokens/s**.",
    ]
    peer = engines.get("transformers+bnb nf4", {}).get("tok_per_s")
    if "slimtune nf4" in engines:
        mine = engines["slimtune nf4"]["tok_per_s"]
        lines.append(f"slimtune nf4 reaches **{100 * mine / bound:.0f}%** of the bound.")
        if peer:
            lines.append(f"slimtune nf4 / transformers+bnb nf4: **{mine / peer:.2f}x**.")
    if "slimtune nf4 bf16" in engines:
        mine = engines["slimtune nf4 bf16"]["tok_per_s"]
        need = record["bytes_per_token_nf4_bf16"]
        bound16 = record["stream_bandwidth_bytes_per_s"] / need
        lines.append(
            f"slimtune nf4 bf16 reads {need / 2**20:.1f} MiB a token (the output layer in "
            f"bfloat16): at most {bound16:.0f} tokens/s, reached to **{100 * mine / bound16:.0f}%**"
            + (f"; / transformers+bnb nf4: **{mine / peer:.2f}x**." if peer else ".")
        )
    if "generate" in record:
        rss = record["generate"]["peak_rss_bytes"] / 2**20
        base = record["generate"]["runtime_peak_rss_bytes"] / 2**20
        size = record["four_bit_model_bytes"] / 2**20
        lines.append(
            f"Peak RSS of `slimtune generate --quant nf4` (128 tokens): **{rss:.0f} MiB**; "
            f"the NF4 model (4-bit layers, float embedding and head) holds {size:.0f} MiB; "
            f"the runtime without the weights (`RUNTIME_ONLY`) peaks at {base:.0f} MiB: "
            f"(peak - runtime) / model = **{(rss - base) / size:.2f}x**."
        )
    if "greedy_tokens_equal_slimtune_nf4_and_bnb_nf4" in record:
        lines.append(
            "Greedy tokens of slimtune nf4 equal to transformers+bnb nf4: "
            f"{record['greedy_tokens_equal_slimtune_nf4_and_bnb_nf4']}."
        )
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
