"""Feature encoders fitted on the training split only and saved as JSON (no pickle).

Categorical ids map to a vocabulary with two reserved indices, so an unseen value at inference
never crashes and never aliases a real id:

* ``0`` = missing (null, NaN, empty string),
* ``1`` = out of vocabulary (unseen in training, or cut by ``min_count`` / ``max_size``),
* ``2 …`` = training values, most frequent first (ties by value, so fitting is deterministic).

A categorical column is encoded by a hash map of the vocabulary, built once per encoder (lazily,
on the first :meth:`CategoricalEncoder.transform`) and cached, looked up by ``map(dict.get)``
(a C loop); an integer column by a binary search in the sorted int64 ids. The same path serves
training, batch scoring and the HTTP service. Polars expression calls are kept off it: each costs
~0.1 ms of dispatch, more than the lookup of 200 values itself.

Numerical columns are imputed with the training mean (NaN, ±inf, empty) and standardised.
Their training range (the 0.1 % and 99.9 % quantiles, ``low`` / ``high``) is kept too, so that a
value far outside it (a price in cents sent to a model trained on prices in units) is counted,
never silently scored as if it were ordinary (:meth:`NumericalEncoder.out_of_range`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
import polars as pl
from pydantic import ValidationError

from mtrank.data.hashing import HashedCategoricalEncoder, check_hash_columns
from mtrank.data.ids import MISSING, N_RESERVED, OOV, canonical_ids
from mtrank.data.lists import Feature, flatten, pad
from mtrank.data.schema import ListFeature, Schema, SequenceFeature
from mtrank.errors import BundleError, DataError

_BLOCK = 1 << 16  # values turned into Python objects at once by a lookup (bounds its memory)


@dataclass
class CategoricalEncoder:
    """Vocabulary of one categorical column. ``values[i]`` has index ``i + 2``.

    The sorted lookup table is built on the first :meth:`transform` and cached on the instance
    (``values`` is not meant to change afterwards; :meth:`_lookup` rebuilds it if it does).
    """

    column: str
    values: list[str]
    _table: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _ints: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cardinality(self) -> int:
        """Embedding rows needed: the vocabulary plus the two reserved indices."""
        return len(self.values) + N_RESERVED

    @classmethod
    def fit(
        cls, series: pl.Series, min_count: int = 1, max_size: int | None = None
    ) -> CategoricalEncoder:
        """Fit a vocabulary on one column: ids seen at least ``min_count`` times, most frequent
        first, at most ``max_size``."""
        ids = canonical_ids(series).drop_nulls()
        counts = (
            ids.value_counts(name="n")
            .filter(pl.col("n") >= min_count)
            .sort(["n", ids.name], descending=[True, False])
        )
        values = counts.get_column(ids.name).to_list()
        if max_size is not None:
            values = values[:max_size]
        return cls(column=series.name, values=values)

    def _lookup(self) -> dict[str | None, int]:
        """Canonical id → index for the vocabulary, ``None`` and ``""`` → :data:`MISSING` (no
        vocabulary value is empty: fitting drops them): a hash map built once and cached
        (rebuilt if ``values`` is replaced or grows)."""
        if (
            self._table is None
            or self._table[0] is not self.values
            or self._table[1] != len(self.values)
        ):
            table: dict[str | None, int] = dict(
                zip(self.values, range(N_RESERVED, N_RESERVED + len(self.values)), strict=True)
            )
            table[None] = table[""] = MISSING
            self._table = (self.values, len(self.values), table)
        return self._table[2]

    def _int_table(self) -> dict[int | None, int]:
        """Integer id → index (the vocabulary values that are canonical integers, as
        :meth:`_int_lookup`), ``None`` → :data:`MISSING`: a hash map, cached."""
        table, index = self._int_lookup()
        if self._ints[4] is None:
            lookup: dict[int | None, int] = dict(zip(table.tolist(), index.tolist(), strict=True))
            lookup[None] = MISSING
            self._ints[4] = lookup
        return self._ints[4]

    def _int_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted int64 ids, their indices) for the vocabulary values that are canonical
        integers (``"42"``, ``"-7"``): an integer column is looked up without strings. Cached."""
        if (
            self._ints is None
            or self._ints[0] is not self.values
            or self._ints[1] != len(self.values)
        ):
            ids = pl.Series(self.values, dtype=pl.String).str.to_integer(strict=False)
            canon = ids.cast(pl.String) == pl.Series(self.values, dtype=pl.String)
            keep = canon.fill_null(False).to_numpy()
            pos = np.flatnonzero(keep)
            table = ids.to_numpy()[pos].astype(np.int64) if pos.size else np.zeros(0, np.int64)
            order = np.argsort(table, kind="stable")
            self._ints = [
                self.values,
                len(self.values),
                table[order],
                pos[order].astype(np.int64) + N_RESERVED,
                None,  # the hash map of _int_table, built when first asked
            ]
        return self._ints[2], self._ints[3]

    def _transform_ints(self, series: pl.Series) -> tuple[np.ndarray, int, int]:
        """:meth:`transform` of an integer column (see :meth:`encode_ints`)."""
        if series.null_count() == 0:  # the common case, without polars' expression dispatch
            return self.encode_ints(series.to_numpy().astype(np.int64, copy=False))
        missing = series.is_null().to_numpy()
        return self.encode_ints(series.cast(pl.Int64).fill_null(0).to_numpy(), missing)

    def encode_ints(
        self, ids: np.ndarray, missing: np.ndarray | None = None
    ) -> tuple[np.ndarray, int, int]:
        """Encode integer ids: the same indices as the string path (an integer's canonical id is
        its decimal string), by a binary search in the sorted int64 vocabulary ids.

        Args:
            ids: int64 ``[N]``. missing: bool ``[N]`` rows that are missing (their ``ids`` value
                is ignored), or None for none.

        Returns:
            (indices int64 ``[N]``, n_missing, n_oov).
        """
        table, index = self._int_lookup()
        x = np.asarray(ids, dtype=np.int64)
        if table.size:
            pos = np.minimum(np.searchsorted(table, x), table.size - 1)
            idx = np.where(table[pos] == x, index[pos], OOV)
        else:
            idx = np.full(x.size, OOV, dtype=np.int64)
        n_missing = 0
        if missing is not None:
            idx[missing] = MISSING
            n_missing = int(missing.sum())
        return idx.astype(np.int64, copy=False), n_missing, int((idx == OOV).sum())

    def lookup_list(self, ids: list, *, ints: bool = False) -> np.ndarray:
        """The indices (int64 ``[N]``) of :meth:`encode_list`, without its counts."""
        table = self._int_table() if ints else self._lookup()
        if len(ids) == 1:  # one value (a context feature): no iterator
            return np.array([table.get(ids[0], OOV)], dtype=np.int64)
        return np.fromiter(map(table.get, ids, repeat(OOV)), np.int64, len(ids))

    def encode_list(self, ids: list, *, ints: bool = False) -> tuple[np.ndarray, int, int]:
        """Encode ids given as a Python list by ``map(dict.get)`` over the cached vocabulary
        (:meth:`_lookup`, or :meth:`_int_table` for integers): a C loop, memory bounded by the
        input's own values (nothing is widened to the longest one).

        Args:
            ids: canonical string ids (stripped), or with ``ints`` Python integers; ``None``
                (and ``""``) = missing.

        Returns:
            (indices int64 ``[N]``, n_missing, n_oov).
        """
        idx = self.lookup_list(ids, ints=ints)
        return idx, int(np.count_nonzero(idx == MISSING)), int(np.count_nonzero(idx == OOV))

    def transform(self, series: pl.Series) -> tuple[np.ndarray, int, int]:
        """Encode a column. Returns (indices int64 [N], n_missing, n_oov).

        Canonical ids (:func:`canonical_ids`) are looked up in blocks of :data:`_BLOCK` values
        by :meth:`encode_list` (C loops, no Python per row). Memory is bounded by the input's
        own bytes per block: a 5 MB id is hashed once, nothing is widened to the longest value.
        A string column is only stripped (its empty values are missing, as
        :func:`canonical_ids` makes them), without the null-replacement pass. An integer column
        (up to 64 bits) takes an int64 binary search instead (:meth:`encode_ints`), with the
        same result."""
        if series.dtype.is_integer() and series.dtype != pl.UInt64:
            return self._transform_ints(series)
        canon = series.str.strip_chars() if series.dtype == pl.String else canonical_ids(series)
        idx = np.empty(canon.len(), dtype=np.int64)
        for start in range(0, canon.len(), _BLOCK):
            part = canon.slice(start, _BLOCK).to_list()
            idx[start : start + len(part)] = self.encode_list(part)[0]
        return idx, int((idx == MISSING).sum()), int((idx == OOV).sum())


