"""One forward pass to the summed token loss, through the decoder and chunked lm_head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.devices import device_of, to_device
from slimtune.tokens import IGNORE_INDEX
from slimtune.train.loss import causal_lm_loss


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns hidden states) and the output layer of an HF causal LM."""
    if hasattr(model, "get_base_model"):  # a PEFT wrapper
        model = model.get_base_model()
    return model.base_model, model.get_output_embeddings()


def summed_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sum of the token losses of `batch` (IGNORE_INDEX labels are skipped; no full logits are made)."""
    body, head = decoder_and_head(model)
    if "position_ids" in batch:
        # Packed rows: position_ids restarting at 0 and no mask make transformers keep attention
        # within each example (slimtune.data.collate explains the conditions).
        inputs = dict(position_ids=batch["position_ids"], attention_mask=None)
    else:
        mask = batch["attention_mask"]
        # Without a mask attention takes the causal fast path (and slimtune's C attention).
        inputs = dict(attention_mask=None if unmasked_loss(mask, batch["labels"]) else mask)
    hidden = body(input_ids=batch["input_ids"], use_cache=False, **inputs)
    return causal_lm_loss(hidden.last_hidden_state, head, batch["labels"], reduction="sum")


def unmasked_loss(mask: Tensor, labels: Tensor) -> bool:
    """Whether a loss over the labelled tokens is the same without the attention mask: every
    row's padding comes after its tokens (right padding) and is unlabelled. Causal attention
    then keeps each token from the pads after it, and the pads' own outputs reach no trained
    position."""
    if bool(mask.all()):
        return True
    ordered = bool((mask[:, 1:] <= mask[:, :-1]).all())  # ones, then zeros
    return ordered and bool((labels[mask == 0] == IGNORE_INDEX).all())


def count_trained_tokens(batch: dict[str, Tensor]) -> int:
    """Tokens whose prediction is trained: next-token labels that are not IGNORE_INDEX."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def loss_on(model: nn.Module, batches: list[dict[str, Tensor]]) -> tuple[float, int]:
    """(summed loss, token count) over `batches`, without gradients."""
    total, count = 0.0, 0
    device = device_of(model)
    for batch in batches:
        total += float(summed_loss(model, to_device(batch, device)))
        count += count_trained_tokens(batch)
    return total, count
