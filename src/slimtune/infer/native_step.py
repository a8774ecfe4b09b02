"""One stream's decode step in one C call (`llama_step.c`): the lean forward for batch 1 with
nothing between the products but C.

The decode loop calls it for every new token of a single stream whose model it can read:
a LLaMA-family decoder (`llama.supports`) whose block projections are all 4-bit layers the C
kernels read, each with at most one live, plain LoRA adapter (no DoRA, no per-sample
adapters), float32 norms, embeddings and KV cache, SiLU MLP. `NativeDecoder.build` returns
None for anything else and the loop runs the lean forward instead. Results equal the lean
forward's to float rounding (tests/test_native_step.py).
"""

from __future__ import annotations

import ctypes
import subprocess
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import nn

from slimtune.infer.llama import KVCache, Rotary, _head_dim
from slimtune.lora.layer import LoraLinear
from slimtune.quant import Linear4bit, native
from slimtune.quant.gemv import native_layout, native_weight

SOURCE = Path(__file__).with_name("llama_step.c")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


class _Projection(ctypes.Structure):
    _fields_ = [("weight", ctypes.POINTER(native.Weight4)), ("bias", _p), ("lora_a", _p),
                ("lora_b", _p), ("rank", _i64), ("scaling", ctypes.c_float),
                ("bf16", ctypes.c_int)]  # fmt: skip


class _Block(ctypes.Structure):
    _fields_ = [*((name, _Projection) for name in PROJECTIONS), ("input_norm", _p),
                ("post_norm", _p), ("keys", _p), ("values", _p)]  # fmt: skip


class _Decoder(ctypes.Structure):
    _fields_ = [*((name, _i64) for name in ("hidden", "heads", "kv_heads", "head_dim",
                "intermediate", "capacity", "blocks", "max_rank")),
                ("eps", ctypes.c_float), ("attention_scale", ctypes.c_float),
                ("block", ctypes.POINTER(_Block)), ("final_norm", _p)]  # fmt: skip


@cache
def library() -> ctypes.CDLL | None:
    """The step compiled with the 4-bit kernels; None where those are off or cannot build."""
    if native.library() is None:
        return None
    signature = [ctypes.POINTER(_Decoder), _p, _i64, _p, _p, _p, ctypes.c_int]
    try:
        return native.load(sources=(SOURCE,), name="llama_step",
                           signatures={"slim_llama_step": signature})  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"the C decode step did not build ({detail})", stacklevel=2)
        return None


def _float32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu")


