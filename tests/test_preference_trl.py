"""DPO (sigmoid, IPO) and ORPO against TRL: the same model, the same batch, the same loss and
the same gradients, computed by TRL's trainers and by slimtune.

The model is a tiny LLaMA with a PEFT LoRA adapter whose B matrices are not zero, so that the
policy differs from the reference (the adapter switched off) and every term is non-trivial.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama, make_tokenizer

from slimtune.train.preference import (
    PreferenceObjective,
    cache_reference,
    pair_logps,
    preference_backward,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def tiny_base():
    return make_tiny_llama(vocab_size=512, initializer_range=0.2)


def perturb_adapter(model, seed: int = 0):
    """Non-zero B matrices: the policy then differs from the reference (the adapter off)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def policy_model(seed: int = 0):
    from peft import get_peft_model

    return perturb_adapter(get_peft_model(tiny_base(), lora_config()), seed)


def random_pairs(n: int, seed: int = 0) -> list[dict]:
    """TRL's tokenized rows: prompt_ids, chosen_ids, rejected_ids of varied lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, 512, (length,), generator=g).tolist()

    return [
        dict(prompt_ids=ids(2, 7), chosen_ids=ids(1, 9), rejected_ids=ids(1, 9)) for _ in range(n)
    ]


def slimtune_pairs(rows: list[dict]) -> list[dict]:
    """The same rows as slimtune encodes pairs: labels on the answer only."""
    pairs = []
    for r in rows:
        pair = {}
        for side in ("chosen", "rejected"):
            pair[f"{side}_input_ids"] = r["prompt_ids"] + r[f"{side}_ids"]
            pair[f"{side}_labels"] = [-100] * len(r["prompt_ids"]) + r[f"{side}_ids"]
        pairs.append(pair)
    return pairs


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def single_process():
    from slimtune.dist import DistInfo

    return DistInfo()


def trl_dataset():
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": "hello", "chosen": " world", "rejected": " answer"} for _ in range(2)]
    )


def assert_grads_close(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("loss_type", "by_side"), [("sigmoid", True), ("sigmoid", False), ("ipo", True)]
)
def test_dpo_loss_and_gradients_equal_trls(tmp_path, loss_type, by_side):
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    beta = 0.3
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=[loss_type],
        report_to=[],
        per_device_train_batch_size=4,
        use_cpu=True,
    )
    # TRL adds the adapter itself: given a PeftModel, it would take the adapter as pretrained
    # and use a copy of it (not the base) as the reference.
    trainer = DPOTrainer(
        model=tiny_base(),
        args=args,
        train_dataset=trl_dataset(),
        processing_class=make_tokenizer(),
        peft_config=lora_config(),
    )
    model = perturb_adapter(trainer.model)
    assert "ref" not in model.peft_config
    rows = random_pairs(4)
    batch = DataCollatorForPreference(pad_token_id=PAD)(rows)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    theirs = grads(model)

    objective = PreferenceObjective("dpo", beta=beta, dpo_loss=loss_type)
    pairs = slimtune_pairs(rows)
    # Two micro-batches of two pairs: the step normalisation must give the 4-pair mean.
    loss, stats = preference_backward(
        model,
        [pairs[:2], pairs[2:]],
        objective,
        single_process(),
        PAD,
        one_side_at_a_time=by_side,
    )
    ours = grads(model)
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(ours, theirs)
    # The reference was the adapter switched off, and is cached in the pairs.
    assert all("ref_chosen_logps" in p for p in pairs)
    metrics = trainer._metrics["train"]
    means = stats.means()
    assert means["reward_accuracy"] == pytest.approx(metrics["rewards/accuracies"][-1])
    assert means["reward_margin"] == pytest.approx(metrics["rewards/margins"][-1], rel=1e-4)
    assert means["logps_chosen"] == pytest.approx(metrics["logps/chosen"][-1], rel=1e-4)
    assert means["logps_rejected"] == pytest.approx(metrics["logps/rejected"][-1], rel=1e-4)


def orpo_trainer(tmp_path, model, lam: float):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=str(tmp_path), beta=lam, report_to=[], use_cpu=True, max_length=64)
    return ORPOTrainer(
        model=model, args=args, train_dataset=trl_dataset(), processing_class=make_tokenizer()
    )


def orpo_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """TRL ORPO's batch: chosen_/rejected_ input_ids, attention_mask, labels (prompt -100)."""
    from trl.trainer.utils import pad

    batch = {}
    for side in ("chosen", "rejected"):
        ids = [torch.tensor(r["prompt_ids"] + r[f"{side}_ids"]) for r in rows]
        labels = [torch.tensor([-100] * len(r["prompt_ids"]) + r[f"{side}_ids"]) for r in rows]
        batch[f"{side}_input_ids"] = pad(ids, padding_value=PAD)
        batch[f"{side}_attention_mask"] = pad([torch.ones_like(i) for i in ids], padding_value=0)
        batch[f"{side}_labels"] = pad(labels, padding_value=-100)
    return batch


