"""slimtune.lora against PEFT (the oracle): outputs, gradients, init, training, merge, adapters."""

from __future__ import annotations

import copy
import json
import re

import peft
import pytest
import torch
from helpers import (
    PEFT_PREFIX,
    copy_peft_weights,
    ids,
    lora_grads,
    make_tiny_gpt2,
    make_tiny_llama,
    peft_config,
    twins,
)

from slimtune.errors import SlimtuneError
from slimtune.lora import (
    LoraConfig,
    LoraLinear,
    combine_adapters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    find_targets,
    inject_adapter,
    lora_configs,
    lora_layers,
    lora_parameters,
    merge_adapter,
    per_sample_adapters,
    pissa_to_lora,
    save_adapter,
    set_active_adapters,
    set_sparse_dropout,
    stacked,
    trainable_summary,
    unmerge_adapter,
)

MAKERS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


CASES = {
    "llama-lora": ("llama", LoraConfig(r=4, alpha=8)),
    "llama-rslora-patterns": (
        "llama",
        LoraConfig(
            r=4,
            alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.mlp\.down_proj": 3},
        ),
    ),
    "llama-dora": ("llama", LoraConfig(r=4, alpha=8, use_dora=True)),
    "gpt2-lora": ("gpt2", LoraConfig(r=4, alpha=16, target_modules="all-linear")),
    "gpt2-dora": ("gpt2", LoraConfig(r=2, alpha=4, use_dora=True, target_modules=["c_attn"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_peft(case):
    make, config = CASES[case]
    _, theirs, ours = twins(MAKERS[make], config)
    theirs.train(), ours.train()
    x = ids()
    torch.manual_seed(0)  # GPT-2 has dropout of its own in training mode
    a = theirs(x).logits
    torch.manual_seed(0)
    b = ours(x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    theirs_grads = lora_grads(theirs, PEFT_PREFIX)
    ours_grads = lora_grads(ours)
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_matches_peft_in_training():
    """With nn.Dropout's masks (sparse_dropout off) the training forward is PEFT's, draw for draw."""
    config = LoraConfig(r=4, alpha=8, dropout=0.3, use_dora=False)
    for dora in (False, True):
        config.use_dora = dora
        _, theirs, ours = twins(make_tiny_llama, config)
        assert set_sparse_dropout(ours, False) == len(list(lora_layers(ours))) > 0
        theirs.train(), ours.train()
        torch.manual_seed(5)
        a = theirs(ids()).logits
        torch.manual_seed(5)
        b = ours(ids()).logits
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        ours.eval()
        torch.testing.assert_close(ours(ids()).logits, ours(ids()).logits)  # no dropout in eval


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_draws_what_peft_draws(init):
    """Same seed, same targets: PEFT and slimtune draw identical A (B is zero in both)."""
    base = make_tiny_llama()
    torch.manual_seed(3)
    extra = {"init_lora_weights": True if init == "kaiming" else "gaussian"}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(LoraConfig(r=4), **extra))
    torch.manual_seed(3)
    ours = inject_adapter(copy.deepcopy(base), LoraConfig(r=4, init=init))
    theirs_state = {k.removeprefix(PEFT_PREFIX): v for k, v in theirs.state_dict().items()}
    for name, value in ours.state_dict().items():
        if "lora_" in name:
            assert torch.equal(value, theirs_state[name]), name
            if "lora_B" in name:
                assert not value.any()
    torch.testing.assert_close(ours(ids()).logits, base(ids()).logits)  # B = 0: a no-op


def test_pissa_keeps_outputs_and_takes_principal_directions():
    base = make_tiny_llama()
    ours = inject_adapter(copy.deepcopy(base), LoraConfig(r=4, alpha=8, init="pissa"))
    torch.testing.assert_close(ours(ids()).logits, base(ids()).logits, rtol=1e-4, atol=1e-4)
    layer = ours.model.layers[0].self_attn.q_proj
    W = base.model.layers[0].self_attn.q_proj.weight
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight("default"))[:4], S[:4])
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:4], S[4:8])


