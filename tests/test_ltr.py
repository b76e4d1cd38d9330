"""Learning to rank: grades, request grouping, NDCG by hand, LambdaMART bundle, predict, serve."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from mtrank.data.datasets import LoadedData, load_table
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.io import validate_frame
from mtrank.data.schema import Schema
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.data.split import SplitConfig, split_data
from mtrank.errors import ConfigError, DataError
from mtrank.models.ltr import (
    GradeLevels,
    LTRConfig,
    relevance_grades,
    request_groups,
    trainable_requests,
)
from mtrank.ranking.ltr import evaluate_ranker, fit_ltr, ranked_split, ranking_metrics
from mtrank.serve.app import create_app
from mtrank.bundle import Bundle

SCHEMA = Schema(
    name="hand",
    click="click",
    conversion="conversion",
    price="price",
    request_id="request_id",
    categorical=["item"],
    numerical=["x"],
)

# Three requests: A (3 candidates: no click, click, purchase at price 9), B (click, nothing),
# C (three impressions, no positive).
HAND_CSV = """request_id,item,x,click,conversion,price
A,a1,0.3,0,0,5
A,a2,0.2,1,0,7
A,a3,0.1,1,1,9
B,b1,0.9,1,0,4
B,b2,0.1,0,0,6
C,c1,0.5,0,0,1
C,c2,0.4,0,0,2
C,c3,0.3,0,0,3
"""


@pytest.fixture()
def hand(tmp_path):
    path = tmp_path / "hand.csv"
    path.write_text(HAND_CSV)
    df, _ = load_table(path, SCHEMA)
    return df


def test_grades_default_and_configurable():
    grade, bad = relevance_grades(
        np.array([0, 1, 1, 1]),
        np.array([0, 0, 1, 1]),
        np.array([5.0, 7.0, 9.0, np.nan]),
        LTRConfig(),
    )
    assert (
        grade.tolist() == [0.0, 1.0, 1.0 + math.log(10.0), 1.0] and bad == 1
    )  # NaN value: a purchase of value 0, counted
    grade, _ = relevance_grades(
        np.array([1, 1]),
        np.array([0, 1]),
        np.array([3.0, 3.0]),
        LTRConfig(click_grade=2, order_grade=5, value_coef=0.5),
    )
    assert grade.tolist() == [2.0, 2.0 + 5.0 + 0.5 * math.log(4.0)]


def test_ndcg_on_a_hand_made_three_request_file(hand):
    enc = FeatureEncoder.fit(hand, SCHEMA)
    split = ranked_split(hand, SCHEMA, enc, LTRConfig(k=3))
    assert split.sizes.tolist() == [3, 2, 3]
    score = hand.get_column("x").to_numpy()  # ranks A: a1, a2, a3; B: b1, b2
    m = ranking_metrics(split, score, 3)
    # grade NDCG: A has grades (0, 1, 1 + ln 10) in rank order; ideal order (1 + ln 10, 1, 0)
    g = 1 + math.log(10)
    ndcg_a = (1 / math.log2(3) + g / math.log2(4)) / (g + 1 / math.log2(3))
    assert m["ndcg_grade@3"] == pytest.approx(
        (ndcg_a + 1.0) / 2, abs=1e-12
    )  # C has no positive: left out
    # GMV NDCG (replay's gain = conversion × price): only A has a purchase, at rank 3 of 3
    assert (
        m["ndcg@3"] == pytest.approx((9 / math.log2(4)) / 9, abs=1e-12) and m["ndcg_requests"] == 1
    )
    m1 = ranking_metrics(split, score, 1)
    assert m1["gmv@1"] == 0.0 and m1["clicks@1"] == pytest.approx(1 / 3) and m1["orders@1"] == 0.0
    assert ranking_metrics(split, -score, 1)["gmv@1"] == pytest.approx(
        9 / 3
    )  # reversed: a3 first in A


def test_request_grouping_is_required_and_checked(hand):
    with pytest.raises(DataError, match=r"column 'request_id'.*row 6.*not contiguous"):
        request_groups(pl.Series(["A", "A", "B", "A"]), "request_id", np.array([3, 4, 5, 6]))
    with pytest.raises(DataError, match=r"column 'rid'.*rows 2, 3.*missing request id"):
        request_groups(pl.Series([1.0, None, float("nan"), 2.0]), "rid")
    group, sizes = request_groups(pl.Series([7, 7, 3, 9, 9, 9]), "rid")
    assert group.tolist() == [0, 0, 1, 2, 2, 2] and sizes.tolist() == [2, 1, 3]
    enc = FeatureEncoder.fit(hand, SCHEMA)
    with pytest.raises(DataError, match="request id column 'request_id'"):
        ranked_split(hand.drop("request_id"), SCHEMA, enc, LTRConfig())
    no_rid = SCHEMA.model_copy(update={"request_id": None})
    with pytest.raises(ConfigError, match="declares no request_id"):
        fit_ltr({"train": hand, "val": hand, "test": hand}, no_rid, LTRConfig())


def test_untrainable_requests_are_counted():
    # requests: [0] one candidate; [1] no positive; [2] one grade for all; [3] trainable
    group = np.array([0, 1, 1, 2, 2, 3, 3])
    grade = np.array([1.0, 0, 0, 1, 1, 0, 3])
    keep, counts = trainable_requests(group, np.bincount(group), grade)
    assert counts == {"requests": 4, "one_candidate": 1, "no_positive": 1, "all_equal": 1}
    assert keep.tolist() == [False] * 5 + [True, True]


def test_grade_levels_bin_purchases_and_gain_their_mean_grade():
    grade = np.array([0, 1, 2.0, 3.0, 4.0, 5.0])
    conv = np.array([0, 0, 1, 1, 1, 1])
    lv = GradeLevels.fit(grade, conv, levels=2)
    assert lv.edges == [3.5] and lv.gains == [0.0, 1.0, 2.5, 4.5]
    assert lv.labels(grade, conv).tolist() == [0, 1, 2, 2, 3, 3]


@pytest.fixture(scope="module")
def ltr_fit():
    sim = simulate(SimConfig(rows=12_000, n_users=400, n_items=200, slate_size=20, cvr=0.2, seed=3))
    df, _ = validate_frame(sim, SIMULATED_SCHEMA, "sim")
    splits = split_data(LoadedData(SIMULATED_SCHEMA, {"all": df}, {"all": "sim"}), SplitConfig())
    res = fit_ltr(
        splits,
        SIMULATED_SCHEMA,
        LTRConfig(n_estimators=40, patience=40, threads=1, min_data_in_leaf=20),
    )
    return res, splits


def test_ltr_learns_better_than_random_and_logs_its_counts(ltr_fit):
    res, splits = ltr_fit
    test = res.metrics["test"]
    split = ranked_split(splits["test"], SIMULATED_SCHEMA, res.bundle.encoder, LTRConfig())
    rand = ranking_metrics(split, np.random.default_rng(0).random(split.grade.size), 10)
    assert test["ndcg_grade@10"] > rand["ndcg_grade@10"] + 0.05
    assert (
        res.info["train_requests"]["no_positive"] > 0
        and res.info["train_requests"]["one_candidate"] == 0
    )


def test_ltr_bundle_has_no_pickle_and_reloads_to_identical_scores(ltr_fit, tmp_path):
    res, splits = ltr_fit
    path = res.bundle.save(tmp_path / "ltr")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "encoders.json", "model.txt"]
    assert json.loads((path / "config.json").read_text())["weights"] == "model.txt"
    loaded = Bundle.load(path)
    data = loaded.encode(splits["test"])
    a, b = res.bundle.predict_arrays(data), loaded.predict_arrays(data)
    assert list(a) == ["score"] and np.array_equal(a["score"], b["score"])
    assert evaluate_ranker(loaded, splits["test"]) == pytest.approx(res.metrics["test"])
    (path / "model.txt").write_text(
        (path / "model.txt").read_text().replace("Tree=0", "Tree=0x", 1)
    )
    with pytest.raises(Exception, match="sha256"):
        Bundle.load(path)


def test_ltr_is_served_by_its_own_score_and_says_it_has_no_probabilities(ltr_fit, tmp_path):
    res, splits = ltr_fit
    path = res.bundle.save(tmp_path / "ltr")
    client = TestClient(create_app(path))
    rows = splits["test"].head(7)
    cols = SIMULATED_SCHEMA.feature_columns
    body = client.post("/rank", json={"candidates": rows.select(cols).to_dicts()}).json()
    expected = res.bundle.predict_arrays(res.bundle.encode(rows))["score"]
    assert body["score_source"] == "ranker" and body["n_candidates"] == 7
    assert [c["index"] for c in body["candidates"]] == np.lexsort(
        (np.arange(7), -expected)
    ).tolist()
    assert [c["score"] for c in body["candidates"]] == pytest.approx(
        np.sort(expected)[::-1].tolist(), rel=1e-12
    )
    assert all(
        c["p_ctr"] is None and c["p_ctcvr"] is None and c["log_score"] is None
        for c in body["candidates"]
    )
    r = client.post(
        "/rank",
        json={"candidates": rows.select(cols).to_dicts(), "fusion": {"formula": "expected_gmv"}},
    )
    assert r.status_code == 422 and "has no pCTR/pCVR" in r.json()["message"]
    with pytest.raises(ConfigError, match="a fusion does not apply"):
        create_app(path, tmp_path / "fusion.json")


def test_cli_train_ltr_predict_and_bad_schema(tmp_path):
    data = tmp_path / "sim.parquet"
    simulate(
        SimConfig(rows=6_000, n_users=300, n_items=150, slate_size=20, cvr=0.2, seed=5)
    ).write_parquet(data)
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "mtrank", *map(str, a)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = tmp_path / "ltr"
    r = run(
        "train",
        "--data",
        data,
        "--schema",
        "simulated",
        "--model",
        "ltr",
        "--out",
        out,
        "--ltr-option",
        "n_estimators=10",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert (
        "ndcg_grade@10" in r.stdout and "no pCTR/pCVR" in r.stdout and (out / "model.txt").is_file()
    )
    r = run("predict", "--bundle", out, "--data", data, "--out", tmp_path / "p.parquet")
    assert r.returncode == 0, r.stderr
    assert "score" in pl.read_parquet(tmp_path / "p.parquet").columns
    r = run(
        "train",
        "--data",
        data,
        "--schema",
        "simulated",
        "--model",
        "ltr",
        "--out",
        tmp_path / "x",
        "--ltr-option",
        "levels=99",
    )
    assert r.returncode == 2 and "levels" in r.stderr


def test_side_by_side_ranks_the_same_requests_and_its_lifts_are_paired_ratios():
    from mtrank.models.config import ModelConfig
    from mtrank.ranking.strategies import compare_strategies, report_markdown
    from mtrank.train.trainer import TrainConfig

    sim = simulate(SimConfig(rows=6_000, n_users=300, n_items=150, slate_size=20, cvr=0.2, seed=9))
    df, _ = validate_frame(sim, SIMULATED_SCHEMA, "sim")
    splits = split_data(LoadedData(SIMULATED_SCHEMA, {"all": df}, {"all": "sim"}), SplitConfig())
    res = compare_strategies(
        splits,
        SIMULATED_SCHEMA,
        k=5,
        trials=5,
        bootstrap=200,
        train_cfg=TrainConfig(epochs=1, batch_size=512, seed=0),
        model_cfg=ModelConfig(tower=[16, 8], embedding_dim=4),
        ltr_cfg=LTRConfig(k=5, n_estimators=10, threads=1, min_data_in_leaf=20),
    )
    m = res["metrics"]
    assert (
        list(m)[:4] == ["base+fusion", "ltr", "listwise nn", "esmm+fusion"]
        and "oracle: true expected GMV" in m
    )
    assert (
        res["test"]["requests"]
        == splits["test"].get_column("request_id").n_unique()
        == m["ltr"]["requests"]
    )
    for name in ("ltr", "listwise nn", "esmm+fusion", "logged order"):
        lift = res["vs_base_fusion"][name]["exp_gmv@5"]
        assert lift["lift"] == pytest.approx(
            m[name]["exp_gmv@5"] / m["base+fusion"]["exp_gmv@5"] - 1, rel=1e-9
        )
        assert lift["low"] <= lift["lift"] <= lift["high"]
    assert "| ltr |" in report_markdown(res, "tiny")


def test_listwise_loss_by_hand():
    import torch

    from mtrank.ranking.ltr import listwise_loss

    # list 0: scores (0, ln 2), grades (1, 1); list 1: scores (0, 0, 0), grades (0, 0, 3) → only row
    # 3 counts
    score = torch.tensor([0.0, math.log(2), 0.0, 0.0, 0.0])
    grade = torch.tensor([1.0, 1.0, 0.0, 0.0, 3.0])
    slot = torch.tensor([0, 1, 3, 4, 5])  # width 3: list 0 uses slots 0, 1 (2 padded)
    loss = listwise_loss(score, grade, slot, 2, 3)
    expected = (0.5 * (math.log(3) + math.log(1.5)) + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
