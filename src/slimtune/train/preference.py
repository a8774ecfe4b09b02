"""Preference tuning: DPO (sigmoid or IPO loss) and ORPO, from per-row answer log-probabilities.

With pi the trained model, ref the same base with the adapter switched off, and log-probs
summed over the answer's tokens (y_w chosen, y_l rejected):

    DPO sigmoid  -log sigmoid(beta * ((pi(y_w) - ref(y_w)) - (pi(y_l) - ref(y_l))))
    DPO ipo      ((pi(y_w) - ref(y_w)) / |y_w| - (pi(y_l) - ref(y_l)) / |y_l| - 1 / (2 beta))^2
    ORPO         NLL(y_w) + lambda * -log sigmoid(log_odds(y_w) - log_odds(y_l)),
                 log_odds(y) = l - log(1 - exp(l)), l = pi(y) / |y| (mean log-prob per token)

IPO divides each log-ratio by the answer's token count, as TRL does (and as the IPO authors'
results were computed). DPO losses are averaged over pairs; ORPO's NLL is averaged over the
chosen answers' tokens and its odds-ratio term over pairs. In a training step these means are
over the whole step, all processes together (sums divided by global counts), so micro-batches
and processes change nothing.

The reference log-probs of a pair are computed once, the first time the pair is used, with
the adapter off and in eval mode, and kept in the pair (chosen and rejected together in a
batch of two: the values do not depend on which other rows share a step, so a resumed run
uses exactly the numbers an unbroken one did). No second model is ever made.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.data.collate import Collator
from slimtune.data.formats import SIDES
from slimtune.data.preference import pair_side
from slimtune.devices import device_of, to_device
from slimtune.dist import all_reduce_sum
from slimtune.errors import SlimtuneError
from slimtune.lora import disable_adapters, lora_layers
from slimtune.tokens import IGNORE_INDEX
from slimtune.train.logps import sequence_logps

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


# ------------------------------------------------------------------------------- losses


def dpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> Tensor:
    """Per-pair DPO loss from summed answer log-probs (IPO also needs the token counts)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the answers' token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(
            min=1
        )
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}; expected sigmoid or ipo")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler's two branches)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio_loss(
    chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor
) -> Tensor:
    """Per-pair -log sigmoid(log odds(chosen) - log odds(rejected)), on mean token log-probs."""
    mean_chosen = chosen.float() / chosen_tokens.clamp(min=1)
    mean_rejected = rejected.float() / rejected_tokens.clamp(min=1)
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    return -F.logsigmoid(log_odds)


# ------------------------------------------------------------------------------- objective


