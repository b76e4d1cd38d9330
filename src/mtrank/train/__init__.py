"""One trainer for every model."""

from mtrank.train.trainer import TrainConfig, Trainer, TrainResult, predict

__all__ = ["TrainConfig", "TrainResult", "Trainer", "predict"]
