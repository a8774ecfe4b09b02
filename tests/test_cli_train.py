"""`slimtune train`, `eval`, `generate` end to end on a tiny model folder with a character-level
tokenizer (no download), through the real slimtune.models / quant / lora / data packages."""

import json

import pytest
import torch
from helpers import char_tokenizer, save_char_model, sums, write_jsonl

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
