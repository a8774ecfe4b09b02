"""Sums across ranks: token counts, losses, and the gradients of the trainable parameters.

Data parallel training here is *gradient summation* with a *global* normaliser: each rank
sums the loss over its own trained tokens and divides by the number of trained tokens of
all ranks together (from `all_reduce_sum`), so after `all_reduce_gradients` sums the
gradients every rank holds exactly the gradient a single process would compute on the whole
global batch. (A mean of per-rank means would weight a token on a short shard more than a
token on a long one.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from slimtune.dist.info import DistInfo

# Gradients travel in flat buckets of about this many bytes: few collective calls, bounded
# extra memory (LoRA gradients are small; one bucket usually holds them all).
BUCKET_BYTES = 32 * 1024 * 1024


def all_reduce_sum(value: torch.Tensor | float | int, info: DistInfo) -> torch.Tensor | float:
    """The sum of `value` over all ranks.

    A tensor is reduced in place and returned (through `info.device` if it lives elsewhere);
    a Python number comes back as a Python number (summed in float64).
    """
    if isinstance(value, torch.Tensor):
        if info.is_distributed:
            _all_reduce_on(info.device, value)
        return value
    if not info.is_distributed:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item()


def all_reduce_gradients(
    parameters: Iterable[torch.nn.Parameter], info: DistInfo, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Sum the `.grad` of every trainable parameter across ranks, in place.

    Every rank must pass the same parameters in the same order. A trainable parameter whose
    gradient is None (a rank with no rows this step) takes part as zeros, so the ranks never
    disagree on what they reduce.
    """
    if not info.is_distributed:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params], bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flat = _all_reduce_on(info.device, flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _all_reduce_on(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place, on the process group's device: NCCL only reduces
    CUDA tensors, so a CPU tensor (a loss accumulator, say) makes a round trip there."""
    if tensor.device == device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return tensor.copy_(on_device)


def _buckets(grads: list[torch.Tensor], bucket_bytes: int) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of same-dtype, same-device gradients of at most ~bucket_bytes."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        compatible = not bucket or (g.dtype == bucket[0].dtype and g.device == bucket[0].device)
        if bucket and (not compatible or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Copy rank 0's values of `parameters` to every rank (so all ranks start identical even
    if their initialisation drew different random numbers)."""
    if not info.is_distributed:
        return
    with torch.no_grad():
        for p in parameters:
            dist.broadcast(p.data, src=0)
