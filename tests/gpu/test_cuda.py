"""The CUDA code paths: quantization against bitsandbytes' CUDA kernels, the 4-bit layer, LoRA
with sparse dropout, paged optimizers, and training end to end on a GPU.

These need a CUDA device, so `make test` (CI has no GPU) leaves this folder out (see
tests/conftest.py): run them with `make test-gpu` where one exists. Each compares the GPU
against an oracle (bitsandbytes on the same GPU, or slimtune's own CPU path, which the CPU suite
checks against bitsandbytes).
"""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import bnb_quantize, make_tiny_llama, task_data, tiny_config
from safetensors.torch import load_file

from slimtune.lora import LoraConfig, inject_adapter
from slimtune.lora.sparse_dropout import SparseDropoutLora, drop_positions
from slimtune.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from slimtune.quant import (
    Linear4bit,
    QuantConfig,
    codebook,
    dequantize_4bit,
    quantize_4bit,
    quantize_model,
)

if not torch.cuda.is_available():
    raise RuntimeError("tests/gpu needs a CUDA device: run `make test` on a machine without one")

CUDA = torch.device("cuda")


# ------------------------------------------------------------------ quantization


def assert_same_bytes(ours, theirs, what):
    differ = (ours != theirs).view(-1).nonzero().view(-1)
    first = differ[:5]
    assert differ.numel() == 0, (
        f"{what}: {differ.numel()} of {ours.numel()} bytes differ, first at {first.tolist()}: "
        f"ours {ours.view(-1)[first].tolist()}, bitsandbytes {theirs.view(-1)[first].tolist()}"
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_quantization_is_bitsandbytes_cuda_bit_for_bit(quant_type, double_quant, dtype):
    torch.manual_seed(0)
    x = (torch.randn(384, 512) * 0.02).to(dtype)
    x[:2] = 0.0  # all-zero blocks
    x[2, :8] = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 1.0, -1.0, 0.5, -0.5]).to(dtype)
    x = x.to(CUDA)
    packed, state = quantize_4bit(x, quant_type, 64, double_quant)
    ref_packed, ref_state = bnbf.quantize_4bit(
        x, blocksize=64, compress_statistics=double_quant, quant_type=quant_type
    )
    assert packed.device.type == "cuda"
    assert_same_bytes(packed, ref_packed, "packed codes")
    if double_quant:
        assert_same_bytes(state.absmax, ref_state.absmax, "absmax codes")
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
        assert torch.equal(state.offset, ref_state.offset)
    else:
        assert torch.equal(state.absmax, ref_state.absmax)
    values = dequantize_4bit(packed, state)
    assert torch.equal(values, bnbf.dequantize_4bit(ref_packed, ref_state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_rounding_rules_on_values_near_every_threshold(quant_type):
    """Values one float32 step either side of every threshold and midpoint: the cases where the
    CUDA kernel's literals and the CPU's midpoints may part."""
    from slimtune.quant.codebook import sorted_codes
    from slimtune.quant.cuda_codes import FP4_THRESHOLDS, NF4_THRESHOLDS

    edges = torch.tensor(NF4_THRESHOLDS if quant_type == "nf4" else FP4_THRESHOLDS)
    edges = torch.cat([edges, sorted_codes(quant_type)[0], -edges])
    near = torch.stack([edges, edges.nextafter(edges + 1), edges.nextafter(edges - 1)]).view(-1)
    x = torch.cat([near, torch.ones(1)])  # absmax 1: the scaled values are the values
    x = torch.cat([x, torch.zeros(-x.numel() % 64)]).view(-1, 64).to(CUDA)
    packed, _ = quantize_4bit(x, quant_type, 64)
    ref_packed, _ = bnbf.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert_same_bytes(packed, ref_packed, "packed codes")


def test_double_quant_codes_of_values_near_every_midpoint_are_bitsandbytes_cuda():
    from slimtune.quant.codebook import dynamic_map
    from slimtune.quant.cuda_codes import nearest_dynamic_code_cuda, scale_blocks_cuda

    code = dynamic_map()
    mid = (code[:-1] + code[1:]) / 2
    x = torch.cat([mid, mid.nextafter(mid + 1), mid.nextafter(mid - 1), code, torch.ones(1)])
    x = torch.cat([x, torch.zeros(-x.numel() % 256)]).to(CUDA)
    ref, ref_state = bnbf.quantize_blockwise(x, code=code.to(CUDA), blocksize=256)
    normed = scale_blocks_cuda(x.view(-1, 256), ref_state.absmax).view(-1)
    assert_same_bytes(nearest_dynamic_code_cuda(normed, code), ref, "8-bit codes")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_cuda_and_cpu_quantization_agree_but_at_the_edges(quant_type):
    """The two devices round alike but for values on a threshold (see quant/cuda_codes.py);
    bytes quantized on one device decode to the same values on the other."""
    torch.manual_seed(1)
    x = torch.randn(256, 320)
    packed, state = quantize_4bit(x, quant_type, 64, double_quant=True)
    packed_gpu, state_gpu = quantize_4bit(x.to(CUDA), quant_type, 64, double_quant=True)
    values = codebook(quant_type)  # FP4's two zeros: equal values, different codes
    codes, codes_gpu = (
        torch.stack([p.view(-1) >> 4, p.view(-1) & 15]) for p in (packed, packed_gpu)
    )
    assert (values[codes_gpu.cpu().long()] != values[codes.long()]).float().mean() < 1e-3
    assert (state_gpu.absmax.cpu() != state.absmax).float().mean() < 2e-2
    on_cpu = dequantize_4bit(packed, state)
    assert torch.equal(dequantize_4bit(packed.to(CUDA), state.to(CUDA)).cpu(), on_cpu)
    on_gpu = dequantize_4bit(packed_gpu, state_gpu)
    assert torch.equal(dequantize_4bit(packed_gpu.cpu(), state_gpu.to("cpu")), on_gpu.cpu())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_on_cuda_matches_bitsandbytes_linear4bit(compute_dtype):
    import bitsandbytes as bnb

    torch.manual_seed(2)
    dense = torch.nn.Linear(256, 192)
    ours = Linear4bit.from_linear(
        dense, QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=compute_dtype)
    ).to(CUDA)
    theirs = bnb.nn.Linear4bit(
        256, 192, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4"
    )
    theirs.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    theirs.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    theirs = theirs.to(CUDA)
    assert torch.equal(ours.weight, theirs.weight.data)  # same packed bytes

    x = torch.randn(8, 256, device=CUDA, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = ours(x), theirs(x_ref)
    fp32 = compute_dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if fp32 else dict(rtol=1.6e-2, atol=1e-2)  # bf16: 8 bits
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)


def test_linear4bit_forward_and_backward_on_cuda_match_the_cpu():
    torch.manual_seed(3)
    layer = Linear4bit.from_linear(torch.nn.Linear(320, 128), QuantConfig(double_quant=True))
    x = torch.randn(4, 9, 320, requires_grad=True)
    layer_gpu = copy.deepcopy(layer).to(CUDA)
    x_gpu = x.detach().to(CUDA).requires_grad_()
    out, out_gpu = layer(x), layer_gpu(x_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    out_gpu.sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ inference from 4 bits


def _one_hot_products_are_the_decoded_weight(quant_type, double_quant, dtype):
    """x = a row of the identity: every output is one decoded weight, rounded to the dtype as a
    decoded copy is. Blocks that run across weight rows (96 and 200 columns) and blocks longer
    than a tile step (256 values) too."""
    from slimtune.quant import gpu_matmul

    torch.manual_seed(6)
    for rows, cols, blocksize in [(160, 256, 64), (72, 96, 64), (48, 200, 32), (40, 1024, 256)]:
        w = (torch.randn(rows, cols) * 0.05).to(CUDA)
        packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
        eye = torch.eye(cols, device=CUDA, dtype=dtype)
        decoded = dequantize_4bit(packed, state, dtype)
        for j in [*range(0, cols, cols // 10), cols - 1]:
            x = eye[j : j + 1]
            assert gpu_matmul.usable(x, packed, state)
            out = gpu_matmul.matmul(x, packed, state)
            assert torch.equal(out[0], decoded[:, j]), (rows, cols, j)
    assert not gpu_matmul.usable(eye[:2], packed, state)  # two rows: decode + cuBLAS


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_product_of_one_hot_rows_is_the_decoded_weight_bit_for_bit(
    quant_type, double_quant, dtype
):
    _one_hot_products_are_the_decoded_weight(quant_type, double_quant, dtype)


@pytest.mark.parametrize(
    "tiles", [(16, 128, False), (16, 128, True), (4, 256, True), (8, 64, False)]
)
def test_fused_product_tiles_and_per_byte_absmax(tiles, monkeypatch):
    """Other tile shapes, and the absmax read for every byte rather than once per block."""
    from slimtune.quant import gpu_matmul

    for name, value in zip(("BLOCK_N", "BLOCK_K", "BLOCK_SCALES"), tiles, strict=True):
        monkeypatch.setattr(gpu_matmul, name, value)
    _one_hot_products_are_the_decoded_weight("nf4", True, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_product_equals_decode_then_matmul(dtype):
    from slimtune.quant import gpu_matmul

    torch.manual_seed(7)
    w = (torch.randn(1536, 576) * 0.02).to(CUDA)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    x = torch.randn(1, 576, device=CUDA).to(dtype)
    out = gpu_matmul.matmul(x, packed, state)
    ref = x.float() @ dequantize_4bit(packed, state, dtype).float().t()  # float32 sums
    assert out.dtype == dtype
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    else:  # one rounding of the output to bfloat16 (8 bits) on top of the sums' order
        torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=1e-3 * scale)


@pytest.mark.parametrize("rows", [1, 16, 40])
def test_4bit_inference_layers_on_cuda_equal_the_training_forward(rows):
    """`inference_4bit` on a GPU: one row through the fused product, more through one decode
    and a matmul; both equal the layer's own (training) forward."""
    from slimtune.quant.inference import inference_4bit

    torch.manual_seed(8)
    dense = torch.nn.Linear(320, 256)
    for dtype in (torch.float32, torch.bfloat16):
        config = QuantConfig(double_quant=True, compute_dtype=dtype)
        layer = Linear4bit.from_linear(dense, config).to(CUDA)
        x = torch.randn(rows, 320, device=CUDA)
        with torch.no_grad():
            ref = layer(x)
            with inference_4bit(layer):
                out = layer(x)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(out, ref, **tol)


def _adapted_tiny_llama():
    model = quantize_model(make_tiny_llama(initializer_range=0.3), QuantConfig(double_quant=True))
    inject_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(9)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def test_decoding_on_cuda_from_4_bits_gives_the_cpu_tokens():
    """Greedy tokens of two left-padded prompts: the GPU's 4-bit loop (fused products, the KV
    cache on the GPU) against the CPU's and against the GPU with decoded float weights."""
    from slimtune.infer.loop import decode

    model = _adapted_tiny_llama()
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    on_cpu = decode(model, ids, mask, max_new_tokens=12)
    model.to(CUDA)
    on_gpu = decode(model, ids, mask, max_new_tokens=12)
    decoded = decode(model, ids, mask, max_new_tokens=12, four_bit=False)
    assert on_gpu.engine == "graph"
    assert on_gpu.tokens == on_cpu.tokens == decoded.tokens
    assert all(len(row) == 12 for row in on_gpu.tokens)


def test_cuda_graph_steps_equal_eager_steps(monkeypatch):
    """Decode steps replayed from a CUDA graph give the eager loop's tokens: greedy with a row
    that stops early (its end token) while the other runs on, and seeded sampling."""
    from slimtune.infer import cuda_graph
    from slimtune.infer.loop import decode

    model = _adapted_tiny_llama().to(CUDA)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[2, :5] = 0

    def run(**options):
        seeded = torch.Generator().manual_seed(11)
        return decode(model, ids, mask, max_new_tokens=16, generator=seeded, **options)

    graphed = run()
    monkeypatch.setattr(cuda_graph, "ENABLED", False)
    eager = run()
    assert graphed.engine == "graph" and eager.engine == "lean"
    assert graphed.tokens == eager.tokens
    # Row 0 ends at a token it makes a few steps in (its first time), while the batch runs on.
    row = eager.tokens[0]
    at = next(i for i in range(3, len(row)) if row[i] not in row[:i])
    eager_stop = run(eos_ids={row[at]})
    monkeypatch.setattr(cuda_graph, "ENABLED", True)
    graphed_stop = run(eos_ids={row[at]})
    assert graphed_stop.tokens == eager_stop.tokens and graphed_stop.finish == eager_stop.finish
    assert graphed_stop.finish[0] == "stop" and graphed_stop.tokens[0] == row[:at]
    sampled = [run(temperature=0.9, top_p=0.9).tokens for _ in range(2)]
    monkeypatch.setattr(cuda_graph, "ENABLED", False)
    assert sampled[0] == sampled[1] == run(temperature=0.9, top_p=0.9).tokens


def test_kv_cached_steps_on_cuda_equal_forwards_without_a_cache():
    """The logits of each cached decode step equal a fresh forward over the whole text so far."""
    from slimtune.infer.llama import KVCache, Rotary, lean_forward
    from slimtune.quant.inference import inference_4bit

    model = _adapted_tiny_llama().to(CUDA)
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(2)).to(CUDA)
    positions = torch.arange(14, device=CUDA)[None]

    def fresh():  # a new cache for each forward: nothing carried over
        return KVCache.empty(model, 1, 14, torch.float32), Rotary(model, 14, torch.float32)

    with torch.no_grad(), inference_4bit(model):
        cache, rotary = fresh()
        lean_forward(model, ids[:, :8], positions[:, :8], cache, rotary, None)
        for t in range(8, 14):
            step = lean_forward(model, ids[:, t : t + 1], positions[:, t : t + 1], cache, rotary,
                                None)  # fmt: skip
            whole = lean_forward(model, ids[:, : t + 1], positions[:, : t + 1], *fresh(), None)
            torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)


def test_generate_and_eval_commands_run_on_cuda(tmp_path, capsys):
    """`slimtune generate --device cuda` and `eval --device cuda` give the CPU's text, loss and
    exact match; auto picks the GPU."""
    import json

    from helpers import save_qlora_run, sums, write_jsonl

    from slimtune.cli import main

    model, adapter = save_qlora_run(tmp_path, "method: qlora\ndouble_quant: true\n")
    common = ["--model", str(model), "--adapter", str(adapter), "--json"]

    def run(*args):
        assert main(list(args)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    gen = ["generate", "1+2=", "--raw", "--max-new-tokens", "8", *common]
    on_gpu, on_cpu = run(*gen, "--device", "cuda"), run(*gen, "--device", "cpu")
    assert on_gpu["four_bit"] and on_gpu["engine"] == "graph" and on_gpu["device"] == "cuda"
    assert on_gpu["text"] == on_cpu["text"] and on_gpu["tokens"] == on_cpu["tokens"]
    assert run(*gen)["device"] == "cuda"  # auto: the GPU

    data = write_jsonl(tmp_path / "test.jsonl", sums(8))
    evaluate = ["eval", "--data", str(data), "--max-new-tokens", "3", *common]
    gpu_eval, cpu_eval = run(*evaluate, "--device", "cuda"), run(*evaluate, "--device", "cpu")
    assert gpu_eval["loss"] == pytest.approx(cpu_eval["loss"], rel=1e-4)
    assert gpu_eval["exact_match"] == cpu_eval["exact_match"] and gpu_eval["n"] == 8


# ------------------------------------------------------------------ LoRA


def test_sparse_dropout_on_cuda_is_the_dense_formula_with_its_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, device=CUDA, requires_grad=True)
    A = torch.randn(4, 64, device=CUDA, requires_grad=True)
    B = torch.randn(32, 4, device=CUDA, requires_grad=True)
    result = torch.randn(3, 7, 32, device=CUDA, requires_grad=True)
    torch.manual_seed(3)
    out = SparseDropoutLora.apply(result, x, A, B, 2.0, 0.3)

    torch.manual_seed(3)  # the function's seed comes from torch's (CPU) generator
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = torch.ones(x.numel())
    keep[drop_positions(x.numel(), 0.3, seed)] = 0
    keep = keep.to(CUDA).view(x.shape)
    twins = [t.detach().clone().requires_grad_() for t in (result, x, A, B)]
    r2, x2, A2, B2 = twins
    expected = r2 + 2.0 * ((x2 * keep / 0.7) @ A2.t()) @ B2.t()
    # The same float32 sums in another order (the scale is applied to the narrow side).
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, expected, **tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for ours, theirs in zip((result, x, A, B), twins, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, **tol)


def test_qlora_model_on_cuda_matches_peft_with_bitsandbytes():
    """The same tiny LLaMA, quantized and adapted by us and by PEFT + bitsandbytes, on the GPU:
    the same logits (eval mode) with the same adapter weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = make_tiny_llama()
    # Quantized on the GPU, as bitsandbytes does it below (the CPU rounds a few ties otherwise).
    ours = quantize_model(copy.deepcopy(base).to(CUDA), QuantConfig(double_quant=True))
    inject_adapter(ours, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    theirs = bnb_quantize(copy.deepcopy(base), CUDA)
    theirs = get_peft_model(
        theirs.to(CUDA),
        PeftLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    ours.to(CUDA)
    # Give both the same non-zero adapter (B starts at zero: make the adapter matter).
    torch.manual_seed(4)
    peft_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if "lora_" in name:
            value = torch.randn_like(param) * 0.1
            param.data.copy_(value)
            peft_name = "base_model.model." + name  # our names carry the adapter name too
            peft_params[peft_name].data.copy_(value)
    ids = torch.randint(0, 128, (2, 12), device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(ids).logits, theirs.eval()(ids).logits, rtol=1e-4, atol=1e-4
        )


# ------------------------------------------------------------------ optimizers


def _fit(optimizer_class, steps=20, device=CUDA):
    torch.manual_seed(5)
    params = [torch.randn(300, 64, device=device, requires_grad=True) for _ in range(3)]
    target = [torch.randn_like(p) for p in params]
    optimizer = optimizer_class(params, lr=1e-2)
    for _ in range(steps):
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, target, strict=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return params, optimizer


@pytest.mark.parametrize(("paged", "plain"), [(PagedAdamW, AdamW), (PagedAdamW8bit, AdamW8bit)])
def test_paged_optimizers_on_cuda_keep_state_on_the_host_and_step_like_unpaged(paged, plain):
    paged_params, paged_opt = _fit(paged)
    plain_params, plain_opt = _fit(plain)
    for a, b in zip(paged_params, plain_params, strict=True):
        assert torch.equal(a, b)
    for p in paged_params:
        state = paged_opt.state[p]
        moments = [v for k, v in state.items() if torch.is_tensor(v) and v.numel() > 1]
        assert moments and all(v.device.type == "cpu" and v.is_pinned() for v in moments)
        plain_state = [v for v in plain_opt.state[p].values() if torch.is_tensor(v)]
        assert all(v.device.type == "cuda" for v in plain_state if v.numel() > 1)


def test_paged_state_costs_no_gpu_memory():
    torch.cuda.synchronize()
    params = [torch.randn(4096, 1024, device=CUDA, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    held = torch.cuda.memory_allocated()
    paged = PagedAdamW(params, lr=1e-3)
    paged.step()
    torch.cuda.synchronize()
    paged_growth = torch.cuda.memory_allocated() - held
    plain = AdamW(params, lr=1e-3)
    plain.step()
    torch.cuda.synchronize()
    plain_growth = torch.cuda.memory_allocated() - held - paged_growth
    moments = 2 * params[0].numel() * 4
    assert plain_growth >= moments  # two float32 moments on the GPU
    assert paged_growth < moments / 16  # none there when paged


# ------------------------------------------------------------------ training


def _qlora_model(seed=0):
    model = quantize_model(make_tiny_llama(initializer_range=0.3), QuantConfig(double_quant=True))
    torch.manual_seed(seed)
    inject_adapter(model, LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear"))
    return model


def _config(output, **overrides):
    return tiny_config(output, optimizer="paged_adamw8bit", **overrides)


def test_qlora_training_on_cuda_learns_and_resumes_exactly(tmp_path):
    from slimtune.train import train

    data = task_data()
    model = _qlora_model()
    result = train(
        _config(tmp_path / "whole", save_every=4, keep_checkpoints=10),
        model=model,
        data=data,
        progress=False,
    )
    assert next(model.parameters()).device.type == "cuda"
    records = result.evals
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] / 2, records

    resumed = tmp_path / "resumed"
    config = _config(resumed, resume=str(tmp_path / "whole/checkpoints/step-000004"))
    train(config, model=_qlora_model(seed=7), data=data, progress=False)
    a = load_file(str(tmp_path / "whole/adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