@pytest.mark.parametrize("variant", ["plain", "use_rslora", "use_dora"])
def test_trained_pissa_adapter_becomes_lora_on_the_original_weights(tmp_path, variant):
    """PiSSA moves the principal part of W into the adapter; converted, the adapter is a rank-2r
    LoRA that PEFT applies to the original base with the trained model's outputs."""
    base = make_tiny_llama()
    flags = {} if variant == "plain" else {variant: True}
    config = LoraConfig(r=4, alpha=8, init="pissa", rank_pattern={"v_proj": 2}, **flags)
    ours = inject_adapter(copy.deepcopy(base), config)
    with torch.no_grad():  # as if trained: A, B (and DoRA's magnitude) away from their start
        for param in lora_parameters(ours):
            param.add_(0.05 * torch.randn_like(param))
    trained = ours(ids()).logits
    assert pissa_to_lora(ours) == 14
    torch.testing.assert_close(ours(ids()).logits, trained, rtol=1e-5, atol=1e-5)
    originals = dict(base.named_parameters())
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(
            layer.base_layer.weight, originals[name + ".weight"], rtol=0, atol=1e-5
        )

    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    grow = 2**0.5 if variant == "use_rslora" else 2
    assert (saved["r"], saved["lora_alpha"]) == (8, pytest.approx(8 * grow))
    assert set(saved["rank_pattern"].values()) == {4}
    assert saved["use_dora"] == (variant == "use_dora")
    assert saved["use_rslora"] == (variant == "use_rslora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(theirs(ids()).logits, trained, rtol=1e-4, atol=1e-4)


def test_pissa_to_lora_leaves_other_adapters_alone():
    model = inject_adapter(make_tiny_llama(), LoraConfig(r=4))
    assert pissa_to_lora(model) == 0
    assert lora_configs(model)["default"].r == 4


def test_lora_weights_stay_fp32_on_a_bf16_base():
    base = make_tiny_llama().to(torch.bfloat16)
    model = inject_adapter(base, LoraConfig(r=4, use_dora=True))
    assert {p.dtype for p in lora_parameters(model)} == {torch.float32}
    assert model(ids()).logits.dtype == torch.bfloat16


def test_only_lora_trains_and_base_is_bit_for_bit_unchanged():
    model = inject_adapter(make_tiny_llama(), LoraConfig(r=4, use_dora=True))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = [p.detach().clone() for p in lora_parameters(model)]
    assert all(not model.get_parameter(n).requires_grad for n in frozen)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        out = model(ids(), labels=ids())
        out.loss.backward()
        assert all(model.get_parameter(n).grad is None for n in frozen)
        optimizer.step()
        optimizer.zero_grad()
    for name, value in frozen.items():
        assert torch.equal(model.get_parameter(name), value), name
    assert all(
        not torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(model), strict=True)
    )


def test_trainable_summary_counts_like_peft():
    config = LoraConfig(r=8, target_modules="all-linear")
    _, theirs, ours = twins(make_tiny_llama, config)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert count_parameters(ours) == (trainable, total)
    text = trainable_summary(ours)
    assert text == f"trainable 16.38K of 106.8K ({100 * trainable / total:.2f}%)"
    assert re.fullmatch(r"trainable [\d.]+K of [\d.]+K \(\d+\.\d\d%\)", text)


@pytest.mark.parametrize(
    "target", [["q_proj", "mlp.up_proj"], r".*layers\.1\..*_proj", "all-linear"]
)
def test_target_selection_matches_peft(target):
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=target))
    expected = sorted(k.removeprefix(PEFT_PREFIX) for k in theirs.targeted_module_names)
    assert sorted(find_targets(base, LoraConfig(target_modules=target))) == expected
    assert "lm_head" not in find_targets(base, LoraConfig(target_modules="all-linear"))


def test_target_errors_name_the_module():
    with pytest.raises(SlimtuneError, match="embed_tokens.*Embedding"):
        inject_adapter(make_tiny_llama(), LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(SlimtuneError, match="matches no layer"):
        inject_adapter(make_tiny_llama(), LoraConfig(target_modules=["nope"]))
    with pytest.raises(SlimtuneError, match="r must be a positive integer"):
        LoraConfig(r=0)


@pytest.mark.parametrize("case", ["llama-lora", "llama-dora", "gpt2-lora", "gpt2-dora"])
def test_merge_unmerge_round_trip(case):
    make, config = CASES[case]
    _, theirs, ours = twins(MAKERS[make], config)
    base_weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    x = ids()
    adapted = ours(x).logits
    report = merge_adapter(ours, "default")
    assert report.layers == len(find_targets(ours, config)) and report.requantized == 0
    merged = ours(x).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, theirs.merge_and_unload()(x).logits, rtol=1e-4, atol=1e-4)
    unmerge_adapter(ours, "default")
    for name, value in base_weights.items():
        torch.testing.assert_close(ours.get_parameter(name), value, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours(x).logits, adapted, rtol=1e-5, atol=1e-5)


def two_adapter_twins(dora_a: bool = False):
    """PEFT and slimtune models with adapters "a" and "b" (different ranks), equal weights."""
    base = make_tiny_llama()
    cfg_a = LoraConfig(r=4, alpha=8, use_dora=dora_a)
    cfg_b = LoraConfig(r=2, alpha=4, target_modules=["q_proj"])
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft_config(cfg_a, init_lora_weights=False), adapter_name="a"
    )
    theirs.add_adapter("b", peft_config(cfg_b, init_lora_weights=False))
    ours = inject_adapter(copy.deepcopy(base), cfg_a, "a")
    inject_adapter(ours, cfg_b, "b")
    copy_peft_weights(theirs, ours)
    return base, theirs, ours


