"""Score fusion for serving and batch scoring: one number per candidate from pCTR, pCVR, price.

Two formulas:

* ``ctcvr`` (the default): ``score = pCTCVR = pCTR · pCVR`` (ESMM's post-view conversion rate).
* ``multiplicative``: ``score = pCTR^α · pCVR^β · (price + ε)^γ``, computed in log space
  (``log_score = α·log pCTR + β·log pCVR + γ·log(price + ε)``) so that small probabilities and
  large exponents never underflow to 0 or overflow to inf before ranking.

Probabilities are clipped to ``[TINY, 1]`` (``TINY`` = the smallest normal float64) before the
log, so a probability of exactly 0 gives a very low but finite score, never ``-inf`` or NaN.

Price policy (``multiplicative`` with ``γ ≠ 0``):

* ``price ≥ 0`` and finite: used as is; ``price = 0`` gives ``(0 + ε)^γ``, finite because
  ``ε > 0`` is required.
* ``price < 0``, NaN, ±inf or null: invalid. The HTTP service rejects such a request with 422
  before scoring; batch scoring (``mtrank predict --fusion``) writes a null score for that row.
  A non-finite score always ranks after every finite one (:func:`rank_order`).

The JSON accepted is the one ``mtrank fuse`` writes (extra keys are ignored)::

    {"formula": "multiplicative", "params": {"alpha": 1.0, "beta": 1.0, "gamma": 0.5, "eps": 1e-6}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mtrank.errors import ConfigError

TINY = float(np.finfo(np.float64).tiny)  # ≈ 2.2e-308: log(TINY) ≈ -708, finite


class FusionParams(BaseModel):
    """Exponents of the multiplicative formula (ignored by ``ctcvr``).

    Attributes:
        alpha: exponent of pCTR (finite, ≥ 0). beta: exponent of pCVR (finite, ≥ 0).
        gamma: exponent of ``price + eps`` (finite; 0 ignores price). eps: price offset (> 0,
            finite), in the price's own currency unit.
    """

    model_config = ConfigDict(extra="ignore")

    alpha: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    beta: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    gamma: float = Field(1.0, ge=-100.0, le=100.0, allow_inf_nan=False)
    eps: float = Field(1e-6, gt=0.0, le=1e6, allow_inf_nan=False)


class FusionSpec(BaseModel):
    """A fusion formula and its parameters (the shape ``mtrank fuse`` writes; extra keys ignored).

    Attributes:
        formula: ``"ctcvr"`` (score = pCTCVR) or ``"multiplicative"``.
        params: :class:`FusionParams`.
    """

    model_config = ConfigDict(extra="ignore")

    formula: Literal["ctcvr", "multiplicative"] = "ctcvr"
    params: FusionParams = Field(default_factory=FusionParams)

    @field_validator("params", mode="before")
    @classmethod
    def _params_object(cls, v):
        return {} if v is None else v

    @property
    def needs_price(self) -> bool:
        """True when the score depends on the price (multiplicative with ``gamma ≠ 0``)."""
        return self.formula == "multiplicative" and self.params.gamma != 0.0

    @classmethod
    def from_file(cls, path: str | Path) -> FusionSpec:
        """Read a fusion JSON file.

        Raises:
            ConfigError: the file is missing, not JSON, or not a valid fusion spec (the message
                names the file and the field).
        """
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read fusion file {p}: {exc}") from None
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"fusion file {p}: {errs}") from None

    def log_scores(self, p_ctr: np.ndarray, p_cvr: np.ndarray, p_ctcvr: np.ndarray, price: np.ndarray | None = None) -> np.ndarray:
        """log of the fused score, float64 ``[N]``; finite for finite probabilities and valid prices.

        Args:
            p_ctr, p_cvr, p_ctcvr: probabilities ``[N]`` in [0, 1].
            price: ``[N]`` prices (currency units), needed when :attr:`needs_price`; an invalid
                price (negative, NaN, inf) gives NaN for that row (see the module's policy).

        Raises:
            ConfigError: the formula needs a price and none is given.
        """
        if self.formula == "ctcvr":
            return np.log(_clip(p_ctcvr))
        a, b, g = self.params.alpha, self.params.beta, self.params.gamma
        out = a * np.log(_clip(p_ctr)) + b * np.log(_clip(p_cvr))
        if g != 0.0:
            if price is None:
                raise ConfigError("the multiplicative fusion with gamma != 0 needs a price column")
            pr = np.asarray(price, dtype=np.float64)
            valid = np.isfinite(pr) & (pr >= 0)
            with np.errstate(invalid="ignore"):
                out = out + g * np.log(np.where(valid, pr, 0.0) + self.params.eps)
            out = np.where(valid, out, np.nan)
        return out

    def scores(self, p_ctr: np.ndarray, p_cvr: np.ndarray, p_ctcvr: np.ndarray, price: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Fused scores and their logs, both float64 ``[N]``.

        ``ctcvr`` returns ``p_ctcvr`` itself as the score; ``multiplicative`` returns
        ``exp(log_score)`` (which may underflow to 0 for extreme exponents: rank by
        ``log_score``, as :func:`rank_order` does). Rows with an invalid price are NaN in both.
        """
        log_score = self.log_scores(p_ctr, p_cvr, p_ctcvr, price)
        if self.formula == "ctcvr":
            score = np.asarray(p_ctcvr, dtype=np.float64).copy()
            score[~np.isfinite(log_score)] = np.nan
        else:
            score = np.exp(log_score)
        return score, log_score


def _clip(p: np.ndarray) -> np.ndarray:
    """Probabilities as float64 clipped to [TINY, 1]; NaN stays NaN (then ranks last)."""
    return np.clip(np.asarray(p, dtype=np.float64), TINY, 1.0)


def rank_order(log_score: np.ndarray) -> np.ndarray:
    """Candidate indices ``[N]`` (int64) best first: by ``log_score`` descending, ties by index
    ascending; non-finite scores (NaN, ±inf) come after every finite score, by index."""
    key = np.asarray(log_score, dtype=np.float64)
    finite = np.isfinite(key)
    idx = np.arange(key.shape[0])
    # np.lexsort: the last key is primary. Finite first, then higher score, then lower index.
    return np.lexsort((idx, -np.where(finite, key, 0.0), ~finite)).astype(np.int64)


def load_fusion(path: str | Path | None) -> FusionSpec:
    """The spec in ``path``, or the default (``ctcvr``) when ``path`` is None.

    Raises:
        ConfigError: see :meth:`FusionSpec.from_file`.
    """
    return FusionSpec() if path is None else FusionSpec.from_file(path)


def fused_score_column(spec: FusionSpec, predictions: pl.DataFrame, table: pl.DataFrame, price_column: str | None) -> pl.Series:
    """The fused ``score`` column (float64 ``[N]``, null where the price is invalid) for batch
    scoring: ``predictions`` holds ``p_ctr``, ``p_cvr``, ``p_ctcvr`` row for row with ``table``.

    Raises:
        ConfigError: the formula needs a price and the schema or the table has none.
    """
    price = None
    if spec.needs_price:
        if price_column is None or price_column not in table.columns:
            raise ConfigError(f"fusion {spec.formula!r} with gamma={spec.params.gamma} needs a price column, and {'the schema declares none' if price_column is None else f'the data has no column {price_column!r}'}")
        price = table.get_column(price_column).cast(pl.Float64, strict=False).to_numpy()
    p = {k: predictions.get_column(k).to_numpy() for k in ("p_ctr", "p_cvr", "p_ctcvr")}
    score, _ = spec.scores(p["p_ctr"], p["p_cvr"], p["p_ctcvr"], price)
    return pl.Series("score", score).fill_nan(None)
