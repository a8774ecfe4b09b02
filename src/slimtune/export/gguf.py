"""Write a float model (a merged fine-tune) as one GGUF file that llama.cpp and Ollama run.

The layout is what llama.cpp's `convert_hf_to_gguf.py` writes for the same model: its
architecture's hyper-parameters under `<arch>.*`, tensors under llama.cpp's names (mapped by the
`gguf` package's own tables) with the transforms each architecture needs (`gguf_archs`: LLaMA's
q/k rows permuted, Gemma's norm weights as 1 + w), the tokenizer and its chat template under
`tokenizer.*`. Weights are quantized as llama.cpp quantizes them, byte for byte: by the `gguf`
package's reference quantizers (those llama.cpp's converter uses) and, for Q4_K and Q6_K, which
that package cannot write, by `kquants` (a port of llama.cpp's own):

- `f32`, `f16`, `bf16`: every matrix in that type; `q8_0`: every matrix in Q8_0;
- `q4_0`: the block matrices in Q4_0, the embedding and output matrices in Q8_0 (llama.cpp's
  own quantizer also keeps those two in more bits than the rest);
- `q4_k_m`: llama.cpp's Q4_K_M mix, matrix by matrix as `llama-quantize` picks it
  (`q4_k_m_type`).
Vectors (norms, biases) stay float32, as in llama.cpp's converter. A matrix whose rows are not a
multiple of the type's block size falls back to F16, as the converter does (Q4_K_M first tries
the fallbacks `llama-quantize` has).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune.choices import GGUF_TYPES as TYPES
from slimtune.errors import SlimtuneError
from slimtune.export.folder import unique_state_dict
from slimtune.export.gguf_archs import gguf_arch, tensor_names, to_gguf_tensor, write_hparams
from slimtune.export.gguf_tokenizer import add_tokenizer
from slimtune.export.gptq import gguf_gptq_codes
from slimtune.export.kquants import quantize_q4_k, quantize_q6_k
from slimtune.files import atomic_file

# Types whose codes GPTQ can choose (`gguf_codes`): every quantized type of the 4-bit exports.
GPTQ_QTYPES = ("q4_0", "q4_k_m")
GPTQ_TYPES = {"Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}

# Matrices kept in Q8_0 under q4_0: they hurt most when rounded (llama.cpp does the same).
KEEP_Q8 = ("token_embd.weight", "output.weight")


def tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str, n_layers: int = 0,
                tied: bool = False):  # fmt: skip
    """The GGML type of one tensor under the export type `qtype` (see the module docstring);
    `n_layers` and `tied` (the output shares the embedding) matter to `q4_k_m` only."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    if qtype == "q4_k_m":
        return q4_k_m_type(gguf_name, shape[-1], n_layers, tied)
    wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    if wanted == T.Q4_0 and gguf_name in KEEP_Q8:
        wanted = T.Q8_0
    return _fits_or_f16(wanted, shape[-1])


def q4_k_m_type(gguf_name: str, row: int, n_layers: int, tied: bool):
    """The type llama.cpp's `llama-quantize` gives a matrix (rows of length `row`) of an
    `n_layers`-layer model for Q4_K_M (`llama_tensor_get_type`, no importance matrix):
    - the output matrix, and the embedding when the output is tied to it: Q6_K;
    - attn_v and ffn_down: Q6_K in the layers `use_more_bits` picks, else Q4_K;
    - every other matrix, an untied embedding included: Q4_K.
    Q4_K and Q6_K need rows in multiples of 256: an output matrix that is not falls to Q8_0,
    others to the 32-block types llama.cpp falls back to (Q4_K -> Q5_0, Q6_K -> Q8_0), and rows
    that are not a multiple of 32 to F16. Layers are counted from the tensor names; llama.cpp
    counts attn_v and ffn_down tensors in file order, which is layer order here."""
    import gguf

    T = gguf.GGMLQuantizationType
    output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if output:
        wanted = T.Q6_K if row % 256 == 0 else T.Q8_0
    elif "attn_v.weight" in gguf_name or "ffn_down" in gguf_name:
        wanted = T.Q6_K if use_more_bits(_layer_of(gguf_name), n_layers) else T.Q4_K
    else:
        wanted = T.Q4_K
    if row % 256:
        wanted = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}.get(wanted, wanted)
    return _fits_or_f16(wanted, row)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every
    third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _layer_of(gguf_name: str) -> int:
    return int(gguf_name.split(".")[1])  # blk.<layer>.<name>


def _fits_or_f16(ggml_type, row: int):
    import gguf

    block = gguf.GGML_QUANT_SIZES[ggml_type][0]
    return ggml_type if row % block == 0 else gguf.GGMLQuantizationType.F16


def encode(array: np.ndarray, ggml_type) -> np.ndarray:
    """`array` (float32) in `ggml_type`, as bytes for GGUFWriter (or plain float arrays)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return array
    if ggml_type == T.F16:
        return array.astype(np.float16)
    if ggml_type == T.Q4_K:
        return quantize_q4_k(array)
    if ggml_type == T.Q6_K:
        return quantize_q6_k(array)
    return gguf.quants.quantize(array, ggml_type)


def file_type(qtype: str):
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
            "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_k_m": F.MOSTLY_Q4_K_M}[qtype]  # fmt: skip


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
    `hessians`: {Linear layer path: input Hessian}; those layers' quantized blocks (under
    `q4_0` and `q4_k_m`) get codes chosen with error compensation (`slimtune.export.gptq`), the
    quantizer's scales kept.
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
        n_layers = model.config.num_hidden_layers
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        for hf_name, gguf_name, array in model_tensors(model, arch):
            ggml_type = tensor_type(gguf_name, array.shape, qtype, n_layers, tied)
            data = encode(array, ggml_type)
            hessian = (hessians or {}).get(hf_name.removesuffix(".weight"))
            if hessian is not None and ggml_type.name in GPTQ_TYPES:
                data = gguf_gptq_codes(torch.from_numpy(array), hessian, data, ggml_type)
            writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
