"""Reading tables (CSV / Parquet) and validating them against a schema at the boundary.

Every problem is reported as a :class:`~mtrank.errors.DataError` naming the file, the column
and the 1-based data rows (row 1 = first row after the header), with nothing silently lost:
funnel violations are an error by default, or dropped and counted under the ``drop`` policy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from mtrank.data.lists import check_list_columns
from mtrank.data.funnel import FunnelStage, stage_parents
from mtrank.data.schema import Schema
from mtrank.errors import ConfigError, DataError

ROW = "__row"  # 1-based data-row number in the source file, kept for error messages
_MAX_ROWS_SHOWN = 10


@dataclass
class ValidationReport:
    """What validation did to a table: rows read, rows dropped and why."""

    source: str
    rows_read: int
    funnel_violations: int = 0
    dropped_rows: list[int] = field(default_factory=list)


def funnel_dependencies(schema: Schema) -> list[tuple[FunnelStage, FunnelStage]]:
    """(stage, its ``after`` stage) for every declared funnel dependency (conversion after click
    for the two-stage shorthand): a row with the stage's label 1 needs the other's 1 too."""
    stages = schema.stages
    return [(stages[i], stages[p]) for i, p in enumerate(stage_parents(stages)) if p >= 0]


def read_table(
    path: str | Path,
    columns: list[str] | None = None,
    *,
    column_names: list[str] | None = None,
    all_strings: bool = False,
) -> pl.DataFrame:
    """Read a CSV (optionally compressed, e.g. ``.csv.gz``) or Parquet file into a DataFrame with
    a 1-based ``__row`` column.

    CSV is parsed by pyarrow (multi-threaded, vectorised). A UTF-8 BOM and Windows line endings
    are accepted; a row with too few or too many fields (for example a truncated last line) is
    an error naming its line.

    Args:
        path: ``.csv``, ``.csv.gz``, ``.tsv``, ``.parquet`` / ``.pq`` file.
        columns: if given, only these columns are kept (all must exist).
        column_names: names for a CSV without a header row.
        all_strings: read every CSV column as text (no type inference).

    Raises:
        DataError: the file does not exist, is empty, cannot be parsed, or lacks a column.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("file does not exist", file=str(p))
    if p.is_dir():
        raise DataError("expected a file, got a directory", file=str(p))
    if p.stat().st_size == 0:
        raise DataError("the file is empty (0 bytes)", file=str(p))
    suffixes = "".join(p.suffixes).lower()
    try:
        if suffixes.endswith((".parquet", ".pq")):
            df = pl.read_parquet(p)
        else:
            df = _read_csv(p, suffixes, column_names, all_strings)
    except DataError:
        raise
    except (pa.ArrowException, pl.exceptions.PolarsError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot parse the file: {first}", file=str(p)) from None
    # Stray spaces or a BOM in the header must not make a column "missing".
    renamed = {c: c.lstrip("\ufeff").strip() for c in df.columns}
    if any(k != v for k, v in renamed.items()):
        df = df.rename(renamed)
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"missing column(s) {missing}; the file has {df.columns}", file=str(p))
        df = df.select(columns)
    return df.with_row_index(ROW, offset=1)


