"""Every supported architecture, tiny and built from its transformers config, through the whole
path: 4-bit loading (against bitsandbytes), LoRA targets and gradients (against PEFT), a QLoRA
run that improves held-out loss, adapter files PEFT loads, merge, and the serving engine."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import peft
import pytest
import torch
from helpers import (
    ARCHITECTURES,
    PEFT_PREFIX,
    hf_greedy,
    ids,
    lora_grads,
    make_char_tokenizer,
    make_tiny,
    save_tiny,
    twins,
    unfused,
    write_jsonl,
)
from oracles import assert_close_to_bnb
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from slimtune.lora import LoraConfig, find_targets, load_adapter
from slimtune.lora.experts import expert_layers
from slimtune.models import load_model
from slimtune.models.experts import FUSED, ExpertList
from slimtune.quant import Linear4bit, QuantConfig, quantized_state_dict

ARCHS = list(ARCHITECTURES)
MOE = ("mixtral", "qwen2_moe")

# Small tensors: on one thread (see the one_thread fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}


def _bnb_model(folder):
    settings = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=settings).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_load_holds_the_bytes_bitsandbytes_writes(arch, folders):
    ours, _ = load_model(folders[arch], quant=QuantConfig())
    theirs = _bnb_model(folders[arch])
    mine, reference = quantized_state_dict(ours), theirs.state_dict()
    layers = [k[: -len("weight")] for k, v in reference.items() if v.dtype == torch.uint8]
    assert layers  # every Linear of the blocks (the output layer stays in float in both)
    for key in (k for k in reference if k.startswith(tuple(layers))):
        assert torch.equal(mine[key], reference[key]), key
    experts = {n: m for n, m in ours.named_modules() if isinstance(m, ExpertList)}
    assert bool(experts) == (arch in MOE)
    # transformers + bitsandbytes leave fused experts in float; slimtune quantizes each expert's
    # weight as bitsandbytes quantizes any weight. The bitsandbytes model given those decoded
    # experts then computes what slimtune computes.
    fused = AutoModelForCausalLM.from_pretrained(folders[arch])
    for name, module in experts.items():
        for param in FUSED:
            decoded = []
            for e, layer in enumerate(getattr(module, param)):
                weight = getattr(fused.get_submodule(name), param)[e].detach()
                packed, state = bnb.functional.quantize_4bit(
                    weight, blocksize=64, quant_type="nf4", compress_statistics=True
                )
                assert isinstance(layer, Linear4bit) and torch.equal(layer.weight, packed)
                decoded.append(layer.dequantize())
            with torch.no_grad():
                getattr(theirs.get_submodule(name), param).copy_(torch.stack(decoded))
    x = ids()
    with torch.no_grad():
        ours_logits = ours(x).logits
    assert_close_to_bnb(ours_logits, theirs, lambda: theirs(x).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_targets_what_peft_targets(arch):
    """Every Linear layer PEFT's "all-linear" wraps, and on a mixture of experts every expert.
    (PEFT's own choice there is a heuristic for checkpoints of transformers 4: on Mixtral it also
    adapts the fused experts and the router's weight, on Qwen2-MoE neither.)"""
    model = make_tiny(arch)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear"))
    linear = {
        name.removeprefix(PEFT_PREFIX)
        for name, module in theirs.named_modules()
        if type(module).__name__ == "Linear" and isinstance(module, peft.tuners.lora.LoraLayer)
    }
    targets = set(find_targets(unfused(model), LoraConfig()))
    experts = set(expert_layers(model))
    assert targets - experts == linear
    assert targets & experts == experts and bool(experts) == (arch in MOE)


# On a mixture of experts PEFT's "all-linear" also adapts the fused experts and the router; here
# the Linear layers only (the experts have tests of their own), by a regex PEFT takes as written.
LINEAR_ONLY = r".*\.(self_attn\.[qkvo]_proj|shared_expert\.(gate|up|down)_proj)"


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_and_gradients_match_peft(arch):
    targets = LINEAR_ONLY if arch in MOE else "all-linear"
    _, theirs, ours = twins(
        lambda: make_tiny(arch), LoraConfig(r=4, alpha=8, target_modules=targets)
    )
    theirs.train(), ours.train()
    x = ids()
    a, b = theirs(x).logits, ours(x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    expected, got = lora_grads(theirs, PEFT_PREFIX), lora_grads(ours)
    assert got.keys() == expected.keys() and got
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def _sums(offset: int) -> list[dict]:
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]
    return rows[offset::4]


def _eval_loss(model, tokenizer, data) -> float:
    from slimtune.data import load_dataset
    from slimtune.train.evaluate import evaluate

    examples = load_dataset(data, tokenizer, max_length=64).train
    return evaluate(model, tokenizer, examples=examples).loss


def _peft_on(folder, adapter):
    base = AutoModelForCausalLM.from_pretrained(folder)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_train_then_peft_merge_and_serve(arch, folders, tmp_path):
    from slimtune.export import merge_to_folder
    from slimtune.serve import Engine, GenerationRequest
    from slimtune.train import TrainConfig, train

    folder = folders[arch]
    train_file = str(write_jsonl(tmp_path / "train.jsonl", _sums(0) + _sums(1) + _sums(2)))
    held_out = str(write_jsonl(tmp_path / "test.jsonl", _sums(3)))
    config = TrainConfig(
        model=str(folder), data=train_file, output=str(tmp_path / "run"), method="qlora",
        rank=4, alpha=8, dropout=0.0, lr=1e-2, batch_size=8, grad_accum=1, max_steps=6,
        warmup_steps=0, max_length=64, seed=0,
    )  # fmt: skip
    base, tokenizer = load_model(folder, quant=QuantConfig())
    before = _eval_loss(base, tokenizer, held_out)
    result = train(config, progress=False)
    after = _eval_loss(result.model, tokenizer, held_out)
    assert after < before - 0.1, (before, after)
    adapter = result.output

    # PEFT reads our adapter and computes what slimtune computes (here on the float base).
    reference = _peft_on(folder, adapter)
    ours, _ = load_model(folder)
    load_adapter(ours, adapter)
    x = ids()
    with torch.no_grad():
        expected = reference(x).logits
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-4, atol=1e-4)

    # The merged folder is a plain transformers model computing base + adapter.
    merge_to_folder(folder, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-4, atol=1e-4)

    # The engine's greedy tokens (a prompt longer than gemma3's sliding window) match PEFT's.
    prompt = make_char_tokenizer()("2+5= and 3+4=")["input_ids"]
    engine = Engine(load_model(folder)[0], tokenizer).start()
    try:
        engine.load_adapter("sums", adapter).result(timeout=60)
        with_adapter = engine.submit(
            GenerationRequest(prompt, "sums", max_tokens=8, ignore_eos=True)
        )
        plain = engine.submit(GenerationRequest(prompt, None, max_tokens=8, ignore_eos=True))
        assert with_adapter.result(120).token_ids == hf_greedy(reference, torch.tensor([prompt]), 8)
        with reference.disable_adapter():
            assert plain.result(120).token_ids == hf_greedy(reference, torch.tensor([prompt]), 8)
    finally:
        engine.stop()


