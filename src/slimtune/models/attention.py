"""Causal self-attention for training on the CPU, in C (`attention.c`), as a transformers
attention implementation.

torch's CPU flash attention is slow at training's shapes (head width 64, a few hundred
positions) and no faster in bfloat16 than in float32. `attention.c` computes the same causal
attention, forward and backward, with float32 products throughout (bfloat16 inputs widen
exactly): the scores, softmax and gradients are float32 sums, the output and gradients are
rounded to the inputs' dtype once.

`use_native_attention(model)` registers it as the model's attention implementation. It runs
where its case holds: a causal pass over a whole sequence with no mask (transformers skips the
mask when nothing is padded), no attention dropout, no soft-capping or sliding window, float32
or bfloat16 CPU tensors, a head width that is a multiple of the kernel's vector block. Any
other call goes to transformers' SDPA attention, unchanged.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.quant import native

SOURCE = Path(__file__).with_name("attention.c")
NAME = "slimtune_causal"  # the attention implementation's name in transformers' registries

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


class _View(ctypes.Structure):
    _fields_ = [("data", _p), ("sequence", _i64), ("head", _i64), ("position", _i64)]


class _Attention(ctypes.Structure):
    _fields_ = [("sequences", _i64), ("heads", _i64), ("kv_heads", _i64), ("length", _i64),
                ("width", _i64), ("scale", ctypes.c_float), ("bf16", ctypes.c_int),
                *((name, _View) for name in ("q", "k", "v", "out", "grad_out", "grad_q",
                                             "grad_k", "grad_v")),
                ("lse", _p)]  # fmt: skip


@cache
def library() -> ctypes.CDLL | None:
    """The attention kernels; None where the C kernels are off or cannot build."""
    signature = [ctypes.POINTER(_Attention), ctypes.c_int]
    signatures = {"slim_attention_forward": signature, "slim_attention_backward": signature,
                  "slim_attention_chunk": []}  # fmt: skip
    return native.companion(SOURCE, "attention", signatures, "the C attention")
    signature = [ctypes.POINTER(_Attention), ctypes.c_int]


def _view(t: Tensor, layout: str = "bhld") -> _View:
    """`t` as the kernel reads it: (sequence, head, position) strides, in elements."""
    b, h, pos = (t.stride(0), t.stride(1), t.stride(2)) if layout == "bhld" else (
        t.stride(0), t.stride(2), t.stride(1))  # fmt: skip
    return _View(t.data_ptr(), b, h, pos)


def _describe(shape: tuple, kv_heads: int, dtype: torch.dtype, scale: float, lse: Tensor,
              **views: _View) -> _Attention:  # fmt: skip
    batch, heads, length, width = shape
    return _Attention(sequences=batch, heads=heads, kv_heads=kv_heads, length=length,
                      width=width, scale=scale, bf16=int(dtype == torch.bfloat16),
                      lse=lse.data_ptr(), **views)  # fmt: skip


def _rows(t: Tensor) -> Tensor:
    """`t` with its last dimension contiguous (the kernel's one requirement on layout)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class CausalAttention(torch.autograd.Function):
    """softmax(scale q k^T + causal mask) v for q (batch, heads, length, width) and k, v
    (batch, kv heads, length, width); the output is (batch, length, heads, width)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        q, k, v = _rows(q), _rows(k), _rows(v)
        batch, heads, length, width = q.shape
        out = q.new_empty(batch, length, heads, width)
        lse = torch.empty(batch, heads, length, dtype=torch.float32)
        call = _describe(q.shape, k.shape[1], q.dtype, scale, lse, q=_view(q), k=_view(k),
                         v=_view(v), out=_view(out, "blhd"))  # fmt: skip
        if library().slim_attention_forward(ctypes.byref(call), torch.get_num_threads()):
            raise ValueError(f"head width {width} is not a multiple of {chunk()}")
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _rows(grad_out.to(q.dtype))
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        call = _describe(q.shape, k.shape[1], q.dtype, ctx.scale, lse, q=_view(q), k=_view(k),
                         v=_view(v), out=_view(out, "blhd"), grad_out=_view(grad_out, "blhd"),
                         grad_q=_view(grad_q), grad_k=_view(grad_k),
                         grad_v=_view(grad_v))  # fmt: skip
        library().slim_attention_backward(ctypes.byref(call), torch.get_num_threads())
        return grad_q, grad_k, grad_v, None


@cache
def chunk() -> int:
    """The head width must be a multiple of this (the kernel's vector block)."""
    lib = library()
    return lib.slim_attention_chunk() if lib is not None else 0


def runs_natively(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> bool:
    """Whether `attention.c` computes this call: the case the module docstring names."""
    dtypes = {q.dtype, k.dtype, v.dtype}
    return (
        mask is None
        and dropout == 0.0
        and q.shape[2] == k.shape[2] > 1
        and q.shape[1] % k.shape[1] == 0
        and len(dtypes) == 1
        and dtypes <= {torch.float32, torch.bfloat16}
        and q.device.type == "cpu"
        and chunk() > 0
        and q.shape[-1] % chunk() == 0
    )


def causal_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """A transformers attention function: the C kernel where it applies, else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = not any(kwargs.get(name) for name in ("softcap", "sliding_window", "position_bias"))
    if causal and plain and runs_natively(query, key, value, attention_mask, dropout):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return CausalAttention.apply(query, key, value, float(scale)), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
        is_causal=is_causal, **kwargs,
    )  # fmt: skip


def use_native_attention(model: nn.Module) -> bool:
    """Make `model` (a transformers model using SDPA) attend through `causal_attention`.
    False, and the model unchanged, where the kernel cannot build or the model uses another
    implementation."""
    config = getattr(model, "config", None)
    if library() is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, causal_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # SDPA's masks: none when unpadded
    model.set_attn_implementation(NAME)
    return True
