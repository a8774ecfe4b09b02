"""Find the layers a LoraConfig targets, wrap them in LoraLinear, freeze everything else."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.lora.bases import is_supported_base
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


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer LoRA could wrap (or already wraps), by path; never inside a LoraLinear."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LoraLinear):
            inside.append(name + ".")
            found[name] = module
        elif is_supported_base(module):
            found[name] = module
    return found


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the layers `config.target_modules` selects, with PEFT's matching rules."""
    target = config.target_modules
    if target == "all-linear":
        head = _output_head(model)
        return [name for name, m in candidate_layers(model).items() if _unwrap(m) is not head]
    layers = candidate_layers(model)
    matched = [name for name, _ in model.named_modules() if _matches(target, name)]
    for name in matched:
        if name not in layers:
            module = model.get_submodule(name)
            raise SlimtuneError(
                f"target_modules={target!r} matches {name!r}, a {type(module).__name__}: LoRA "
                "wraps only Linear, Conv1D and Linear4bit layers"
            )
    return matched


def _matches(target: list[str] | str, name: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter else None


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLinear) else module


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", activate: bool = True
) -> nn.Module:
    """Add adapter `adapter_name` to every layer `config` targets (wrapping it in LoraLinear).

    Everything but LoRA parameters is frozen. With `activate` the new adapter becomes the only
    active (and trainable) one; otherwise it is added frozen and inactive.
    """
    configs = lora_configs(model)
    if adapter_name in configs:
        raise SlimtuneError(f"adapter {adapter_name!r} already exists: delete it first")
    if not adapter_name or "." in adapter_name:
        raise SlimtuneError(f"adapter name must be non-empty without '.', got {adapter_name!r}")
    targets = find_targets(model, config)
    if not targets:
        raise SlimtuneError(
            f"target_modules={config.target_modules!r} matches no layer of the model"
        )
    loftq = None
    if config.init == "loftq":
        from slimtune.quant import QuantConfig

        loftq = (config.loftq_quant or QuantConfig(), config.loftq_iters)
    for name in targets:
        layer = _wrap(model, name)
        layer.add_adapter(
            adapter_name,
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            scaling=config.scaling_for(name),
            dropout=config.dropout,
            use_dora=config.use_dora,
            init=config.init,
            loftq=loftq,
        )
    configs[adapter_name] = config
    freeze_base(model)
    if activate:
        from slimtune.lora.adapters import set_active_adapters

        set_active_adapters(model, [adapter_name])
    return model


def _wrap(model: nn.Module, name: str) -> LoraLinear:
    module = model.get_submodule(name)
    if isinstance(module, LoraLinear):
        return module
    layer = LoraLinear(module)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter that is not an adapter's."""
    adapter = {id(p) for _, layer in lora_layers(model) for p in adapter_parameters(layer)}
    for p in model.parameters():
        if id(p) not in adapter:
            p.requires_grad_(False)


def adapter_parameters(layer: LoraLinear, name: str | None = None) -> list[nn.Parameter]:
    """A layer's LoRA parameters: of adapter `name`, or of all adapters."""
    params = []
    for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        for key, module in store.items():
            if name is None or key == name:
                params.extend(module.parameters())
    return params
