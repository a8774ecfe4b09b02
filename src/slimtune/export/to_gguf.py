"""`slimtune export`: a fine-tune as GGUF files for llama.cpp and Ollama.

- `export_merged_gguf`: the adapter merged into its base, one GGUF file (`gguf.py`);
- `export_adapter_gguf`: the adapter alone as llama.cpp's LoRA GGUF (`gguf_adapter.py`), with
  the base as a GGUF beside it unless the base already is one, and an Ollama Modelfile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import SlimtuneError

ADAPTER = "default"


@dataclass
class GGUFExport:
    files: dict[str, Path]  # role ("model", "base", "adapter", "modelfile") -> path
    qtype: str
    merged_layers: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {role}: {path}" for role, path in self.files.items()]
        return "\n".join(lines + self.notes)


def source_gguf(model: str | Path | None) -> Path | None:
    """The GGUF file a base model is read from, if it is one (the default model is)."""
    from slimtune.models import default_model_file

    if model is None:
        return default_model_file()
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def merged_model(model: str | Path | None, adapter: str | Path, *, qlora: bool = False):
    """(float model with the adapter merged in, tokenizer, number of merged layers)."""
    from slimtune.export.merge import _nf4, dequantize_layers, unwrap_lora_layers
    from slimtune.lora import load_adapter, merge_adapter
    from slimtune.models import load_model

    network, tokenizer = load_model(model, quant=_nf4() if qlora else None)
    load_adapter(network, adapter, ADAPTER)
    merged = merge_adapter(network, ADAPTER)
    unwrap_lora_layers(network)
    dequantize_layers(network)
    return network, tokenizer, merged.layers


def export_merged_gguf(
    model: str | Path | None,
    adapter: str | Path,
    output: str | Path,
    qtype: str = "f16",
    *,
    qlora: bool = False,
) -> GGUFExport:
    from slimtune.export.gguf import write_gguf

    output = _check_output(output)
    network, tokenizer, layers = merged_model(model, adapter, qlora=qlora)
    write_gguf(network, tokenizer, output, qtype, source_gguf=source_gguf(model))
    return GGUFExport({"model": output}, qtype, layers)


def export_adapter_gguf(
    model: str | Path | None,
    adapter: str | Path,
    output_dir: str | Path,
    qtype: str = "f16",
    *,
    base_qtype: str = "f16",
) -> GGUFExport:
    """Write `output_dir/adapter.gguf`, `output_dir/Modelfile` and, for a base that is not a
    GGUF file already, `output_dir/base.gguf`."""
    from slimtune.export.gguf import write_gguf
    from slimtune.export.gguf_adapter import write_adapter_gguf
    from slimtune.export.ollama import write_modelfile
    from slimtune.models import load_model

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise SlimtuneError(f"output folder {output_dir} exists and is not empty")
    network, tokenizer = load_model(model)
    files: dict[str, Path] = {}
    base = source_gguf(model)
    if base is None:
        base = write_gguf(network, tokenizer, output_dir / "base.gguf", base_qtype)
        files["base"] = base
    files["adapter"] = write_adapter_gguf(network, adapter, output_dir / "adapter.gguf", qtype)
    files["modelfile"] = write_modelfile(
        output_dir / "Modelfile", base.resolve(), files["adapter"].resolve(), tokenizer
    )
    return GGUFExport(files, qtype)


def _check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".gguf":
        raise SlimtuneError(f"--output {output}: a merged GGUF export is one file ending in .gguf")
    if output.exists():
        raise SlimtuneError(f"output file {output} exists")
    return output
