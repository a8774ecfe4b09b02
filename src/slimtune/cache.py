"""slimtune's cache folder: converted models, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SLIMTUNE_CACHE`, else `$XDG_CACHE_HOME/slimtune`, else `~/.cache/slimtune`."""
    if os.environ.get("SLIMTUNE_CACHE"):
        return Path(os.environ["SLIMTUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "slimtune"
