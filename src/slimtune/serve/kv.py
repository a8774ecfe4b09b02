"""The KV cache of a running batch: rows join, leave and share one left-padded time axis.

Rows are left-padded so that every row's newest token sits in the last column: one decode step
then feeds a (B, 1) batch. The attention mask marks padding; position ids come from the mask, so
a padded row computes exactly what it would compute alone.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def new_cache(config) -> DynamicCache:
    # Plain layers everywhere, sliding-window ones too (Gemma 3, Mistral): the attention mask, not
    # the cache, keeps such a layer to its window, and every layer keeps one column per token.
    del config
    return DynamicCache()


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # Only full-attention dynamic layers keep one column per token, which the edits below assume.
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"continuous batching needs plain DynamicLayer caches, not {type(layer)}"
            )
    return cache.layers


def _pad_front(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join(
    cache: DynamicCache | None,
    mask: torch.Tensor | None,
    new_cache_: DynamicCache,
    new_mask: torch.Tensor,
) -> tuple[DynamicCache, torch.Tensor]:
    """Append the rows of (new_cache_, new_mask) below those of (cache, mask), padding the
    shorter side on the left so that both end in the same column."""
    if cache is None or mask is None or mask.shape[0] == 0:
        return new_cache_, new_mask
    t_old, t_new = mask.shape[1], new_mask.shape[1]
    t = max(t_old, t_new)
    for old, new in zip(_layers(cache), _layers(new_cache_), strict=True):
        old.keys = torch.cat(
            [_pad_front(old.keys, t - t_old, 2), _pad_front(new.keys, t - t_new, 2)]
        )
        old.values = torch.cat(
            [_pad_front(old.values, t - t_old, 2), _pad_front(new.values, t - t_new, 2)]
        )
    mask = torch.cat([_pad_front(mask, t - t_old, 1), _pad_front(new_mask, t - t_new, 1)])
    return cache, mask


def keep_rows(
    cache: DynamicCache, mask: torch.Tensor, rows: list[int]
) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only `rows`, then drop the leading columns that are padding in every kept row."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return cache, mask[:, start:]
