"""Initialisations of A and B: PEFT's kaiming/gaussian, PiSSA and LoftQ.

All work on a float32 weight W of shape [out, in] and return A [r, in], B [out, r] such that the
layer's output at init is what the method promises (scaling * B @ A is what the layer adds).
"""

from __future__ import annotations

import math

import torch

from slimtune.quant import dequantize_4bit, quantize_4bit


def kaiming_(A: torch.Tensor) -> None:
    # PEFT's default: A as nn.Linear initialises its weight; B = 0: the adapter starts as a no-op.
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))


def gaussian_(A: torch.Tensor, r: int) -> None:
    torch.nn.init.normal_(A, std=1 / r)


def svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD. On CPU it runs on one thread: LAPACK's threaded SVD is many times slower when
    the cores are busy (1536x576 on the shared 2-core box: 0.5 s on 1 thread, 2.9-5 s on 2)."""
    if M.device.type != "cpu":
        return torch.linalg.svd(M, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(M, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def _split_svd(M: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B with scaling * B @ A = the best rank-r approximation of M (sqrt(S) on each side)."""
    U, S, Vh = svd(M)
    root = (S[:r] / scaling).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root


@torch.no_grad()
def pissa(
    W: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: the adapter takes the r principal singular directions of W. -> (A, B, residual)"""
    W = W.float()
    A, B = _split_svd(W, r, scaling)
    return A, B, W - scaling * (B @ A)


@torch.no_grad()
def loftq(
    W: torch.Tensor, r: int, scaling: float, quant_config, iters: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: alternate 4-bit quantization and rank-r SVD so that Q(W_q) + scaling * B @ A ~ W.

    Returns (A, B, W_q): the base layer is the 4-bit quantization of W_q (W minus the previous
    low-rank part); A, B approximate what that quantization left out.
    """
    W = W.float()
    target = W
    for step in range(iters):
        packed, state = quantize_4bit(
            target,
            quant_type=quant_config.quant_type,
            blocksize=quant_config.blocksize,
            double_quant=quant_config.double_quant,
        )
        A, B = _split_svd(W - dequantize_4bit(packed, state, torch.float32), r, scaling)
        if step + 1 < iters:
            target = W - scaling * (B @ A)
    return A, B, target