@dataclass(frozen=True)
class PreferenceObjective:
    """Which preference loss a run trains with, and its settings (TrainConfig's keys)."""

    kind: Literal["dpo", "orpo"] = "dpo"
    beta: float = 0.1
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    orpo_lambda: float = 0.1

    @classmethod
    def from_config(cls, config) -> PreferenceObjective | None:
        """The objective of a TrainConfig, or None for supervised fine-tuning."""
        kind = getattr(config, "objective", "sft")
        if kind == "sft":
            return None
        return cls(kind, config.beta, config.dpo_loss, config.orpo_lambda)

    @property
    def needs_reference(self) -> bool:
        return self.kind == "dpo"

    def step_loss(self, logps: dict[str, Tensor], pairs: int, chosen_tokens: int) -> Tensor:
        """This micro-batch's share of the step loss: sums over its pairs (and chosen tokens),
        divided by the step's global pair (and chosen token) counts."""
        if self.kind == "dpo":
            losses = dpo_loss(
                logps["chosen"],
                logps["rejected"],
                logps["ref_chosen"],
                logps["ref_rejected"],
                beta=self.beta,
                loss_type=self.dpo_loss,
                chosen_tokens=logps["chosen_tokens"],
                rejected_tokens=logps["rejected_tokens"],
            )
            return losses.sum() / max(pairs, 1)
        odds = orpo_odds_ratio_loss(
            logps["chosen"], logps["rejected"], logps["chosen_tokens"], logps["rejected_tokens"]
        )
        nll = -logps["chosen"].sum() / max(chosen_tokens, 1)
        return nll + self.orpo_lambda * odds.sum() / max(pairs, 1)

    def rewards(self, logps: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Implicit rewards (chosen, rejected): beta x log-ratio to the reference for DPO; for
        ORPO (no reference), beta x mean token log-prob, as TRL reports them."""
        if self.kind == "dpo":
            return (
                self.beta * (logps["chosen"] - logps["ref_chosen"]),
                self.beta * (logps["rejected"] - logps["ref_rejected"]),
            )
        return (
            self.beta * logps["chosen"] / logps["chosen_tokens"].clamp(min=1),
            self.beta * logps["rejected"] / logps["rejected_tokens"].clamp(min=1),
        )


# ------------------------------------------------------------------------------- batches


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """2B right-padded rows, the B chosen answers then the B rejected ones, one length: the
    model runs once over both, as TRL's concatenated forward does."""
    rows = [pair_side(p, side) for side in SIDES for p in pairs]
    return Collator(pad_token_id)(rows)


def collate_side(pairs: list[dict], side: str, pad_token_id: int) -> dict[str, Tensor]:
    """One side (chosen or rejected) of `pairs` as a right-padded batch of B rows."""
    return Collator(pad_token_id)([pair_side(p, side) for p in pairs])


def pair_logps(model: nn.Module, pairs: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """Policy log-probs of both answers of `pairs` (with grad when enabled), token counts and
    cached reference log-probs where the pairs carry them."""
    batch = to_device(collate_pairs(pairs, pad_token_id), device_of(model))
    logps, counts = sequence_logps(model, batch)
    n = len(pairs)
    out = {
        "chosen": logps[:n],
        "rejected": logps[n:],
        "chosen_tokens": counts[:n],
        "rejected_tokens": counts[n:],
    }
    _add_reference(out, pairs)
    return out


def _add_reference(logps: dict[str, Tensor], pairs: list[dict]) -> None:
    """ref_chosen / ref_rejected from the pairs' cache, where every pair carries them."""
    if not all(REF_KEYS[0] in p for p in pairs):
        return
    like = logps["chosen"]
    for key, side in zip(REF_KEYS, SIDES, strict=True):
        values = [p[key] for p in pairs]
        logps[f"ref_{side}"] = torch.tensor(values, dtype=like.dtype, device=like.device)


@contextmanager
def adapter_off(model: nn.Module):
    """The model as its base alone: slimtune's LoRA layers, or a PEFT model, switched off."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield
        return
    if not any(True for _ in lora_layers(model)):
        raise SlimtuneError(
            "DPO's reference is the base with the adapter switched off, and this model has no "
            "adapter: train with method lora or qlora (or use objective orpo, which needs none)"
        )
    with disable_adapters(model):
        yield


@torch.no_grad()
def cache_reference(model: nn.Module, pairs: list[dict], pad_token_id: int) -> int:
    """Store the reference log-probs in every pair of `pairs` that lacks them; how many."""
    todo = [p for p in pairs if REF_KEYS[0] not in p]
    if not todo:
        return 0
    was_training = model.training
    model.eval()
    try:
        with adapter_off(model):
            for pair in todo:  # one pair per batch: values independent of the other rows
                logps = pair_logps(model, [pair], pad_token_id)
                pair[REF_KEYS[0]] = float(logps["chosen"][0])
                pair[REF_KEYS[1]] = float(logps["rejected"][0])
    finally:
        model.train(was_training)
    return len(todo)


# ------------------------------------------------------------------------------- metrics


@dataclass
class PairStats:
    """Sums over pairs, to be added across micro-batches and processes, then averaged."""

    pairs: float = 0.0
    correct: float = 0.0
    margin: float = 0.0
    chosen_logps: float = 0.0
    rejected_logps: float = 0.0

    def add(self, objective: PreferenceObjective, logps: dict[str, Tensor]) -> None:
        chosen_reward, rejected_reward = objective.rewards(
            {k: v.detach() for k, v in logps.items()}
        )
        self.pairs += chosen_reward.numel()
        self.correct += float((chosen_reward > rejected_reward).sum())
        self.margin += float((chosen_reward - rejected_reward).sum())
        self.chosen_logps += float(logps["chosen"].detach().sum())
        self.rejected_logps += float(logps["rejected"].detach().sum())

    def as_tensor(self) -> Tensor:
        return torch.tensor(
            [self.pairs, self.correct, self.margin, self.chosen_logps, self.rejected_logps],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, values: Tensor) -> PairStats:
        return cls(*(float(v) for v in values))

    def means(self, prefix: str = "") -> dict[str, float]:
        n = max(self.pairs, 1.0)
        return {
            f"{prefix}reward_accuracy": self.correct / n,
            f"{prefix}reward_margin": self.margin / n,
            f"{prefix}logps_chosen": self.chosen_logps / n,
            f"{prefix}logps_rejected": self.rejected_logps / n,
        }


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    pairs: list[dict],
    objective: PreferenceObjective,
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """eval_loss, eval_reward_accuracy (the share of pairs whose chosen answer gets the higher
    reward: preference accuracy), eval_reward_margin, eval_logps_chosen/rejected."""
    if objective.needs_reference:
        cache_reference(model, pairs, pad_token_id)
    was_training = model.training
    model.eval()
    stats, loss = PairStats(), 0.0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            logps = pair_logps(model, chunk, pad_token_id)
            chosen_tokens = int(logps["chosen_tokens"].sum())
            # step_loss with this chunk's own counts is the chunk's mean; weight it by pairs.
            loss += float(objective.step_loss(logps, len(chunk), chosen_tokens)) * len(chunk)
            stats.add(objective, logps)
    finally:
        model.train(was_training)
    return {"eval_loss": loss / max(len(pairs), 1), **stats.means("eval_")}


# ------------------------------------------------------------------------------- a step


def preference_backward(
    model: nn.Module,
    shards: list[list[dict]],
    objective: PreferenceObjective,
    info,
    pad_token_id: int,
    *,
    one_side_at_a_time: bool = True,
) -> tuple[Tensor, PairStats]:
    """Forward and backward over this rank's micro-batches of pairs for one optimizer step.

    Returns (this rank's part of the step loss, the step's PairStats summed over all ranks).
    Normalisers are global, as for supervised steps (see slimtune.dist.reduce): the pairs of
    the whole step, and for ORPO its chosen answer tokens.

    one_side_at_a_time: keep the activations of one side only (B rows, as a supervised step of
    the same batch), for one more forward pass without gradients (see _backward_by_side);
    False runs both sides as one batch of 2B rows, as TRL does.
    """
    if objective.needs_reference:
        cache_reference(model, [p for shard in shards for p in shard], pad_token_id)
    pairs = all_reduce_sum(sum(len(s) for s in shards), info)
    chosen_tokens = 0
    if objective.kind == "orpo":
        local = sum(_answer_tokens(p, "chosen") for shard in shards for p in shard)
        chosen_tokens = all_reduce_sum(local, info)
    loss_sum = torch.zeros((), device=info.device)
    stats = PairStats()
    for shard in shards:
        if not shard:  # a rank may get no rows of a short last batch
            continue
        if one_side_at_a_time:
            loss, logps = _backward_by_side(
                model, shard, objective, pairs, chosen_tokens, pad_token_id
            )
        else:
            logps = pair_logps(model, shard, pad_token_id)
            loss = objective.step_loss(logps, pairs, chosen_tokens)
            loss.backward()
        loss_sum += loss.detach()
        stats.add(objective, logps)
    summed = all_reduce_sum(stats.as_tensor().to(info.device), info)
    return loss_sum, PairStats.from_tensor(summed.cpu())


def _backward_by_side(model, shard, objective, pairs, chosen_tokens, pad_token_id):
    """The gradient of the pair loss with the activations of one side alive at a time.

    The loss depends on the rejected answers only through their summed log-probs r. So: the
    chosen side runs forward with gradients; the rejected side runs forward without (just r);
    the loss backpropagates through the chosen side and leaves dL/dr; then the rejected side
    runs forward again, with gradients and with the dropout draws of its first pass (the RNG
    state is restored), and backpropagates dL/dr. Exactly the gradient of the joint pass.
    """
    device = device_of(model)
    chosen = to_device(collate_side(shard, "chosen", pad_token_id), device)
    rejected = to_device(collate_side(shard, "rejected", pad_token_id), device)
    chosen_logps, chosen_counts = sequence_logps(model, chosen)
    rng = _rng_state(device)
    with torch.no_grad():
        rejected_logps, rejected_counts = sequence_logps(model, rejected)
    rejected_logps.requires_grad_(True)
    logps = {
        "chosen": chosen_logps,
        "rejected": rejected_logps,
        "chosen_tokens": chosen_counts,
        "rejected_tokens": rejected_counts,
    }
    _add_reference(logps, shard)
    loss = objective.step_loss(logps, pairs, chosen_tokens)
    loss.backward()
    _set_rng_state(device, rng)
    again, _ = sequence_logps(model, rejected)
    again.backward(rejected_logps.grad)
    return loss, {k: v.detach() for k, v in logps.items()}


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _answer_tokens(pair: dict, side: str) -> int:
    """Labelled next-token positions of one side (as sequence_logps counts them)."""
    return sum(label != IGNORE_INDEX for label in pair[f"{side}_labels"][1:])
