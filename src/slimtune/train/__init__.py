"""Training: the config, the loop, checkpoints and resume, metrics, evaluation.

Names are imported on first use, so that `slimtune --help` (which reads TrainConfig to build
the flags of `slimtune train`) does not import torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "TrainConfig": "config",
    "load_config": "config",
    "EvalResult": "evaluate",
    "evaluate": "evaluate",
    "TrainData": "setup",
    "TrainingDiverged": "loop",
    "TrainResult": "loop",
    "train": "loop",
    "causal_lm_loss": "loss",
    "cast_frozen": "precision",
    "training_dtype": "precision",
    "PreferenceObjective": "preference",
    "dpo_loss": "preference",
    "orpo_odds_ratio_loss": "preference",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'slimtune.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"slimtune.train.{_WHERE[name]}"), name)
