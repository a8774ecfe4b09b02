"""The adapter branch with dropout, result + scaling * B(A(dropout(x))), as one autograd function.

nn.Dropout draws a random number for every input value (a sizeable share of a CPU QLoRA step)
and autograd keeps both the mask and a dropped copy of the input for the backward pass (the
largest share of the activations). Here:

- the dropped positions are drawn as gaps between drops (Geometric(p)), which is the same i.i.d.
  Bernoulli(p) process but needs ~p x numel draws instead of numel;
- nothing wide is stored: the input `x` is saved by reference (the base layer and sibling
  adapters often share it), with the drop positions (int64, p x 8 bytes per value instead of
  the 5 bytes of mask and copy), and 1 / (1 - p) scales the narrow (tokens x r) side instead of
  the wide input.

The seed of each draw comes from torch's default generator, so `torch.manual_seed` and a saved
RNG state reproduce a run exactly, as with nn.Dropout (the masks themselves differ from it).

On the CPU not even a dropped copy is made: A(dropout(x)) is A(x) minus what the dropped values
contribute, and the gradients are corrected the same way, a few small loops (p x numel values
times r each). The draws and the loops run in C on torch's threads (`dropout.c`); without the C
kernels, numpy draws the positions (other masks for the same seed) and numba runs the loops on
one thread. Elsewhere (a GPU, or neither) the copy is made and zeroed.
"""

from __future__ import annotations

import ctypes
import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from slimtune.quant import native
from slimtune.quant.kernels import as_numpy

SOURCE = Path(__file__).with_name("dropout.c")
_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@cache
def _library() -> ctypes.CDLL | None:
    """The C draws and loops; None where the C kernels are off or cannot build."""
    signatures = {
        "slim_drop_positions": [_i64, ctypes.c_double, ctypes.c_uint64, _p, _i64, _int],
        "slim_remove_from_low": [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _int],
        "slim_remove_from_grad_a_t": [_p, _p, _p, _p, _i64, _i64, _i64, _int],
        "slim_zero_at": [_p, _p, _i64, _int],
        "slim_remove_from_grad_x": [_p, _p, _p, _p, _i64, _i64, _i64, _int],
    }
    lib = native.companion(SOURCE, "dropout", signatures, "the C dropout")
    if lib is not None:
        lib.slim_drop_positions.restype = _i64  # a count, not a status
    return lib


def drop_positions(numel: int, p: float, seed: int) -> Tensor:
    """Flat indices (int64, ascending) of the values to drop: each index with probability p
    in (0, 1). The same for the same seed, whatever the number of threads."""
    lib = _library()
    if lib is None:
        return _numpy_positions(numel, p, seed)
    mean = numel * p
    room = int(mean + 8 * math.sqrt(mean) + 64)  # more is needed at odds below 1e-15
    while True:
        out = torch.empty(room, dtype=torch.int64)
        count = lib.slim_drop_positions(numel, p, seed, out.data_ptr(), room,
                                        torch.get_num_threads())  # fmt: skip
        if count < 0:
            raise MemoryError(f"no memory to draw the dropout of {numel} values")
        if count <= room:
            return out[:count]
        room = count


def _numpy_positions(numel: int, p: float, seed: int) -> Tensor:
    """drop_positions without the C kernels: numpy's geometric gaps, in one thread."""
    rng = np.random.Generator(np.random.SFC64(seed))
    mean = numel * p
    chunk = int(mean + 8 * math.sqrt(mean) + 16)  # one draw covers numel but for ~1e-15 odds
    found, last = [], -1
    while last < numel - 1:
        ends = np.cumsum(rng.geometric(p, chunk)) + last  # geometric gaps are >= 1
        found.append(ends)
        last = int(ends[-1])
    positions = np.concatenate(found)
    return torch.from_numpy(positions[: np.searchsorted(positions, numel)])


def _new_seed() -> int:
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@cache
def _kernels():
    """The loops over the dropped positions (remove_from_low, remove_from_grad_a_t, zero_at,
    remove_from_grad_x; numpy arguments): C where it builds, else numba, else None."""
    lib = _library()
    if lib is not None:
        return _native_loops(lib)
    return _numba_loops()


def _address(array: np.ndarray) -> int:
    if not array.flags.c_contiguous:  # the C loops index rows by their width
        raise ValueError("the dropout loops take C-contiguous arrays")
    return array.ctypes.data


def _native_loops(lib: ctypes.CDLL) -> tuple:
    """dropout.c's loops with the numba loops' arguments, on torch's threads."""
    threads = torch.get_num_threads

    def remove_from_low(low, x, a_t, positions):
        lib.slim_remove_from_low(_address(low), _address(x), _address(a_t), _address(positions),
                                 positions.size, x.shape[0], x.shape[1], low.shape[1],
                                 threads())  # fmt: skip

    def remove_from_grad_a_t(grad_a_t, x, g_low, positions):
        lib.slim_remove_from_grad_a_t(_address(grad_a_t), _address(x), _address(g_low),
                                      _address(positions), positions.size, x.shape[1],
                                      grad_a_t.shape[1], threads())  # fmt: skip

    def zero_at(flat, positions):
        lib.slim_zero_at(_address(flat), _address(positions), positions.size, threads())

    def remove_from_grad_x(grad_x, g_low, a_t, positions):
        lib.slim_remove_from_grad_x(_address(grad_x), _address(g_low), _address(a_t),
                                    _address(positions), positions.size, grad_x.shape[1],
                                    g_low.shape[1], threads())  # fmt: skip

    return remove_from_low, remove_from_grad_a_t, zero_at, remove_from_grad_x


