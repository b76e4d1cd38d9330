"""Exact, global evaluation metrics (never averaged per batch)."""

from mtrank.metrics.core import auc, calibration, gauc, logloss
from mtrank.metrics.evaluate import evaluate_outputs

__all__ = ["auc", "calibration", "evaluate_outputs", "gauc", "logloss"]
