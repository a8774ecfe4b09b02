"""The forward passes of a running batch, and its KV cache, in two kinds.

`LeanBatch` runs slimtune's lean forward (`slimtune.infer.llama`) over a preallocated KV cache:
the LLaMA family (LLaMA, Mistral without a sliding window, Qwen2), where transformers' own
bookkeeping per pass costs more than the arithmetic. `TransformersBatch` runs the model's own
forward with a `DynamicCache`, for every other architecture. Both keep one left-padded time
axis for all rows (`slimtune.serve.kv`): rows join after their prefill and leave when done.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from slimtune.infer.llama import KVCache, Rotary, attention_mask, lean_forward, supports
from slimtune.infer.native_step import MAX_ROWS, NativeDecoder, in_c_prefill, usable
from slimtune.serve import kv

# The context that gives each row of a forward pass its adapter (the engine's
# per_sample_adapters over its loaded LoRA layers).
PerSample = Callable[[list[str | None]], AbstractContextManager]


class TransformersBatch:
    """The model's own forward and a transformers `DynamicCache`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, time) long: 1 where a token is

    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        adapters: list[str | None],
        per_sample: PerSample,
    ) -> torch.Tensor:
        """Run left-padded prompts, append their rows; the last position's logits. `adapters`:
        each row's adapter, applied by the context `per_sample(adapters)`."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with per_sample(adapters):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=kv.new_cache(self.model.config),
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache, self.mask = kv.join(self.cache, self.mask, out.past_key_values, mask)
        return out.logits[:, -1]

    def decode(
        self, last: torch.Tensor, adapters: list[str | None], per_sample: PerSample
    ) -> torch.Tensor:
        """One new token per row (`last`: (rows, 1)); the logits of the next. `adapters`: each
        row's adapter (None: the base alone), applied by the context `per_sample(adapters)`."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(last), 1))], dim=1)
        with per_sample(adapters):
            out = self.model(
                input_ids=last,
                attention_mask=self.mask,
                position_ids=self.mask.sum(-1, keepdim=True) - 1,
                past_key_values=self.cache,
                use_cache=True,
            )
        return out.logits[:, -1]

    def keep_rows(self, rows: list[int]) -> None:
        if rows:
            self.cache, self.mask = kv.keep_rows(self.cache, self.mask, rows)
        else:
            self.cache, self.mask = None, None

    def adapters_changed(self, names: list[str]) -> None:
        """Adapters were loaded or deleted (nothing to do: each forward reads the model)."""


