"""List and sequence features in a ranking request (see docs/features.md and docs/serving.md).

A list or sequence feature is given like a scalar one — in ``context`` (a user's history) or in
every candidate (an item's tags), a candidate's non-null value overriding the context's — as a
JSON array:

* elements: ids (a string of at most ``MAX_ID_CHARS`` characters or a 64-bit integer; ``3.0`` is
  the integer 3) or null (a missing element, masked out of the pooling); for a weighted list,
  objects ``{"id": <id>, "weight": <finite number ≥ 0>}``;
* at most the feature's ``max_len`` elements (the schema's length limit: a longer array is a 422
  naming the field; the service never truncates silently);
* null or ``[]``: an empty list.

Each column is checked as a set of element types and built as one polars list Series, which the
bundle's encoders flatten and encode like the training data (:mod:`mtrank.data.lists`).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np
import polars as pl

from mtrank.data.schema import ListFeature, SequenceFeature
from mtrank.serve.errors import Errors
from mtrank.serve.errors import error as _error

Feature = ListFeature | SequenceFeature


def list_columns(
    features: list[Feature],
    context: dict[str, Any],
    candidates: list[dict[str, Any]],
    errors: Errors,
    *,
    max_id_chars: int,
    int64: tuple[int, int],
) -> dict[str, pl.Series]:
    """One list Series per feature, one row per candidate (context filled in); problems are
    appended to ``errors`` (``loc`` naming ``context`` or ``candidates, i`` and the column) and
    the feature left out."""
    out: dict[str, pl.Series] = {}
    n = len(candidates)
    for f in features:
        col = f.column
        ctx = None
        if context.get(col) is not None:
            ctx = _column(f, [context[col]], errors, ["context", col], max_id_chars, int64)
            if ctx is None:
                continue
        if col in context:
            values = [c.get(col) for c in candidates]
        else:
            values = [c.get(col, _ABSENT) for c in candidates]
            bad = [i for i, v in enumerate(values) if v is _ABSENT]
            if bad:
                errors.first(
                    bad,
                    lambda i: _error(
                        ["candidates", i, col],
                        "Field required: give this list in `context` or in every candidate "
                        "(null or [] for an empty list)",
                        "missing",
                    ),
                )
                continue
        given = [i for i, v in enumerate(values) if v is not None]
        if ctx is not None and not given:
            out[col] = ctx.new_from_index(0, n).alias(col)
            continue
        series = _column(f, values, errors, None, max_id_chars, int64)
        if series is None:
            continue
        if ctx is not None and len(given) < n:
            if series.dtype != ctx.dtype:
                series, ctx = _as_strings(series), _as_strings(ctx)
            fill = ctx.new_from_index(0, n)
            series = pl.select(
                pl.when(series.is_null()).then(fill).otherwise(series).alias(col)
            ).to_series()
        out[col] = series
    return out


_ABSENT = object()


def _as_strings(s: pl.Series) -> pl.Series:
    inner = s.dtype.inner
    if isinstance(inner, pl.Struct):
        return s.list.eval(
            pl.struct(
                pl.element().struct.field("id").cast(pl.String).alias("id"),
                pl.element().struct.field("weight"),
            )
        )
    return s.cast(pl.List(pl.String))


def _column(
    f: Feature,
    values: list,
    errors: Errors,
    loc: list | None,
    max_id_chars: int,
    int64: tuple[int, int],
) -> pl.Series | None:
    col = f.column

    def where(i: int) -> list:
        return loc if loc is not None else ["candidates", i, col]

    kinds = set(map(type, values)) - {type(None)}
    if not kinds <= {list}:
        errors.first(
            (i for i, v in enumerate(values) if v is not None and type(v) is not list),
            lambda i: _error(where(i), "a list feature must be an array (or null)", "list_type"),
        )
        return None
    lengths = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))
    over = np.flatnonzero(lengths > f.max_len)
    if over.size:
        errors.first(
            over.tolist(),
            lambda i: _error(
                where(i),
                f"at most {f.max_len} elements (the schema's max_len of {col!r}), got "
                f"{int(lengths[i])}",
                "too_long",
            ),
        )
        return None
    flat = list(chain.from_iterable(v for v in values if v is not None))
    weighted = getattr(f, "weighted", False)
    weights = None

    def fail(expected: str, **kw) -> None:
        return _element_error(f, values, lengths, flat, errors, where, expected, **kw)

    if weighted:
        if not set(map(type, flat)) <= {dict}:
            return fail("an object {id, weight}")
        weights = [e.get("weight") for e in flat]
        wk = set(map(type, weights))
        w = (
            np.asarray(
                [x if type(x) in (int, float) else np.nan for x in weights], dtype=np.float64
            )
            if flat
            else np.zeros(0)
        )
        bad = not wk <= {int, float} or not (np.isfinite(w).all() and (w >= 0).all())
        if bad:
            return fail(
                "a weight that is a finite number ≥ 0",
                ok=lambda e: (
                    type(e.get("weight")) in (int, float)
                    and np.isfinite(e["weight"])
                    and e["weight"] >= 0
                ),
            )
        flat = [e.get("id") for e in flat]
    flat = [int(v) if type(v) is float and v.is_integer() and abs(v) < 2**53 else v for v in flat]
    ek = set(map(type, flat)) - {type(None)}

    def id_ok(v) -> bool:
        return (
            v is None
            or (type(v) is int and int64[0] <= v <= int64[1])
            or (type(v) is str and len(v) <= max_id_chars)
        )

    if not ek <= {int, str} or not all(map(id_ok, flat)):
        return fail(
            f"an id (a string of at most {max_id_chars} characters, a 64-bit integer) or null",
            ok=id_ok,
            ids=flat,
        )
    inner = pl.Int64 if ek == {int} else pl.String
    if inner == pl.String:
        flat = [str(v) if type(v) is int else v for v in flat]
    ids = pl.Series(col, flat, dtype=inner)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if weighted:
        elem = pl.DataFrame({"id": ids, "weight": pl.Series(w)}).to_struct(col)
    else:
        elem = ids
    series = _from_flat(elem, offsets, col)
    nulls = np.fromiter((v is None for v in values), bool, len(values))
    if nulls.any():
        series = pl.select(
            pl.when(pl.Series(nulls)).then(None).otherwise(series).alias(col)
        ).to_series()
    return series


def _from_flat(elements: pl.Series, offsets: np.ndarray, name: str) -> pl.Series:
    """A list Series from flat elements and int64 offsets ``[N + 1]`` (Arrow's layout)."""
    import pyarrow as pa

    arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), elements.to_arrow())
    return pl.Series(name, arr)


