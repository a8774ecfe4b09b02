"""Error-compensated 4-bit rounding (GPTQ, Frantar et al. 2022) of merged weights, into NF4 in
bitsandbytes' layout and into GGUF's block types, so a merged fine-tune survives the trip back
to 4 bits.

Plain rounding of a merged weight W + dW to the NF4 grid gives back the base's codes almost
everywhere: a LoRA update is usually smaller than half a grid step. GPTQ rounds one input column
at a time and pushes each column's rounding error onto the columns not rounded yet, weighted by
the inverse Hessian H = sum x x^T of the layer's inputs on calibration rows, so that the layer's
*outputs* on such inputs stay close to the merged layer's: many sub-step updates that rounding
erases one by one add up to code changes where the inputs make them count.

The block scales are those plain rounding would pick, fixed before the column sweep; only the
codes change, so the files load as plain rounding's do. NF4: absmax double-quantized as
bitsandbytes does, codes packed first element in the high nibble, so `Linear4bit` and
transformers + bitsandbytes load the result. GGUF (`gguf_gptq_codes`): the scales and mins of
the blocks llama.cpp's quantizer writes, and codes on the grid they give.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from slimtune.quant import Linear4bit, QuantConfig, codebook, dynamic_map
from slimtune.quant.blockwise import QuantState, nearest_code
from slimtune.quant.double_quant import dequantize_absmax, quantize_absmax

COLUMNS_PER_STEP = 128  # GPTQ's lazy batch: columns updated together before the rest


@torch.no_grad()
def input_hessians(
    model: nn.Module, paths: list[str], batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """H = sum over calibration tokens of x x^T (float32, in x in) for the input of every Linear
    layer in `paths`, from forward passes of `model` over `batches` of input ids."""
    hessians: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(path):
        def collect(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if path not in hessians:
                hessians[path] = torch.zeros(x.shape[1], x.shape[1])
            hessians[path].addmm_(x.t(), x)

        return collect

    for path in paths:
        hooks.append(model.get_submodule(path).register_forward_hook(hook(path)))
    try:
        for ids in batches:
            model(ids)
    finally:
        for handle in hooks:
            handle.remove()
    return hessians


def fixed_scales(weight: torch.Tensor, blocksize: int, double_quant: bool):
    """(absmax as stored in the QuantState, float32 absmax the codes are scaled by)."""
    absmax = weight.reshape(-1, blocksize).abs().amax(dim=1)
    if not double_quant:
        return absmax, absmax, None
    codes, nested, offset = quantize_absmax(absmax)
    return codes, dequantize_absmax(codes, nested, offset), (nested, offset)


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, round_column: Callable, damp: float = 0.01
) -> torch.Tensor:
    """uint8 codes (out x in) of `weight` rounded column by column with error feedback.
    `round_column(w, j) -> (codes, values)` rounds column j (values: what the codes decode to)."""
    W = weight.detach().float().clone()
    rows, columns = W.shape
    H = hessian.clone().double()
    dead = torch.diag(H) == 0  # inputs never seen: nothing to compensate, rounding alone
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(columns, dtype=H.dtype)
    # The upper Cholesky factor of H^-1: row i holds the updates for columns after i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Hinv = Hinv.float()
    codes = torch.empty(rows, columns, dtype=torch.uint8)
    for start in range(0, columns, COLUMNS_PER_STEP):
        end = min(start + COLUMNS_PER_STEP, columns)
        W1 = W[:, start:end].clone()
        errors = torch.zeros_like(W1)
        H1 = Hinv[start:end, start:end]
        for i in range(end - start):
            codes[:, start + i], values = round_column(W1[:, i], start + i)
            error = (W1[:, i] - values) / H1[i, i]
            W1[:, i:].sub_(error[:, None] * H1[i, i:][None, :])
            errors[:, i] = error
        W[:, end:].sub_(errors @ Hinv[start:end, end:])
    return codes


def gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scales: torch.Tensor,
    blocksize: int = 64,
    damp: float = 0.01,
) -> torch.Tensor:
    """NF4 codes of `weight`; `scales`: one float32 absmax per `blocksize` values of a row."""
    rows, columns = weight.shape
    scale = scales.reshape(rows, columns // blocksize).clamp(min=1e-38)
    values = codebook("nf4")

    def round_column(w: torch.Tensor, j: int):
        s = scale[:, j // blocksize]
        q = nearest_code((w / s).clamp_(-1, 1), "nf4")
        return q, values[q.long()] * s

    return gptq_round(weight, hessian, round_column, damp)


def gguf_gptq_codes(
    weight: torch.Tensor, hessian: torch.Tensor, blocks: np.ndarray, ggml_type, damp: float = 0.01
) -> np.ndarray:
    """`blocks`, a GGUF quantizer's rounding of `weight` (Q4_0, Q5_0, Q8_0, Q4_K or Q6_K), with
    their codes chosen again by GPTQ: every scale and min the quantizer picked is kept, so the
    bytes outside the codes are the quantizer's, and each group's codes stay on the grid those
    scales give (`gguf_codes`)."""
    from slimtune.export.gguf_codes import LAYOUTS, code_grid, with_codes

    layout = LAYOUTS[ggml_type]
    low, step = (torch.from_numpy(a) for a in code_grid(blocks, ggml_type, tuple(weight.shape)))
    divisor = torch.where(step == 0, 1.0, step)  # a zero step: every code decodes to low

    def round_column(w: torch.Tensor, j: int):
        group = j // layout.group
        q = torch.round((w - low[:, group]) / divisor[:, group]).clamp_(0, layout.top)
        return q.to(torch.uint8), low[:, group] + q * step[:, group]

    codes = gptq_round(weight, hessian, round_column, damp)
    return with_codes(blocks, codes.numpy(), ggml_type)


def gptq_linear4bit(linear: nn.Linear, hessian: torch.Tensor, config=None):
    """An NF4 `Linear4bit` of `linear` with GPTQ-rounded codes (see the module docstring)."""
    from dataclasses import replace

    config = config or QuantConfig()
    weight = linear.weight.detach().float()
    stored, scales, nested = fixed_scales(weight, config.blocksize, config.double_quant)
    codes = gptq_codes(weight, hessian, scales, config.blocksize).reshape(-1)
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    state = QuantState(absmax=stored, shape=weight.shape, dtype=linear.weight.dtype,
                       blocksize=config.blocksize, quant_type="nf4", code=codebook("nf4"))  # fmt: skip
    if nested is not None:
        state = replace(state, offset=nested[1], nested_absmax=nested[0], nested_code=dynamic_map())
    layer = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, config,
                       linear.weight.dtype, "meta")  # fmt: skip
    layer._set_state(packed, state)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer
