"""Converting event logs with funnel stages (view → cart / favourite → buy) into impression-level
Parquet with one 0/1 label column per stage, and a schema YAML in the ``funnel:`` form.

Two public layouts are known (:data:`LAYOUTS`); neither file is shipped:

* **Taobao UserBehavior** (Tianchi data set 649, https://tianchi.aliyun.com/dataset/649): no
  header, ``user_id,item_id,category_id,behavior_type,timestamp`` with ``behavior_type`` in
  ``pv``, ``cart``, ``fav``, ``buy`` and the time in seconds;
* **RetailRocket events** (https://www.kaggle.com/datasets/retailrocket/ecommerce-dataset,
  ``events.csv``): header ``timestamp,visitorid,event,itemid,transactionid`` with ``event`` in
  ``view``, ``addtocart``, ``transaction`` and the time in milliseconds.

**What an impression is here.** Neither log records items that were shown and *not* opened:
``pv`` / ``view`` is a visit of the item's page, i.e. a *click* in the ranking sense. So one output
row is one (user, item) pair that has at least one view — the "impression" of the funnel is the
viewed item — and the stages are what followed: cart / fav / buy (``addtocart`` /
``transaction``), each 1 when the pair has that event anywhere in the log. CTR cannot be learnt
from these logs (every row would be clicked); the funnel starts after the click, as the post-click
part of ESM² (Wen et al., SIGIR 2020, §3). ``timestamp`` is the first view's time (the file's own
unit), so a time split is possible; ``category_id`` (Taobao) is taken from the first view.

**Dependency checks** (reported with counts in ``conversion.json``, nothing silently lost): a
stage event on a pair that was never viewed (``buy without pv``: not an impression, so the pair
is dropped and counted), a stage whose first event precedes the first view (kept, counted), and
along the declared funnel a stage without its previous one (``buy without cart``: kept, counted;
the schema's ``funnel_violations`` decides at training time).

Memory is bounded: pass 1 reads the file block by block, checks it and writes the events into
hash buckets of the user id on disk; pass 2 aggregates one bucket at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from mtrank.data.io import ROW, refuse_nonempty
from mtrank.data.rawcsv import (
    BLOCK_BYTES,
    BadRows,
    Buckets,
    bucket_count,
    iter_csv_batches,
    staged_output,
    write_conversion_files,
)
from mtrank.errors import ConfigError, DataError
from mtrank.io_utils import write_parts_dir


@dataclass(frozen=True)
class StagedLayout:
    """A public event log's layout.

    Attributes:
        columns: the file's fields in order; ``header``: whether line 1 names them.
        user, item, event, time: the columns holding them.
        entry: the event value that makes a (user, item) pair a row (a page view).
        stages: ``{stage label column: event value}`` for the later stages.
        funnel: the default stage order of the schema YAML.
        keep: columns carried per row, taken from the first view.
        download: where the file is published.
    """

    name: str
    columns: tuple[str, ...]
    header: bool
    user: str
    item: str
    event: str
    time: str
    entry: str
    stages: dict[str, str]
    funnel: tuple[str, ...]
    keep: tuple[str, ...]
    download: str


TAOBAO_USERBEHAVIOR = StagedLayout(
    name="taobao",
    columns=("user_id", "item_id", "category_id", "behavior_type", "timestamp"),
    header=False,
    user="user_id",
    item="item_id",
    event="behavior_type",
    time="timestamp",
    entry="pv",
    stages={"cart": "cart", "fav": "fav", "buy": "buy"},
    funnel=("cart", "buy"),
    keep=("category_id",),
    download="https://tianchi.aliyun.com/dataset/649",
)
RETAILROCKET = StagedLayout(
    name="retailrocket",
    columns=("timestamp", "visitorid", "event", "itemid", "transactionid"),
    header=True,
    user="visitorid",
    item="itemid",
    event="event",
    time="timestamp",
    entry="view",
    stages={"addtocart": "addtocart", "transaction": "transaction"},
    funnel=("addtocart", "transaction"),
    keep=(),
    download="https://www.kaggle.com/datasets/retailrocket/ecommerce-dataset",
)
LAYOUTS: dict[str, StagedLayout] = {"taobao": TAOBAO_USERBEHAVIOR, "retailrocket": RETAILROCKET}


@dataclass
class StagedReport:
    """What the conversion did; written as ``conversion.json`` beside the data."""

    layout: str
    source: str
    out: str
    events: int = 0
    rows: int = 0
    positives: dict[str, int] = field(default_factory=dict)
    dropped_not_viewed: dict[str, int] = field(default_factory=dict)
    before_first_view: dict[str, int] = field(default_factory=dict)
    funnel_violations: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    view_time_range: list[int] = field(default_factory=list)
    test_from: int | None = None
    rows_test: int = 0
    buckets: int = 1
    seconds: float = 0.0


def _check_header(path: Path, layout: StagedLayout) -> None:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        first = fh.readline().strip().lstrip("\ufeff")
    got = [c.strip() for c in first.split(",")]
    if got != list(layout.columns):
        raise DataError(
            f"the header is {got}, expected {list(layout.columns)} ({layout.name} layout)",
            file=str(path),
        )


def _pass1(path: Path, layout: StagedLayout, buckets: Buckets, bad: BadRows, report, block):
    events = [layout.entry, *layout.stages.values()]
    src = str(path)
    for df in iter_csv_batches(
        path, list(layout.columns), header=layout.header, bad=bad, block_bytes=block
    ):
        df = bad.handle(
            df,
            ~pl.col(layout.event).is_in(events),
            source=src,
            column=layout.event,
            reason=f"the event must be one of {events}",
        )
        for col in (layout.user, layout.item):
            df = bad.handle(
                df,
                pl.col(col).str.strip_chars() == "",
                source=src,
                column=col,
                reason="empty id",
            )
        df = bad.handle(
            df,
            pl.col(layout.time).cast(pl.Int64, strict=False).is_null(),
            source=src,
            column=layout.time,
            reason="the time is not an integer",
        )
        report.events += df.height
        t = df.filter(pl.col(layout.event) == layout.entry)[layout.time].cast(pl.Int64)
        if t.len():
            lo, hi = int(t.min()), int(t.max())  # type: ignore[arg-type]
            old = report.view_time_range or [lo, hi]
            report.view_time_range = [min(old[0], lo), max(old[1], hi)]
        buckets.add(
            "events",
            df.select(
                ROW,
                layout.user,
                layout.item,
                pl.col(layout.event).alias("__event"),
                pl.col(layout.time).cast(pl.Int64).alias("__t"),
                *layout.keep,
            ),
            layout.user,
        )


def _pairs(ev: pl.DataFrame, layout: StagedLayout, funnel: list[str], report) -> pl.DataFrame:
    """One bucket's events → one row per viewed (user, item) pair with a label per stage."""
    entry_t = pl.col("__t").filter(pl.col("__event") == layout.entry)
    aggs = [entry_t.min().alias(layout.time)]
    aggs += [
        pl.col(k).filter(pl.col("__event") == layout.entry).sort_by(entry_t).first().alias(k)
        for k in layout.keep
    ]
    aggs += [
        pl.col("__t").filter(pl.col("__event") == e).min().alias(f"__t_{s}")
        for s, e in layout.stages.items()
    ]
    g = ev.group_by(layout.user, layout.item).agg(aggs)
    viewed = pl.col(layout.time).is_not_null()
    for s in layout.stages:
        t = pl.col(f"__t_{s}")
        counts = g.select(
            (t.is_not_null() & ~viewed).sum().alias("nv"),
            (t.is_not_null() & viewed & (t < pl.col(layout.time))).sum().alias("early"),
        ).row(0)
        key = f"{s} without {layout.entry}"
        report.dropped_not_viewed[key] = report.dropped_not_viewed.get(key, 0) + counts[0]
        key = f"{s} before first {layout.entry}"
        report.before_first_view[key] = report.before_first_view.get(key, 0) + counts[1]
    g = g.filter(viewed).with_columns(
        pl.col(f"__t_{s}").is_not_null().cast(pl.Int8).alias(s) for s in layout.stages
    )
    for prev, s in zip(funnel, funnel[1:], strict=False):
        key = f"{s} without {prev}"
        n = int(((g[s] == 1) & (g[prev] == 0)).sum())
        report.funnel_violations[key] = report.funnel_violations.get(key, 0) + n
    for s in layout.stages:
        report.positives[s] = report.positives.get(s, 0) + int(g[s].sum())
    cols = [layout.user, layout.item, *layout.keep, layout.time, *layout.stages]
    return g.sort(layout.time, layout.user, layout.item).select(cols)


def _counted(parts: Iterator[pl.DataFrame], report: StagedReport) -> Iterator[pl.DataFrame]:
    for part in parts:
        report.rows_test += part.height
        yield part


def schema_yaml(layout: StagedLayout, funnel: list[str], report: StagedReport) -> str:
    """The schema YAML: the declared funnel over the stage labels, ids as categorical features,
    the view time as ``time``; stage labels outside the funnel are carried as passthrough."""
    doc = {
        "name": f"{layout.name}_staged",
        "funnel": [{"stage": s, "label": s} for s in funnel],
        "user_id": layout.user,
        "item_id": layout.item,
        "time": layout.time,
        "categorical": [layout.user, layout.item, *layout.keep],
        "passthrough": [s for s in layout.stages if s not in funnel],
        "funnel_violations": "drop",
    }
    doc = {k: v for k, v in doc.items() if v != []}
    viol = ", ".join(f"{k}: {v}" for k, v in report.funnel_violations.items()) or "none"
    head = (
        f"# {layout.name} event log converted by `mtrank convert {layout.name}` "
        f"({layout.download}).\n"
        f"# One row per viewed (user, item) pair: a '{layout.entry}' is a click, so the funnel "
        "starts after it.\n"
        f"# Funnel violations found: {viol}. `drop` removes those rows when training; "
        "declare another\n# funnel (`--funnel`) or a one-stage one to keep them.\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False)


def convert_staged_log(
    path: str | Path,
    out: str | Path,
    layout: StagedLayout | str,
    *,
    funnel: list[str] | None = None,
    bad_rows: str = "error",
    part_rows: int = 1_000_000,
    bucket_mb: int = 512,
    buckets: int | None = None,
    block_bytes: int = BLOCK_BYTES,
    overwrite: bool = False,
    test_fraction: float = 0.0,
) -> StagedReport:
    """Convert one event log into ``out``: ``data/`` (Parquet parts), ``schema.yaml`` and
    ``conversion.json``, all appearing at once (staging directory renamed into place).

    Args:
        path: the event file (``.csv``, or compressed ``.csv.gz``).
        layout: a :class:`StagedLayout` or a name in :data:`LAYOUTS`.
        funnel: the schema's stage order (default: the layout's), a subset of its stages.
        bad_rows: ``error`` (default) or ``skip`` (dropped and counted).
        part_rows: rows per Parquet part at most; ``bucket_mb``/``buckets``: hash buckets.
        test_fraction: 0 (default): every row in ``data/``; in (0, 1): rows first viewed in the
            last ``test_fraction`` of the log's view-time span go to ``test/``, the others to
            ``train/`` (a time split; ``report.test_from`` is the cut-off).

    Raises:
        DataError: a bad row (an unknown event, an empty id, a time that is not an integer, a
            line with the wrong field count) naming file, column and row; a wrong header.
        ConfigError: an unknown layout or stage, a non-empty ``out`` without ``overwrite``.
    """
    t0 = time.perf_counter()
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
        layout = LAYOUTS[layout]
    funnel = list(funnel or layout.funnel)
    unknown = [s for s in funnel if s not in layout.stages]
    if unknown or not funnel or len(set(funnel)) != len(funnel):
        raise ConfigError(
            f"--funnel must list distinct stages of {list(layout.stages)}, got {funnel}"
        )
    if part_rows < 1 or bucket_mb < 1:
        raise ConfigError("--part-rows and --bucket-mb must be ≥ 1")
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise DataError("file does not exist", file=str(path))
    if layout.header:
        _check_header(path, layout)
    refuse_nonempty(out, overwrite)
    bad = BadRows(bad_rows)
    report = StagedReport(layout=layout.name, source=str(path), out=str(out))
    with staged_output(out) as staging:
        n = buckets or bucket_count(path.stat().st_size, bucket_mb << 20)
        with Buckets(n, staging) as files:
            report.buckets = files.n
            _pass1(path, layout, files, bad, report, block_bytes)
            files.close()
            empty = {
                ROW: pl.UInt64,
                layout.user: pl.String,
                layout.item: pl.String,
                "__event": pl.String,
                "__t": pl.Int64,
                **dict.fromkeys(layout.keep, pl.String),
            }

            if test_fraction and report.view_time_range:
                lo, hi = report.view_time_range
                report.test_from = int(hi - test_fraction * (hi - lo))

            def parts() -> Iterator[pl.DataFrame]:
                for b in range(files.n):
                    ev = files.read("events", b, lambda: pl.DataFrame(schema=empty))
                    if ev.height == 0:
                        continue
                    rows = _pairs(ev, layout, funnel, report)
                    report.rows += rows.height
                    if report.test_from is not None:
                        test = pl.col(layout.time) >= report.test_from
                        files.add("test", rows.filter(test), layout.user)
                        rows = rows.filter(~test)
                    for start in range(0, rows.height, part_rows):
                        yield rows.slice(start, part_rows)

            if report.test_from is None:
                write_parts_dir(parts(), staging / "data")
            else:
                write_parts_dir(parts(), staging / "train")
                files.close()
                tests = (files.read("test", b, pl.DataFrame) for b in range(files.n))
                tests = (t.sort(layout.time) for t in tests if t.height)
                write_parts_dir(_counted(tests, report), staging / "test")
        report.skipped = dict(bad.skipped)
        report.seconds = round(time.perf_counter() - t0, 3)
        write_conversion_files(staging, schema_yaml(layout, funnel, report), report)
    return report
