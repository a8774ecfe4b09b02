"""The output layer's products for the losses (slimtune.train.loss, slimtune.train.logps):
its weight in the compute dtype and the (chunk x vocabulary) logits buffers, both kept on the
layer between steps, and one chunk's logits into them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.buffers import empty_large


def head_weights(lm_head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output layer's weight and bias, in its `compute_dtype` where one is set and the layer
    is frozen (slimtune.train.precision): the product then runs in that dtype, the softmax in
    float32. The cast copy is kept on the layer (a fresh 57 MB one per step for SmolLM2 costs its
    page faults every time) and made again whenever the weights change."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    dtype = getattr(lm_head, "compute_dtype", None)
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if dtype is None or dtype == weight.dtype or not frozen:
        return weight, bias
    key = (weight.data_ptr(), weight._version, dtype)
    cached = getattr(lm_head, "_slimtune_cast_weight", None)
    if cached is None or cached[0] != key:
        cast = empty_large(weight.shape, dtype, weight.device).copy_(weight)
        lm_head._slimtune_cast_weight = cached = (key, cast)
    return cached[1], None if bias is None else bias.to(dtype)


def logits_buffers(lm_head: nn.Module, h: Tensor, weight: Tensor, chunk: int) -> tuple:
    """(chunk, float32 logits buffer, buffer in the head's dtype): the (chunk x vocabulary)
    buffers every chunk reuses, the second only for a bfloat16/float16 head (its product before
    widening, its softmax narrowed again for the gradient). On the CPU they are kept on the
    layer between calls: fresh ones cost their page faults again each step.
    `release_loss_buffers` drops them."""
    if h.device.type != "cpu":
        return chunk, None, None
    rows, vocab = min(chunk, h.shape[0]), weight.shape[0]
    cached = getattr(lm_head, "_slimtune_loss_buffers", None)
    if cached is None or cached[0] != (vocab, weight.dtype) or cached[1].shape[0] < rows:
        narrow = None
        if weight.dtype != torch.float32:
            narrow = empty_large((rows, vocab), weight.dtype, h.device)
        cached = (
            (vocab, weight.dtype),
            empty_large((rows, vocab), torch.float32, h.device),
            narrow,
        )
        lm_head._slimtune_loss_buffers = cached
    return chunk, cached[1], cached[2]


def release_loss_buffers(lm_head: nn.Module) -> None:
    """Drop what `causal_lm_loss` keeps on the output layer between calls."""
    for name in ("_slimtune_loss_buffers", "_slimtune_cast_weight"):
        if hasattr(lm_head, name):
            delattr(lm_head, name)


def in_dtype(probs: Tensor, narrow: Tensor | None, dtype: torch.dtype) -> Tensor:
    """`probs` in `dtype`: written into the narrow buffer where there is one."""
    return probs.to(dtype) if narrow is None else narrow[: probs.shape[0]].copy_(probs)


def chunk_logits(hc: Tensor, weight: Tensor, bias: Tensor | None, buffer, narrow):
    hc = hc.to(weight.dtype)
    if buffer is None:
        return F.linear(hc, weight, bias).float()
    out = buffer[: hc.shape[0]]
    if narrow is not None:
        # The product in the head's dtype, widened: the softmax runs in float32.
        product = narrow[: hc.shape[0]]
        if bias is None:
            torch.mm(hc, weight.t(), out=product)
        else:
            torch.addmm(bias, hc, weight.t(), out=product)
        return out.copy_(product)
    if bias is None:
        return torch.mm(hc, weight.t(), out=out)
    return torch.addmm(bias, hc, weight.t(), out=out)
