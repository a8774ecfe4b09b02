"""The reference libraries slimtune is tested against, and where bitsandbytes' CPU kernels are
known to depart from the format they implement.

The oracles are imported outright: a missing bitsandbytes, peft or transformers fails the suite
instead of skipping the checks that need them.

bitsandbytes 0.50.2 takes other CPU kernels on AVX-512 machines (decided at run time):
- `dequantize_4bit` runs a row-wise AVX-512 loop whenever a row's length is a multiple of 16 and
  the blocksize is 16..2047. It indexes absmax as `row * (cols // blocksize) + col // blocksize`,
  which is the format's `(row * cols + col) // blocksize` only when `cols` is a multiple of the
  blocksize. Elsewhere the values are wrong (the packed bytes and absmax it reads are right).
- `Linear4bit` in eval mode, with an input that needs no gradient, on a CPU with AVX512_BF16,
  repacks its weight and multiplies in bfloat16 (input, codes and absmax rounded to bf16, the
  output rounded to bf16), whatever `compute_dtype` says. It repacks the weight in place (into
  a [out, in/2] tile layout, absmax transposed to bf16), and its `dequantize_4bit` does not know
  that layout: whatever dequantizes the layer afterwards reads scrambled values. PEFT's DoRA does,
  in every forward (for the weight norm), so PEFT's DoRA over bitsandbytes is wrong there.
`benchmarks/bnb_cpu_check.py` shows both on the machine it runs on. Tests compare slimtune with
the format's definition everywhere, and with bitsandbytes wherever bitsandbytes computes it.

`SLIMTUNE_EMULATE_BNB_AVX512=1` makes bitsandbytes behave here as it does on an AVX512_BF16 CPU
(both departures above, emulated in torch), so the suite's expectations for those machines can
be checked on any CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import peft  # noqa: F401  (required oracle)
import torch
import transformers  # noqa: F401  (required oracle)

from slimtune.hardware import cpu_flags

EMULATE_AVX512 = os.environ.get("SLIMTUNE_EMULATE_BNB_AVX512") == "1"

# bfloat16's unit roundoff (8 significant bits).
BF16_EPS = 2.0**-8


def bnb_takes_avx512_kernels() -> bool:
    return EMULATE_AVX512 or "avx512f" in cpu_flags()


def bnb_linear4bit_computes_in_bf16() -> bool:
    return EMULATE_AVX512 or bnbf.has_avx512bf16()


def bnb_dequantize_is_wrong(shape: tuple[int, ...], blocksize: int) -> bool:
    """True where bitsandbytes' CPU dequantize_4bit misplaces absmax for a tensor of `shape`."""
    if len(shape) < 2 or not bnb_takes_avx512_kernels():
        return False
    rows, cols = int(torch.Size(shape[:-1]).numel()), shape[-1]
    return rows > 1 and cols % 16 == 0 and 16 <= blocksize < 2048 and cols % blocksize != 0


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a packed tensor, first element in the high nibble, as int64."""
    flat = packed.view(torch.uint8).reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], 1).reshape(-1).long()


def format_dequantize(
    packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, shape, blocksize
):
    """The format's definition: value i = code[nibble i] * absmax[i // blocksize], float32."""
    n = int(torch.Size(shape).numel())
    block = torch.arange(n) // blocksize
    return (code.float()[nibbles(packed)[:n]] * absmax.float()[block]).reshape(shape)


