"""TrainConfig: every knob of a training run, read from YAML and/or command-line flags.

Defaults follow the QLoRA paper's script where it has one (r 64, alpha 16, lr 2e-4, max grad
norm 0.3, constant schedule with 3% warm-up, effective batch 16, LoRA on every linear layer of
the blocks). Where the paper's choice is a GPU memory trade-off that hurts on a CPU (gradient
checkpointing), the default is the faster one; docs/training.md lists every choice.
"""

from __future__ import annotations

import argparse
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from slimtune.choices import (
    AUTO,
    BLOCKSIZES,
    COMPUTE_DTYPES,
    LORA_INITS,
    METHODS,
    OBJECTIVES,
    OPTIMIZERS,
    QUANT_TYPES,
)
from slimtune.errors import SlimtuneError

# The keys that say how a QLoRA base is stored: `quantize`, `serve` and `merge` take them too.
QUANT_KEYS = ("quant_type", "blocksize", "double_quant")
# Inits tied to a method: (the method, why).
INIT_METHODS = {
    "pissa": ("lora", "it rewrites the float base weights"),
    "loftq": ("qlora", "it quantizes the base so that base + adapter stays close to it"),
}


class TrainConfig(BaseModel):
    """One training run. Unknown keys are an error; so are values of the wrong type or range."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train
    model: str | None = Field(None, description="HF folder, .gguf file, or hub id; default SmolLM2")
    data: str | None = Field(None, description="training data file (JSONL, JSON, CSV, Parquet)")
    eval_data: str | None = Field(None, description="evaluation data file")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="hold out this share of data")
    method: Literal[METHODS] = "qlora"
    # the 4-bit base (method qlora)
    quant_type: Literal[QUANT_TYPES] = Field("nf4", description="the 4-bit code book")
    blocksize: int = Field(64, description="weights per absmax scale: 32, 64, ... 4096")
    double_quant: bool = Field(True, description="store the absmax scales in 8 bits")
    # the adapter
    rank: int = Field(64, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: str | list[str] = Field("all-linear", description="'all-linear', a regex, or names")
    rank_pattern: dict[str, int] = Field(
        {}, description="rank per layer: {regex matching the end of a layer path: rank}"
    )
    alpha_pattern: dict[str, float] = Field(
        {}, description="alpha per layer: {regex matching the end of a layer path: alpha}"
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(rank), not alpha/rank")
    use_dora: bool = Field(False, description="DoRA: train a magnitude per output row too")
    init: Literal[LORA_INITS] = Field(
        "kaiming", description="how A and B start (pissa: method lora; loftq: method qlora)"
    )
    # the data
    max_length: int = Field(512, gt=1)
    packing: bool = False
    train_on_prompt: bool = False
    chat_template: str | None = Field(
        None, description="chat template for chat rows: chatml, llama3, gemma, or a Jinja file"
    )
    # the optimisation
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(4, gt=0, description="rows per micro-batch (per process)")
    # 1, as transformers' Trainer and axolotl: accumulating by default starves small data sets of
    # optimizer steps.
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    optimizer: Literal[OPTIMIZERS] = "adamw"
    lr: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "constant"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(0.3, gt=0, description="clip to this norm; null: never")
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch threads (default: torch's)")
    compute_dtype: Literal[(AUTO, *COMPUTE_DTYPES)] = Field(
        "auto", description="dtype of the frozen base's compute; auto: bfloat16 where native"
    )
    # preference tuning (data rows with chosen/rejected answers; see docs/training.md)
    objective: Literal[OBJECTIVES] = Field("sft", description="sft, dpo or orpo")
    beta: float = Field(0.1, gt=0, description="DPO's beta (strength of the reference tie)")
    dpo_loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO loss: sigmoid or ipo")
    orpo_lambda: float = Field(0.1, ge=0, description="weight of ORPO's odds-ratio term")
    # evaluation
    eval_every: int | None = Field(None, gt=0, description="steps between evals (and epoch ends)")
    eval_max_rows: int | None = Field(64, gt=0, description="rows scored by generation per eval")
    max_new_tokens: int = Field(32, gt=0, description="answer length when evaluating")
    # output
    output: str = "slimtune-output"
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0)
    resume: bool | str = Field(False, description="true: latest checkpoint in output; or a path")
    log_every: int = Field(1, gt=0)
    # how a training step is computed (same values either way; see docs/training.md)
    lean_mlp: bool = Field(True, description="gated MLPs keep gate(x) and up(x) only for backward")
    sparse_dropout: bool = Field(
        True, description="LoRA dropout keeps no mask or dropped copy; false: PEFT's exact masks"
    )
    native_attention: bool = Field(
        True, description="causal attention in C on the CPU where it applies; false: torch's SDPA"
    )
    # processes (torchrun); see docs/distributed.md
    fsdp: bool = Field(
        False, description="under torchrun, shard the base and the adapter across processes"
    )

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("needs at least one module name, a regex, or 'all-linear'")
        return value

    @field_validator("blocksize")
    @classmethod
    def _blocksize_is_supported(cls, value: int) -> int:
        if value not in BLOCKSIZES:
            raise ValueError(f"must be one of {', '.join(map(str, BLOCKSIZES))}")
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_are_regexes_to_positive_numbers(cls, value: dict) -> dict:
        for pattern, number in value.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regex: {error}") from None
            if number <= 0:
                raise ValueError(f"{pattern!r}: must be greater than 0, got {number}")
        return value

    @field_validator("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "init")
    @classmethod
    def _adapter_settings_need_an_adapter(cls, value: Any, info: ValidationInfo) -> Any:
        default = cls.model_fields[info.field_name].default
        if info.data.get("method") == "full" and value != default:
            raise ValueError("method full trains every weight: there is no adapter to apply it to")
        return value

    @field_validator("init")
    @classmethod
    def _init_suits_the_method(cls, value: str, info: ValidationInfo) -> str:
        method = info.data.get("method")
        needs = INIT_METHODS.get(value)
        if needs is not None and method is not None and method != needs[0]:
            raise ValueError(f"{value} needs method {needs[0]} ({needs[1]}), not {method}")
        return value

    @field_validator("compute_dtype")
    @classmethod
    def _full_computes_in_float32(cls, value: str, info: ValidationInfo) -> str:
        # No float32 master copies are kept: a run that trains every weight trains it in float32.
        if info.data.get("method") == "full" and value not in (AUTO, "float32"):
            raise ValueError(f"{value} needs a frozen base (method lora or qlora), not method full")
        return value

    @field_validator("fsdp")
    @classmethod
    def _fsdp_suits_the_run(cls, value: bool, info: ValidationInfo) -> bool:
        """What sharding supports: an adapter on a frozen base, supervised, trained by AdamW."""
        data = info.data
        if value and data.get("method") == "full":
            raise ValueError("needs method lora or qlora: it shards a frozen base and an adapter")
        if value and data.get("objective", "sft") != "sft":
            raise ValueError(
                f"needs objective sft, not {data['objective']}: preference tuning runs the "
                "model its own way"
            )
        if value and data.get("init") == "pissa":
            raise ValueError("not with init pissa: it rewrites the base weights when saving")
        if value and data.get("optimizer", "adamw") != "adamw":
            raise ValueError(
                f"needs optimizer adamw, not {data['optimizer']}: the 8-bit and paged "
                "optimizers keep their state in a layout of their own"
            )
        return value

    @property
    def global_batch_rows(self) -> int:
        return self.batch_size * self.grad_accum

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


# ------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The YAML file (if any) with `overrides` on top; errors name the file, line and key."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        values, lines = _read_yaml(Path(path))
    values.update(overrides or {})
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        raise SlimtuneError(_explain(error, path, lines, set(overrides or {}))) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        text = path.read_text()
    except OSError as error:
        raise SlimtuneError(f"cannot read config {path}: {error.strerror}") from None
    try:
        node = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SlimtuneError(f"{path}: not valid YAML: {error}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise SlimtuneError(f"{path}: expected a mapping of keys to values at the top level")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    return values, lines


def _explain(error: ValidationError, path, lines: dict[str, int], from_flags: set[str]) -> str:
    problems = []
    for item in error.errors():
        key = str(item["loc"][0]) if item["loc"] else "?"
        if key in from_flags:
            where = f"--{key.replace('_', '-')}"
        elif path is not None and key in lines:
            where = f"{path}:{lines[key]}: key '{key}'"
        else:
            where = f"key '{key}'"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, TrainConfig.model_fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{where}: unknown key{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message} (got {item.get('input')!r})")
    return "; ".join(problems)


# ------------------------------------------------------------------------------- CLI flags


def add_config_arguments(
    parser: argparse.ArgumentParser,
    names: Sequence[str] | None = None,
    title: str = "training options (each also a key of CONFIG.yaml)",
) -> None:
    """One flag per TrainConfig field (or per field of `names`), generated from the model so
    the two never drift."""
    group = parser.add_argument_group(title)
    for name, field in TrainConfig.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} (default: {field.default!r})"
        choices = [v for a in _args_of(field.annotation) if typing.get_origin(a) is Literal
                   for v in typing.get_args(a)]  # fmt: skip
        if choices:
            help_text += f"; one of {', '.join(choices)}"
        if _is_bool(field.annotation) and name != "resume":
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif name == "resume":
            group.add_argument(
                flag,
                dest=name,
                nargs="?",
                const=True,
                default=argparse.SUPPRESS,
                metavar="CKPT",
                help="continue from the latest checkpoint in --output, or from CKPT",
            )
        else:
            # Values stay strings here and are parsed as YAML scalars, so that a flag and a
            # config key accept the same spellings and fail with the same message.
            group.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text
            )


def overrides_from_args(
    args: argparse.Namespace, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """The config keys (of `names`, if given) given as flags, their values parsed like YAML
    scalars."""
    overrides = {}
    for name, field in TrainConfig.model_fields.items():
        if name not in vars(args) or (names is not None and name not in names):
            continue
        value = getattr(args, name)
        if isinstance(value, str):
            value = _parse_flag(value, field.annotation)
        overrides[name] = value
    return overrides


def _parse_flag(text: str, annotation) -> Any:
    if _accepts_list(annotation) and "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    if _accepts_str(annotation) and not _is_bool(annotation):
        return None if text.lower() in ("null", "none") and _accepts_none(annotation) else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _args_of(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_bool(annotation) -> bool:
    return bool in _args_of(annotation)


def _accepts_str(annotation) -> bool:
    return any(a is str or typing.get_origin(a) is Literal for a in _args_of(annotation))


def _accepts_list(annotation) -> bool:
    return any(typing.get_origin(a) is list for a in _args_of(annotation))


def _accepts_none(annotation) -> bool:
    return type(None) in _args_of(annotation)
