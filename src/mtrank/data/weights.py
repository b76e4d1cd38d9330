"""Sample weights: the schema's weight column, price (GMV) weights, and sampled negatives.

Every per-row weight of training and evaluation comes from here:

* the schema's ``weight`` column (finite, ≥ 0; validated by :func:`mtrank.data.io.validate_frame`
  and read into ``EncodedData.weight``) multiplies every task's per-row loss;
* price weights (``mtrank train --weight-by-price``, below) multiply it;
* negatives kept at rate r (the schema's ``negative_sampling``, or mtrank's own
  :func:`sample_negatives`) are not re-weighted in training (the model learns the sampled click
  odds and is corrected afterwards, :mod:`mtrank.models.calibration`); in evaluation on rows
  that are themselves sampled, :func:`evaluation_weights` gives each unclicked row 1/r, so the
  ``*_weighted`` metrics estimate those of the unsampled log.

Price weights, for GMV-oriented training:

A converted impression is worth its price, so the loss can lean toward valuable conversions:

    w = 1                                                    if the row did not convert
    w = 1 + min(log1p(price) / mean_log1p_price_conv, cap)   if it converted

where ``mean_log1p_price_conv`` is the mean of log1p(price) over the converted rows of the
*training* split (so a conversion at the typical price weighs about 2, and no row weighs more
than ``1 + cap``). log1p keeps a few very expensive items from dominating. The weight multiplies
every per-row loss term of the row (CTR and CTCVR alike; ESMM's CVR has no loss of its own), so
in practice it re-weights the clicked-and-converted rows of the CTCVR and CTR losses.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mtrank.data.schema import Schema, check_sampling_rate
from mtrank.errors import ConfigError, DataError


def mean_log_price(price, conversion) -> float:
    """Mean of log1p(price) over converted rows (the normaliser of :func:`price_weights`).

    Raises:
        DataError: no converted row, or a converted row whose price is missing, non-finite or
            negative (names the 1-based rows), or all converted prices are 0.
    """
    p = np.asarray(price, dtype=np.float64).ravel()
    c = np.asarray(conversion).ravel() > 0
    if not c.any():
        raise DataError(
            "--weight-by-price needs converted rows in the training split; there are none"
        )
    bad = c & ~(np.isfinite(p) & (p >= 0))
    if bad.any():
        rows = (np.flatnonzero(bad) + 1).tolist()
        raise DataError(
            "converted row(s) with a missing, non-finite or negative price; cannot weight by price",
            rows=rows[:10],
            count=len(rows),
        )
    mean = float(np.log1p(p[c]).mean())
    if mean <= 0:
        raise DataError("every converted row has price 0; cannot weight by price")
    return mean


def price_weights(
    price, conversion, *, cap: float = 3.0, mean_log: float | None = None
) -> np.ndarray:
    """float32 weights ``[N]`` (see the module docstring).

    Args:
        price: ``[N]`` prices (currency units; ints such as cents work). Ignored where not
            converted.
        conversion: ``[N]`` 0/1 labels.
        cap: the largest extra weight (> 0). mean_log: the normaliser; by default
            :func:`mean_log_price` of these rows (pass the training split's for other splits).

    Raises:
        ConfigError: cap ≤ 0. DataError: see :func:`mean_log_price`.
    """
    if not cap > 0:
        raise ConfigError(f"the price-weight cap must be > 0, got {cap}")
    p = np.asarray(price, dtype=np.float64).ravel()
    c = np.asarray(conversion).ravel() > 0
    if mean_log is None:
        mean_log = mean_log_price(p, c)
    safe = np.where(c & np.isfinite(p), np.maximum(p, 0.0), 0.0)
    extra = np.minimum(np.log1p(safe) / mean_log, cap)
    return np.where(c, 1.0 + extra, 1.0).astype(np.float32)


def combine(weight, extra: np.ndarray) -> np.ndarray:
    """``weight · extra`` (float32 ``[N]``); ``extra`` alone when ``weight`` is None."""
    extra = np.asarray(extra, dtype=np.float32)
    return extra if weight is None else (np.asarray(weight, dtype=np.float32) * extra)


def sample_negatives(df: pl.DataFrame, click: str, rate: float, seed: int) -> pl.DataFrame:
    """Keep every clicked row and each unclicked row with probability ``rate`` (one seeded
    Bernoulli draw per row, vectorised), in the original order.

    Raises:
        SchemaError: ``rate`` outside (0, 1].
    """
    rate = check_sampling_rate(rate, "training.negative_sampling_rate")
    if rate >= 1.0 or df.height == 0:
        return df
    u = np.random.default_rng([seed, 52_711]).random(df.height)
    keep = (df.get_column(click).to_numpy() > 0) | (u < rate)
    return df.filter(pl.Series(keep))


def evaluation_weights(schema: Schema, click, weight=None) -> np.ndarray | None:
    """Per-row evaluation weights ``[N]`` float64: the weight column (``weight``, or 1) times
    1/r on unclicked rows when the schema declares that the file's negatives were kept at rate r
    (``negative_sampling``), so weighted metrics estimate the unsampled log's. None when there
    is neither."""
    ns = schema.negative_sampling
    if ns is None or ns.rate >= 1.0:
        return None if weight is None else np.asarray(weight, dtype=np.float64)
    clicked = np.asarray(click).ravel() > 0
    w = np.where(clicked, 1.0, 1.0 / ns.rate)
    return w if weight is None else w * np.asarray(weight, dtype=np.float64)


__all__ = [
    "combine",
    "evaluation_weights",
    "mean_log_price",
    "price_weights",
    "sample_negatives",
]