def dequantize_reference(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit where it is right; the format's definition where it is not."""
    shape = tuple(state.shape)
    if not bnb_dequantize_is_wrong(shape, state.blocksize):
        return bnbf.dequantize_4bit(packed, state).view(shape)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return format_dequantize(packed, state.code, absmax, shape, state.blocksize).to(state.dtype)


@contextlib.contextmanager
def bnb_float32_path(model: torch.nn.Module):
    """bitsandbytes' Linear4bit layers of `model` computing as their compute_dtype says, their
    AVX512_BF16 fast path switched off while the block runs (a no-op elsewhere)."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    saved = [m.support_avx512bf16_for_cpu for m in layers]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.support_avx512bf16_for_cpu = value


# How far bitsandbytes' bf16 CPU path may take logits from float32, as a share of their norm.
# Each 4-bit layer rounds its input, its weights (codes and absmax) and its output to bf16
# (2^-8 relative error each), and layers compound it. Measured with the emulation below: 0.2-0.4%
# on the tiny LLaMAs, 3.4% on a merged model whose random adapter makes its activations large;
# the bound is 16 x 2^-8 = 6.25%, about twice the worst measured.
BF16_PATH_RELATIVE_ERROR = 16 * BF16_EPS


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def bnb_bf16_path_runs(model: torch.nn.Module) -> bool:
    """bitsandbytes repacks a layer for its bf16 CPU kernel only if its out_features is a
    multiple of 32 (it asserts so); elsewhere that path raises."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return all(layer.out_features % 32 == 0 for layer in layers)


def _dora_over_bnb_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The bitsandbytes Linear4bit layers under a PEFT DoRA adapter."""
    return [
        m.get_base_layer()
        for m in model.modules()
        if any(getattr(m, "use_dora", {}).values())
        and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)
    ]


def assert_close_to_bnb(
    ours: torch.Tensor,
    model: torch.nn.Module,
    run: Callable[[], torch.Tensor],
    atol: float,
    rtol: float = 0.0,
) -> None:
    """`ours` equals what the bitsandbytes `model` computes in float32 (within `atol`), and what
    its default CPU path computes: within `atol` too, or within bf16 rounding where that path
    computes in bf16."""
    with bnb_float32_path(model), torch.no_grad():
        torch.testing.assert_close(run(), ours, rtol=rtol, atol=atol)
    if bnb_linear4bit_computes_in_bf16() and not bnb_bf16_path_runs(model):
        return  # bitsandbytes' bf16 repacking raises on such layers: no default path to compare
    dora = _dora_over_bnb_layers(model)
    if bnb_linear4bit_computes_in_bf16() and dora:
        _assert_dora_reads_repacked_weights(dora[0], run)
        return  # its default path is wrong (module docstring): the float32 path is the oracle
    with torch.no_grad():
        default = run()
    if bnb_linear4bit_computes_in_bf16():
        assert relative_error(default, ours) < BF16_PATH_RELATIVE_ERROR
    else:
        torch.testing.assert_close(default, ours, rtol=rtol, atol=atol)


def _assert_dora_reads_repacked_weights(layer: torch.nn.Module, run: Callable[[], torch.Tensor]):
    before = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    with torch.no_grad():
        run()
    state = layer.weight.quant_state
    assert state.packing_format_for_cpu, "bitsandbytes no longer repacks on its bf16 path: update"
    after = bnbf.dequantize_4bit(layer.weight.data, state).float()
    # bf16 absmax alone would move values by 2^-8 relative; scrambled ones move by their size.
    assert relative_error(after, before) > 0.5, (
        "bitsandbytes now dequantizes its repacked CPU weights: compare DoRA's default path again"
    )


# ---- emulation of the AVX-512 kernels (off unless SLIMTUNE_EMULATE_BNB_AVX512=1) ----


def _rowwise_dequantize(A, absmax, blocksize, quant_type, shape, dtype):
    rows, cols = int(torch.Size(shape[:-1]).numel()), shape[-1]
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    codes = nibbles(A).reshape(rows, cols)
    col_block = torch.arange(cols) // blocksize
    index = torch.arange(rows)[:, None] * (cols // blocksize) + col_block[None, :]
    return (code[codes] * absmax.float()[index]).to(dtype).reshape(shape)


def _repacked_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [out, in] codes of a weight in bitsandbytes' CPU tile layout (tiles of 32 rows, each
    byte a pair of rows 16 apart within the tile's 64 nibbles)."""
    tiles = packed.reshape(-1, 32)
    pairs = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # 32 low nibbles, then 32 high
    pairs = pairs.reshape(out_features // 32, in_features // 2, 32, 2).transpose(1, 2)
    return pairs.reshape(out_features, in_features).long()


def _linear4bit_bf16_forward(self, x):
    if not getattr(self.weight.quant_state, "packing_format_for_cpu", False):
        # In place, with bitsandbytes' own conversion, as its forward does.
        self.weight.data, _ = bnbf._convert_weight_packed_for_cpu(
            self.weight.data, self.weight.quant_state
        )
    state = self.weight.quant_state
    out_features, in_features = state.shape
    code = bnbf.get_4bit_type(state.quant_type, device="cpu").to(torch.bfloat16).float()
    codes = _repacked_codes(self.weight.data, out_features, in_features)
    scale = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)  # bf16 already
    weight = code[codes] * scale  # exact in float32
    y = x.to(torch.bfloat16).float() @ weight.T
    y = y.to(torch.bfloat16).float()
    if self.bias is not None:
        y = y + self.bias.float()
    return y.to(x.dtype)


def install_avx512_emulation() -> None:
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    @torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")
    def _(A, absmax, blocksize, quant_type, shape, dtype):
        if bnb_dequantize_is_wrong(tuple(shape), blocksize):
            return _rowwise_dequantize(A, absmax, blocksize, quant_type, tuple(shape), dtype)
        code = bnbf.get_4bit_type(quant_type, device="cpu")
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    forward = bnb.nn.Linear4bit.forward
    bnb.nn.modules.has_avx512bf16 = lambda: True  # what Linear4bit reads at construction

    def emulated_forward(self, x):
        fast = self.support_avx512bf16_for_cpu and not self.training and not x.requires_grad
        if x.device.type == "cpu" and fast:
            return _linear4bit_bf16_forward(self, x)
        return forward(self, x)

    bnb.nn.Linear4bit.forward = emulated_forward
