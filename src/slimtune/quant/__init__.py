"""4-bit quantization: code books, blockwise (de)quantization, Linear4bit, whole models.

Formats are bitsandbytes' exactly (NF4/FP4 values, packing, double quantization, state-dict keys),
so a model quantized here and one quantized by bitsandbytes hold the same bytes.
"""

from slimtune.quant.blockwise import QuantState, dequantize_4bit, quantize_4bit
from slimtune.quant.codebook import QUANT_TYPES, codebook, dynamic_map
from slimtune.quant.config import QuantConfig
from slimtune.quant.linear import Linear4bit, frozen_linear
from slimtune.quant.model import quantize_model, select_linear_layers
from slimtune.quant.report import LayerStorage, StorageReport, storage_report
from slimtune.quant.serialize import (
    load_quantized_safetensors,
    load_quantized_state_dict,
    quantized_state_dict,
    save_quantized_safetensors,
)

__all__ = [
    "QUANT_TYPES",
    "LayerStorage",
    "Linear4bit",
    "QuantConfig",
    "QuantState",
    "StorageReport",
    "codebook",
    "dequantize_4bit",
    "dynamic_map",
    "frozen_linear",
    "load_quantized_safetensors",
    "load_quantized_state_dict",
    "quantize_4bit",
    "quantize_model",
    "quantized_state_dict",
    "save_quantized_safetensors",
    "select_linear_layers",
    "storage_report",
]
