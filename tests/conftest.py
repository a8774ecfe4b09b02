"""Fixtures: tiny models built in code (tests/helpers.py), and the real default model for `slow`
tests."""

from __future__ import annotations

import os

from slimtune.runtime import tune_process

# The thread policy `slimtune` itself runs under (spinning OpenMP threads stall a busy machine);
# set before torch loads OpenMP.
tune_process()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from helpers import make_tiny_gpt2, make_tiny_llama  # noqa: E402
from oracles import EMULATE_AVX512, install_avx512_emulation  # noqa: E402

if EMULATE_AVX512:
    install_avx512_emulation()

# tests/gpu needs a CUDA device, which CI does not have: `make test-gpu` runs it.
collect_ignore = [] if os.environ.get("SLIMTUNE_TEST_GPU") == "1" else ["gpu"]


@pytest.fixture
def one_thread():
    """Run a test on one thread: small tensors gain nothing from a second one, and on a busy
    machine the OpenMP hand-offs cost far more than the work (measured 25-100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32, loaded once per session."""
    from slimtune.models import load_model

    return load_model()
