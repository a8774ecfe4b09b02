"""`slimtune merge`: standalone folders that transformers loads and that match base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import hf_greedy, make_peft_adapter, make_tiny_llama, save_tiny_model
from oracles import assert_close_to_bnb
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune.cli import main
from slimtune.export import merge_to_folder

IDS = torch.tensor([[1, 40, 70, 6, 81, 69, 66, 79, 66, 7, 20, 33]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("base") / "tiny")
    adapter = make_peft_adapter(make_tiny_llama(), folder.parent / "adapter", seed=5)
    return folder, adapter


def _peft_reference(folder, adapter):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(folder)
    return PeftModel.from_pretrained(model, adapter).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_merged_folder_loads_in_transformers_and_matches_base_plus_adapter(base, tmp_path):
    folder, adapter = base
    report = merge_to_folder(folder, adapter, tmp_path / "merged")
    assert report.merged_layers == 14  # 7 linear layers x 2 blocks
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = _peft_reference(folder, adapter)
    torch.testing.assert_close(_logits(merged), _logits(reference), atol=1e-4, rtol=1e-4)
    assert hf_greedy(merged, IDS, 10) == hf_greedy(reference, IDS, 10)
    base_model = AutoModelForCausalLM.from_pretrained(folder)
    assert hf_greedy(base_model, IDS, 10) != hf_greedy(
        merged, IDS, 10
    )  # the adapter changed something
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp folder left
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_shards_and_tied_embeddings(tmp_path):
    folder = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    adapter = make_peft_adapter(make_tiny_llama(tie_word_embeddings=True), tmp_path / "a", seed=6)
    merge_to_folder(folder, adapter, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and "lm_head.weight" not in index["weight_map"]
    for shard in shards:
        assert (tmp_path / "out" / shard).stat().st_size < 40_000 + 20_000
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    reference = _peft_reference(folder, adapter)
    torch.testing.assert_close(_logits(merged), _logits(reference), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_export_is_the_merged_weights_rounded(base, tmp_path, dtype, torch_dtype):
    folder, adapter = base
    merge_to_folder(folder, adapter, tmp_path / dtype, dtype=dtype)
    reference = _peft_reference(folder, adapter).merge_and_unload().state_dict()
    with safe_open(tmp_path / dtype / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(reference)
        for key in f.keys():  # noqa: SIM118
            expected = reference[key].to(torch_dtype)
            assert torch.allclose(f.get_tensor(key).float(), expected.float(), rtol=1e-2, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / dtype)
    assert merged.dtype == torch_dtype


def test_qlora_merge_uses_the_dequantized_nf4_base(base, tmp_path):
    from slimtune.lora import load_adapter
    from slimtune.models import load_model
    from slimtune.quant import QuantConfig

    folder, adapter = base
    merge_to_folder(folder, adapter, tmp_path / "out", qlora=True)
    qlora_model, _ = load_model(folder, quant=QuantConfig())
    load_adapter(qlora_model, adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(merged), _logits(qlora_model), atol=1e-4, rtol=1e-4)


def test_cli_qlora_merge_uses_the_format_the_adapter_was_trained_on(base, tmp_path):
    """`merge --qlora` merges into the base as the adapter's training config quantized it
    (here FP4, blocksize 128, no double quantization); flags override the file."""
    import shutil

    from slimtune.lora import load_adapter
    from slimtune.models import load_model
    from slimtune.quant import QuantConfig

    folder, adapter = base
    trained = shutil.copytree(adapter, tmp_path / "adapter")
    (trained / "config.yaml").write_text("quant_type: fp4\nblocksize: 128\ndouble_quant: false\n")

    def merged(name: str, *flags: str) -> torch.Tensor:
        argv = ["merge", "--model", str(folder), "--adapter", str(trained), "--qlora",
                "--output", str(tmp_path / name), *flags]  # fmt: skip
        assert main(argv) == 0
        return _logits(AutoModelForCausalLM.from_pretrained(tmp_path / name).eval())

    def qlora_logits(config: QuantConfig) -> torch.Tensor:
        model, _ = load_model(folder, quant=config)
        load_adapter(model, trained)
        return _logits(model.eval())

    fp4 = qlora_logits(QuantConfig("fp4", 128, False))
    torch.testing.assert_close(merged("fp4"), fp4, atol=1e-4, rtol=1e-4)
    nf4 = qlora_logits(QuantConfig())
    assert not torch.allclose(fp4, nf4, atol=1e-3)  # the formats differ where it shows
    flags = ["--quant-type", "nf4", "--blocksize", "64", "--double-quant"]
    torch.testing.assert_close(merged("nf4", *flags), nf4, atol=1e-4, rtol=1e-4)
    merged("requantized", "--quantize", "nf4")
    config = json.loads((tmp_path / "requantized" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_nf4_export_holds_the_bytes_bitsandbytes_would_write(base, tmp_path):
    import bitsandbytes.functional as bnbf

    folder, adapter = base
    report = merge_to_folder(folder, adapter, tmp_path / "nf4", quantize="nf4")
    assert 0 < report.requant_rel_error < 0.2
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reference = _peft_reference(folder, adapter).merge_and_unload()
    weight = reference.model.layers[1].mlp.down_proj.weight.detach()
    packed, _ = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=True)
    with safe_open(tmp_path / "nf4" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.1.mlp.down_proj.weight"), packed)
    # transformers + bitsandbytes load it, and it computes what the bitsandbytes round trip of
    # every merged linear weight computes.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4").eval()
    with torch.no_grad():
        for module in reference.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                q, state = bnbf.quantize_4bit(
                    module.weight, quant_type="nf4", compress_statistics=True
                )
                module.weight.copy_(bnbf.dequantize_4bit(q, state))
    assert_close_to_bnb(_logits(reference), loaded, lambda: _logits(loaded), atol=1e-4, rtol=1e-4)


def test_cli_merge_and_its_errors(base, tmp_path, capsys):
    folder, adapter = base
    out = tmp_path / "cli"
    argv = ["merge", "--model", str(folder), "--adapter", str(adapter), "--output", str(out)]
    assert main(argv) == 0
    assert "merged into 14 layers" in capsys.readouterr().out
    assert main(argv) == 2  # the output folder is not empty now
    assert "not empty" in capsys.readouterr().err
    bad = [
        "merge",
        "--model",
        str(folder),
        "--adapter",
        str(tmp_path),
        "--output",
        str(tmp_path / "x"),
    ]
    assert main(bad) == 2
    assert "adapter_config.json" in capsys.readouterr().err
