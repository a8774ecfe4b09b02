"""One stream's decode steps in one C call (slimtune.infer.native_step) against the lean forward
they replace: the same greedy tokens, logits equal to float rounding, and the lean forward
wherever the C step does not cover the model."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from helpers import (
    ADAPTERS,
    PROMPTS,
    generation_request,
    make_char_tokenizer,
    make_peft_adapter,
    make_tiny,
    make_tiny_llama,
)

from slimtune.infer import decode, lean_forward, native_step
from slimtune.infer.llama import KVCache, Rotary, attention_mask
from slimtune.lora import LoraConfig, inject_adapter, per_sample_adapters
from slimtune.quant import QuantConfig, quantize_model
from slimtune.quant.inference import inference_4bit
from slimtune.serve import Engine


def _model(arch: str, seed: int, compute_dtype=torch.float32, adapters=("a",), **lora):
    """A tiny 4-bit model with adapters whose B is not zero (they change the answers) and,
    where the architecture has them, biases that are not zero."""
    model = make_tiny(arch, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    config = QuantConfig(double_quant=True, compute_dtype=compute_dtype)
    model = quantize_model(model, config)
    for name in adapters:
        inject_adapter(model, LoraConfig(r=4, alpha=8, **lora), name)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f"lora_B.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def _prompt(seed: int = 1, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _lean_only(monkeypatch):
    monkeypatch.setattr(native_step.NativeDecoder, "build", classmethod(lambda *a, **k: None))


def test_the_step_builds_here():
    assert native_step.library() is not None  # a C compiler is part of the set-up


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_steps_give_the_lean_forwards_tokens(arch, dtype, monkeypatch, one_thread):
    model = _model(arch, seed=3, compute_dtype=dtype)
    prompt = _prompt()
    native = decode(model, prompt, max_new_tokens=24)
    _lean_only(monkeypatch)
    lean = decode(model, prompt, max_new_tokens=24)
    assert (native.engine, lean.engine) == ("native", "lean")
    assert native.tokens == lean.tokens and len(native.tokens[0]) == 24
    assert len(set(native.tokens[0])) > 3  # not one token repeated: the steps see the cache


def test_a_lean_prefill_then_c_steps_give_the_lean_forwards_tokens(monkeypatch, one_thread):
    """A prompt past the C prefill's limit prefills in the lean forward and then steps in C
    (as long prompts do without AVX-512): the tokens equal the lean forward's alone."""
    model = _model("llama", seed=4)
    prompt = _prompt(seed=4, length=20)
    monkeypatch.setattr(native_step.native, "lanes", lambda: 8)
    monkeypatch.setattr(native_step, "PREFILL_TOKENS_NARROW", 8)
    prefills = []
    real = native_step.NativeDecoder.prefill
    monkeypatch.setattr(native_step.NativeDecoder, "prefill",
                        lambda *a, **k: prefills.append(1) or real(*a, **k))  # fmt: skip
    mixed = decode(model, prompt, max_new_tokens=16)
    assert mixed.engine == "native" and prefills == []  # steps in C, the prefill was not
    _lean_only(monkeypatch)
    lean = decode(model, prompt, max_new_tokens=16)
    assert mixed.tokens == lean.tokens and len(set(mixed.tokens[0])) > 3


# float32 up to 40 cached positions (attention's scores in blocks of 16 keys, and the keys left
# over); bfloat16 up to 12: over longer runs the two sum orders come to round some output to a
# different bfloat16 neighbour, and the logits part by more than the sums' differences.
@pytest.mark.parametrize(("dtype", "length"), [(torch.float32, 40), (torch.bfloat16, 12)])
def test_c_step_logits_equal_the_lean_forwards(dtype, length, one_thread):
    """Step by step from the same prompt and cache contents; bfloat16 layers round their outputs
    as torch does, so both paths differ only in the order of float sums."""
    model = _model("qwen2", seed=4, compute_dtype=dtype)
    tokens = _prompt(seed=2, length=length)[0].tolist()
    capacity = 5 + len(tokens)
    caches = [KVCache.empty(model, 1, capacity, torch.float32) for _ in range(2)]
    rotary = Rotary(model, capacity, torch.float32)
    with inference_4bit(model), torch.no_grad():
        for cache in caches:
            lean_forward(
                model, torch.tensor([tokens[:5]]), torch.arange(5)[None], cache, rotary, None
            )
        step = native_step.NativeDecoder.build(model, None)
        assert step is not None
        for position, token in enumerate(tokens[5:], start=5):
            fast = step.step([token], caches[0], rotary)
            ids, at = torch.tensor([[token]]), torch.tensor([[position]])
            slow = lean_forward(model, ids, at, caches[1], rotary, None)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
        length = caches[1].length
        assert caches[0].length == length == len(tokens)
        for keys, reference in zip(caches[0].keys, caches[1].keys, strict=True):
            torch.testing.assert_close(
                keys[:, :, :length], reference[:, :, :length], rtol=0, atol=2e-5
            )


