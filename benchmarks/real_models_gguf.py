"""Gemma 3 270M and Qwen2.5-Coder-0.5B merged with an adapter, exported as GGUF, read back by
transformers' GGUF reader: the same greedy tokens as slimtune's merged model?

    python benchmarks/real_models_gguf.py [--models gemma3 qwen2] [--types f16 q8_0]
        [--prompts 5] [--tokens 16] [--out report.json]

For each model (fetched as `real_models.py` does): a seeded random LoRA adapter (rank 8, every
linear layer of the blocks, B large enough to change the answers), merged by slimtune into the
float model and written as GGUF (`write_gguf`, the source GGUF's tokenizer keys carried over).
transformers' GGUF reader, an implementation independent of the writer, loads each file and
generates greedily on prompts of the demo test set; its tokens are compared with slimtune's
merged model (for f16 and q8_0: with every matrix rounded as the file stores it, and unrounded).
The export is also set beside the source GGUF, which llama.cpp's converter wrote: the `<arch>.*`
keys, the tensor names, and the stored float32 vectors (norms, biases), which the adapter leaves
as they were, so that Gemma's 1 + w norm convention is checked against llama.cpp's own files.
One model at a time, in this process; prints one JSON line per stage.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from real_models import CHAT_TEMPLATE, fetch


def note(record: dict, key: str, value) -> None:
    record[key] = value
    print(json.dumps({"model": record["model"], key: value}, default=str), flush=True)


def random_adapter(gguf: Path, folder: Path, seed: int = 0) -> Path:
    """A rank-8 LoRA adapter on every block linear layer with random B (std `0.02`)."""
    from slimtune.lora import LoraConfig, inject_adapter, save_adapter
    from slimtune.models import load_model

    model, _ = load_model(gguf)
    model = inject_adapter(model, LoraConfig(r=8, alpha=16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    save_adapter(model, folder)
    return folder


def prompts(tokenizer, n: int) -> list[list[int]]:
    """The first `n` demo test prompts, rendered by the model's chat template (the template
    fine-tunes of a base model without one train with)."""
    from slimtune.data import demo_data_path, read_rows, split_prompt_answer

    rows = read_rows(demo_data_path("test"))[:n]
    texts = [split_prompt_answer(row, tokenizer)[0] for row in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def greedy(model, ids: list[list[int]], tokens: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for prompt in ids:
            x = torch.tensor([prompt])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
            out.append(y[0, x.shape[1] :].tolist())
    return out


def rounded_as_stored(model, qtype: str):
    """`model` with every matrix rounded as a `qtype` file stores it (gguf's reference codecs)."""
    import gguf

    from slimtune.export.gguf import encode, tensor_type

    T = gguf.GGMLQuantizationType
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.dim() != 2:
                continue
            array = param.detach().float().numpy()
            kind = tensor_type(names.get(name, name), array.shape, qtype)
            data = encode(array, kind)
            if kind not in (T.F32, T.F16):
                data = gguf.quants.dequantize(data, kind)
            param.copy_(torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(array.shape)))
    return rounded


def against_source(source: Path, exported: Path, arch: str) -> dict:
    """The export beside the GGUF llama.cpp's converter wrote for the same model."""
    import gguf

    theirs, ours = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(exported))

    def keys(reader):
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}

    k_theirs, k_ours = keys(theirs), keys(ours)
    t_theirs = {t.name: t for t in theirs.tensors}
    t_ours = {t.name: t for t in ours.tensors}
    vector_diff = 0.0
    vectors = 0
    for name, tensor in t_theirs.items():
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 1:
            mine = np.asarray(t_ours[name].data, dtype=np.float32)
            diff = np.abs(mine - np.asarray(tensor.data, dtype=np.float32)).max()
            vector_diff = max(vector_diff, float(diff))
            vectors += 1
    return {
        "keys_only_in_source": sorted(set(k_theirs) - set(k_ours)),
        "keys_only_in_export": sorted(set(k_ours) - set(k_theirs)),
        "keys_differing": {
            k: [k_theirs[k], k_ours[k]]
            for k in set(k_theirs) & set(k_ours)
            if not np.isclose(np.asarray(k_theirs[k], dtype=float), k_ours[k]).all()
        },
        "same_tensor_names": sorted(t_theirs) == sorted(t_ours),
        "f32_vectors_compared": vectors,
        "f32_vectors_max_abs_diff": vector_diff,
    }


def one_model(model: str, types: list[str], n_prompts: int, tokens: int, work: Path) -> dict:
    from slimtune.export import write_gguf
    from slimtune.export.to_gguf import load_gguf_model, merged_model
    from slimtune.models import load_model
    from slimtune.models.chat_templates import set_chat_template

    gguf_path = fetch(model)
    record: dict = {"model": model, "gguf": str(gguf_path)}
    adapter = random_adapter(gguf_path, work / f"{model}-lora")
    merged, tokenizer, layers, _ = merged_model(gguf_path, adapter)
    tokenizer = set_chat_template(tokenizer, CHAT_TEMPLATE[model])  # written into the GGUF too
    arch = {"gemma3_text": "gemma3"}.get(merged.config.model_type, merged.config.model_type)
    ids = prompts(tokenizer, n_prompts)
    note(record, "prompts", [len(p) for p in ids])
    ours = greedy(merged, ids, tokens)
    base, _ = load_model(gguf_path)
    base_tokens = greedy(base, ids, tokens)
    del base
    gc.collect()
    changed = sum(a != b for a, b in zip(ours, base_tokens, strict=True))
    note(record, "merged", {"layers": layers, "answers_changed_by_adapter": changed})
    note(record, "answers", [tokenizer.decode(t) for t in ours])
    for qtype in types:
        path = work / f"{model}-{qtype}.gguf"
        start = time.perf_counter()
        write_gguf(merged, tokenizer, path, qtype, source_gguf=gguf_path)
        written = time.perf_counter() - start
        check = against_source(gguf_path, path, arch)
        start = time.perf_counter()
        loaded = load_gguf_model(path)
        read = time.perf_counter() - start
        theirs = greedy(loaded, ids, tokens)
        del loaded
        gc.collect()
        stored = rounded_as_stored(merged, qtype) if qtype != "f32" else merged
        as_stored = greedy(stored, ids, tokens)
        del stored
        gc.collect()
        note(record, qtype, {
            "file_bytes": path.stat().st_size, "write_seconds": round(written, 1),
            "read_seconds": round(read, 1),
            "equal_to_merged": sum(a == b for a, b in zip(theirs, ours, strict=True)),
            "equal_to_merged_rounded_as_stored": sum(a == b for a, b in zip(theirs, as_stored, strict=True)),
            "prompts": len(ids), "against_source": check,
        })  # fmt: skip
        path.unlink()
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return record


def main() -> None:
    from slimtune.hardware import machine_record, machine_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3", "qwen2"])
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(json.dumps({"machine": machine_summary()}), flush=True)
    results = {"machine": machine_record(), "models": []}
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            record = one_model(model, args.types, args.prompts, args.tokens, Path(work))
            results["models"].append(record)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
