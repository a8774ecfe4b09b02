"""slimtune's own QLoRA stack learns: a tiny model from a folder, loaded into NF4 with double
quantization, slimtune's LoRA with sparse dropout, trained by `slimtune.train.train` from a
JSONL file, evaluated by generation. No PEFT, no bitsandbytes in the loop."""

from __future__ import annotations

import random

import pytest
from helpers import make_char_tokenizer, make_tiny_llama, write_jsonl

from slimtune.lora import LoraLinear
from slimtune.lora import layer as lora_layer
from slimtune.quant import Linear4bit
from slimtune.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def task_rows(n: int, seed: int) -> list[dict]:
    """Random prompts of 2-5 characters, always answered 'done!'. (An answer that depends on
    the prompt, such as 'word' for letters and 'number' for digits, stalls near 2/3 exact match
    on this random tiny base in 4 bits and in float alike, so it would test the base, not us.)"""
    rng = random.Random(seed)
    pool = "abcdefghij0123456789"
    return [
        {
            "prompt": "".join(rng.choice(pool) for _ in range(rng.randint(2, 5))),
            "completion": "done!",
        }
        for _ in range(n)
    ]


def save_plain_model(folder):
    """The tiny LLaMA with the character tokenizer, no chat template: prompt, then answer."""
    model = make_tiny_llama(initializer_range=0.3)
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = None
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_qlora_with_sparse_dropout_learns_a_task(tmp_path, monkeypatch):
    folder = save_plain_model(tmp_path / "base")
    train_file = write_jsonl(tmp_path / "train.jsonl", task_rows(64, seed=0))
    test_file = write_jsonl(tmp_path / "test.jsonl", task_rows(24, seed=1))

    sparse_calls = []
    original = lora_layer.SparseDropoutLora.apply

    def counting_apply(*args):
        sparse_calls.append(args[-1])  # the dropout probability
        return original(*args)

    monkeypatch.setattr(lora_layer.SparseDropoutLora, "apply", counting_apply)
    config = TrainConfig(
        model=str(folder),
        data=str(train_file),
        eval_data=str(test_file),
        method="qlora",
        quant_type="nf4",
        double_quant=True,
        rank=8,
        alpha=16,
        dropout=0.1,
        lr=1e-2,
        epochs=4,
        batch_size=4,
        max_grad_norm=1.0,
        lr_scheduler="cosine",
        eval_every=4,
        max_new_tokens=8,
        output=str(tmp_path / "run"),
    )
    result = train(config, progress=False)

    model = result.model
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(isinstance(m.base_layer, Linear4bit) for m in layers)
    assert all(m.base_layer.quant_state.absmax.dtype.is_floating_point is False for m in layers)
    assert sparse_calls and set(sparse_calls) == {0.1}  # every training LoRA product dropped
    # Every adapted layer trained: B starts at zero and moves only through its gradient.
    for module in layers:
        assert all(b.weight.abs().max() > 0 for b in module.lora_B.values()), module

    first, last = result.evals[0], result.evals[-1]
    # Stated factor: the eval loss after 4 epochs is under a twentieth of the loss after 4 steps,
    # and exact match goes from no test row right to at least 80% of them (measured: 87.5%).
    assert last["eval_loss"] < first["eval_loss"] / 20, (first, last)
    assert first["eval_accuracy"] == 0.0, first
    assert last["eval_accuracy"] >= 0.8, last