def test_rows_of_mixed_adapters_in_one_c_step_equal_the_lean_forward():
    """19 rows in mixed order over adapters of ranks 4, 16 and 20 (padded to 16 and 32 in C) and
    rows with none, one adapter on 10 rows (a tile of 8 and one of 2), k/v 24 wide (16-wide
    sums and a tail), on 2 threads: the logits and cache of one C step equal the lean forward's
    with per-sample adapters."""
    ranks = {"a": 4, "b": 16, "c": 20}
    tiny = make_tiny_llama(seed=9, num_attention_heads=8, num_key_value_heads=1, head_dim=24)
    model = quantize_model(tiny, QuantConfig(double_quant=True))
    generator = torch.Generator().manual_seed(9)
    for name, rank in ranks.items():
        inject_adapter(model, LoraConfig(r=rank, alpha=2 * rank), name)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f"lora_B.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    order = torch.randperm(19, generator=generator).tolist()
    names = [(["a"] * 10 + ["b"] * 4 + ["c"] * 3 + [None] * 2)[i] for i in order]
    slots = [-1 if name is None else list(ranks).index(name) for name in names]
    ids = torch.randint(1, 128, (19, 7), generator=generator)
    capacity = 8
    caches = [KVCache.empty(model, 19, capacity, torch.float32) for _ in range(3)]
    rotary = Rotary(model, capacity, torch.float32)
    positions, at = torch.arange(6).expand(19, -1), torch.full((19, 1), 6)
    threads = torch.get_num_threads()
    with inference_4bit(model), torch.no_grad():
        with per_sample_adapters(model, names):
            for cache in caches:
                lean_forward(model, ids[:, :6], positions, cache, rotary, None)
            slow = lean_forward(model, ids[:, 6:], at, caches[1], rotary, None)
        with per_sample_adapters(model, [None] * 19):  # the last step with no adapter
            plain = lean_forward(model, ids[:, 6:], at, caches[2], rotary, None)
        step = native_step.NativeDecoder.build(model, None, list(ranks))
        torch.set_num_threads(2)
        try:
            fast = step.step(ids[:, 6].tolist(), caches[0], rotary, slots=slots)
        finally:
            torch.set_num_threads(threads)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
    for keys, reference in zip(caches[0].keys, caches[1].keys, strict=True):
        torch.testing.assert_close(keys[:, :, :7], reference[:, :, :7], rtol=0, atol=2e-5)
    adapted = torch.tensor([name is not None for name in names])
    assert (fast - plain)[adapted].abs().amax(-1).min() > 1e-2  # every adapter moves its rows
    torch.testing.assert_close(fast[~adapted], plain[~adapted], rtol=0, atol=1e-4)


