"""Model configuration and the feature specification a model is built from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ListInput(BaseModel):
    """One list or sequence feature as the embedding layer sees it (see docs/features.md).

    Attributes:
        column: the feature's column. kind: ``list`` (own embedding rows, ``cardinality`` of
            them) or ``sequence`` (the rows of categorical field ``shares``, an index into
            :attr:`FeatureSpec.cardinalities`). weighted: a second ``[B, L]`` float32 tensor of
            element weights follows the ids. pooling: ``sum``, ``mean`` or ``attention``
            (sequences only: DIN target attention with the candidate's ``shares`` embedding).
    """

    model_config = ConfigDict(extra="forbid")

    column: str
    kind: Literal["list", "sequence"]
    cardinality: int = Field(0, ge=0)
    shares: int | None = Field(None, ge=0)
    weighted: bool = False
    pooling: Literal["sum", "mean", "attention"] = "mean"


class FeatureSpec(BaseModel):
    """What a model needs to know about its input: vocab sizes, numerical count, task names,
    and the list/sequence features whose tensors travel in the models' ``*extra`` slot."""

    model_config = ConfigDict(extra="forbid")

    cardinalities: list[int]
    n_numerical: int
    funnel: bool = True
    task_names: list[str] = Field(default_factory=list, description="plain (non-funnel) tasks")
    lists: list[ListInput] = Field(default_factory=list)
    stages: list[str] = Field(
        default_factory=list,
        description="stage names of a staged funnel (mtrank.data.funnel), empty otherwise",
    )
    parents: list[int] = Field(
        default_factory=list, description="index of each stage's `after` stage, -1: impression"
    )


def require_funnel(spec: FeatureSpec, model: str) -> None:
    """Raise ConfigError unless the data has the two-stage click → conversion funnel declared
    with ``click`` / ``conversion`` (two-stage models only; N-stage models read ``stages``)."""
    from mtrank.errors import ConfigError

    if spec.stages:
        raise ConfigError(
            f"{model} is a two-stage model (click → conversion) but the schema declares a "
            f"{len(spec.stages)}-stage funnel {spec.stages}: use esmm, esmm_ns, esmm_sb, "
            "esmm_mmoe, shared_bottom, mmoe, ple or aitm (esm2 on click → {cart, buy}), or declare "
            "two stages with click/conversion"
        )
    if not spec.funnel:
        raise ConfigError(f"{model} needs a funnel dataset (click and conversion labels)")


class ModelConfig(BaseModel):
    """Hyperparameters shared by the model zoo (defaults from the ESMM paper, §3.2).

    Attributes:
        name: registry name (``esmm``, ``base`` …).
        embedding_dim: embedding size per categorical field (paper: 18).
        tower: hidden sizes of each task tower (paper: 360 × 200 × 80).
        dropout: dropout after each hidden layer.
        options: model-specific knobs (for example the number of experts), as stored in a
            bundle; each model reads them through its typed ``Options`` (:func:`parse_options`),
            which rejects unknown keys.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "esmm"
    embedding_dim: int = Field(18, gt=0)
    tower: list[int] = Field(default_factory=lambda: [360, 200, 80])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    options: dict[str, float | int | str | list[int]] = Field(default_factory=dict)


class ModelOptions(BaseModel):
    """Base of a model's typed options (the class attribute ``Options`` of every model): each
    subclass declares its knobs with their types and defaults; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


def parse_options(options: type[ModelOptions], cfg: ModelConfig) -> ModelOptions:
    """``cfg.options`` validated by a model's ``Options`` class.

    Raises:
        ConfigError: an unknown option (the message lists the known ones) or a value of the
            wrong type, naming the model and the option.
    """
    from mtrank.errors import ConfigError

    try:
        return options.model_validate(cfg.options)
    except ValidationError as exc:
        known = sorted(options.model_fields)
        problems = []
        for e in exc.errors():
            key = ".".join(map(str, e["loc"]))
            if e["type"] == "extra_forbidden":
                problems.append(
                    f"unknown option {key!r} (options of {cfg.name!r}: {known or 'none'})"
                )
            else:
                problems.append(f"option {key!r}: {e['msg']}")
        raise ConfigError(f"model {cfg.name!r}: " + "; ".join(problems)) from None
