"""The engine on a 4-bit base computing from the packed codes (as `slimtune serve --qlora`):
mixed-adapter batches equal each request alone, and equal the engine on decoded float weights."""

from __future__ import annotations

import contextlib

from conftest import make_tiny_llama
from test_serve_engine import ADAPTERS, PROMPTS, _request
from test_serve_support import make_char_tokenizer, make_peft_adapter

from slimtune.infer import decoded_weights, inference_context
from slimtune.quant import Linear4bit, QuantConfig, quantize_model
from slimtune.serve import Engine


def _engine(adapters, four_bit: bool):
    model = quantize_model(make_tiny_llama(), QuantConfig(double_quant=True))
    tokenizer = make_char_tokenizer()
    engine = Engine(model, tokenizer, max_batch_size=8)
    stack = contextlib.ExitStack()
    stack.enter_context(inference_context(model) if four_bit else decoded_weights(model))
    engine.on_stop.append(stack.close)
    engine.start()
    for name, path in adapters.items():
        engine.load_adapter(name, path).result(timeout=60)
    return engine, tokenizer, model


def test_4bit_engine_mixed_batches_equal_alone_and_decoded_float(tmp_path, one_thread):
    base = make_tiny_llama()
    adapters = {n: make_peft_adapter(base, tmp_path / n, s) for n, s in [("a", 1), ("b", 2)]}
    results = {}
    for four_bit in (True, False):
        engine, tokenizer, model = _engine(adapters, four_bit)
        try:
            alone = [  # the float engine's batch is compared with the 4-bit one's instead
                engine.submit(_request(tokenizer, p, a, max_tokens=4)).result(120).token_ids
                for p, a in zip(PROMPTS, ADAPTERS, strict=True)
                if four_bit
            ]
            requests = [
                _request(tokenizer, p, a, max_tokens=4)
                for p, a in zip(PROMPTS, ADAPTERS, strict=True)
            ]
            for request in requests:
                engine.submit(request)
            together = [r.result(120).token_ids for r in requests]
        finally:
            engine.stop()
        assert together == alone or not four_bit
        results[four_bit] = together
        # put back when the engine stopped
        assert all(
            "forward" not in m.__dict__ for m in model.modules() if isinstance(m, Linear4bit)
        )
    assert results[True] == results[False]
