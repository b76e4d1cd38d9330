"""Streaming input: train and evaluate from Parquet (or CSV) files without loading them whole.

Files are split into *pieces* (Parquet row groups; a CSV file is one piece). Each epoch the
pieces are visited in a seeded random order; each piece is read by pyarrow, validated against
the schema (errors name the file and its own row numbers), encoded into tensors, and poured
into a shuffle buffer from which batches are drawn. A background thread reads the next piece
while the current one trains (pyarrow and polars release the GIL). Memory is bounded by the
buffer and one piece, whatever the number of rows.

Under data parallelism each rank takes every ``world_size``-th piece.
"""

from __future__ import annotations

import copy
import glob
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch

from mtrank.data.batch import Batch, EncodedData
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.hashing import HashedCategoricalEncoder, check_hash_columns
from mtrank.data.io import ROW, read_table, validate_frame
from mtrank.data.schema import Schema
from mtrank.errors import DataError


def expand_paths(spec: str | Path | list) -> list[Path]:
    """A file, a directory (its ``*.parquet`` / ``*.csv`` files), a glob, or a list of those.

    Raises:
        DataError: nothing matches.
    """
    specs = spec if isinstance(spec, list) else [spec]
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.suffix in {".parquet", ".pq", ".csv", ".gz"} and not x.name.startswith("."))
        elif any(ch in str(s) for ch in "*?["):
            out += sorted(Path(x) for x in glob.glob(str(s)))
        else:
            out.append(p)
    if not out:
        raise DataError(f"no data files found for {spec}")
    for p in out:
        if not p.exists():
            raise DataError("file does not exist", file=str(p))
    return out


@dataclass(frozen=True)
class Piece:
    """A unit of reading: a Parquet row group (with its first row number), or a whole CSV."""

    path: Path
    row_group: int | None
    first_row: int
    rows: int


def list_pieces(paths: list[Path]) -> list[Piece]:
    """The Parquet pieces (files, row groups) of ``paths``, in order."""
    pieces: list[Piece] = []
    for p in paths:
        if p.suffix in {".parquet", ".pq"}:
            meta = pq.ParquetFile(p).metadata
            first = 1
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                pieces.append(Piece(p, i, first, n))
                first += n
        else:
            pieces.append(Piece(p, None, 1, -1))
    return pieces


def read_piece(piece: Piece, schema: Schema, *, require_labels: bool = True) -> pl.DataFrame:
    """Read and validate one piece; ``__row`` holds row numbers within its file."""
    if piece.row_group is None:
        df = read_table(piece.path)
    else:
        cols = [c for c in dict.fromkeys(schema.required_columns() + schema.passthrough)]
        available = pq.ParquetFile(piece.path).schema_arrow.names
        table = pq.ParquetFile(piece.path).read_row_group(piece.row_group, columns=[c for c in cols if c in available])
        df = pl.from_arrow(table).with_row_index(ROW, offset=piece.first_row)
    where = str(piece.path) if piece.row_group is None else f"{piece.path} (row group {piece.row_group})"
    clean, _ = validate_frame(df, schema, where, require_labels=require_labels)
    return clean