@pytest.mark.parametrize("max_rows", [256, 5])
def test_a_prefill_in_c_equals_the_lean_forwards(max_rows, monkeypatch):
    """Left-padded prompts of 3 to 9 tokens over two adapters and none, as one call or (at most 5
    rows a call) in chunks of whole columns: the logits of each prompt's last token and every
    key and value equal the lean forward's with per-sample adapters."""
    monkeypatch.setattr(native_step, "MAX_ROWS", max_rows)
    model = _model("qwen2", seed=6, adapters=("a", "b"))
    generator = torch.Generator().manual_seed(6)
    lengths, names = [9, 3, 6, 8], ["b", None, "a", "b"]
    ids, valid = torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, 9, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, 9 - n :] = torch.randint(1, 128, (n,), generator=generator)
        valid[row, 9 - n :] = True
    caches = [KVCache.empty(model, 4, 9, torch.float32) for _ in range(2)]
    for t in (*caches[0].keys, *caches[0].values):
        t.fill_(float("nan"))  # what an empty cache may hold
    rotary = Rotary(model, 9, torch.float32)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with inference_4bit(model), torch.no_grad():
        step = native_step.NativeDecoder.build(model, None, ["a", "b"])
        slots = [-1 if name is None else ["a", "b"].index(name) for name in names]
        calls = []
        run = step._run
        monkeypatch.setattr(step, "_run", lambda *a: calls.append(len(a[0])) or run(*a))
        fast = step.prefill(ids, valid, caches[0], rotary, slots)
        with per_sample_adapters(model, names):
            mask = attention_mask(valid, 0, 9)
            slow = lean_forward(model, ids, positions, caches[1], rotary, mask)
    assert sum(calls) == sum(lengths) and max(calls) <= max_rows
    assert len(calls) == (1 if max_rows == 256 else 7)  # columns 0-2 (5 rows), then one each
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
    assert caches[0].length == caches[1].length == 9
    for new, reference in zip(caches[0].keys + caches[0].values,
                              caches[1].keys + caches[1].values, strict=True):  # fmt: skip
        for row, n in enumerate(lengths):
            torch.testing.assert_close(new[row, :, 9 - n :], reference[row, :, 9 - n :],
                                       rtol=0, atol=2e-5)  # fmt: skip
            assert not new[row, :, : 9 - n].any()  # padding: zeros, never memory as it was


@pytest.mark.parametrize(("lanes", "bf16"), [(16, False), (8, False), (8, True), (1, False)])
def test_long_prompts_prefill_in_c_only_where_c_is_the_faster(lanes, bf16, monkeypatch):
    """With AVX-512, or in bfloat16, prompts of up to 1024 tokens prefill in C; with narrower
    kernels in float32 the lean forward's BLAS is the faster past 128 prompt tokens in all
    (step.md)."""
    monkeypatch.setattr(native_step.native, "lanes", lambda: lanes)
    wide = lanes >= 16 or bf16
    assert native_step.in_c_prefill(torch.ones(1, 1024, dtype=torch.bool), bf16) == wide
    assert not native_step.in_c_prefill(torch.ones(1, 1025, dtype=torch.bool), bf16)
    assert native_step.in_c_prefill(torch.ones(4, 32, dtype=torch.bool), bf16)  # 128 in all
    assert native_step.in_c_prefill(torch.ones(4, 33, dtype=torch.bool), bf16) == wide
    padded = torch.ones(4, 40, dtype=torch.bool)
    padded[:, :8] = False  # 128 real tokens in 4 left-padded prompts
    assert native_step.in_c_prefill(padded, bf16)
    assert not native_step.in_c_prefill(torch.tensor([[True, False]]), bf16)  # ends in padding


@pytest.mark.parametrize("head_dim", [64, 128])
def test_heads_of_64_and_128_in_c_equal_the_lean_forward(head_dim, one_thread):
    """The C attention's paths for heads of 64 and 128 (scores of 16 keys at a time and the keys
    left over, the weighted values in registers): a 37-token prefill and 4 steps after it equal
    the lean forward, logits within 1e-4."""
    tiny = make_tiny_llama(seed=11, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim)
    model = quantize_model(tiny, QuantConfig(double_quant=True)).eval()
    ids = torch.randint(1, 128, (1, 41), generator=torch.Generator().manual_seed(11))
    caches = [KVCache.empty(model, 1, 41, torch.float32) for _ in range(2)]
    rotary = Rotary(model, 41, torch.float32)
    with inference_4bit(model), torch.no_grad():
        step = native_step.NativeDecoder.build(model, None)
        fast = step.prefill(ids[:, :37], torch.ones(1, 37, dtype=torch.bool), caches[0], rotary)
        slow = lean_forward(model, ids[:, :37], torch.arange(37)[None], caches[1], rotary, None)
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
        for position in range(37, 41):
            fast = step.step([int(ids[0, position])], caches[0], rotary)
            at = torch.tensor([[position]])
            slow = lean_forward(model, ids[:, position : position + 1], at, caches[1], rotary, None)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


