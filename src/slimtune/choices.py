"""The values a setting can take, each list defined once and imported wherever it is checked.

Plain tuples with no torch import, so that `slimtune --help` (which builds its flags from the
training config) stays fast.
"""

from __future__ import annotations

METHODS = ("lora", "qlora", "full")
OBJECTIVES = ("sft", "dpo", "orpo")
# 4-bit code books: nf4 and fp4 are bitsandbytes'; int4 (a uniform grid) is slimtune's alone.
QUANT_TYPES = ("nf4", "fp4", "int4")
BNB_QUANT_TYPES = ("nf4", "fp4")
# Values per absmax of blockwise quantization: powers of two, as bitsandbytes allows.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# What the frozen base multiplies in; "auto" picks bfloat16 where the device has it natively.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"
# The dtype a merged model folder is written in (the short names of `slimtune merge --dtype`).
MERGED_DTYPES = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
# Where `generate`, `eval` and `serve` run the model; "auto": a CUDA GPU when there is one.
INFERENCE_DEVICES = (AUTO, "cpu", "cuda")
# How `generate`, `eval` and `serve` hold a base: as the adapter was trained, 4 bits, or float.
INFERENCE_QUANTS = (AUTO, *QUANT_TYPES, "none")
# How LoRA's A and B start: PEFT's default (kaiming), gaussian, PiSSA, LoftQ.
LORA_INITS = ("kaiming", "gaussian", "pissa", "loftq")
# GGUF weight types `slimtune export` writes: a merged model takes all; llama.cpp's adapter
# files keep to the float types and Q8_0.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
GGUF_ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")
