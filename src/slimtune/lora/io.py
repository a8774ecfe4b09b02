"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

Tensor keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (and DoRA's
`.lora_magnitude_vector`), the adapter name left out; an adapter other than "default" lives in a
subfolder of that name. Files are written atomically (slimtune.files).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.files import atomic_file, write_text
from slimtune.lora.adapters import check_names, lora_configs, lora_layers, set_active_adapters
from slimtune.lora.bases import features
from slimtune.lora.config import LoraConfig
from slimtune.lora.experts import expert_layers, from_peft, target_parameters_of, to_peft
from slimtune.lora.inject import candidate_layers, find_targets, inject_adapter, rank_of
from slimtune.models.experts import unfuse_experts

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}
# PEFT config keys we cannot honour when set to anything but their default.
UNSUPPORTED = {
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "exclude_modules": None,
    "trainable_token_indices": None,
    "lora_bias": False,
    "bias": "none",
}


def adapter_folder(path: str | os.PathLike, adapter_name: str) -> Path:
    return Path(path) if adapter_name == "default" else Path(path) / adapter_name


# ------------------------------------------------------------------ save


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter `adapter_name` as PEFT does; returns the folder written."""
    check_names(model, [adapter_name])
    config = lora_configs(model)[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = False
    experts = expert_layers(model)
    expert_lora: dict[str, nn.Module] = {}
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        if name in experts:
            expert_lora[name] = layer
            continue
        key = PREFIX + name
        tensors[f"{key}.lora_A.weight"] = _to_save(layer.lora_A[adapter_name].weight)
        tensors[f"{key}.lora_B.weight"] = _to_save(layer.lora_B[adapter_name].weight)
        if adapter_name in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[adapter_name].weight
            tensors[f"{key}.lora_magnitude_vector"] = _to_save(magnitude)
        ranks[name], alphas[name] = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        conv1d |= layer.fan_in_fan_out
    parameters = target_parameters_of(model, list(expert_lora))
    for stem, parts in to_peft(model, adapter_name, expert_lora, parameters).items():
        tensors[f"{PREFIX}{stem}.lora_A.weight"] = _to_save(parts["A"])
        tensors[f"{PREFIX}{stem}.lora_B.weight"] = _to_save(parts["B"])
    folder = adapter_folder(path, adapter_name)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config = _peft_config(model, config, ranks, alphas, conv1d, base_model_name_or_path)
    if parameters:
        peft_config["target_parameters"] = parameters
        peft_config["target_modules"] = peft_config["target_modules"] or None
        peft_config["lora_dropout"] = 0.0  # PEFT's fused experts refuse any (inference has none)
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    write_text(folder / CONFIG_NAME, text)
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, {"format": "pt"})
    return folder


def _to_save(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def _peft_config(model, config, ranks, alphas, conv1d, base_model_name_or_path) -> dict:
    # Write the effective per-module rank/alpha so any loader sees exactly these layers.
    r, alpha = config.r, config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(model, list(ranks)),
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names ("q_proj") when they select exactly `paths` among the layers, else full paths."""
    leaves = sorted({p.rpartition(".")[2] for p in paths})
    selected = [n for n in candidate_layers(model) if n.rpartition(".")[2] in leaves]
    return leaves if sorted(selected) == sorted(paths) else sorted(paths)


# ------------------------------------------------------------------ load


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    activate: bool = True,
) -> nn.Module:
    """Load a PEFT LoRA adapter folder (or its `adapter_name` subfolder) into `model`."""
    folder = _find_folder(Path(path), adapter_name)
    config = _read_config(folder / CONFIG_NAME)
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise SlimtuneError(f"{folder}: no {WEIGHTS_NAME} (slimtune reads only safetensors)")
    tensors = _parse_keys(weights_file, load_file(weights_file))
    if config.target_parameters:
        unfuse_experts(model)  # the experts as one layer each, as inject_adapter will wrap them
        tensors = from_peft(model, tensors, config.target_parameters)
    _check_against_model(model, config, tensors, weights_file)
    inject_adapter(model, config, adapter_name, activate=False)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if adapter_name not in layer.lora_A:
                continue
            parts = tensors[name]
            layer.lora_A[adapter_name].weight.copy_(parts["A"])
            layer.lora_B[adapter_name].weight.copy_(parts["B"])
            if "m" in parts:
                layer.lora_magnitude_vector[adapter_name].weight.copy_(parts["m"])
    if activate:
        set_active_adapters(model, [adapter_name])
    return model


