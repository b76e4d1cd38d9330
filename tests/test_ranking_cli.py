"""`mtrank quadrants` and `mtrank fuse` end to end on small data (in-process, through typer's
runner: the subprocess path of the CLI is covered by tests/test_cli.py)."""

import json

import numpy as np
import polars as pl
import pytest

from conftest import cli_in_process

from mtrank.data.simulate import SimConfig, simulate
from mtrank.ranking.fusion import Multiplicative, load_fusion


mtrank = cli_in_process


@pytest.fixture(scope="module")
def sim_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    data = root / "sim.parquet"
    simulate(
        SimConfig(rows=12_000, slate_size=20, n_items=200, n_users=500, cvr=0.2, seed=3)
    ).write_parquet(data)
    bundle = root / "esmm"
    r = mtrank(
        "train",
        "--data",
        data,
        "--schema",
        "simulated",
        "--epochs",
        1,
        "--tower",
        "16",
        "--embedding-dim",
        4,
        "--weight-by-price",
        "--out",
        bundle,
        "-q",
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads((bundle / "config.json").read_text())["meta"]
    assert meta["weighting"]["cap"] == 3.0 and meta["weighting"]["mean_log1p_price_converted"] > 0
    return data, bundle


def test_quadrants_and_fuse_on_the_simulator(sim_bundle, tmp_path):
    data, bundle = sim_bundle
    q = tmp_path / "q"
    r = mtrank(
        "quadrants", "--data", data, "--bundle", bundle, "--mean-of", "true_cvr_do", "--out", q
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((q / "quadrants.json").read_text())
    shares = {row["quadrant"]: row for row in doc["quadrants"]}
    assert set(shares) == {"I", "II", "III", "IV"}
    assert sum(row["impressions_share"] for row in doc["quadrants"]) == pytest.approx(1.0)
    assert sum(row["gmv_share"] for row in doc["quadrants"]) == pytest.approx(1.0)
    # quadrant I converts far better than quadrant III, by the simulator's truth too
    assert shares["I"]["mean_true_cvr_do"] > shares["III"]["mean_true_cvr_do"]
    ent = pl.read_csv(q / "entities.csv")
    assert {"item_id", "ctr", "cvr", "p_ctr", "p_cvr", "quadrant"} <= set(
        ent.columns
    ) and ent.height <= 200
    assert (q / "quadrants.png").stat().st_size > 10_000

    f = tmp_path / "f"
    r = mtrank(
        "fuse",
        "--data",
        data,
        "--bundle",
        bundle,
        "--method",
        "grid",
        "--grid-points",
        3,
        "--k",
        5,
        "--objective",
        "exp_gmv",
        "--split",
        "all",
        "--out",
        f,
    )
    assert r.returncode == 0, r.stderr
    fusion = load_fusion(f / "fusion.json")
    assert isinstance(fusion, Multiplicative) and fusion.eps == 1.0
    doc = json.loads((f / "fusion.json").read_text())
    assert doc["k"] == 5 and doc["price_column"] == "price" and doc["tuned_on"]["trials"] == 27
    replay = json.loads((f / "replay.json").read_text())
    assert {"pctr", "pctcvr", "expected_gmv", "logged", "fused"} == set(replay["heldout"])
    assert replay["requests"] == 600 and 0 <= replay["quadrant_II"]["fused"] <= 1
    frontier = pl.read_csv(f / "frontier.csv")
    assert frontier.height >= 1 and (np.diff(frontier.get_column("gmv").to_numpy()) < 0).all()
    assert (f / "frontier.png").exists() and "exp_gmv@5" in r.stdout


def test_fuse_price_policy_and_predictions_without_labels(sim_bundle, tmp_path):
    data, bundle = sim_bundle
    bad = tmp_path / "bad.parquet"
    pl.read_parquet(data).with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(-1.0).otherwise(pl.col("price")).alias("price")
    ).write_parquet(bad)
    r = mtrank(
        "fuse",
        "--data",
        bad,
        "--bundle",
        bundle,
        "--split",
        "all",
        "--method",
        "grid",
        "--grid-points",
        2,
        "--out",
        tmp_path / "f",
    )
    assert (
        r.returncode == 2
        and "'price'" in r.stderr
        and "rows 1, 2, 3" in r.stderr
        and "Traceback" not in r.stderr
    )
    r = mtrank(
        "fuse",
        "--data",
        bad,
        "--bundle",
        bundle,
        "--split",
        "all",
        "--method",
        "grid",
        "--grid-points",
        2,
        "--price-policy",
        "drop",
        "--out",
        tmp_path / "f",
    )
    assert r.returncode == 0, r.stderr
    assert (
        json.loads((tmp_path / "f" / "replay.json").read_text())["data"]["dropped_price_rows"] == 3
    )
    preds = tmp_path / "p.parquet"
    assert mtrank("predict", "--bundle", bundle, "--data", data, "--out", preds).returncode == 0
    r = mtrank("fuse", "--predictions", preds, "--schema", "simulated", "--out", tmp_path / "g")
    assert r.returncode == 2 and "no label column 'click'" in r.stderr


def test_quadrants_on_hillstrom_and_aliccp(shared_data, tmp_path):
    r = mtrank("quadrants", "-d", "hillstrom", "--data-dir", shared_data, "--out", tmp_path / "h")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "h" / "quadrants.json").read_text())
    assert doc["entity"] == ["segment", "channel", "history_segment"] and doc["rows"] == 64_000
    assert sum(q["conversions_share"] for q in doc["quadrants"]) == pytest.approx(1.0)
    assert sum(q["gmv_share"] for q in doc["quadrants"]) == pytest.approx(1.0)
    r = mtrank("quadrants", "-d", "aliccp", "--data-dir", shared_data, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "a" / "quadrants.json").read_text())
    assert doc["entity"] == ["205"] and all(q["gmv_share"] is None for q in doc["quadrants"])
    assert "GMV" in doc["notes"][0] and "n/a" in r.stderr
