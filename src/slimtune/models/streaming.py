"""Load a float checkpoint straight into 4 bits, one tensor at a time.

The skeleton holds no float weights (meta device). Tensors stream from the safetensors files;
each targeted Linear is quantized as soon as its weight (and bias) have arrived, and the float
copy is dropped, so at most one float layer is alive besides the parts that stay in float
(embeddings, norms, the output layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.models.expert_keys import ExpertStacker, expert_part, renamed, split_fused
from slimtune.models.experts import unfuse_experts
from slimtune.models.skeleton import build_skeleton, checkpoint_name, finish, set_tensor
from slimtune.models.source import safetensors_files
from slimtune.quant import Linear4bit, QuantConfig, select_linear_layers
from slimtune.runtime.heap import release_freed_memory

# keep_part(module, tensor name): called once a tensor is in place (see load_streaming_4bit).
KeepPart = Callable[[nn.Module, str], None]
FUSED_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
TRIM_EVERY = 16  # layers between two release_freed_memory calls (each takes about a millisecond)


def load_streaming_4bit(
    folder: Path,
    config: QuantConfig,
    *,
    dtype: torch.dtype,
    trust_remote_code: bool,
    keep_part: KeepPart | None = None,
) -> nn.Module:
    """Build `folder`'s model with its targeted Linear layers quantized to 4 bits.

    `keep_part(module, name)` is called for every tensor once it is in place (a quantized
    layer's once it is quantized): a sharded load (slimtune.dist.LoadedPart) keeps only this
    process's rows of it there, so the whole base is never held by one process."""
    model = build_skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    unfuse_experts(model)  # fused experts as one Linear per expert: quantized like the others
    # The same layers quantize_model picks: every Linear (or Conv1D) but the output layer.
    targets = {name: model.get_submodule(name) for name in select_linear_layers(model)}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # target name -> its tensors so far
    experts = ExpertStacker()
    quantized = 0

    for name, tensor in _model_tensors(model, folder, dtype, experts):
        module_name, _, attr = name.rpartition(".")
        if module_name not in targets:
            set_tensor(model, name, tensor)
            if keep_part is not None:
                keep_part(model.get_submodule(module_name), attr)
            continue
        parts = pending.setdefault(module_name, {})
        parts[attr] = tensor
        if _complete(targets[module_name], parts):
            # pop: this dict must not keep the float layer alive once it is replaced.
            skeleton = targets.pop(module_name)
            layer = _quantize_in_place(model, module_name, skeleton, parts, config)
            for tensor_name in ("bias", *Linear4bit.SHARDABLE) if keep_part else ():
                keep_part(layer, tensor_name)
            del pending[module_name], parts, skeleton, layer
            quantized += 1
            if quantized % TRIM_EVERY == 0:
                release_freed_memory()

    if pending or experts.pending():
        incomplete = sorted(pending) + experts.pending()
        raise SlimtuneError(f"model folder {folder}: incomplete tensors for {incomplete}")
    release_freed_memory()
    return finish(model, folder)


def _model_tensors(
    model: nn.Module, folder: Path, dtype: torch.dtype, experts: ExpertStacker
) -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, tensor) for each checkpoint tensor the model has a place for, one at a time;
    per-expert and fused expert tensors go to the ExpertList layers."""
    expected = set(model.state_dict().keys())
    for path in safetensors_files(folder):
        for key in tensor_keys(path):
            name = checkpoint_name(model, renamed(key), expected)
            part = expert_part(key) if name is None else None
            fused = name is None and key.endswith(FUSED_SUFFIXES)
            if name is None and part is None and not fused:
                continue  # e.g. rotary caches some checkpoints carry
            tensor = read_tensor(path, key)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if part is not None:  # one expert's gate, up or down: its layer's weight when whole
                name = checkpoint_name(model, part.target, expected)
                tensor = experts.add(part, tensor) if name is not None else None
                if tensor is not None:
                    yield name, tensor
            elif fused:
                for piece_key, piece in (split_fused(renamed(key), tensor) or {}).items():
                    piece_name = checkpoint_name(model, piece_key, expected)
                    if piece_name is not None:
                        yield piece_name, piece.clone()  # its own storage: quantized alone
            else:
                yield name, tensor


def tensor_keys(path: Path) -> list[str]:
    with safe_open(path, framework="pt") as handle:
        return list(handle.keys())


def read_tensor(path: Path, key: str) -> torch.Tensor:
    # One open per tensor, on purpose: safe_open memory-maps the file, and every page a
    # tensor touched stays resident until the map is closed, so reading all tensors through
    # one handle would bring the whole float file into RSS after all.
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(key)


def _complete(linear: nn.Module, parts: dict[str, torch.Tensor]) -> bool:
    return "weight" in parts and (linear.bias is None or "bias" in parts)


def _quantize_in_place(
    model: nn.Module,
    name: str,
    skeleton: nn.Module,
    parts: dict[str, torch.Tensor],
    config: QuantConfig,
) -> Linear4bit:
    # Fill the skeleton layer (nn.Linear or Conv1D: from_linear knows both) for one moment;
    # it is dropped when its 4-bit replacement takes its place.
    for attr, tensor in parts.items():
        skeleton._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    parent_name, _, attr = name.rpartition(".")
    layer = Linear4bit.from_linear(skeleton, config)
    setattr(model.get_submodule(parent_name), attr, layer)
    return layer
