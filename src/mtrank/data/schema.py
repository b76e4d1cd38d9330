"""Declared dataset schema: which columns are labels, ids, features, and how the funnel is built.

Everything downstream reads the schema, never hard-coded column names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtrank.data.funnel import FunnelStage, check_stages, stage_parents
from mtrank.documents import load_document
from mtrank.errors import SchemaError


class ListFeature(BaseModel):
    """A multi-valued categorical column (tags, a shop's categories, Ali-CCP's weighted fields).

    Stored as a Parquet list column (``list<int64>`` or ``list<string>``; weighted:
    ``list<struct<id, weight: double>>``) or as a delimited string with ``sep`` (weighted
    elements ``id:weight``, ``weight_sep`` between). Encoded per element with its own vocabulary
    (fitted on the training split only; 0 = missing element / padding, 1 = OOV), the first
    ``max_len`` elements kept, and pooled by ``sum`` or ``mean`` (weighted when ``weighted``)
    into one embedding of the model's size. See docs/features.md.
    """

    model_config = ConfigDict(extra="forbid")

    column: str
    sep: str | None = Field(None, min_length=1, description="separator of a string column")
    weighted: bool = False
    weight_sep: str = Field(":", min_length=1)
    max_len: int = Field(20, ge=1, le=10_000)
    pooling: Literal["sum", "mean"] = "mean"
    on_overflow: Literal["truncate", "error"] = "truncate"


class SequenceFeature(BaseModel):
    """An ordered id list, most recent first (a user's purchased items), that shares the embedding
    rows (and vocabulary) of the scalar categorical column ``shares`` (``item_id``).

    Same storage forms as :class:`ListFeature` (unweighted). Pooled by ``sum``, ``mean`` or
    ``attention``: DIN target attention of the candidate's ``shares`` embedding over the history,
    masked for padding (Zhou et al., KDD 2018, §4.3). See docs/features.md.
    """

    model_config = ConfigDict(extra="forbid")

    column: str
    shares: str
    sep: str | None = Field(None, min_length=1, description="separator of a string column")
    max_len: int = Field(50, ge=1, le=10_000)
    pooling: Literal["sum", "mean", "attention"] = "attention"
    on_overflow: Literal["truncate", "error"] = "truncate"


class NegativeSampling(BaseModel):
    """Unclicked impressions of the file were kept at ``rate`` r ∈ (0, 1] (clicked ones all
    kept). A model trained on such rows over-predicts pCTR; mtrank corrects it by the odds factor
    (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook", ADKDD 2014, §6.3):
    p = q·r / (q·r + 1 − q), see :mod:`mtrank.models.calibration`.
    """

    model_config = ConfigDict(extra="forbid")

    rate: float

    @model_validator(mode="after")
    def _check_rate(self) -> NegativeSampling:
        check_sampling_rate(self.rate, "negative_sampling.rate")
        return self


def check_sampling_rate(rate, where: str) -> float:
    """``rate`` as a float when it is a finite number in (0, 1].

    Raises:
        SchemaError: anything else, naming ``where`` (the schema key or option).
    """
    ok = isinstance(rate, int | float) and not isinstance(rate, bool) and 0 < rate <= 1
    if not ok:
        raise SchemaError(
            f"{where} must be a sampling rate in (0, 1] (the share of unclicked impressions "
            f"kept), got {rate!r}"
        )
    return float(rate)


class Schema(BaseModel):
    """A dataset's columns and their roles.

    Three kinds of dataset are supported:

    * **funnel** (impression → click → conversion): ``click`` and ``conversion`` are set.
      The tasks are CTR (click over all impressions), CVR (conversion over clicked impressions)
      and CTCVR (click ∧ conversion over all impressions), as in ESMM (Ma et al. 2018, §2).
    * **staged funnel** of any length: ``funnel`` lists stages (:class:`FunnelStage`), each
      conditional on its ``after`` stage, e.g. click → cart → buy; ``click`` alone (no
      ``conversion``) is the one-stage (CTR-only) funnel. Names of its labels, outputs and
      metrics: :mod:`mtrank.data.funnel`. ``click`` / ``conversion`` are then filled with the
      first / last stage's label column (they may be given, and must then agree).
    * **plain multi-task** (e.g. Census-Income for MMoE): ``tasks`` maps task names to binary
      label columns, with no funnel between them.

    Raises:
        SchemaError: a column has two roles (two labels in one column, a label that is also a
            feature, the price, an id, the time, the weight or the position), or no label is
            declared.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    click: str | None = None
    conversion: str | None = None
    funnel: list[FunnelStage] = Field(
        default_factory=list,
        description="Stages of a funnel of any length: [{stage, label, after}], first stage on "
        "the impression, each later one after the stage named by `after` (default: the previous).",
    )
    tasks: dict[str, str] = Field(default_factory=dict)
    price: str | None = None
    user_id: str | None = None
    item_id: str | None = None
    request_id: str | None = None
    time: str | None = None
    categorical: list[str] = Field(default_factory=list)
    numerical: list[str] = Field(default_factory=list)
    lists: list[ListFeature] = Field(default_factory=list)
    sequences: list[SequenceFeature] = Field(default_factory=list)
    weight: str | None = Field(
        None,
        description="sample-weight column (finite, ≥ 0): multiplies every task's per-row loss; "
        "evaluation also reports weighted metrics",
    )
    position: str | None = Field(
        None,
        description="logged position column (integer ≥ 0): trains a shallow position tower "
        "added to the CTR logit, dropped at serving (see mtrank.models.position)",
    )
    negative_sampling: NegativeSampling | None = Field(
        None, description="unclicked impressions were kept at this rate in the file"
    )
    price_unit: str | None = Field(
        None,
        description="unit of the price column as trained (e.g. 'EUR' or 'cents'); recorded in "
        "the bundle and shown by /metadata; mtrank never converts prices",
    )
    passthrough: list[str] = Field(
        default_factory=list,
        description="Columns carried into predictions but never used as features "
        "(for example the simulator's true_ctr / true_cvr).",
    )
    funnel_violations: Literal["error", "drop"] = "error"

    @model_validator(mode="after")
    def _check_roles(self) -> Schema:
        if self.funnel:
            self._fill_from_stages()
        elif self.conversion is not None and self.click is None:
            raise SchemaError("conversion: a `conversion` column needs a `click` column before it")
        if self.click is None and not self.tasks:
            raise SchemaError("the schema declares no label: set click/conversion, funnel or tasks")
        if self.click is not None and self.tasks:
            raise SchemaError("set either click/conversion or funnel (a funnel) or tasks, not both")
        self._check_label_columns()
        if not self.categorical and not self.numerical and not self.lists:
            raise SchemaError(
                "the schema declares no feature: list categorical or numerical columns"
            )
        features = self.categorical + self.numerical
        dup = sorted({c for c in features if features.count(c) > 1})
        if dup:
            raise SchemaError(f"categorical / numerical: feature columns listed twice: {dup}")
        for label in self.label_columns:
            if label in features:
                raise SchemaError(
                    f"label column {label!r} is also listed as a feature: that leaks the label"
                )
        for extra in self.passthrough:
            if extra in features:
                raise SchemaError(f"passthrough: column {extra!r} is also a feature")
        for role in ("weight", "position"):
            col = getattr(self, role)
            if col is not None and (col in features or col in self.label_columns):
                raise SchemaError(
                    f"{role}: column {col!r} is also a feature or a label; a {role} column is "
                    "used only in training (a position as a feature would be needed at serving)"
                )
        if self.negative_sampling is not None and not self.is_funnel:
            raise SchemaError(
                "negative_sampling: needs a funnel schema (click/conversion): the sampled "
                "negatives are unclicked impressions"
            )
        if self.position is not None and not self.is_funnel:
            raise SchemaError("position: needs a funnel schema: its tower adds to the CTR logit")
        self._check_list_kinds(features)
        return self

    def _check_label_columns(self) -> None:
        """Each label in its own column (click and conversion, two stages or two tasks naming one
        column), and no label column also the price, an id or the time column."""
        if self.funnel:
            keys = [f"funnel.{i}.label" for i in range(len(self.funnel))]
        elif self.click is not None:
            keys = ["click", "conversion"][: 1 + (self.conversion is not None)]
        else:
            keys = [f"tasks.{t}" for t in self.tasks]
        first: dict[str, str] = {}  # label column -> the key that named it first
        for key, col in zip(keys, self.label_columns, strict=True):
            if col in first:
                raise SchemaError(
                    f"{key}: the same column as {first[col]} ({col!r}); each label needs its "
                    "own column"
                )
            first[col] = key
        for role in ("price", "user_id", "item_id", "request_id", "time"):
            col = getattr(self, role)
            if col in first:
                raise SchemaError(
                    f"{role}: the same column as {first[col]} ({col!r}); a label column cannot "
                    f"also be the {role} column"
                )

    def _fill_from_stages(self) -> None:
        """Check a declared ``funnel`` and set click / conversion to its first / last label."""
        problems = check_stages(self.funnel)
        if problems:
            raise SchemaError("; ".join(problems))
        first, last = self.funnel[0].label, self.funnel[-1].label
        if self.click not in (None, first):
            raise SchemaError(
                f"click: {self.click!r}, but the funnel's first stage label is {first!r}"
            )
        want = last if len(self.funnel) > 1 else None
        if self.conversion not in (None, want):
            raise SchemaError(
                f"conversion: {self.conversion!r}, but the funnel's last stage label is {want!r}"
            )
        self.click, self.conversion = first, want

    def _check_list_kinds(self, features: list[str]) -> None:
        cols = self.list_columns
        dup = sorted({c for c in cols if cols.count(c) > 1 or c in features})
        if dup:
            raise SchemaError(f"list/sequence columns listed twice or also scalar: {dup}")
        for c in cols:
            if c in self.label_columns or c in self.passthrough:
                raise SchemaError(f"list/sequence column {c!r} is also a label or passthrough")
        for i, s in enumerate(self.sequences):
            if s.shares not in self.categorical:
                raise SchemaError(
                    f"sequences.{i}.shares: sequence {s.column!r} shares {s.shares!r}, which "
                    f"is not a categorical column of the schema (categorical: {self.categorical})"
                )

    @property
    def list_columns(self) -> list[str]:
        """List then sequence feature columns, in the order their tensors travel in a batch."""
        return [f.column for f in self.lists] + [f.column for f in self.sequences]

    @property
    def is_funnel(self) -> bool:
        """True when the schema has a click → conversion funnel (ESMM's data): the two-stage
        shorthand, or a declared funnel of ≥ 2 stages (click = first, conversion = last)."""
        return self.click is not None and self.conversion is not None

    @property
    def is_staged(self) -> bool:
        """True when labels, outputs and metrics are named per stage (:mod:`mtrank.data.funnel`):
        a declared ``funnel``, or ``click`` without ``conversion`` (one stage, CTR-only). The
        two-stage shorthand keeps its own names (``p_ctr``, ``p_cvr``, ``p_ctcvr``)."""
        return bool(self.funnel) or (self.click is not None and self.conversion is None)

    @property
    def stages(self) -> list[FunnelStage]:
        """The funnel's stages: the declared ones, ``click`` alone as one stage, or the
        two-stage shorthand as click → conversion; empty for plain tasks."""
        if self.funnel:
            return list(self.funnel)
        if self.click is None:
            return []
        out = [FunnelStage(stage="click", label=self.click)]
        if self.conversion is not None:
            out.append(FunnelStage(stage="conversion", label=self.conversion))
        return out

    @property
    def stage_names(self) -> list[str]:
        """Stage names of a staged schema (:attr:`is_staged`), else empty."""
        return [s.stage for s in self.stages] if self.is_staged else []

    @property
    def stage_parents(self) -> list[int]:
        """Index of each stage's ``after`` stage (-1: the impression), as :attr:`stage_names`."""
        return stage_parents(self.stages) if self.is_staged else []

    @property
    def label_columns(self) -> list[str]:
        """Every label column: the stages', click and conversion, or the plain tasks'."""
        if self.is_staged:
            return [s.label for s in self.stages]
        if self.is_funnel:
            return [self.click, self.conversion]  # type: ignore[list-item]
        return list(self.tasks.values())

    @property
    def label_names(self) -> list[str]:
        """Batch label keys: the stage names (staged), ``click``, ``conversion`` (funnel) or the
        task names."""
        if self.is_staged:
            return self.stage_names
        return ["click", "conversion"] if self.is_funnel else list(self.tasks)

    @property
    def feature_columns(self) -> list[str]:
        """Categorical then numerical feature columns, as the encoders order them."""
        return self.categorical + self.numerical

    @property
    def training_columns(self) -> list[str]:
        """The weight and position columns: needed to train and evaluate (like the labels),
        never to predict or serve."""
        return [c for c in (self.weight, self.position) if c is not None]

    def required_columns(self) -> list[str]:
        """Columns a file must hold to train or evaluate: the features, the labels, the id,
        price and time columns, the weight and position (predict and serve need neither labels
        nor :attr:`training_columns`)."""
        cols = self.label_columns + self.feature_columns + self.list_columns
        for c in (
            self.price,
            self.user_id,
            self.item_id,
            self.request_id,
            self.time,
            *self.training_columns,
        ):
            if c is not None and c not in cols:
                cols.append(c)
        return cols

    @classmethod
    def from_file(cls, path: str | Path) -> Schema:
        """Read a schema from YAML or JSON (``.json``).

        Raises:
            SchemaError: one line naming the file and the key or the line and column, e.g.
                ``schema s.yaml: funnel.1.after: unknown stage 'cartt' (stages: click, buy)``
                (:func:`mtrank.documents.load_document`).
        """
        return load_document(path, cls, "schema", SchemaError)
