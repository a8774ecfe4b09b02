"""Causal LM loss from the final hidden states, without the full fp32 logits.

The logits of a batch are (tokens x vocabulary): 1024 tokens x 49152 words is 200 MB in fp32,
twice that with the softmax kept for the backward pass. We only need them at positions whose
next token is trained (not padding, not the prompt), and only one chunk (512 positions) at a
time: the forward pass computes each chunk's loss *and* its gradient with respect to the hidden
states (softmax minus one-hot, times the output matrix), keeps that small (tokens x hidden)
gradient and drops the chunk's logits. Backward then only scales the stored gradient. No logits
are recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.tokens import IGNORE_INDEX
from slimtune.train.head import chunk_logits, head_weights, in_dtype, logits_buffers


def causal_lm_loss(
    hidden: Tensor,
    lm_head: nn.Module,
    labels: Tensor,
    *,
    reduction: str = "mean",
    chunk_size: int = 512,
) -> Tensor:
    """Cross-entropy of next-token prediction over the positions whose label is not IGNORE_INDEX.

    hidden: (batch, seq, dim) final hidden states; labels: (batch, seq), aligned with the
    inputs (the shift happens here). reduction: "mean" over trained tokens, or "sum" (the
    training loop divides by the global token count itself).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # (n, dim): only the positions that are trained
    y = targets[keep]
    weight, bias = head_weights(lm_head)
    buffers = logits_buffers(lm_head, h, weight, chunk_size)
    total = _ChunkedLinearCrossEntropy.apply(h, weight, bias, y, buffers)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / y.numel() if y.numel() else total
    raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i), with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, buffers: tuple):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        chunk, buffer, narrow = buffers
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], y[start : start + chunk]
            logits = chunk_logits(hc, weight, bias, buffer, narrow)
            # log-sum-exp and softmax from one exp pass, in place over the logits buffer.
            peak = logits.amax(dim=-1, keepdim=True)
            target = logits.gather(1, yc[:, None]).squeeze(1)
            probs = logits.sub_(peak).exp_()
            sums = probs.sum(dim=-1)
            total += (sums.log() + peak.squeeze(1) - target).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum CE)/d logits = softmax - one_hot.
            probs.div_(sums[:, None])
            probs[torch.arange(yc.numel(), device=yc.device), yc] -= 1.0
            if need_h:
                grad_h[start : start + chunk] = (in_dtype(probs, narrow, weight.dtype) @ weight).to(
                    h.dtype
                )
            if need_w:
                grad_w += probs.t() @ hc.float()
            if need_b:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(ctx.dtypes[0]) if grad_w is not None else None
        out_b = (grad_b * scale).to(ctx.dtypes[1]) if grad_b is not None else None
        return out_h, out_w, out_b, None, None
