"""`slimtune export`: a fine-tune as GGUF files for llama.cpp and Ollama.

- `export_merged_gguf`: the adapter merged into its base, one GGUF file (`gguf.py`);
- `export_adapter_gguf`: the adapter alone as llama.cpp's LoRA GGUF (`gguf_adapter.py`), with
  the base as a GGUF beside it unless the base already is one, and an Ollama Modelfile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.export.gguf import GPTQ_QTYPES, encode, tensor_type, write_gguf
from slimtune.export.gguf_adapter import check_adapter_type, write_adapter_gguf
from slimtune.export.gptq import input_hessians
from slimtune.export.merge import (
    calibration_batches,
    dequantize_layers,
    trained_base,
    unwrap_lora_layers,
    with_adapter_template,
)
from slimtune.export.ollama import write_modelfile
from slimtune.export.survival import Survival, exact_match
from slimtune.lora import load_adapter, lora_layers, merge_adapter
from slimtune.models import default_model_file, load_model
from slimtune.quant import QuantConfig, select_linear_layers

ADAPTER = "default"


@dataclass
class GGUFExport:
    files: dict[str, Path]  # role ("model", "base", "adapter", "modelfile") -> path
    qtype: str
    merged_layers: int = 0
    survival: Survival | None = None  # the gain kept on the eval rows, when given

    def __str__(self) -> str:
        lines = [f"wrote {role}: {path}" for role, path in self.files.items()]
        if self.survival is not None:
            lines.append(str(self.survival))
        return "\n".join(lines)


def source_gguf(model: str | Path | None) -> Path | None:
    """The GGUF file a base model is read from, if it is one (the default model is)."""
    if model is None:
        return default_model_file()
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def merged_model(
    model: str | Path | None,
    adapter: str | Path,
    *,
    qlora: bool | QuantConfig = False,
    eval_rows: list[dict] | None = None,
):
    """(float model with the adapter merged in, tokenizer, number of merged layers, scores):
    scores are the exact match of the base and of base + adapter on `eval_rows` (or None)."""
    network, tokenizer = load_model(model, quant=trained_base(qlora))
    with_adapter_template(tokenizer, adapter)
    scores = None
    if eval_rows:
        scores = (exact_match(network, tokenizer, eval_rows),)
    load_adapter(network, adapter, ADAPTER)
    if eval_rows:
        scores += (exact_match(network, tokenizer, eval_rows),)
    merged = merge_adapter(network, ADAPTER)
    unwrap_lora_layers(network)
    dequantize_layers(network)
    return network, tokenizer, merged.layers, scores


def calibration_hessians(network, tokenizer, rows: list[dict]) -> dict:
    """Input Hessians of every block Linear layer on `rows` (see `slimtune.export.gptq`)."""
    paths = select_linear_layers(network)
    return input_hessians(network, paths, calibration_batches(tokenizer, rows))


def load_gguf_model(path: str | Path):
    """A GGUF file as a float transformers model, read by transformers' own GGUF reader (an
    implementation independent of the writer here)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def export_merged_gguf(
    model: str | Path | None,
    adapter: str | Path,
    output: str | Path,
    qtype: str = "f16",
    *,
    qlora: bool | QuantConfig = False,
    eval_rows: list[dict] | None = None,
    calibration: list[dict] | None = None,
) -> GGUFExport:
    """Merge `adapter` into `model` and write one GGUF file `output` of type `qtype`; with
    `eval_rows`, measure how much of the fine-tune's gain the written file keeps; with
    `calibration` rows (training data) and `qtype` "q4_0" or "q4_k_m", round with error
    compensation (GPTQ)."""
    output = _check_output(output)
    if calibration and qtype not in GPTQ_QTYPES:
        raise SlimtuneError(f"calibration rows round to {' or '.join(GPTQ_QTYPES)}: they do not "
                            f"apply to {qtype}")  # fmt: skip
    network, tokenizer, layers, scores = merged_model(
        model, adapter, qlora=qlora, eval_rows=eval_rows
    )
    hessians = calibration_hessians(network, tokenizer, calibration) if calibration else None
    write_gguf(network, tokenizer, output, qtype, source_gguf=source_gguf(model),
               hessians=hessians)  # fmt: skip
    del hessians
    result = GGUFExport({"model": output}, qtype, layers)
    if scores is not None:
        del network
        exported = exact_match(load_gguf_model(output), tokenizer, eval_rows)
        result.survival = Survival(*scores, exported, len(eval_rows), f"{qtype} GGUF")
    return result


def export_adapter_gguf(
    model: str | Path | None,
    adapter: str | Path,
    output_dir: str | Path,
    qtype: str = "f16",
    *,
    base_qtype: str = "f16",
    eval_rows: list[dict] | None = None,
) -> GGUFExport:
    """Write `output_dir/adapter.gguf`, `output_dir/Modelfile` and, for a base that is not a
    GGUF file already, `output_dir/base.gguf`. With `eval_rows`, the gain kept is measured on
    the base with the adapter's weights as the file stores them (rounded to `qtype`)."""
    check_adapter_type(qtype)  # before anything is written
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise SlimtuneError(f"output folder {output_dir} exists and is not empty")
    network, tokenizer = load_model(model)
    with_adapter_template(tokenizer, adapter)
    files: dict[str, Path] = {}
    base = source_gguf(model)
    if base is None:
        base = write_gguf(network, tokenizer, output_dir / "base.gguf", base_qtype)
        files["base"] = base
    base_score = exact_match(network, tokenizer, eval_rows) if eval_rows else None
    files["adapter"] = write_adapter_gguf(network, adapter, output_dir / "adapter.gguf", qtype)
    files["modelfile"] = write_modelfile(
        output_dir / "Modelfile", base.resolve(), files["adapter"].resolve(), tokenizer
    )
    result = GGUFExport(files, qtype)
    if eval_rows:
        tuned = exact_match(network, tokenizer, eval_rows)
        round_adapter_weights(network, qtype)
        exported = exact_match(network, tokenizer, eval_rows)
        result.survival = Survival(
            base_score, tuned, exported, len(eval_rows), f"{qtype} adapter GGUF"
        )
    return result


def round_adapter_weights(model, qtype: str) -> None:
    """Replace every LoRA A/B weight by its value after a round trip through `qtype`."""
    import gguf
    import numpy as np
    import torch

    for _, layer in lora_layers(model):
        for store in (layer.lora_A, layer.lora_B):
            if ADAPTER not in store:
                continue
            weight = store[ADAPTER].weight
            array = weight.detach().float().numpy()
            ggml_type = tensor_type("lora", array.shape, qtype)
            data = encode(array, ggml_type)
            if ggml_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                data = gguf.quants.dequantize(data, ggml_type)
            rounded = torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(array.shape))
            with torch.no_grad():
                weight.copy_(rounded.to(weight.dtype))


def _check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".gguf":
        raise SlimtuneError(f"--output {output}: a merged GGUF export is one file ending in .gguf")
    if output.exists():
        raise SlimtuneError(f"output file {output} exists")
    return output
