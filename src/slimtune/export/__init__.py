"""Merge adapters into a standalone model folder (float, or re-quantized to NF4)."""

from slimtune.export.folder import write_model_folder
from slimtune.export.merge import ExportReport, merge_to_folder

__all__ = ["ExportReport", "merge_to_folder", "write_model_folder"]
