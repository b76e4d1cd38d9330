"""The HTTP side of score fusion: the pydantic model of a ``fusion`` object (the request field,
``--fusion`` files) and the batch-scoring column. The formulas themselves are the ranking
module's (:mod:`mtrank.ranking.fusion`): every formula there can be served, and a file written by
``mtrank fuse`` (:func:`~mtrank.ranking.fusion.save_fusion`) loads here as is.

The JSON accepted (``format`` and other keys such as metrics are ignored; absent params take the
formula class's defaults)::

    {"formula": "multiplicative", "params": {"alpha": 1.0, "beta": 1.0, "gamma": 0.5, "eps": 1e-6}}

``formula`` defaults to ``ctcvr`` (score = the model's pCTCVR). Parameters must be finite and
within the formula's :attr:`~mtrank.ranking.fusion.Fusion.limits` (e.g. ``eps > 0``).

Price policy (:func:`mtrank.ranking.fusion.usable_prices`, the same offline and here; for a
formula whose score depends on the price, :attr:`Fusion.uses_price`):

* ``price ≥ 0`` and finite: used as is (``price = 0`` gives a finite score).
* ``price < 0``, NaN, ±inf or null: invalid. The HTTP service rejects such a request with 422
  before scoring (:mod:`mtrank.serve.service`); batch scoring (``mtrank predict --fusion``,
  :func:`fused_scores`) writes a null score for that row. A non-finite score always ranks after
  every finite one (:func:`mtrank.ranking.replay.rank_order`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from mtrank.errors import ConfigError
from mtrank.ranking.fusion import (
    FORMULAS,
    Fusion,
    ctr_only_fusions,
    load_fusion,
    usable_prices,
)
from mtrank.serve.errors import json_type

FormulaName = Literal[tuple(FORMULAS)]  # type: ignore[valid-type]


class FusionSpec(BaseModel):
    """A fusion formula and its parameters, validated; :attr:`fusion` is the ranking
    :class:`~mtrank.ranking.fusion.Fusion` it builds (with :func:`make_fusion`).

    Attributes:
        formula: a name of :data:`mtrank.ranking.fusion.FORMULAS` (default ``ctcvr``).
        params: the formula's parameters; after validation, all of them (defaults filled in).
    """

    model_config = ConfigDict(extra="ignore")

    formula: FormulaName = "ctcvr"
    params: dict[str, Any] = Field(default_factory=dict)
    _fusion: Fusion = PrivateAttr()

    @field_validator("params", mode="before")
    @classmethod
    def _params_object(cls, v):
        return {} if v is None else v

    @model_validator(mode="after")
    def _build(self) -> FusionSpec:
        fusion, problems = build_fusion(self.formula, self.params)
        if problems:
            raise ValueError("; ".join(f"params.{k}: {msg}" for k, msg, _ in problems))
        self._fusion = fusion
        self.params = fusion.params
        return self

    @property
    def fusion(self) -> Fusion:
        """The ranking :class:`~mtrank.ranking.fusion.Fusion` this spec builds."""
        return self._fusion

    @property
    def needs_price(self) -> bool:
        """True when the score depends on the price."""
        return self._fusion.uses_price

    @classmethod
    def from_file(cls, path: str | Path) -> FusionSpec:
        """Read a fusion JSON file (as ``mtrank fuse`` writes it).

        Raises:
            ConfigError: the file is missing, not JSON, or not a valid fusion spec (the message
                names the file and the field).
        """
        fusion = load_fusion(path)  # the one loader of fusion files (mtrank.ranking.fusion)
        return cls(formula=fusion.name, params=fusion.params)


def build_fusion(formula: str, params: dict) -> tuple[Fusion | None, list[tuple[str, str, str]]]:
    """The fusion ``formula`` with ``params``, or None and one problem per offending parameter:
    ``(name, message, type)``, where type is ``extra_forbidden`` (not a parameter of the
    formula), ``float_type`` / ``string_type`` (strict JSON types: a number parameter takes a
    JSON number, never ``true`` or ``"2"``), ``finite_number``, or ``value_error`` (outside the
    formula's :attr:`~mtrank.ranking.fusion.Fusion.limits`). A message names a string value's
    type, never the value. ``formula`` must be a name of :data:`FORMULAS`."""
    cls = FORMULAS[formula]
    types = cls.param_types()
    names = ", ".join(sorted(types)) or "none"
    problems, values = [], {}
    for k, v in params.items():
        want = types.get(k)
        if want is None:
            problems.append(
                (k, f"not a parameter of {formula!r} (its parameters: {names})", "extra_forbidden")
            )
        elif want is float and type(v) in (int, float):
            try:
                values[k] = float(v)
            except OverflowError:
                problems.append((k, "must be a finite number", "finite_number"))
        elif want is float:
            problems.append((k, f"must be a number, got {json_type(v)}", "float_type"))
        elif want is str and type(v) is not str:
            problems.append((k, f"must be a string, got {json_type(v)}", "string_type"))
        else:
            values[k] = v
    fusion = cls(**values)  # the well-typed ones, range-checked whatever the others hold
    problems += [(k, msg, "value_error") for k, msg in fusion.problems() if k in values]
    return (None if problems else fusion), problems


def fused_scores(
    fusion: Fusion,
    p_ctr: np.ndarray,
    p_cvr: np.ndarray | None,
    p_ctcvr: np.ndarray | None,
    price: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, log_score, rank key), float64 ``[N]`` (see :meth:`Fusion.fused`), with the
    serving price policy: a row whose price is invalid (negative, NaN, ±inf) is NaN in all three.
    A formula that ignores pCVR (:attr:`Fusion.uses_cvr` false) never reads ``p_cvr`` /
    ``p_ctcvr`` (None or NaN for a CTR-only model).

    Raises:
        ConfigError: the formula needs a price and none is given.
    """
    valid = None
    if not fusion.uses_cvr:  # the score ignores pCVR (e.g. a CTR-only model's): never read it
        p_cvr, p_ctcvr = np.ones(np.shape(p_ctr)), None
    if fusion.uses_price:
        if price is None:
            raise ConfigError(f"fusion {fusion.name!r} {fusion.params} needs a price column")
        price = np.asarray(price, dtype=np.float64)
        valid = usable_prices(price)
        price = np.where(valid, price, 0.0)
    score, log_score = fusion.fused(p_ctr, p_cvr, price, p_ctcvr)
    if valid is not None:
        score, log_score = np.where(valid, score, np.nan), np.where(valid, log_score, np.nan)
    return score, log_score, fusion.rank_key(score, log_score)


def fused_score_column(
    fusion: Fusion, predictions: pl.DataFrame, table: pl.DataFrame, price_column: str | None
) -> pl.Series:
    """The fused ``score`` column (float64 ``[N]``, null where the price is invalid) for batch
    scoring: ``predictions`` holds ``p_ctr``, ``p_cvr``, ``p_ctcvr`` row for row with ``table``.

    Raises:
        ConfigError: the formula needs a price and the schema or the table has none.
    """
    price = None
    if fusion.uses_price:
        if price_column is None or price_column not in table.columns:
            raise ConfigError(
                f"fusion {fusion.name!r} {fusion.params} needs a price column, and "
                f"{'the schema declares none' if price_column is None else f'the data has no column {price_column!r}'}"  # noqa: E501
            )
        price = table.get_column(price_column).cast(pl.Float64, strict=False).to_numpy()
    if fusion.uses_cvr and "p_cvr" not in predictions.columns:
        raise ConfigError(
            f"fusion {fusion.name!r} {fusion.params} needs pCVR, which this model (CTR-only) "
            f"does not predict; {ctr_only_fusions()}"
        )
    p = {
        k: predictions.get_column(k).to_numpy() if k in predictions.columns else None
        for k in ("p_ctr", "p_cvr", "p_ctcvr")
    }
    score, _, _ = fused_scores(fusion, p["p_ctr"], p["p_cvr"], p["p_ctcvr"], price)
    return pl.Series("score", score).fill_nan(None)
