"""Whole models: quantize_model, storage_report, and bitsandbytes-layout state-dict files."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import make_tiny_llama
from oracles import assert_close_to_bnb
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant import (
    Linear4bit,
    QuantConfig,
    load_quantized_safetensors,
    load_quantized_state_dict,
    quantize_model,
    quantized_state_dict,
    save_quantized_safetensors,
    storage_report,
)
from slimtune.quant import linear as linear_module

# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b):
    """4-bit outputs track the float ones (random tiny models: ~10% elementwise error)."""
    return nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


def _linear_names(model, kind):
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


def test_quantizes_every_block_linear_but_not_the_head(tiny_llama):
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = tiny_llama(ids).logits
    blocks = _linear_names(tiny_llama, nn.Linear)
    assert quantize_model(tiny_llama) is tiny_llama
    quantized = _linear_names(tiny_llama, Linear4bit)
    assert quantized == [n for n in blocks if n != "lm_head"] and len(quantized) == 14
    assert type(tiny_llama.lm_head) is nn.Linear
    assert type(tiny_llama.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        after = tiny_llama(ids).logits
    assert _close(after, before)


def test_targets_and_head(tiny_llama):
    quantize_model(tiny_llama, targets=["q_proj", "v_proj"], include_lm_head=True)
    assert len(_linear_names(tiny_llama, Linear4bit)) == 4
    assert isinstance(tiny_llama.lm_head, nn.Linear)  # not targeted
    model = quantize_model(make_tiny_llama(), targets=r".*mlp\..*", include_lm_head=True)
    assert len(_linear_names(model, Linear4bit)) == 6
    model = quantize_model(make_tiny_llama(), include_lm_head=True)
    assert isinstance(model.lm_head, Linear4bit)
    with pytest.raises(SlimtuneError, match="match no linear layer"):
        quantize_model(make_tiny_llama(), targets=["nothing"])


def test_gpt2_conv1d_layers(tiny_gpt2):
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = tiny_gpt2(ids).logits
    quantize_model(tiny_gpt2, QuantConfig(blocksize=32))
    assert len(_linear_names(tiny_gpt2, Linear4bit)) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2
    with torch.no_grad():
        after = tiny_gpt2(ids).logits
    assert _close(after, before)


def test_float_layers_are_freed_one_by_one(monkeypatch):
    model = make_tiny_llama()
    alive = [weakref.ref(m.weight) for m in model.model.modules() if isinstance(m, nn.Linear)]
    seen = []
    original = linear_module.Linear4bit.from_linear.__func__

    def counting(cls, linear, config=None):
        seen.append(sum(ref() is not None for ref in alive))
        return original(cls, linear, config)

    monkeypatch.setattr(linear_module.Linear4bit, "from_linear", classmethod(counting))
    quantize_model(model)
    # When layer i is quantized, the i float weights before it are already gone.
    assert seen == list(range(len(alive), 0, -1))
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_storage_report_bits_per_param():
    # Layers of 65,536+ weights: the nested absmax (4 bytes per 256 blocks) is amortized.
    settings = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    report = storage_report(quantize_model(make_tiny_llama(**settings)))
    assert round(report.quantized_bits_per_param, 3) == 4.127
    q_proj = report.layers[0]
    assert q_proj.name == "model.layers.0.self_attn.q_proj" and q_proj.params == 256 * 256
    # packed codes + uint8 absmax + float32 nested absmax (4 groups) + float32 offset
    assert q_proj.bytes == 256 * 256 // 2 + 1024 + 4 * 4 + 4
    plain = storage_report(
        quantize_model(make_tiny_llama(**settings), QuantConfig(double_quant=False))
    )
    assert plain.quantized_bits_per_param == 4.5
    assert (
        plain.total_params
        == report.total_params
        == sum(p.numel() for p in make_tiny_llama(**settings).parameters())
    )
    assert 4.5 < plain.bits_per_param < 32  # embeddings, norms and head stay float32
    assert "quantized layers (14)" in report.format(per_layer=True)


def test_safetensors_round_trip_into_a_fresh_float_model(tmp_path):
    model = quantize_model(make_tiny_llama(tie_word_embeddings=True))
    path = save_quantized_safetensors(model, tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left
    fresh = make_tiny_llama(seed=1, tie_word_embeddings=True)  # other weights, float layers
    load_quantized_safetensors(fresh, path)
    assert len(_linear_names(fresh, Linear4bit)) == 14
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    mine, theirs = quantized_state_dict(model), quantized_state_dict(fresh)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_state_dict_errors_name_the_keys():
    model = quantize_model(make_tiny_llama())
    state = quantized_state_dict(model)
    del state["model.layers.0.mlp.up_proj.weight.absmax"]
    with pytest.raises(SlimtuneError, match=r"up_proj\.weight\.absmax"):
        load_quantized_state_dict(make_tiny_llama(), state)
    state = quantized_state_dict(model)
    state["model.layers.0.extra"] = torch.zeros(1)
    with pytest.raises(SlimtuneError, match="unexpected"):
        load_quantized_state_dict(make_tiny_llama(), state)


def test_reads_a_model_quantized_by_transformers_and_bitsandbytes(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_llama().save_pretrained(tmp_path)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config)
    ours = quantize_model(make_tiny_llama())
    theirs_sd, ours_sd = theirs.state_dict(), quantized_state_dict(ours)
    assert set(theirs_sd) == set(ours_sd)
    for key, value in theirs_sd.items():
        assert torch.equal(value, ours_sd[key]), key
    loaded = load_quantized_state_dict(make_tiny_llama(seed=3), theirs_sd)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ours_logits = loaded(ids).logits
    assert_close_to_bnb(ours_logits, theirs, lambda: theirs(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_quantized_smollm2_still_answers(smollm2):
    import copy

    model, tokenizer = smollm2
    model = quantize_model(copy.deepcopy(model), QuantConfig("nf4", 64, double_quant=True))
    report = storage_report(model)
    assert len(report.layers) == 210
    assert round(report.quantized_bits_per_param, 3) == 4.127
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
