"""Atomic writes (slimtune.files): the target is the old one or the new one, never a part."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from slimtune.files import atomic_file, atomic_folder, write_bytes, write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_file_is_replaced_whole(tmp_path):
    target = tmp_path / "sub" / "state.json"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable, unlike mkstemp's 0o600
    assert _leftovers(target.parent) == []


def test_an_error_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.bin"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "adapter.safetensors"
    write_bytes(target, b"old")
    script = textwrap.dedent(
        f"""
        import os
        from slimtune.files import atomic_file
        with atomic_file({str(target)!r}) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half of the new")
                handle.flush()
                os._exit(9)  # killed: no cleanup, no rename
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", script], env=env)
    assert result.returncode == 9
    assert target.read_bytes() == b"old"
    (leftover,) = _leftovers(tmp_path)  # what the killed writer had, under a temporary name
    assert leftover.startswith(".adapter.safetensors.tmp-")


def test_a_folder_appears_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not target.exists()
    assert (target / "config.json").read_text() == "{}"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert _leftovers(tmp_path) == []


def test_an_error_while_filling_a_folder_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"part")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_an_empty_folder_is_taken_a_full_one_is_not(tmp_path):
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "keep").write_text("mine")
    with atomic_folder(empty) as tmp:
        (tmp / "a").write_text("new")
    assert (empty / "a").read_text() == "new"
    with pytest.raises(OSError), atomic_folder(full) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in full.iterdir()) == ["keep"]
    assert _leftovers(tmp_path) == []


def test_replace_swaps_a_full_folder(tmp_path):
    target = tmp_path / "step-000004"
    with atomic_folder(target) as tmp:
        (tmp / "old").write_text("old")
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert _leftovers(tmp_path) == []
