"""Training in a low-precision compute dtype: the frozen base (4-bit or float) computes in
bfloat16/float16, the adapter and its gradients stay float32 and match a float32 run within
the dtype's tolerance. Runs on any CPU (without native bfloat16 it is only slower)."""

import copy
import json

import pytest
import torch
from helpers import make_tiny_llama, task_rows, tiny_config
from torch import nn

from slimtune import hardware
from slimtune.errors import SlimtuneError
from slimtune.lora import LoraConfig, LoraLinear, fuse_shared_inputs, inject_adapter
from slimtune.quant import Linear4bit, QuantConfig, quantize_model
from slimtune.quant.blockwise import dequantize_4bit, quantize_4bit
from slimtune.train.forward import summed_loss
from slimtune.train.precision import cast_frozen, training_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert training_dtype("auto", "qlora") == torch.bfloat16
    assert training_dtype("auto", "full") == torch.float32  # full trains every weight in fp32
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert training_dtype("auto", "lora") == torch.float32
    assert training_dtype("bfloat16", "qlora") == torch.bfloat16  # asked for: slow, but it runs
    with pytest.raises(SlimtuneError, match="method full"):
        training_dtype("float16", "full")
    with pytest.raises(SlimtuneError, match="compute_dtype"):
        training_dtype("bf16", "qlora")


def test_a_onednn_limit_below_bfloat16_turns_auto_to_float32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (the AVX2 paths measured on an AVX-512 machine): torch's bfloat16
    matmuls are not native any more, so `auto` picks float32; the report names the limit."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    for name in hardware.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert hardware.cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware.cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not hardware.cpu_has_native_bf16()
    assert hardware.resolve_compute_dtype("auto") == torch.float32
    assert hardware.machine_record()["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert hardware.machine_summary().endswith(
        "instruction sets limited by ONEDNN_MAX_CPU_ISA=AVX2"
    )


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_decoding_straight_into_bfloat16_is_the_rounded_float32(quant_type, double_quant):
    w = torch.randn(96, 320) * 0.05
    packed, state = quantize_4bit(w, quant_type, 64, double_quant)
    direct = dequantize_4bit(packed, state, torch.bfloat16)
    rounded = dequantize_4bit(packed, state, torch.float32).to(torch.bfloat16)
    assert direct.dtype == torch.bfloat16
    assert torch.equal(direct.view(torch.int16), rounded.view(torch.int16))


def test_banded_bfloat16_layer_equals_its_decoded_weight(monkeypatch):
    from slimtune.quant import matmul

    monkeypatch.setattr(matmul, "BAND_VALUES", 1 << 14)  # several row and column bands
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(512, 192), QuantConfig(compute_dtype=torch.bfloat16))
    assert matmul._banded(layer.weight, layer.quant_state)
    x = torch.randn(2, 5, 512, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    weight = layer.dequantize(torch.bfloat16)
    expected = nn.functional.linear(x.detach(), weight, layer.bias.bfloat16())
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)


