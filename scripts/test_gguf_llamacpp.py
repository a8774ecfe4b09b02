"""Check `slimtune export` against llama.cpp itself (`make test-gguf`).

SmolLM2 plus a LoRA adapter (the one given, else a random one that changes the answers) is
exported as a merged F32 GGUF and as an F32 adapter GGUF for an F32 base GGUF; llama.cpp's
`llama-completion` answers the demo task's prompts greedily from both, and the answers must equal
slimtune's own (base + adapter, float32). With `llama-server` beside it, the server is started on
the base GGUF with `--lora ADAPTER.gguf`: the chat template it renders from the base GGUF (its
Jinja engine, `/apply-template`) must be the prompt slimtune renders, and its greedy answers
(`/completion`) must equal slimtune's too. Merged Q8_0, Q4_0 and Q4_K_M exports are run as well
and their agreement reported against the same file read by transformers' GGUF reader (llama.cpp
computes quantized layers with 8-bit activations, so these are not exact).

    python scripts/test_gguf_llamacpp.py --bin ~/.cache/slimtune/llama.cpp/build/bin [--adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


def random_adapter(model, folder: Path) -> Path:
    from slimtune.lora import LoraConfig, delete_adapter, inject_adapter, save_adapter

    inject_adapter(model, LoraConfig(r=8, alpha=16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.03)
    save_adapter(model, folder)
    delete_adapter(model, "default")
    return folder


def slimtune_answers(model, tokenizer, prompts: list[str], n: int) -> list[str]:
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        answers.append(text.rstrip())
    return answers


def llamacpp_answers(binary: Path, model: Path, prompts, n: int, lora: Path | None = None):
    answers = []
    for prompt in prompts:
        command = [str(binary), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0",
                   "-no-cnv", "--no-display-prompt", "--no-escape", "--no-warmup", "-t", "2",
                   "-c", "512", "-s", "0"]  # fmt: skip
        if lora is not None:
            command += ["--lora", str(lora)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            sys.exit(f"llama-completion failed ({run.returncode}):\n{run.stderr[-3000:]}")
        answers.append(run.stdout.rstrip().removesuffix("[end of text]").rstrip())
    return answers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def wait_until_ready(url: str, server: subprocess.Popen, log: Path, seconds: int = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"llama-server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while the model loads
            pass
        time.sleep(1)
    sys.exit(f"llama-server not ready after {seconds} s:\n{log.read_text()[-3000:]}")


def server_answers(binary: Path, model: Path, lora: Path, conversations, n: int):
    """(templated prompts, greedy answers) of `llama-server -m model --lora lora`: each
    conversation rendered by the chat template the server reads from the model file, then
    completed from that prompt."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = model.parent / "llama-server.log"
    command = [str(binary), "-m", str(model), "--lora", str(lora), "--host", "127.0.0.1",
               "--port", str(port), "-t", "2", "-c", "512", "-np", "1", "--no-warmup"]  # fmt: skip
    with open(log, "w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(url, server, log)
        prompts, answers = [], []
        for messages in conversations:
            prompt = post(url + "/apply-template", {"messages": messages})["prompt"]
            body = {"prompt": prompt, "n_predict": n, "temperature": 0, "seed": 0,
                    "cache_prompt": False}  # fmt: skip
            prompts.append(prompt)
            answers.append(post(url + "/completion", body)["content"].rstrip())
        return prompts, answers
    finally:
        server.terminate()
        server.wait(timeout=60)


def converter_check(source: Path, work: Path, qtype: str = "f16") -> bool:
    """llama.cpp's own `convert_hf_to_gguf.py` on the base model's folder, against slimtune's
    export of the same weights: every tensor must be byte-identical, with the same type."""
    import os

    import gguf
    import numpy as np

    from slimtune.export import write_gguf
    from slimtune.models import default_model_file, load_model
    from slimtune.models.source import resolve_model

    reference = work / f"llamacpp-{qtype}.gguf"
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(resolve_model(None)),
                    "--outtype", qtype, "--outfile", str(reference)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    model, tokenizer = load_model()
    ours = write_gguf(model, tokenizer, work / f"slimtune-{qtype}.gguf", qtype,
                      source_gguf=default_model_file())  # fmt: skip
    theirs = {t.name: t for t in gguf.GGUFReader(str(reference)).tensors}
    mine = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    same = set(theirs) == set(mine) and all(
        theirs[n].tensor_type == mine[n].tensor_type
        and np.array_equal(
            np.asarray(theirs[n].data).view(np.uint8), np.asarray(mine[n].data).view(np.uint8)
        )  # fmt: skip
        for n in theirs
    )
    print(f"{qtype} export vs llama.cpp's converter: {len(theirs)} tensors, "
          f"{'all byte-identical' if same else 'DIFFERENT'}")  # fmt: skip
    return same


def until_last_answer(messages: list[dict]) -> list[dict]:
    """The messages a prompt is rendered from (as `split_prompt_answer` cuts them)."""
    return messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]


