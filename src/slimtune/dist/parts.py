"""Sharded loading for FSDP: each process keeps only its part of the base while the model loads.

    keep = LoadedPart(info.rank, info.world_size)
    model = load_model(folder, quant=..., keep_part=keep)   # each tensor cut as it arrives
    root = shard_model(model, loss_fn, info)                # the parts become FSDP's shards

`fully_shard` cuts every parameter on dim 0 as `torch.chunk` does and leaves each rank its
chunk. A loader that calls `LoadedPart` for every tensor it puts in place keeps only that
chunk of each tensor FSDP will shard (every parameter, and the codes and scales of the 4-bit
layers, which `shard_model` turns into parameters), so that a process never holds more of the
base than its part plus the layer being loaded. Every process loads and quantizes the same
bytes (quantization is deterministic), so the parts fit together without a collective.

`fully_shard` takes whole tensors, though. `widen_loaded_parts` gives each part its whole
shape back just before a unit is sharded: a tensor of the whole shape (not filled, even under
deterministic algorithms) in which only this rank's rows are written. The other rows are never written nor read (fully_shard copies out
this rank's rows alone), so their memory pages are never touched, and the operating system
maps a page only on its first touch: the wide tensor costs this rank's rows, not the whole.
(On a GPU the wide tensors of one unit, one decoder layer, are allocated whole for a moment.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant import Linear4bit

# Module attribute: {tensor name: its whole shape} for the tensors a LoadedPart cut.
WHOLE_SHAPES = "_slimtune_whole_shapes"


def part_rows(length: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a dim 0 of `length` that `rank` keeps under fully_shard: as
    `torch.chunk` cuts, ceil(length / world_size) rows each, the last ranks fewer or none."""
    per_rank = -(-length // world_size)
    start = min(rank * per_rank, length)
    return start, min(start + per_rank, length)


@dataclass(frozen=True)
class LoadedPart:
    """Call it with (module, tensor name) once a loader has put that tensor in place (once per
    tensor): a tensor FSDP will shard is replaced by the rows this process keeps, and its whole
    shape is noted on the module; any other tensor stays whole."""

    rank: int
    world_size: int

    def __call__(self, module: nn.Module, name: str) -> None:
        tensor = _shardable(module, name)
        if tensor is None:  # not FSDP's to shard: stays whole
            return
        start, stop = part_rows(tensor.shape[0], self.rank, self.world_size)
        part = tensor.detach()[start:stop].clone()  # its own storage: the whole can be freed
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(part, requires_grad=tensor.requires_grad)
        else:
            module._buffers[name] = part
        module.__dict__.setdefault(WHOLE_SHAPES, {})[name] = tensor.shape


def _shardable(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor `name` of `module` if fully_shard will cut it: a parameter, or a 4-bit layer's
    codes and scales (parameters once `store_as_parameters` ran); 0-dim tensors never."""
    if name in module._parameters:
        tensor = module._parameters[name]
    elif isinstance(module, Linear4bit) and name in Linear4bit.SHARDABLE:
        tensor = module._buffers.get(name)
    else:
        return None
    if tensor is None or tensor.ndim == 0 or tensor.device.type == "meta":
        return None
    return tensor


@torch.no_grad()
def widen_loaded_parts(unit: nn.Module, rank: int, world_size: int) -> None:
    """Before `fully_shard(unit)`: each part a LoadedPart kept in `unit` (and not yet in a unit
    sharded before) becomes a parameter of its whole shape holding this rank's rows (see the
    module doc). Parameters shared by several modules (tied embeddings) stay shared."""
    # id(part) -> (part, its widened parameter); holding the part keeps its id unique.
    widened: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}
    for module in unit.modules():
        for name, whole_shape in module.__dict__.pop(WHOLE_SHAPES, {}).items():
            part = module._parameters[name]  # a parameter by now (store_as_parameters)
            if id(part) not in widened:
                widened[id(part)] = (part, _widen(part, whole_shape, rank, world_size))
    for module in unit.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) in widened:
                module._parameters[name] = widened[id(param)][1]


def _widen(
    part: torch.Tensor, whole_shape: torch.Size, rank: int, world_size: int
) -> nn.Parameter:
    start, stop = part_rows(whole_shape[0], rank, world_size)
    if part.shape != (stop - start, *whole_shape[1:]):
        raise SlimtuneError(
            f"fsdp: a tensor loaded for sharding holds {tuple(part.shape)}, not rows "
            f"{start}:{stop} of {tuple(whole_shape)} (rank {rank} of {world_size})"
        )
    with _unfilled_memory():
        wide = torch.empty(whole_shape, dtype=part.dtype, device=part.device)  # pages untouched
    wide[start:stop] = part
    return nn.Parameter(wide, requires_grad=part.requires_grad)


@contextlib.contextmanager
def _unfilled_memory() -> Iterator[None]:
    """`torch.empty` as it is, even under `torch.use_deterministic_algorithms` (which training
    turns on): that fills new memory with NaN, writing every page. The rows never written here
    are never read either, so leaving them unfilled changes no result."""
    settings = torch.utils.deterministic
    before = settings.fill_uninitialized_memory
    settings.fill_uninitialized_memory = False
    try:
        yield
    finally:
        settings.fill_uninitialized_memory = before
