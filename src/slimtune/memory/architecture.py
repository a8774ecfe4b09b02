"""The shapes the planner needs, from a built-in name, a config.json, a model folder or a GGUF file.

Decoder-only transformers: an embedding, `num_layers` blocks of attention (q, k, v, o) and a
gated MLP (gate, up, down), a final norm and an output layer, tied to the embedding or not. The
LLaMA family (LLaMA 1/2/3, Mistral, Qwen2/2.5, SmolLM2) is the plain case; the variations are
fields: Phi-3 fuses q/k/v and gate/up into one layer each, Gemma 3 adds q/k norms and two more
norms per block, and a mixture of experts (Mixtral, Qwen2-MoE) has `num_experts` gated MLPs of
`moe_intermediate_size` per block, `experts_per_token` of them per token, plus, for Qwen2-MoE, a
shared expert with its sigmoid gate. slimtune holds each expert as its own layers
(slimtune.models.experts), named here `experts.gate_up_proj` and `experts.down_proj`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.targets import pattern_value


@dataclass(frozen=True)
class Architecture:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj
    qk_norm: bool = False  # Gemma 3: RMSNorms of each query and key head
    block_norms: int = 2  # Gemma 3: 4 (pre and post attention, pre and post MLP)
    gated_lean: bool = True  # the lean MLP applies (gate_proj/up_proj with SiLU or GELU)
    num_experts: int = 0  # a mixture of experts, from here on
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_size: int = 0  # Qwen2-MoE's shared expert (with a 1-output gate)
    # The checkpoint stores float32 tensors (a float32 folder, or a GGUF, which slimtune
    # converts to one): the 4-bit loader then keeps the tensors it does not quantize as memory
    # maps of the file (slimtune.models.streaming), resident only once read.
    float32_checkpoint: bool = False

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def block_linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linear layers of one block; an expert's
        layers once per expert."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        if self.fused:
            attention = [("qkv_proj", h, q + 2 * kv), ("o_proj", q, h)]
        else:
            attention = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)]
        if self.num_experts:
            m, s = self.moe_intermediate_size, self.shared_expert_size
            mlp = [("experts.gate_up_proj", h, 2 * m), ("experts.down_proj", m, h)]
            mlp *= self.num_experts
            if s:
                mlp += [("gate_proj", h, s), ("up_proj", h, s), ("down_proj", s, h)]
                mlp += [("shared_expert_gate", h, 1)]
        elif self.fused:
            mlp = [("gate_up_proj", h, 2 * i), ("down_proj", i, h)]
        else:
            mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
        return attention + mlp

    def block_linear_params(self) -> int:
        return sum(a * b for _, a, b in self.block_linears())

    def other_block_params(self) -> int:
        """Norm weights, biases and the router of one block (not quantized)."""
        kv = self.num_kv_heads * self.head_size
        bias = self.num_heads * self.head_size + 2 * kv if self.qkv_bias else 0
        norms = self.block_norms * self.hidden_size + (2 * self.head_size if self.qk_norm else 0)
        return norms + bias + self.num_experts * self.hidden_size

    def mlp_width(self) -> int:
        """Intermediate values per token in one block's MLP: the experts a token visits and
        the shared expert, or the dense MLP."""
        if self.num_experts:
            return self.experts_per_token * self.moe_intermediate_size + self.shared_expert_size
        return self.intermediate_size

    def embedding_params(self) -> int:
        """Input embedding, output layer (unless tied) and the final norm."""
        tables = 1 if self.tie_embeddings else 2
        return tables * self.vocab_size * self.hidden_size + self.hidden_size

    def num_params(self) -> int:
        per_block = self.block_linear_params() + self.other_block_params()
        return self.num_layers * per_block + self.embedding_params()


def _a(name, vocab, hidden, inter, layers, heads, kv, tie=False, bias=False) -> Architecture:
    return Architecture(name, vocab, hidden, inter, layers, heads, kv, None, tie, bias)


# Shapes from each model's published config.json.
BUILTIN: dict[str, Architecture] = {
    a.name: a
    for a in [
        _a("llama-7b", 32000, 4096, 11008, 32, 32, 32),
        _a("llama-13b", 32000, 5120, 13824, 40, 40, 40),
        _a("llama-33b", 32000, 6656, 17920, 60, 52, 52),
        _a("llama-65b", 32000, 8192, 22016, 80, 64, 64),
        _a("llama-2-7b", 32000, 4096, 11008, 32, 32, 32),
        _a("llama-2-13b", 32000, 5120, 13824, 40, 40, 40),
        _a("llama-2-70b", 32000, 8192, 28672, 80, 64, 8),
        _a("llama-3-8b", 128256, 4096, 14336, 32, 32, 8),
        _a("llama-3-70b", 128256, 8192, 28672, 80, 64, 8),
        _a("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8),
        _a("llama-3.1-70b", 128256, 8192, 28672, 80, 64, 8),
        _a("llama-3.2-1b", 128256, 2048, 8192, 16, 32, 8, tie=True),
        _a("llama-3.2-3b", 128256, 3072, 8192, 28, 24, 8, tie=True),
        _a("mistral-7b", 32000, 4096, 14336, 32, 32, 8),
        _a("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, tie=True, bias=True),
        _a("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, tie=True, bias=True),
        _a("qwen2.5-3b", 151936, 2048, 11008, 36, 16, 2, tie=True, bias=True),
        _a("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, bias=True),
        _a("qwen2.5-14b", 152064, 5120, 13824, 48, 40, 8, bias=True),
        _a("qwen2.5-32b", 152064, 5120, 27648, 64, 40, 8, bias=True),
        _a("qwen2.5-72b", 152064, 8192, 29568, 80, 64, 8, bias=True),
        _a("smollm2-135m", 49152, 576, 1536, 30, 9, 3, tie=True),
        _a("smollm2-360m", 49152, 960, 2560, 32, 15, 5, tie=True),
        _a("smollm2-1.7b", 49152, 2048, 8192, 24, 32, 32, tie=True),
        *[Architecture(n, 262144, h, i, layers, 4, 1, 256, True, qk_norm=True, block_norms=4)
          for n, h, i, layers in [("gemma-3-270m", 640, 2048, 18), ("gemma-3-1b", 1152, 6912, 26)]],
        Architecture("phi-3-mini", 32064, 3072, 8192, 32, 32, 32, fused=True, gated_lean=False),
        Architecture("mixtral-8x7b", 32000, 4096, 14336, 32, 32, 8, num_experts=8,
                     experts_per_token=2, moe_intermediate_size=14336),
        Architecture("qwen1.5-moe-a2.7b", 151936, 2048, 5632, 24, 16, 16, qkv_bias=True,
                     num_experts=60, experts_per_token=4, moe_intermediate_size=1408,
                     shared_expert_size=5632),
    ]
}  # fmt: skip


def builtin_architecture(name: str) -> Architecture:
    key = name.lower()
    if key not in BUILTIN:
        raise SlimtuneError(
            f"unknown model {name!r}: give a model folder, a config.json, a .gguf file, "
            f"or one of: {', '.join(BUILTIN)}"
        )
    return BUILTIN[key]


def architecture_from_config(config: dict, name: str = "config") -> Architecture:
    """From the keys of a transformers config.json (LLaMA-family names)."""
    keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ]
    missing = [k for k in keys if k not in config]
    if missing:
        raise SlimtuneError(
            f"{name}: not a LLaMA-family config (model_type {config.get('model_type')!r}); "
            f"missing {', '.join(missing)}"
        )
    heads = int(config["num_attention_heads"])
    kind = str(config.get("model_type", ""))
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    gemma = kind.startswith("gemma")
    return Architecture(
        name=name,
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=config.get("head_dim"),
        tie_embeddings=bool(config.get("tie_word_embeddings", gemma)),
        qkv_bias=bool(config.get("attention_bias", kind in ("qwen2", "qwen2_moe"))),
        fused=kind == "phi3",
        qk_norm=kind.startswith(("gemma3", "qwen3")),
        block_norms=4 if gemma else 2,
        gated_lean=kind != "phi3",
        float32_checkpoint=str(config.get("dtype") or config.get("torch_dtype")) == "float32",
        num_experts=experts,
        experts_per_token=int(config.get("num_experts_per_tok") or 0) if experts else 0,
        moe_intermediate_size=int(
            config.get("moe_intermediate_size") or config["intermediate_size"]
        )
        if experts
        else 0,
        shared_expert_size=int(config.get("shared_expert_intermediate_size") or 0),
    )


def architecture_from_gguf(path: Path) -> Architecture:
    """From a GGUF file's metadata (read lazily: the tensors are not loaded)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str):
        field = reader.fields.get(key)
        if field is None:
            raise SlimtuneError(f"{path}: GGUF metadata has no {key!r}")
        return field.contents()

    arch = value("general.architecture")
    heads = int(value(f"{arch}.attention.head_count"))
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    names = {t.name for t in reader.tensors}

    def optional(key: str) -> int:
        field = reader.fields.get(f"{arch}.{key}")
        return int(field.contents()) if field is not None else 0

    experts = optional("expert_count")
    return Architecture(
        name=path.name,
        vocab_size=len(value("tokenizer.ggml.tokens")),
        hidden_size=int(value(f"{arch}.embedding_length")),
        intermediate_size=int(value(f"{arch}.feed_forward_length")),
        num_layers=int(value(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(kv.contents()) if kv is not None else heads,
        head_dim=optional("attention.key_length") or None,
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        fused="blk.0.attn_qkv.weight" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        block_norms=4 if "blk.0.post_ffw_norm.weight" in names else 2,
        gated_lean=arch != "phi3",
        float32_checkpoint=True,  # slimtune loads a GGUF from its float32 conversion
        num_experts=experts,
        experts_per_token=optional("expert_used_count"),
        moe_intermediate_size=optional("expert_feed_forward_length"),
        shared_expert_size=optional("expert_shared_feed_forward_length"),
    )


def resolve_architecture(source: str) -> Architecture:
    """A built-in name, a model folder (config.json or one .gguf), a config.json, or a .gguf."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            path = path / "config.json"
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise SlimtuneError(
                    f"{source}: a model folder needs a config.json or one .gguf file"
                )
            path = ggufs[0]
    if path.is_file():
        if path.suffix == ".gguf":
            return architecture_from_gguf(path)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SlimtuneError(f"{path}: cannot read as a JSON config: {error}") from None
        return architecture_from_config(config, name=str(source))
    return builtin_architecture(source)


def lora_targets(arch: Architecture, targets: str | list[str]) -> list[tuple[str, int, int]]:
    """The block linears that get an adapter: 'all-linear', a list of names, or a regex."""
    linears = arch.block_linears()
    if targets == "all-linear":
        chosen = linears
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [
            x
            for x in linears
            if pattern.fullmatch(f"model.layers.0.x.{x[0]}") or pattern.search(x[0])
        ]
    else:
        # a list of names, and for experts PEFT's target_parameters names (experts.down_proj)
        chosen = [x for x in linears if x[0] in targets or x[0].rpartition(".")[2] in targets
                  and not x[0].startswith("experts.")]  # fmt: skip
    if not chosen:
        names = ", ".join(name for name, _, _ in linears)
        raise SlimtuneError(f"targets: {targets!r} matches none of this model's layers ({names})")
    return chosen


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


def adapter_ranks(
    arch: Architecture, targets: str | list[str], rank: int, rank_pattern: dict[str, int]
) -> list[tuple[str, int, int, list[int]]]:
    """(name, in, out, rank in each block) of the block linears that get an adapter: `rank`,
    or the first of `rank_pattern` matching the layer's path (LLaMA-family paths). Experts
    take `rank` whatever the patterns, as slimtune.lora.inject_adapter gives them."""
    shapes = []
    for name, n_in, n_out in lora_targets(arch, targets):
        parent = "self_attn" if name in ATTENTION else "mlp"
        ranks = [
            rank
            if name.startswith("experts.")
            else pattern_value(rank_pattern, f"model.layers.{i}.{parent}.{name}", rank)
            for i in range(arch.num_layers)
        ]
        shapes.append((name, n_in, n_out, ranks))
    return shapes
