"""Atomic writes: a file or folder appears whole under its name, or not at all.

Everything is written under a temporary name beside the target (same folder, so the same file
system), flushed to disk, and renamed into place with `os.replace`. A process killed half-way
leaves the old target as it was, plus at most a `.NAME.tmp-*` leftover.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

FILE_MODE = 0o644  # mkstemp/mkdtemp make private files; what we write is meant to be read
FOLDER_MODE = 0o755


def temp_prefix(path: Path) -> str:
    """The prefix of the temporary names used for `path` (to find leftovers of killed runs)."""
    return f".{path.name}.tmp-"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write; when the block ends without error it replaces `path`.

    with atomic_file(target) as tmp:
        save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _sync_file(tmp)
        tmp.chmod(FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A temporary folder to fill; when the block ends without error it becomes `path`.

    `path` must not exist or be an empty folder; with `replace` an existing folder is swapped
    out (moved aside, then deleted once the new one is in place).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path)))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _sync_file(file)
        tmp.chmod(FOLDER_MODE)
        aside = _move_aside(path) if replace else None
        try:
            if aside is None and path.is_dir():
                path.rmdir()  # an empty folder in the way (not every system renames over one)
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:
                os.replace(aside / path.name, path)  # the old folder goes back
                aside.rmdir()
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _sync_folder(path.parent)


def _move_aside(path: Path) -> Path | None:
    if not path.exists():
        return None
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path)))
    os.replace(path, old / path.name)
    return old


def _sync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _sync_folder(path: Path) -> None:
    """Make a rename inside `path` durable (where the system can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
