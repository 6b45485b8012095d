"""Training: the Trainer, run configs, checkpoints and metrics logging."""

from polytask.train.config import RunConfig, load_config, parse_config
from polytask.train.trainer import Trainer, TrainResult, evaluate, predict

__all__ = ["RunConfig", "TrainResult", "Trainer", "evaluate", "load_config", "parse_config", "predict"]
