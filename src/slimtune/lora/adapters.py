"""Many named adapters on one base: where they are, activate, disable, delete, and one adapter
per sample."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from slimtune.devices import device_of
from slimtune.errors import SlimtuneError
from slimtune.lora.config import LoraConfig
from slimtune.lora.layer import LoraLinear

CONFIGS_ATTR = "lora_configs"  # model attribute: {adapter name: LoraConfig}


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters injected into `model`, by name (empty dict when none)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def adapter_parameters(layer: LoraLinear, name: str | None = None) -> list[nn.Parameter]:
    """A layer's LoRA parameters: of adapter `name`, or of all adapters."""
    params = []
    for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        for key, module in store.items():
            if name is None or key == name:
                params.extend(module.parameters())
    return params


def check_names(model: nn.Module, names: Sequence[str | None], allow_none: bool = False) -> None:
    known = lora_configs(model)
    for name in names:
        if name is None and allow_none:
            continue
        if name not in known:
            raise SlimtuneError(
                f"unknown adapter {name!r}; the model has {sorted(known) or 'none'}"
            )


def active_adapters(model: nn.Module) -> list[str]:
    for _, layer in lora_layers(model):
        return list(layer.active_adapters)
    return []


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (their outputs are summed) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    check_names(model, names)
    for _, layer in lora_layers(model):
        layer.set_active(names)
        for adapter in layer.lora_A:
            for p in adapter_parameters(layer, adapter):
                p.requires_grad_(adapter in names)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model runs as its base alone."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise SlimtuneError("adapters are merged into the base: unmerge them before disabling")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; a layer left without adapters is its base layer again."""
    check_names(model, [name])
    for path, layer in list(lora_layers(model)):
        layer.delete_adapter(name)
        if not layer.lora_A:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    del lora_configs(model)[name]


@contextmanager
def per_sample_adapters(
    model: nn.Module, names: Sequence[str | None], layers: list[LoraLinear] | None = None
) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter `names[i]` (None: the base alone).

    Rows are grouped by adapter, so each adapter runs once per layer on its rows only; nothing is
    merged. Batches must have len(names) rows. `layers`: the model's LoRA layers, when the caller
    keeps the list (finding them walks every module: milliseconds a step on a serving loop).
    """
    names = list(names)
    check_names(model, names, allow_none=True)
    layers = [layer for _, layer in lora_layers(model)] if layers is None else layers
    if any(layer.merged_adapters for layer in layers):
        raise SlimtuneError("adapters are merged into the base: unmerge them first")
    groups, spans = _group_rows(names, device_of(model))
    for layer in layers:
        layer.sample_groups, layer.sample_batch = groups, len(names)
        layer.sample_spans = spans
    try:
        yield
    finally:
        for layer in layers:
            layer.sample_groups, layer.sample_batch, layer.sample_spans = None, 0, None


def _group_rows(
    names: list[str | None], device: torch.device
) -> tuple[list[tuple[str, torch.Tensor | None]], list[slice] | None]:
    """(adapter, its rows or None for every row) for each adapter named, and each adapter's rows
    as one slice where all of them are consecutive (a batch ordered by adapter: views, with no
    gather and no scatter), else None."""
    groups: list[tuple[str, torch.Tensor | None]] = []
    spans: list[slice] | None = []
    for name in dict.fromkeys(n for n in names if n is not None):
        rows = [i for i, n in enumerate(names) if n == name]
        whole = len(rows) == len(names)
        groups.append((name, None if whole else torch.tensor(rows, device=device)))
        if spans is not None and rows[-1] - rows[0] + 1 == len(rows):
            spans.append(slice(rows[0], rows[-1] + 1))
        else:
            spans = None
    return groups, spans