def _read_csv(
    p: Path, suffixes: str, column_names: list[str] | None, all_strings: bool
) -> pl.DataFrame:
    def parse(use_threads: bool) -> tuple[pa.Table, list[int | None]]:
        bad_lines: list[int | None] = []

        def on_invalid(row) -> str:  # called by pyarrow for malformed rows only
            bad_lines.append(row.number)
            return "skip"

        read = pacsv.ReadOptions(
            column_names=column_names, block_size=1 << 24, use_threads=use_threads
        )
        parse_opts = pacsv.ParseOptions(
            delimiter="\t" if ".tsv" in suffixes else ",",
            invalid_row_handler=on_invalid,
            newlines_in_values=False,
        )
        convert = pacsv.ConvertOptions(
            strings_can_be_null=True, null_values=["", "NULL", "null", "NaN", "nan", "NA"]
        )
        if all_strings:
            head = (
                column_names
                or pacsv.read_csv(
                    p, read_options=pacsv.ReadOptions(block_size=1 << 16), parse_options=parse_opts
                ).column_names
            )
            convert = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in head},
                strings_can_be_null=True,
                null_values=[""],
            )
        return pacsv.read_csv(
            p, read_options=read, parse_options=parse_opts, convert_options=convert
        ), bad_lines

    table, bad_lines = parse(use_threads=True)
    if bad_lines:
        if any(
            n is None for n in bad_lines
        ):  # line numbers are only known to a single-threaded parse
            _, bad_lines = parse(use_threads=False)
        header = 0 if column_names is not None else 1
        rows = [n - header for n in bad_lines if n is not None]
        raise DataError(
            f"{len(bad_lines)} malformed line(s) (wrong number of fields, e.g. a truncated line)",
            file=str(p),
            rows=rows,
            count=len(bad_lines),
        )
    return pl.from_arrow(table)


def _rows(df: pl.DataFrame, mask: pl.Expr) -> tuple[int, list[int]]:
    hit = df.filter(mask).get_column(ROW)
    return hit.len(), hit.head(_MAX_ROWS_SHOWN).to_list()


def _fail_on(df: pl.DataFrame, mask: pl.Expr, source: str, column: str, describe) -> None:
    """Raise a DataError naming ``column`` and the rows where ``mask`` holds, if any.

    ``describe(count, first_offending_value) -> str`` words the message.
    """
    n, rows = _rows(df, mask)
    if n:
        example = df.filter(mask).get_column(column).head(1).to_list()[0]
        raise DataError(describe(n, example), file=source, column=column, rows=rows, count=n)


def _numeric(df: pl.DataFrame, col: str) -> pl.Expr:
    dtype = df.schema[col]
    if dtype == pl.Boolean:
        return pl.col(col).cast(pl.Float64)
    if dtype == pl.String:
        return pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    return pl.col(col).cast(pl.Float64, strict=False)


def _check_numeric_column(df: pl.DataFrame, col: str, source: str) -> None:
    """Fail on cells that are present but not numbers ("abc"); empty/NaN cells are allowed."""
    if df.schema[col].is_numeric() or df.schema[col] == pl.Boolean:
        return
    bad = pl.col(col).is_not_null() & (pl.col(col).cast(pl.String).str.strip_chars() != "")
    bad = bad & _numeric(df, col).is_null()
    _fail_on(
        df,
        bad,
        source,
        col,
        lambda n, ex: f"{n} non-numeric value(s) in a numerical column, e.g. {ex!r}",
    )


