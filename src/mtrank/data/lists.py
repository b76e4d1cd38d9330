"""List and sequence features: parsing, checking and encoding multi-valued columns.

A list cell is a Parquet list (``list<int64|string>``, weighted ``list<struct<id, weight>>``) or a
delimited string (``"a|b|c"``, weighted ``"a:0.5|b:1"``); see :class:`~mtrank.data.schema.
ListFeature` and docs/features.md. Everything is columnar: the cells are flattened once through
Arrow's list offsets into one element column, encoded there by the ordinary categorical encoders
(:mod:`mtrank.data.encoders`: 0 = missing element, 1 = OOV), and scattered into a right-padded
``[N, L]`` matrix with numpy fancy indexing — no per-row Python.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from mtrank.data.ids import canonical_ids
from mtrank.data.schema import ListFeature, Schema, SequenceFeature
from mtrank.errors import DataError, DataWarning

Feature = ListFeature | SequenceFeature
# Separators a mis-declared delimited column most often holds instead of the declared one.
_OTHER_SEPS = ("|", ",", ";", "\t", " ", "#")
_MAX_ROWS = 10


@dataclass
class FlatList:
    """N list cells flattened: ``lengths`` int64 ``[N]`` (0 for a null or empty cell), ``ids``
    the ``lengths.sum()`` elements in row order (canonical ids, null = missing element) and, for a
    weighted list, ``weights`` float64 of the same length."""

    lengths: np.ndarray
    ids: pl.Series
    weights: np.ndarray | None = None

    def row_of_element(self) -> np.ndarray:
        """0-based row of every element, int64 ``[lengths.sum()]``."""
        return np.repeat(np.arange(self.lengths.size, dtype=np.int64), self.lengths)


def _where(rows: np.ndarray, row_numbers: np.ndarray | None) -> list[int]:
    """1-based file rows of 0-based positions (the ``__row`` column when there is one)."""
    rows = np.unique(rows)[:_MAX_ROWS]
    return (row_numbers[rows] if row_numbers is not None else rows + 1).tolist()


def flatten(
    series: pl.Series,
    feature: Feature,
    *,
    source: str | None = None,
    row_numbers: np.ndarray | None = None,
) -> FlatList:
    """Flatten one list column (see the module docstring) into a :class:`FlatList`.

    Args:
        series: the column as read (string, list or all-null).
        feature: its schema declaration.
        source: file (or request field) named in errors. row_numbers: 1-based row number of each
            cell for messages (default: position + 1).

    Raises:
        DataError: a column that is neither a list nor a string with ``sep``, list elements of
            the wrong type (nested lists, structs where ids are expected, bytes), a declared
            ``sep`` absent from every cell while another separator is present, a weight that is
            missing, not a number, not finite or negative — naming file, column and rows.
    """
    col = feature.column
    weighted = getattr(feature, "weighted", False)
    dtype = series.dtype
    if dtype == pl.Null:
        series = pl.Series(col, [None] * series.len(), dtype=pl.List(pl.String))
    elif dtype == pl.String:
        series = _split_strings(series, feature, source, row_numbers)
    elif not isinstance(dtype, pl.List | pl.Array):
        raise DataError(
            f"declared as a list but holds {dtype} values: give a Parquet list column or a "
            "string column with `sep`",
            file=source,
            column=col,
        )
    if isinstance(series.dtype, pl.Array):
        series = series.cast(pl.List(series.dtype.inner))
    arr = series.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    lengths = np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)
    flat = pl.Series(col, arr.flatten())
    inner = series.dtype.inner
    if weighted:
        return _weighted(flat, lengths, feature, source, row_numbers)
    if not (inner.is_integer() or inner.is_float() or inner in (pl.String, pl.Boolean, pl.Null)):
        _wrong_type(inner, lengths, feature, source, row_numbers)
    return FlatList(lengths, canonical_ids(flat) if flat.len() else flat.cast(pl.String))


def _wrong_type(inner, lengths, feature: Feature, source, row_numbers) -> None:
    rows = np.flatnonzero(lengths > 0)
    raise DataError(
        f"list elements must be ids (integers or strings), got {inner}"
        + (
            "; a weighted list needs `weighted: true` in the schema"
            if isinstance(inner, pl.Struct)
            else ""
        ),
        file=source,
        column=feature.column,
        rows=_where(rows, row_numbers),
        count=int(rows.size),
    )


def _split_strings(series: pl.Series, feature: Feature, source, row_numbers) -> pl.Series:
    """A delimited string column as ``list<string>`` (an empty or null cell is an empty list)."""
    sep = feature.sep
    if sep is None:
        raise DataError(
            "holds text but its schema entry declares no separator: set `sep` (for example "
            'sep: "|") or store it as a Parquet list column',
            file=source,
            column=feature.column,
        )
    text = series.str.strip_chars().replace("", None)
    present = text.is_not_null()
    has_sep = text.str.contains(sep, literal=True).fill_null(False)
    if present.any() and not has_sep.any():
        for other in _OTHER_SEPS:
            if other == sep:
                continue
            hit = text.str.contains(other, literal=True).fill_null(False).to_numpy()
            if hit.any():
                rows = np.flatnonzero(hit)
                raise DataError(
                    f"separator {sep!r} declared but absent from every cell, while "
                    f"{int(rows.size)} cell(s) hold {other!r} (e.g. {text[int(rows[0])]!r}): "
                    f"set `sep: {other!r}` if that is the separator",
                    file=source,
                    column=feature.column,
                    rows=_where(rows, row_numbers),
                    count=int(rows.size),
                )
    return text.str.split(sep).list.eval(pl.element().str.strip_chars())


def _weighted(flat: pl.Series, lengths, feature: ListFeature, source, row_numbers) -> FlatList:
    """Ids and weights of a weighted list's elements (``id:weight`` strings or structs)."""
    dtype = flat.dtype
    if isinstance(dtype, pl.Struct):
        names = [f.name for f in dtype.fields]
        if "id" not in names or "weight" not in names:
            raise DataError(
                f"weighted list elements must be structs with fields `id` and `weight`, got "
                f"fields {names}",
                file=source,
                column=feature.column,
            )
        ids = flat.struct.field("id")
        raw_w = flat.struct.field("weight")
        w = raw_w.cast(pl.Float64, strict=False)
        bad_type = raw_w.is_not_null() & w.is_null()
    elif dtype in (pl.String, pl.Null):
        parts = flat.cast(pl.String).str.split_exact(feature.weight_sep, 1)
        ids = parts.struct.field("field_0")
        raw_w = parts.struct.field("field_1").str.strip_chars()
        w = raw_w.cast(pl.Float64, strict=False)
        bad_type = raw_w.is_not_null() & w.is_null()
    else:
        _wrong_type(dtype, lengths, feature, source, row_numbers)
    present = canonical_ids(ids).is_not_null()
    wn = w.to_numpy()
    bad = (present & (w.is_null() | bad_type)).to_numpy() | (
        present.to_numpy() & ~(np.isfinite(np.nan_to_num(wn, nan=-1.0)) & (wn >= 0))
    )
    if bad.any():
        pos = np.flatnonzero(bad)
        rows = FlatList(lengths, ids).row_of_element()[pos]
        raise DataError(
            f"{int(pos.size)} list element weight(s) missing, not a number, not finite or "
            f"negative (e.g. element {flat[int(pos[0])]!r}); weights must be finite numbers ≥ 0",
            file=source,
            column=feature.column,
            rows=_where(rows, row_numbers),
            count=int(np.unique(rows).size),
        )
    return FlatList(lengths, canonical_ids(ids), np.nan_to_num(wn, nan=0.0))


