"""The training loop on a tiny LLaMA: it learns, resumes exactly (also after SIGKILL), and stops
cleanly on NaN. The adapter here is PEFT's, standing in for any trainable model."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama, task_data, tiny_config, tiny_lora_model
from safetensors.torch import load_file

from slimtune.train import TrainingDiverged, train

# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

DATA = task_data()


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_tiny_model_learns_a_tiny_task(tmp_path):
    result = train(
        tiny_config(tmp_path, epochs=4), model=tiny_lora_model(), data=DATA, progress=False
    )
    first, last = result.evals[0]["eval_loss"], result.evals[-1]["eval_loss"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # Loss at initialisation is ~7 nats per token; after 4 epochs, under a tenth of that.
    assert steps[0]["loss"] > 4.0
    assert last < steps[0]["loss"] / 10, (steps[0]["loss"], first, last)
    assert len(result.evals) == 4  # one per epoch
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(steps[0])
    assert {"eval_loss", "eval_perplexity", "eval_accuracy"} <= set(records[-1])
    # The final adapter in PEFT's format, loadable by PEFT itself.
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_tiny_llama(initializer_range=0.3), str(tmp_path))
    for name, tensor in adapter_tensors(tmp_path).items():
        module_param = dict(loaded.named_parameters())[name.replace(".weight", ".default.weight")]
        torch.testing.assert_close(module_param, tensor)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert "rank: 8" in (tmp_path / "config.yaml").read_text()


def test_resume_from_a_middle_checkpoint_is_exact(tmp_path):
    """Run 12 steps; resume a copy from the step-4 checkpoint; same adapter, bit for bit."""
    whole = tmp_path / "whole"
    train(
        tiny_config(whole, epochs=2, save_every=4, keep_checkpoints=10),
        model=tiny_lora_model(),
        data=DATA,
        progress=False,
    )
    checkpoints = sorted(p.name for p in (whole / "checkpoints").iterdir())
    assert checkpoints == ["step-000004", "step-000008", "step-000012"]
    resumed = tmp_path / "resumed"
    config = tiny_config(resumed, epochs=2, resume=str(whole / "checkpoints/step-000004"))
    # A different init: everything trainable must come from the checkpoint.
    train(config, model=tiny_lora_model(seed=5), data=DATA, progress=False)
    a, b = adapter_tensors(whole), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_keeps_only_the_last_k_checkpoints(tmp_path):
    train(
        tiny_config(tmp_path, epochs=1, save_every=1, keep_checkpoints=2),
        model=tiny_lora_model(),
        data=DATA,
        progress=False,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000005", "step-000006"]
    saved = load_file(str(tmp_path / "checkpoints/step-000006/optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in saved)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_lora_model()
    calls = {"n": 0}

    def poison(module, args, output):  # from the 7th forward pass on, the loss becomes NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 7 else output

    model.get_base_model().model.norm.register_forward_hook(poison)
    config = tiny_config(tmp_path, epochs=1, save_every=1, keep_checkpoints=5)
    with pytest.raises(TrainingDiverged, match="diverged at step 4.*step-000003"):
        train(config, model=model, data=DATA, progress=False)
    # The adapter in the model is that of the last good step: the NaN step changed nothing.
    saved = load_file(str(tmp_path / "checkpoints/step-000003/trainable.safetensors"))
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.isfinite(param).all() and torch.equal(param, saved[name])
    assert not (tmp_path / "checkpoints/step-000004").exists()


KILLED_RUN = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path[:0] = {paths!r}
    from helpers import task_data, tiny_config, tiny_lora_model
    from slimtune.train import train
    torch.set_num_threads(1)
    model = tiny_lora_model()
    if {hold}:
        # Once step 4's checkpoint is written, hang in step 5 until the parent kills us: the
        # kill lands mid-run however slow the machine is.
        checkpoint = os.path.join(sys.argv[1], "checkpoints", "step-000004")
        def hang(*args):
            if os.path.exists(checkpoint):
                time.sleep(3600)
        model.get_base_model().model.norm.register_forward_hook(hang)
    train(tiny_config(sys.argv[1], epochs=2, save_every=1, keep_checkpoints=3, resume={resume}),
          model=model, data=task_data(), progress=False)
    """
)


def _script(tmp_path, hold: bool, resume: bool) -> Path:
    paths = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "src")]
    script = tmp_path / f"run_{resume}.py"
    script.write_text(KILLED_RUN.format(paths=paths, hold=hold, resume=resume))
    return script


@pytest.mark.processes
def test_resume_after_sigkill_is_exact(tmp_path):
    reference = tmp_path / "reference"
    train(tiny_config(reference, epochs=2), model=tiny_lora_model(), data=DATA, progress=False)

    output = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, _script(tmp_path, True, False), output])
    deadline = time.time() + 600
    while not (output / "checkpoints/step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (output / "adapter_model.safetensors").exists()

    subprocess.run([sys.executable, _script(tmp_path, False, True), output], check=True)
    a, b = adapter_tensors(reference), adapter_tensors(output)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    # Each step logged exactly once, though the killed run had logged some after step 4.
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))


def test_dropout_seeds_differ_by_rank_and_step_and_repeat_exactly():
    """Every (seed, step, rank) gets its own dropout stream: ranks of a torchrun job do not
    drop the same positions, and a resumed step draws what the unbroken run drew."""
    from slimtune.lora.sparse_dropout import drop_positions
    from slimtune.train.loop import _step_seed

    seeds = {_step_seed(3, step, rank) for step in range(50) for rank in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 - 1 for s in seeds)
    assert _step_seed(3, 7, 1) == _step_seed(3, 7, 1) != _step_seed(4, 7, 1)

    def first_positions(rank: int) -> torch.Tensor:
        torch.manual_seed(_step_seed(3, 7, rank))
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # as SparseDropoutLora draws
        return drop_positions(10_000, 0.1, seed)

    assert not torch.equal(first_positions(0)[:50], first_positions(1)[:50])
    assert torch.equal(first_positions(1), first_positions(1))
