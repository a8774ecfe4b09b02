"""LoRA adapters: the layer, injection, many named adapters, merge, combine, PEFT-format files."""

from slimtune.lora.adapters import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    lora_configs,
    lora_layers,
    per_sample_adapters,
    set_active_adapters,
)
from slimtune.lora.combine import combine_adapters
from slimtune.lora.config import LoraConfig
from slimtune.lora.inject import find_targets, fuse_shared_inputs, inject_adapter
from slimtune.lora.io import load_adapter, save_adapter
from slimtune.lora.layer import LoraLinear, set_sparse_dropout
from slimtune.lora.merge import MergeReport, merge_adapter, unmerge_adapter
from slimtune.lora.params import count_parameters, lora_parameters, trainable_summary
from slimtune.lora.pissa import pissa_to_lora

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "MergeReport",
    "active_adapters",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "find_targets",
    "fuse_shared_inputs",
    "inject_adapter",
    "load_adapter",
    "lora_configs",
    "lora_layers",
    "lora_parameters",
    "merge_adapter",
    "per_sample_adapters",
    "pissa_to_lora",
    "save_adapter",
    "set_active_adapters",
    "set_sparse_dropout",
    "trainable_summary",
    "unmerge_adapter",
]
