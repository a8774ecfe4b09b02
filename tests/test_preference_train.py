"""DPO and ORPO through the training loop on a tiny LLaMA.

The task: after a random prompt, an answer of four tokens of one "kind" (drawn from ids
10-15) or of the other (ids 70-75). The base is first taught both kinds, the rejected
one more often, so it prefers that kind; preference tuning on fresh
pairs must turn it around: held-out preference accuracy >= 0.9, and greedy answers of the
chosen kind.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import make_tiny_llama, peft_lora, tiny_config
from safetensors.torch import load_file

from slimtune.train import TrainConfig, TrainData, train

pytestmark = pytest.mark.usefixtures("one_thread")

CHOSEN_KIND, REJECTED_KIND = range(10, 16), range(70, 76)
PAD = 0


def _prompt(g) -> list[int]:
    return torch.randint(
        110, 128, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g
    ).tolist()


def _answer(kind: range, g) -> list[int]:
    return torch.randint(kind.start, kind.stop, (4,), generator=g).tolist()


def pairs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = _prompt(g)
        pair = {}
        for side, kind in (("chosen", CHOSEN_KIND), ("rejected", REJECTED_KIND)):
            answer = _answer(kind, g)
            pair[f"{side}_input_ids"] = prompt + answer
            pair[f"{side}_labels"] = [-100] * len(prompt) + answer
        out.append(pair)
    return out


def sft_rows(n: int, seed: int) -> list[dict]:
    """Three answers in four of the rejected kind, the others of the chosen kind."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        kind = CHOSEN_KIND if i % 4 == 0 else REJECTED_KIND
        prompt, answer = _prompt(g), _answer(kind, g)
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def config(output, **overrides) -> TrainConfig:
    """tiny_config for preference runs: no dropout, full batches of 8, a constant rate."""
    settings = dict(dropout=0.0, epochs=2, batch_size=8, grad_accum=1, warmup_steps=0,
                    lr_scheduler="constant", method="lora")  # fmt: skip
    return tiny_config(output, **{**settings, **overrides})


@pytest.fixture(scope="module")
def biased_base():
    """A tiny LLaMA taught (full fine-tuning, a few full-batch Adam steps) both kinds, the
    rejected one three times as often: its greedy answers are of the rejected kind."""
    model = make_tiny_llama(initializer_range=0.3).train()
    rows = sft_rows(64, seed=0)
    ids = torch.tensor([r["input_ids"] + [PAD] * (8 - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (8 - len(r["labels"])) for r in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(80):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def greedy_share(model, prompts: list[list[int]], kind: range, n: int = 4) -> float:
    """The share of greedy answers (n tokens) mostly (over half their tokens) of `kind`."""
    model.eval()
    hits = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        hits += sum(int(t) in kind for t in ids[0, len(prompt) :]) > n / 2
    return hits / len(prompts)


def held_out_prompts(pairs_: list[dict]) -> list[list[int]]:
    return [
        p["chosen_input_ids"][
            : p["chosen_labels"].index(next(x for x in p["chosen_labels"] if x != -100))
        ]
        for p in pairs_
    ]


TRAIN, EVAL = pairs(64, seed=1), pairs(16, seed=2)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_tuning_turns_a_biased_base_around(tmp_path, biased_base, objective):
    prompts = held_out_prompts(EVAL)
    assert greedy_share(biased_base, prompts, REJECTED_KIND) >= 0.75  # what the base prefers
    assert greedy_share(biased_base, prompts, CHOSEN_KIND) <= 0.25
    data = TrainData(train=copy.deepcopy(TRAIN), eval=copy.deepcopy(EVAL), pad_token_id=PAD)
    settings = dict(objective=objective, beta=0.25, lr=2e-2, epochs=3)
    model = peft_lora(copy.deepcopy(biased_base))
    result = train(config(tmp_path, **settings), model=model, data=data, progress=False)

    first, last = result.evals[0], result.evals[-1]
    assert last["eval_reward_accuracy"] >= 0.9, result.evals
    assert last["eval_reward_margin"] > first["eval_reward_margin"]
    # Greedy answers turn to the chosen kind. ORPO's NLL term makes them >= 0.9 here; DPO only
    # moves the chosen answers relative to the rejected ones, and on this 2-layer model its
    # greedy share measured 0.81-0.94 over beta 0.1-0.5 and lr 0.005-0.02: asserted >= 0.75
    # (the base: <= 0.25).
    assert greedy_share(result.model, prompts, CHOSEN_KIND) >= (
        0.9 if objective == "orpo" else 0.75
    )
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for key in ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
        assert key in steps[0] and f"eval_{key}" in records[-1]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    if objective == "dpo":
        # At the start the policy is the reference: every implicit reward is 0.
        assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
        assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_dpo_resume_from_a_middle_checkpoint_is_exact(tmp_path, biased_base):
    whole = tmp_path / "whole"
    settings = dict(objective="dpo", epochs=2, dropout=0.1, save_every=4, keep_checkpoints=10)
    train(
        config(whole, **settings),
        model=peft_lora(copy.deepcopy(biased_base)),
        data=TrainData(train=copy.deepcopy(TRAIN), pad_token_id=PAD),
        progress=False,
    )
    resumed = tmp_path / "resumed"
    settings["resume"] = str(whole / "checkpoints/step-000004")
    # Fresh pairs (no cached reference) and another adapter init: all must come from the
    # checkpoint and the base.
    train(
        config(resumed, **settings),
        model=peft_lora(copy.deepcopy(biased_base), seed=5),
        data=TrainData(train=copy.deepcopy(TRAIN), pad_token_id=PAD),
        progress=False,
    )
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dpo_needs_an_adapter(tmp_path):
    from slimtune.errors import SlimtuneError

    model = make_tiny_llama()
    for p in model.parameters():
        p.requires_grad_(True)
    data = TrainData(train=copy.deepcopy(TRAIN[:8]), pad_token_id=PAD)
    with pytest.raises(SlimtuneError, match="reference is the base with the adapter switched off"):
        train(
            config(tmp_path, objective="dpo", method="full"), model=model, data=data, progress=False
        )
