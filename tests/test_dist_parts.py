"""Sharded loading for FSDP (slimtune.dist.parts): a process that loads with `LoadedPart` holds
its rows of the base, never the whole base; the rows of all processes make the whole model.
From a float folder (quantized as it streams in) and from a 4-bit folder.

The 2-process check that a model loaded in parts shards into exactly the shards of a model
loaded whole is in test_dist.py; `torchrun ... train --fsdp` loads in parts (test_fsdp_train.py).
"""

from __future__ import annotations

import array
import os
from pathlib import Path

import pytest
import torch
from helpers import save_char_model
from torch import nn

from slimtune.dist import LoadedPart, part_rows
from slimtune.dist.parts import WHOLE_SHAPES, _widen
from slimtune.models import load_model, save_quantized_model
from slimtune.quant import Linear4bit, QuantConfig

# A LLaMA whose 8 blocks outweigh the rest, as in a large model; an odd vocabulary, so that the
# embeddings and the output layer do not split evenly.
SHAPE = dict(
    vocab_size=101,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
)


@pytest.mark.parametrize("length", [0, 1, 5, 8, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_part_rows_are_torch_chunks(length, world):
    """fully_shard leaves rank r torch.chunk's r-th chunk (or nothing): the rows kept here."""
    rows = torch.arange(length)
    chunks = list(torch.chunk(rows, world)) if length else []
    for rank in range(world):
        start, stop = part_rows(length, rank, world)
        expected = chunks[rank] if rank < len(chunks) else rows[:0]
        assert torch.equal(rows[start:stop], expected)


class HeldBytes:
    """A `keep_part` that counts the bytes the loaded tensors hold: each tensor whole when it is
    put in place, then (with `keep`) only what `keep` left of it. `peak` is the most held at
    any moment; `largest` the largest tensor placed."""

    def __init__(self, keep: LoadedPart | None = None) -> None:
        self.keep, self.held, self.peak, self.largest = keep, 0, 0, 0

    def __call__(self, module: nn.Module, name: str) -> None:
        placed = _nbytes(module, name)
        self.held += placed
        self.peak, self.largest = max(self.peak, self.held), max(self.largest, placed)
        if self.keep is not None:
            self.keep(module, name)
            self.held -= placed - _nbytes(module, name)


def _nbytes(module: nn.Module, name: str) -> int:
    tensor = module._parameters.get(name, module._buffers.get(name))
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@pytest.fixture(scope="module", params=["float", "4-bit"])
def folder(request, tmp_path_factory) -> Path:
    """A float folder (quantized while it streams in) or a 4-bit folder (read as stored)."""
    root = tmp_path_factory.mktemp("parts")
    float_folder = save_char_model(root / "float", **SHAPE)
    if request.param == "float":
        return float_folder
    model, tokenizer = load_model(float_folder, quant=QuantConfig())
    return save_quantized_model(model, tokenizer, root / "4bit")


def _load(folder: Path, counter: HeldBytes) -> nn.Module:
    model, _ = load_model(folder, quant=QuantConfig(), keep_part=counter)
    return model


def test_a_sharded_load_never_holds_the_whole_base(folder):
    whole = HeldBytes()
    reference = _load(folder, whole)
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    total += sum(b.numel() * b.element_size() for b in reference.buffers())
    assert whole.peak == whole.held and whole.held > 0.95 * total  # every tensor passes by

    for rank in (0, 1):
        parted = HeldBytes(LoadedPart(rank, 2))
        _load(folder, parted)
        # Its half of the base, and at most one tensor whole on top (the one being cut).
        assert parted.held <= 0.51 * whole.held
        assert parted.peak <= parted.held + parted.largest
        assert parted.peak < 0.6 * whole.held  # the whole base would be 1.0


def test_the_parts_of_all_ranks_make_the_whole_model(folder):
    reference = _load(folder, HeldBytes())
    parts = [_load(folder, HeldBytes(LoadedPart(rank, 2))) for rank in (0, 1)]
    modules = [dict(p.named_modules()) for p in parts]
    cut = 0
    for path, module in reference.named_modules():
        shapes = getattr(modules[0][path], WHOLE_SHAPES, {})
        for name, shape in shapes.items():
            pieces = [getattr(m[path], name).detach() for m in modules]
            whole = getattr(module, name).detach()
            assert shape == whole.shape and torch.equal(torch.cat(pieces), whole), path
            cut += 1
    quantized = [m for m in reference.modules() if isinstance(m, Linear4bit)]
    # codes, absmax and nested absmax of every 4-bit layer, the norms, embeddings, output layer
    assert cut == 3 * len(quantized) + 2 * SHAPE["num_hidden_layers"] + 3


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) as train() sets it, for the test's time."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def _resident_mib(tensor: torch.Tensor) -> float:
    """How much of `tensor`'s memory is backed by pages, from the present bit of each of its
    pages in /proc/self/pagemap. Unlike the process's RSS, no other allocation, free or garbage
    collection running meanwhile moves this count."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    stop = start + tensor.numel() * tensor.element_size()
    first, last = start // page, (stop - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = array.array("Q", pagemap.read((last - first + 1) * 8))
    present = sum(entry >> 63 for entry in entries)
    return present * page / 2**20


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads /proc")
def test_a_widened_part_costs_its_rows_not_the_whole(deterministic):
    """The whole-shaped tensor fully_shard receives holds only this rank's rows: the pages of
    the others are never touched, so they take no memory, even under deterministic algorithms
    (as training runs), which fill new tensors with NaN."""
    whole_shape, mib = torch.Size((256 * 2**20, 1)), 2**20  # 256 MiB of uint8
    part = torch.ones((128 * mib, 1), dtype=torch.uint8)  # rank 1's half
    wide = _widen(part, whole_shape, rank=1, world_size=2)
    assert torch.utils.deterministic.fill_uninitialized_memory  # left as it was
    assert torch.equal(wide[128 * mib :], part)
    assert 127 < _resident_mib(wide) < 132  # its 128 MiB of rows, not 256
    written = torch.ones(whole_shape, dtype=torch.uint8)
    assert _resident_mib(written) > 255  # the measure does see a tensor written whole
