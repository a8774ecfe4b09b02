"""`slimtune train`, `eval`, `generate` end to end on a tiny model folder with a character-level
tokenizer (no download), through the real slimtune.models / quant / lora / data packages."""

import json

import pytest
import torch
from helpers import char_tokenizer, make_tiny_llama, save_char_model, sums, write_jsonl

from slimtune.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_char_model(tmp_path_factory.mktemp("tiny-model"), initializer_range=0.3)


def test_eval_metrics_on_a_hand_made_file(tiny_folder, tmp_path, capsys):
    """Loss and exact match recomputed independently with transformers on the same rows."""
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    prompts = ["1+2=", "3+3=", "2+5=", "4+0="]

    def greedy(prompt):
        ids = torch.tensor([tokenizer(prompt).input_ids])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    # Two references are the model's own greedy answers, two can never be produced in 3 tokens.
    references = [greedy(prompts[0]).strip(), greedy(prompts[1]).strip(), "9999999", "8888888"]
    assert all(references), references
    path = write_jsonl(
        tmp_path / "test.jsonl",
        [{"prompt": p, "completion": r} for p, r in zip(prompts, references, strict=True)],
    )

    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, reference in zip(prompts, references, strict=True):
            ids = tokenizer(prompt + reference).input_ids + [tokenizer.eos_token_id]
            labels = [-100] * len(prompt) + ids[len(prompt) :]
            n = len(ids) - len(prompt)
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            total, count = total + float(loss) * n, count + n

    rc = main(
        [
            "eval",
            "--model",
            str(tiny_folder),
            "--data",
            str(path),
            "--json",
            "--max-new-tokens",
            "3",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["exact_match"] == 0.5
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_train_qlora_then_eval_and_generate(tiny_folder, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", sums())
    held_out = write_jsonl(tmp_path / "test.jsonl", sums(49)[40:])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_folder}\ndata: {data}\neval_data: {held_out}\nrank: 8\nalpha: 16\n"
        "lr: 0.01\nbatch_size: 8\ngrad_accum: 1\nmax_new_tokens: 3\nsave_every: 2\n"
    )
    output = tmp_path / "out"
    rc = main(
        [
            "train",
            str(config),
            "--max-steps",
            "4",
            "--output",
            str(output),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
    ]:
        assert (output / name).is_file(), name
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[-1]["eval_accuracy"] is not None
    resolved = (output / "config.yaml").read_text()
    assert "method: qlora" in resolved and "max_steps: 4" in resolved

    # PEFT itself loads the adapter onto the float base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder), str(output))

    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_folder),
                "--adapter",
                str(output),
                "--data",
                str(held_out),
                "--json",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"loss", "perplexity", "exact_match", "n"} and result["n"] == 9

    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_folder),
                "--adapter",
                str(output),
                "1+2=",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )


