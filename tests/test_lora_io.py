"""Adapter files in PEFT's format, both ways, and the errors for files that do not fit."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from helpers import ids, make_tiny_gpt2, make_tiny_llama, twins
from safetensors.torch import load_file, save_file

from slimtune.errors import SlimtuneError
from slimtune.lora import LoraConfig, inject_adapter, load_adapter, save_adapter

# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

SAVE_CASES = {
    "llama-dora-patterns": (
        make_tiny_llama,
        LoraConfig(
            r=4,
            alpha=8,
            use_dora=True,
            target_modules=r".*\.(q_proj|v_proj|up_proj)",
            rank_pattern={"up_proj": 2},
            alpha_pattern={r"layers\.0\.self_attn\.v_proj": 5},
        ),
    ),
    "gpt2-rslora": (make_tiny_gpt2, LoraConfig(r=4, alpha=8, use_rslora=True)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_peft_loads_what_we_save(case, tmp_path):
    make, config = SAVE_CASES[case]
    base, theirs, ours = twins(make, config)
    folder = save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    written = load_file(folder / "adapter_model.safetensors")
    saved_by_peft = peft.get_peft_model_state_dict(theirs)
    assert written.keys() == saved_by_peft.keys()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    x = ids()
    torch.testing.assert_close(loaded(x).logits, ours.eval()(x).logits, rtol=1e-5, atol=1e-5)


def test_we_load_a_gpt2_adapter_peft_saves(tmp_path):
    base = make_tiny_gpt2()
    config = peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, rtol=1e-5, atol=1e-5)


def test_we_load_what_peft_saves(tmp_path):
    base = make_tiny_llama()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        use_dora=True,
        rank_pattern={"o_proj": 2},
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.add_adapter(
        "extra", peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    load_adapter(ours, tmp_path, "extra", activate=False)  # PEFT's subfolder for a named adapter
    x = ids()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    from slimtune.lora import set_active_adapters

    set_active_adapters(ours, "extra")
    theirs.set_adapter("extra")
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_named_adapter_goes_to_a_subfolder_and_round_trips(tmp_path):
    model = inject_adapter(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "task")
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    folder = save_adapter(model, tmp_path, "task")
    assert folder == tmp_path / "task"
    save_adapter(model, tmp_path, "task")  # overwriting is atomic: no temporary files left behind
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    again = load_adapter(make_tiny_llama(), tmp_path, "task")
    torch.testing.assert_close(again(ids()).logits, model(ids()).logits)


@pytest.fixture
def saved(tmp_path):
    model = inject_adapter(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path)
    return tmp_path


def _rewrite(folder, *, config=None, tensors=None):
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors")


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(SlimtuneError, match="is not an adapter folder: it has no adapter_config"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_only_safetensors(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(SlimtuneError, match="only safetensors"):
        load_adapter(make_tiny_llama(), saved)


def test_missing_module_names_the_key(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[key]
    _rewrite(saved, tensors=tensors)
    with pytest.raises(SlimtuneError, match=f"missing key '{key}'"):
        load_adapter(make_tiny_llama(), saved)


def test_mismatched_module_names_the_key(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    _rewrite(saved, tensors=tensors)
    with pytest.raises(
        SlimtuneError, match=r"layers\.7\.self_attn\.q_proj.*not a layer of the model"
    ):
        load_adapter(make_tiny_llama(), saved)


def test_rank_not_matching_shapes_names_the_key(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 8
    _rewrite(saved, config=config)
    with pytest.raises(
        SlimtuneError,
        match=r"key '.*layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(4, 64\), expected \(8, 64\)",
    ):
        load_adapter(make_tiny_llama(), saved)


def test_a_failed_load_leaves_the_model_untouched(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["use_dora"] = True  # the file has no magnitude vectors
    _rewrite(saved, config=config)
    model = make_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SlimtuneError, match="missing key .*lora_magnitude_vector"):
        load_adapter(model, saved)
    assert model.state_dict().keys() == before.keys()


def test_an_adapter_loaded_into_a_model_in_eval_mode_is_in_eval_mode(tmp_path):
    trained = inject_adapter(make_tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.5))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # B = 0 would hide whether dropout runs
    save_adapter(trained, tmp_path)
    model = load_adapter(make_tiny_llama().eval(), tmp_path)
    assert not any(m.training for m in model.modules())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
    training = load_adapter(make_tiny_llama().train(), tmp_path)
    assert all(m.training for m in training.modules())
