"""A mixture of experts as one Linear layer per expert, so that 4-bit quantization and LoRA treat
experts like any other linear layer.

transformers stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE ... fused: `gate_up_proj`
(experts, 2 x intermediate, hidden) and `down_proj` (experts, hidden, intermediate), applied as
`linear(x, gate_up_proj[e])`. `ExpertList` holds the same weights as `gate_up_proj[e]` and
`down_proj[e]` Linear layers (views of the fused tensors, no copy) and runs the routing loop of
transformers' eager forward, so outputs are unchanged. `fuse()` gives the original module back
(for saving a merged model in transformers' layout).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

FUSED = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts in the layout `ExpertList` computes exactly: two 3-D weights
    applied as linear(x, w[e]), no biases, an `act_fn` on the gate half."""
    params = module._parameters
    return (
        all(isinstance(params.get(n), nn.Parameter) and params[n].dim() == 3 for n in FUSED)
        and len(params) == 2
        and hasattr(module, "act_fn")
        and not getattr(module, "is_transposed", False)
    )


class ExpertList(nn.Module):
    """`gate_up_proj[e]` and `down_proj[e]`: nn.ModuleLists of one layer per expert (nn.Linear,
    Linear4bit, or a LoRA wrapper of either)."""

    def __init__(self, shell: nn.Module, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        self.gate_up_proj = nn.ModuleList(gate_up)
        self.down_proj = nn.ModuleList(down)
        self.num_experts = len(gate_up)
        self.act_fn = shell.act_fn
        self.__dict__["shell"] = shell  # the fused module without its weights (not a submodule)

    @classmethod
    def from_fused(cls, module: nn.Module) -> ExpertList:
        gate_up = [_linear(weight) for weight in module.gate_up_proj]
        down = [_linear(weight) for weight in module.down_proj]
        shell = copy.copy(module)
        shell._parameters = {}
        shell._modules = dict(module._modules)
        return cls(shell, gate_up, down)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # transformers' eager experts forward, with the experts' own layers as the projections.
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit:
            e = int(index[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            rows = token_idx, hidden_states.shape[0]
            x = hidden_states[token_idx]
            gate, up = _per_sample(self.gate_up_proj[e], x, *rows).chunk(2, dim=-1)
            out = _per_sample(self.down_proj[e], self.act_fn(gate) * up, *rows)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The original fused module holding these weights (4-bit ones decoded to float)."""
        module = copy.copy(self.shell)
        module._parameters = {}
        module._modules = dict(self.shell._modules)
        for name in FUSED:
            weights = [_dense(layer) for layer in getattr(self, name)]
            module._parameters[name] = nn.Parameter(torch.stack(weights), requires_grad=False)
        return module


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by an ExpertList; returns how many."""
    found = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    for name, module in found:
        _replace(model, name, ExpertList.from_fused(module))
    return len(found)


def fuse_experts(model: nn.Module) -> int:
    """Undo `unfuse_experts` (after merging: every expert layer must be a plain or 4-bit one)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertList)]
    for name, module in found:
        _replace(model, name, module.fuse())
    return len(found)


def _per_sample(layer: nn.Module, x: torch.Tensor, token_idx: torch.Tensor, tokens: int):
    """layer(x) for the tokens `token_idx` of the flattened batch, under per-sample adapters
    (slimtune.lora.per_sample_adapters: the layer's `sample_groups` name batch rows, here narrowed
    to the rows of these tokens)."""
    groups = getattr(layer, "sample_groups", None)
    if groups is None:
        return layer(x)
    batch = layer.sample_batch
    token_rows = token_idx // (tokens // batch)  # tokens are flattened batch-major
    local = []
    for name, rows in groups:
        if rows is None:
            local.append((name, None))
            continue
        positions = torch.isin(token_rows, rows).nonzero().squeeze(1)
        if len(positions):
            local.append((name, positions))
    spans = layer.sample_spans  # the batch's rows, not these tokens: not for the local groups
    layer.sample_groups, layer.sample_batch, layer.sample_spans = local, x.shape[0], None
    try:
        return layer(x)
    finally:
        layer.sample_groups, layer.sample_batch, layer.sample_spans = groups, batch, spans


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    return layer


def _dense(layer: nn.Module) -> torch.Tensor:
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    return layer.weight.detach()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
