"""Turn what the user passed as a model into a checked local safetensors folder."""

from __future__ import annotations

import json
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.models.gguf_cache import cached_folder
from slimtune.models.paths import default_model_file

EXPECTED = "a model folder with config.json and *.safetensors weights, or a .gguf file"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model(model: str | Path | None) -> Path:
    """The safetensors folder to load: the default model, a converted GGUF, or `model` itself."""
    if model is None:
        return cached_folder(default_model_file())
    path = Path(model).expanduser()
    if not path.exists():
        raise SlimtuneError(f"model {str(model)!r} does not exist: expected {EXPECTED}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SlimtuneError(f"model file {path} is not a .gguf file: expected {EXPECTED}")
        _check_gguf(path)
        return cached_folder(path)
    check_folder(path)
    return path


def check_folder(folder: Path) -> None:
    """Raise SlimtuneError unless `folder` holds a readable config and safetensors weights."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SlimtuneError(f"model folder {folder} has no config.json: expected {EXPECTED}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SlimtuneError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise SlimtuneError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    if safetensors_files(folder):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        # Pickled checkpoints can run arbitrary code when loaded: never open them.
        raise SlimtuneError(
            f"model folder {folder} has only pickled weights ({', '.join(pickles)}); slimtune "
            "loads safetensors only, as pickles can execute code. Convert them with a tool you "
            "trust, e.g. `model.save_pretrained(folder, safe_serialization=True)`"
        )
    raise SlimtuneError(f"model folder {folder} has no *.safetensors weights: expected {EXPECTED}")


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards named by an index, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise SlimtuneError(f"{index} is not a valid safetensors index ({error})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise SlimtuneError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
