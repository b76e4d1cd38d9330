"""Reading large raw log files in bounded memory, for the converters of public logs
(:mod:`mtrank.data.aliccp_raw`, :mod:`mtrank.data.staged_logs`).

Three pieces, all vectorised (pyarrow's CSV reader, polars expressions; no per-row Python):

* :func:`iter_csv_batches`: a CSV file (optionally compressed) read block by block as string
  columns, each row carrying its 1-based data-row number (``__row``) for error messages; a line
  with the wrong number of fields is an error naming file and row, or skipped and counted;
* :class:`BadRows`: the bad-row policy (``error`` or ``skip``) and the counts of what was skipped;
* :func:`staged_output`: the output directory written aside and renamed into place whole;
* :class:`Buckets`: rows hash-partitioned on a key column into Parquet files on disk, so that a
  join or group-by over files larger than memory is done one bucket at a time (a Grace hash
  join: every row of a key lands in the same bucket).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.data.io import ROW
from mtrank.errors import ConfigError, DataError
from mtrank.io_utils import atomic_replace_dir, atomic_write_bytes, atomic_write_json

BLOCK_BYTES = 1 << 26  # 64 MiB of text per batch


@dataclass
class BadRows:
    """What to do with a bad row, and what was skipped.

    Attributes:
        policy: ``error`` (the default: the first bad rows raise :class:`DataError` naming file,
            column and rows) or ``skip`` (dropped, counted per file and reason).
        skipped: ``{"<file>: <reason>": rows skipped}``.
    """

    policy: str = "error"
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ConfigError(f"--bad-rows must be 'error' or 'skip', got {self.policy!r}")

    def handle(
        self,
        df: pl.DataFrame,
        bad: pl.Series | pl.Expr,
        *,
        source: str,
        column: str | None,
        reason: str,
    ) -> pl.DataFrame:
        """Rows of ``df`` where ``bad`` is true: raise (policy ``error``) or drop and count.

        Raises:
            DataError: ``reason``, naming ``source``, ``column`` and the first bad rows.
        """
        mask = df.select(bad.fill_null(True) if isinstance(bad, pl.Expr) else pl.lit(bad))
        mask_s = mask.to_series()
        n = int(mask_s.sum())
        if n == 0:
            return df
        if self.policy == "error":
            rows = df.filter(mask_s)[ROW].head(10).to_list()
            raise DataError(
                f"{reason} ({n} row{'s' if n > 1 else ''} in this block); fix the file or pass "
                "--bad-rows skip to drop such rows with a count",
                file=source,
                column=column,
                rows=rows,
                count=n,
            )
        self.count(source, reason, n)
        return df.filter(~mask_s)

    def count(self, source: str, reason: str, n: int) -> None:
        """Add ``n`` skipped rows of ``source`` for ``reason``."""
        if n:
            key = f"{source}: {reason}"
            self.skipped[key] = self.skipped.get(key, 0) + n


def iter_csv_batches(
    path: str | Path,
    columns: list[str],
    *,
    header: bool,
    bad: BadRows,
    block_bytes: int = BLOCK_BYTES,
) -> Iterator[pl.DataFrame]:
    """Read a CSV file (``.gz`` / ``.bz2`` / ``.zst`` detected from the name) block by block.

    Every column is read as text (no quoting: raw logs hold none), the header line (when
    ``header``) is skipped, and a ``__row`` column numbers the data rows from 1 (row 1 = the
    first line after the header, the first line when there is none).

    Args:
        columns: the names of the file's fields, in order; a line with another field count is
            bad (an error, or skipped and counted under ``bad``).
        block_bytes: bytes of text parsed at a time (memory ≈ a few times this).

    Yields:
        ``pl.DataFrame`` of String columns ``columns`` plus ``__row`` (UInt64).

    Raises:
        DataError: the file is missing or empty, or a line has the wrong field count.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("file does not exist", file=str(p))
    if p.stat().st_size == 0:
        raise DataError("the file is empty (0 bytes)", file=str(p))
    offset = 1 if header else 0
    bad_lines: list[int] = []  # 1-based physical line numbers of malformed lines

    first_bad: list[tuple[int, int, int]] = []  # (line, fields found, fields expected)

    def on_invalid(row) -> str:  # called by pyarrow for malformed lines only
        line = row.number if row.number is not None else 0
        if bad.policy == "error":
            first_bad.append((line, row.actual_columns, row.expected_columns))
            return "error"
        bad_lines.append(line)
        return "skip"

    def field_count_error() -> DataError:
        line, actual, expected = first_bad[0]
        return DataError(
            f"the line has {actual} comma-separated fields, expected {expected} "
            f"({', '.join(columns)}); fix the file or pass --bad-rows skip",
            file=str(p),
            rows=[line - offset],
        )

    read = pacsv.ReadOptions(
        column_names=columns,
        skip_rows=offset,
        block_size=block_bytes,
        use_threads=False,  # keeps pyarrow's row numbers exact for the invalid-row handler
    )
    parse = pacsv.ParseOptions(
        delimiter=",", quote_char=False, newlines_in_values=False, invalid_row_handler=on_invalid
    )
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, strings_can_be_null=False
    )
    try:
        stream = pa.input_stream(str(p), compression="detect")
        reader = pacsv.open_csv(
            stream, read_options=read, parse_options=parse, convert_options=convert
        )
    except pa.ArrowInvalid as exc:
        if first_bad:
            raise field_count_error() from None
        if "Empty CSV file" in str(exc):
            raise DataError("the file holds no data rows", file=str(p)) from None
        raise DataError(f"cannot parse the file: {str(exc).splitlines()[0]}", file=str(p)) from None
    valid_seen = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            if first_bad:
                raise field_count_error() from None
            raise DataError(
                f"cannot parse the file: {str(exc).splitlines()[0]}", file=str(p)
            ) from None
        n = batch.num_rows
        if n == 0:
            continue
        valid = np.arange(valid_seen + 1, valid_seen + n + 1, dtype=np.int64)
        if bad_lines:
            # valid row g sits at line g + (bad lines before it): bad line j (sorted) precedes
            # valid row g when b_j - j <= g
            b = np.sort(np.asarray(bad_lines, dtype=np.int64) - offset)
            before = np.searchsorted(b - np.arange(len(b)), valid, side="right")
            valid = valid + before
        valid_seen += n
        df = pl.from_arrow(batch)
        assert isinstance(df, pl.DataFrame)
        yield df.with_columns(pl.Series(ROW, valid, dtype=pl.UInt64))
    if bad_lines:
        bad.count(str(p), "wrong field count", len(bad_lines))


