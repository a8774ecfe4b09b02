"""Check `slimtune export` against llama.cpp itself (`make test-gguf`).

SmolLM2 plus a LoRA adapter (the one given, else a random one that changes the answers) is
exported as a merged F32 GGUF and as an F32 adapter GGUF for the unchanged base GGUF; llama.cpp's
`llama-completion` answers the demo task's prompts greedily from both, and the answers must equal
slimtune's own (base + adapter, float32). A Q8_0 merged export is run too and its agreement
reported (llama.cpp computes quantized layers with 8-bit activations, so it is not exact).

    python scripts/test_gguf_llamacpp.py --bin ~/.cache/slimtune/llama.cpp/build/bin [--adapter DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
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


def main() -> int:
    from slimtune.data import demo_data_path, read_rows, split_prompt_answer
    from slimtune.export import export_adapter_gguf, export_merged_gguf
    from slimtune.lora import load_adapter
    from slimtune.models import load_model
    from slimtune.models.source import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, type=Path, help="folder with llama-completion")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: a random one)")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--src", type=Path, default=None,
                        help="llama.cpp source (convert_hf_to_gguf.py): compare with its output")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)
    binary = args.bin / "llama-completion"
    work = Path(tempfile.mkdtemp(prefix="slimtune-gguf-"))
    converter_ok = True
    if args.src is not None:
        converter_ok = all(converter_check(args.src, work, qtype) for qtype in ("f16", "q8_0"))
    model, tokenizer = load_model()
    adapter = args.adapter or random_adapter(model, work / "adapter")
    rows = read_rows(demo_data_path("test"))[: args.prompts]
    prompts = [split_prompt_answer(row, tokenizer)[0] for row in rows]
    base_answers = slimtune_answers(model, tokenizer, prompts, args.tokens)
    load_adapter(model, adapter)
    expected = slimtune_answers(model, tokenizer, prompts, args.tokens)
    del model
    print(f"adapter: {adapter}; the adapter changes {sum(a != b for a, b in zip(base_answers, expected, strict=True))}"
          f" of {len(prompts)} answers")  # fmt: skip
    merged = export_merged_gguf(None, adapter, work / "merged-f32.gguf", "f32").files["model"]
    merged_q8 = export_merged_gguf(None, adapter, work / "merged-q8_0.gguf", "q8_0").files["model"]
    # An F32 base (written from the float folder, tokenizer rebuilt from tokenizer.json): with a
    # quantized base llama.cpp rounds activations to 8 bits and near-ties can flip.
    pair = export_adapter_gguf(resolve_model(None), adapter, work / "adapter-gguf", "f32",
                               base_qtype="f32").files  # fmt: skip
    runs = {
        "merged f32": llamacpp_answers(binary, merged, prompts, args.tokens),
        "base GGUF f32 + adapter GGUF f32": llamacpp_answers(
            binary, pair["base"], prompts, args.tokens, pair["adapter"]
        ),
        "merged q8_0": llamacpp_answers(binary, merged_q8, prompts, args.tokens),
    }
    failed = not converter_ok
    for name, answers in runs.items():
        same = sum(a == b for a, b in zip(answers, expected, strict=True))
        print(f"{name}: {same}/{len(prompts)} greedy answers equal slimtune's")
        for got, want in zip(answers, expected, strict=True):
            if got != want:
                print(f"  llama.cpp {got!r}\n  slimtune  {want!r}")
        failed |= "f32" in name and same != len(prompts)
    print("FAILED" if failed else "OK: llama.cpp answers as slimtune does")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
