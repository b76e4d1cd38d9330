"""Streaming input: train and evaluate from Parquet (or CSV) files without loading them whole.

Files are split into *pieces* (Parquet row groups; a CSV file is one piece). Each epoch the
pieces are visited in a seeded random order; each piece is read by pyarrow, validated against
the schema (errors name the file and its own row numbers), encoded into tensors, and poured
into a shuffle buffer from which batches are drawn. ``readers`` background threads read the
next pieces while the current one trains (pyarrow and polars release the GIL). Memory is
bounded by the buffer and ``readers`` + 1 pieces, whatever the number of rows.

With a ``cache_dir``, each training piece is encoded once and kept there as a safetensors file
(int64 ids, float32 features and labels; no pickle), written atomically and named by a digest
of the file (path, size, mtime), the row group, the schema and the fitted encoders, so a stale
entry is never read. Later epochs (and later runs with the same encoders) load the tensors
instead of reading, validating and encoding the Parquet piece again.

Under data parallelism each rank takes every ``world_size``-th piece.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mtrank.data.batch import Batch, EncodedData
from mtrank.data.encoders import RANGE_QUANTILES, FeatureEncoder, ListEncoder
from mtrank.data.lists import flatten
from mtrank.data.hashing import HashedCategoricalEncoder, check_hash_columns
from mtrank.data.io import ROW, read_table, validate_frame
from mtrank.data.schema import Schema
from mtrank.errors import DataError
from mtrank.io_utils import INCOMPLETE, MANIFEST, atomic_write_safetensors


def check_parts_dir(path: str | Path) -> None:
    """Refuse a parts directory that is incomplete: it holds the ``_INCOMPLETE`` marker (a
    writer was interrupted), or its ``_manifest.json`` lists parts that are missing or it holds
    parts the manifest does not list. A directory without a manifest (written by other tools)
    passes.

    Raises:
        DataError: naming the directory and what is wrong.
    """
    p = Path(path)
    if (p / INCOMPLETE).exists():
        raise DataError(
            f"the directory is incomplete (it holds {INCOMPLETE}: its writer was interrupted); "
            "write it again",
            file=str(p),
        )
    if not (p / MANIFEST).is_file():
        return
    try:
        listed = {e["name"] for e in json.loads((p / MANIFEST).read_text())["parts"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"unreadable {MANIFEST} ({exc})", file=str(p)) from None
    present = {x.name for x in p.glob("part-*.parquet")}
    if listed != present:
        missing, extra = sorted(listed - present), sorted(present - listed)
        raise DataError(
            f"the directory does not match its {MANIFEST}: missing parts {missing[:5]}, "
            f"unlisted parts {extra[:5]}",
            file=str(p),
        )


def expand_paths(spec: str | Path | list) -> list[Path]:
    """A file, a directory (its ``*.parquet`` / ``*.csv`` files), a glob, or a list of those.

    Raises:
        DataError: nothing matches, or a directory is incomplete (:func:`check_parts_dir`).
    """
    specs = spec if isinstance(spec, list) else [spec]
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            check_parts_dir(p)
            out += sorted(
                x
                for x in p.iterdir()
                if x.suffix in {".parquet", ".pq", ".csv", ".gz"} and not x.name.startswith(".")
            )
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
        table = pq.ParquetFile(piece.path).read_row_group(
            piece.row_group, columns=[c for c in cols if c in available]
        )
        df = pl.from_arrow(table).with_row_index(ROW, offset=piece.first_row)
    where = (
        str(piece.path)
        if piece.row_group is None
        else f"{piece.path} (row group {piece.row_group})"
    )
    clean, _ = validate_frame(df, schema, where, require_labels=require_labels)
    return clean


class ParquetStream:
    """A :class:`~mtrank.data.batch.BatchSource` over files, read piece by piece.

    Args:
        paths: files (see :func:`expand_paths`).
        schema, encoder: the dataset schema and fitted encoders.
        shuffle_buffer: rows held for shuffling (memory ~ rows × features × 8 bytes).
        prefetch: read the next pieces in background threads.
        readers: pieces read and encoded at once when prefetching (≥ 1).
        cache_dir: keep encoded training pieces here (see the module docstring).
    """

    def __init__(
        self,
        paths: list[Path],
        schema: Schema,
        encoder: FeatureEncoder,
        *,
        shuffle_buffer: int = 262_144,
        prefetch: bool = True,
        readers: int = 1,
        cache_dir: Path | None = None,
    ) -> None:
        self.schema = schema
        self.encoder = encoder
        self.shuffle_buffer = shuffle_buffer
        self.prefetch = prefetch
        self.readers = max(1, readers)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._fingerprint = None
        if self.cache_dir is not None:
            doc = {"schema": schema.model_dump(mode="json"), "encoders": encoder.to_json()}
            self._fingerprint = hashlib.sha256(
                json.dumps(doc, sort_keys=True, default=str).encode()
            ).hexdigest()
        self.pieces = list_pieces(paths)
        if any(p.rows < 0 for p in self.pieces):  # CSV: count rows once, cheaply, by reading
            self.pieces = [
                p if p.rows >= 0 else Piece(p.path, None, 1, read_table(p.path).height)
                for p in self.pieces
            ]
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

    def cache_path(self, piece: Piece) -> Path:
        """The cache file of one piece (see the module docstring)."""
        st = piece.path.stat()
        key = json.dumps(
            [
                self._fingerprint,
                str(piece.path.resolve()),
                st.st_size,
                st.st_mtime_ns,
                piece.row_group,
            ]
        )
        return self.cache_dir / f"piece-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _encode(self, i: int, training: bool) -> EncodedData:
        piece = self.pieces[i]
        cached = self.cache_path(piece) if training and self.cache_dir is not None else None
        if cached is not None and cached.exists():
            try:
                t = load_file(str(cached))
                extra = [t.pop(f"extra.{i}") for i in range(len(self.encoder.extra_names))]
                return EncodedData(
                    t.pop("categorical"),
                    t.pop("numerical"),
                    {k.removeprefix("label."): v for k, v in t.items() if k.startswith("label.")},
                    weight=t.get("weight"),
                    position=t.get("position"),
                    extra=extra,
                )
            except (SafetensorError, OSError, KeyError):
                pass  # unreadable entry: encode again and rewrite it
        data = EncodedData.from_frame(read_piece(piece, self.schema), self.schema, self.encoder)
        if not training:
            return data
        data = EncodedData(  # batches need no side columns
            data.categorical,
            data.numerical,
            data.labels,
            data.weight,
            position=data.position,
            extra=data.extra,
        )
        if cached is not None:
            tensors = {
                "categorical": data.categorical,
                "numerical": data.numerical,
                **{f"label.{k}": v for k, v in data.labels.items()},
                **{f"extra.{i}": v for i, v in enumerate(data.extra)},
                **({} if data.weight is None else {"weight": data.weight}),
                **({} if data.position is None else {"position": data.position}),
            }
            atomic_write_safetensors(tensors, cached)
        return data

    def encoded_pieces(
        self, order: list[int] | None = None, *, training: bool = False
    ) -> Iterator[EncodedData]:
        """Encoded pieces in ``order`` (default: file order), up to ``readers`` read ahead in
        threads. ``training``: without side columns, through the cache when there is one."""
        order = list(range(len(self.pieces))) if order is None else order
        if not self.prefetch:
            for i in order:
                yield self._encode(i, training)
            return
        with ThreadPoolExecutor(max_workers=self.readers) as pool:
            ahead = [pool.submit(self._encode, i, training) for i in order[: self.readers]]
            for k in range(len(order)):
                current = ahead.pop(0).result()
                if k + self.readers < len(order):
                    ahead.append(pool.submit(self._encode, order[k + self.readers], training))
                yield current

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Batches from the shuffle buffer (shuffled) or piece by piece in file order."""
        order = torch.randperm(len(self.pieces), generator=generator).tolist() if shuffle else None
        buffer: list[EncodedData] = []
        held = 0
        for part in self.encoded_pieces(order, training=True):
            buffer.append(part)
            held += len(part)
            if held >= self.shuffle_buffer:
                pool = EncodedData.concat(buffer)
                n_full = (len(pool) // batch_size) * batch_size
                yield from pool.subset(torch.arange(n_full)).batches(
                    batch_size, shuffle=shuffle, generator=generator
                )
                buffer = (
                    [pool.subset(torch.arange(n_full, len(pool)))] if n_full < len(pool) else []
                )
                held = len(pool) - n_full
        if buffer and held:
            yield from EncodedData.concat(buffer).batches(
                batch_size, shuffle=shuffle, generator=generator
            )

    def load_all(self) -> EncodedData:
        """Every piece of this shard in file order, as one EncodedData (for evaluation)."""
        return EncodedData.concat(list(self.encoded_pieces()))


def fit_encoder_streaming(
    paths: list[Path],
    schema: Schema,
    *,
    min_count: int = 1,
    max_size: int | None = None,
    hash_buckets: dict[str, int] | None = None,
) -> FeatureEncoder:
    """Fit encoders in one pass over the pieces: value counts per categorical column are merged
    across pieces, numerical mean / std from running sums. Equals :meth:`FeatureEncoder.fit` on
    the concatenated data. Columns in ``hash_buckets`` are hashed (no vocabulary to count)."""
    from mtrank.data.encoders import CategoricalEncoder, NumericalEncoder, canonical_ids

    counts: dict[str, pl.DataFrame] = {}
    sums: dict[str, list[float]] = {c: [0.0, 0.0, 0.0] for c in schema.numerical}
    ranges: dict[str, list[float]] = {c: [math.inf, -math.inf] for c in schema.numerical}
    check_hash_columns(hash_buckets, schema.categorical)
    hash_buckets = hash_buckets or {}
    counted = [c for c in schema.categorical if c not in hash_buckets]
    elements: dict[str, list[pl.Series]] = {f.column: [] for f in schema.lists}
    for piece in list_pieces(paths):
        df = read_piece(piece, schema)
        for f in schema.lists:  # element value counts, merged below like a scalar column's
            ids = flatten(df.get_column(f.column), f).ids.drop_nulls()
            elements[f.column].append(ids.value_counts(name="n"))
        for c in counted:
            vc = canonical_ids(df.get_column(c)).drop_nulls().value_counts(name="n")
            counts[c] = (
                vc
                if c not in counts
                else pl.concat([counts[c], vc]).group_by(c).agg(pl.col("n").sum())
            )
        for c in schema.numerical:
            x = df.get_column(c).cast(pl.Float64).fill_nan(None).drop_nulls()
            x = x.filter(x.is_finite())
            s = sums[c]
            if x.len():  # per-piece quantiles, merged by min / max (see the encoder's range)
                lo, hi = np.quantile(x.to_numpy(), RANGE_QUANTILES)
                ranges[c] = [min(ranges[c][0], float(lo)), max(ranges[c][1], float(hi))]
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
        lo, hi = ranges[c]
        nums.append(NumericalEncoder(c, mean, std, *((lo, hi) if lo <= hi else (None, None))))
    lists = [
        ListEncoder(
            f, CategoricalEncoder(f.column, _vocabulary(elements[f.column], min_count, max_size))
        )
        for f in schema.lists
    ] + [ListEncoder(f) for f in schema.sequences]
    return FeatureEncoder(cats, nums, lists)


def _vocabulary(counts: list[pl.DataFrame], min_count: int, max_size: int | None) -> list[str]:
    """Merged element value counts → vocabulary, ordered as :meth:`CategoricalEncoder.fit`."""
    if not counts:
        return []
    vc = pl.concat(counts)
    key = vc.columns[0]
    vc = vc.group_by(key).agg(pl.col("n").sum()).filter(pl.col("n") >= min_count)
    values = vc.sort(["n", key], descending=[True, False]).get_column(key).to_list()
    return values[:max_size] if max_size else values
