"""A LoRA adapter as llama.cpp's LoRA GGUF file (what its `convert_lora_to_gguf.py` writes).

`llama-server --lora FILE` and Ollama's `ADAPTER FILE` apply it to an unchanged base GGUF:
- keys: `general.architecture` (the base's), `general.type = "adapter"`,
  `adapter.type = "lora"`, `adapter.lora.alpha` (float32);
- tensors: the base tensor's llama.cpp name plus `.lora_a` (PEFT's `lora_A.weight`, r x in)
  and `.lora_b` (`lora_B.weight`, out x r); for LLaMA the rows of q/k `lora_b` are permuted as
  the base's q/k rows are, so that B @ A lands on the permuted base weight.
llama.cpp scales every layer by alpha / r (r read from the tensor's shape). Layers whose real
scale differs (rsLoRA's alpha / sqrt(r), per-module alpha or rank patterns) get the difference
folded into their `lora_b`, so the file computes exactly what the adapter does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from slimtune.choices import GGUF_ADAPTER_TYPES as TYPES
from slimtune.errors import SlimtuneError
from slimtune.export.gguf import encode, tensor_type
from slimtune.export.gguf_archs import gguf_arch, permute_for_arch, tensor_names
from slimtune.files import atomic_file
from slimtune.lora import load_adapter, lora_layers

ADAPTER = "default"


def adapter_tensors(model: nn.Module, arch: str, adapter_name: str = ADAPTER):
    """(alpha, [(llama.cpp name, float32 array)]) of the adapter `adapter_name` in `model`."""
    config = model.config
    name_of = tensor_names(arch, config.num_hidden_layers)
    layers = [(p, layer) for p, layer in lora_layers(model) if adapter_name in layer.lora_A]
    if not layers:
        raise SlimtuneError(f"adapter {adapter_name!r} has no LoRA layers in this model")
    first = layers[0][1]
    alpha = first.r[adapter_name] * first.scaling[adapter_name]
    tensors = []
    for path, layer in layers:
        if adapter_name in layer.lora_magnitude_vector:
            raise SlimtuneError("llama.cpp's LoRA GGUF has no DoRA: merge this adapter instead")
        if path == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise SlimtuneError(
                "the adapter changes lm_head, which this model ties to its embeddings: llama.cpp "
                "ignores such a LoRA (merge the adapter instead)"
            )
        A = layer.lora_A[adapter_name].weight.detach().float()
        B = layer.lora_B[adapter_name].weight.detach().float()
        factor = layer.scaling[adapter_name] / (alpha / layer.r[adapter_name])
        if abs(factor - 1.0) > 1e-7:
            B = B * factor
        B = permute_for_arch(arch, path + ".weight", B, config)
        name = name_of(path + ".weight")
        tensors.append((name + ".lora_a", np.ascontiguousarray(A.numpy())))
        tensors.append((name + ".lora_b", np.ascontiguousarray(B.numpy())))
    return float(alpha), tensors


def check_adapter_type(qtype: str) -> None:
    if qtype not in TYPES:
        raise SlimtuneError(f"adapter GGUF type {qtype!r}: expected one of {', '.join(TYPES)}")


def write_adapter_gguf(
    model: nn.Module, adapter: str | Path, path: str | Path, qtype: str = "f16"
) -> Path:
    """Load `adapter` (PEFT format) into `model` (the float base) and write it as `path`."""
    import gguf

    check_adapter_type(qtype)
    arch = gguf_arch(model.config)
    load_adapter(model, adapter, ADAPTER)
    alpha, tensors = adapter_tensors(model, arch)
    path = Path(path)

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter).name)
        for name, array in tensors:
            ggml_type = tensor_type(name, array.shape, qtype)
            writer.add_tensor(name, encode(array, ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
