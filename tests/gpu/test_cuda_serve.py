"""The serving engine on a CUDA GPU (`slimtune serve --device cuda`): a 4-bit base with several
LoRA adapters, one batch mixing them. Each request's greedy tokens in a mixed batch equal the
tokens it gets alone, and the tokens the same engine gives on the CPU (the oracle the CPU suite
checks against PEFT).

Needs a CUDA device: run with `make test-gpu` (see tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPTS, generation_request, make_peft_adapter, make_tiny_llama, save_tiny_model

from slimtune.devices import device_of
from slimtune.lora import lora_layers
from slimtune.serve.build import build_engine

if not torch.cuda.is_available():
    raise RuntimeError("tests/gpu needs a CUDA device: run `make test` on a machine without one")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")

# Each prompt's adapter: every adapter and the base in one batch, not ordered by adapter (decode
# steps take the stacked path, the prefill the per-slice one).
MIXED = [None, "a", "b", "c", "a", "c"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model folder, [(adapter name, folder)]): the tiny LLaMA with large weights (clear
    argmax margins, so float rounding differences between devices do not flip a token)."""
    root = tmp_path_factory.mktemp("served")
    model = save_tiny_model(root / "tiny", initializer_range=0.3)
    base = make_tiny_llama()
    adapters = [
        (n, make_peft_adapter(base, root / n, s)) for n, s in [("a", 1), ("b", 2), ("c", 3)]
    ]
    return model, adapters


def _requests(tokenizer) -> list:
    # Different lengths: rows leave the running batch at different steps (keep_rows).
    return [
        generation_request(tokenizer, prompt, adapter, max_tokens=3 + 2 * i, ignore_eos=True)
        for i, (prompt, adapter) in enumerate(zip(PROMPTS, MIXED, strict=True))
    ]


def _alone(engine) -> list[list[int]]:
    return [engine.submit(r).result(120).token_ids for r in _requests(engine.tokenizer)]


def _together(engine) -> list[list[int]]:
    requests = _requests(engine.tokenizer)
    # Queued while the engine cannot take any: they meet in one prefill (the condition is
    # re-entrant, so submit() takes it again).
    with engine._cond:
        for request in requests:
            engine.submit(request)
    return [r.result(120).token_ids for r in requests]


@pytest.fixture(scope="module")
def cpu_tokens(served):
    """Each request's greedy tokens alone, on the CPU engine over the same 4-bit base."""
    model, adapters = served
    engine, _ = build_engine(str(model), qlora=True, adapters=adapters, device=CPU)
    try:
        alone = _alone(engine)
        assert _together(engine) == alone
    finally:
        engine.stop()
    assert [len(ids) for ids in alone] == [3 + 2 * i for i in range(len(PROMPTS))]
    return alone


@pytest.mark.parametrize(
    "options",
    [{}, {"lean": False}, {"four_bit": False}],
    ids=["lean-4bit", "transformers-4bit", "lean-decoded"],
)
def test_cuda_engine_mixed_batches_equal_alone_and_the_cpu(served, cpu_tokens, options):
    """Adapters a and b loaded with the engine, c at run time: all on the GPU, and every
    request's tokens the CPU's, alone and in one mixed batch."""
    model, adapters = served
    engine, _ = build_engine(
        str(model), qlora=True, adapters=adapters[:2], device=CUDA, max_batch_size=8, **options
    )
    try:
        name, folder = adapters[2]
        engine.load_adapter(name, folder).result(60)
        assert device_of(engine.model).type == CUDA.type
        for _, layer in lora_layers(engine.model):
            for adapter in ("a", "b", "c"):
                assert layer.lora_A[adapter].weight.device.type == CUDA.type
                assert layer.lora_B[adapter].weight.device.type == CUDA.type
        alone = _alone(engine)
        together = _together(engine)
        if options.get("lean", True):
            assert engine._batch._native is None  # the C decode step is for the CPU only
    finally:
        engine.stop()
    assert alone == cpu_tokens
    assert together == cpu_tokens


def _sampled(engine) -> list[list[int]]:
    requests = [
        generation_request(
            engine.tokenizer,
            "Hello",
            adapter,
            max_tokens=6,
            temperature=1.0,
            top_p=0.9,
            seed=7,
            ignore_eos=True,
        )  # fmt: skip
        for adapter in (None, "a", "c")
    ]
    with engine._cond:  # one batch, as in _together
        for request in requests:
            engine.submit(request)
    finishes = [r.result(120) for r in requests]
    assert all(f.reason == "length" for f in finishes), [f.error for f in finishes]
    return [f.token_ids for f in finishes]


def test_cuda_engine_samples_with_seeded_cpu_generators(served):
    """Sampling rows of GPU logits with the requests' seeded (CPU) generators: a seed draws
    the same tokens every time."""
    model, adapters = served
    engine, _ = build_engine(str(model), qlora=True, adapters=adapters, device=CUDA)
    try:
        assert _sampled(engine) == _sampled(engine)
    finally:
        engine.stop()


def test_serve_command_runs_on_cuda(served, monkeypatch):
    """`slimtune serve --device cuda` (and auto) places the model on the GPU and answers as
    `--device cpu` does."""
    import slimtune.serve.server
    from slimtune.cli import main

    model, adapters = served
    seen = {}

    def serve_and_generate(app, host, port):
        engine = app.state.engine.start()
        seen["device"] = device_of(engine.model).type
        requests = [
            generation_request(engine.tokenizer, "Hi", a, max_tokens=6) for a in (None, "a")
        ]
        seen["tokens"] = [engine.submit(r).result(120).token_ids for r in requests]

    monkeypatch.setattr(slimtune.serve.server, "serve_forever", serve_and_generate)
    argv = ["serve", "--model", str(model), "--qlora", "--adapter", f"a={adapters[0][1]}"]
    results = {}
    for device in ("cuda", "cpu", None):
        flags = [] if device is None else ["--device", device]
        assert main(argv + flags) == 0
        results[device] = dict(seen)
    assert results["cuda"]["device"] == results[None]["device"] == "cuda"
    assert results["cpu"]["device"] == "cpu"
    assert results["cuda"]["tokens"] == results["cpu"]["tokens"] == results[None]["tokens"]
