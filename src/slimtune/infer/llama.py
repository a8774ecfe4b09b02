"""A lean forward of LLaMA-family decoders (LLaMA, Mistral without sliding window, Qwen2) over
the transformers model's own modules, with a preallocated KV cache.

transformers' forward builds masks, cache objects and output records on every call; at 135M
parameters that bookkeeping costs more per new token than the matmuls. This forward runs the
same modules (so LoRA wrappers, per-sample adapters and 4-bit layers all apply) with only the
arithmetic: RMSNorm, rotary embedding, grouped-query attention over the cache, the gated MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2")


def supports(model: nn.Module) -> bool:
    """Whether `lean_forward` runs this model exactly as transformers does."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED:
        return False
    # A sliding window limits what attention sees: transformers' masks do that, ours do not.
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return False
    attn = inner.layers[0].self_attn
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")) and (
        not hasattr(attn, "q_norm")
    )


@dataclass
class KVCache:
    """Keys and values of every layer, (batch, kv_heads, capacity, head_dim), filled up to
    `length` columns; rows of a batch share the time axis (left padding, masked)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, model: nn.Module, batch: int, capacity: int, dtype: torch.dtype) -> KVCache:
        config = model.config
        heads = config.num_key_value_heads
        head_dim = _head_dim(config)
        device = model.lm_head.weight.device
        shape = (batch, heads, capacity, head_dim)
        layers = config.num_hidden_layers
        return cls(
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def clear_unwritten(self) -> None:
        """Zero the columns past `length`. A step that attends over the whole capacity
        (`lean_forward`'s `column`) weighs them by zero, and zero times a NaN left in fresh
        memory would still be NaN."""
        for tensor in (*self.keys, *self.values):
            tensor[:, :, self.length :].zero_()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows leave)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Rotary:
    """cos/sin of every position up to the cache capacity, computed once by the model's own
    rotary module (so every rope variant it knows applies)."""

    def __init__(self, model: nn.Module, capacity: int, dtype: torch.dtype):
        positions = torch.arange(capacity, device=model.lm_head.weight.device)[None]
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        cos, sin = model.model.rotary_emb(probe, positions)
        half = cos.shape[-1] // 2
        self.cos = cos[0]  # (capacity, head_dim)
        # sin with its first half negated: rotate_half(x) * sin == roll(x, half) * signed_sin
        # exactly (one roll instead of two slices, a negation and a concatenation).
        self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for positions (batch, t), shaped (batch, 1, t, head_dim)."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, the rotary embedding as transformers applies it."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def norm_eps(module: nn.Module) -> float:
    """The epsilon of an RMSNorm module, under either of the names transformers gives it."""
    return getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, norm_eps(module))
    return module(x)


def attention_mask(valid: torch.Tensor, start: int, t: int) -> torch.Tensor | None:
    """Boolean (batch, 1, t, start + t) mask: causal, and no padded key (`valid`: (batch,
    start + t) bool). A padded query sees itself, so its (unused) output is never NaN."""
    total = start + t
    if (t == 1 or start == 0) and bool(valid.all()):
        return None  # a plain causal prefill (is_causal) or one new token that sees everything
    query = torch.arange(start, total, device=valid.device)[:, None]
    key = torch.arange(total, device=valid.device)[None, :]
    causal = key <= query  # (t, total)
    mask = causal[None] & valid[:, None, :]
    mask |= (key == query)[None]
    return mask[:, None]


@torch.no_grad()
def lean_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    rotary: Rotary,
    mask: torch.Tensor | None,
    column: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of the last position of every row, (batch, vocab) float32; appends the t new
    columns of keys and values to `cache`.

    `column` (a 1-element tensor): one new token per row, written into that column of the cache
    and attending over the whole capacity as `mask` (batch, 1, 1, capacity) allows; the cache's
    `length` is the caller's to keep. Nothing then depends on values the host reads, so the
    step can be captured as a CUDA graph (`cuda_graph.py`)."""
    inner = model.model
    config = model.config
    batch, t = input_ids.shape
    head_dim = _head_dim(config)
    start = cache.length
    stop = start + t if column is None else cache.capacity
    if stop > cache.capacity:
        raise ValueError(f"the KV cache holds {cache.capacity} positions, {stop} needed")
    cos, sin = rotary.at(positions)
    causal_prefill = mask is None and start == 0 and t > 1
    hidden = inner.embed_tokens(input_ids)
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = _rms_norm(layer.input_layernorm, hidden)
        q = attn.q_proj(x).view(batch, t, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, t, -1, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, t, -1, head_dim).transpose(1, 2)
        q = _rotate(q, cos, sin)
        if column is None:
            cache.keys[i][:, :, start:stop] = _rotate(k, cos, sin)
            cache.values[i][:, :, start:stop] = v
        else:
            cache.keys[i].index_copy_(2, column, _rotate(k, cos, sin))
            cache.values[i].index_copy_(2, column, v)
        keys, values = cache.keys[i][:, :, :stop], cache.values[i][:, :, :stop]
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=causal_prefill,
            scale=attn.scaling,
            enable_gqa=keys.shape[1] != q.shape[1],
        )
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, t, -1))
        x = _rms_norm(layer.post_attention_layernorm, hidden)
        mlp = layer.mlp
        hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    if column is None:
        cache.length = stop
    last = _rms_norm(inner.norm, hidden[:, -1])
    return model.lm_head(last).float()
