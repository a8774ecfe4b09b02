"""Training's causal attention in C (slimtune.models.attention) against torch's SDPA in float64:
outputs and all three gradients, grouped-query heads, lengths off every block size, strided
inputs; and inside a transformers model, where it must equal SDPA or hand the call to it."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import ARCHITECTURES, make_tiny, make_tiny_llama

from slimtune.lora import LoraConfig, inject_adapter
from slimtune.models import attention
from slimtune.models.attention import CausalAttention, use_native_attention
from slimtune.train.forward import summed_loss, unmasked_loss

pytestmark = pytest.mark.skipif(attention.library() is None, reason="needs a C compiler")

# Worst relative error over outputs and gradients: float32 runs within float32 rounding of the
# float64 reference, bfloat16 within its inputs' rounding (SDPA's own bf16 errors are as large).
TOLERANCE = {torch.float32: 3e-6, torch.bfloat16: 2e-2}


def reference(q, k, v, grad):
    """SDPA in float64: (out as (batch, length, heads, width), dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = out.transpose(1, 2)
    out.backward(grad.double())
    return out.detach(), q.grad, k.grad, v.grad


def native(q, k, v, grad, scale):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = CausalAttention.apply(q, k, v, scale)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def worst(got, want) -> float:
    pairs = zip(got, want, strict=True)
    return max(float((g.double() - w).abs().max() / w.abs().max()) for g, w in pairs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, width",
    [(2, 4, 2, 37, 64), (1, 3, 1, 5, 128), (2, 2, 2, 70, 64), (1, 6, 3, 1 + 64 * 2, 64)],
)
def test_attention_equals_sdpa(dtype, batch, heads, kv_heads, length, width):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, length, width).to(dtype)
    k = torch.randn(batch, kv_heads, length, width).to(dtype)
    v = torch.randn(batch, kv_heads, length, width).to(dtype)
    grad = torch.randn(batch, length, heads, width).to(dtype)
    got = native(q, k, v, grad, width**-0.5)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert worst(got, reference(q, k, v, grad)) < TOLERANCE[dtype]


def test_strided_inputs_and_a_scale():
    """The layouts a transformers model hands over: q, k, v transposed from (batch, length,
    heads, width); a scale of its own (not 1/sqrt(width))."""
    torch.manual_seed(1)
    q = torch.randn(2, 19, 4, 64).transpose(1, 2)
    k = torch.randn(2, 19, 2, 64).transpose(1, 2)
    v = torch.randn(2, 19, 2, 64).transpose(1, 2)
    grad = torch.randn(2, 19, 4, 64)
    got = native(q, k, v, grad, 0.3)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True, scale=0.3)
    out.transpose(1, 2).backward(grad.double())
    want = (out.detach().transpose(1, 2), q64.grad, k64.grad, v64.grad)
    assert worst(got, want) < TOLERANCE[torch.float32]


def test_large_scores_do_not_overflow():
    """Scores of hundreds: the softmax must subtract each row's maximum before exp."""
    torch.manual_seed(2)
    q = torch.randn(1, 2, 33, 64) * 30
    k = torch.randn(1, 2, 33, 64) * 30
    v = torch.randn(1, 2, 33, 64)
    grad = torch.randn(1, 33, 2, 64)
    got = native(q, k, v, grad, 64**-0.5)
    assert all(bool(t.isfinite().all()) for t in got)
    assert worst(got, reference(q, k, v, grad)) < 1e-3  # scores ~1e3: float32 exponents


@contextlib.contextmanager
def counted_calls():
    """A list that gets one entry per call of the kernel's forward inside the block."""
    calls: list[int] = []
    forward = CausalAttention.forward

    def counted(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    CausalAttention.forward = staticmethod(counted)
    try:
        yield calls
    finally:
        CausalAttention.forward = staticmethod(forward)


def attention_model():
    """A tiny LLaMA with heads 64 wide (the C kernel's case) and grouped-query attention."""
    model = make_tiny_llama(num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    return inject_adapter(model, LoraConfig(r=4, alpha=8)).train()


def batch_of(lengths: list[int], width: int = 12) -> dict[str, torch.Tensor]:
    """Right-padded rows (pads unlabelled), as slimtune's collator makes them."""
    torch.manual_seed(3)
    ids = torch.randint(3, 100, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = summed_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("lengths", [[12, 12], [12, 7, 3]])
def test_training_loss_and_gradients_equal_sdpa(lengths):
    """The model's loss and adapter gradients through the C kernel equal SDPA's with the
    padding mask, and the kernel runs (counted)."""
    model = attention_model()
    batch = batch_of(lengths)
    want_loss, want = loss_and_grads(model, batch)
    assert use_native_attention(model)
    with counted_calls() as calls:
        loss, grads = loss_and_grads(model, batch)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6)


def test_other_calls_go_to_sdpa():
    """A mask the loss needs (left padding) goes to SDPA; generation (a prompt in C, then
    one token at a time over a cache in SDPA) keeps its tokens."""
    model = attention_model().eval()
    batch = batch_of([12, 8])
    left = {key: value.flip(1) for key, value in batch.items()}
    assert not unmasked_loss(left["attention_mask"], left["labels"])
    prompt = batch["input_ids"][:1, :5]
    with torch.no_grad():
        want_loss = summed_loss(model, left)
        want_tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert use_native_attention(model)
    with counted_calls() as calls, torch.no_grad():
        loss = summed_loss(model, left)
    assert not calls
    torch.testing.assert_close(loss, want_loss)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), want_tokens)


def test_unmasked_loss_only_for_untrained_right_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[5, 6, 7, -100], [5, 6, 7, 8]])
    assert unmasked_loss(mask, labels)
    assert unmasked_loss(torch.ones(2, 4, dtype=torch.long), labels)
    assert not unmasked_loss(mask, torch.tensor([[5, 6, 7, 9], [5, 6, 7, 8]]))  # pad trained
    assert not unmasked_loss(mask.flip(1), labels.flip(1))  # left padding
    assert not unmasked_loss(torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), labels)  # a hole


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_keeps_its_logits(arch):
    """Each tiny architecture with 64-wide heads: the kernel takes its full-attention layers
    (Gemma 3's sliding-window layers stay with SDPA) and the logits stay SDPA's."""
    model = make_tiny(arch, head_dim=64)
    ids = torch.randint(3, 50, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
        assert use_native_attention(model)
        with counted_calls() as calls:
            got = model(ids).logits
    assert len(calls) >= 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
