"""Low-latency categorical lookup for serving, bit-identical to the training encoders.

:meth:`mtrank.data.encoders.CategoricalEncoder.transform` rebuilds a hash map of the whole
vocabulary on every call (``replace_strict``), about 0.6 ms per 3,000-value column whatever the
number of rows: fine for a batch of a million rows, most of the latency budget for a request of 200
candidates. Here the vocabulary is sorted once at load time and each request does a vectorised
binary search (``numpy.searchsorted``), about 0.05 ms per column.

The canonicalisation (:func:`~mtrank.data.encoders.canonical_ids`), the reserved indices
(0 = missing, 1 = OOV) and the feature order are the training encoder's own; tests check that both
give identical indices and counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from mtrank.data.encoders import MISSING, N_RESERVED, OOV, CategoricalEncoder, FeatureEncoder, canonical_ids


@dataclass
class SortedCategoricalEncoder(CategoricalEncoder):
    """A :class:`CategoricalEncoder` whose ``transform`` uses a pre-sorted vocabulary.

    Values containing a NUL character (which numpy's fixed-width strings would strip) fall back
    to the parent's exact lookup.
    """

    _sorted: np.ndarray = field(init=False, repr=False)
    _index: np.ndarray = field(init=False, repr=False)
    _exact_only: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        vocab = np.asarray(self.values, dtype=str) if self.values else np.zeros(0, dtype="<U1")
        order = np.argsort(vocab, kind="stable")
        self._sorted = vocab[order]
        self._index = order.astype(np.int64) + N_RESERVED
        self._exact_only = any("\x00" in v for v in self.values)

    def transform(self, series: pl.Series) -> tuple[np.ndarray, int, int]:
        """Encode a column. Returns (indices int64 [N], n_missing, n_oov), as the parent."""
        ids = canonical_ids(series)
        missing = ids.is_null().to_numpy()
        if self._exact_only or not self.values or bool(ids.str.contains("\x00", literal=True).any()):
            return super().transform(series)
        query = np.asarray(ids.fill_null("").to_numpy(), dtype=str)
        pos = np.minimum(np.searchsorted(self._sorted, query), len(self._sorted) - 1)
        hit = self._sorted[pos] == query
        idx = np.where(hit, self._index[pos], OOV)
        idx[missing] = MISSING
        return idx.astype(np.int64, copy=False), int(missing.sum()), int((idx == OOV).sum())


def serving_encoder(encoder: FeatureEncoder) -> FeatureEncoder:
    """The same encoder (same vocabularies, statistics and feature order) with fast lookups."""
    return FeatureEncoder(
        categorical=[SortedCategoricalEncoder(e.column, e.values) for e in encoder.categorical],
        numerical=list(encoder.numerical),
    )
