"""`generate`, `eval`: an adapter trained with QLoRA runs on a 4-bit base by default, from the
packed codes; --float and --quant none give float; --json reports tokens and speed."""

import json

import pytest
import torch
from helpers import save_qlora_run, sums, write_jsonl

from slimtune.cli import main


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A tiny model folder and an adapter folder marked as trained with QLoRA (config.yaml)."""
    root = tmp_path_factory.mktemp("qlora-run")
    return save_qlora_run(root, "method: qlora\nquant_type: fp4\ndouble_quant: true\n")


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _generate(run, capsys, *flags) -> dict:
    model, adapter = run
    args = ["generate", "1+2=", "--model", str(model), "--adapter", str(adapter), "--raw"]
    assert main([*args, "--max-new-tokens", "6", "--json", *flags]) == 0
    return _json(capsys)


def test_generate_json_runs_qlora_adapters_in_4_bits(qlora_run, capsys):
    fast = _generate(qlora_run, capsys)
    # One stream of a 4-bit LLaMA: the decode loop's C step (native_step.py)
    assert fast["four_bit"] is True and fast["engine"] == "native"
    assert 0 < fast["tokens"] <= 6 and fast["seconds"] > 0 and fast["tokens_per_s"] > 0
    assert fast["compute_dtype"] == "float32"
    decoded = _generate(qlora_run, capsys, "--float")
    assert decoded["four_bit"] is False
    assert decoded["text"] == fast["text"]  # the same 4-bit weights, decoded first
    plain = _generate(qlora_run, capsys, "--quant", "none")
    assert plain["four_bit"] is False


def test_eval_in_4_bits_equals_eval_of_decoded_weights(qlora_run, tmp_path, capsys):
    model, adapter = qlora_run
    data = write_jsonl(tmp_path / "test.jsonl", sums(8))
    args = ["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(data)]
    assert main([*args, "--json", "--max-new-tokens", "3"]) == 0
    fast = _json(capsys)
    assert main([*args, "--json", "--max-new-tokens", "3", "--float"]) == 0
    decoded = _json(capsys)
    assert fast["loss"] == pytest.approx(decoded["loss"], rel=1e-5)
    assert fast["exact_match"] == decoded["exact_match"] and fast["n"] == 8


def test_device_flag_runs_on_the_cpu_and_names_a_missing_gpu(qlora_run, capsys, monkeypatch):
    assert _generate(qlora_run, capsys, "--device", "cpu")["device"] == "cpu"
    assert _generate(qlora_run, capsys)["device"] == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, adapter = qlora_run
    argv = ["generate", "1+2=", "--model", str(model), "--adapter", str(adapter), "--device"]
    assert main([*argv, "cuda"]) == 2
    assert "cuda asked for, but torch sees no CUDA device" in capsys.readouterr().err
    assert _generate(qlora_run, capsys)["device"] == "cpu"  # auto
