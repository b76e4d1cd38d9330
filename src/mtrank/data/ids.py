"""Canonical categorical ids and the reserved indices, shared by vocabularies
(:mod:`mtrank.data.encoders`) and hashing (:mod:`mtrank.data.hashing`)."""

from __future__ import annotations

import polars as pl

MISSING = 0
OOV = 1
N_RESERVED = 2


def canonical_ids(series: pl.Series) -> pl.Series:
    """Categorical values as canonical strings, null where missing.

    Integral floats (``3.0``, as a column with a NaN is read) become ``"3"`` so that the same id
    read as int in one file and float in another maps to the same index; NaN and empty strings
    become null. Vectorised (polars expressions), no per-row Python.
    """
    dtype = series.dtype
    if dtype.is_float():
        s = series.fill_nan(None)
        finite = s.drop_nulls()
        integral = finite.len() == 0 or (
            bool((finite == finite.round(0)).all()) and finite.abs().max() < 2**53
        )
        if integral:
            return s.cast(pl.Int64, strict=False).cast(pl.String)
        return s.cast(pl.String)
    if dtype == pl.Boolean:
        return series.cast(pl.Int8).cast(pl.String)
    if dtype == pl.String:
        return series.str.strip_chars().replace("", None)
    return series.cast(pl.String)
