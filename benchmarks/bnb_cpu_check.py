"""Where bitsandbytes' CPU kernels depart from the 4-bit format, on the machine this runs on.

    .venv/bin/python benchmarks/bnb_cpu_check.py

1. dequantize_4bit of a 200 x 96 float32 tensor (blocksize 64, so rows are not a multiple of
   the blocksize) against the format's definition, value = code[nibble] * absmax[i // 64].
   On AVX-512 CPUs bitsandbytes 0.50.2 runs a row-wise kernel that indexes absmax per row
   (row * (96 // 64) + col // 64) and gets most values wrong; elsewhere it is exact.
2. Linear4bit in eval mode without gradients against the float32 definition. On CPUs with
   AVX512_BF16 bitsandbytes repacks the weight and multiplies in bfloat16 whatever its
   compute_dtype, so the output moves by about bf16's rounding; elsewhere it is float32.
3. dequantize_4bit of that same layer after its eval forward. The repacking is in place, and
   dequantize_4bit reads the repacked bytes as the standard layout, so everything that
   dequantizes the layer afterwards (PEFT's DoRA weight norm, merging) gets scrambled values.
The test suite checks slimtune against the definition everywhere and against bitsandbytes where
bitsandbytes computes it (tests/oracles.py).
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from slimtune.hardware import machine_record


def dequantize_check() -> dict:
    torch.manual_seed(0)
    x = torch.randn(200, 96)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
    theirs = bnbf.dequantize_4bit(packed, state).view(x.shape)
    flat = packed.view(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], 1).view(-1).long()
    block = torch.arange(x.numel()) // 64
    definition = (state.code[nibbles] * state.absmax[block]).view(x.shape)
    return {
        "shape": list(x.shape),
        "blocksize": 64,
        "values_differing": int((theirs != definition).sum()),
        "values": x.numel(),
    }


def linear_check() -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False)
    layer = layer.to("cpu").eval()
    state = layer.weight.quant_state
    weight = bnbf.dequantize_4bit(layer.weight.data, state)  # 256 columns: a multiple of 64
    x = torch.randn(4, 256)
    reference = x @ weight.T
    with torch.no_grad():
        out = layer(x)
    error = float((out - reference).norm() / reference.norm())
    after = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return {
        "bf16_fast_path": bool(layer.support_avx512bf16_for_cpu),
        "relative_error_vs_float32": error,
        "dequantize_after_forward_relative_error": float(
            (after.view(weight.shape) - weight).norm() / weight.norm()
        ),
    }


def main() -> None:
    report = {
        "machine": machine_record(),
        "bitsandbytes": bnb.__version__,
        "dequantize_4bit": dequantize_check(),
        "linear4bit_eval": linear_check(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
