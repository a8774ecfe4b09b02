"""The folders the UI may read and write: every path a browser names is checked against them.

A path is resolved (symlinks followed, `..` folded) before the check, so neither `../x` nor a
link pointing out of an allowed folder gets past it.
"""

from __future__ import annotations

import re
from pathlib import Path

from slimtune.errors import SlimtuneError

# Names the UI creates (uploads, run folders): letters, digits, dot, dash, underscore.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class OutsideAllowed(SlimtuneError):
    """A path outside every allowed folder."""


class Allowed:
    """The allowed folders; the first one is where uploads and new runs go by default."""

    def __init__(self, roots: list[str | Path]):
        if not roots:
            raise SlimtuneError("--allow: at least one folder is needed")
        self.roots: list[Path] = []
        for root in roots:
            path = Path(root).expanduser().resolve()
            if not path.is_dir():
                raise SlimtuneError(f"--allow {root}: not a folder")
            self.roots.append(path)

    @property
    def home(self) -> Path:
        return self.roots[0]

    def resolve(self, path: str | Path) -> Path:
        """`path` (absolute, or relative to the first folder) resolved, if inside a folder."""
        text = str(path).strip()
        if not text or "\x00" in text:
            raise OutsideAllowed(f"{text!r}: not a path")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.home / candidate
        resolved = candidate.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise OutsideAllowed(f"{text}: outside the allowed folders (slimtune ui --allow DIR)")
        return resolved

    def display(self, path: Path) -> str:
        """`path` relative to the first folder that holds it (what the page shows)."""
        for root in self.roots:
            if path == root or path.is_relative_to(root):
                rel = path.relative_to(root)
                return str(rel) if root == self.home else str(root / rel)
        return str(path)


def safe_name(name: str, what: str = "name") -> str:
    """A single file or folder name the UI may create: no separators, no leading dot."""
    if not _SAFE_NAME.match(name or ""):
        raise SlimtuneError(
            f"{what} {name!r}: use letters, digits, '.', '-' or '_' (no '/' and no leading '.')"
        )
    return name
