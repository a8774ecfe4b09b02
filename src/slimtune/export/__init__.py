"""Merge adapters into a standalone model folder (float, or re-quantized to NF4); export a
fine-tune as GGUF for llama.cpp and Ollama."""

from slimtune.export.folder import write_model_folder
from slimtune.export.gguf import write_gguf
from slimtune.export.gguf_adapter import write_adapter_gguf
from slimtune.export.merge import ExportReport, merge_to_folder
from slimtune.export.ollama import write_modelfile
from slimtune.export.survival import Survival, gain_kept
from slimtune.export.to_gguf import GGUFExport, export_adapter_gguf, export_merged_gguf

__all__ = [
    "ExportReport",
    "GGUFExport",
    "Survival",
    "export_adapter_gguf",
    "export_merged_gguf",
    "gain_kept",
    "merge_to_folder",
    "write_adapter_gguf",
    "write_gguf",
    "write_modelfile",
    "write_model_folder",
]
