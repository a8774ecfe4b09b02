"""Training: the config, the loop, checkpoints and resume, metrics, evaluation, generation."""

from slimtune.train.config import TrainConfig, load_config
from slimtune.train.evaluate import EvalResult, evaluate
from slimtune.train.generation import generate
from slimtune.train.loop import TrainData, TrainingDiverged, TrainResult, train
from slimtune.train.loss import causal_lm_loss

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "TrainingDiverged",
    "causal_lm_loss",
    "evaluate",
    "generate",
    "load_config",
    "train",
]
