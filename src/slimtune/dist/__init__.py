"""Data parallel training with torch.distributed, launched by `torchrun`.

gloo on CPU, NCCL on GPU, chosen automatically. With one process every call is a cheap
no-op, so the training loop is the same for 1 and N processes:

    info = init_distributed()
    ...
    rows = shard_batch(global_batch, info)              # this rank's rows
    n_tokens = all_reduce_sum(local_tokens, info)       # trained tokens, all ranks
    (sum_of_token_losses / n_tokens).backward()
    all_reduce_gradients(lora_parameters(model), info)  # sum
    optimizer.step()
    if info.is_main: log / save
    ...
    shutdown_distributed(info)

With `shard_model` (fsdp.py) the model itself is sharded too (FSDP2): each rank keeps 1/N of
the 4-bit base and of the adapter, and gradients are summed by FSDP's reduce-scatter instead
of `all_reduce_gradients`; with `LoadedPart` (parts.py) a process keeps only its part of the base
while the model loads.
"""

from slimtune.dist.fsdp import (
    ShardedLoss,
    decoder_layers,
    full_optimizer_state,
    full_trainable,
    shard_model,
    shard_optimizer_state,
    whole,
)
from slimtune.dist.info import (
    DistInfo,
    barrier,
    choose_backend,
    init_distributed,
    main_process_first,
    shutdown_distributed,
)
from slimtune.dist.parts import LoadedPart, part_rows
from slimtune.dist.reduce import all_reduce_gradients, all_reduce_sum, broadcast_parameters
from slimtune.dist.shard import shard_batch, shard_bounds

__all__ = [
    "DistInfo",
    "LoadedPart",
    "ShardedLoss",
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_parameters",
    "choose_backend",
    "decoder_layers",
    "full_optimizer_state",
    "full_trainable",
    "init_distributed",
    "main_process_first",
    "part_rows",
    "shard_model",
    "shard_optimizer_state",
    "shard_batch",
    "shard_bounds",
    "shutdown_distributed",
    "whole",
]