def check_list_columns(df: pl.DataFrame, schema: Schema, source: str) -> None:
    """Validate every list and sequence column of a table at the boundary.

    Errors (:class:`DataError`) as in :func:`flatten`, and rows longer than ``max_len`` under
    ``on_overflow: error``. Warnings (:class:`DataWarning`, naming file, column, count and first
    rows): rows truncated to ``max_len``, and null or empty elements inside lists (kept as
    missing, masked out of the pooling). Nothing is dropped silently.
    """
    row_numbers = df.get_column("__row").to_numpy() if "__row" in df.columns else None
    for feature in [*schema.lists, *schema.sequences]:
        flat = flatten(
            df.get_column(feature.column), feature, source=source, row_numbers=row_numbers
        )
        over = np.flatnonzero(flat.lengths > feature.max_len)
        if over.size:
            msg = (
                f"{over.size} row(s) hold more than max_len={feature.max_len} elements "
                f"(longest {int(flat.lengths.max())})"
            )
            err = DataError(
                msg,
                file=source,
                column=feature.column,
                rows=_where(over, row_numbers),
                count=int(over.size),
            )
            if feature.on_overflow == "error":
                raise DataError(
                    msg + "; the schema says on_overflow: error (raise max_len, or use truncate)",
                    file=source,
                    column=feature.column,
                    rows=_where(over, row_numbers),
                    count=int(over.size),
                )
            warnings.warn(DataWarning(f"{err}; kept the first {feature.max_len}"), stacklevel=2)
        nulls = flat.ids.is_null().to_numpy()
        if nulls.any():
            rows = flat.row_of_element()[nulls]
            warnings.warn(
                DataWarning(
                    str(
                        DataError(
                            f"{int(nulls.sum())} null or empty element(s) inside lists, "
                            "encoded as missing (masked out of the pooling)",
                            file=source,
                            column=feature.column,
                            rows=_where(rows, row_numbers),
                            count=int(np.unique(rows).size),
                        )
                    )
                ),
                stacklevel=2,
            )


def pad(flat: FlatList, idx: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Scatter encoded elements ``idx`` into right-padded ``[N, L]`` int64 ids (and float32
    weights), keeping each row's first ``max_len``. Returns (ids, weights, rows truncated)."""
    n = flat.lengths.size
    width = int(min(max_len, max(1, int(flat.lengths.max(initial=0)))))
    starts = np.cumsum(flat.lengths) - flat.lengths
    row = flat.row_of_element()
    pos = np.arange(idx.size, dtype=np.int64) - np.repeat(starts, flat.lengths)
    keep = pos < width
    ids = np.zeros((n, width), dtype=np.int64)
    ids[row[keep], pos[keep]] = idx[keep]
    weights = None
    if flat.weights is not None:
        weights = np.zeros((n, width), dtype=np.float32)
        weights[row[keep], pos[keep]] = flat.weights[keep]
    return ids, weights, int((flat.lengths > max_len).sum())