class NativeDecoder:
    """The model described to `slim_llama_step` once per decode: pointers to its tensors (kept
    alive here) and to the KV cache's buffers."""

    def __init__(self, model: nn.Module, cache: KVCache, rotary: Rotary, parts: list) -> None:
        self.model, self.cache, self.rotary = model, cache, rotary
        self.lib = library()
        self._keep: list = []
        config, inner = model.config, model.model
        blocks = [self._block(parts_i, layer, i) for i, (parts_i, layer)
                  in enumerate(zip(parts, inner.layers, strict=True))]  # fmt: skip
        self._blocks = (_Block * len(blocks))(*blocks)
        self.hidden = config.hidden_size
        self.struct = _Decoder(
            hidden=self.hidden, heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=_head_dim(config),
            intermediate=config.intermediate_size, capacity=cache.capacity, blocks=len(blocks),
            max_rank=max([1] + [p[3] for block in parts for p in block]),
            eps=_eps(inner.norm), attention_scale=inner.layers[0].self_attn.scaling,
            block=self._blocks, final_norm=inner.norm.weight.data_ptr(),
        )  # fmt: skip
        self.embedding = inner.embed_tokens.weight
        self.out = torch.empty(1, self.hidden)

    @classmethod
    def build(
        cls, model: nn.Module, cache: KVCache, rotary: Rotary, compute_dtype: torch.dtype | None
    ) -> NativeDecoder | None:
        """The decoder for one stream of `model` with `cache` (batch 1), or None where the C
        step does not cover the model (the caller runs the lean forward)."""
        if library() is None or cache.keys[0].shape[0] != 1 or not _plain(model, cache, rotary):
            return None
        parts = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                       mlp.up_proj, mlp.down_proj)  # fmt: skip
            block = [_projection(m, compute_dtype) for m in modules]
            if any(p is None for p in block):
                return None
            parts.append(block)
        return cls(model, cache, rotary, parts)

    def _block(self, parts: list, layer: nn.Module, index: int) -> _Block:
        fields = {name: self._projection(*p) for name, p in zip(PROJECTIONS, parts, strict=True)}
        keys, values = self.cache.keys[index], self.cache.values[index]
        return _Block(**fields, input_norm=layer.input_layernorm.weight.data_ptr(),
                      post_norm=layer.post_attention_layernorm.weight.data_ptr(),
                      keys=keys.data_ptr(), values=values.data_ptr())  # fmt: skip

    def _projection(self, layer: Linear4bit, bias, lora, rank: int, scaling: float, bf16: bool):
        weight = native_weight(layer.weight, layer.quant_state)
        self._keep += [weight, bias, lora]
        a, b = lora if lora else (None, None)
        return _Projection(weight=ctypes.pointer(weight.struct), bias=_ptr(bias), lora_a=_ptr(a),
                           lora_b=_ptr(b), rank=rank, scaling=scaling, bf16=int(bf16))  # fmt: skip

    @torch.no_grad()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Float32 logits (1, vocab) of `token` at `position`, the next free column of the
        cache (its keys and values written there)."""
        if position != self.cache.length:
            raise ValueError(f"position {position} is not the cache's next column")
        row = self.embedding[token]
        status = self.lib.slim_llama_step(
            ctypes.byref(self.struct), row.data_ptr(), position,
            self.rotary.cos[position].data_ptr(), self.rotary.signed_sin[position].data_ptr(),
            self.out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError("the C decode step could not run (a shape the kernels refuse)")
        self.cache.length = position + 1
        return self.model.lm_head(self.out).float()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _plain(model: nn.Module, cache: KVCache, rotary: Rotary) -> bool:
    """Float32 everywhere the C step reads floats, SiLU MLP, one norm epsilon."""
    inner, config = model.model, model.config
    norms = [inner.norm] + [n for layer in inner.layers
                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]  # fmt: skip
    tensors = [inner.embed_tokens.weight, rotary.cos, rotary.signed_sin, *cache.keys,
               *cache.values, *(n.weight for n in norms)]  # fmt: skip
    return (
        type(inner.embed_tokens) is nn.Embedding
        and getattr(config, "hidden_act", None) == "silu"
        and all(_float32(t) and t.is_contiguous() for t in tensors)
        and len({_eps(n) for n in norms}) == 1
        and config.num_attention_heads % config.num_key_value_heads == 0
    )


def _projection(module: nn.Module, compute_dtype: torch.dtype | None):
    """(4-bit layer, float32 bias, (A, B) or None, rank, scaling, bf16 output) of a block
    projection the C step computes, or None."""
    lora, rank, scaling = None, 0, 0.0
    if isinstance(module, LoraLinear):
        if module.sample_groups is not None:
            return None
        live = [] if module.disabled else module._live
        if len(live) > 1 or any(name in module.lora_magnitude_vector for name in live):
            return None
        if live:
            name = live[0]
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            if not (_float32(a) and _float32(b)):
                return None
            lora, rank, scaling = (a.contiguous(), b.contiguous()), a.shape[0], module.scaling[name]
        module = module.base_layer
    if not isinstance(module, Linear4bit) or module.weight.device.type != "cpu":
        return None
    if not native_layout(module.quant_state):
        return None
    dtype = compute_dtype or module.compute_dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    return module, bias, lora, rank, scaling, dtype == torch.bfloat16