RANGE_QUANTILES = (0.001, 0.999)  # the training range kept per numerical column
RANGE_MARGIN = 1.0  # "far outside": beyond the range by more than this many range widths


@dataclass
class NumericalEncoder:
    """Mean imputation and standardisation of one numerical column: ``(x - mean) / std``.

    ``low`` / ``high``: the training range (:data:`RANGE_QUANTILES` of the finite training
    values; None in encoders saved before it was kept).
    """

    column: str
    mean: float
    std: float
    low: float | None = field(default=None, compare=False)  # the range does not encode
    high: float | None = field(default=None, compare=False)

    @classmethod
    def fit(cls, series: pl.Series) -> NumericalEncoder:
        """Fit on one column: mean and standard deviation of its finite values (std 1 when
        constant), and their :data:`RANGE_QUANTILES`."""
        x = series.cast(pl.Float64, strict=False).to_numpy()
        x = x[np.isfinite(x)]
        mean = float(x.mean()) if x.size else 0.0
        std = float(x.std()) if x.size else 1.0
        if not math.isfinite(std) or std < 1e-12:
            std = 1.0
        low, high = (float(q) for q in np.quantile(x, RANGE_QUANTILES)) if x.size else (None, None)
        return cls(column=series.name, mean=mean, std=std, low=low, high=high)

    def out_of_range(self, values) -> np.ndarray:
        """bool ``[N]``: finite values far outside the training range, below ``low − m·w`` or
        above ``high + m·w`` (w = ``high − low``, or max(|high|, 1) for a constant column; m =
        :data:`RANGE_MARGIN`). All False when the range is unknown."""
        x = np.asarray(values, dtype=np.float64)
        if self.low is None or self.high is None:
            return np.zeros(x.shape, dtype=bool)
        width = self.high - self.low
        if width <= 0:
            width = max(abs(self.high), 1.0)
        with np.errstate(invalid="ignore"):
            return (x < self.low - RANGE_MARGIN * width) | (x > self.high + RANGE_MARGIN * width)

    def transform(self, series: pl.Series) -> tuple[np.ndarray, int]:
        """Encode a column. Returns (values float32 [N], n_imputed)."""
        return self.encode(series.cast(pl.Float64, strict=False).to_numpy())

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Impute non-finite values (NaN = missing) with the training mean and standardise.

        Args:
            values: float64 ``[N]`` (not modified).

        Returns:
            (values float32 ``[N]``, n_imputed).
        """
        x = np.array(values, dtype=np.float64, copy=True)
        bad = ~np.isfinite(x)
        x[bad] = self.mean
        return ((x - self.mean) / self.std).astype(np.float32), int(bad.sum())


@dataclass
class ListEncoder:
    """Encoder of one list or sequence feature.

    A list has its own vocabulary ``vocab`` (fitted on the training split only); a sequence has
    none and is encoded with the encoder of the column it ``shares``.
    """

    feature: Feature
    vocab: CategoricalEncoder | None = None

    @property
    def column(self) -> str:
        """The feature's column."""
        return self.feature.column

    @property
    def kind(self) -> str:
        """``list`` or ``sequence``."""
        return "sequence" if isinstance(self.feature, SequenceFeature) else "list"

    @property
    def weighted(self) -> bool:
        """True for a weighted list (a weights tensor follows the ids)."""
        return bool(getattr(self.feature, "weighted", False))

    @property
    def cardinality(self) -> int:
        """Embedding rows of its own vocabulary (0 for a sequence, which shares rows)."""
        return 0 if self.vocab is None else self.vocab.cardinality

    def input_fields(self, categorical: list[str]) -> dict:
        """The fields of the model's :class:`~mtrank.models.config.ListInput` for this feature
        (``categorical``: the schema's scalar categorical columns, to index ``shares``)."""
        shares = getattr(self.feature, "shares", None)
        return {
            "column": self.column,
            "kind": self.kind,
            "cardinality": self.cardinality,
            "shares": None if shares is None else categorical.index(shares),
            "weighted": self.weighted,
            "pooling": self.feature.pooling,
        }

    @classmethod
    def fit(
        cls, series: pl.Series, feature: Feature, min_count: int = 1, max_size: int | None = None
    ) -> ListEncoder:
        """Fit a list's vocabulary on its elements (training split); a sequence needs none."""
        if isinstance(feature, SequenceFeature):
            return cls(feature)
        ids = flatten(series, feature).ids.rename(feature.column)
        return cls(feature, CategoricalEncoder.fit(ids, min_count, max_size))

    def transform(
        self, series: pl.Series, shared: CategoricalEncoder | HashedCategoricalEncoder | None
    ) -> tuple[list[np.ndarray], int, int, int]:
        """Encode a column: (tensors, missing elements, OOV elements, truncated rows).

        ``tensors`` is ``[ids int64 [N, L]]`` (plus ``weights float32 [N, L]`` when weighted),
        right-padded with 0, ``L = min(max_len, longest row)`` (at least 1). ``shared`` is the
        encoder of the column a sequence shares (ignored for a list)."""
        flat = flatten(series, self.feature)
        enc = self.vocab if self.vocab is not None else shared
        if enc is None:
            raise DataError(
                f"sequence {self.column!r} needs the encoder of {self.feature.shares!r}"
            )
        idx, n_missing, n_oov = (
            enc.transform(flat.ids) if flat.ids.len() else (np.zeros(0, np.int64), 0, 0)
        )
        ids, weights, n_trunc = pad(flat, idx, self.feature.max_len)
        return ([ids] if weights is None else [ids, weights]), n_missing, n_oov, n_trunc

    def to_json(self) -> dict:
        """The entry of ``encoders.json``: kind, the schema declaration and the vocabulary."""
        doc = {"kind": self.kind, **self.feature.model_dump(mode="json")}
        if self.vocab is not None:
            doc["values"] = self.vocab.values
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> ListEncoder:
        """Rebuild from :meth:`to_json` (raises pydantic's ValidationError on a bad entry)."""
        doc = dict(doc)
        kind = doc.pop("kind")
        values = doc.pop("values", None)
        if kind == "sequence":
            return cls(SequenceFeature.model_validate(doc))
        feature = ListFeature.model_validate(doc)
        return cls(feature, CategoricalEncoder(feature.column, [str(v) for v in values or []]))


