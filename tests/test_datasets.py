"""Built-in loaders on the real data in ../shared/data."""

import polars as pl
import pytest

from mtrank.data.datasets import DATASETS
from mtrank.data.simulate import SimConfig, simulate
from mtrank.errors import DatasetNotFoundError
from mtrank.workflow import load_data


def test_hillstrom_funnel_rates(shared_data):
    data = load_data("hillstrom", data_dir=shared_data)
    df = data.splits["all"]
    assert df.height == 64_000
    assert df["visit"].mean() == pytest.approx(0.14678, abs=1e-5)
    assert df["conversion"].sum() == 578
    assert df["spend"].mean() == pytest.approx(1.0509, abs=1e-4)


def test_aliccp_processed_schema(shared_data):
    data = load_data("aliccp", data_dir=shared_data)
    assert {k: v.height for k, v in data.splits.items()} == {"train": 100, "val": 50, "test": 50}
    assert (
        int(data.splits["train"]["click"].sum()) == 7
        and int(data.splits["train"]["purchase"].sum()) == 1
    )


def test_aliccp_aitm_copy_has_funnel_violations_reported(shared_data):
    schema = DATASETS["aliccp"].schema.model_copy(
        update={
            "categorical": [
                c
                for c in DATASETS["aliccp"].schema.categorical
                if c not in ("210", "109_14", "110_14", "127_14", "150_14")
            ],
            "numerical": [],
        }
    )
    path = shared_data / "ali-ccp" / "paddlerec-aitm" / "train.csv"
    from mtrank.errors import DataError

    with pytest.raises(DataError, match=r"2 row\(s\) with purchase=1 but click=0"):
        load_data(data=path, schema=schema)
    dropped = load_data(data=path, schema=schema, funnel_violations="drop")
    assert dropped.reports[0].funnel_violations == 2 and dropped.splits["all"].height == 46


def test_aliexpress_processed_schema(shared_data):
    data = load_data("aliexpress", data_dir=shared_data)
    assert data.splits["train"].height == 100 and data.splits["test"].height == 20
    assert int(data.splits["train"]["click"].sum()) == 60


def test_census_two_tasks(shared_data):
    data = load_data("census", data_dir=shared_data)
    df = data.splits["all"]
    assert df.height == 99_762
    assert int(df["income"].sum()) == 6_186 and int(df["never_married"].sum()) == 43_143
    assert "marital_stat" not in data.schema.feature_columns


def test_missing_dataset_names_files_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="minethatdata") as e:
        load_data("hillstrom", data_dir=tmp_path)
    assert "--data-dir" in str(e.value)


def test_simulator_is_deterministic_and_calibrated():
    cfg = SimConfig(rows=100_000, seed=1)
    a, b = simulate(cfg), simulate(cfg)
    assert a.equals(b)
    assert a["click"].mean() == pytest.approx(0.04, abs=0.004)
    clicked = a.filter(pl.col("click") == 1)
    assert clicked["conversion"].mean() == pytest.approx(0.10, abs=0.015)
    assert a.filter((pl.col("click") == 0) & (pl.col("conversion") == 1)).height == 0


def test_simulator_has_all_four_quadrants():
    df = simulate(SimConfig(rows=200_000, seed=0))
    items = df.group_by("item_id").agg(
        pl.col("true_ctr").mean(), pl.col("true_cvr_do").mean(), pl.len()
    )
    items = items.filter(pl.col("len") >= 20)
    ctr_hi = items["true_ctr"] > items["true_ctr"].median()
    cvr_hi = items["true_cvr_do"] > items["true_cvr_do"].median()
    quadrant_counts = [int((a & b).sum()) for a in (ctr_hi, ~ctr_hi) for b in (cvr_hi, ~cvr_hi)]
    assert min(quadrant_counts) > 0.1 * items.height
    # the latent intent makes an impression convert more often once clicked than if clicked at
    # random
    assert (df["true_cvr_clicked"] > df["true_cvr_do"]).all()
