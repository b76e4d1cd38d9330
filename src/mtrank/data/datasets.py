"""Built-in datasets with ready-made schemas, and the data-directory rules.

The data directory is, in order: the ``--data-dir`` option, the ``MTRANK_DATA_DIR`` environment
variable, then ``./data``. Each dataset lives in a sub-folder of it; a missing file raises
:class:`~mtrank.errors.DatasetNotFoundError` naming the files expected and where to get them.
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from mtrank.data.io import ROW, ValidationReport, read_table, validate_frame
from mtrank.data.schema import Schema
from mtrank.data.simulate import SIMULATED_SCHEMA
from mtrank.errors import DatasetNotFoundError

ENV_DATA_DIR = "MTRANK_DATA_DIR"


def resolve_data_dir(option: str | Path | None = None) -> Path:
    """The data directory: ``option``, else ``$MTRANK_DATA_DIR``, else ``./data``."""
    if option is not None:
        return Path(option).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else Path("data")


@dataclass
class LoadedData:
    """Validated tables of a dataset. ``splits`` holds the files' own splits (``train``, ``val``,
    ``test``) when the dataset ships them, else a single ``all`` table to be split."""

    schema: Schema
    splits: dict[str, pl.DataFrame]
    sources: dict[str, str]
    reports: list[ValidationReport] = field(default_factory=list)


def load_table(
    path: str | Path, schema: Schema, *, require_labels: bool = True
) -> tuple[pl.DataFrame, ValidationReport]:
    """Read and validate one file against ``schema`` (see :func:`mtrank.data.io.validate_frame`)."""
    df = read_table(path)
    return validate_frame(df, schema, str(path), require_labels=require_labels)


def _find(folder: Path, candidates: list[str], dataset: str, hint: str) -> Path:
    for name in candidates:
        hits = sorted(folder.glob(name))
        if hits:
            return hits[0]
    raise DatasetNotFoundError(
        f"dataset {dataset!r}: none of {candidates} found under {folder}. {hint} "
        f"Point --data-dir (or ${ENV_DATA_DIR}) at the folder that holds {folder.name}/."
    )


# --- Hillstrom -------------------------------------------------------------------------------

HILLSTROM_FILE = "Kevin_Hillstrom_MineThatData_E-MailAnalytics_DataMiningChallenge_2008.03.20.csv"
HILLSTROM_SCHEMA = Schema(
    name="hillstrom",
    click="visit",
    conversion="conversion",
    price="spend",
    categorical=["history_segment", "mens", "womens", "zip_code", "newbie", "channel", "segment"],
    numerical=["recency", "history"],
)


def load_hillstrom(data_dir: Path, schema: Schema) -> LoadedData:
    """Hillstrom e-mail test (64,000 customers): exposure → visit ("click") → conversion."""
    folder = data_dir / "hillstrom"
    path = _find(
        folder,
        [HILLSTROM_FILE, "hillstrom*.csv", "*.csv"],
        "hillstrom",
        "Download the CSV from http://www.minethatdata.com/" + HILLSTROM_FILE + ".",
    )
    df, rep = load_table(path, schema)
    return LoadedData(schema, {"all": df}, {"all": str(path)}, [rep])


# --- Ali-CCP ---------------------------------------------------------------------------------

ALICCP_SPARSE = [
    "101",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
    "205",
    "206",
    "207",
    "210",
    "216",
    "508",
    "509",
    "702",
    "853",
    "301",
    "109_14",
    "110_14",
    "127_14",
    "150_14",
]
ALICCP_DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
ALICCP_SCHEMA = Schema(
    name="aliccp",
    click="click",
    conversion="purchase",
    user_id="101",
    item_id="205",
    categorical=ALICCP_SPARSE,
    numerical=ALICCP_DENSE,
)
_ALICCP_HINT = (
    "The processed Ali-CCP CSVs (ali_ccp_{train,val,test}.csv, torch-rechub/AITM preprocessing of "
    "Tianchi dataset 408, https://tianchi.aliyun.com/dataset/408) must be downloaded by hand."
)


def _load_split_files(
    data_dir: Path,
    schema: Schema,
    folder_name: str,
    patterns: dict[str, list[str]],
    subdirs: list[str],
    hint: str,
    required: tuple[str, ...],
) -> LoadedData:
    folder = data_dir / folder_name
    splits, sources, reports = {}, {}, []
    for split, names in patterns.items():
        candidates = [f"{d}/{n}" if d else n for d in subdirs for n in names]
        try:
            path = _find(folder, candidates, schema.name, hint)
        except DatasetNotFoundError:
            if split in required:
                raise
            continue
        splits[split], rep = load_table(path, schema)
        sources[split] = str(path)
        reports.append(rep)
    return LoadedData(schema, splits, sources, reports)


def load_aliccp(data_dir: Path, schema: Schema) -> LoadedData:
    """Ali-CCP in the processed CSV schema (click, purchase, 23 sparse fields, 8 dense)."""
    return _load_split_files(
        data_dir,
        schema,
        "ali-ccp",
        {
            s: [f"ali_ccp_{s}.csv", f"ali_ccp_{s}_sample.csv", f"ali_ccp_{s}*.csv"]
            for s in ("train", "val", "test")
        },
        ["", "torch-rechub"],
        _ALICCP_HINT,
        required=("train", "test"),
    )


# --- AliExpress ------------------------------------------------------------------------------

ALIEXPRESS_SCHEMA = Schema(
    name="aliexpress",
    click="click",
    conversion="conversion",
    request_id="search_id",
    categorical=[f"categorical_{i}" for i in range(1, 17)],
    numerical=[f"numerical_{i}" for i in range(1, 64)],
)
_ALIEXPRESS_HINT = (
    "The processed AliExpress CSVs (train.csv / test.csv per country, MTReclib preprocessing of "
    "Tianchi dataset 74690, https://tianchi.aliyun.com/dataset/74690) must be downloaded by hand."
)


def load_aliexpress(data_dir: Path, schema: Schema) -> LoadedData:
    """AliExpress in the processed CSV schema (search_id, 16 categorical, 63 numerical, labels)."""
    return _load_split_files(
        data_dir,
        schema,
        "aliexpress",
        {s: [f"{s}.csv", f"aliexpress_{s}*.csv"] for s in ("train", "test")},
        ["", "torch-rechub"],
        _ALIEXPRESS_HINT,
        required=("train", "test"),
    )


# --- Census-Income (KDD) ---------------------------------------------------------------------

CENSUS_COLUMNS = [
    "age",
    "class_worker",
    "det_ind_code",
    "det_occ_code",
    "education",
    "wage_per_hour",
    "hs_college",
    "marital_stat",
    "major_ind_code",
    "major_occ_code",
    "race",
    "hisp_origin",
    "sex",
    "union_member",
    "unemp_reason",
    "full_or_part_emp",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "tax_filer_stat",
    "region_prev_res",
    "state_prev_res",
    "det_hh_fam_stat",
    "det_hh_summ",
    "instance_weight",
    "mig_chg_msa",
    "mig_chg_reg",
    "mig_move_reg",
    "mig_same",
    "mig_prev_sunbelt",
    "num_emp",
    "fam_under_18",
    "country_father",
    "country_mother",
    "country_self",
    "citizenship",
    "own_or_self",
    "vet_question",
    "vet_benefits",
    "weeks_worked",
    "year",
    "income_50k",
]
CENSUS_NUMERICAL = [
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "num_emp",
    "weeks_worked",
]
CENSUS_SCHEMA = Schema(
    name="census",
    tasks={"income": "income", "never_married": "never_married"},
    categorical=[
        c
        for c in CENSUS_COLUMNS
        if c not in CENSUS_NUMERICAL + ["marital_stat", "income_50k", "instance_weight"]
    ],
    numerical=CENSUS_NUMERICAL,
)


def load_census(data_dir: Path, schema: Schema) -> LoadedData:
    """Census-Income (KDD) as two plain tasks (MMoE paper §4.2): income > 50K, never married."""
    folder = data_dir / "census-income"
    hint = "Download census-income.{data,test}.gz from the UCI repository (Census-Income (KDD))."
    frames, sources, reports = [], [], []
    for name in ("census-income.data.gz", "census-income.test.gz"):
        path = folder / name
        if not path.exists():
            continue
        raw = read_table(path, column_names=CENSUS_COLUMNS, all_strings=True)
        raw = raw.with_columns(pl.col(c).str.strip_chars() for c in CENSUS_COLUMNS)
        raw = raw.with_columns(
            income=(pl.col("income_50k") == "50000+.").cast(pl.Int8),
            never_married=(pl.col("marital_stat") == "Never married").cast(pl.Int8),
        )
        df, rep = validate_frame(raw, schema, str(path))
        frames.append(df)
        sources.append(str(path))
        reports.append(rep)
    if not frames:
        raise DatasetNotFoundError(
            "dataset 'census': no census-income.data.gz or census-income.test.gz under "
            f"{folder}. {hint}"
        )
    df = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    return LoadedData(schema, {"all": df}, {"all": ", ".join(sources)}, reports)


# --- registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    schema: Schema
    loader: Callable[[Path, Schema], LoadedData] | None
    description: str
    batch_size: int = 2048  # quickstart's default: small datasets need more, smaller steps


DATASETS: dict[str, DatasetInfo] = {
    "simulated": DatasetInfo(
        SIMULATED_SCHEMA, None, "synthetic mall with known pCTR/pCVR (mtrank simulate)"
    ),
    "hillstrom": DatasetInfo(
        HILLSTROM_SCHEMA,
        load_hillstrom,
        "Hillstrom e-mail test: exposure → visit → conversion",
        batch_size=256,
    ),
    "aliccp": DatasetInfo(ALICCP_SCHEMA, load_aliccp, "Ali-CCP, processed CSV schema"),
    "aliexpress": DatasetInfo(
        ALIEXPRESS_SCHEMA, load_aliexpress, "AliExpress, processed CSV schema"
    ),
    "census": DatasetInfo(
        CENSUS_SCHEMA, load_census, "Census-Income (KDD), two tasks without a funnel"
    ),
}

__all__ = ["DATASETS", "ROW", "LoadedData", "load_table", "resolve_data_dir"]
