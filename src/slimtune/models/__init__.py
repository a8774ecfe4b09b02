"""Load causal LMs (HF folder, GGUF, the default SmolLM2), in float or 4 bits; save 4-bit folders."""

from slimtune.models import gguf_cache
from slimtune.models.loading import load_model
from slimtune.models.paths import cache_dir, default_model_file
from slimtune.models.saving import save_quantized_model

__all__ = ["cache_dir", "default_model_file", "gguf_cache", "load_model", "save_quantized_model"]