def _numba_loops():
    """numba loops over the dropped positions, or None when numba is not importable."""
    try:
        import numba
    except ImportError:
        return None

    # Positions ascend, so the row is tracked by steps (an integer division per position cost
    # more than the rest), and A is read as A.T: the r values of column j sit side by side.
    @numba.njit(cache=True, nogil=True)
    def remove_from_low(low, x, a_t, positions):  # pragma: no cover - compiled
        # low[i] -= x[i, j] * A[:, j]: the dropped value's share of x @ A.T
        width, i, row_start = x.shape[1], 0, 0
        for f in positions:
            while f >= row_start + width:
                i += 1
                row_start += width
            j = f - row_start
            v = x[i, j]
            for k in range(low.shape[1]):
                low[i, k] -= v * a_t[j, k]

    @numba.njit(cache=True, nogil=True)
    def remove_from_grad_a_t(grad_a_t, x, g_low, positions):  # pragma: no cover - compiled
        # grad_A[:, j] -= g_low[i] * x[i, j]: the dropped value's share of g_low.T @ x
        width, i, row_start = x.shape[1], 0, 0
        for f in positions:
            while f >= row_start + width:
                i += 1
                row_start += width
            j = f - row_start
            v = x[i, j]
            for k in range(grad_a_t.shape[1]):
                grad_a_t[j, k] -= g_low[i, k] * v

    @numba.njit(cache=True, nogil=True)
    def zero_at(flat, positions):  # pragma: no cover - compiled
        for f in positions:
            flat[f] = 0.0

    @numba.njit(cache=True, nogil=True)
    def remove_from_grad_x(grad_x, g_low, a_t, positions):  # pragma: no cover - compiled
        # grad_x[i, j] -= g_low[i] . A[:, j]: what a dropped value would have received
        width, i, row_start = grad_x.shape[1], 0, 0
        for f in positions:
            while f >= row_start + width:
                i += 1
                row_start += width
            j = f - row_start
            total = 0.0
            for k in range(g_low.shape[1]):
                total += g_low[i, k] * a_t[j, k]
            grad_x[i, j] -= total

    return remove_from_low, remove_from_grad_a_t, zero_at, remove_from_grad_x


def _in_place(x: Tensor, A: Tensor) -> bool:
    """Whether the numba loops apply: contiguous float32 CPU tensors."""
    ok = x.device.type == "cpu" and x.dtype == A.dtype == torch.float32
    return ok and x.is_contiguous() and A.is_contiguous() and _kernels() is not None


def _dropped(x: Tensor, positions: Tensor) -> Tensor:
    """A copy of x (flattened to 2-D) with the values at `positions` set to zero."""
    out = x.reshape(-1, x.shape[-1]).clone()
    out.view(-1).index_fill_(0, positions, 0.0)
    return out


def _low(x: Tensor, A: Tensor, positions: Tensor) -> Tensor:
    """dropout(x) @ A.T before the 1 / (1 - p) scale, as 2-D (tokens x r)."""
    if not _in_place(x, A):
        return _dropped(x, positions) @ A.t()
    x2d = x.view(-1, x.shape[-1])
    low = x2d @ A.t()
    a_t = A.detach().t().contiguous()  # A itself at rank 1: as_numpy leaves FSDP its storage
    _kernels()[0](low.numpy(), x2d.numpy(), as_numpy(a_t), positions.numpy())
    return low


def _grad_a(g_low: Tensor, x: Tensor, positions: Tensor) -> Tensor:
    """g_low.T @ dropout(x) (before the scale), (r x in)."""
    if not _in_place(x, g_low):
        return g_low.t() @ _dropped(x, positions)
    x2d = x.view(-1, x.shape[-1])
    grad_a_t = x2d.t() @ g_low
    _kernels()[1](grad_a_t.numpy(), x2d.numpy(), g_low.numpy(), positions.numpy())
    return grad_a_t.t()


def _zero_at(values: Tensor, positions: Tensor) -> Tensor:
    flat = values.view(-1)
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and _kernels() is not None:
        _kernels()[2](flat.numpy(), positions.numpy())
        return values
    return flat.index_fill_(0, positions, 0.0).view(values.shape)


class SparseDropoutLora(torch.autograd.Function):
    """result + scaling * B(A(dropout_p(x))) for float tensors of one dtype; p in (0, 1)."""

    @staticmethod
    def forward(ctx, result, x, A, B, scaling: float, p: float):
        # Drawn on the CPU (numpy), used where x lives.
        positions = drop_positions(x.numel(), p, _new_seed()).to(x.device)
        keep_scale = 1.0 / (1.0 - p)
        low = _low(x, A, positions).mul_(keep_scale)
        out = torch.addmm(result.reshape(-1, B.shape[0]), low, B.t(), alpha=scaling)
        ctx.save_for_backward(x, positions, low, A, B)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, positions, low, A, B = ctx.saved_tensors
        g = grad_out.reshape(-1, B.shape[0])
        grad_B = grad_x = grad_A = None
        if ctx.needs_input_grad[3]:
            grad_B = (g.t() @ low).mul_(ctx.scaling)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_low = (g @ B).mul_(ctx.scaling * ctx.keep_scale)
            if ctx.needs_input_grad[2]:
                grad_A = _grad_a(g_low, x, positions)
            if ctx.needs_input_grad[1]:
                grad_x = _zero_at(g_low @ A, positions).view(x.shape)
        return grad_out, grad_x, grad_A, grad_B, None, None