def _qlora_model():
    base = make_tiny_llama(hidden_size=128, intermediate_size=256)
    quantize_model(base, QuantConfig())
    torch.manual_seed(1)
    inject_adapter(base, LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 at init would make every A gradient zero: nothing to compare
        for layer in base.modules():
            if isinstance(layer, LoraLinear):
                layer.lora_B["default"].weight.normal_(std=0.05)
    return base


def _loss_and_grads(model, seed: int = 3):
    model.train()
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.manual_seed(seed)  # the same dropout draws in every run
    loss = summed_loss(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_gradients_match_a_float32_run_within_the_dtype_tolerance(dtype, tolerance):
    reference = _qlora_model()
    low = copy.deepcopy(reference)
    cast_frozen(low, dtype)
    fuse_shared_inputs(low)
    # The 4-bit base and the frozen output layer multiply in the compute dtype; every parameter
    # (the adapter's are the master weights) and the residual stream stay float32.
    assert {m.compute_dtype for m in low.modules() if isinstance(m, Linear4bit)} == {dtype}
    assert {p.dtype for p in low.parameters() if p.is_floating_point()} == {torch.float32}

    ref_loss, ref_grads = _loss_and_grads(reference)
    loss, grads = _loss_and_grads(low)
    assert abs(loss / ref_loss - 1) < tolerance / 10
    for name, ref in ref_grads.items():
        got = grads[name]
        assert got.dtype == torch.float32
        error = float((got - ref).norm() / ref.norm())
        assert error < tolerance, f"{name}: relative gradient error {error:.4f}"
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
        assert cosine > 0.999, name


def test_train_in_bfloat16_prints_records_and_evaluates(tmp_path, capsys):
    from slimtune.train import TrainData, train

    model = make_tiny_llama(initializer_range=0.3)
    quantize_model(model, QuantConfig())
    torch.manual_seed(0)
    inject_adapter(model, LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear"))
    config = tiny_config(tmp_path, compute_dtype="bfloat16", epochs=2)
    data = TrainData(train=task_rows(32), eval=task_rows(8, seed=1))
    result = train(config, model=model, data=data, progress=False)
    assert "compute dtype: bfloat16" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert {r["compute_dtype"] for r in steps} == {"bfloat16"}
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]  # it learns
    assert len(result.evals) == 2 and result.evals[-1]["eval_loss"] < steps[0]["loss"]
    # The returned model computes in float32 again, as evaluation and generation expect.
    assert {m.compute_dtype for m in model.modules() if isinstance(m, Linear4bit)} == {
        torch.float32
    }
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}


def test_a_float_base_multiplies_in_the_compute_dtype():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    assert cast_frozen(model, torch.bfloat16) == 15  # 7 LoRA layers in each of 2 blocks, the head
    base = model.model.layers[0].mlp.down_proj.base_layer
    assert base.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the stream stays float32
    got = model(input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.02)
    assert not torch.equal(got, expected)  # it did compute in bfloat16
    cast_frozen(model, torch.float32)
    assert base.weight.dtype == torch.float32
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-2, atol=1e-2)


def test_loss_with_a_bfloat16_head_takes_the_softmax_in_float32():
    from slimtune.train.loss import causal_lm_loss

    torch.manual_seed(0)
    head = nn.Linear(32, 100, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(2, 9, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 100, (2, 9))
    labels[0, :3] = -100
    loss = causal_lm_loss(hidden, head, labels, chunk_size=4)  # several chunks, one buffer
    assert loss.dtype == torch.float32
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = head(ref_hidden).float()  # the bf16 product, widened: the softmax in float32
    expected = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=2e-2, atol=1e-3)


def test_a_frozen_float32_head_multiplies_in_the_compute_dtype():
    from slimtune.train.loss import causal_lm_loss

    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=4, alpha=8))
    head = model.lm_head
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 64, requires_grad=True)
    labels = torch.randint(0, 128, (2, 9))
    cast_frozen(model, torch.bfloat16)
    assert head.compute_dtype == torch.bfloat16 and head.weight.dtype == torch.float32
    loss = causal_lm_loss(hidden, head, labels, chunk_size=8)
    # What it computes: the bf16 product (float32 sums), widened, then a float32 softmax.
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = (ref_hidden.bfloat16() @ head.weight.bfloat16().t()).float()
    expected = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), reduction="mean"
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=2e-2, atol=2e-4)
    # The bf16 copy follows the weights when they change.
    with torch.no_grad():
        head.weight.mul_(2)
    again = causal_lm_loss(hidden, head, labels, chunk_size=8)
    logits = (hidden.detach().bfloat16() @ head.weight.bfloat16().t()).float()
    torch.testing.assert_close(
        again,
        nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1)),
    )
    # Evaluation scores in float32 whatever dtype training runs in.
    from slimtune.train.precision import float32_compute

    exact = nn.functional.cross_entropy(
        (hidden.detach() @ head.weight.t())[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1)
    )
    with float32_compute(model):
        torch.testing.assert_close(causal_lm_loss(hidden.detach(), head, labels), exact)
    assert head.compute_dtype == torch.bfloat16
    # Back in float32: the exact float32 loss again, and nothing kept for bf16.
    cast_frozen(model, torch.float32)
    assert not hasattr(head, "_slimtune_cast_weight")
    logits = hidden.detach() @ head.weight.t()
    torch.testing.assert_close(
        causal_lm_loss(hidden.detach(), head, labels),
        nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1)),
    )


def test_a_trained_head_keeps_float32():
    model = make_tiny_llama()
    model.lm_head.weight.requires_grad_(True)
    cast_frozen(model, torch.bfloat16)
    assert not hasattr(model.lm_head, "compute_dtype")