def _element_error(f, values, lengths, flat, errors, where, expected, ok=None, ids=None) -> None:
    """Append an error naming the first candidates whose list holds a bad element."""
    items = ids if ids is not None else flat
    good = np.fromiter(
        (bool(ok(e)) if ok is not None else type(e) is dict for e in items), bool, len(items)
    )
    rows = np.repeat(np.arange(len(values)), lengths)[~good]
    errors.first(
        np.unique(rows).tolist(),
        lambda i: _error(
            where(i), f"each element of list {f.column!r} must be {expected}", "list_item"
        ),
    )
    return None


def openapi_property(f: Feature, max_id_chars: int, int64: tuple[int, int]) -> dict:
    """The JSON Schema of one list/sequence feature's value in a request."""
    ident = {
        "anyOf": [
            {"type": "integer", "minimum": int64[0], "maximum": int64[1]},
            {"type": "string", "maxLength": max_id_chars},
            {"type": "null"},
        ]
    }
    item = ident
    if getattr(f, "weighted", False):
        item = {
            "type": "object",
            "properties": {"id": ident, "weight": {"type": "number", "minimum": 0}},
            "required": ["id", "weight"],
        }
    kind = "sequence (most recent first)" if isinstance(f, SequenceFeature) else "list"
    return {
        "anyOf": [{"type": "array", "maxItems": f.max_len, "items": item}, {"type": "null"}],
        "description": f"{kind} feature: at most {f.max_len} elements (more is a 422); null or "
        "[] = empty; a null element = missing",
    }
