"""The C dropout (slimtune/lora/dropout.c): its draws, and its loops against dense torch
formulas, on one thread and on two, at sizes that split the work between threads."""

from __future__ import annotations

import pytest
import torch

from slimtune.lora import sparse_dropout
from slimtune.lora.sparse_dropout import drop_positions

pytestmark = pytest.mark.skipif(
    sparse_dropout._library() is None, reason="the C kernels do not build here"
)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_the_draw_depends_on_the_seed_alone():
    n, p = 300_001, 0.05  # five segments of 65,536 values, the last one short
    before = torch.get_num_threads()
    try:
        draws = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            draws.append(drop_positions(n, p, seed=5))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    # Each segment draws its own share: none is empty or doubled.
    per_segment = torch.bincount(draws[0] // 65_536, minlength=5).float()
    sigma = (65_536 * p * (1 - p)) ** 0.5
    assert bool(((per_segment[:4] - 65_536 * p).abs() < 5 * sigma).all())


@pytest.mark.parametrize("p", [0.001, 0.05, 0.9])
def test_every_value_is_dropped_at_rate_p_wherever_it_sits(p):
    n = 400_000
    positions = drop_positions(n, p, seed=3)
    assert bool((positions[1:] > positions[:-1]).all()) and int(positions.max()) < n
    # The rate holds in each quarter and at segment starts (a restarted gap process).
    for quarter in range(4):
        inside = ((positions >= quarter * n // 4) & (positions < (quarter + 1) * n // 4)).sum()
        sigma = (n / 4 * p * (1 - p)) ** 0.5
        assert abs(int(inside) - n / 4 * p) < 5 * sigma


def test_values_at_the_edges_of_segments_drop_at_rate_p():
    # A segment's first and last values are where an off-by-one in the gaps would show.
    edges = torch.tensor([0, 65_535, 65_536, 131_071, 131_072, 196_607])
    hits = sum(int(torch.isin(edges, drop_positions(200_000, 0.5, seed)).sum())
               for seed in range(100))  # fmt: skip
    trials = 100 * len(edges)
    assert abs(hits - trials / 2) < 5 * (trials / 4) ** 0.5


def test_without_the_c_kernels_numpy_draws(monkeypatch):
    monkeypatch.setattr(sparse_dropout, "_library", lambda: None)
    positions = drop_positions(100_000, 0.1, seed=2)
    assert abs(positions.numel() - 10_000) < 5 * (100_000 * 0.09) ** 0.5
    assert torch.equal(positions, sparse_dropout._numpy_positions(100_000, 0.1, 2))


def _case(rows=512, width=576, r=16, p=0.05, seed=9):
    torch.manual_seed(seed)
    x = torch.randn(rows, width)
    positions = drop_positions(x.numel(), p, seed)
    assert positions.numel() > 4096  # enough for the loops to split between threads
    dropped = torch.zeros(x.numel())
    dropped[positions] = x.view(-1)[positions]
    return x, positions, dropped.view(rows, width), torch.randn(width, r), torch.randn(rows, r)


def test_the_loops_take_out_exactly_the_dropped_values(threads):
    remove_from_low, remove_from_grad_a_t, zero_at, remove_from_grad_x = sparse_dropout._kernels()
    x, positions, dropped, a_t, g_low = _case()
    numpy_positions = positions.numpy()

    low = x @ a_t
    expected = low - dropped @ a_t
    remove_from_low(low.numpy(), x.numpy(), a_t.numpy(), numpy_positions)
    torch.testing.assert_close(low, expected, rtol=1e-5, atol=1e-4)

    grad_a_t = x.t() @ g_low
    expected = grad_a_t - dropped.t() @ g_low
    remove_from_grad_a_t(grad_a_t.numpy(), x.numpy(), g_low.numpy(), numpy_positions)
    torch.testing.assert_close(grad_a_t, expected, rtol=1e-5, atol=1e-4)

    grad_x = g_low @ a_t.t()
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[positions] = True
    expected = grad_x.masked_fill(mask.view(x.shape), 0.0)
    remove_from_grad_x(grad_x.numpy(), g_low.numpy(), a_t.numpy(), numpy_positions)
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=1e-4)

    values = torch.randn(x.shape)
    expected = values.masked_fill(mask.view(x.shape), 0.0)
    zero_at(values.view(-1).numpy(), numpy_positions)
    assert torch.equal(values, expected)


def test_the_loops_refuse_strided_arrays():
    remove_from_low = sparse_dropout._kernels()[0]
    x, positions, _, a_t, _ = _case()
    low = (x @ a_t).t().contiguous().t()  # column-major
    with pytest.raises(ValueError, match="C-contiguous"):
        remove_from_low(low.numpy(), x.numpy(), a_t.numpy(), positions.numpy())