def validate_frame(
    df: pl.DataFrame,
    schema: Schema,
    source: str,
    *,
    require_labels: bool = True,
) -> tuple[pl.DataFrame, ValidationReport]:
    """Check a table against the schema and return it with clean dtypes.

    Labels become ``Int8`` 0/1, numerical features and price ``Float64`` (missing → null,
    imputed later by the encoder). Categorical columns are left as read.

    Args:
        df: table from :func:`read_table` (with its ``__row`` column).
        schema: the dataset schema.
        source: file name used in error messages.
        require_labels: False at predict/serve time, when labels may be absent.

    Raises:
        DataError: a missing column, no data rows, a label that is missing, non-numeric or
            not 0/1, a conversion without a click (policy ``error``), a feature column equal
            to a label column (leakage), or a non-numeric value in a numerical column.
    """
    if ROW not in df.columns:
        df = df.with_row_index(ROW, offset=1)
    report = ValidationReport(source=source, rows_read=df.height)
    needed = [
        c
        for c in schema.required_columns()
        if require_labels or c not in schema.label_columns + schema.training_columns
    ]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(
            f"missing column(s) {missing} required by schema {schema.name!r}; "
            f"the table has {[c for c in df.columns if c != ROW]}",
            file=source,
        )
    if df.height == 0:
        raise DataError("the table has a header but no data rows", file=source)

    labels = (
        [c for c in schema.label_columns if c in df.columns]
        if not require_labels
        else schema.label_columns
    )
    casts = []
    for col in labels:
        value = _numeric(df, col)
        present = pl.col(col).is_not_null()
        if df.schema[col] == pl.String:
            present = present & (pl.col(col).str.strip_chars() != "")
        _fail_on(
            df, ~present | value.is_nan(), source, col, lambda n, _: f"{n} missing label value(s)"
        )
        _fail_on(
            df,
            value.is_null(),
            source,
            col,
            lambda n, ex: f"{n} non-numeric label value(s), e.g. {ex!r}; labels must be 0 or 1",
        )
        _fail_on(
            df,
            ~value.is_in([0.0, 1.0]),
            source,
            col,
            lambda n, ex: f"{n} label value(s) that are not 0 or 1, e.g. {ex!r}",
        )
        casts.append(value.cast(pl.Int8).alias(col))
    if casts:
        df = df.with_columns(casts)

    violation = None
    for stage, after in funnel_dependencies(schema):
        if stage.label not in df.columns or after.label not in df.columns:
            continue
        broken = (pl.col(after.label) == 0) & (pl.col(stage.label) == 1)
        n, rows = _rows(df, broken)
        if n and schema.funnel_violations == "error":
            raise DataError(
                f"{n} row(s) with {stage.label}=1 but {after.label}=0 (a {stage.stage} "
                f"without a {after.stage} breaks the funnel); fix the data or use the 'drop' "
                "policy (--funnel-violations drop)",
                file=source,
                column=stage.label,
                rows=rows,
                count=n,
            )
        violation = broken if violation is None else violation | broken
    if violation is not None:
        n, _ = _rows(df, violation)
        report.funnel_violations = n
        if n:
            report.dropped_rows = df.filter(violation).get_column(ROW).to_list()
            df = df.filter(~violation)

    numeric_cols = list(
        dict.fromkeys(schema.numerical + ([schema.price] if schema.price in df.columns else []))
    )
    for col in numeric_cols:
        _check_numeric_column(df, col, source)
    df = df.with_columns([_numeric(df, c).alias(c) for c in numeric_cols])

    if schema.lists or schema.sequences:
        check_list_columns(df, schema, source)

    df = _check_training_columns(df, schema, source)
    for label in labels:
        if df.get_column(label).n_unique() < 2:
            continue  # a constant label cannot be leaked by a column
        check_missingness_leak(df, schema, label, source)
        for feat in schema.feature_columns:
            # leakage: the label itself (as numbers or as text), or its complement 1 − label
            if df.get_column(feat).null_count():
                continue
            if df.schema[feat] == pl.Boolean or df.schema[feat].is_numeric():
                x, y = pl.col(feat).cast(pl.Float64), pl.col(label).cast(pl.Float64)
                leak = df.select((x == y).all() | (x == 1.0 - y).all()).item()
            else:
                leak = df.select(
                    (pl.col(feat).cast(pl.String) == pl.col(label).cast(pl.String)).all()
                ).item()
            if leak:
                raise DataError(
                    f"feature column {feat!r} is identical to label column {label!r} (or to "
                    "1 − label) on every row: that is label leakage; remove it from the features",
                    file=source,
                    column=feat,
                )
    return df, report


