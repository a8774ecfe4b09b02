"""Which rows of a global batch this rank trains on.

The training loop forms the *global* batch exactly as a single process would (same data
order, same seed, N * b rows), then each rank keeps a contiguous slice of it. The union of
the slices is the global batch, so N processes x batch b train on the rows that 1 process x
batch N * b trains on, step for step. Contiguous slices (rather than DistributedSampler's
stride) keep rows of similar length together, which wastes less padding once a loader sorts
by length.

When the rows do not divide evenly (the last batch of an epoch), the first `n % N` ranks get
one row more, and a rank may get none; with the loss normalised by the global token count
(see reduce.py) that changes nothing in the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from slimtune.dist.info import DistInfo

Batch = TypeVar("Batch")


def shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's rows among `num_rows`, as numpy.array_split splits them."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _num_rows(batch) -> int:
    if isinstance(batch, Mapping):
        sizes = {_num_rows(value) for value in batch.values()}
        if len(sizes) != 1:
            raise ValueError(f"batch fields disagree on the number of rows: {sorted(sizes)}")
        return sizes.pop()
    return len(batch)  # a tensor's first dimension, or a list's length


def _take(batch, start: int, stop: int):
    if isinstance(batch, Mapping):
        return type(batch)({key: _take(value, start, stop) for key, value in batch.items()})
    if isinstance(batch, torch.Tensor | Sequence):
        return batch[start:stop]
    raise TypeError(f"cannot shard a batch of type {type(batch).__name__}")


def shard_batch(global_batch: Batch, info: DistInfo) -> Batch:
    """This rank's rows of `global_batch`: a list of examples, a tensor (rows = dim 0), or a
    dict of those. With one process the batch itself comes back, untouched."""
    if not info.is_distributed:
        return global_batch
    start, stop = shard_bounds(_num_rows(global_batch), info.rank, info.world_size)
    return _take(global_batch, start, stop)
