"""An OpenAI-compatible server that batches requests for many LoRA adapters on one base model."""

from slimtune.serve.adapters import AdapterRegistry
from slimtune.serve.engine import Delta, Engine, Finish, GenerationRequest, QueueFull

__all__ = ["AdapterRegistry", "Delta", "Engine", "Finish", "GenerationRequest", "QueueFull"]


def create_app(*args, **kwargs):
    """`slimtune.serve.app.create_app`, imported on use so the engine works without FastAPI."""
    from slimtune.serve.app import create_app as create

    return create(*args, **kwargs)