@dataclass(frozen=True)
class IntIds:
    """A categorical column given as Python integers (int64 range; None = missing), for
    :meth:`FeatureEncoder.transform_columns`: looked up as integers, with the same indices as
    their canonical strings."""

    ids: list

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EncodedFeatures:
    """Encoded features of N rows: ``categorical`` int64 [N, n_cat], ``numerical`` float32 [N,
    n_num]."""

    categorical: np.ndarray
    numerical: np.ndarray
    n_missing: dict[str, int]
    n_oov: dict[str, int]
    extra: list[np.ndarray] = field(default_factory=list)  # list/sequence tensors, see lists.py
    n_truncated: dict[str, int] = field(default_factory=dict)


@dataclass
class FeatureEncoder:
    """All encoders of a schema's features, in the schema's feature order."""

    categorical: list[CategoricalEncoder | HashedCategoricalEncoder]
    numerical: list[NumericalEncoder]
    lists: list = field(default_factory=list)  # ListEncoder per list, then per sequence feature

    @classmethod
    def fit(
        cls,
        df: pl.DataFrame,
        schema: Schema,
        min_count: int = 1,
        max_size: int | None = None,
        hash_buckets: dict[str, int] | None = None,
    ) -> FeatureEncoder:
        """Fit on the training split only."""
        check_hash_columns(hash_buckets, schema.categorical)
        return cls(
            lists=[
                ListEncoder.fit(df.get_column(f.column), f, min_count, max_size)
                for f in [*schema.lists, *schema.sequences]
            ],
            categorical=[
                HashedCategoricalEncoder(c, hash_buckets[c])
                if hash_buckets and c in hash_buckets
                else CategoricalEncoder.fit(df.get_column(c), min_count, max_size)
                for c in schema.categorical
            ],
            numerical=[NumericalEncoder.fit(df.get_column(c)) for c in schema.numerical],
        )

    @property
    def cardinalities(self) -> list[int]:
        """Embedding rows per categorical field (vocabulary or hash buckets plus the 2 reserved)."""
        return [e.cardinality for e in self.categorical]

    @property
    def extra_names(self) -> list[str]:
        """Names of the list/sequence tensors in batch order: ``<column>`` (ids) and, for a
        weighted list, ``<column>.weight``."""
        names = []
        for e in self.lists:
            names += [e.column, *([f"{e.column}.weight"] if e.weighted else [])]
        return names

    def transform(self, df: pl.DataFrame) -> EncodedFeatures:
        """Encode a table by column name (column order in the table does not matter)."""
        n = df.height
        cat = np.zeros((n, len(self.categorical)), dtype=np.int64)
        num = np.zeros((n, len(self.numerical)), dtype=np.float32)
        n_missing: dict[str, int] = {}
        n_oov: dict[str, int] = {}
        for j, enc in enumerate(self.categorical):
            cat[:, j], n_missing[enc.column], n_oov[enc.column] = enc.transform(
                df.get_column(enc.column)
            )
        for j, enc in enumerate(self.numerical):
            num[:, j], n_missing[enc.column] = enc.transform(df.get_column(enc.column))
        out = EncodedFeatures(cat, num, n_missing, n_oov)
        if self.lists:
            self._transform_lists(df, out)
        return out

    def transform_columns(
        self, columns: Mapping[str, IntIds | np.ndarray | list | pl.Series], n: int
    ) -> EncodedFeatures:
        """Encode already-validated columns without building a table: the same result as
        :meth:`transform` on the same values (the HTTP service's fast path). Scalar features
        only (a schema with list/sequence features goes through :meth:`transform`).

        Args:
            columns: per feature column, of length ``n``: a categorical one as a list of
                canonical string ids (stripped; None or ``""`` = missing), :class:`IntIds`
                (Python integers in the int64 range; None = missing) or a Series; a numerical
                one as float64 ``[N]`` (NaN = missing). A categorical column of length 1
                stands for its value in every row (encoded once).
            n: rows.

        Raises:
            KeyError: a feature column is not in ``columns``.
        """
        by_column = np.empty((len(self.categorical), n), dtype=np.int64)  # one row per column
        for j, enc in enumerate(self.categorical):
            values = columns[enc.column]
            ints = type(values) is IntIds
            if ints:
                values = values.ids
            if type(enc) is CategoricalEncoder and type(values) is list:
                by_column[j] = enc.lookup_list(values, ints=ints)  # one value: every row
            else:
                by_column[j] = enc.transform(pl.Series(enc.column, values))[0]
        names = [e.column for e in self.categorical]
        n_missing = dict(zip(names, np.count_nonzero(by_column == MISSING, axis=1).tolist()))
        n_oov = dict(zip(names, np.count_nonzero(by_column == OOV, axis=1).tolist()))
        cat = np.ascontiguousarray(by_column.T)
        num = np.zeros((n, len(self.numerical)), dtype=np.float32)
        for j, enc in enumerate(self.numerical):
            num[:, j], n_missing[enc.column] = enc.encode(columns[enc.column])
        return EncodedFeatures(cat, num, n_missing, n_oov)

    def _transform_lists(self, df: pl.DataFrame, out: EncodedFeatures) -> None:
        """Append the list/sequence tensors (:mod:`mtrank.data.lists`) and their counts."""
        by_column = {e.column: e for e in self.categorical}
        for enc in self.lists:
            shared = by_column.get(getattr(enc.feature, "shares", None))
            tensors, n_miss, n_oov, n_trunc = enc.transform(df.get_column(enc.column), shared)
            out.extra.extend(tensors)
            out.n_missing[enc.column], out.n_oov[enc.column] = n_miss, n_oov
            out.n_truncated[enc.column] = n_trunc

    def out_of_range_counts(self, df: pl.DataFrame | Mapping[str, np.ndarray]) -> dict[str, int]:
        """Per numerical column of ``df`` (a table, or float64 ``[N]`` columns by name), the
        values far outside the training range (:meth:`NumericalEncoder.out_of_range`); a column
        absent from ``df`` counts 0."""
        out = {}
        for e in self.numerical:
            if e.column not in df:
                out[e.column] = 0
                continue
            x = df[e.column]
            if isinstance(x, pl.Series):
                x = x.cast(pl.Float64, strict=False).to_numpy()
            out[e.column] = int(e.out_of_range(x).sum())
        return out

    def to_json(self) -> dict:
        """The JSON document a bundle stores as ``encoders.json`` (see :meth:`from_json`)."""
        return {
            "format": "mtrank.encoders/1",
            "categorical": [
                {"column": e.column, "hash_buckets": e.buckets}
                if isinstance(e, HashedCategoricalEncoder)
                else {"column": e.column, "values": e.values}
                for e in self.categorical
            ],
            "numerical": [
                {
                    "column": e.column,
                    "mean": e.mean,
                    "std": e.std,
                    **({} if e.low is None else {"low": e.low, "high": e.high}),
                }
                for e in self.numerical
            ],
            **({"lists": [e.to_json() for e in self.lists]} if self.lists else {}),
        }

    @classmethod
    def from_json(cls, obj: dict) -> FeatureEncoder:
        """Rebuild from :meth:`to_json` output. Raises BundleError on a malformed document."""
        try:
            if obj.get("format") != "mtrank.encoders/1":
                raise BundleError(f"unknown encoders format {obj.get('format')!r}")
            cats = [
                HashedCategoricalEncoder(str(e["column"]), int(e["hash_buckets"]))
                if "hash_buckets" in e
                else CategoricalEncoder(str(e["column"]), [str(v) for v in e["values"]])
                for e in obj["categorical"]
            ]
            nums = [
                NumericalEncoder(
                    str(e["column"]),
                    float(e["mean"]),
                    float(e["std"]),
                    None if e.get("low") is None else float(e["low"]),
                    None if e.get("high") is None else float(e["high"]),
                )
                for e in obj["numerical"]
            ]
            lists = [ListEncoder.from_json(e) for e in obj.get("lists", [])]
        except (KeyError, TypeError, AttributeError, ValidationError) as exc:
            raise BundleError(f"malformed encoders document: {exc!r}") from None
        for e in nums:
            if not (math.isfinite(e.mean) and math.isfinite(e.std) and e.std > 0):
                raise BundleError(f"encoder of {e.column!r} has invalid mean/std")
            if (e.low is None) != (e.high is None) or (
                e.low is not None
                and not (math.isfinite(e.low) and math.isfinite(e.high) and e.low <= e.high)
            ):
                raise BundleError(f"encoder of {e.column!r} has an invalid low/high range")
        return cls(cats, nums, lists)
