"""AdamW whose moments may be stored in 8 bits and/or paged to host memory.

One update rule (decoupled weight decay, bias-corrected moments, as torch.optim.AdamW and
bitsandbytes compute it), two independent storage choices:

- `state_bits=8`: each moment of a tensor with at least `min_8bit_size` elements is kept
  blockwise-quantized (see quant8.py): 2 bytes per parameter plus one float32 per 256 values
  instead of 8 bytes. Each step dequantizes one tensor's moments, updates them in float32 and
  quantizes them back, so only one tensor's float moments exist at a time.
- `paged=True`: the state lives in host memory (pinned when CUDA is present) and is copied to
  the parameter's device for its update, then back. On a CPU the host *is* the device, so the
  state is ordinary memory and the optimizer behaves exactly as the unpaged one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from slimtune.optim import quant8

MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (state name, signed dynamic map)


class AdamW(torch.optim.Optimizer):
    """AdamW with optional 8-bit moments (`state_bits=8`) and paged state (`paged=True`)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 32,
        paged: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr} betas={betas} eps={eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state_bits = state_bits
        self.paged = paged
        self.min_8bit_size = min_8bit_size

    # -- where the state lives -------------------------------------------------------------

    def _host(self) -> torch.device:
        return torch.device("cpu")

    def _state_tensor(self, like: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if not self.paged or like.device.type == "cpu":
            return torch.zeros(numel, dtype=dtype, device=like.device)
        pin = torch.cuda.is_available()
        return torch.zeros(numel, dtype=dtype, device=self._host(), pin_memory=pin)

    def _quantized(self, p: torch.Tensor) -> bool:
        return self.state_bits == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        n = p.numel()
        for name, _ in MOMENTS:
            if self._quantized(p):
                state[name] = self._state_tensor(p, torch.uint8, n)
                state[f"{name}_absmax"] = self._state_tensor(p, torch.float32, quant8.num_blocks(n))
            else:
                state[name] = self._state_tensor(p, torch.float32, n)
        return state

    def _read_moment(self, state: dict, name: str, signed: bool, device: torch.device):
        stored = state[name].to(device, non_blocking=True)
        if stored.dtype != torch.uint8:
            return stored
        absmax = state[f"{name}_absmax"].to(device, non_blocking=True)
        return quant8.dequantize_blockwise(stored, absmax, signed)

    def _write_moment(self, state: dict, name: str, signed: bool, value: torch.Tensor) -> None:
        stored = state[name]
        if stored.dtype == torch.uint8:
            absmax = state[f"{name}_absmax"]
            if stored.device == value.device:
                quant8.quantize_blockwise(value, signed, stored, absmax)
                return
            codes = torch.empty_like(value, dtype=torch.uint8)
            scales = torch.empty_like(absmax, device=value.device)
            quant8.quantize_blockwise(value, signed, codes, scales)
            stored.copy_(codes)
            absmax.copy_(scales)
        elif stored.data_ptr() != value.data_ptr():
            stored.copy_(value)  # paged: back to host memory

    # -- the update ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("slimtune AdamW does not support sparse gradients")
        state = self.state[p] or self._init_state(p)
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        state["step"] += 1
        t = state["step"].item()

        grad = p.grad.reshape(-1).float()
        # The parameter itself when it is contiguous float32; else a float32 copy written back.
        work = p.detach().float().reshape(-1)
        exp_avg = self._read_moment(state, "exp_avg", True, p.device)
        exp_avg_sq = self._read_moment(state, "exp_avg_sq", False, p.device)

        work.mul_(1 - lr * wd)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**t
        bias2 = math.sqrt(1 - beta2**t)
        denom = (exp_avg_sq.sqrt() / bias2).add_(eps)
        work.addcdiv_(exp_avg, denom, value=-lr / bias1)

        if work.data_ptr() != p.data_ptr():
            p.detach().copy_(work.view(p.shape))
        self._write_moment(state, "exp_avg", True, exp_avg)
        self._write_moment(state, "exp_avg_sq", False, exp_avg_sq)

    # -- checkpoints ---------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype and device; ours keep their
        # own dtypes (uint8 codes, float32 moments and scales) and, when paged, host memory.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value) and key != "step":
                    self.state[p][key] = self._placed(value, p)

    def _placed(self, value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if self.paged and p.device.type != "cpu":
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
            return host.copy_(value)
        return value.to(p.device, copy=True)


class AdamW8bit(AdamW):
    """AdamW with blockwise 8-bit moments (bitsandbytes' AdamW8bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, state_bits=8, **kw)


class PagedAdamW(AdamW):
    """AdamW with 32-bit moments kept in host memory (bitsandbytes' PagedAdamW)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, paged=True, **kw)


class PagedAdamW8bit(AdamW):
    """AdamW with 8-bit moments kept in host memory (bitsandbytes' PagedAdamW8bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, state_bits=8, paged=True, **kw)