def test_many_adapters_active_disabled_and_summed():
    base, theirs, ours = two_adapter_twins()
    x = ids()
    for names in (["a"], ["b"], ["a", "b"]):
        set_active_adapters(ours, names)
        theirs.base_model.set_adapter(names)
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
        trainable = {n.split(".")[-2] for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable == set(names)
    with disable_adapters(ours):
        torch.testing.assert_close(ours(x).logits, base(x).logits)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(SlimtuneError, match="unknown adapter 'c'"):
        set_active_adapters(ours, ["c"])


def assert_each_row_alone(mixed, base, ours, x, names) -> None:
    """Row i of a mixed batch's logits equals row i run alone with adapter names[i] (None: the
    base model)."""
    for i, name in enumerate(names):
        if name is None:
            alone = base(x[i : i + 1]).logits
        else:
            set_active_adapters(ours, [name])
            alone = ours(x[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora_a", [False, True], ids=["lora", "dora"])
def test_per_sample_adapters_equal_each_sample_alone(dora_a):
    base, theirs, ours = two_adapter_twins(dora_a)
    x = ids(batch=5)
    names = ["a", None, "b", "a", None]
    with per_sample_adapters(ours, names):
        mixed = ours(x).logits
        with pytest.raises(SlimtuneError, match="5 adapter names but the batch has 2 rows"):
            ours(x[:2])
    assert_each_row_alone(mixed, base, ours, x, names)
    with per_sample_adapters(ours, ["b"] * 5):  # one adapter for the whole batch: no gather
        same = ours(x).logits
    set_active_adapters(ours, ["b"])
    torch.testing.assert_close(same, ours(x).logits)
    if not dora_a:  # PEFT refuses mixed batches with DoRA; we check those against each row alone
        peft_names = [n or "__base__" for n in names]
        theirs.eval()
        torch.testing.assert_close(mixed, theirs(x, adapter_names=peft_names).logits)


@pytest.mark.parametrize("ordered", [False, True], ids=["mixed", "by-adapter"])
@pytest.mark.parametrize("dora_a", [False, True], ids=["lora", "dora"])
def test_mixed_batches_in_inference_equal_each_sample_alone(dora_a, ordered, monkeypatch):
    """Without gradients a mixed batch runs every adapter's rows through one stacked pair of
    products, or each adapter on its slice where the rows are ordered by adapter
    (lora/stacked.py): equal to each row alone, with different ranks and scalings, rows of the
    base alone among them, and the 3-D (batch, time, features) inputs of a prompt."""
    base = make_tiny_llama()
    ours = inject_adapter(copy.deepcopy(base), LoraConfig(r=4, alpha=8, use_dora=dora_a), "a")
    inject_adapter(ours, LoraConfig(r=2, alpha=8, target_modules=["q_proj", "up_proj"]), "b")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in ours.named_parameters():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    ours.eval()
    calls = []
    for way in ("add_stacked", "add_by_slices"):
        real = getattr(stacked, way)
        monkeypatch.setattr(stacked, way, lambda *a, w=way, f=real: calls.append(w) or f(*a))
    x = ids(batch=5)
    names = [None, "a", "a", "b", "b"] if ordered else ["a", None, "b", "a", "b"]
    with torch.inference_mode(), per_sample_adapters(ours, names):
        mixed = ours(x).logits
    with torch.inference_mode():
        assert_each_row_alone(mixed, base, ours, x, names)
    # Every layer (7 a block) one way with plain LoRA; a DoRA adapter takes the loop.
    way = "add_by_slices" if ordered else "add_stacked"
    assert calls == ([] if dora_a else [way] * 7 * len(ours.model.layers))


def test_delete_adapter_restores_the_plain_model():
    base, _, ours = two_adapter_twins()
    delete_adapter(ours, "b")
    assert all("b" not in m.lora_A for m in ours.modules() if isinstance(m, LoraLinear))
    delete_adapter(ours, "a")
    assert not any(isinstance(m, LoraLinear) for m in ours.modules())
    assert ours.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(ours(ids()).logits, base(ids()).logits)


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_combine_matches_peft(method):
    _, theirs, ours = two_adapter_twins()
    if method == "linear":  # PEFT's linear needs equal ranks
        delete_adapter(ours, "b")
        theirs.delete_adapter("b")
        inject_adapter(ours, LoraConfig(r=4, alpha=2, target_modules=["q_proj"]), "b")
        theirs.add_adapter("b", peft_config(LoraConfig(r=4, alpha=2, target_modules=["q_proj"])))
        torch.nn.init.normal_(
            theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B.b.weight
        )
        copy_peft_weights(theirs, ours)
    kwargs = {"svd_rank": 3} if method == "svd" else {}
    theirs.add_weighted_adapter(["a", "b"], [0.7, -1.5], "ab", combination_type=method, **kwargs)
    combine_adapters(ours, {"a": 0.7, "b": -1.5}, "ab", method=method, rank=kwargs.get("svd_rank"))
    theirs.set_adapter("ab")
    set_active_adapters(ours, "ab")
    x = ids()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-4, atol=1e-4)
    if method == "cat":  # exactly the weighted sum of the deltas
        layer = ours.model.layers[0].self_attn.q_proj
        expected = 0.7 * layer.delta_weight("a") - 1.5 * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("ab"), expected)