def test_train_dpo_reports_the_preference_accuracy_of_the_eval_pairs(tiny_folder, tmp_path, capsys):
    rows = [dict(prompt=r["prompt"], chosen=r["completion"], rejected=r["completion"] + "0")
            for r in sums(12)]  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows[4:])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows[:4])
    output = tmp_path / "out"
    argv = ["train", "--model", str(tiny_folder), "--data", str(data), "--eval-data",
            str(held_out), "--objective", "dpo", "--method", "lora", "--max-steps", "2",
            "--output", str(output), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    loss, accuracy = records[-1]["eval_loss"], 100 * records[-1]["eval_reward_accuracy"]
    expected = f"final eval: loss {loss:.4f}, preference accuracy {accuracy:.1f}%\n"
    assert expected in capsys.readouterr().out


def test_train_cli_errors_name_the_key(tmp_path, capsys):
    assert main(["train", "--rank", "-1", "--data", "x.jsonl"]) == 2
    assert "--rank" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("data: x.jsonl\nlearning_rate: 0.1\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:2: key 'learning_rate': unknown key" in err


def test_train_without_data_fails_before_loading_a_model(capsys):
    assert main(["train", "--model", "/nonexistent/model"]) == 2
    assert "no training data" in capsys.readouterr().err


# ------------------------------------------------------------ quantization and LoRA variants


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _train_tiny(tiny_folder, tmp_path, **settings):
    """train() on the tiny model for two steps with `settings` on top; the TrainResult."""
    from slimtune.train import load_config, train

    tmp_path.mkdir(exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", sums())
    values = dict(model=str(tiny_folder), data=str(data), output=str(tmp_path / "out"), rank=8,
                  alpha=16, lr=0.01, batch_size=8, max_steps=2, threads=1,
                  compute_dtype="float32")  # fmt: skip
    return train(load_config(None, {**values, **settings}), progress=False)


def _linear4bit_settings(model) -> set[tuple]:
    from slimtune.quant import Linear4bit

    return {
        (m.quant_type, m.blocksize, m.double_quant)
        for m in model.modules()
        if isinstance(m, Linear4bit)
    }


def test_train_quantizes_the_base_as_configured_and_generate_loads_it_so(tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("quant_type: fp4\nblocksize: 128\n")
    data = write_jsonl(tmp_path / "train.jsonl", sums())
    output = tmp_path / "out"
    argv = ["train", str(config), "--model", str(tiny_folder), "--data", str(data), "--rank", "4",
            "--max-steps", "1", "--batch-size", "8", "--no-double-quant", "--output", str(output),
            "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    saved = (output / "config.yaml").read_text()
    assert "quant_type: fp4" in saved and "blocksize: 128" in saved
    assert "double_quant: false" in saved

    from slimtune.train.generation import load_for_inference

    model, _ = load_for_inference(str(tiny_folder), str(output))  # quant "auto": as trained
    assert _linear4bit_settings(model) == {("fp4", 128, False)}


def test_train_holds_the_base_in_the_configured_4bit_format(tiny_folder, tmp_path):
    result = _train_tiny(tiny_folder, tmp_path, quant_type="int4", blocksize=32)
    assert _linear4bit_settings(result.model) == {("int4", 32, True)}


def test_train_cli_dora_rslora_patterns_write_what_peft_loads(tiny_folder, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sums())
    output = tmp_path / "out"
    argv = ["train", "--model", str(tiny_folder), "--data", str(data), "--method", "lora",
            "--rank", "8", "--alpha", "16", "--use-dora", "--use-rslora", "--init", "gaussian",
            "--rank-pattern", "{v_proj: 4}", "--alpha-pattern", "{o_proj: 4}", "--lr", "0.01",
            "--max-steps", "2", "--batch-size", "8", "--compute-dtype", "float32",
            "--output", str(output), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    assert (saved["r"], saved["lora_alpha"]) == (8, 16)
    assert len(saved["rank_pattern"]) == 2 and set(saved["rank_pattern"].values()) == {4}
    assert all("v_proj" in key for key in saved["rank_pattern"])
    assert len(saved["alpha_pattern"]) == 2 and set(saved["alpha_pattern"].values()) == {4}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.lora import load_adapter, lora_layers
    from slimtune.models import load_model

    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder), output)
    ours, _ = load_model(str(tiny_folder))
    load_adapter(ours, output)
    ours.eval()  # the adapter's new layers start in training mode, with dropout
    magnitudes = [m for _, layer in lora_layers(ours) for m in layer.lora_magnitude_vector]
    assert len(magnitudes) == 14  # DoRA on every linear layer of the two blocks
    with torch.no_grad():
        torch.testing.assert_close(
            ours(_tokens()).logits, theirs(_tokens()).logits, rtol=1e-4, atol=1e-4
        )


def test_train_pissa_saves_a_lora_adapter_for_the_original_weights(tiny_folder, tmp_path):
    """The trained PiSSA model (residual base + adapter) and PEFT with the saved adapter on
    the untouched base give the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = _train_tiny(tiny_folder, tmp_path, method="lora", init="pissa", use_rslora=True)
    saved = json.loads((result.output / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (16, pytest.approx(16 * 2**0.5))
    assert saved["use_rslora"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_folder)
    theirs = PeftModel.from_pretrained(base, result.output).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            result.model.eval()(_tokens()).logits, theirs(_tokens()).logits, rtol=1e-4, atol=1e-4
        )


def test_train_loftq_adapter_fits_the_base_a_qlora_load_gives(tiny_folder, tmp_path):
    from slimtune.lora import load_adapter
    from slimtune.models import load_model
    from slimtune.quant import QuantConfig

    result = _train_tiny(tiny_folder, tmp_path, init="loftq", quant_type="fp4")
    ours = dict(result.model.named_buffers())
    loaded, _ = load_model(str(tiny_folder), quant=QuantConfig(quant_type="fp4"))
    codes = {k: v for k, v in loaded.named_buffers() if k.endswith(".weight")}
    assert len(codes) == 14
    for name, value in codes.items():
        lora_name = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(ours[lora_name], value), name
    load_adapter(loaded, result.output)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(_tokens()).logits, result.model.eval()(_tokens()).logits, rtol=1e-4, atol=1e-4
        )


def test_loftq_and_gaussian_inits_start_as_configured(tiny_folder):
    """LoftQ's adapter starts as the best rank-r approximation of what 4 bits lose of W;
    gaussian draws A ~ N(0, 1/r) and B = 0."""
    from slimtune.train import TrainConfig
    from slimtune.train.setup import build_model

    original = dict(make_tiny_llama(vocab_size=64, initializer_range=0.3).named_parameters())
    model, _ = build_model(TrainConfig(model=str(tiny_folder), init="loftq", rank=8))
    layer = model.model.layers[0].mlp.down_proj
    W = original["model.layers.0.mlp.down_proj.weight"]
    quantized = layer.base_layer.dequantize().float()
    with torch.no_grad():
        left = (quantized + layer.delta_weight("default") - W).norm()
        best = torch.linalg.svdvals(W - quantized)[8:].square().sum().sqrt()  # Eckart-Young
    assert left.item() == pytest.approx(best.item(), rel=1e-4)

    model, _ = build_model(TrainConfig(model=str(tiny_folder), init="gaussian", rank=16))
    A = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert A.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert not model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.any()


def test_pissa_run_resumes_to_the_adapter_of_an_unbroken_run(tiny_folder, tmp_path):
    """Checkpoints hold the PiSSA form; resume recomputes the start from the base."""
    from safetensors.torch import load_file

    settings = dict(method="lora", init="pissa", max_steps=4, save_every=2, dropout=0.0)
    whole = _train_tiny(tiny_folder, tmp_path / "whole", **settings)
    part = tmp_path / "part"
    _train_tiny(tiny_folder, part, **{**settings, "max_steps": 2})
    resumed = _train_tiny(tiny_folder, part, **settings, resume=True)
    a = load_file(whole.output / "adapter_model.safetensors")
    b = load_file(resumed.output / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_help_does_not_import_torch():
    """`slimtune --help` builds every subcommand's flags; none of that may load torch."""
    import os
    import subprocess
    import sys

    code = "import sys; from slimtune.cli import build_parser; build_parser(); print(*sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "slimtune.cli.train" in loaded  # the subcommands were imported
    assert not loaded & {"torch", "transformers", "numba"}
