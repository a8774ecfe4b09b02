"""Which adapters the server offers, and the rule for loading new ones at run time: a name is a
plain identifier and the folder must resolve (symlinks included) to a place under --adapter-dir."""

from __future__ import annotations

import re
from pathlib import Path

from slimtune.errors import SlimtuneError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterError(SlimtuneError):
    """A bad adapter name or path (HTTP 400), or a refused one (`status` 403/404/409)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def check_name(name: str, base_name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-'", param="name"
        )
    if name == base_name:
        raise AdapterError(f"adapter name {name!r} is the base model's name", param="name")
    return name


def resolve_under(root: Path, path: str) -> Path:
    """`path` (relative to `root`, or absolute) resolved; it must lie under `root`."""
    root = root.resolve()
    candidate = (root / path).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        raise AdapterError(f"adapter path {path!r} is outside --adapter-dir", 403, "path")
    if not (candidate / "adapter_config.json").is_file():
        raise AdapterError(f"no adapter_config.json in adapter path {path!r}", 400, "path")
    return candidate


def parse_adapter_flag(value: str) -> tuple[str, Path]:
    """`--adapter NAME=DIR` (or just DIR: the folder's name is the adapter's name)."""
    name, sep, folder = value.partition("=")
    if not sep:
        folder, name = value, Path(value).resolve().name
    path = Path(folder).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise SlimtuneError(f"--adapter {value}: no adapter_config.json in {path}")
    return name, path


class AdapterRegistry:
    """Adapter name -> folder. The engine holds the weights; this holds the names clients see."""

    def __init__(self, base_name: str, adapter_dir: Path | None = None):
        self.base_name = base_name
        self.adapter_dir = adapter_dir
        self.paths: dict[str, Path] = {}

    def names(self) -> list[str]:
        return sorted(self.paths)

    def lookup(self, model: str) -> str | None:
        """The adapter a request's `model` field asks for (None: the base). KeyError if unknown."""
        if model == self.base_name:
            return None
        if model in self.paths:
            return model
        raise KeyError(model)

    def check_new(self, name: str, path: str | None) -> Path:
        """Validate a run-time load request; return the adapter's resolved folder."""
        if self.adapter_dir is None:
            raise AdapterError("loading adapters needs the server started with --adapter-dir", 403)
        check_name(name, self.base_name)
        if name in self.paths:
            raise AdapterError(f"adapter {name!r} is already loaded", 409, "name")
        if path is not None and not isinstance(path, str):
            raise AdapterError("path must be a string", param="path")
        return resolve_under(self.adapter_dir, path or name)
