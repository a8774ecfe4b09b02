"""Convert a GGUF file once into a safetensors model folder in the cache, then reuse it.

Loading SmolLM2 from its GGUF takes tens of seconds (every tensor is de-quantized in Python);
the converted folder loads in about a second. The folder is keyed on the GGUF file's path,
size and modification time, so replacing the file gives a fresh conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

from slimtune.files import atomic_folder
from slimtune.models.paths import cache_dir

# Bump when the folder layout written by `convert_gguf` changes.
FORMAT_VERSION = 1


def cache_key(gguf_path: Path) -> str:
    """A folder name for this exact file: stem plus a hash of its path, size and mtime."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    identity = f"v{FORMAT_VERSION}|{path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def converted_folder(gguf_path: Path) -> Path | None:
    """The safetensors folder already converted from `gguf_path`, or None (nothing converts)."""
    target = cache_dir() / "gguf" / cache_key(gguf_path)
    return target if target.is_dir() else None


def cached_folder(gguf_path: Path) -> Path:
    """The safetensors folder for `gguf_path`, converting it first if it is not cached yet."""
    root = cache_dir() / "gguf"
    target = root / cache_key(gguf_path)
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # The lock makes concurrent first loads (several test processes) convert only once.
    with _locked(root / f"{target.name}.lock"):
        if not target.is_dir():
            with atomic_folder(target) as tmp:
                convert_gguf(gguf_path, tmp)
    return target


def convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Write config, float32 safetensors weights, tokenizer and generation config of a GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = gguf_path.parent, gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # transformers marks a GGUF-loaded model as quantized and refuses to save it; a fresh model
    # built from the same config (minus the GGUF marker) holding the same tensors saves fine.
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = type(loaded.config).from_dict(settings)
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    del loaded

    fresh.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
