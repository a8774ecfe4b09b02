"""`load_model`: a causal LM and its tokenizer, in float or straight into 4 bits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError
from slimtune.models.gguf_cache import converted_folder
from slimtune.models.paths import default_model_file
from slimtune.models.quantized import load_4bit_folder
from slimtune.models.source import resolve_model
from slimtune.models.streaming import KeepPart, load_streaming_4bit
from slimtune.quant import QuantConfig


def load_model(
    model: str | Path | None = None,
    *,
    quant: QuantConfig | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    keep_part: KeepPart | None = None,
):
    """Load `(model, tokenizer)` from a folder, a .gguf file, or (None) the default SmolLM2.

    With `quant`, the targeted Linear layers are quantized to 4 bits while the weights stream
    in, so the float model never sits whole in memory. A 4-bit folder (written by
    `save_quantized_model`, or by transformers + bitsandbytes) loads back exactly as stored;
    there `quant` only sets the compute dtype. `keep_part` (slimtune.dist.LoadedPart, for
    FSDP) is called for each tensor as it is put in place, to keep a part of it; a float
    model (no `quant`) is loaded whole and does not call it.
    """
    folder = resolve_model(model)
    if not trust_remote_code:
        _refuse_custom_architecture(folder)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    if _is_4bit_folder(folder):
        network = load_4bit_folder(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            compute_dtype=quant.compute_dtype if quant is not None else None,
            keep_part=keep_part,
        )
    elif quant is not None:
        network = load_streaming_4bit(
            folder, quant, dtype=dtype, trust_remote_code=trust_remote_code, keep_part=keep_part
        )
    else:
        network = load_float(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    return network.eval(), tokenizer


def load_float(folder: Path, *, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise SlimtuneError(
            f"model folder {folder} has no usable tokenizer (tokenizer.json or "
            f"tokenizer_config.json expected): {error}"
        ) from None


def tokenizer_of(model: str | Path | None, *, trust_remote_code: bool = False):
    """The tokenizer `load_model(model)` gives, without loading or converting the weights:
    a model folder's, a GGUF's converted folder's where the cache has one, else the one the
    GGUF's metadata describes (transformers builds it; the conversion saves that same one).
    None when `model` is neither a folder nor a .gguf file (a built-in planner name)."""
    path = default_model_file() if model is None else Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return None
    folder = converted_folder(path)
    if folder is not None:
        return load_tokenizer(folder, trust_remote_code=trust_remote_code)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _refuse_custom_architecture(folder: Path) -> None:
    """A model type transformers does not know needs the folder's own code: say so, run none."""
    from transformers import CONFIG_MAPPING

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type is None:
        raise SlimtuneError(f"{folder / 'config.json'} has no model_type: expected e.g. 'llama'")
    if model_type not in CONFIG_MAPPING:
        raise SlimtuneError(
            f"{folder / 'config.json'}: model_type {model_type!r} is not built into transformers; "
            "loading it would run Python code from the model folder. Pass "
            "trust_remote_code=True (--trust-remote-code) only if you trust its author"
        )


def _is_4bit_folder(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    # "slimtune" marks int4 folders: bitsandbytes' layout, a code book only slimtune has.
    method = quant.get("quant_method")
    return method in ("bitsandbytes", "slimtune") and bool(quant.get("load_in_4bit"))
