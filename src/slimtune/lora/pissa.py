"""A trained PiSSA adapter as a plain LoRA adapter on the original weights (PEFT's conversion on
save).

PiSSA starts the adapter from the r principal singular directions of W and leaves the base the
rest: W_res = W - s * B0 @ A0. After training, base + adapter is

    W_res + s * B @ A = W + s * (B @ A - B0 @ A0) = W + s * [B, B0] @ [A; -A0]

a LoRA adapter of rank 2r on W itself, which every loader applies to the weights it has: PEFT,
`slimtune generate`, `slimtune serve` next to other adapters, `slimtune merge`. The scaling s
stays: alpha doubles (s = alpha / r), or grows by sqrt(2) with rsLoRA (s = alpha / sqrt(r)).
A DoRA magnitude stays valid too: it rescales W_res + s * B @ A, which is the same matrix.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from slimtune.lora.inject import lora_configs, lora_layers


def pissa_to_lora(model: nn.Module, adapter_name: str = "default") -> int:
    """Convert PiSSA adapter `adapter_name` in place (see the module doc); returns the number
    of layers converted (0: the adapter did not start from PiSSA, nothing changes)."""
    config = lora_configs(model)[adapter_name]
    grow = math.sqrt(2) if config.use_rslora else 2.0
    layers = [layer for _, layer in lora_layers(model) if adapter_name in layer.pissa_start]
    for layer in layers:
        layer.pissa_to_lora(adapter_name, layer.lora_alpha[adapter_name] * grow)
    if layers:
        lora_configs(model)[adapter_name] = dataclasses.replace(
            config,
            r=2 * config.r,
            alpha=config.alpha * grow,
            rank_pattern={key: 2 * rank for key, rank in config.rank_pattern.items()},
            alpha_pattern={key: alpha * grow for key, alpha in config.alpha_pattern.items()},
            init="kaiming",
        )
    return len(layers)