class ParquetStream:
    """A :class:`~mtrank.data.batch.BatchSource` over files, read piece by piece.

    Args:
        paths: files (see :func:`expand_paths`).
        schema, encoder: the dataset schema and fitted encoders.
        shuffle_buffer: rows held for shuffling (memory ~ rows × features × 8 bytes).
        prefetch: read the next piece in a background thread.
    """

    def __init__(self, paths: list[Path], schema: Schema, encoder: FeatureEncoder, *, shuffle_buffer: int = 262_144, prefetch: bool = True) -> None:
        self.schema = schema
        self.encoder = encoder
        self.shuffle_buffer = shuffle_buffer
        self.prefetch = prefetch
        self.pieces = list_pieces(paths)
        if any(p.rows < 0 for p in self.pieces):  # CSV: count rows once, cheaply, by reading
            self.pieces = [p if p.rows >= 0 else Piece(p.path, None, 1, read_table(p.path).height) for p in self.pieces]
        self._rows = sum(p.rows for p in self.pieces)

    def __len__(self) -> int:
        return self._rows

    def shard(self, rank: int, world_size: int) -> ParquetStream:
        """This rank's pieces: every ``world_size``-th, starting at ``rank``."""
        if world_size == 1:
            return self
        other = copy.copy(self)
        other.pieces = self.pieces[rank::world_size]
        other._rows = sum(p.rows for p in other.pieces)
        return other

    def encoded_pieces(self, order: list[int] | None = None) -> Iterator[EncodedData]:
        """Encoded pieces in ``order`` (default: file order), read one ahead in a thread."""
        order = list(range(len(self.pieces))) if order is None else order

        def load(i: int) -> EncodedData:
            df = read_piece(self.pieces[i], self.schema)
            return EncodedData.from_frame(df, self.schema, self.encoder)

        if not self.prefetch:
            for i in order:
                yield load(i)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(load, order[0]) if order else None
            for k in range(len(order)):
                current = future.result()
                future = pool.submit(load, order[k + 1]) if k + 1 < len(order) else None
                yield current

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches from the shuffle buffer (shuffled) or piece by piece in file order."""
        order = torch.randperm(len(self.pieces), generator=generator).tolist() if shuffle else None
        buffer: list[EncodedData] = []
        held = 0
        for part in self.encoded_pieces(order):
            buffer.append(part)
            held += len(part)
            if held >= self.shuffle_buffer:
                pool = EncodedData.concat(buffer)
                n_full = (len(pool) // batch_size) * batch_size
                yield from pool.subset(torch.arange(n_full)).batches(batch_size, shuffle=shuffle, generator=generator)
                buffer = [pool.subset(torch.arange(n_full, len(pool)))] if n_full < len(pool) else []
                held = len(pool) - n_full
        if buffer and held:
            yield from EncodedData.concat(buffer).batches(batch_size, shuffle=shuffle, generator=generator)

    def load_all(self) -> EncodedData:
        """Every piece of this shard in file order, as one EncodedData (for evaluation)."""
        return EncodedData.concat(list(self.encoded_pieces()))


def fit_encoder_streaming(paths: list[Path], schema: Schema, *, min_count: int = 1, max_size: int | None = None, hash_buckets: dict[str, int] | None = None) -> FeatureEncoder:
    """Fit encoders in one pass over the pieces: value counts per categorical column are merged
    across pieces, numerical mean / std from running sums. Equals :meth:`FeatureEncoder.fit` on
    the concatenated data. Columns in ``hash_buckets`` are hashed (no vocabulary to count)."""
    from mtrank.data.encoders import CategoricalEncoder, NumericalEncoder, canonical_ids

    counts: dict[str, pl.DataFrame] = {}
    sums: dict[str, list[float]] = {c: [0.0, 0.0, 0.0] for c in schema.numerical}
    check_hash_columns(hash_buckets, schema.categorical)
    hash_buckets = hash_buckets or {}
    counted = [c for c in schema.categorical if c not in hash_buckets]
    for piece in list_pieces(paths):
        df = read_piece(piece, schema)
        for c in counted:
            vc = canonical_ids(df.get_column(c)).drop_nulls().value_counts(name="n")
            counts[c] = vc if c not in counts else pl.concat([counts[c], vc]).group_by(c).agg(pl.col("n").sum())
        for c in schema.numerical:
            x = df.get_column(c).cast(pl.Float64).fill_nan(None).drop_nulls()
            x = x.filter(x.is_finite())
            s = sums[c]
            s[0] += x.len()
            s[1] += float(x.sum())
            s[2] += float((x * x).sum())
    cats: list = []
    for c in schema.categorical:
        if c not in counted:
            cats.append(HashedCategoricalEncoder(c, hash_buckets[c]))
            continue
        vc = counts[c].filter(pl.col("n") >= min_count).sort(["n", c], descending=[True, False])
        values = vc.get_column(c).to_list()
        cats.append(CategoricalEncoder(c, values[:max_size] if max_size else values))
    nums = []
    for c in schema.numerical:
        n, s1, s2 = sums[c]
        mean = s1 / n if n else 0.0
        var = max(s2 / n - mean * mean, 0.0) if n else 1.0
        std = var**0.5 if var > 1e-24 else 1.0
        nums.append(NumericalEncoder(c, mean, std))
    return FeatureEncoder(cats, nums)