def _check_training_columns(df: pl.DataFrame, schema: Schema, source: str) -> pl.DataFrame:
    """The weight column (a finite number ≥ 0 on every row, cast to Float64) and the position
    column (an integer ≥ 0 on every row, cast to Int64), where present.

    Raises:
        DataError: naming the column and the rows of the first kind of bad value.
    """
    casts = []
    if schema.weight is not None and schema.weight in df.columns:
        col, value = schema.weight, _numeric(df, schema.weight)
        _fail_on(
            df,
            value.is_null(),
            source,
            col,
            lambda n, ex: (
                f"{n} missing or non-numeric "
                f"sample weight(s), e.g. {ex!r}; a weight must be a finite number ≥ 0"
            ),
        )
        _fail_on(
            df,
            ~value.is_finite() | (value < 0),
            source,
            col,
            lambda n, ex: (
                f"{n} sample "
                f"weight(s) that are negative or not finite, e.g. {ex!r}; a weight must be a "
                "finite number ≥ 0"
            ),
        )
        casts.append(value.alias(col))
    if schema.position is not None and schema.position in df.columns:
        col, value = schema.position, _numeric(df, schema.position)
        bad = value.is_null() | ~value.is_finite() | (value < 0) | (value != value.floor())
        _fail_on(
            df,
            bad,
            source,
            col,
            lambda n, ex: f"{n} position value(s) that are not an integer ≥ 0, e.g. {ex!r}",
        )
        casts.append(value.cast(pl.Int64).alias(col))
    return df.with_columns(casts) if casts else df


MISSINGNESS_LEAK = 0.98  # share of a column's non-null (or null) cells on positive rows
MISSINGNESS_MIN_ROWS = 20  # fewer such cells than this say nothing


def check_missingness_leak(df: pl.DataFrame, schema: Schema, label: str, source: str) -> None:
    """Leakage through missingness: a feature that is non-null (or null) almost only on rows
    where ``label`` is 1 tells the model the label by its mere presence (a field filled in
    after the click, such as a delivery date or a review score).

    Flagged when at least :data:`MISSINGNESS_MIN_ROWS` cells are non-null (or null), at least
    :data:`MISSINGNESS_LEAK` of them are on positive rows, and the label is positive on less
    than half of all rows (so the share is far above the base rate). Vectorised: one pass per
    column.

    Raises:
        DataError: naming the file and the column, with the share and the counts.
    """
    y = pl.col(label).cast(pl.Float64)
    base = df.select(y.mean()).item()
    if base is None or base >= 0.5:
        return
    for feat in schema.feature_columns:
        miss = pl.col(feat).is_null()
        if df.schema[feat].is_float():
            miss = miss | pl.col(feat).is_nan()
        elif df.schema[feat] == pl.String:
            miss = miss | (pl.col(feat).str.strip_chars() == "")
        row = df.select(n_null=miss.sum(), pos_null=(miss & (y > 0)).sum(), pos=(y > 0).sum()).row(
            0, named=True
        )
        n_null, pos_null, n_pos = row["n_null"], row["pos_null"], row["pos"]
        n_set, pos_set = df.height - n_null, n_pos - pos_null
        for kind, n, on_pos in (("non-null", n_set, pos_set), ("null", n_null, pos_null)):
            if n >= MISSINGNESS_MIN_ROWS and on_pos >= MISSINGNESS_LEAK * n:
                raise DataError(
                    f"feature column {feat!r} is {kind} almost only where label {label!r} is 1 "
                    f"({on_pos} of its {n} {kind} cells, base rate {base:.1%}): that is label "
                    "leakage through missingness (a field filled in after the event); remove it "
                    "from the features",
                    file=source,
                    column=feat,
                )


# --- output paths ------------------------------------------------------------------------------


def check_output(path: str | Path, *, kind: str = "file", option: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written as a ``kind`` (``file`` or
    ``dir``): not an existing directory for a file, not an existing file for a directory, and
    its nearest existing parent a writable directory. Creates nothing.

    Raises:
        ConfigError: one line naming the option, the path and the reason.
    """
    p = Path(path)
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{option} {p} is a directory; give a file name")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {p} exists and is a file; give a directory")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {p}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {p}: permission denied (cannot write in {parent})")
    return p


def refuse_nonempty(path: Path, overwrite: bool) -> None:
    """Raise ConfigError when ``path`` exists and is not empty (a file, or a directory with
    entries) and ``overwrite`` is False: an output never mixes with an earlier run's files."""
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} exists and is not empty; pass --overwrite to replace it whole")