def _find_folder(path: Path, adapter_name: str) -> Path:
    # PEFT's layout: a named adapter's own subfolder wins over the folder's "default" adapter.
    for folder in (path / adapter_name, path):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise SlimtuneError(f"{path} is not an adapter folder: it has no {CONFIG_NAME}")


def _read_config(file: Path) -> LoraConfig:
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SlimtuneError(f"{file}: not a readable JSON adapter config ({err})") from err
    if raw.get("peft_type") != "LORA":
        raise SlimtuneError(f"{file}: peft_type is {raw.get('peft_type')!r}, expected 'LORA'")
    for key, default in UNSUPPORTED.items():
        if raw.get(key, default) not in (default, [], {}):
            raise SlimtuneError(f"{file}: key {key}={raw[key]!r} is not supported by slimtune")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise SlimtuneError(f"{file}: missing key {key!r}")
    parameters = raw.get("target_parameters") or None
    if isinstance(parameters, str):
        parameters = [parameters]
    try:
        return LoraConfig(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout") or 0.0,
            target_modules=raw["target_modules"] or ([] if parameters else None),
            target_parameters=parameters,
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
        )
    except SlimtuneError as err:
        raise SlimtuneError(f"{file}: {err}") from err


def _parse_keys(file: Path, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": .., "B": .., "m": ..}} from PEFT keys, refusing anything else."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        kind = next((k for s, k in SUFFIXES.items() if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or kind is None:
            raise SlimtuneError(f"{file}: key {key!r} is not a LoRA linear tensor in PEFT's format")
        module = key[len(PREFIX) :].rsplit("." + _suffix_of(kind), 1)[0]
        tensors.setdefault(module, {})[kind] = value
    return tensors


def _suffix_of(kind: str) -> str:
    return next(s for s, k in SUFFIXES.items() if k == kind)


def _check_against_model(model, config: LoraConfig, tensors, file: Path) -> None:
    """Every targeted layer has its tensors with the right shapes, and nothing else is there."""
    targets = set(find_targets(model, config))
    layers = candidate_layers(model)
    experts = expert_layers(model)
    for module in tensors:
        if module not in targets:
            where = "is not a layer of the model" if module not in layers else "is not targeted"
            key = PREFIX + module + ".lora_A.weight"
            raise SlimtuneError(f"{file}: key {key!r}: module {module!r} {where}")
    for module in sorted(targets):
        key = PREFIX + module
        parts = tensors.get(module, {})
        base = layers[module]
        in_f, out_f = features(base.base_layer if hasattr(base, "base_layer") else base)
        r = rank_of(config, module, experts)
        expected = {"A": (r, in_f), "B": (out_f, r)}
        if config.use_dora:
            expected["m"] = (out_f,)
        for kind in parts.keys() - expected.keys():
            name = f"{key}.{_suffix_of(kind)}"
            raise SlimtuneError(f"{file}: unexpected key {name!r} (use_dora={config.use_dora})")
        for kind, shape in expected.items():
            name = f"{key}.{_suffix_of(kind)}"
            if kind not in parts:
                raise SlimtuneError(f"{file}: missing key {name!r}")
            if tuple(parts[kind].shape) != shape:
                raise SlimtuneError(
                    f"{file}: key {name!r} has shape {tuple(parts[kind].shape)}, expected {shape} "
                    f"(rank {r} for a {in_f}->{out_f} layer)"
                )