def compare(name: str, answers: list[str], expected: list[str], against: str) -> bool:
    same = sum(a == b for a, b in zip(answers, expected, strict=True))
    print(f"{name}: {same}/{len(expected)} greedy answers equal {against}")
    for got, want in zip(answers, expected, strict=True):
        if got != want:
            print(f"  llama.cpp {got!r}\n  expected  {want!r}")
    return same == len(expected)


def main() -> int:
    from slimtune.data import demo_data_path, read_rows, split_prompt_answer
    from slimtune.data.formats import to_example
    from slimtune.export import export_adapter_gguf, export_merged_gguf
    from slimtune.export.to_gguf import load_gguf_model
    from slimtune.lora import load_adapter
    from slimtune.models import load_model
    from slimtune.models.source import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, type=Path,
                        help="folder with llama-completion (and llama-server)")  # fmt: skip
    parser.add_argument("--adapter", default=None, help="adapter folder (default: a random one)")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--gptq-rows", type=int, default=0,
                        help="also run Q4_K_M rounded by GPTQ on this many demo training rows")  # fmt: skip
    parser.add_argument("--src", type=Path, default=None,
                        help="llama.cpp source (convert_hf_to_gguf.py): compare with its output")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)
    binary, server = args.bin / "llama-completion", args.bin / "llama-server"
    work = Path(tempfile.mkdtemp(prefix="slimtune-gguf-"))
    failed = False
    if args.src is not None:
        failed |= not all(converter_check(args.src, work, qtype) for qtype in ("f16", "q8_0"))
    model, tokenizer = load_model()
    adapter = args.adapter or random_adapter(model, work / "adapter")
    rows = read_rows(demo_data_path("test"))[: args.prompts]
    prompts = [split_prompt_answer(row, tokenizer)[0] for row in rows]
    conversations = [until_last_answer(to_example(row).chat_messages()) for row in rows]
    base_answers = slimtune_answers(model, tokenizer, prompts, args.tokens)
    load_adapter(model, adapter)
    expected = slimtune_answers(model, tokenizer, prompts, args.tokens)
    del model
    print(f"adapter: {adapter}; the adapter changes {sum(a != b for a, b in zip(base_answers, expected, strict=True))}"
          f" of {len(prompts)} answers")  # fmt: skip
    merged = {qtype: export_merged_gguf(None, adapter, work / f"merged-{qtype}.gguf", qtype).files["model"]
              for qtype in ("f32", "q8_0", "q4_0", "q4_k_m")}  # fmt: skip
    # An F32 base (written from the float folder, tokenizer rebuilt from tokenizer.json): with a
    # quantized base llama.cpp rounds activations to 8 bits and near-ties can flip.
    pair = export_adapter_gguf(resolve_model(None), adapter, work / "adapter-gguf", "f32",
                               base_qtype="f32").files  # fmt: skip
    exact_runs = {
        "merged f32": llamacpp_answers(binary, merged["f32"], prompts, args.tokens),
        "base GGUF f32 + adapter GGUF f32": llamacpp_answers(
            binary, pair["base"], prompts, args.tokens, pair["adapter"]
        ),
    }
    for name, answers in exact_runs.items():
        failed |= not compare(name, answers, expected, "slimtune's")
    if server.exists():
        templated, answers = server_answers(server, pair["base"], pair["adapter"], conversations,
                                            args.tokens)  # fmt: skip
        same = sum(a == b for a, b in zip(templated, prompts, strict=True))
        print(f"llama-server chat template (from the base GGUF): {same}/{len(prompts)} prompts "
              "rendered as slimtune renders them")  # fmt: skip
        failed |= same != len(prompts)
        name = "llama-server, base GGUF f32 --lora adapter GGUF f32"
        failed |= not compare(name, answers, expected, "slimtune's")
    else:
        print(f"no {server}: the llama-server check was skipped")
    if args.gptq_rows:
        calibration = read_rows(demo_data_path("train"))[: args.gptq_rows]
        merged["q4_k_m, GPTQ"] = export_merged_gguf(
            None, adapter, work / "merged-q4_k_m-gptq.gguf", "q4_k_m", calibration=calibration
        ).files["model"]
    for qtype in [name for name in merged if name != "f32"]:  # reported only
        own = slimtune_answers(load_gguf_model(merged[qtype]), tokenizer, prompts, args.tokens)
        answers = llamacpp_answers(binary, merged[qtype], prompts, args.tokens)
        compare(f"merged {qtype}", answers, own, "those of the same file read by transformers")
    print("FAILED" if failed else "OK: llama.cpp answers as slimtune does")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