def test_engine_rows_joining_a_sliding_window_model_match_generate():
    """Gemma 3's sliding-window layers keep every column in the engine's cache (the mask limits
    them to the window), so rows longer than the window can join and leave a running batch."""
    from slimtune.serve import Engine, GenerationRequest

    model = make_tiny("gemma3", seed=3, initializer_range=0.05)
    tokenizer = make_char_tokenizer()
    prompts = ["2+5= and 3+4=", "x", "a much longer prompt than the window", "hi"]
    prompts = [tokenizer(p)["input_ids"] for p in prompts]
    engine = Engine(model, tokenizer, max_batch_size=8).start()
    try:
        requests = []
        for i, prompt in enumerate(prompts):
            request = GenerationRequest(prompt, None, max_tokens=4 + 3 * i, ignore_eos=True)
            requests.append(engine.submit(request))
            requests[0].result(120) if i == 1 else None  # the third joins after one has left
        got = [r.result(120).token_ids for r in requests]
    finally:
        engine.stop()
    assert got == [hf_greedy(model, torch.tensor([p]), 4 + 3 * i) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("arch", ARCHS)
def test_planner_counts_the_parameters_of_each_architecture(arch, folders):
    """The planner's shapes, read from the folder's config.json, give exactly the model's own
    parameter count and, for all-linear LoRA, the adapter's."""
    from slimtune.lora import inject_adapter, lora_parameters
    from slimtune.memory import estimate, resolve_architecture
    from slimtune.train import TrainConfig

    shapes = resolve_architecture(str(folders[arch]))
    model = make_tiny(arch)
    assert shapes.num_params() == sum(p.numel() for p in model.parameters())
    plan = estimate(shapes, TrainConfig(rank=4, dropout=0.0))
    inject_adapter(model, LoraConfig(r=4))
    assert plan.trainable_params == sum(p.numel() for p in lora_parameters(model))
