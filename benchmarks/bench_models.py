"""Model loading: time and peak memory (RSS) of each way to load SmolLM2-135M-Instruct.

Every case runs in a fresh subprocess (so peak RSS is its own) on 2 threads:
- gguf_convert: the first load, converting the GGUF into a private, empty cache
- float_cached: load_model() from the converted cache
- 4bit_streaming: load_model(quant=QuantConfig()) (quantizes layer by layer as weights arrive)
- 4bit_after_float: the naive way, float load then quantize_model (for comparison)
- 4bit_folder: load_model(DIR) of a folder written by `slimtune quantize` (nf4 + DQ)
- bnb_peer: transformers + bitsandbytes, BitsAndBytesConfig(load_in_4bit) from the same folder

Writes benchmarks/reports/models.md. `--repeat N` repeats the cheap cases (the machine is shared
and noisy); `--skip-convert` skips the slow first conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from slimtune.hardware import machine_summary

ROOT = Path(__file__).resolve().parent.parent
# Children import slimtune from this checkout even where it is not pip-installed.
ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
)

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(2)
case = sys.argv[1]
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from slimtune.models import load_model
from slimtune.quant import QuantConfig, quantize_model
import transformers  # import cost outside the timing
start = time.perf_counter()
if case in ("gguf_convert", "float_cached"):
    model, tok = load_model()
elif case == "4bit_streaming":
    model, tok = load_model(quant=QuantConfig())
elif case == "4bit_after_float":
    model, tok = load_model()
    quantize_model(model, QuantConfig())
elif case == "4bit_folder":
    model, tok = load_model(os.environ["BENCH_4BIT_FOLDER"])
elif case == "bnb_peer":
    from slimtune.models.gguf_cache import cached_folder
    from slimtune.models import default_model_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(cached_folder(default_model_file()),
        quantization_config=bnb)
seconds = time.perf_counter() - start
with torch.no_grad():
    logits = model(torch.tensor([[1, 504, 3458, 282, 4649, 314]])).logits
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"case": case, "seconds": seconds, "peak_rss_mib": peak / 1024,
                  "rss_before_load_mib": base_rss / 1024}))
"""


def run_case(case: str, env_cache: str | None, folder: str = "") -> dict:
    env = dict(ENV, BENCH_4BIT_FOLDER=folder)
    if env_cache:
        env["SLIMTUNE_CACHE"] = env_cache
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-convert", action="store_true")
    args = parser.parse_args()
    rows = []
    if not args.skip_convert:
        with tempfile.TemporaryDirectory() as cache:
            rows.append(run_case("gguf_convert", cache))
            rows.append(run_case("float_cached", cache))
    cases = ["float_cached", "4bit_streaming", "4bit_after_float", "4bit_folder", "bnb_peer"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/smollm2-nf4"
        subprocess.run(
            [sys.executable, "-m", "slimtune", "quantize", "--output", folder],
            cwd=ROOT,
            env=ENV,
            check=True,
            capture_output=True,
        )
        for _ in range(args.repeat):
            for case in cases:
                rows.append(run_case(case, None, folder))
                print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    lines = [
        "# Model loading: time and peak RSS (SmolLM2-135M-Instruct)",
        "",
        "`.venv/bin/python benchmarks/bench_models.py` (each case in a fresh process, 2 threads;",
        "the machine is shared with other engineers' jobs, so times are noisy: compare rows of",
        "one run). Peak RSS is the process's ru_maxrss, including Python + torch + transformers",
        "(about 230 MiB before the load starts).",
        f"Load average (2 cores) at start / end of the run: {load_before:.1f} / {load_after:.1f}.",
        f"Machine: {machine_summary()}.",
        "",
        "| case | load seconds | peak RSS MiB |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} |" for r in rows]
    report = ROOT / "benchmarks" / "reports" / "models.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