def bucket_count(total_bytes: int, bucket_bytes: int) -> int:
    """Buckets needed so that each holds about ``bucket_bytes`` of the input (at least 1)."""
    return max(1, math.ceil(total_bytes / max(1, bucket_bytes)))


class Buckets:
    """Tables hash-partitioned on a key into ``n`` Parquet files each, in a temporary directory.

    ``add(name, df, key)`` appends the rows of ``df`` to table ``name``'s buckets by the hash of
    column ``key``; ``read(name, b)`` returns bucket ``b`` of table ``name`` (an empty frame when
    nothing landed there). Use as a context manager: the directory is removed on exit.
    """

    def __init__(self, n: int, parent: Path) -> None:
        self.n = n
        self.dir = Path(tempfile.mkdtemp(prefix=".buckets-", dir=parent))
        self._writers: dict[tuple[str, int], pq.ParquetWriter] = {}
        self._schemas: dict[str, pa.Schema] = {}

    def __enter__(self) -> Buckets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, name: str, b: int) -> Path:
        return self.dir / f"{name}-{b:05d}.parquet"

    def add(self, name: str, df: pl.DataFrame, key: str) -> None:
        """Append ``df`` to table ``name``, row by row to the bucket of ``hash(df[key]) % n``."""
        if df.height == 0:
            return
        if self.n == 1:
            groups: Iterator[tuple[int, pl.DataFrame]] = iter([(0, df)])
        else:
            b = (df[key].hash(seed=0) % self.n).cast(pl.Int64).alias("__bucket")
            groups = (
                (int(k[0]), g.drop("__bucket"))
                for k, g in df.with_columns(b).partition_by("__bucket", as_dict=True).items()
            )
        for b, g in groups:
            table = g.to_arrow()
            schema = self._schemas.setdefault(name, table.schema)
            writer = self._writers.get((name, b))
            if writer is None:
                writer = pq.ParquetWriter(self._path(name, b), schema)
                self._writers[(name, b)] = writer
            writer.write_table(table.cast(schema))

    def close(self) -> None:
        """Finish every bucket file (idempotent)."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def read(self, name: str, b: int, empty: Callable[[], pl.DataFrame]) -> pl.DataFrame:
        """Bucket ``b`` of table ``name``; ``empty()`` when no row landed in it."""
        p = self._path(name, b)
        return pl.read_parquet(p) if p.exists() else empty()


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A staging directory beside ``out`` to write a conversion into: renamed into place whole
    when the block ends cleanly (:func:`mtrank.io_utils.atomic_replace_dir`), removed when it
    raises, so ``out`` never holds half a conversion."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        atomic_replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_conversion_files(staging: Path, schema_text: str, report) -> None:
    """``schema.yaml`` and ``conversion.json`` (the report dataclass) of a conversion."""
    atomic_write_bytes(schema_text.encode(), staging / "schema.yaml")
    atomic_write_json(asdict(report), staging / "conversion.json")