class LeanBatch:
    """slimtune's lean forward over a KV cache with room to grow (doubled when full). Decode
    steps run in one C call where it covers the model (`slimtune.infer.native_step`): every
    row's adapter among the loaded ones (`adapters_changed`)."""

    def __init__(self, model: nn.Module, max_context: int):
        self.model = model
        self.dtype = model.model.embed_tokens.weight.dtype
        self.rotary = Rotary(model, max_context, self.dtype)
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, time) bool: True where a token is
        self.adapters: list[str] = []  # the C step's adapter slots
        self._native: NativeDecoder | None | bool = False  # False: not built yet

    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        adapters: list[str | None],
        per_sample: PerSample,
    ) -> torch.Tensor:
        """Left-padded prompts (`ids`, `mask` 0 on padding) into new rows of the cache; the
        logits of each one's last token. `adapters` as in `decode`: in C where it covers the
        model (all prompt tokens as rows of one call, or a few in column order), else the lean
        forward."""
        valid = mask.bool()
        rows, width = ids.shape
        cache = KVCache.empty(self.model, rows, width, self.dtype)
        native = self._native_decoder(adapters)
        if native is not None and in_c_prefill(valid, native.bf16) and usable(cache, self.rotary):
            logits = native.prefill(ids, valid, cache, self.rotary, self._slots(adapters))
        else:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            with per_sample(adapters):
                logits = lean_forward(
                    self.model, ids, positions, cache, self.rotary, attention_mask(valid, 0, width)
                )
        self._join(cache, valid)
        return logits

    def decode(
        self, last: torch.Tensor, adapters: list[str | None], per_sample: PerSample
    ) -> torch.Tensor:
        """One new token per row (`last`: (rows, 1)); the logits of the next. `adapters`: each
        row's adapter (None: the base alone): the C step's slots, else applied by the context
        `per_sample(adapters)` around the lean forward."""
        if self.cache.length == self.cache.capacity:
            self._resize(2 * self.cache.capacity)
        native = self._native_decoder(adapters)
        in_c = native is not None and len(last) <= MAX_ROWS and usable(self.cache, self.rotary)
        # Rows are left-padded: each sees its cache from its first real column on.
        start = self.mask.int().argmax(-1).tolist() if in_c else None
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(last), 1))], dim=1)
        if in_c:
            return native.step(
                last.view(-1).tolist(), self.cache, self.rotary, start, self._slots(adapters)
            )
        positions = self.mask.sum(-1, keepdim=True) - 1
        mask = attention_mask(self.mask, self.cache.length, 1)
        with per_sample(adapters):
            return lean_forward(self.model, last, positions, self.cache, self.rotary, mask)

    def adapters_changed(self, names: list[str]) -> None:
        """Adapters were loaded or deleted: `names` are the loaded ones (the C step's slots are
        described anew on the next step)."""
        self.adapters, self._native = list(names), False

    def _slots(self, adapters: list[str | None]) -> list[int]:
        """Each row's adapter slot in the C step (-1: the base alone)."""
        return [-1 if a is None else self.adapters.index(a) for a in adapters]

    def _native_decoder(self, adapters: list[str | None]) -> NativeDecoder | None:
        new = {a for a in adapters if a is not None} - set(self.adapters)
        if new:  # loaded without adapters_changed: give them slots
            self.adapters_changed(sorted(set(self.adapters) | new))
        if self._native is False:
            self._native = NativeDecoder.build(self.model, None, self.adapters)
        return self._native

    def keep_rows(self, rows: list[int]) -> None:
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        self.cache = _moved(self.cache, index, start, self.cache.capacity - start)

    def _join(self, new: KVCache, valid: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = new, valid
            return
        t_old, t_new = self.mask.shape[1], valid.shape[1]
        t = max(t_old, t_new)
        capacity = max(self.cache.capacity - t_old, 1) + t  # keep the running rows' room
        old = _moved(self.cache, None, 0, capacity, t - t_old)
        added = _moved(new, None, 0, capacity, t - t_new)
        self.cache = KVCache(
            [torch.cat(pair) for pair in zip(old.keys, added.keys, strict=True)],
            [torch.cat(pair) for pair in zip(old.values, added.values, strict=True)],
            t,
        )
        pad = valid.new_zeros
        self.mask = torch.cat(
            [
                torch.cat([pad(self.mask.shape[0], t - t_old), self.mask], dim=1),
                torch.cat([pad(valid.shape[0], t - t_new), valid], dim=1),
            ]
        )

    def _resize(self, capacity: int) -> None:
        self.cache = _moved(self.cache, None, 0, capacity)


def _moved(
    cache: KVCache, rows: torch.Tensor | None, start: int, capacity: int, shift: int = 0
) -> KVCache:
    """A copy of `cache`'s columns [start, length) (of `rows`, or all), placed `shift` columns
    to the right (zeros before them) in tensors of `capacity` columns."""
    length = cache.length - start + shift

    def move(t: torch.Tensor) -> torch.Tensor:
        part = t[:, :, start : cache.length]
        if rows is not None:
            part = part.index_select(0, rows)
        out = t.new_zeros(part.shape[0], part.shape[1], capacity, part.shape[3])
        out[:, :, shift:length] = part
        return out

    return KVCache([move(k) for k in cache.keys], [move(v) for v in cache.values], length)


def new_batch(
    model: nn.Module, max_context: int, lean: bool = True
) -> LeanBatch | TransformersBatch:
    """The lean batch where the lean forward covers the model (and `lean`), else transformers'."""
    if lean and supports(model):
        return LeanBatch(model, max_context)
    return TransformersBatch(model)
