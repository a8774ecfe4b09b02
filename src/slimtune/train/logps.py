"""Log-probabilities of each row's answer, summed over its tokens, without the full logits.

Preference losses (DPO, ORPO) need log p(answer | prompt) per row: the sum over the answer's
tokens of log softmax(logits)[next token]. As for the causal LM loss (loss.py), the logits are
made one chunk of 512 positions at a time and only at labelled positions. The forward pass
keeps d logp / d hidden for every token (a tokens x hidden tensor, the logits' size divided by
the vocabulary) so that backward only scales it by each row's upstream gradient. Where the
output layer itself trains (full fine-tuning), backward recomputes each chunk's logits instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.tokens import IGNORE_INDEX
from slimtune.train.forward import decoder_and_head, unmasked_loss
from slimtune.train.head import chunk_logits, head_weights, in_dtype, logits_buffers


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(summed log-probs of the labelled tokens, labelled token count), one value per row.

    batch: right-padded {"input_ids", "attention_mask", "labels"} (labels -100 where not scored).
    """
    body, head = decoder_and_head(model)
    mask = batch["attention_mask"]
    # Without a mask attention takes the causal fast path (and slimtune's C attention).
    hidden = body(
        input_ids=batch["input_ids"],
        attention_mask=None if unmasked_loss(mask, batch["labels"]) else mask,
        use_cache=False,
    ).last_hidden_state
    return labelled_logps(hidden, head, batch["labels"])


def labelled_logps(
    hidden: Tensor, lm_head: nn.Module, labels: Tensor, chunk_size: int = 512
) -> tuple[Tensor, Tensor]:
    """Per row: the sum of log p(labels[t + 1] | up to t) over labelled positions, and their count."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    y = targets[keep]
    weight, bias = head_weights(lm_head)
    buffers = logits_buffers(lm_head, h, weight, chunk_size)
    token = _ChunkedTokenLogps.apply(h, weight, bias, y, buffers)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device)
    return sums.index_add(0, rows, token), keep.sum(dim=1)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h_i @ W^T + b)[y_i] for every i, chunk by chunk."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, buffers: tuple):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        recompute = need_w or need_b  # gradients of W depend on each token's upstream gradient
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        unit = torch.empty_like(h) if need_h and not recompute else None
        chunk, buffer, narrow = buffers
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], y[start : start + chunk]
            probs, logp = _softmax_and_logp(hc, weight, bias, yc, buffer, narrow)
            out[start : start + chunk] = logp
            if unit is not None:
                # d logp / d h = (one_hot - softmax) @ W
                probs.neg_()
                probs[torch.arange(yc.numel(), device=yc.device), yc] += 1.0
                unit[start : start + chunk] = (in_dtype(probs, narrow, weight.dtype) @ weight).to(
                    h.dtype
                )
        ctx.buffers, ctx.flags = buffers, (need_h, need_w, need_b)
        if recompute:
            ctx.save_for_backward(h, weight, bias, y)
        else:
            ctx.save_for_backward(unit)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        need_h, need_w, need_b = ctx.flags
        if not (need_w or need_b):
            (unit,) = ctx.saved_tensors
            grad_h = unit * grad_out[:, None].to(unit.dtype) if unit is not None else None
            return grad_h, None, None, None, None
        h, weight, bias, y = ctx.saved_tensors
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        chunk, buffer, narrow = ctx.buffers
        for start in range(0, h.shape[0], chunk):
            end = start + chunk
            hc, yc = h[start:end], y[start:end]
            probs, _ = _softmax_and_logp(hc, weight, bias, yc, buffer, narrow)
            # d (g * logp) / d logits = g * (one_hot - softmax)
            probs.neg_()
            probs[torch.arange(yc.numel(), device=yc.device), yc] += 1.0
            probs.mul_(grad_out[start:end, None].float())
            if need_h:
                grad_h[start:end] = (in_dtype(probs, narrow, weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w += probs.t() @ hc.float()
            if need_b:
                grad_b += probs.sum(0)
        out_w = grad_w.to(weight.dtype) if grad_w is not None else None
        out_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, out_w, out_b, None, None


def _softmax_and_logp(
    hc: Tensor, weight: Tensor, bias: Tensor | None, yc: Tensor, buffer, narrow
) -> tuple[Tensor, Tensor]:
    """(softmax of the chunk's logits, in place over them; log p of the targets)."""
    logits = chunk_logits(hc, weight, bias, buffer, narrow)
    peak = logits.amax(dim=-1, keepdim=True)
    target = logits.gather(1, yc[:, None]).squeeze(1)
    probs = logits.sub_(peak).exp_()
    sums = probs.sum(dim=-1)
    logp = target - peak.squeeze(1) - sums.log()
    return probs.div_(sums[:, None]), logp