def test_left_padded_rows_in_c_give_the_lean_forwards_tokens(monkeypatch, one_thread):
    """Rows of different lengths, left-padded, leaving the batch at their end token."""
    model = _model("llama", seed=7)
    generator = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 128, (n,), generator=generator) for n in (4, 9, 6)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, 9 - len(prompt) :], mask[i, 9 - len(prompt) :] = prompt, 1
    eos = {5, 17, 33}
    native = decode(model, ids, mask, max_new_tokens=20, eos_ids=eos)
    _lean_only(monkeypatch)
    lean = decode(model, ids, mask, max_new_tokens=20, eos_ids=eos)
    alone = [decode(model, p[None], max_new_tokens=20, eos_ids=eos).tokens[0] for p in prompts]
    assert (native.engine, lean.engine) == ("native", "lean")
    assert native.tokens == lean.tokens == alone
    assert native.finish == lean.finish


def test_lora_changes_what_the_c_step_gives(one_thread):
    """The adapter really rides on the C step: disabling it changes the answer."""
    with_adapter = _model("llama", seed=5)
    without = _model("llama", seed=5, adapters=())
    prompt = _prompt(seed=3)
    a = decode(with_adapter, prompt, max_new_tokens=16)
    b = decode(without, prompt, max_new_tokens=16)
    assert a.engine == b.engine == "native" and a.tokens != b.tokens


@pytest.mark.parametrize("case", ["two adapters", "dora", "per-sample", "gemma3"])
def test_what_the_c_step_does_not_cover_runs_the_lean_forward(case, monkeypatch, one_thread):
    prompt, mask = _prompt(seed=4), None
    if case == "two adapters":
        model = _model("llama", seed=6, adapters=("a", "b"))
        for module in model.modules():
            if hasattr(module, "set_active"):
                module.set_active(["a", "b"])
    elif case == "dora":
        model = _model("llama", seed=6, use_dora=True)
    elif case == "gemma3":
        model = _model("gemma3", seed=6)
    else:
        model = _model("llama", seed=6)
    context = per_sample_adapters(model, ["a"]) if case == "per-sample" else nullcontext()
    with context:
        out = decode(model, prompt, mask, max_new_tokens=12)
        _lean_only(monkeypatch)
        lean = decode(model, prompt, mask, max_new_tokens=12)
    assert out.engine != "native" and out.tokens == lean.tokens


# ------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def served_adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    model = make_tiny_llama()
    return {n: make_peft_adapter(model, folder / n, seed) for n, seed in [("a", 1), ("b", 2)]}


def _engine(adapters, tokenizer) -> Engine:
    model = quantize_model(make_tiny_llama(), QuantConfig(double_quant=True))
    engine = Engine(model, tokenizer, max_batch_size=8).start()
    for name, path in adapters.items():
        engine.load_adapter(name, path).result(timeout=60)
    return engine


def _serve(engine, tokenizer, together: bool) -> list[list[int]]:
    """PROMPTS with ADAPTERS, of different lengths (rows join and leave a running batch)."""
    requests = [
        generation_request(tokenizer, prompt, adapter, max_tokens=3 + 3 * i)
        for i, (prompt, adapter) in enumerate(zip(PROMPTS, ADAPTERS, strict=True))
    ]
    if not together:
        return [engine.submit(r).result(120).token_ids for r in requests]
    with engine._cond:  # queued while the engine waits: they meet in one prefill
        for r in requests[:3]:
            engine.submit(r)
    first = [r.result(120) for r in requests[:1]]
    for r in requests[3:]:  # these join the rows still running
        engine.submit(r)
    return [f.token_ids for f in first] + [r.result(120).token_ids for r in requests[1:]]


def test_served_batches_in_c_give_the_lean_forwards_tokens(served_adapters, monkeypatch):
    tokenizer = make_char_tokenizer()
    engine = _engine(served_adapters, tokenizer)
    try:
        together, alone = _serve(engine, tokenizer, True), _serve(engine, tokenizer, False)
        assert isinstance(engine._batch._native, native_step.NativeDecoder)
        assert engine._batch.adapters == ["a", "b"]
    finally:
        engine.stop()
    _lean_only(monkeypatch)
    engine = _engine(served_adapters, tokenizer)
    try:
        lean = _serve(engine, tokenizer, True)
        assert engine._batch._native is None
    finally:
        engine.stop()
    assert together == alone == lean
    assert len({tuple(t) for t in alone}) > 3  # adapters and prompts change the answers
