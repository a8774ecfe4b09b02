"""Linear4bit: a frozen linear layer whose weight lives in 4 bits and is decoded per call.

The packed weight and its quantization state are buffers, so `.to()`, `state_dict()` and
`deepcopy` just work (`store_as_parameters` makes them frozen parameters for FSDP). The float weight exists only inside one forward or one backward: forward
decodes it for the matmul and drops it; backward decodes it again for the input gradient. There
is never a weight gradient (QLoRA trains adapters around the frozen base).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.hardware import dtype_name
from slimtune.quant.blockwise import QuantState, dequantize_4bit, quantize_4bit
from slimtune.quant.codebook import codebook, dynamic_map
from slimtune.quant.config import QuantConfig
from slimtune.quant.double_quant import NESTED_BLOCKSIZE
from slimtune.quant.matmul import input_grad_4bit, linear_4bit

# Tensors whose dtype is part of the format: model.half() / .to(bfloat16) must not touch them.
_STATE_TENSORS = ("weight", "absmax", "nested_absmax", "offset")


class _Dequantize4bitLinear(torch.autograd.Function):
    """y = x @ W.T + b with W decoded from 4 bits in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, bias, packed, state, compute_dtype):
        ctx.packed, ctx.state, ctx.compute_dtype = packed, state, compute_dtype
        ctx.has_bias = bias is not None
        return linear_4bit(x, packed, state, bias, compute_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad_4bit(grad_out, ctx.packed, ctx.state, ctx.compute_dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A frozen float nn.Linear holding `weight` [out, in] (not copied) and a copy of `bias`: a
    4-bit layer decoded, or a merged weight."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


class Linear4bit(nn.Module):
    """A frozen nn.Linear stored as blockwise 4-bit codes (NF4, FP4 or Int4).

    Build one with `Linear4bit.from_linear(linear, config)`; the constructor alone makes an
    empty (all-zero) layer of the right shape, ready for `load_state_dict`.
    """

    # The tensors FSDP can shard (on dim 0), as parameters: `offset` is a 0-dim scalar.
    SHARDABLE = ("weight", "absmax", "nested_absmax")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: QuantConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config or QuantConfig()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize = config.quant_type, config.blocksize
        self.compute_dtype = config.compute_dtype
        self.weight_dtype = dtype  # the dtype the weight had when quantized (bitsandbytes' "dtype")
        numel = in_features * out_features
        if numel % config.blocksize:
            raise SlimtuneError(
                f"cannot quantize a {out_features}x{in_features} linear weight with blocksize "
                f"{config.blocksize}: {numel} values is not a multiple of the blocksize"
            )
        blocks = numel // config.blocksize
        self.register_buffer("weight", torch.zeros(numel // 2, 1, dtype=torch.uint8, device=device))
        if config.double_quant:
            nested = -(-blocks // NESTED_BLOCKSIZE)
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(nested, device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("offset", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: QuantConfig | None = None) -> Linear4bit:
        """Quantize an nn.Linear (or a transformers Conv1D, whose weight is (in, out))."""
        config = config or QuantConfig()
        weight = linear.weight.detach()
        if type(linear).__name__ == "Conv1D":
            weight = weight.t()
        out_features, in_features = weight.shape
        bias = getattr(linear, "bias", None)
        # Built on the meta device: the real buffers come from quantize_4bit just below.
        layer = cls(in_features, out_features, bias is not None, config, weight.dtype, "meta")
        packed, state = quantize_4bit(
            weight.contiguous(), config.quant_type, config.blocksize, config.double_quant
        )
        layer._set_state(packed, state)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def _set_state(self, packed: torch.Tensor, state: QuantState) -> None:
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.register_buffer("offset", state.offset)

    def store_as_parameters(self) -> None:
        """Hold the packed codes and the absmax scales (double-quantized: codes and nested
        scales) as frozen `nn.Parameter`s instead of buffers. FSDP shards parameters on dim 0 and
        leaves buffers whole on every rank; the tensors, the forward pass and the state dict are
        the same either way."""
        for name in self.SHARDABLE:
            tensor = self._buffers.get(name)
            if tensor is not None:
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> QuantState:
        """The state of the current buffers (built on access, so it follows `.to()`)."""
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=codebook(self.quant_type),
            offset=self.offset,
            nested_absmax=self.nested_absmax,
            nested_code=dynamic_map() if self.double_quant else None,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight, (out_features, in_features), in `dtype` (default: compute_dtype)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _Dequantize4bitLinear.apply(
            x, bias, self.weight, self.quant_state, self.compute_dtype
        )
        return out.to(in_dtype)

    def _apply(self, fn, recurse: bool = True):
        # Let .to(device) move the state but keep its dtypes: a float16 absmax would no longer
        # be the format (and would decode different weights). Parameters (store_as_parameters)
        # are changed in place by nn.Module._apply, so their old data is kept aside by alias.
        before = {}
        for store in (self._buffers, self._parameters):
            for name in _STATE_TENSORS:
                if store.get(name) is not None:
                    before[name] = store[name].detach()
        super()._apply(fn, recurse)
        for name, old in before.items():
            if name in self._buffers and self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
            elif name in self._parameters and self._parameters[name].dtype != old.dtype:
                self._parameters[name].data = old.to(self._parameters[name].device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # --- bitsandbytes' state-dict layout ------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in self.bnb_state_items().items():
            destination[prefix + key] = value if keep_vars else value.detach()

    def bnb_state_items(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under bitsandbytes' Linear4bit keys, in bitsandbytes' order."""
        items: dict[str, torch.Tensor] = {"weight": self.weight}
        if self.bias is not None:
            items["bias"] = self.bias
        items["weight.absmax"] = self.absmax
        items["weight.quant_map"] = codebook(self.quant_type)
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.weight_dtype),
            "shape": [self.out_features, self.in_features],
        }
        if self.double_quant:
            items["weight.nested_absmax"] = self.nested_absmax
            items["weight.nested_quant_map"] = dynamic_map().clone()
            meta.update(
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_dtype="float32",
                nested_offset=self.offset.item(),
            )
        blob = json.dumps(meta).encode("utf-8")
        items[f"weight.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8
        )
        return items

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        mine = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        meta_keys = [k for k in mine if k.startswith("weight.quant_state.bitsandbytes__")]
        required = ["weight", "weight.absmax"] + meta_keys[:1]
        if self.bias is not None:
            required.append("bias")
        missing = [prefix + k for k in required if k not in mine] if meta_keys else []
        if not meta_keys:
            missing.append(prefix + "weight.quant_state.bitsandbytes__<quant_type>")
        if missing:
            missing_keys.extend(missing)
            return
        try:
            self._load_bnb_items(mine, meta_keys[0])
        except SlimtuneError as err:
            error_msgs.append(f"{prefix}weight: {err}")
            return
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(mine["bias"])
        known = {
            "weight",
            "bias",
            "weight.absmax",
            "weight.quant_map",
            "weight.nested_absmax",
            "weight.nested_quant_map",
            meta_keys[0],
        }
        if strict:
            unexpected_keys.extend(prefix + k for k in mine if k not in known)

    def _load_bnb_items(self, items: dict[str, torch.Tensor], meta_key: str) -> None:
        meta = json.loads(bytes(items[meta_key].tolist()).decode("utf-8"))
        quant_type = meta["quant_type"]
        shape = tuple(meta["shape"])
        if shape != (self.out_features, self.in_features):
            raise SlimtuneError(
                f"stored weight has shape {list(shape)}, this layer is "
                f"{[self.out_features, self.in_features]}"
            )
        config = QuantConfig(
            quant_type=quant_type,
            blocksize=meta["blocksize"],
            double_quant="nested_absmax" in meta or "weight.nested_absmax" in items,
            compute_dtype=self.compute_dtype,
        )
        if "weight.quant_map" in items and not torch.equal(
            items["weight.quant_map"].float().cpu(), codebook(quant_type)
        ):
            raise SlimtuneError(f"weight.quant_map is not the standard {quant_type} code book")
        device = self.weight.device
        self.quant_type, self.blocksize = config.quant_type, config.blocksize
        self.weight_dtype = getattr(torch, meta["dtype"])
        self.register_buffer("weight", items["weight"].to(device, torch.uint8).reshape(-1, 1))
        if config.double_quant:
            if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
                raise SlimtuneError("only nested blocksize 256 is supported")
            self.register_buffer("absmax", items["weight.absmax"].to(device, torch.uint8))
            self.register_buffer(
                "nested_absmax", items["weight.nested_absmax"].to(device, torch.float32)
            )
            self.register_buffer(
                "offset", torch.tensor(float(meta["nested_offset"]), device=device)
            )
        else:
            self.register_buffer("absmax", items["weight.absmax"].to(device, torch.float32))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("offset", None)
        expected = self.in_features * self.out_features
        if self.weight.numel() * 2 != expected or self.absmax.numel() * self.blocksize != expected:
            raise SlimtuneError(
                f"stored tensors do not fit a {self.out_features}x{self.in_features} weight "
                f"at blocksize {self.blocksize}"
            )
