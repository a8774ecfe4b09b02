"""Write a float model as a standalone Hugging Face folder: config, safetensors shards (with an
index when there is more than one), generation config and tokenizer, all or nothing.

Tensors are cast to the output dtype one shard at a time, so writing needs at most one shard of
extra memory on top of the model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slimtune.choices import MERGED_DTYPES
from slimtune.errors import SlimtuneError
from slimtune.files import atomic_folder

DTYPES = dict(zip(MERGED_DTYPES, (torch.float32, torch.bfloat16, torch.float16), strict=True))
INDEX_NAME = "model.safetensors.index.json"


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (lm_head tied to the embeddings):
    transformers re-ties them on load, and safetensors refuses shared storage."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor
    return tensors


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group names, in order, into shards of at most `max_shard_bytes` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_model_folder(
    model: nn.Module,
    tokenizer,
    output_dir: str | Path,
    *,
    dtype: str = "fp32",
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    if dtype not in DTYPES:
        raise SlimtuneError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise SlimtuneError(f"output folder {output_dir} exists and is not empty")
    with atomic_folder(output_dir) as tmp:
        _write_weights(model, tmp, DTYPES[dtype], max_shard_bytes)
        _write_config(model, tmp, DTYPES[dtype])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return output_dir


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _write_weights(model: nn.Module, folder: Path, dtype: torch.dtype, max_shard_bytes: int):
    tensors = unique_state_dict(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {
        n: t.numel() * (itemsize if t.is_floating_point() else t.element_size())
        for n, t in tensors.items()
    }
    shards = plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        save_file({n: _cast(tensors[n], dtype) for n in shards[0]}, folder / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: _cast(tensors[n], dtype) for n in names}, folder / file,
                  metadata={"format": "pt"})  # fmt: skip
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    config = copy.deepcopy(model.config)
    # A merged model is plain float: no quantization settings, whatever the base was loaded as.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
