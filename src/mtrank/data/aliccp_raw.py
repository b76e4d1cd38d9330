"""Converting the raw Ali-CCP files (Tianchi data set 408) to Parquet and a schema YAML.

Ali-CCP (Alibaba Click and Conversion Prediction; Ma et al., SIGIR 2018, "Entire Space
Multi-Task Model", §4.1), https://tianchi.aliyun.com/dataset/408, ships per split two files
without header:

* ``sample_skeleton_{train,test}.csv``: ``sample_id,click,buy,md5,feature_num,feature_list``,
  one impression per line; ``md5`` keys the user's common features;
* ``common_features_{train,test}.csv``: ``md5,feature_num,feature_list``.

``feature_list`` holds ``feature_num`` entries separated by ``\\x01``, each
``field_id\\x02feature_id\\x03value``. A field becomes one column (named by its field id, e.g.
``205``) of one of three kinds (:data:`ALICCP_RAW_FIELDS` holds the 23 documented fields; any
other field's kind is inferred from the data, see :func:`infer_kind`):

* ``categorical``: at most one entry per sample → a String column (null when absent);
* ``list``: several entries, all values 1 → ``list<string>`` (empty when absent);
* ``weighted_list``: values that are not 1 (counts) → ``list<struct<id: string, weight:
  double>>``, the weighted form of the schema's ``lists`` kind (see docs/features.md).

The conversion streams in bounded memory: pass 1 reads both files block by block, checks every
row (field count, labels, entries, ``feature_num``), profiles the fields and writes the parsed
entries into hash buckets of ``md5`` on disk; pass 2 joins and shapes one bucket at a time and
writes Parquet parts (a Grace hash join). Output rows are grouped by bucket, in file order within
one; ``sample_id`` keeps the original order recoverable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
import yaml

from mtrank.data.datasets import ALICCP_SPARSE
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

FieldKind = Literal["categorical", "list", "weighted_list"]
KINDS: tuple[str, ...] = ("categorical", "list", "weighted_list")

SKELETON_COLUMNS = ["sample_id", "click", "buy", "md5", "feature_num", "feature_list"]
COMMON_COLUMNS = ["md5", "feature_num", "feature_list"]
ENTRY_SEP, FIELD_SEP, VALUE_SEP = "\x01", "\x02", "\x03"
_ENTRY = r"^([^\x02\x03]+)\x02([^\x02\x03]+)\x03([^\x02\x03]+)$"
MAX_LIST_LEN = 10_000  # the schema's largest max_len

# The 23 fields of the ESMM paper's Ali-CCP description (§4.1), whose ids name the columns of the
# processed CSVs too (:data:`mtrank.data.datasets.ALICCP_SPARSE`). User fields come from the
# common features, the others from the skeleton. The four user-history fields *_14 (category,
# shop, brand and intention-node ids with counts) and the four combination fields 508 (109_14 ×
# 206), 509 (110_14 × 207), 702 (127_14 × 216) and 853 (150_14 × 210) carry counts as values:
# weighted lists. The others (101 user, 121-129 user profile, 205 item, 206 category, 207 shop,
# 210 intention node, 216 brand, 301 scenario) are single-valued.
ALICCP_WEIGHTED = ("109_14", "110_14", "127_14", "150_14", "508", "509", "702", "853")
ALICCP_RAW_FIELDS: dict[str, FieldKind] = {
    f: "weighted_list" if f in ALICCP_WEIGHTED else "categorical" for f in ALICCP_SPARSE
}
DOWNLOAD_PAGE = "https://tianchi.aliyun.com/dataset/408"


@dataclass
class FieldProfile:
    """What pass 1 saw of one field: samples holding it, entries, the largest entry count in a
    sample, entries whose value is not 1, and the first sample with more than one entry."""

    samples: int = 0
    entries: int = 0
    max_entries: int = 0
    not_one: int = 0
    first_multi: tuple[str, int] | None = None  # (file, row)


@dataclass
class ConversionReport:
    """What the conversion did; written as ``conversion.json`` beside the data."""

    source: str
    out: str
    rows: dict[str, int] = field(default_factory=dict)
    buy_without_click: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    fields: dict[str, dict] = field(default_factory=dict)
    absent_fields: list[str] = field(default_factory=list)
    buckets: int = 1
    seconds: float = 0.0


def infer_kind(p: FieldProfile) -> FieldKind:
    """The kind of a field not declared: weighted when any value is not 1, else a list when a
    sample holds several entries, else categorical."""
    if p.not_one:
        return "weighted_list"
    return "list" if p.max_entries > 1 else "categorical"


def parse_fields_option(items: list[str] | None) -> dict[str, FieldKind]:
    """``["FIELD=kind", ...]`` (the CLI's ``--field``) as a dict.

    Raises:
        ConfigError: an item without ``=`` or an unknown kind.
    """
    out: dict[str, FieldKind] = {}
    for item in items or []:
        name, sep, kind = item.partition("=")
        if not sep or not name or kind not in KINDS:
            raise ConfigError(f"--field takes FIELD=KIND with KIND in {list(KINDS)}, got {item!r}")
        out[name] = kind  # type: ignore[assignment]
    return out


def find_split_files(src: Path) -> dict[str, tuple[Path, Path]]:
    """``{split: (skeleton, common)}`` for the splits whose two files are under ``src``
    (``.csv`` or compressed ``.csv.gz`` …).

    Raises:
        DataError: no split has both files, or a split has only one of them.
    """
    out: dict[str, tuple[Path, Path]] = {}
    for split in ("train", "test"):
        found = []
        for stem in (f"sample_skeleton_{split}", f"common_features_{split}"):
            hits = sorted(src.glob(f"{stem}.csv*"))
            found.append(hits[0] if hits else None)
        if found[0] is None and found[1] is None:
            continue
        if None in found:
            have, miss = (
                (found[0], "common_features") if found[1] is None else (found[1], "sample_skeleton")
            )
            raise DataError(
                f"{have.name} needs {miss}_{split}.csv beside it (the two raw files of a split "
                "are joined on md5)",
                file=str(src),
            )
        out[split] = (found[0], found[1])
    if not out:
        raise DataError(
            "no raw Ali-CCP files: expected sample_skeleton_{train,test}.csv and "
            f"common_features_{{train,test}}.csv (download: {DOWNLOAD_PAGE})",
            file=str(src),
        )
    return out


def parse_entries(
    df: pl.DataFrame, key: str, source: str, bad: BadRows
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Explode ``feature_list`` into one row per entry and check it.

    Args:
        df: String columns ``key``, ``feature_num``, ``feature_list`` and ``__row``.

    Returns:
        ``(df, entries)``: ``df`` without the rows dropped under ``--bad-rows skip``, and the
        entries ``(key, __row, field, fid, value: Float64)``.

    Raises:
        DataError: an entry that is not ``field\\x02id\\x03value`` (or whose value is not a
            finite number ≥ 0), or a ``feature_num`` that is not the number of entries, naming
            file, column and rows.
    """
    ent = (
        df.select(key, ROW, pl.col("feature_list").str.split(ENTRY_SEP).alias("e"))
        .explode("e")
        .filter(pl.col("e") != "")
        .with_columns(pl.col("e").str.extract_groups(_ENTRY).alias("g"))
        .with_columns(
            pl.col("g").struct.field("1").alias("field"),
            pl.col("g").struct.field("2").alias("fid"),
            pl.col("g").struct.field("3").cast(pl.Float64, strict=False).alias("value"),
        )
    )
    malformed = ent.filter(pl.col("field").is_null())[ROW].unique()
    df = bad.handle(
        df,
        pl.col(ROW).is_in(malformed.implode()),
        source=source,
        column="feature_list",
        reason="an entry is not field_id\\x02feature_id\\x03value",
    )
    badval = ent.filter(
        pl.col("field").is_not_null()
        & (pl.col("value").is_null() | ~pl.col("value").is_finite() | (pl.col("value") < 0))
    )[ROW].unique()
    df = bad.handle(
        df,
        pl.col(ROW).is_in(badval.implode()),
        source=source,
        column="feature_list",
        reason="an entry's value is not a finite number >= 0",
    )
    counts = ent.group_by(ROW).len("n")
    mismatch = (
        df.select(ROW, "feature_num")
        .join(counts, on=ROW, how="left")
        .filter(
            (
                pl.col("feature_num").cast(pl.Int64, strict=False) != pl.col("n").fill_null(0)
            ).fill_null(True)
        )[ROW]
    )
    df = bad.handle(
        df,
        pl.col(ROW).is_in(mismatch.implode()),
        source=source,
        column="feature_num",
        reason="feature_num is not the number of entries in feature_list",
    )
    ent = ent.filter(pl.col(ROW).is_in(df[ROW].implode())).select(key, ROW, "field", "fid", "value")
    return df, ent


def _profile(ent: pl.DataFrame, source: str, profiles: dict[str, FieldProfile]) -> None:
    per = ent.group_by(ROW, "field").agg(
        pl.len().alias("n"), (pl.col("value") != 1.0).sum().alias("not_one")
    )
    stats = per.group_by("field").agg(
        pl.len().alias("samples"),
        pl.col("n").sum().alias("entries"),
        pl.col("n").max().alias("max_n"),
        pl.col("not_one").sum().alias("not_one"),
        pl.col(ROW).filter(pl.col("n") > 1).min().alias("first_multi"),
    )
    for r in stats.iter_rows(named=True):  # one row per field (~20), not per sample
        p = profiles.setdefault(r["field"], FieldProfile())
        p.samples += r["samples"]
        p.entries += r["entries"]
        p.max_entries = max(p.max_entries, r["max_n"])
        p.not_one += r["not_one"]
        if p.first_multi is None and r["first_multi"] is not None:
            p.first_multi = (source, int(r["first_multi"]))


def _check_labels(df: pl.DataFrame, source: str, bad: BadRows) -> pl.DataFrame:
    for col in ("click", "buy"):
        df = bad.handle(
            df,
            ~pl.col(col).is_in(["0", "1"]),
            source=source,
            column=col,
            reason=f"{col} must be 0 or 1",
        )
    return df.with_columns(pl.col("click").cast(pl.Int8), pl.col("buy").cast(pl.Int8))


def _pass1(
    split: str,
    skeleton: Path,
    common: Path,
    buckets: Buckets,
    bad: BadRows,
    profiles: dict[str, FieldProfile],
    block_bytes: int,
) -> None:
    """Read, check and profile both files of a split; write rows and entries into buckets."""
    for batch in iter_csv_batches(
        common, COMMON_COLUMNS, header=False, bad=bad, block_bytes=block_bytes
    ):
        batch, ent = parse_entries(batch, "md5", str(common), bad)
        _profile(ent, str(common), profiles)
        buckets.add(f"{split}-crow", batch.select(ROW, "md5"), "md5")
        buckets.add(f"{split}-cent", ent.rename({ROW: "__crow"}), "md5")
    for batch in iter_csv_batches(
        skeleton, SKELETON_COLUMNS, header=False, bad=bad, block_bytes=block_bytes
    ):
        batch = _check_labels(batch, str(skeleton), bad)
        batch, ent = parse_entries(batch, "md5", str(skeleton), bad)
        _profile(ent, str(skeleton), profiles)
        buckets.add(f"{split}-srow", batch.select(ROW, "sample_id", "click", "buy", "md5"), "md5")
        buckets.add(f"{split}-sent", ent, "md5")


def _dtype(kind: str) -> pl.DataType:
    if kind == "categorical":
        return pl.String()
    if kind == "list":
        return pl.List(pl.String)
    return pl.List(pl.Struct({"id": pl.String, "weight": pl.Float64}))


def _shape(ent: pl.DataFrame, key: str, kinds: dict[str, str]) -> pl.DataFrame:
    """Entries ``(key, field, fid, value)`` → one row per key, one column per field present."""
    out = ent.select(key).unique()
    for kind in KINDS:
        fields = [f for f, k in kinds.items() if k == kind]
        sub = ent.filter(pl.col("field").is_in(fields))
        if sub.height == 0:
            continue
        if kind == "categorical":
            agg = pl.col("fid").first()
        elif kind == "list":
            agg = pl.col("fid")
        else:
            agg = pl.struct(pl.col("fid").alias("id"), pl.col("value").alias("weight"))
        wide = (
            sub.group_by(key, "field", maintain_order=True)
            .agg(agg.alias("v"))
            .pivot(on="field", index=key, values="v")
        )
        out = out.join(wide, on=key, how="left")
    return out


def _common_wide(
    crow: pl.DataFrame, cent: pl.DataFrame, kinds: dict[str, str], common: str, bad: BadRows
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One bucket's common features: ``(crow, wide)``, one row per md5 key; a key on several
    lines is an error, or (``--bad-rows skip``) its first line is kept and the others counted."""
    dup = crow.filter(pl.col("md5").is_duplicated())
    if dup.height:
        if bad.policy == "error":
            key = dup.sort(ROW)["md5"][0]
            raise DataError(
                f"md5 key {key!r} appears on more than one line; each key must be unique (or "
                "pass --bad-rows skip to keep its first line)",
                file=common,
                column="md5",
                rows=sorted(dup.filter(pl.col("md5") == key)[ROW].to_list()),
            )
        keep = crow.sort(ROW).unique("md5", keep="first", maintain_order=True)
        bad.count(common, "duplicate md5 key (first line kept)", crow.height - keep.height)
        crow = keep
        cent = cent.filter(pl.col("__crow").is_in(keep[ROW].implode()))
    return crow, _shape(cent.drop("__crow"), "md5", kinds)


def _join_chunk(
    srow: pl.DataFrame,
    sent: pl.DataFrame,
    crow: pl.DataFrame,
    wide_c: pl.DataFrame,
    kinds: dict[str, str],
    *,
    skeleton: str,
    common: str,
    bad: BadRows,
) -> pl.DataFrame:
    """Samples with their skeleton and common fields as columns (one column per field)."""
    srow = bad.handle(
        srow,
        ~pl.col("md5").is_in(crow["md5"].implode()),
        source=skeleton,
        column="md5",
        reason=f"the md5 key is not in {Path(common).name}",
    )
    sent = sent.filter(pl.col(ROW).is_in(srow[ROW].implode()))
    wide_s = _shape(sent.drop("md5"), ROW, kinds)
    both = [c for c in wide_s.columns if c in wide_c.columns and c not in (ROW, "md5")]
    out = srow.join(wide_s, on=ROW, how="left").join(wide_c, on="md5", how="left", suffix="__c")
    for c in both:  # a field in both files: lists concatenated; a categorical must not clash
        if kinds[c] == "categorical":
            out = bad.handle(
                out,
                pl.col(c).is_not_null() & pl.col(c + "__c").is_not_null(),
                source=skeleton,
                column=c,
                reason=f"categorical field {c} is set in both files; declare it a list",
            )
            out = out.with_columns(pl.coalesce(c, c + "__c").alias(c)).drop(c + "__c")
        else:
            out = out.with_columns(
                pl.concat_list(pl.col(c).fill_null([]), pl.col(c + "__c").fill_null([])).alias(c)
            ).drop(c + "__c")
    cols = []
    for f, kind in kinds.items():
        if f not in out.columns:
            cols.append(pl.lit(None, dtype=_dtype(kind)).alias(f))
        elif kind != "categorical":
            cols.append(pl.col(f).cast(_dtype(kind)).fill_null(pl.lit([], dtype=_dtype(kind))))
        else:
            cols.append(pl.col(f).cast(pl.String))
    out = out.with_columns(cols)
    return out.sort(ROW).select("sample_id", "click", "buy", "md5", *kinds)


def _pass2(
    split: str,
    skeleton: Path,
    common: Path,
    buckets: Buckets,
    kinds: dict[str, str],
    bad: BadRows,
    part_rows: int,
) -> Iterator[pl.DataFrame]:
    """One bucket at a time: join, shape, and yield parts of at most ``part_rows`` rows."""
    s, f64, u64 = pl.String, pl.Float64, pl.UInt64
    tables = {
        "srow": {ROW: u64, "sample_id": s, "click": pl.Int8, "buy": pl.Int8, "md5": s},
        "sent": {"md5": s, ROW: u64, "field": s, "fid": s, "value": f64},
        "crow": {ROW: u64, "md5": s},
        "cent": {"md5": s, "__crow": u64, "field": s, "fid": s, "value": f64},
    }
    for b in range(buckets.n):
        got = {
            t: buckets.read(f"{split}-{t}", b, lambda cols=cols: pl.DataFrame(schema=cols))
            for t, cols in tables.items()
        }
        if got["srow"].height == 0:
            continue
        crow, wide_c = _common_wide(got["crow"], got["cent"], kinds, str(common), bad)
        srow, sent = got["srow"].sort(ROW), got["sent"]
        for start in range(0, srow.height, part_rows):
            chunk = srow.slice(start, part_rows)
            yield _join_chunk(
                chunk,
                sent.filter(pl.col(ROW).is_in(chunk[ROW].implode())),
                crow,
                wide_c,
                kinds,
                skeleton=str(skeleton),
                common=str(common),
                bad=bad,
            )


def schema_yaml(kinds: dict[str, str], profiles: dict[str, FieldProfile], name: str) -> str:
    """The schema YAML for the converted data (labels ``click`` → ``buy``; categorical fields
    under ``categorical``, list and weighted-list fields under ``lists``)."""
    lists = []
    for f, kind in kinds.items():
        if kind == "categorical":
            continue
        seen = profiles.get(f, FieldProfile()).max_entries
        entry = {"column": f, "weighted": kind == "weighted_list"}
        entry["max_len"] = int(min(max(seen, 1), MAX_LIST_LEN))
        entry["pooling"] = "mean"  # weighted mean for counts: invariant to their scale
        lists.append(entry)
    doc = {
        "name": name,
        "click": "click",
        "conversion": "buy",
        "user_id": "101" if "101" in kinds else None,
        "item_id": "205" if "205" in kinds else None,
        "categorical": [f for f, k in kinds.items() if k == "categorical"],
        "lists": lists,
        "passthrough": ["sample_id"],
    }
    doc = {k: v for k, v in doc.items() if v not in (None, [])}
    head = (
        "# Ali-CCP raw files converted by `mtrank convert aliccp-raw` "
        f"({DOWNLOAD_PAGE}).\n# lists: max_len is the largest count seen in one sample; "
        "lower it to trade recall for speed.\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def convert_aliccp_raw(
    src: str | Path,
    out: str | Path,
    *,
    fields: dict[str, FieldKind] | None = None,
    bad_rows: str = "error",
    part_rows: int = 500_000,
    bucket_mb: int = 512,
    block_bytes: int = BLOCK_BYTES,
    overwrite: bool = False,
    buckets: int | None = None,
) -> ConversionReport:
    """Convert raw Ali-CCP files under ``src`` into ``out``: ``train/`` and ``test/`` (Parquet
    parts), ``schema.yaml`` and ``conversion.json``. The whole of ``out`` appears at once (a
    staging directory renamed into place); a failure leaves no partial output.

    Args:
        src: folder holding ``sample_skeleton_{split}.csv`` and ``common_features_{split}.csv``
            (either split may be absent, not half of one).
        fields: kinds for field ids, over :data:`ALICCP_RAW_FIELDS` (others: inferred).
        bad_rows: ``error`` (default) or ``skip`` (dropped and counted in the report).
        part_rows: rows per Parquet part at most.
        bucket_mb: raw megabytes per hash bucket (memory ≈ a few times this per bucket).
        block_bytes: bytes of CSV text parsed at a time.
        overwrite: replace a non-empty ``out`` whole.
        buckets: the number of hash buckets (default: from ``bucket_mb`` and the input size).

    Returns:
        The :class:`ConversionReport` (also written as ``conversion.json``).

    Raises:
        DataError: a bad row (file, column and row named), a declared categorical field with
            several entries in a sample, missing files.
        ConfigError: ``out`` exists and is not empty (without ``overwrite``), bad options.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if part_rows < 1 or bucket_mb < 1:
        raise ConfigError("--part-rows and --bucket-mb must be ≥ 1")
    files = find_split_files(src)
    refuse_nonempty(out, overwrite)
    declared = {**ALICCP_RAW_FIELDS, **(fields or {})}
    bad = BadRows(bad_rows)
    total = sum(p.stat().st_size for pair in files.values() for p in pair)
    report = ConversionReport(source=str(src), out=str(out))
    with staged_output(out) as staging:
        profiles: dict[str, FieldProfile] = {}
        n_buckets = buckets or bucket_count(total, bucket_mb << 20)
        with Buckets(n_buckets, staging) as bucket_files:
            report.buckets = bucket_files.n
            for split, (skeleton, common) in files.items():
                _pass1(split, skeleton, common, bucket_files, bad, profiles, block_bytes)
            bucket_files.close()
            kinds = _resolve_kinds(declared, profiles)
            for split, (skeleton, common) in files.items():
                parts = _pass2(split, skeleton, common, bucket_files, kinds, bad, part_rows)
                counted = _count(parts, split, report)
                write_parts_dir(counted, staging / split)
        report.skipped = dict(bad.skipped)
        report.absent_fields = [f for f in declared if f not in kinds]
        report.fields = {
            f: {"kind": kinds[f], **asdict(profiles.get(f, FieldProfile()))} for f in kinds
        }
        report.seconds = round(time.perf_counter() - t0, 3)
        write_conversion_files(staging, schema_yaml(kinds, profiles, "aliccp_raw"), report)
    return report


def _count(parts: Iterator[pl.DataFrame], split: str, report: ConversionReport):
    report.rows[split] = 0
    report.buy_without_click[split] = 0
    for part in parts:
        report.rows[split] += part.height
        report.buy_without_click[split] += int(((part["buy"] == 1) & (part["click"] == 0)).sum())
        yield part


def _resolve_kinds(
    declared: dict[str, FieldKind], profiles: dict[str, FieldProfile]
) -> dict[str, str]:
    """Kinds of the fields seen in the data: the declared ones (checked against the data) in
    declaration order, then the others (inferred, :func:`infer_kind`) by id. A declared field
    that never occurs gets no column (the report lists it under ``absent_fields``)."""
    kinds: dict[str, str] = {}
    for f, kind in declared.items():
        p = profiles.get(f)
        if p is None:
            continue
        if kind == "categorical" and p.max_entries > 1:
            file, row = p.first_multi or ("?", 0)
            raise DataError(
                f"field {f} is declared categorical but a sample holds {p.max_entries} entries "
                f"of it; declare it a list (--field {f}=list, or {f}=weighted_list)",
                file=file,
                column="feature_list",
                rows=[row],
            )
        kinds[f] = kind
    for f in sorted(set(profiles) - set(declared)):
        kinds[f] = infer_kind(profiles[f])
    return kinds
