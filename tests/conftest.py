"""Shared fixtures: tiny models built in code, and the real default model for `slow` tests."""

from __future__ import annotations

import os

from slimtune.runtime import tune_process

# The thread policy `slimtune` itself runs under (spinning OpenMP threads stall a busy machine);
# set before torch loads OpenMP.
tune_process()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from oracles import EMULATE_AVX512, install_avx512_emulation  # noqa: E402

if EMULATE_AVX512:
    install_avx512_emulation()

# tests/gpu needs a CUDA device, which CI does not have: `make test-gpu` runs it.
collect_ignore = [] if os.environ.get("SLIMTUNE_TEST_GPU") == "1" else ["gpu"]


def make_tiny_llama(seed: int = 0, **overrides):
    """A LLaMA-architecture causal LM small enough for unit tests (hidden 64, 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    return model.eval()


def make_tiny_gpt2(seed: int = 0):
    """A GPT-2 (Conv1D layers) causal LM for tests of the Conv1D path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


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
