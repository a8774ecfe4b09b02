"""FSDP + QLoRA: the frozen 4-bit base and the adapter sharded across processes with FSDP2.

    root = shard_model(model, summed_loss, info)   # every rank keeps 1/N of every tensor
    loss = root(batch)                             # = summed_loss(model, batch)
    loss.backward()                                # LoRA gradients summed, 1/N on each rank
    optimizer.step()                               # its state is 1/N on each rank too

PyTorch's `fully_shard` does the work: one unit per decoder layer (all-gathered just before
its forward and again for its backward, freed after each), one for the input embeddings
(gathered for their forward only: they are frozen), then a root unit holding what is left
(final norm, output layer; the embeddings too when tied to it). The root is a small module
whose forward is the loss function: the loss reads the output layer's weight directly,
without calling it, so the root's gather has to cover the whole loss computation.

The 4-bit layers hold their packed codes and scales as frozen parameters
(`Linear4bit.store_as_parameters`): FSDP shards parameters, not buffers. FSDP2 all-gathers a
unit whose parameters have different dtypes (uint8 codes, float32 scales and adapters)
through one byte buffer, so no float storage dtype is needed.

Gradients are summed, not averaged: every rank divides its summed token loss by the global
token count (as data parallel training does, see reduce.py), so the sum over ranks is the
single-process gradient of the whole global batch. gloo has no averaging reduce-scatter
(PREMUL_SUM / AVG), so the collectives are forced to plain SUM.

Loading can be sharded too (parts.py): each process then loads and quantizes the base layer
by layer but keeps only the rows FSDP will leave it, and `shard_model` hands those to FSDP.

Saving and loading work on whole tensors: `full_trainable` and `full_optimizer_state` gather
the adapter and its optimizer state on every rank (small next to the base), so checkpoints
and adapter files are those of a single process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from slimtune.dist.info import DistInfo
from slimtune.dist.parts import widen_loaded_parts
from slimtune.errors import SlimtuneError
from slimtune.quant import Linear4bit
from slimtune.runtime.heap import release_freed_memory


class ShardedLoss(nn.Module):
    """The FSDP root: `root(*args)` is `loss_fn(model, *args)`, inside the root's gather."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any) -> torch.Tensor:
        return self.loss_fn(self.model, *args)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (the classes it names in
    `_no_split_modules`, e.g. LlamaDecoderLayer): one FSDP unit each."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SlimtuneError(
            f"fsdp: cannot find the decoder layers of {type(model).__name__} "
            "(no `_no_split_modules` classes in it)"
        )
    return layers


def shard_model(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], info: DistInfo
) -> ShardedLoss:
    """Shard `model` in place across the ranks of `info`; returns the root to call for the
    loss. Every rank must hold the same model (same weights, same adapter) when it calls, or,
    loaded with `LoadedPart`, its own rows of the same weights (and the same adapter)."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.store_as_parameters()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    root = ShardedLoss(model, loss_fn)
    units = [*decoder_layers(model), root]
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embeddings.weight is not head.weight:
        units.insert(0, embeddings)
    for unit in units:  # bottom-up, as fully_shard requires
        # Parts of a sharded load (dist/parts.py) get their whole shape back, one unit at a time.
        widen_loaded_parts(unit, info.rank, info.world_size)
        fully_shard(unit, mesh=mesh)
        # The unit's whole (or widened) tensors are freed now, between the shards just made:
        # glibc would keep those pages, and RSS creep up unit by unit by most of the 1/N base.
        release_freed_memory()
        # Per unit, not inherited: sum the gradients (the loss carries the global normaliser).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return root


@contextlib.contextmanager
def full_trainable(model: nn.Module) -> Iterator[None]:
    """Inside the block the trainable parameters of a sharded `model` are whole tensors (every
    rank must enter: gathering is a collective); what the block writes into them goes back to
    the shards on exit. A no-op for a model that is not sharded."""
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and param.requires_grad:
                module._parameters[name] = nn.Parameter(param.full_tensor())
                swapped.append((module, name, param))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, sharded in swapped:
                sharded.copy_(_shard_like(module._parameters[name].detach(), sharded))
                module._parameters[name] = sharded


def whole(value: Any) -> Any:
    """A sharded tensor gathered (a collective); any other value as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with its sharded tensors gathered whole (a collective)."""
    state_dict = optimizer.state_dict()  # its entries are the optimizer's own: not written to
    state = {
        index: {key: whole(value) for key, value in entries.items()}
        for index, entries in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a whole-tensor state: each sharded parameter's state becomes its shard."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                # Adam's moments have the parameter's shape; its step count is a scalar.
                if torch.is_tensor(value) and value.shape == param.shape:
                    state[key] = _shard_like(value, param)


def _shard_like(whole: torch.Tensor, sharded: DTensor) -> DTensor:
    """`whole` cut as `sharded` is; every rank holds `whole`, so nothing is sent."""
    whole = whole.to(sharded.device, sharded.dtype)
    return distribute_tensor(whole, sharded.device_mesh, sharded.placements, src_data_rank=None)
