"""The decode loop: KV-cached lean forward equals transformers, batches equal rows alone, the
4-bit path equals decode-then-matmul, many adapters in one batch equal each request alone."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_gpt2, make_tiny_llama

from slimtune.infer import KVCache, decode, lean_forward, supports
from slimtune.infer.llama import Rotary, attention_mask
from slimtune.quant import QuantConfig, quantize_model
from slimtune.quant.inference import inference_4bit

GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)


def _hf_greedy(model, ids, n):
    model.generation_config.eos_token_id = None  # tiny models: no end token, n tokens each
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, **GREEDY)[0, ids.shape[1] :].tolist()


def _no_cache_greedy(model, ids, n):
    """Greedy tokens from a full forward of the whole sequence at every step (no cache)."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0, ids.shape[1] :].tolist()


def test_lean_forward_logits_equal_transformers(one_thread):
    model = make_tiny_llama()
    assert supports(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits  # (2, 9, vocab)
    cache = KVCache.empty(model, 2, 12, torch.float32)
    rotary = Rotary(model, 12, torch.float32)
    positions = torch.arange(6)[None].expand(2, 6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    prefill = lean_forward(model, ids[:, :6], positions, cache, rotary, attention_mask(valid, 0, 6))
    torch.testing.assert_close(prefill, ref[:, 5], rtol=1e-5, atol=1e-5)
    for t in range(6, 9):  # one cached step at a time
        valid = torch.ones(2, t + 1, dtype=torch.bool)
        step = lean_forward(
            model, ids[:, t : t + 1], torch.full((2, 1), t), cache, rotary,
            attention_mask(valid, t, 1),
        )  # fmt: skip
        torch.testing.assert_close(step, ref[:, t], rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_no_cache_and_transformers(one_thread):
    model = make_tiny_llama(seed=3)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    out = decode(model, ids, max_new_tokens=16)
    assert out.engine == "lean" and out.finish == ["length"]
    assert out.tokens[0] == _no_cache_greedy(model, ids, 16) == _hf_greedy(model, ids, 16)


def test_steps_into_a_given_cache_column_equal_the_growing_cache(one_thread):
    """The step a CUDA graph records (`column`: the cache column as a tensor, attention over the
    whole capacity, masked) gives the logits of the usual step, for left-padded rows too."""
    model = make_tiny_llama(initializer_range=0.3)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :3] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    capacity = 12
    caches = [KVCache.empty(model, 2, capacity, torch.float32) for _ in range(2)]
    rotary = Rotary(model, capacity, torch.float32)
    for cache in caches:
        for tensor in (*cache.keys, *cache.values):
            tensor.fill_(float("nan"))  # what fresh memory may hold
        lean_forward(model, ids, positions, cache, rotary, attention_mask(valid, 0, 7))
    caches[1].clear_unwritten()  # else the masked columns' NaN reach every output
    seen = torch.zeros(2, 1, 1, capacity, dtype=torch.bool)
    seen[:, 0, 0, :7] = valid
    position = positions[:, -1:]
    for step in range(4):
        new = torch.tensor([[5 + step], [9 + step]])
        position = position + 1
        valid = torch.cat([valid, valid.new_ones(2, 1)], dim=1)
        usual = lean_forward(model, new, position, caches[0], rotary,
                             attention_mask(valid, caches[0].length, 1))  # fmt: skip
        column = torch.tensor([7 + step])
        seen[..., 7 + step] = True
        static = lean_forward(model, new, position, caches[1], rotary, seen, column)
        torch.testing.assert_close(static, usual, rtol=1e-5, atol=1e-5)
    assert caches[1].length == 7  # the caller keeps count when it gives the column


def test_left_padded_batch_equals_each_row_alone(one_thread):
    model = make_tiny_llama(seed=4)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (n,), generator=generator) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    alone = [decode(model, p[None], max_new_tokens=10).tokens[0] for p in prompts]
    # a row stops at its own end token and leaves the batch; the others go on unchanged
    eos = {alone[1][3]}
    batch = decode(model, ids, mask, max_new_tokens=10, eos_ids=eos)
    for row, tokens in zip(batch.tokens, alone, strict=True):
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        assert row == tokens[:cut]
    assert batch.finish[1] == "stop"


@pytest.mark.parametrize("new_tokens", [1, 2, 3, 12])
def test_graph_style_steps_keep_the_loops_tokens(one_thread, monkeypatch, new_tokens):
    """The decode loop with the steps a CUDA graph replays (run uncaptured on the CPU): finished
    rows stay in the batch, so the loop must ignore them and draw tokens for the others only.
    Greedy and seeded sampling, a row stopping early and every row stopping at once, give the
    usual loop's tokens and finish reasons."""
    from slimtune.infer import cuda_graph

    model = make_tiny_llama(initializer_range=0.3)
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0

    def both(**options):
        runs = []
        for graph_style in (False, True):
            monkeypatch.setattr(cuda_graph, "usable", lambda device, on=graph_style: on)
            seeded = torch.Generator().manual_seed(5)
            runs.append(decode(model, ids, mask, max_new_tokens=new_tokens, generator=seeded,
                               **options))  # fmt: skip
        usual, graphed = runs
        assert usual.engine == "lean"
        assert graphed.engine == ("graph" if new_tokens > 1 else "lean")
        assert graphed.tokens == usual.tokens and graphed.finish == usual.finish
        return usual

    greedy = both()
    sampled = both(temperature=0.9, top_p=0.9)
    for first in (greedy, sampled):
        if new_tokens < 3:
            continue
        row = first.tokens[0]
        stop = next((t for i, t in enumerate(row) if i >= 1 and t not in row[:i]), None)
        options = dict(temperature=0.9, top_p=0.9) if first is sampled else {}
        early = both(eos_ids={stop}, **options)
        assert early.finish[0] == "stop"
        every = {t for r in first.tokens for t in r[:1]}  # each row's first token: all stop
        assert both(eos_ids=every, **options).tokens == [[] for _ in range(3)]


def test_streaming_callback_sees_every_token(one_thread):
    model = make_tiny_llama()
    seen = []
    out = decode(
        model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, on_token=lambda r, t: seen.append(t)
    )
    assert seen == out.tokens[0] and len(seen) == 5


def test_four_bit_path_equals_decode_then_matmul(one_thread):
    from slimtune.infer import decoded_weights

    model = quantize_model(make_tiny_llama(seed=6), QuantConfig(double_quant=True))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    fast = decode(model, ids, max_new_tokens=12)
    with decoded_weights(model):
        reference = decode(model, ids, max_new_tokens=12, four_bit=False)
    assert fast.tokens == reference.tokens
    assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__


def test_many_adapters_in_one_batch_equal_each_alone(one_thread):
    from slimtune.lora import LoraConfig, inject_adapter, per_sample_adapters

    model = quantize_model(make_tiny_llama(seed=8), QuantConfig())
    for seed, name in enumerate(("a", "b")):
        inject_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f"lora_B.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(9))
    names = ["a", None, "b"]
    with per_sample_adapters(model, names):
        mixed = decode(model, ids, max_new_tokens=10).tokens
    alone = []
    for i, name in enumerate(names):
        with per_sample_adapters(model, [name]):
            alone.append(decode(model, ids[i : i + 1], max_new_tokens=10).tokens[0])
    assert mixed == alone
    assert len({tuple(t) for t in alone}) == 3  # the adapters do change the answers


def test_other_architectures_fall_back_to_transformers(one_thread):
    model = make_tiny_gpt2()
    assert not supports(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = decode(model, ids, max_new_tokens=6)
    assert out.engine == "transformers" and out.tokens[0] == _hf_greedy(model, ids, 6)


def test_sampling_is_seeded(one_thread):
    model = make_tiny_llama()
    ids = torch.tensor([[1, 2, 3]])

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return decode(model, ids, max_new_tokens=8, temperature=1.0, top_p=0.9, generator=g)

    assert sample(0).tokens == sample(0).tokens


@pytest.mark.slow
def test_smollm2_four_bit_greedy_equals_float_reference():
    """The 4-bit path against transformers computing with the same weights decoded to float32:
    greedy tokens equal, last-prompt-position logits within 1e-3 (float32 sums in another order
    over 30 layers)."""
    from slimtune.infer import decoded_weights, format_prompt
    from slimtune.models import load_model

    model, tokenizer = load_model(quant=QuantConfig())
    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               "List three prime numbers.", "Explain what a bond is in one sentence."]  # fmt: skip
    eos = {tokenizer.eos_token_id}
    for prompt in prompts:
        text = format_prompt(tokenizer, prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        fast = decode(model, ids, max_new_tokens=24, eos_ids=eos).tokens[0]
        with decoded_weights(model), torch.no_grad():
            ref = model.generate(ids, max_new_tokens=24, **GREEDY)[0, ids.shape[1] :].tolist()
            ref_logits = model(ids).logits[0, -1]
        ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
        assert fast == ref, prompt
        # the last prompt token as one cached step: the fused one-row kernel
        n = ids.shape[1]
        cache, rotary = KVCache.empty(model, 1, n, torch.float32), Rotary(model, n, torch.float32)
        with inference_4bit(model):
            lean_forward(model, ids[:, :-1], torch.arange(n - 1)[None], cache, rotary, None)
            logits = lean_forward(model, ids[:, -1:], torch.tensor([[n - 1]]), cache, rotary, None)
        assert (logits[0] - ref_logits).abs().max() < 1e-3
