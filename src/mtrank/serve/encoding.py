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

from mtrank.data.encoders import (
    MISSING,
    N_RESERVED,
    OOV,
    CategoricalEncoder,
    FeatureEncoder,
    canonical_ids,
)

_END = "\x01"  # appended to every string: numpy's fixed-width strings drop trailing NULs


@dataclass
class SortedCategoricalEncoder(CategoricalEncoder):
    """A :class:`CategoricalEncoder` whose ``transform`` uses a pre-sorted vocabulary.

    Every value gets a ``"\\x01"`` suffix before it becomes a fixed-width numpy string, so a
    value ending in NUL (which numpy would strip) never matches another one.
    """

    _sorted: np.ndarray = field(init=False, repr=False)
    _index: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        vocab = np.asarray([v + _END for v in self.values] or [_END], dtype=str)
        order = np.argsort(vocab, kind="stable")
        self._sorted = vocab[order]
        self._index = order.astype(np.int64) + N_RESERVED
        if not self.values:  # the placeholder matches nothing real: "" is never a value
            self._index[:] = OOV

    def transform(self, series: pl.Series) -> tuple[np.ndarray, int, int]:
        """Encode a column. Returns (indices int64 [N], n_missing, n_oov), as the parent."""
        ids = canonical_ids(series).to_numpy()  # object array of str, None where missing
        missing = np.equal(ids, None)
        query = (np.where(missing, "", ids) + _END).astype(str)
        pos = np.minimum(np.searchsorted(self._sorted, query), len(self._sorted) - 1)
        idx = np.where(self._sorted[pos] == query, self._index[pos], OOV)
        idx[missing] = MISSING
        return idx.astype(np.int64, copy=False), int(missing.sum()), int((idx == OOV).sum())


def serving_encoder(encoder: FeatureEncoder) -> FeatureEncoder:
    """The same encoder (same vocabularies, statistics and feature order) with fast lookups."""
    return FeatureEncoder(
        categorical=[SortedCategoricalEncoder(e.column, e.values) for e in encoder.categorical],
        numerical=list(encoder.numerical),
    )
