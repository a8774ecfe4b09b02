"""Helpers (no tests): tiny causal LMs of each architecture slimtune supports, built from their
transformers configs, and saved as model folders with the character tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

# Shapes shared by all: small enough for a unit test, with grouped KV heads, every dimension a
# multiple of the 64-value quantization block.
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.3,  # confident logits, so that a few steps visibly change them
    bos_token_id=1,
    eos_token_id=4,  # the char tokenizer's <|im_end|>
    pad_token_id=0,
    tie_word_embeddings=False,
)

# model_type -> (config class, model class, settings over COMMON), from transformers' names.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # biased q/k/v
    # q/k norms, GELU-tanh gated MLP, sliding-window layers, one shared KV head, tied embeddings
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj and gate_up_proj
    # experts stored as 3-D parameters (gate_up_proj, down_proj), a top-2 router
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        ),
    ),
}


def make_tiny(arch: str, seed: int = 0, **overrides):
    """A tiny model of architecture `arch` (a key of ARCHITECTURES), random weights from `seed`."""
    import transformers

    config_name, model_name, settings = ARCHITECTURES[arch]
    values = {**COMMON, **settings, **overrides}
    config = getattr(transformers, config_name)(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    if arch == "qwen2_moe":
        # transformers starts the router at zero (all experts tie): give it a real choice.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.3)
    return model.eval()


def save_tiny(arch: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """`make_tiny(arch)` plus the character tokenizer (ChatML template), as an HF folder."""
    from test_serve_support import make_char_tokenizer

    model = make_tiny(arch, seed, **overrides)
    tokenizer = make_char_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
