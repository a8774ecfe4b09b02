"""Decode steps on a GPU replayed from one CUDA graph.

A decode step of a small model is hundreds of small kernels (about fifteen a layer: norms,
projections, rotary, attention, the MLP), each a few microseconds of GPU work behind tens of
microseconds of Python and launching: the GPU waits on the host. A CUDA graph records the
step's kernels once and launches them all with one call. The recorded step reads everything
that changes from buffers the graph owns (the new tokens, their positions, the cache column
they go to, which keys each row sees) and advances them itself, so a replay only copies the
new tokens in. Rows stay in the batch until the last one finishes: a finished row's outputs
are ignored.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from slimtune.infer.llama import KVCache, Rotary, lean_forward

# Off: decode steps run eagerly on a GPU too (tests compare the two).
ENABLED = True


def usable(device: torch.device) -> bool:
    return ENABLED and device.type == "cuda"


def recorded_step(
    model: nn.Module,
    cache: KVCache,
    rotary: Rotary,
    valid: torch.Tensor,
    last_position: torch.Tensor,
) -> GraphStep | None:
    """A GraphStep after a prefill, or None (with a warning) where the capture fails: the
    caller then steps eagerly, slower but the same."""
    try:
        return GraphStep(model, cache, rotary, valid, last_position)
    except RuntimeError as error:
        warnings.warn(f"decode steps run without a CUDA graph: {error}", stacklevel=2)
        return None


class GraphStep:
    """The lean forward of one new token per row, captured after a prefill into `cache`.

    `valid` (batch, cache.length) marks the prompt columns each row sees (left padding is not
    seen); `last_position` (batch, 1) is each row's position of its last prompt token. On a
    CPU (tests) the same step runs from the same buffers, not captured."""

    def __init__(
        self,
        model: nn.Module,
        cache: KVCache,
        rotary: Rotary,
        valid: torch.Tensor,
        last_position: torch.Tensor,
    ):
        batch, device = valid.shape[0], valid.device
        cache.clear_unwritten()
        self._parts = (model, cache, rotary)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = last_position.clone()
        self.column = torch.tensor([cache.length], device=device)
        self.seen = torch.zeros(batch, 1, 1, cache.capacity, dtype=torch.bool, device=device)
        self.seen[:, 0, 0, : cache.length] = valid
        self.graph = None
        if device.type == "cuda":
            with torch.cuda.device(device):
                self._record(device)

    def _record(self, device: torch.device) -> None:
        # A first step off the graph compiles kernels and makes the allocations the capture
        # needs. It writes the cache column the first real step will overwrite and marks that
        # column seen, as the real step does too; the counters it advanced are put back.
        before = self.position.clone(), self.column.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.position.copy_(before[0])
        self.column.copy_(before[1])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        model, cache, rotary = self._parts
        self.position.add_(1)
        self.seen.index_fill_(-1, self.column, True)
        logits = lean_forward(model, self.ids, self.position, cache, rotary, self.seen, self.column)
        self.column.add_(1)
        return logits

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        """Float32 logits (batch, vocab) after one new token per row; valid until the next
        call (the graph's own output)."""
        model, cache, _ = self._parts
        if cache.length >= cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions, one more needed")
        self.ids.copy_(torch.tensor(tokens)[:, None])
        if self.graph is None:
            self.logits = self._step()
        else:
            self.graph.replay()
        cache.length += 1
        return self.logits
