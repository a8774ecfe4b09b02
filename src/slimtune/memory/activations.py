"""What autograd keeps between the forward and the backward pass of a LLaMA-family model.

Counted per block for the `T = rows x padded length` tokens of a micro-batch (batch.py), in
float32 (the residual stream, attention and the adapters compute in float32 whatever the frozen
base multiplies in):

- always: the block input (the RMSNorm keeps it), the post-attention residual, the query, key,
  value and output of attention (scaled_dot_product_attention keeps them), and in the MLP the
  gate and up outputs (`lean_mlp`: slimtune.models.lean_mlp rebuilds silu(gate) * up when
  backward needs it; without it act(gate) and the product too);
- per group of adapted layers that share an input (q/k/v; o; gate/up): that input, kept for the
  LoRA A gradient (down's input is the rebuilt product); per adapted layer with dropout p: the
  dropped positions, int64, p x 8 bytes per input value (`sparse_dropout`:
  slimtune.lora.sparse_dropout keeps no mask or dropped copy; without it a float32 dropped copy
  and a bool mask); per adapted layer: the rank-r output of A, kept for the B gradient.

Frozen base weights keep nothing (no weight gradient). With gradient checkpointing only each
block's input is kept, and one block's activations exist again while it is recomputed.

On top of what is kept come the loss's chunk x vocab buffers (slimtune.train.loss, chunks of
up to 512 trained positions) and the backward pass's working gradients (plus, for QLoRA, one
decoded weight). On the CPU the loss keeps its buffers on the output layer between steps, so
both count at the peak; on a GPU they are made per chunk, and the larger of the two counts.
The two constants below were fitted to peak RSS measured on CPU by benchmarks/bench_memory.py
(docs/memory.md has the table); on a GPU (`device="cuda"`) the count is the plain analytic one,
not calibrated against measurement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimtune.memory.architecture import Architecture
from slimtune.memory.batch import BatchShape

if TYPE_CHECKING:  # the planner reads a config's fields; it needs nothing else of train/
    from slimtune.train.config import TrainConfig

ITEM = 4  # bytes of a kept float32 value

LOSS_CHUNK = 512  # slimtune.train.loss.causal_lm_loss's chunk_size
BACKWARD_BUFFERS = 3  # T x intermediate gradient buffers alive at once in a block's backward
# Fitted: RSS grows faster than the kept tensors during the forward pass, because the freed
# temporaries between them leave holes in the C heap that later, differently sized tensors do
# not fill. Fitted with the lean-heap malloc settings `slimtune train` runs under
# (slimtune.runtime.heap).
HEAP_OVERHEAD = 1.3
# Fitted: with checkpointing, the block being recomputed holds its activations and, while its
# backward runs, gradients of about the same size.
RECOMPUTE_BLOCKS = 2

GROUPS = {  # adapted layers that read the same input tensor
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
    "qkv_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
    "down_proj": "mlp_out", "shared_expert_gate": "mlp_in",
    "experts.gate_up_proj": "expert_in", "experts.down_proj": "expert_out",
}  # fmt: skip


def block_bytes(arch: Architecture, config: TrainConfig, adapted: list[tuple], tokens: int) -> int:
    """Bytes one block keeps for its backward pass; `adapted`: (name, in, out, rank per block)
    of the adapted layers (slimtune.memory.architecture.adapter_ranks)."""
    h, i = arch.hidden_size, arch.mlp_width()
    q = arch.num_heads * arch.head_size
    kv = arch.num_kv_heads * arch.head_size
    # gate and up outputs; without the lean MLP (`lean_mlp: false`, Phi-3's fused gate_up) also
    # act(gate), and the product where down is adapted (mlp_out below); the experts' loop keeps
    # the product too, and each token's gathered input per expert.
    lean = arch.gated_lean and not arch.num_experts and config.lean_mlp
    mlp = 2 * i if lean else 4 * i if arch.num_experts else 3 * i
    routed = arch.experts_per_token * h
    kept = (2 * h + 2 * q + 2 * kv + mlp + routed) * ITEM
    if config.method != "full":
        widths = {"attn_in": h, "attn_out": q, "mlp_in": h, "mlp_out": 0}  # mlp_out: rebuilt
        if not lean:
            widths["mlp_out"] = i  # the product itself is kept
        groups = {GROUPS.get(name, name) for name, _, _, _ in adapted}
        kept += sum(widths.get(g, 0) for g in groups) * ITEM
        # An expert's layers see only its tokens: per token, experts_per_token of them.
        share = arch.experts_per_token / arch.num_experts if arch.num_experts else 1.0
        weights = [share if name.startswith("experts.") else 1.0 for name, _, _, _ in adapted]
        mean_ranks = [sum(ranks) / len(ranks) for _, _, _, ranks in adapted]
        kept += int(sum(r * ITEM * w for r, w in zip(mean_ranks, weights, strict=True)))
        if config.dropout > 0:  # experts take no dropout (slimtune.lora.experts)
            dense = [n for name, n, _, _ in adapted if not name.startswith("experts.")]
            if config.sparse_dropout:  # the dropped positions, int64
                kept += int(sum(n * config.dropout * 8 for n in dense))
            else:  # nn.Dropout: a dropped copy and a bool mask per adapter
                kept += sum(dense) * (ITEM + 1)
    else:
        # Full fine-tuning: every linear keeps its input for the weight gradient (down's is
        # rebuilt from gate and up).
        kept += q * ITEM + (h + h) * ITEM  # o's input; the two norm outputs
    return tokens * kept


def activation_bytes(
    arch: Architecture,
    config: TrainConfig,
    adapted: list[tuple],
    device: str,
    compute_bytes: int,
    shape: BatchShape,
) -> int:
    """Activation memory at the peak of a training step on `device` for a micro-batch of
    `shape`; `compute_bytes`: bytes of the compute dtype, which a 4-bit layer decodes its
    weight into."""
    tokens = shape.tokens
    one_block = block_bytes(arch, config, adapted, tokens)
    if config.gradient_checkpointing:
        kept = arch.num_layers * tokens * arch.hidden_size * ITEM + RECOMPUTE_BLOCKS * one_block
    else:
        kept = arch.num_layers * one_block
    # Around the body: embedding output, final norm output, and the loss's saved grad_h.
    kept += 3 * tokens * arch.hidden_size * ITEM
    if device == "cpu":
        kept = int(HEAP_OVERHEAD * kept)
    loss = loss_buffer_bytes(arch, shape, compute_bytes)
    backward = BACKWARD_BUFFERS * tokens * arch.mlp_width() * ITEM
    if config.method == "qlora":
        # Linear4bit decodes its weight per call, straight into the compute dtype.
        largest = max(n_in * n_out for _, n_in, n_out in arch.block_linears())
        backward += largest * compute_bytes
    if device == "cpu":  # the loss's buffers stay on the output layer through backward
        return kept + loss + backward
    return kept + max(loss, backward)


def loss_buffer_bytes(arch: Architecture, shape: BatchShape, compute_bytes: int) -> int:
    """The (chunk x vocabulary) buffers of slimtune.train.loss: float32 logits, turned into the
    softmax in place, and for an output layer that multiplies in a narrower compute dtype one
    more in that dtype (its product before widening, the softmax narrowed for the gradient).

    One row per trained position of the micro-batch, up to a chunk: the loss computes only
    those, so with prompts masked (chat or completion rows) and a large vocabulary it needs
    far less than rows filling max_length would."""
    rows = min(LOSS_CHUNK, shape.trained)
    narrow = compute_bytes if compute_bytes < ITEM else 0  # the head's copy is in compute dtype
    return rows * arch.vocab_size * (ITEM + narrow)
