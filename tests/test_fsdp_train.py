"""`slimtune train --fsdp` under torchrun: the 4-bit base and the adapter sharded over 2 gloo
processes (FSDP2) train what data parallel training and one process train.

The tiny LLaMA and data of test_dist_train.py, as QLoRA (NF4, double quantization). Tolerances:
the loss and gradient norm of every step within 1e-5 of one process with twice the batch, the
adapter within rtol 1e-3 / atol 1e-4 (float32 sums in another order, magnified by 4 Adam
steps). With dropout the masks depend on each rank's rows (docs/distributed.md), so one process
draws others: there the reference is data parallel training on the same 2 processes, which
draws the same masks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import save_char_model, write_jsonl
from safetensors.torch import load_file
from test_dist_train import CONFIG, _adapter, _completion_rows, _losses, _train

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp_train")
    save_char_model(folder / "model", chars="abcdefghijklmnopqrstuvwxyz0123456789 .,:-?!'")
    write_jsonl(folder / "data.jsonl", _completion_rows(16))
    config = CONFIG.format(folder=folder).replace("method: lora", "method: qlora")
    (folder / "config.yaml").write_text(config)
    return folder


@pytest.fixture(scope="module")
def runs(workdir) -> dict[str, Path]:
    _train(workdir, 1, "one", "--batch-size=4")
    _train(workdir, 2, "fsdp", "--batch-size=2", "--fsdp")
    return {"one": workdir / "one", "fsdp": workdir / "fsdp"}


def _same_curves(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=1e-5)


def _same_adapters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name, tensor in a.items():
        assert b[name].shape == tensor.shape, name  # whole tensors, not one rank's shard
        torch.testing.assert_close(b[name], tensor, rtol=1e-3, atol=1e-4)


def test_fsdp_matches_one_process_with_twice_the_batch(runs):
    _same_curves(_losses(runs["one"]), _losses(runs["fsdp"]))
    assert _losses(runs["one"])[-1]["loss"] < _losses(runs["one"])[0]["loss"] - 0.1
    one, fsdp = _adapter(runs["one"]), _adapter(runs["fsdp"])
    _same_adapters(one, fsdp)
    assert any("lora_B" in n and t.abs().max() > 1e-3 for n, t in fsdp.items())


def test_fsdp_writes_a_whole_peft_adapter_and_checkpoints_once(runs):
    """Rank 0 writes: the PEFT config of one process, whole tensors (checked above), one log
    record per step, no leftovers of a second writer."""
    one, fsdp = runs["one"], runs["fsdp"]
    config = json.loads((fsdp / "adapter_config.json").read_text())
    assert config == json.loads((one / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert not [p.name for p in fsdp.rglob("*") if ".tmp" in p.name]
    assert sorted(p.name for p in (fsdp / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    # A checkpoint holds whole tensors too: the same names and shapes as one process writes.
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        ours = load_file(str(fsdp / "checkpoints" / "step-000002" / name))
        theirs = load_file(str(one / "checkpoints" / "step-000002" / name))
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_fsdp_with_dropout_matches_data_parallel(workdir):
    _train(workdir, 2, "fsdp-dropout", "--batch-size=2", "--dropout=0.1", "--fsdp")
    _train(workdir, 2, "dp-dropout", "--batch-size=2", "--dropout=0.1")
    sharded, replicated = workdir / "fsdp-dropout", workdir / "dp-dropout"
    _same_curves(_losses(replicated), _losses(sharded))
    _same_adapters(_adapter(replicated), _adapter(sharded))


def test_fsdp_resume_is_exact(workdir):
    """Resumed from the step-2 checkpoint (each rank reads the whole tensors, keeps its shard),
    with dropout: the run ends bit for bit where the unbroken one did."""
    unbroken = workdir / "fsdp-dropout"
    if not unbroken.exists():
        _train(workdir, 2, "fsdp-dropout", "--batch-size=2", "--dropout=0.1", "--fsdp")
    killed = workdir / "fsdp-killed"
    shutil.copytree(unbroken, killed)
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    (killed / "adapter_model.safetensors").unlink()
    _train(workdir, 2, "fsdp-killed", "--batch-size=2", "--dropout=0.1", "--fsdp", "--resume")

    assert [r["loss"] for r in _losses(killed)] == [r["loss"] for r in _losses(unbroken)]
    resumed, uninterrupted = _adapter(killed), _adapter(unbroken)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_fsdp_evaluates_the_loss_on_every_rank(workdir):
    """Evaluation during training under --fsdp: the eval loss every 2 steps within 1e-5 of one
    process's (which scores with the 4-bit inference kernels, not the training forward). 5
    eval rows in batches of 2 x 2: rank 1 has no row of the last batch and still takes part.
    No answers are generated under --fsdp: no exact match."""
    write_jsonl(workdir / "eval.jsonl", _completion_rows(21)[16:])
    flags = (f"--eval-data={workdir / 'eval.jsonl'}", "--eval-every=2")
    _train(workdir, 1, "one-eval", "--batch-size=4", *flags)
    _train(workdir, 2, "fsdp-eval", "--batch-size=2", "--fsdp", *flags)
    one = [r for r in _losses(workdir / "one-eval") if "eval_loss" in r]
    sharded = [r for r in _losses(workdir / "fsdp-eval") if "eval_loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in sharded] == [2, 4]
    for a, b in zip(one, sharded, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
        assert b["eval_accuracy"] is None and a["eval_accuracy"] is not None
    assert sharded[-1]["eval_loss"] < sharded[0]["eval_loss"]  # the adapter it evaluates trains
    # Evaluating leaves the training as it was: the curve of the unsharded run with evals.
    curves = [[r for r in _losses(workdir / n) if "loss" in r] for n in ("one-eval", "fsdp-eval")]
    _same_curves(*curves)
