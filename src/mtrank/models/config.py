"""Model configuration and the feature specification a model is built from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FeatureSpec(BaseModel):
    """What a model needs to know about its input: vocab sizes, numerical count, task names."""

    model_config = ConfigDict(extra="forbid")

    cardinalities: list[int]
    n_numerical: int
    funnel: bool = True
    task_names: list[str] = Field(default_factory=list, description="plain (non-funnel) tasks")


def require_funnel(spec: FeatureSpec, model: str) -> None:
    """Raise ConfigError unless the data has a click → conversion funnel (funnel models only)."""
    from mtrank.errors import ConfigError

    if not spec.funnel:
        raise ConfigError(f"{model} needs a funnel dataset (click and conversion labels)")


class ModelConfig(BaseModel):
    """Hyperparameters shared by the model zoo (defaults from the ESMM paper, §3.2).

    Attributes:
        name: registry name (``esmm``, ``base`` …).
        embedding_dim: embedding size per categorical field (paper: 18).
        tower: hidden sizes of each task tower (paper: 360 × 200 × 80).
        dropout: dropout after each hidden layer.
        options: model-specific knobs (for example the number of experts).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "esmm"
    embedding_dim: int = Field(18, gt=0)
    tower: list[int] = Field(default_factory=lambda: [360, 200, 80])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    options: dict[str, float | int | str | list[int]] = Field(default_factory=dict)