def test_orpo_loss_and_gradients_equal_trls(tmp_path):
    """TRL's ORPO trains its NLL term on the prompt's tokens as well as the answer's; with a
    one-token prompt (which no NLL can score) both cover the same tokens and the whole loss
    must agree."""
    model = policy_model()
    lam = 0.25
    trainer = orpo_trainer(tmp_path, model, lam)
    rows = random_pairs(4)
    for r in rows:
        r["prompt_ids"] = r["prompt_ids"][:1]
    trl_loss, _ = trainer.get_batch_loss_metrics(trainer.model, orpo_batch(rows))
    trl_loss.backward()
    theirs = grads(model)

    objective = PreferenceObjective("orpo", orpo_lambda=lam)
    loss, _ = preference_backward(model, [slimtune_pairs(rows)], objective, single_process(), PAD)
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), theirs)


def test_orpo_odds_ratio_term_equals_trls_with_long_prompts(tmp_path):
    """With real prompts: the odds-ratio term equals TRL's (TRL's log-probs, its loss
    function), and the NLL term is the cross-entropy of the chosen answers' tokens."""
    model = policy_model().eval()
    lam = 0.25
    trainer = orpo_trainer(tmp_path, model, lam)
    rows = random_pairs(4, seed=3)
    batch = orpo_batch(rows)
    with torch.no_grad():
        chosen, rejected, chosen_logits, _, _ = trainer.concatenated_forward(model, batch)
        losses, *_ = trainer.odds_ratio_loss(chosen, rejected)
        trl_odds = -losses.mean() / lam
        labels = batch["chosen_labels"][:, 1:]  # the logits are padded to the longer side
        labels = torch.nn.functional.pad(
            labels, (0, chosen_logits.shape[1] - labels.shape[1]), value=-100
        )
        nll = torch.nn.functional.cross_entropy(
            chosen_logits.reshape(-1, chosen_logits.shape[-1]), labels.reshape(-1)
        )
        ours = pair_logps(model, slimtune_pairs(rows), PAD)
        objective = PreferenceObjective("orpo", orpo_lambda=lam)
        tokens = int(ours["chosen_tokens"].sum())
        total = objective.step_loss(ours, len(rows), tokens)
    from slimtune.train.preference import orpo_odds_ratio_loss

    odds = orpo_odds_ratio_loss(
        ours["chosen"], ours["rejected"], ours["chosen_tokens"], ours["rejected_tokens"]
    ).mean()
    torch.testing.assert_close(odds, trl_odds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, nll + lam * trl_odds, rtol=1e-5, atol=1e-6)


def test_reference_is_cached_once_and_equals_the_adapter_off(tmp_path):
    model = policy_model()
    pairs = slimtune_pairs(random_pairs(3))
    assert cache_reference(model, pairs, PAD) == 3
    assert cache_reference(model, pairs, PAD) == 0  # cached: nothing recomputed
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        base = pair_logps(model, pairs, PAD)
    torch.testing.assert_close(
        torch.tensor([p["ref_chosen_logps"] for p in pairs]), base["chosen"], rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():
        policy = pair_logps(model, pairs, PAD)
    assert not torch.allclose(policy["chosen"], base["chosen"])  # the adapter matters
