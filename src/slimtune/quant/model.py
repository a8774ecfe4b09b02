"""quantize_model: swap a model's linear layers for Linear4bit in place, one layer at a time."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.config import QuantConfig
from slimtune.quant.linear import Linear4bit
from slimtune.targets import matches_target, output_head


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def select_linear_layers(
    model: nn.Module, targets: str | Sequence[str] | None = None, include_lm_head: bool = False
) -> list[str]:
    """Names of the linear layers quantize_model would replace (see there)."""
    head = None if include_lm_head else output_head(model)
    return [
        name
        for name, module in model.named_modules()
        if _is_linear(module) and module is not head and matches_target(name, targets)
    ]


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    targets: str | Sequence[str] | None = None,
    include_lm_head: bool = False,
) -> nn.Module:
    """Replace linear layers by Linear4bit, in place, and return the model.

    By default every linear layer but the output head (`get_output_embeddings()`); embeddings
    are never linear layers. `targets` narrows the choice: a list of module names or name
    suffixes (["q_proj", "v_proj"]), or a regular expression matched against the full name.
    Layers are swapped one at a time and the float layer is dropped straight away, so peak
    memory stays near the final model plus one float layer.
    """
    config = config or QuantConfig()
    names = select_linear_layers(model, targets, include_lm_head)
    if targets is not None and not names:
        raise SlimtuneError(f"quantization targets {targets!r} match no linear layer")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        quantized = Linear4bit.from_linear(getattr(parent, child), config)
        setattr(parent, child, quantized)  # the last reference to the float layer goes here
    return model
