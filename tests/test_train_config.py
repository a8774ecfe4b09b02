"""TrainConfig: defaults, YAML + flags, and errors that name the key, file and line."""

import argparse

import pytest

from slimtune.errors import SlimtuneError
from slimtune.train import TrainConfig, load_config
from slimtune.train.config import add_config_arguments, overrides_from_args


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_the_qlora_papers():
    config = TrainConfig()
    assert (config.method, config.quant_type, config.double_quant) == ("qlora", "nf4", True)
    assert (config.rank, config.alpha, config.lr, config.max_grad_norm) == (64, 16, 2e-4, 0.3)
    assert config.lr_scheduler == "constant" and config.targets == "all-linear"
    # Not the paper's effective batch of 16: accumulation is 1 by default, as transformers'
    # Trainer and axolotl have it, so small data sets get enough optimizer steps.
    assert (config.batch_size, config.grad_accum) == (4, 1)


def test_every_field_is_a_flag_and_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 8\nlr: 0.001\npacking: true\ntargets: [q_proj, v_proj]\n")
    args = _parse(
        [
            str(path),
            "--lr",
            "3e-4",
            "--no-packing",
            "--max-steps",
            "7",
            "--model",
            "null",
            "--targets",
            "q_proj,k_proj",
            "--resume",
        ]
    )
    config = load_config(args.config, overrides_from_args(args))
    assert config.rank == 8  # from the file
    assert config.lr == 3e-4 and config.packing is False and config.max_steps == 7
    assert config.targets == ["q_proj", "k_proj"] and config.model is None
    assert config.resume is True
    dests = {a.dest for a in argparse.ArgumentParser()._actions}
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert set(TrainConfig.model_fields) <= {a.dest for a in parser._actions} - dests


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 8\n\nlearning_rate: 0.1\n")
    with pytest.raises(SlimtuneError, match=r"run\.yaml:3: key 'learning_rate': unknown key"):
        load_config(path)
    path.write_text("rnak: 8\n")
    with pytest.raises(SlimtuneError, match="did you mean 'rank'"):
        load_config(path)


def test_bad_values_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 2\nrank: -4\n")
    with pytest.raises(SlimtuneError, match=r"run\.yaml:2: key 'rank'.*greater than 0"):
        load_config(path)
    with pytest.raises(SlimtuneError, match="--lr-scheduler"):
        load_config(None, overrides_from_args(_parse(["--lr-scheduler", "exponential"])))
    with pytest.raises(SlimtuneError, match="--batch-size"):
        load_config(None, overrides_from_args(_parse(["--batch-size", "four"])))
    path.write_text("- a list\n")
    with pytest.raises(SlimtuneError, match="mapping"):
        load_config(path)
    with pytest.raises(SlimtuneError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = TrainConfig(rank=4, targets=["q_proj"], resume="ckpt/step-000002")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_quantization_and_lora_variant_keys(tmp_path):
    config = TrainConfig()
    assert (config.blocksize, config.init, config.use_dora, config.use_rslora) == (
        64,
        "kaiming",
        False,
        False,
    )
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\nrank_pattern: {v_proj: 4}\nblocksize: 128\n")
    args = _parse([str(path), "--use-dora", "--init", "pissa", "--alpha-pattern", "{o_proj: 2.5}"])
    config = load_config(args.config, overrides_from_args(args))
    assert config.rank_pattern == {"v_proj": 4} and config.alpha_pattern == {"o_proj": 2.5}
    assert (config.blocksize, config.init, config.use_dora) == (128, "pissa", True)
    path.write_text(config.to_yaml())
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("blocksize: 100\n", r"run\.yaml:2: key 'blocksize': must be one of 32, 64, 128"),
        ("quant_type: nf8\n", r"run\.yaml:2: key 'quant_type': Input should be 'nf4', 'fp4'"),
        ("init: pissa\n", r"run\.yaml:2: key 'init': pissa needs method lora .*not qlora"),
        ("method: lora\ninit: loftq\n", r"run\.yaml:3: key 'init': loftq needs method qlora"),
        ("method: full\nuse_dora: true\n", r"run\.yaml:3: key 'use_dora': method full trains"),
        ("rank_pattern: {'q_(': 4}\n", r"run\.yaml:2: key 'rank_pattern': 'q_\(' is not a valid"),
        ("alpha_pattern: {q_proj: 0}\n", r"key 'alpha_pattern': 'q_proj': must be greater than 0"),
        ("init: svd\n", r"key 'init': Input should be 'kaiming', 'gaussian', 'pissa' or 'loftq'"),
    ],
)
def test_variant_errors_name_the_file_line_and_key(tmp_path, text, error):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 8\n" + text)
    with pytest.raises(SlimtuneError, match=error):
        load_config(path)


def test_variant_flag_errors_name_the_flag():
    with pytest.raises(SlimtuneError, match=r"--blocksize: must be one of"):
        load_config(None, overrides_from_args(_parse(["--blocksize", "48"])))
    with pytest.raises(SlimtuneError, match=r"--init: loftq needs method qlora"):
        load_config(None, overrides_from_args(_parse(["--method", "lora", "--init", "loftq"])))


def test_full_fine_tuning_refuses_a_low_precision_compute_dtype(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: full\ncompute_dtype: bfloat16\n")
    with pytest.raises(SlimtuneError, match=r"run\.yaml:2: key 'compute_dtype'.*not method full"):
        load_config(path)
    assert load_config(None, {"method": "full", "compute_dtype": "auto"}).compute_dtype == "auto"


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"method": "full"}, r"--fsdp: needs method lora or qlora"),
        ({"objective": "dpo"}, r"--fsdp: needs objective sft, not dpo"),
        ({"method": "lora", "init": "pissa"}, r"--fsdp: not with init pissa"),
        ({"optimizer": "adamw8bit"}, r"--fsdp: needs optimizer adamw, not adamw8bit"),
    ],
)
def test_fsdp_refuses_what_it_does_not_shard(settings, error):
    with pytest.raises(SlimtuneError, match=error):
        load_config(None, {**settings, "fsdp": True})
    assert not load_config(None, settings).fsdp  # fine without it
    assert load_config(None, {"method": "lora", "fsdp": True}).fsdp
    assert load_config(None, {"eval_fraction": 0.1, "fsdp": True}).fsdp  # loss-only evals
