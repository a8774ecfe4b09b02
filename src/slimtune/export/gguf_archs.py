"""What each architecture needs in a GGUF file for llama.cpp to compute what transformers does.

As llama.cpp's `convert_hf_to_gguf.py` writes them (its LlamaModel, Qwen2Model, Gemma3Model):

- llama: q/k rows permuted into llama.cpp's rotary order (it rotates interleaved pairs);
- qwen2: q/k/v biases, no permutation (rotary halves, as transformers); no sliding window;
- gemma3: every RMSNorm weight stored as 1 + w (Gemma's norm multiplies by 1 + w, llama.cpp's by
  the stored weight); `<arch>.attention.sliding_window`; no permutation. The embedding scale
  (sqrt(hidden)) and the tied output are llama.cpp's own graph, no tensor carries them.

llama.cpp also fixes some Gemma 3 settings instead of reading them (every sixth layer global,
the others sliding-window with RoPE base 10000, queries scaled by 1/sqrt(head_dim)): a model that
differs is refused rather than written as a file that runs differently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimtune.errors import SlimtuneError

# model_type in the HF config -> llama.cpp architecture name, for the models written here.
ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
# llama.cpp's gemma3 (llama-model.cpp): the layer pattern and sliding layers' RoPE base it fixes.
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


def gguf_arch(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise SlimtuneError(
            f"GGUF export supports model types {', '.join(ARCHS)}; this model is {model_type!r}"
        )
    return ARCHS[model_type]


def llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k rows (`LlamaModel.permute` of its converter): within
    each head, the two rotated halves are interleaved."""
    shape = weight.shape
    return (
        weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def permute_for_arch(arch: str, name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """`tensor` (an HF weight, bias or LoRA B) in the row order llama.cpp expects for `name`."""
    if arch != "llama":
        return tensor
    if ".self_attn.q_proj." in name:
        return llama_permute(tensor, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return llama_permute(tensor, config.num_key_value_heads)
    return tensor


def to_gguf_tensor(arch: str, name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """The HF tensor `name` as llama.cpp stores it (see the module docstring)."""
    tensor = permute_for_arch(arch, name, tensor, config)
    if arch == "gemma3" and name.endswith("norm.weight"):
        tensor = tensor + 1.0
    return tensor


def tensor_names(arch: str, n_blocks: int) -> Callable[[str], str]:
    """HF parameter name -> llama.cpp tensor name, from the `gguf` package's mapping tables."""
    import gguf

    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    table = gguf.get_tensor_name_map(arch_id, n_blocks)

    def name(hf_name: str) -> str:
        mapped = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise SlimtuneError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} ({arch})")
        return mapped

    return name


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The RoPE settings of the model (or of its `layer_type` layers, where they differ)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None:
        rope = dict(rope.get(layer_type) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None))
    return rope


def write_hparams(writer, arch: str, config) -> None:
    """The `<arch>.*` keys llama.cpp reads, from the HF config (as its converter derives them),
    after checking that llama.cpp's graph for `arch` computes what the model does."""
    if arch in CHECKS:
        CHECKS[arch](config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # Gemma 3's global layers carry the file's RoPE base; its sliding ones use llama.cpp's fixed one.
    rope = rope_parameters(config, "full_attention" if arch == "gemma3" else None)
    if rope["rope_theta"] is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type", "default") not in ("default", None):
        raise SlimtuneError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)


def check_qwen2(config) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise SlimtuneError(
            "GGUF export: llama.cpp's qwen2 has no sliding-window layers; this model uses them"
        )


def check_gemma3(config) -> None:
    """Refuse what llama.cpp's gemma3 would compute differently (see the module docstring)."""
    n_layers = config.num_hidden_layers
    pattern = [
        "full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
        for i in range(n_layers)
    ]
    # llama.cpp's query scale: 1/sqrt(head_dim), except Gemma 3 27B (62 layers).
    scalar = (
        config.hidden_size // config.num_attention_heads if n_layers == 62 else head_dim(config)
    )
    local = rope_parameters(config, "sliding_attention")
    assumptions = {
        "a global layer every sixth, sliding-window layers between": list(config.layer_types)
        == pattern,
        "a sliding window": config.sliding_window is not None,
        f"queries scaled by 1/sqrt({scalar})": config.query_pre_attn_scalar == scalar,
        f"RoPE base {GEMMA3_LOCAL_ROPE_THETA:g} without scaling in sliding layers": (
            local.get("rope_type", "default") == "default"
            and local["rope_theta"] == GEMMA3_LOCAL_ROPE_THETA
        ),
        "no logit soft-capping": config.attn_logit_softcapping is None
        and config.final_logit_softcapping is None,
        "a GELU-tanh gated MLP": config.hidden_activation == "gelu_pytorch_tanh",
        "causal attention": not getattr(config, "use_bidirectional_attention", False),
    }
    missing = [what for what, holds in assumptions.items() if not holds]
    if missing:
        raise SlimtuneError(
            "GGUF export: llama.cpp's gemma3 assumes " + "; ".join(missing)
            + ", which this model does not have"
        )  # fmt: skip


CHECKS = {"qwen2": check_qwen2, "gemma3": check_gemma3}
