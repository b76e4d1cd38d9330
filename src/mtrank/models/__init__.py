"""The model zoo. Every model is an ``nn.Module`` whose forward returns a dict of named ``[B]``
tensors and whose class attribute ``tasks`` lists its loss terms (:class:`mtrank.losses.TaskLoss`),
so one trainer serves every model without special cases."""

from __future__ import annotations

from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.base import Base
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.models.esmm import ESMM

MODELS: dict[str, type[nn.Module]] = {
    "esmm": ESMM,
    "base": Base,
}


def build_model(spec: FeatureSpec, cfg: ModelConfig) -> nn.Module:
    """Instantiate the model ``cfg.name``. Raises ConfigError for an unknown name."""
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}") from None
    return cls(spec, cfg)


__all__ = ["MODELS", "Base", "ESMM", "FeatureSpec", "ModelConfig", "build_model"]
