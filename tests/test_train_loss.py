"""causal_lm_loss: the chunked loss equals cross-entropy over full logits, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.train import causal_lm_loss


def _reference(hidden, head, labels):
    logits = head(hidden)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_matches_full_logits_cross_entropy(bias, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100  # a masked prompt
    labels[2, 6:] = -100  # padding

    ours = causal_lm_loss(hidden, head, labels, chunk_size=chunk)
    ours.backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()

    ref = _reference(hidden, head, labels)
    ref.backward()
    ref_grads = [hidden.grad] + [p.grad for p in head.parameters()]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_sum_reduction_and_frozen_head():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 20, (2, 5))
    labels[1, 1:] = -100
    n = int((labels[:, 1:] != -100).sum())
    total = causal_lm_loss(hidden, head, labels, reduction="sum", chunk_size=2)
    torch.testing.assert_close(total / n, _reference(hidden, head, labels))
    total.backward()
    assert head.weight.grad is None and hidden.grad is not None
    # Positions whose next token is not trained get no gradient at all.
    assert torch.all(hidden.grad[1, 1:] == 0) and torch.all(hidden.grad[:, -1] == 0)


def test_matches_transformers_loss(tiny_llama):
    """Through a real model: the same number as the model's own `labels=` loss."""
    from slimtune.train.forward import decoder_and_head

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    body, head = decoder_and_head(tiny_llama)
    hidden = body(input_ids=ids).last_hidden_state
    ours = causal_lm_loss(hidden, head, labels)
    theirs = tiny_llama(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
