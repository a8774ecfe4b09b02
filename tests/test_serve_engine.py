"""The batching engine on the tiny LLaMA: mixed-adapter batches, KV cache, queue, sampling."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import (
    ADAPTERS,
    PROMPTS,
    generation_request,
    make_char_tokenizer,
    make_peft_adapter,
    make_tiny_llama,
)

from slimtune.serve import Engine, QueueFull
from slimtune.serve.text import TextStream


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    model = make_tiny_llama()
    return {
        name: make_peft_adapter(model, folder / name, seed) for name, seed in [("a", 1), ("b", 2)]
    }


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer()


def make_engine(tokenizer, adapters, **kwargs) -> Engine:
    engine = Engine(make_tiny_llama(), tokenizer, **kwargs).start()
    for name, path in adapters.items():
        engine.load_adapter(name, path).result(timeout=60)
    return engine


@pytest.fixture(scope="module", params=["lean", "transformers"])
def engine(request, tokenizer, adapters):
    """The engine on slimtune's lean forward, and on transformers' (other architectures)."""
    engine = make_engine(tokenizer, adapters, max_batch_size=8, lean=request.param == "lean")
    assert (
        type(engine._batch).__name__
        == {"lean": "LeanBatch", "transformers": "TransformersBatch"}[request.param]
    )
    yield engine
    engine.stop()


def _run_alone(engine, tokenizer, **kwargs) -> list[list[int]]:
    out = []
    for prompt, adapter in zip(PROMPTS, ADAPTERS, strict=True):
        finish = engine.submit(generation_request(tokenizer, prompt, adapter, **kwargs)).result(120)
        out.append(finish.token_ids)
    return out


def _run_together(engine, tokenizer, **kwargs) -> list[list[int]]:
    requests = [
        generation_request(tokenizer, p, a, **kwargs)
        for p, a in zip(PROMPTS, ADAPTERS, strict=True)
    ]
    # Queued while the engine cannot take any: they meet in one prefill however slowly this
    # thread runs (the engine's condition is re-entrant, so submit() takes it again here).
    with engine._cond:
        for request in requests:
            engine.submit(request)
    return [r.result(120).token_ids for r in requests]


def test_mixed_adapter_batch_gives_the_tokens_of_each_request_alone(engine, tokenizer):
    alone = _run_alone(engine, tokenizer)
    steps, counts = engine.steps, dict(engine.pass_counts)
    together = _run_together(engine, tokenizer)
    assert together == alone
    assert all(len(ids) == 8 for ids in alone)
    # One prefill and 7 decode steps when all six requests share the batch (8 x 6 alone).
    assert engine.steps - steps <= 12
    passes = {kind: engine.pass_counts[kind] - counts[kind] for kind in counts}
    assert passes["prefill"] >= 1 and sum(passes.values()) == engine.steps - steps
    assert engine.pass_seconds["prefill"] > 0
    # The adapters matter: the same prompt gives different tokens on base, a and b.
    outs = [
        engine.submit(generation_request(tokenizer, "Hello", n)).result(120).token_ids
        for n in (None, "a", "b")
    ]
    assert outs[0] != outs[1] and outs[1] != outs[2] and outs[0] != outs[2]


def test_requests_joining_a_running_batch_match_alone(engine, tokenizer):
    # Long and short requests of different lengths: rows join and leave the running batch.
    kwargs = [dict(max_tokens=3 + 4 * i) for i in range(len(PROMPTS))]
    alone = []
    for (prompt, adapter), kw in zip(zip(PROMPTS, ADAPTERS, strict=True), kwargs, strict=True):
        alone.append(
            engine.submit(generation_request(tokenizer, prompt, adapter, **kw))
            .result(120)
            .token_ids
        )
    requests = []
    for (prompt, adapter), kw in zip(zip(PROMPTS, ADAPTERS, strict=True), kwargs, strict=True):
        requests.append(engine.submit(generation_request(tokenizer, prompt, adapter, **kw)))
    assert [r.result(120).token_ids for r in requests] == alone


def test_greedy_tokens_match_peft(adapters, engine, tokenizer):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(make_tiny_llama(), adapters["b"]).eval()
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        out = peft_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    expected = out[0, ids.shape[1] :].tolist()
    got = engine.submit(generation_request(tokenizer, PROMPTS[1], "b")).result(120).token_ids
    assert got == expected


def test_one_adapter_at_a_time_gives_the_same_tokens_in_more_steps(tokenizer, adapters, engine):
    mixed_steps = engine.steps
    mixed = _run_together(engine, tokenizer)
    mixed_steps = engine.steps - mixed_steps
    single = make_engine(tokenizer, adapters, max_batch_size=8, mixed_batches=False)
    try:
        assert _run_together(single, tokenizer) == mixed
        assert single.steps > mixed_steps  # three groups (base, a, b) run one after another
    finally:
        single.stop()


def test_full_queue_is_refused_and_stop_cancels(tokenizer):
    engine = Engine(make_tiny_llama(), tokenizer, max_queue=2)  # not started: nothing drains
    first = engine.submit(generation_request(tokenizer, "a", None))
    engine.submit(generation_request(tokenizer, "b", None))
    with pytest.raises(QueueFull):
        engine.submit(generation_request(tokenizer, "c", None))
    first.cancel()
    engine.start()
    assert first.result(60).reason == "cancelled"
    engine.stop()


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(engine, tokenizer):
    def run(**kw):
        return engine.submit(
            generation_request(tokenizer, "Hello", "a", max_tokens=12, **kw)
        ).result(120)

    greedy = run(temperature=0.0).token_ids
    sampled = [run(temperature=1.5, seed=s).token_ids for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert sampled[0] != greedy
    assert run(temperature=1.5, top_p=1e-6, seed=3).token_ids == greedy


def test_unload_waits_for_running_requests(tokenizer, adapters):
    engine = make_engine(tokenizer, adapters, max_batch_size=4)
    try:
        request = engine.submit(generation_request(tokenizer, "Hello", "a", max_tokens=20))
        engine.unload_adapter("a")
        assert request.result(120).reason == "length"
        engine.call(lambda: None).result(60)  # one more turn of the loop
        assert engine.adapters == {"b"}
        from slimtune.lora import lora_configs

        assert set(lora_configs(engine.model)) == {"b"}
    finally:
        engine.stop()


def test_text_stream_cuts_at_stop_strings_and_holds_back_partial_matches(tokenizer):
    stream = TextStream(tokenizer, stop=("END",))
    pieces = [stream.push(t)[0] for t in tokenizer("abcEN", add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == "abc"  # "EN" might become "END": held back
    delta, stopped = stream.push(tokenizer("D", add_special_tokens=False)["input_ids"][0])
    assert stopped and delta == "" and stream.text == "abc"


def test_a_request_for_an_unloaded_adapter_fails_alone(engine, tokenizer):
    bad = generation_request(tokenizer, "Hello", "gone")
    good = generation_request(tokenizer, "Hello", "a")
    engine.submit(bad)
    engine.submit(good)
    assert bad.result(120).reason == "error" and "not loaded" in bad.result().error
    assert good.result(120).reason == "length"


def test_eos_ends_a_request_unless_ignore_eos(tokenizer, adapters):
    engine = make_engine(tokenizer, {}, max_batch_size=2)
    try:
        greedy = engine.submit(generation_request(tokenizer, "Hello", None, max_tokens=6)).result(
            120
        )
        ids = greedy.token_ids
        k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
        engine.eos_ids = {ids[k]}  # pretend this token is EOS
        stopped = engine.submit(generation_request(tokenizer, "Hello", None, max_tokens=6)).result(
            120
        )
        assert stopped.reason == "stop" and stopped.token_ids == ids[:k]
        kept = generation_request(tokenizer, "Hello", None, max_tokens=6, ignore_eos=True)
        assert engine.submit(kept).result(120).token_ids == greedy.token_ids
    finally:
        engine.stop()


def test_the_loop_keeps_its_objects_from_the_collector_while_it_runs(tokenizer):
    """Full collections skip what exists when the loop starts (the model, the server), and the
    objects are handed back when it stops: a process that starts engines again can free them."""
    engine = Engine(make_tiny_llama(), tokenizer).start()
    engine.call(lambda: None).result(60)  # the loop runs
    assert gc.get_freeze_count() > 0
    engine.stop()
    assert gc.get_freeze_count() == 0
