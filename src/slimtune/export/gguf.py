"""Write a float model (a merged fine-tune) as one GGUF file that llama.cpp and Ollama run.

The layout is what llama.cpp's `convert_hf_to_gguf.py` writes for the same model: its
architecture's hyper-parameters under `<arch>.*`, tensors under llama.cpp's names (mapped by the
`gguf` package's own tables) with the transforms each architecture needs (`gguf_archs`: LLaMA's
q/k rows permuted, Gemma's norm weights as 1 + w), the tokenizer and its chat template under
`tokenizer.*`. Weights are quantized by the `gguf` package's reference quantizers, the ones
llama.cpp's converter uses:

- `f32`, `f16`, `bf16`: every matrix in that type; `q8_0`: every matrix in Q8_0;
- `q4_0`: the block matrices in Q4_0, the embedding and output matrices in Q8_0 (llama.cpp's
  own quantizer also keeps those two in more bits than the rest).
Vectors (norms, biases) stay float32, as in llama.cpp's converter. A matrix whose rows are not a
multiple of the type's block size falls back to F16, as the converter does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.export.folder import unique_state_dict
from slimtune.export.gguf_archs import gguf_arch, tensor_names, to_gguf_tensor, write_hparams
from slimtune.export.gguf_tokenizer import add_tokenizer
from slimtune.export.gptq import gptq_q4_0
from slimtune.files import atomic_file

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# Matrices kept in Q8_0 under q4_0: they hurt most when rounded (llama.cpp does the same).
KEEP_Q8 = ("token_embd.weight", "output.weight")


def tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str):
    """The GGML type of one tensor under the export type `qtype` (see the module docstring)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    if wanted == T.Q4_0 and gguf_name in KEEP_Q8:
        wanted = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else T.F16


def encode(array: np.ndarray, ggml_type) -> np.ndarray:
    """`array` (float32) in `ggml_type`, as bytes for GGUFWriter (or plain float arrays)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return array
    if ggml_type == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, ggml_type)


def file_type(qtype: str):
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
            "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[qtype]  # fmt: skip


def model_tensors(model: nn.Module, arch: str):
    """(HF name, llama.cpp name, float32 array) of every tensor as llama.cpp stores it
    (`gguf_archs.to_gguf_tensor`); a tied output is left out (llama.cpp then reads the embedding,
    as for models converted by llama.cpp)."""
    config = model.config
    name_of = tensor_names(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in unique_state_dict(model).items():
        if tied and hf_name == "lm_head.weight":
            continue
        if "rotary_emb" in hf_name:
            continue
        tensor = to_gguf_tensor(arch, hf_name, tensor.detach().float(), config)
        yield hf_name, name_of(hf_name), np.ascontiguousarray(tensor.cpu().numpy())


def write_gguf(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    qtype: str = "f16",
    *,
    source_gguf: str | Path | None = None,
    name: str | None = None,
    hessians: dict | None = None,
) -> Path:
    """Write `model` (float weights, no LoRA wrappers) and `tokenizer` as a GGUF file.

    `source_gguf`: the GGUF the base model came from; its tokenizer keys are copied verbatim
    (what llama.cpp already reads for that model) instead of being rebuilt from `tokenizer`.
    `hessians`: {Linear layer path: input Hessian}; with `qtype="q4_0"` those layers' Q4_0
    blocks are rounded with error compensation (`slimtune.export.gptq`), same scales.
    """
    import gguf

    if qtype not in TYPES:
        raise SlimtuneError(f"GGUF type {qtype!r}: expected one of {', '.join(TYPES)}")
    path = Path(path)
    arch = gguf_arch(model.config)

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or path.stem)
        write_hparams(writer, arch, model.config)
        writer.add_file_type(file_type(qtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, model.config, source_gguf)
        for hf_name, gguf_name, array in model_tensors(model, arch):
            ggml_type = tensor_type(gguf_name, array.shape, qtype)
            hessian = (hessians or {}).get(hf_name.removesuffix(".weight"))
            if hessian is not None and ggml_type == gguf.GGMLQuantizationType.Q4_0:
                data = gptq_q4_0(torch.from_numpy(array), hessian)
            else:
                data = encode(array, ggml_type)
            writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
