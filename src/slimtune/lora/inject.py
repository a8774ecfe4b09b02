"""Find the layers a LoraConfig targets, wrap them in LoraLinear, freeze everything else; link
the LoRA layers that read one input (lora/fused.py)."""

from __future__ import annotations

import math

from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.lora.adapters import (
    adapter_parameters,
    lora_configs,
    lora_layers,
    set_active_adapters,
)
from slimtune.lora.bases import is_supported_base
from slimtune.lora.config import LoraConfig
from slimtune.lora.experts import expert_layers, matches_parameter
from slimtune.lora.fused import SHARED_INPUTS, SharedInput
from slimtune.lora.layer import LoraLinear
from slimtune.models.experts import unfuse_experts
from slimtune.quant import QuantConfig
from slimtune.targets import matches_target, output_head


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
    """Paths of the layers `config.target_modules` (and, for the experts of a mixture of experts,
    `config.target_parameters`) select, with PEFT's matching rules."""
    target = config.target_modules
    if target == "all-linear":
        head = output_head(model)
        return [name for name, m in candidate_layers(model).items() if _unwrap(m) is not head]
    layers = candidate_layers(model)
    experts = expert_layers(model)
    inside = tuple({f"{e.module}." for e in experts.values()})
    # Expert layers are named by target_parameters (their fused parameter), never by module name.
    matched = [
        name
        for name, _ in model.named_modules()
        if matches_target(name, target) and not (inside and name.startswith(inside))
    ]
    matched += [
        path
        for path, where in experts.items()
        if matches_parameter(config.target_parameters, where.param_path)
    ]
    for name in matched:
        if name not in layers:
            module = model.get_submodule(name)
            raise SlimtuneError(
                f"target_modules={target!r} matches {name!r}, a {type(module).__name__}: LoRA "
                "wraps only Linear, Conv1D and Linear4bit layers"
            )
    return matched


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
    if config.target_modules == "all-linear" or config.target_parameters:
        unfuse_experts(model)  # one layer per expert, which LoRA then wraps like any other
    targets = find_targets(model, config)
    if not targets:
        raise SlimtuneError(
            f"target_modules={config.target_modules!r} matches no layer of the model"
        )
    loftq = None
    if config.init == "loftq":
        loftq = (config.loftq_quant or QuantConfig(), config.loftq_iters)
    experts = expert_layers(model)
    if config.use_dora and any(name in experts for name in targets):
        raise SlimtuneError(
            "DoRA does not apply to the experts of a mixture of experts (nor in PEFT)"
        )
    for name in targets:
        layer = _wrap(model, name)
        # Experts take r and alpha (PEFT: one rank per fused parameter), and no dropout.
        key = None if name in experts else name
        layer.add_adapter(
            adapter_name,
            r=config.rank_for(key) if key else config.r,
            alpha=config.alpha_for(key) if key else config.alpha,
            scaling=config.scaling_for(key) if key else _scaling(config, config.r, config.alpha),
            dropout=config.dropout if key else 0.0,
            use_dora=config.use_dora,
            init=config.init,
            loftq=loftq,
        )
        layer.train(
            layer.base_layer.training
        )  # new modules follow the model's mode (eval: no dropout)
    configs[adapter_name] = config
    freeze_base(model)
    if activate:
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


def fuse_shared_inputs(model: nn.Module) -> int:
    """Link the LoRA layers of `model` that read one input (SHARED_INPUTS), so that their A
    products run as one; returns how many groups. Outputs and gradients are unchanged (up to
    float rounding); idempotent."""
    groups = 0
    for module in model.modules():
        for names in SHARED_INPUTS:
            members = [getattr(module, name, None) for name in names]
            members = [m for m in members if isinstance(m, LoraLinear)]
            if len(members) < 2 or len({m.in_features for m in members}) > 1:
                continue
            group = SharedInput(members)
            for member in members:
                member.shared = group
            groups += 1
    return groups


def _scaling(config: LoraConfig, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def rank_of(config: LoraConfig, name: str, experts: dict) -> int:
    """The rank `inject_adapter` gives layer `name` (experts: `r`, whatever the patterns)."""
    return config.r if name in experts else config.rank_for(name)
