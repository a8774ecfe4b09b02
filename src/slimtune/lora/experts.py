"""LoRA on the experts of a mixture of experts, in PEFT's `target_parameters` file layout.

slimtune holds fused experts as an ExpertList (`slimtune.models.experts`): one layer per expert,
`<experts>.gate_up_proj.<e>` and `<experts>.down_proj.<e>`, each wrapped in a LoraLinear of its
own, so 4 bits, many adapters, merging and per-sample adapters work on experts as on any layer.

PEFT adapts the fused 3-D parameter `experts.gate_up_proj` (experts E, out, in) with one pair
lora_A (E x r, in) and lora_B (out, r x E): expert e's update is B_e @ A_e with
A_e = A.view(E, r, in)[e] and B_e = B.view(out, r, E)[:, :, e] (PEFT's ParamWrapper). Several
parameters of one module nest in the module's parameter order: of k targeted parameters
p_0, ..., p_k-1 (gate_up_proj first), p_i's tensors are saved under
`<experts>` + ".base_layer" x (k - 1 - i). PEFT's fused experts take no dropout, so neither
do slimtune's expert layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtune.models.experts import FUSED, ExpertList


@dataclass(frozen=True)
class ExpertLayer:
    module: str  # the ExpertList's path, e.g. model.layers.0.mlp.experts
    param: str  # gate_up_proj or down_proj
    expert: int

    @property
    def param_path(self) -> str:
        return f"{self.module}.{self.param}"


def expert_layers(model: nn.Module) -> dict[str, ExpertLayer]:
    """Every per-expert layer path of the model's ExpertLists."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertList):
            for param in FUSED:
                for e in range(module.num_experts):
                    found[f"{name}.{param}.{e}"] = ExpertLayer(name, param, e)
    return found


def matches_parameter(targets: list[str] | None, param_path: str) -> bool:
    """PEFT's rule for target_parameters: the parameter's path equals or ends with a target."""
    return any(param_path == t or param_path.endswith("." + t) for t in targets or ())


def target_parameters_of(model: nn.Module, paths: list[str]) -> list[str]:
    """The `target_parameters` naming exactly the experts of `paths` (gate_up before down)."""
    layers = expert_layers(model)
    params = {layers[p].param for p in paths if p in layers}
    return [f"experts.{param}" for param in FUSED if param in params]


def nested_key(module: str, index: int, count: int) -> str:
    """PEFT's key stem for the index-th of `count` target parameters of one module."""
    return module + ".base_layer" * (count - 1 - index)


def to_peft(
    model: nn.Module, adapter: str, layers: dict[str, nn.Module], order: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """{PEFT key stem: {"A", "B"}} for the LoRA expert layers in `layers` (path -> LoraLinear);
    `order`: the target_parameters written in the config."""
    experts = expert_layers(model)
    groups: dict[tuple[str, str], dict[int, nn.Module]] = {}
    for path, layer in layers.items():
        where = experts[path]
        groups.setdefault((where.module, where.param), {})[where.expert] = layer
    out = {}
    for (module, param), by_expert in groups.items():
        targeted = _targeted(module, order)
        index, count = targeted.index(param), len(targeted)
        A = torch.cat([by_expert[e].lora_A[adapter].weight for e in sorted(by_expert)])
        B = torch.stack([by_expert[e].lora_B[adapter].weight for e in sorted(by_expert)], dim=-1)
        out[nested_key(module, index, count)] = {"A": A, "B": B.flatten(1)}
    return out


def from_peft(
    model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]], order: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's fused expert tensors (key stem -> {"A", "B"}) as per-expert layer tensors; other
    entries pass through unchanged."""
    experts = expert_layers(model)
    modules = sorted({layer.module for layer in experts.values()})
    out = dict(tensors)
    for module in modules:
        targeted = _targeted(module, order)
        for index, param in enumerate(targeted):
            stem = nested_key(module, index, len(targeted))
            if stem not in out:
                continue  # reported as a missing key by the caller's check
            parts = out.pop(stem)
            n = model.get_submodule(module).num_experts
            A, B = parts.get("A"), parts.get("B")
            for e in range(n):
                per = {}
                if A is not None and A.shape[0] % n == 0:
                    per["A"] = A.view(n, -1, A.shape[-1])[e]
                if B is not None and B.shape[-1] % n == 0:
                    per["B"] = B.view(B.shape[0], -1, n)[:, :, e]
                out[f"{module}.{param}.{e}"] = per
    return out


def _targeted(module: str, targets: list[str]) -> list[str]:
    """The fused parameters of `module` that `targets` select, innermost first: PEFT nests its
    wrappers in the module's parameter order (gate_up_proj, then down_proj), whatever the order
    of target_parameters (which its configs may even store sorted)."""
    return [param for param in FUSED if matches_parameter(targets, f"{module}.{param}")]
