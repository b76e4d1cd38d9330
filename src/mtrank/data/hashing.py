"""A stable hash for very large id spaces: the same id gets the same bucket in every process,
on every machine and in every release (never Python's salted ``hash()``).

The hash is 64-bit FNV-1a (Fowler–Noll–Vo) over the UTF-8 bytes of the canonical id string
(see :func:`mtrank.data.ids.canonical_ids`), vectorised over rows with numpy: one pass per
byte position, so the cost is O(rows × longest id) with no per-row Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from mtrank.data.ids import MISSING, canonical_ids

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a_64(values: pl.Series) -> np.ndarray:
    """FNV-1a 64 of each string (nulls hash like the empty string; callers mask them).

    Args:
        values: a string Series ``[N]``.

    Returns:
        uint64 ``[N]``.
    """
    arr = pa.array(values.fill_null("").to_arrow()).cast(pa.large_binary())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    data = (
        np.frombuffer(arr.buffers()[2], dtype=np.uint8)
        if arr.buffers()[2] is not None
        else np.zeros(0, np.uint8)
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(arr), FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max()) if len(arr) else 0):
            live = lengths > j
            byte = data[starts[live] + j].astype(np.uint64)
            h[live] = (h[live] ^ byte) * FNV_PRIME
    return h


@dataclass
class HashedCategoricalEncoder:
    """Categorical ids hashed into ``buckets`` embedding rows: index = 2 + FNV-1a(id) mod buckets.

    Index 0 stays "missing"; there is no out-of-vocabulary case (every id has a bucket, and
    distinct ids may share one). Use it when a vocabulary would not fit (``--hash-buckets``).
    """

    column: str
    buckets: int

    def __post_init__(self) -> None:
        if self.buckets < 1:
            from mtrank.errors import ConfigError

            raise ConfigError(f"hash_buckets of {self.column!r} must be ≥ 1, got {self.buckets}")

    @property
    def cardinality(self) -> int:
        """Embedding rows: ``buckets`` plus the 2 reserved indices."""
        return self.buckets + 2

    def transform(self, series: pl.Series) -> tuple[np.ndarray, int, int]:
        """Encode a column. Returns (indices int64 [N], n_missing, n_oov = 0)."""
        ids = canonical_ids(series)
        missing = ids.is_null().to_numpy()
        idx = (fnv1a_64(ids) % np.uint64(self.buckets)).astype(np.int64) + 2
        idx[missing] = MISSING
        return idx, int(missing.sum()), 0


def check_hash_columns(hash_buckets: dict[str, int] | None, categorical: list[str]) -> None:
    """Raise ConfigError if a hashed column is not one of the schema's categorical columns."""
    unknown = sorted(set(hash_buckets or {}) - set(categorical))
    if unknown:
        from mtrank.errors import ConfigError

        raise ConfigError(
            f"--hash-buckets names {unknown}, which are not categorical columns of the schema: "
            f"{categorical}"
        )
