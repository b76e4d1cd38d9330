"""Declared dataset schema: which columns are labels, ids, features, and how the funnel is built.

Everything downstream reads the schema, never hard-coded column names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class Schema(BaseModel):
    """A dataset's columns and their roles.

    Two kinds of dataset are supported:

    * **funnel** (impression → click → conversion): ``click`` and ``conversion`` are set.
      The tasks are CTR (click over all impressions), CVR (conversion over clicked impressions)
      and CTCVR (click ∧ conversion over all impressions), as in ESMM (Ma et al. 2018, §2).
    * **plain multi-task** (e.g. Census-Income for MMoE): ``tasks`` maps task names to binary
      label columns, with no funnel between them.

    Raises:
        SchemaError: a column has two roles, a label is also a feature, or no label is declared.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    click: str | None = None
    conversion: str | None = None
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
    passthrough: list[str] = Field(
        default_factory=list,
        description="Columns carried into predictions but never used as features "
        "(for example the simulator's true_ctr / true_cvr).",
    )
    funnel_violations: Literal["error", "drop"] = "error"

    @model_validator(mode="after")
    def _check_roles(self) -> Schema:
        if (self.click is None) != (self.conversion is None):
            raise SchemaError("a funnel schema needs both `click` and `conversion` columns")
        if self.click is None and not self.tasks:
            raise SchemaError("the schema declares no label: set click/conversion or tasks")
        if self.click is not None and self.tasks:
            raise SchemaError("set either click/conversion (a funnel) or tasks, not both")
        if not self.categorical and not self.numerical and not self.lists:
            raise SchemaError(
                "the schema declares no feature: list categorical or numerical columns"
            )
        features = self.categorical + self.numerical
        dup = sorted({c for c in features if features.count(c) > 1})
        if dup:
            raise SchemaError(f"feature columns listed twice: {dup}")
        for label in self.label_columns:
            if label in features:
                raise SchemaError(
                    f"label column {label!r} is also listed as a feature: that leaks the label"
                )
        for extra in self.passthrough:
            if extra in features:
                raise SchemaError(f"passthrough column {extra!r} is also a feature")
        self._check_list_kinds(features)
        return self

    def _check_list_kinds(self, features: list[str]) -> None:
        cols = self.list_columns
        dup = sorted({c for c in cols if cols.count(c) > 1 or c in features})
        if dup:
            raise SchemaError(f"list/sequence columns listed twice or also scalar: {dup}")
        for c in cols:
            if c in self.label_columns or c in self.passthrough:
                raise SchemaError(f"list/sequence column {c!r} is also a label or passthrough")
        for s in self.sequences:
            if s.shares not in self.categorical:
                raise SchemaError(
                    f"sequence {s.column!r} shares {s.shares!r}, which is not a categorical "
                    f"column of the schema (categorical: {self.categorical})"
                )

    @property
    def list_columns(self) -> list[str]:
        """List then sequence feature columns, in the order their tensors travel in a batch."""
        return [f.column for f in self.lists] + [f.column for f in self.sequences]

    @property
    def is_funnel(self) -> bool:
        """True when the schema has a click → conversion funnel (ESMM's data)."""
        return self.click is not None

    @property
    def label_columns(self) -> list[str]:
        """Every label column: click and conversion, or the plain tasks' columns."""
        if self.is_funnel:
            return [self.click, self.conversion]  # type: ignore[list-item]
        return list(self.tasks.values())

    @property
    def label_names(self) -> list[str]:
        """Batch label keys: ``click``, ``conversion`` (funnel) or the task names."""
        return ["click", "conversion"] if self.is_funnel else list(self.tasks)

    @property
    def feature_columns(self) -> list[str]:
        """Categorical then numerical feature columns, as the encoders order them."""
        return self.categorical + self.numerical

    def required_columns(self) -> list[str]:
        """Columns a file must hold: the features and the labels."""
        cols = self.label_columns + self.feature_columns + self.list_columns
        for c in (self.price, self.user_id, self.item_id, self.request_id, self.time):
            if c is not None and c not in cols:
                cols.append(c)
        return cols

    @classmethod
    def from_file(cls, path: str | Path) -> Schema:
        """Read a schema from YAML or JSON. Raises SchemaError naming the file."""
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SchemaError(f"cannot read schema file {p}: {exc}") from None
        if not isinstance(raw, dict):
            raise SchemaError(f"schema file {p} must hold a mapping of fields")
        try:
            return cls.model_validate(raw)
        except SchemaError:
            raise
        except ValueError as exc:
            raise SchemaError(f"schema file {p}: {exc}") from None
