"""slimtune.models in 4 bits: streaming load, 4-bit folders, interop with transformers + bnb."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer, save_tiny_folder
from oracles import assert_close_to_bnb
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.models import load_model, save_quantized_model, streaming
from slimtune.quant import Linear4bit, QuantConfig, quantize_model, quantized_state_dict

CONFIGS = {
    "nf4-dq": QuantConfig("nf4", 64, True),
    "fp4": QuantConfig("fp4", 64, False),
    "int4-dq": QuantConfig("int4", 128, True),
}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = quantized_state_dict(a), quantized_state_dict(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", make_tiny_llama(seed=5))


# --- streaming load ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_streaming_load_equals_quantize_model_and_saves_exactly(tiny_folder, tmp_path, name):
    config = CONFIGS[name]
    streamed, tokenizer = load_model(tiny_folder, quant=config)
    reference, _ = load_model(tiny_folder)
    quantize_model(reference, config)
    assert_same_state(streamed, reference)
    assert torch.equal(logits(streamed), logits(reference))
    assert sum(isinstance(m, Linear4bit) for m in streamed.modules()) == 14
    assert type(streamed.lm_head) is nn.Linear  # the output layer stays float
    assert all(p.device.type == "cpu" for p in streamed.parameters())

    out = save_quantized_model(streamed, tokenizer, tmp_path / "q")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    back, back_tokenizer = load_model(out)
    assert_same_state(back, streamed)
    assert torch.equal(logits(back), logits(streamed))
    assert back_tokenizer("abc")["input_ids"] == tokenizer("abc")["input_ids"]


def test_streaming_load_of_gpt2_conv1d_with_tied_head(tmp_path):
    original = make_tiny_gpt2(seed=2)
    folder = tmp_path / "gpt2"
    original.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    streamed, _ = load_model(folder, quant=QuantConfig())
    quantize_model(original, QuantConfig())
    assert_same_state(streamed, original)
    assert streamed.lm_head.weight is streamed.transformer.wte.weight
    ids = torch.arange(3, 20).unsqueeze(0)
    assert torch.equal(logits(streamed, ids), logits(original, ids))


def test_streaming_holds_one_float_layer_at_a_time(tiny_folder, monkeypatch):
    """Every time a layer is quantized, no other target layer holds float weights."""
    seen = []
    build = streaming.build_skeleton
    models = []

    def build_and_keep(*args, **kwargs):
        models.append(build(*args, **kwargs))
        return models[-1]

    real_from_linear = Linear4bit.from_linear

    def watching_from_linear(linear, config=None):
        float_layers = [
            name
            for name, m in models[0].named_modules()
            if type(m) is nn.Linear and name != "lm_head" and m.weight.device.type != "meta"
        ]
        seen.append(len(float_layers))
        return real_from_linear(linear, config)

    monkeypatch.setattr(streaming, "build_skeleton", build_and_keep)
    monkeypatch.setattr(streaming.Linear4bit, "from_linear", staticmethod(watching_from_linear))
    load_model(tiny_folder, quant=QuantConfig())
    assert seen == [1] * 14


def test_streaming_reports_missing_tensors(tmp_path):
    folder = save_tiny_folder(tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlimtuneError, match=r"no tensor for model\.layers\.1\.mlp\.up_proj"):
        load_model(folder, quant=QuantConfig())
    del tensors["model.norm.weight"]
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlimtuneError, match="no tensor for model.norm.weight"):
        load_model(folder, quant=QuantConfig())


# --- 4-bit folders ----------------------------------------------------------------------------


def test_quantized_folder_config_is_what_transformers_writes(tiny_folder, tmp_path):
    from transformers import BitsAndBytesConfig

    model, tokenizer = load_model(tiny_folder, quant=CONFIGS["nf4-dq"])
    out = save_quantized_model(model, tokenizer, tmp_path / "q")
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head"],
    ).to_dict()
    assert written == json.loads(json.dumps(expected))
    keys = load_file(out / "model.safetensors").keys()
    prefix = "model.layers.0.mlp.up_proj.weight"
    assert {f"{prefix}{s}" for s in ("", ".absmax", ".quant_map", ".nested_absmax")} <= keys
    assert f"{prefix}.quant_state.bitsandbytes__nf4" in keys


@pytest.mark.parametrize("name", ["nf4-dq", "fp4"])
def test_transformers_bnb_loads_our_folder_with_the_same_logits(tiny_folder, tmp_path, name):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(tiny_folder, quant=CONFIGS[name])
    out = save_quantized_model(model, tokenizer, tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(out)
    layer = theirs.model.layers[1].self_attn.o_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    ours = model.model.layers[1].self_attn.o_proj
    theirs_weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(theirs_weight, ours.dequantize(torch.float32))
    assert_close_to_bnb(logits(model), theirs, lambda: logits(theirs), atol=1e-5)


def test_we_load_a_folder_written_by_transformers_bnb(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=bnb_config)
    theirs.save_pretrained(tmp_path / "bnb")
    make_tiny_tokenizer().save_pretrained(tmp_path / "bnb")
    ours, _ = load_model(tmp_path / "bnb")
    assert isinstance(ours.model.layers[0].mlp.down_proj, Linear4bit)
    assert_close_to_bnb(logits(ours), theirs, lambda: logits(theirs), atol=1e-5)


def test_int4_folder_is_slimtune_only(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(tiny_folder, quant=CONFIGS["int4-dq"])
    out = save_quantized_model(model, tokenizer, tmp_path / "q")
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == "slimtune"
    assert written["bnb_4bit_quant_type"] == "int4"
    with pytest.raises(Exception):  # noqa: B017 (any refusal; transformers' type varies)
        AutoModelForCausalLM.from_pretrained(out)


def test_save_refuses_a_float_model_or_a_full_folder(tiny_folder, tmp_path):
    model, tokenizer = load_model(tiny_folder)
    with pytest.raises(SlimtuneError, match="no 4-bit layers"):
        save_quantized_model(model, tokenizer, tmp_path / "q")
    quantize_model(model)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(SlimtuneError, match="exists and is not empty"):
        save_quantized_model(model, tokenizer, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_failed_save_leaves_nothing_behind(tiny_folder, tmp_path):
    model, _ = load_model(tiny_folder, quant=QuantConfig())

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized_model(model, BrokenTokenizer(), tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_quantize_writes_a_folder_that_loads(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_folder), "--output", str(out)]
    code = main([*argv, "--quant-type", "fp4", "--blocksize", "128", "--no-double-quant"])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model, _ = load_model(out)
    layer = model.model.layers[0].mlp.gate_proj
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == ("fp4", 128, False)
    expected, _ = load_model(tiny_folder, quant=QuantConfig("fp4", 128, False))
    assert_same_state(model, expected)


def test_cli_quantize_bad_input_is_one_line(tiny_folder, tmp_path, capsys):
    argv = ["quantize", "--model", str(tiny_folder), "--output", str(tmp_path / "q")]
    assert main([*argv, "--blocksize", "100"]) == 2
    assert "--blocksize: must be one of 32, 64, 128" in capsys.readouterr().err  # as train says
    assert main(["quantize", "--model", str(tmp_path / "none"), "--output", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compute_dtype_is_stored_and_overridable(tiny_folder, tmp_path):
    model, tokenizer = load_model(tiny_folder, quant=QuantConfig(compute_dtype=torch.bfloat16))
    out = save_quantized_model(model, tokenizer, tmp_path / "q")
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert written["bnb_4bit_compute_dtype"] == "bfloat16"
    back, _ = load_model(out)
    assert back.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    back, _ = load_model(out, quant=QuantConfig())
    assert back.model.layers[0].mlp.up_proj.compute_dtype == torch.float32
