"""The memory planner: exact parts checked against real models and optimizers, the activation
model against measured peak RSS (a tiny case here; the full table is benchmarks/bench_memory.py),
and the papers' headline figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama

from slimtune.cli import main as cli_main
from slimtune.errors import SlimtuneError
from slimtune.memory import (
    architecture_from_config,
    builtin_architecture,
    estimate,
    parse_bytes,
    resolve_architecture,
)
from slimtune.runtime import lean_heap_environment
from slimtune.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GB = 10**9


def _meta_param_count(arch_name: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    a = builtin_architecture(arch_name)
    config = LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads, tie_word_embeddings=a.tie_embeddings,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-2-7b", "llama-65b", "mistral-7b"])
def test_builtin_parameter_counts_match_transformers(name):
    assert builtin_architecture(name).num_params() == _meta_param_count(name)


def test_published_sizes():
    assert round(builtin_architecture("llama-65b").num_params() / 1e9, 1) == 65.3
    assert round(builtin_architecture("qwen2.5-0.5b").num_params() / 1e6) == 494  # Qwen's card
    assert builtin_architecture("smollm2-135m").num_params() == 134_515_008


def _write_gguf(path: Path, tied: bool) -> None:
    """A GGUF file with the metadata of a tiny LLaMA (the real SmolLM2 one takes ~10 s to parse)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(128)])
    writer.add_tensor("token_embd.weight", np.zeros((128, 64), dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((128, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_config_and_folder_sources_agree(tmp_path, tied):
    model = make_tiny_llama(tie_word_embeddings=tied)
    expected = sum(p.numel() for p in model.parameters())
    _write_gguf(tmp_path / "tiny.gguf", tied)
    assert resolve_architecture(str(tmp_path / "tiny.gguf")).num_params() == expected
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(model.config.to_dict()))
    assert resolve_architecture(str(tmp_path / "hf")).num_params() == expected
    assert resolve_architecture(str(tmp_path / "hf" / "config.json")).num_params() == expected


def test_unknown_model_is_a_user_error():
    with pytest.raises(SlimtuneError, match="llama-2-7b"):
        resolve_architecture("llama-2-8b")
    with pytest.raises(SlimtuneError, match="missing"):
        architecture_from_config({"model_type": "gpt2", "n_embd": 64})


def test_lora_and_optimizer_parts_match_real_objects(tiny_llama):
    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.optim import build_optimizer, state_bytes

    arch = architecture_from_config(tiny_llama.config.to_dict())
    # rank 32 makes the MLP adapters 4096 elements: both 8-bit and 32-bit tensors occur.
    settings = TrainConfig(method="lora", rank=32, optimizer="adamw8bit")
    plan = estimate(arch, settings)
    inject_adapter(tiny_llama, LoraConfig(r=32, alpha=16, target_modules="all-linear"))
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    assert plan.trainable_params == sum(p.numel() for p in params)
    assert plan.parts["lora_weights"] == 4 * plan.trainable_params
    optimizer = build_optimizer("adamw8bit", params, lr=1e-3, weight_decay=0.0)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert plan.parts["optimizer_state"] == state_bytes(optimizer)


def test_rank_patterns_and_dora_count_as_the_injected_adapter(tiny_llama):
    from slimtune.lora import LoraConfig, inject_adapter

    arch = architecture_from_config(tiny_llama.config.to_dict())
    patterns = {"rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.up_proj": 12}}
    config = TrainConfig(method="lora", rank=8, use_dora=True, **patterns)
    plan = estimate(arch, config)
    inject_adapter(tiny_llama, LoraConfig(r=8, use_dora=True, **patterns))
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    assert plan.trainable_params == sum(p.numel() for p in params)
    assert plan.parts["lora_weights"] == 4 * plan.trainable_params
    assert plan.parts["optimizer_state"] == 8 * plan.trainable_params


def test_pissa_counts_the_starting_adapter_it_keeps(tiny_llama):
    from slimtune.lora import LoraConfig, inject_adapter, lora_layers

    arch = architecture_from_config(tiny_llama.config.to_dict())
    plan = estimate(arch, TrainConfig(method="lora", rank=8, init="pissa", use_dora=True))
    inject_adapter(tiny_llama, LoraConfig(r=8, init="pissa", use_dora=True))
    trained = sum(p.numel() * 4 for p in tiny_llama.parameters() if p.requires_grad)
    kept = sum(t.numel() * 4 for _, layer in lora_layers(tiny_llama)
               for t in layer.pissa_start["default"])  # fmt: skip
    assert plan.parts["lora_weights"] == trained + kept


def test_compute_dtype_stores_the_frozen_bases_under_lora_and_a_head_copy(tiny_llama):
    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.train.precision import cast_frozen

    arch = architecture_from_config(tiny_llama.config.to_dict())
    config = TrainConfig(method="lora", targets=["q_proj", "v_proj"], compute_dtype="bfloat16")
    plan = estimate(arch, config)
    assert plan.compute_dtype == "bfloat16"
    inject_adapter(tiny_llama, LoraConfig(r=64, target_modules=["q_proj", "v_proj"]))
    cast_frozen(tiny_llama, torch.bfloat16)
    frozen = sum(
        p.numel() * p.element_size() for p in tiny_llama.parameters() if not p.requires_grad
    )
    head = tiny_llama.get_output_embeddings().weight
    assert plan.parts["weights"] == frozen + head.numel() * 2  # the loss's bf16 copy of the head
    auto = estimate(arch, config.model_copy(update={"compute_dtype": "auto"}), "cpu", "bfloat16")
    assert auto.total == plan.total
    as_float = estimate(arch, config.model_copy(update={"compute_dtype": "float32"}))
    # A float32 stream either way; the loss adds a bfloat16 twin of its float32 logits buffer.
    narrow = 512 * arch.vocab_size * 2
    assert plan.parts["activations"] - as_float.parts["activations"] == narrow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_buffers_are_what_the_chunked_loss_keeps_on_a_gemma3_head(dtype):
    """On Gemma 3's layout (tied output layer, q/k norms, one KV head) the planned loss buffers
    are the bytes slimtune.train.loss still holds on the output layer after backward: float32
    logits and, for bfloat16 compute, a bfloat16 twin, one row per trained position of the
    batch up to a chunk; for rows filling max_length and for rows with their prompts masked."""
    from helpers import make_tiny

    from slimtune.memory.activations import loss_buffer_bytes
    from slimtune.memory.batch import RowSizes, full_rows
    from slimtune.tokens import IGNORE_INDEX
    from slimtune.train.head import release_loss_buffers
    from slimtune.train.loss import causal_lm_loss
    from slimtune.train.precision import cast_frozen

    model = make_tiny("gemma3").requires_grad_(False)
    cast_frozen(model, dtype)
    arch = architecture_from_config(model.config.to_dict())
    assert arch.tie_embeddings and arch.qk_norm and arch.num_kv_heads == 1
    head = model.get_output_embeddings()
    # 126 rows; 598 rows, one chunk of 512; 2 x 50 answer positions after 250-token prompts
    for batch, length, prompt in [(2, 64, 0), (2, 300, 0), (2, 300, 250)]:
        release_loss_buffers(head)
        hidden = torch.randn(batch, length, arch.hidden_size, requires_grad=True)
        labels = torch.randint(0, arch.vocab_size, (batch, length))
        labels[:, :prompt] = IGNORE_INDEX
        causal_lm_loss(hidden, head, labels).backward()
        held = sum(b.nbytes for b in head._slimtune_loss_buffers[1:] if b is not None)
        config = TrainConfig(method="qlora", batch_size=batch, max_length=length)
        rows = RowSizes.of([{"input_ids": row, "labels": row} for row in labels.tolist()], "x")
        assert held == loss_buffer_bytes(arch, rows.largest_batch(config), dtype.itemsize)
        if not prompt:
            assert held == loss_buffer_bytes(arch, full_rows(config), dtype.itemsize)


def test_rows_plan_the_largest_batch_they_can_make():
    """The longest row sets the padded length, the rows with the most trained positions the
    loss's rows; a max_length below the rows cuts both."""
    from slimtune.memory.batch import BatchShape, RowSizes, full_rows
    from slimtune.tokens import IGNORE_INDEX as NO

    rows = [
        {"input_ids": [1] * 10, "labels": [NO] * 6 + [5] * 4},  # 4 trained next tokens
        {"input_ids": [1] * 4, "labels": [NO, 5, 5, 5]},  # 3
        {"input_ids": [1] * 7, "labels": [5] * 7},  # 6 (the first token has no predecessor)
    ]
    sizes = RowSizes.of(rows, "data.jsonl")
    assert sizes.lengths == (10, 4, 7) and sizes.trained == (4, 3, 6)
    config = TrainConfig(batch_size=2, max_length=128)
    assert sizes.largest_batch(config) == BatchShape(2, 10, 10, "data.jsonl")
    assert sizes.largest_batch(config.model_copy(update={"max_length": 5})).length == 5
    assert sizes.largest_batch(config.model_copy(update={"max_length": 5})).trained == 8
    assert sizes.largest_batch(config.model_copy(update={"batch_size": 8})).rows == 3
    assert full_rows(config) == BatchShape(2, 128, 2 * 127)
    planned = estimate(builtin_architecture("gemma-3-270m"), config, rows=sizes)
    assert planned.shape == sizes.largest_batch(config)
    assert planned.total < estimate(builtin_architecture("gemma-3-270m"), config).total


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory map holds `tensor`'s data, or None (anonymous memory)."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_4bit_loader_maps_a_float32_checkpoints_embedding(tmp_path, dtype):
    """What the planner's `float32_checkpoint` rests on: loading a float32 folder into 4 bits
    leaves the untied input embedding a memory map of the safetensors file (only the rows read
    become resident); a bfloat16 folder's is converted, a copy in memory."""
    from helpers import make_char_tokenizer

    from slimtune.models import load_model
    from slimtune.quant import QuantConfig

    folder = tmp_path / "model"
    model = make_tiny_llama(tie_word_embeddings=False).to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    arch = resolve_architecture(str(folder))
    assert arch.float32_checkpoint == (dtype == "float32")
    loaded, _ = load_model(folder, quant=QuantConfig())
    where = _mapped_file(loaded.get_input_embeddings().weight)
    assert (where is not None and where.endswith("model.safetensors")) == (dtype == "float32")


def test_an_untied_mapped_embedding_counts_the_rows_the_data_reads():
    """QLoRA from a float32 checkpoint: the untied input embedding counts FAULT_AROUND per
    distinct token of the data instead of whole; tied, LoRA, no data or FSDP: whole."""
    from dataclasses import replace

    from slimtune.memory.batch import RowSizes
    from slimtune.memory.planner import FAULT_AROUND

    # Qwen2.5-Coder-0.5B's GGUF: untied, converted to float32
    arch = replace(builtin_architecture("qwen2.5-0.5b"), tie_embeddings=False)
    mapped = replace(arch, float32_checkpoint=True)
    rows = RowSizes((50,), (10,), "data", distinct_tokens=300)
    config = TrainConfig(method="qlora", batch_size=1, max_length=64)
    table = arch.vocab_size * arch.hidden_size * 4
    read = 300 * FAULT_AROUND
    planned = estimate(mapped, config, rows=rows).parts["weights"]
    assert planned == estimate(arch, config, rows=rows).parts["weights"] - table + read
    assert estimate(mapped, config).parts == estimate(arch, config).parts  # no data: all read

    def same(arch_a, arch_b, settings, **kwargs) -> bool:
        return (
            estimate(arch_a, settings, **kwargs).parts == estimate(arch_b, settings, **kwargs).parts
        )

    tied = replace(mapped, tie_embeddings=True)
    assert same(tied, replace(tied, float32_checkpoint=False), config, rows=rows)
    assert same(mapped, arch, config.model_copy(update={"method": "lora"}), rows=rows)
    fsdp = config.model_copy(update={"fsdp": True})
    assert same(mapped, arch, fsdp, rows=rows, processes=2)  # shards are copies


def test_gemma3_270m_loss_buffers_at_bfloat16():
    """Gemma 3 270M at batch 4 x 128: 508 trained rows of 262,144 logits, 4 bytes each and 2
    more under bfloat16 compute, held through backward on the CPU (762 MiB of the step)."""
    from slimtune.memory.activations import loss_buffer_bytes
    from slimtune.memory.batch import full_rows

    arch = builtin_architecture("gemma-3-270m")
    config = TrainConfig(method="lora", rank=16, batch_size=4, max_length=128,
                         compute_dtype="bfloat16")  # fmt: skip
    assert loss_buffer_bytes(arch, full_rows(config), 2) == 508 * 262_144 * 6
    as_float = config.model_copy(update={"compute_dtype": "float32"})
    assert loss_buffer_bytes(arch, full_rows(as_float), 4) == 508 * 262_144 * 4
    plan, float_plan = estimate(arch, config), estimate(arch, as_float)
    assert plan.parts["activations"] - float_plan.parts["activations"] == 508 * 262_144 * 2


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in one training forward: each storage once, the
    model's own parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids)
    return sum(kept.values())


@pytest.mark.parametrize("sparse_dropout", [True, False])
def test_activations_without_the_lean_mlp_follow_what_autograd_keeps(tiny_llama, sparse_dropout):
    """`lean_mlp: false` keeps act(gate) and the product; `sparse_dropout: false` a dropped copy
    and a mask per adapter. (The lean MLP itself steps aside under outer saved-tensor hooks, so
    it cannot be measured this way.)"""
    from slimtune.lora import LoraConfig, inject_adapter, set_sparse_dropout
    from slimtune.memory.activations import block_bytes
    from slimtune.memory.architecture import adapter_ranks

    arch = architecture_from_config(tiny_llama.config.to_dict())
    config = TrainConfig(method="lora", rank=8, dropout=0.1, batch_size=2, max_length=16,
                         lean_mlp=False, sparse_dropout=sparse_dropout)  # fmt: skip
    model = inject_adapter(tiny_llama, LoraConfig(r=8, dropout=0.1)).train()
    set_sparse_dropout(model, sparse_dropout)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, ids)
    adapted = adapter_ranks(arch, config.targets, config.rank, config.rank_pattern)
    counted = arch.num_layers * block_bytes(arch, config, adapted, tokens=2 * 16)
    assert counted == pytest.approx(measured, rel=0.06)


def test_qlora_parts_match_slimtune_quant(tiny_llama):
    from slimtune.quant import QuantConfig, quantize_model

    arch = architecture_from_config(tiny_llama.config.to_dict())
    plan = estimate(arch, TrainConfig(method="qlora"))
    quantize_model(tiny_llama, QuantConfig(quant_type="nf4", blocksize=64, double_quant=True))
    packed = constants = floats = 0
    for name, buffer in tiny_llama.named_buffers():
        if name.endswith(".weight"):
            packed += buffer.numel()
        elif name.endswith(("absmax", "nested_absmax", "offset")):
            constants += buffer.numel() * buffer.element_size()
    floats = sum(p.numel() * p.element_size() for p in tiny_llama.parameters())
    assert plan.parts["weights"] == packed + floats
    assert plan.parts["quant_constants"] == constants


def test_targets_narrow_the_adapter():
    arch = builtin_architecture("llama-2-7b")
    qv = estimate(arch, TrainConfig(method="lora", rank=8, targets=["q_proj", "v_proj"]))
    assert qv.trainable_params == 32 * 2 * 8 * (4096 + 4096)  # 4.19M, as in the LoRA paper's setup
    regex = estimate(arch, TrainConfig(method="lora", rank=8, targets=r"(q|v)_proj"))
    assert regex.trainable_params == qv.trainable_params
    with pytest.raises(SlimtuneError, match="matches none"):
        estimate(arch, TrainConfig(method="lora", targets=["c_attn"]))


def test_qlora_weights_are_about_4_bits_per_parameter():
    arch = builtin_architecture("llama-2-7b")
    plan = estimate(arch, TrainConfig(method="qlora"))
    quantized = arch.num_layers * arch.block_linear_params()
    bits = 8 * (
        plan.parts["weights"] - 4 * (arch.num_params() - quantized) + plan.parts["quant_constants"]
    )
    assert bits / quantized == pytest.approx(4.127, abs=0.001)  # NF4 + double quantization


def test_qlora_65b_fits_in_48gb_and_full_16bit_needs_more_than_780gb():
    """QLoRA (Dettmers et al., 2023): the paper's two headline memory figures. The paper keeps
    the adapters, the embeddings and, for full fine-tuning, the weights and gradients in 16 bits
    where slimtune keeps float32: 2 bytes fewer per such value than slimtune's figures."""
    arch = builtin_architecture("llama-65b")
    qlora = estimate(arch, TrainConfig(
        method="qlora", rank=64, optimizer="paged_adamw", batch_size=1, max_length=512,
        gradient_checkpointing=True, compute_dtype="bfloat16"), "cuda")  # fmt: skip
    full = estimate(arch, TrainConfig(
        method="full", optimizer="adamw", batch_size=1, max_length=512,
        gradient_checkpointing=True), "cuda")  # fmt: skip
    unquantized = arch.num_params() - arch.num_layers * arch.block_linear_params()
    head_copy = arch.vocab_size * arch.hidden_size * 2  # slimtune's bf16 copy of the output layer
    paper = qlora.total - 2 * 2 * qlora.trainable_params - 2 * unquantized - head_copy
    assert 40 * GB < paper < 48 * GB  # 47.5 GB
    assert 48 * GB < qlora.total < 56 * GB  # 52.3 GB: slimtune's float32 adapters and embeddings
    assert full.total - 2 * 2 * arch.num_params() > 780 * GB  # 2 + 2 + 8 bytes per parameter
    assert full.parts["optimizer_state"] == 8 * arch.num_params()


def test_fsdp_plans_each_process_its_share_and_the_units_it_gathers():
    """--fsdp over N processes: 1/N of the base, constants, adapter, gradients and optimizer
    state per process, plus one whole decoder layer and the whole root unit (norms and output
    layer; untied embeddings are gathered before the activations grow); activations are the
    process's own rows. Data parallel (no fsdp) and a
    single process hold everything."""
    arch = builtin_architecture("llama-2-70b")
    config = TrainConfig(method="qlora", fsdp=True, compute_dtype="float32", max_length=256)
    whole = estimate(arch, config)
    assert estimate(arch, config.model_copy(update={"fsdp": False}), processes=8).parts == (
        whole.parts
    )
    rest = 4 * (arch.num_params() - arch.num_layers * arch.block_linear_params())
    root = rest - 4 * arch.vocab_size * arch.hidden_size  # its embeddings are not tied
    codes = sum(n_in * n_out // 2 for _, n_in, n_out in arch.block_linears())  # one layer, NF4
    assert (whole.parts["weights"] - rest) // arch.num_layers == codes
    for n in (2, 8):
        shard = estimate(arch, config, processes=n).parts
        assert shard["weights"] == -(-whole.parts["weights"] // n) + root + codes
        assert shard["optimizer_state"] == -(-whole.parts["optimizer_state"] // n)
        layer_adapter = whole.parts["lora_weights"] // arch.num_layers
        assert shard["lora_weights"] == -(-whole.parts["lora_weights"] // n) + layer_adapter
        assert shard["activations"] == whole.parts["activations"]
    # 70B in NF4 does not fit one 24 GB machine; over 8 each holds under 7 GiB of weights.
    assert whole.parts["weights"] > 24 * GB
    assert estimate(arch, config, processes=8).parts["weights"] < 7 * 2**30


def test_checkpointing_and_8bit_shrink_their_parts():
    arch = builtin_architecture("smollm2-135m")
    plain = estimate(arch, TrainConfig(method="lora"))
    ckpt = estimate(arch, TrainConfig(method="lora", gradient_checkpointing=True))
    small = estimate(arch, TrainConfig(method="lora", optimizer="paged_adamw8bit"))
    assert ckpt.parts["activations"] < plain.parts["activations"] / 3
    assert 0.25 < small.parts["optimizer_state"] / plain.parts["optimizer_state"] < 0.26


@pytest.mark.parametrize(
    ("text", "value"), [("24GB", 24 * GB), ("24GiB", 24 * 2**30), ("512M", 512 * 10**6), ("7", 7)]
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_cli_json_has_total_and_every_part(capsys):
    assert cli_main(["estimate", "llama-2-7b", "--json", "--batch-size", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    parts = [k for k in out if k.endswith("_bytes") and k != "total_bytes"]
    assert {"weights_bytes", "optimizer_state_bytes", "activations_bytes"} <= set(parts)
    assert out["total_bytes"] == sum(out[k] for k in parts)


def test_cli_processes_with_fsdp_estimates_each_process(capsys):
    def total(*flags: str) -> int:
        assert cli_main(["estimate", "llama-2-13b", "--json", "--batch-size", "1", *flags]) == 0
        return json.loads(capsys.readouterr().out)["total_bytes"]

    alone = total("--fsdp")
    assert total("--processes", "2") == alone  # data parallel: a whole copy each
    assert total("--fsdp", "--processes", "2") < alone - 3 * 2**30  # half of the ~7 GB base
    assert cli_main(["estimate", "llama-2-13b", "--processes", "0"]) == 2
    assert "--processes" in capsys.readouterr().err


def test_cli_device_memory_answers_and_suggests(capsys):
    assert cli_main(["estimate", "llama-2-13b", "--method", "lora", "--device-memory", "24GB"]) == 0
    text = capsys.readouterr().out
    assert "does not fit in" in text and "--method qlora" in text and "(fits)" in text
    assert cli_main(["estimate", "smollm2-135m", "--device-memory", "24GB"]) == 0
    assert "fits in" in capsys.readouterr().out


def test_cli_states_the_error_band_on_cpu_and_no_calibration_on_cuda(capsys):
    from slimtune.memory.planner import ERROR_BAND

    low, high = ERROR_BAND["cpu"]
    assert low <= 0 <= high  # measured both ways: the band brackets the estimate
    assert cli_main(["estimate", "smollm2-135m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated"] and out["error_band"] == [low, high]
    likely = out["likely_peak_range"]
    assert likely[0] <= out["total_bytes"] <= likely[1]
    assert cli_main(["estimate", "smollm2-135m"]) == 0
    assert f"off by {low:+.1%} to {high:+.1%}" in capsys.readouterr().out
    assert cli_main(["estimate", "smollm2-135m", "--device", "cuda", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibrated"] is False
    assert cli_main(["estimate", "smollm2-135m", "--device", "cuda"]) == 0
    assert "not calibrated on cuda" in capsys.readouterr().out


def test_cli_reads_the_training_config_train_reads(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: llama-2-7b\nmethod: lora\nrank: 16\nbatch_size: 2\nuse_dora: true\n")
    assert cli_main(["estimate", str(path), "--json", "--max-length", "256"]) == 0
    out = json.loads(capsys.readouterr().out)
    config = TrainConfig(method="lora", rank=16, batch_size=2, use_dora=True, max_length=256)
    expected = estimate(
        builtin_architecture("llama-2-7b"), config, "cpu", out["settings"]["compute_dtype"]
    )
    assert out["total_bytes"] == expected.total and out["model"] == "llama-2-7b"
    assert out["settings"]["rank"] == 16 and out["settings"]["max_length"] == 256
    assert cli_main(["estimate", str(path), "--model", "mistral-7b"]) == 0
    assert "mistral-7b" in capsys.readouterr().out
    path.write_text("rank: 16\nblocksize: 96\n")
    assert cli_main(["estimate", str(path)]) == 2
    assert "run.yaml:2: key 'blocksize'" in capsys.readouterr().err


def test_cli_plans_for_the_rows_the_data_gives(tmp_path, capsys):
    """With --data (or a config's data:) the plan is for the largest batch of the rows train
    would tokenize; --full-rows and a model name without a tokenizer plan for full rows."""
    from helpers import save_tiny_model, sums, write_jsonl

    from slimtune.data import load_dataset, pack
    from slimtune.memory.batch import RowSizes
    from slimtune.models.loading import load_tokenizer

    folder = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "sums.jsonl", sums(30))
    flags = ["--data", str(data), "--batch-size", "4", "--max-length", "64", "--json"]

    def plan(*more: str) -> dict:
        assert cli_main(["estimate", str(folder), *flags, "--eval-fraction", "0", *more]) == 0
        return json.loads(capsys.readouterr().out)

    rows = load_dataset(str(data), load_tokenizer(folder), max_length=64).train
    lengths = [len(r["input_ids"]) for r in rows]
    trained = sorted((sum(x != -100 for x in r["labels"][1:]) for r in rows), reverse=True)
    out = plan()
    assert out["batch_shape"] == {"rows": 4, "length": max(lengths),
                                  "trained": sum(trained[:4]), "source": str(data)}  # fmt: skip
    assert max(lengths) < 64 and sum(trained[:4]) < 4 * max(lengths)  # prompts are masked
    full = plan("--full-rows")
    assert full["batch_shape"] == {"rows": 4, "length": 64, "trained": 252, "source": "max_length"}
    assert out["activations_bytes"] < full["activations_bytes"]
    for part in ("weights", "lora_weights", "optimizer_state"):  # the rows change these not
        assert out[f"{part}_bytes"] == full[f"{part}_bytes"]
    packed = plan("--packing")["batch_shape"]
    assert (
        packed
        == RowSizes.of(pack(rows, 64), str(data))
        .largest_batch(TrainConfig(batch_size=4, max_length=64))
        .to_dict()
    )
    assert packed["length"] > max(lengths)  # packing fills rows
    assert cli_main(["estimate", "llama-2-7b", "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "not counted: 'llama-2-7b' is no model folder" in text
    assert "for rows filling max_length" in text


def test_cli_counts_the_tokenizer_it_loads(tmp_path, capsys):
    """The tokenizer `slimtune train` keeps loaded is measured as the estimate loads it: a
    200k-word vocabulary takes tens of MiB; a built-in name has none to count."""
    from helpers import save_tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = save_tiny_model(tmp_path / "model")
    words = {f"word{i:06d}": i for i in range(200_000)}
    backend = Tokenizer(models.WordLevel(words, unk_token="word000000"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="word000000").save_pretrained(
        folder
    )
    assert cli_main(["estimate", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 8 * 2**20 < out["tokenizer_bytes"] < 400 * 2**20, out["tokenizer_bytes"]
    assert cli_main(["estimate", "llama-2-7b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer_bytes"] == 0


def test_cli_bad_model_exits_2(capsys):
    assert cli_main(["estimate", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.processes
def test_prediction_within_15_percent_of_measured_peak_rss():
    """A tiny LoRA run with gradient checkpointing, measured in a fresh process (~15 s idle)."""
    script = ROOT / "benchmarks" / "bench_memory.py"
    env = lean_heap_environment(dict(os.environ)) or dict(os.environ)  # as `slimtune train` runs
    done = subprocess.run(
        [sys.executable, str(script), "--one", "tiny,lora,1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["peak_rss_bytes"] > 200 * 2**20  # torch + transformers alone are ~350 MiB
    assert abs(row["error"]) < 0.15, row


def test_empty_large_asks_for_huge_pages_inside_the_tensor(monkeypatch):
    from slimtune import buffers

    calls = []
    monkeypatch.setattr(buffers, "_madvise", lambda: lambda *args: calls.append(args))
    small = buffers.empty_large((1024,), torch.float32)
    assert small.shape == (1024,) and not calls  # below MIN_BYTES: plain torch.empty
    big = buffers.empty_large((4096, 4096), torch.float32)
    assert big.shape == (4096, 4096) and big.dtype == torch.float32
    ((start, length, advice),) = calls
    assert advice == buffers.MADV_HUGEPAGE
    assert start % buffers.HUGE_PAGE == 0 and length % buffers.HUGE_PAGE == 0 and length > 0
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + big.nbytes
    big.fill_(1.0)  # the memory is ordinary memory
    assert float(big.sum()) == 4096 * 4096
