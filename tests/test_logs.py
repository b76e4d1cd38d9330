"""Issue 13, real logs as they are: the weight column, sampled negatives (calibration), the
position tower, leakage through missingness and out-of-range inputs."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from mtrank.bundle import Bundle
from mtrank.data.batch import Batch, EncodedData
from mtrank.data.encoders import FeatureEncoder, NumericalEncoder
from mtrank.data.io import validate_frame
from mtrank.data.schema import Schema
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.data.weights import combine, evaluation_weights, sample_negatives
from mtrank.losses import TaskLoss, total_loss
from mtrank.metrics.core import auc, calibration, logloss
from mtrank.metrics.evaluate import evaluate_outputs
from mtrank.models.calibration import shift_ctr_logit, without_sampling_correction
from mtrank.models.config import ModelConfig
from mtrank.models.position import PositionTower
from mtrank.train.trainer import TrainConfig, predict
from mtrank.workflow import fit


def _shuffled_splits(df: pl.DataFrame, schema: Schema, fractions=(0.6, 0.1)) -> dict:
    df, _ = validate_frame(df, schema, "sim")
    df = df[np.random.default_rng(0).permutation(df.height)]
    n = df.height
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    return {"train": df.head(a), "val": df.slice(a, b - a), "test": df.slice(b)}


# --- weights -----------------------------------------------------------------------------------


def test_weight_column_is_a_weighted_mean_of_each_task_loss():
    # logits 2 and −1 on clicks: BCE softplus(−2) and softplus(1), weights 3 and 1
    out = {"logit_ctr": torch.tensor([2.0, -1.0])}
    batch = Batch(
        torch.zeros(2, 0, dtype=torch.int64),
        torch.zeros(2, 0),
        {"click": torch.tensor([1.0, 1.0])},
        weight=torch.tensor([3.0, 1.0]),
    )
    loss, parts = total_loss([TaskLoss("ctr", "click", ("logit_ctr",))], out, batch)
    expected = (3 * math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_weight_column_read_from_the_schema_and_combined_with_price_weights():
    schema = Schema(click="c", conversion="v", categorical=["i"], weight="w")
    df = pl.DataFrame({"c": [1, 0, 1], "v": [1, 0, 0], "i": ["a", "b", "a"], "w": [2.0, 0, 0.5]})
    clean, _ = validate_frame(df, schema, "t")
    data = EncodedData.from_frame(clean, schema, FeatureEncoder.fit(clean, schema))
    assert data.weight.tolist() == [2.0, 0.0, 0.5]
    assert combine(data.weight.numpy(), np.array([1.5, 1, 1])).tolist() == [3.0, 0.0, 0.5]
    # predict / serve do not need the weight column
    assert validate_frame(df.drop("w", "c", "v"), schema, "t", require_labels=False)[0].height == 3


def test_weighted_metrics_equal_metrics_on_repeated_rows():
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.3).astype(float)
    p = np.clip(0.3 + 0.3 * (y - 0.3) + 0.2 * rng.standard_normal(200), 0.01, 0.99)
    w = rng.integers(0, 4, 200).astype(float)
    rep = np.repeat(np.arange(200), w.astype(int))
    assert auc(y, p, sample_weight=w) == pytest.approx(auc(y[rep], p[rep]), abs=1e-12)
    assert logloss(y, p, sample_weight=w) == pytest.approx(logloss(y[rep], p[rep]), abs=1e-12)
    assert calibration(y, p, sample_weight=w) == pytest.approx(calibration(y[rep], p[rep]))
    schema = Schema(click="c", conversion="v", categorical=["i"])
    labels = {"click": y, "conversion": y * (p > 0.4), "ctcvr": y * (p > 0.4)}
    outs = {"p_ctr": p, "p_cvr": p, "p_ctcvr": p * p}
    m = evaluate_outputs(outs, labels, schema, weight=w)
    assert m["auc_ctr_weighted"] == pytest.approx(auc(y[rep], p[rep]), abs=1e-12)
    assert m["auc_ctr"] == auc(y, p)
    assert "auc_ctr_weighted" not in evaluate_outputs(outs, labels, schema)


# --- negative sampling -------------------------------------------------------------------------


def test_correction_is_the_odds_formula_and_keeps_pctcvr_consistent():
    q = torch.tensor([0.1, 0.5, 0.9])
    logit_cvr = torch.tensor([0.3, -1.0, 2.0])
    out = {
        "logit_ctr": torch.logit(q),
        "p_ctr": q,
        "p_cvr": torch.sigmoid(logit_cvr),
        "p_ctcvr": q * torch.sigmoid(logit_cvr),
    }
    r = 0.2
    fixed = shift_ctr_logit(out, math.log(r))
    expected = q * r / (q * r + 1 - q)  # He et al. ADKDD 2014
    assert torch.allclose(fixed["p_ctr"], expected, atol=1e-6)
    assert torch.allclose(fixed["p_ctcvr"], fixed["p_ctr"] * out["p_cvr"], atol=1e-6)
    assert torch.equal(fixed["p_cvr"], out["p_cvr"])


def test_sample_negatives_keeps_every_click_and_rate_of_the_rest():
    df = pl.DataFrame({"click": np.r_[np.ones(1000), np.zeros(20_000)].astype(np.int8)})
    kept = sample_negatives(df, "click", 0.2, seed=0)
    assert kept["click"].sum() == 1000
    assert abs((kept.height - 1000) / 20_000 - 0.2) < 0.01
    w = evaluation_weights(
        Schema(click="c", conversion="v", categorical=["i"], negative_sampling={"rate": 0.25}),
        np.array([1, 0, 0]),
    )
    assert w.tolist() == [1.0, 4.0, 4.0]


def test_trained_on_negatives_kept_at_rate_02_mean_pctr_matches_unsampled_ctr(tmp_path):
    """Done-when: trained on unclicked impressions kept at r = 0.2, the mean pCTR on unsampled
    test rows is within 5 % of the observed CTR (uncorrected it is > 2× too high); the bundle
    stores r, and the corrected model survives save / load."""
    schema = SIMULATED_SCHEMA.model_copy(
        update={"categorical": ["category", "brand", "user_power", "user_age"]}
    )
    df = simulate(SimConfig(rows=120_000, n_users=3_000, n_items=800, ctr=0.05, seed=3))
    splits = _shuffled_splits(df, schema, (0.6, 0.1))
    res = fit(
        splits,
        schema,
        ModelConfig(name="esmm", tower=[16], embedding_dim=4),
        TrainConfig(epochs=4, batch_size=2048, lr=3e-3, seed=0, patience=0),
        quiet=True,
        negative_sampling_rate=0.2,
    )
    test = splits["test"]
    ctr = float(test["click"].mean())
    assert res.bundle.meta["negative_sampling"]["rate"] == 0.2
    assert res.bundle.meta["negative_sampling"]["evaluated_on"] == "unsampled rows"
    res.bundle.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    pred = loaded.predict(test)
    assert abs(float(pred["p_ctr"].mean()) / ctr - 1) < 0.05
    assert np.allclose(pred["p_ctcvr"], pred["p_ctr"] * pred["p_cvr"], rtol=1e-5)
    raw = predict(without_sampling_correction(loaded.model), loaded.encode(test))
    assert float(raw["p_ctr"].mean()) / ctr > 2.0
    assert res.metrics["test"]["calib_ctr"] == pytest.approx(
        float(pred["p_ctr"].sum()) / float(test["click"].sum()), rel=1e-4
    )


# --- position ----------------------------------------------------------------------------------


def test_position_tower_learns_the_sign_and_order_of_the_simulated_effect():
    """Done-when: on the simulator (logit CTR −= π·log(position), π = 1) the learnt effect per
    position is negative and falls with the position; the bundle is position-free."""
    schema = SIMULATED_SCHEMA.model_copy(
        update={
            "categorical": ["category", "brand", "user_power", "user_age", "item_id"],
            "position": "position",
            "passthrough": [c for c in SIMULATED_SCHEMA.passthrough if c != "position"],
        }
    )
    df = simulate(
        SimConfig(
            rows=40_000,
            n_users=2_000,
            n_items=500,
            ctr=0.08,
            slate_size=5,
            position_effect=1.0,
            seed=3,
        )
    )
    splits = _shuffled_splits(df, schema, (0.8, 0.1))
    res = fit(
        splits,
        schema,
        ModelConfig(name="esmm", tower=[16], embedding_dim=4),
        TrainConfig(epochs=2, batch_size=256, lr=3e-3, seed=0, patience=0),
        quiet=True,
    )
    pos = res.bundle.meta["position"]
    effects = [pos["effects"][str(k)] for k in range(1, 6)]
    assert pos["reference"] == 1 and effects[0] == 0.0
    assert all(e < 0 for e in effects[1:])
    assert all(a > b for a, b in zip(effects, effects[1:], strict=False)), effects
    assert not isinstance(res.bundle.model, PositionTower)
    # served scores need no position
    test = splits["test"].drop("position", "click", "conversion")
    assert res.bundle.predict(test).height == test.height


def test_position_tower_shifts_only_with_a_position():
    from mtrank.models import build_model
    from mtrank.models.config import FeatureSpec

    spec = FeatureSpec(cardinalities=[5], n_numerical=1, funnel=True, task_names=[])
    model = PositionTower(build_model(spec, ModelConfig(tower=[4], embedding_dim=2)), 1, 3)
    with torch.no_grad():
        model.bias.weight[:, 0] = torch.tensor([0.5, -0.5, -1.5])
    cat, num = torch.tensor([[2], [3]]), torch.zeros(2, 1)
    free = model(cat, num)
    at = model(cat, num, position=torch.tensor([1, 7]))
    assert torch.allclose(at["logit_ctr"], free["logit_ctr"] + torch.tensor([0.0, -2.0]))
    assert model.effects() == {"1": 0.0, "2": -1.0, "3": -2.0}


# --- out of range ------------------------------------------------------------------------------


def test_numerical_range_is_kept_and_far_values_counted():
    enc = NumericalEncoder.fit(pl.Series("price", np.linspace(1.0, 100.0, 1001)))
    assert enc.low == pytest.approx(1.099, abs=1e-3) and enc.high == pytest.approx(99.901)
    back = FeatureEncoder.from_json(FeatureEncoder([], [enc]).to_json()).numerical[0]
    assert (back.low, back.high) == (enc.low, enc.high)
    flags = enc.out_of_range(np.array([5.23, 523.0, 150.0, -150.0, np.nan]))
    assert flags.tolist() == [False, True, False, True, False]
    old = FeatureEncoder.from_json(
        {
            "format": "mtrank.encoders/1",
            "categorical": [],
            "numerical": [{"column": "price", "mean": 1.0, "std": 1.0}],
        }
    )
    assert old.out_of_range_counts(pl.DataFrame({"price": [1e9]})) == {"price": 0}


def test_sampled_bundle_serves_corrected_probabilities_through_onnx(tmp_path):
    from mtrank.serve.service import RankingService

    rng = np.random.default_rng(0)
    n = 400
    click = (rng.random(n) < 0.4).astype(np.int8)
    df = pl.DataFrame(
        {
            "click": click,
            "buy": (click * (rng.random(n) < 0.5)).astype(np.int8),
            "item": rng.integers(0, 5, n),
            "x": rng.normal(size=n),
        }
    )
    schema = Schema(
        click="click",
        conversion="buy",
        categorical=["item"],
        numerical=["x"],
        negative_sampling={"rate": 0.5},
    )
    res = fit(
        {"train": df.head(300), "val": df.slice(300, 50), "test": df.tail(50)},
        schema,
        ModelConfig(tower=[8], embedding_dim=4),
        TrainConfig(epochs=1, batch_size=64),
        quiet=True,
    )
    assert "rows whose negatives were kept at rate 0.5" in res.bundle.meta["calibration"]["rows"]
    assert res.metrics["test"]["calib_ctr_weighted"] is not None
    path = res.bundle.save(tmp_path / "b")
    service = RankingService(path, engine="onnx", threads=1)
    rows = df.tail(5).drop("click", "buy")
    scored = service.score({}, rows.to_dicts())
    want = Bundle.load(path).predict(rows)
    np.testing.assert_allclose(scored.probs["p_ctr"], want["p_ctr"].to_numpy(), atol=1e-5)
    inner = predict(
        without_sampling_correction(Bundle.load(path).model), service.bundle.encode(rows)
    )
    q = inner["p_ctr"].astype(np.float64)
    np.testing.assert_allclose(want["p_ctr"].to_numpy(), q * 0.5 / (q * 0.5 + 1 - q), atol=1e-6)


def test_cli_train_evaluate_predict_with_positions_sampling_and_a_unit_mixup(tmp_path):
    from tests.test_cli import mtrank

    df = simulate(SimConfig(rows=6_000, n_users=300, n_items=150, slate_size=5, seed=5))
    df.write_parquet(tmp_path / "log.parquet")
    df.with_columns(price=pl.col("price") * 1000).write_parquet(tmp_path / "milli.parquet")
    (tmp_path / "schema.yaml").write_text(
        "click: click\nconversion: conversion\nprice: price\nprice_unit: EUR\n"
        "position: position\ncategorical: [category, brand, user_power]\nnumerical: [price]\n"
    )
    common = ["--schema", tmp_path / "schema.yaml"]
    r = mtrank(
        "train",
        "--data",
        tmp_path / "log.parquet",
        *common,
        "--epochs",
        1,
        "--negative-sampling-rate",
        0.5,
        "--out",
        tmp_path / "b",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    r = mtrank("evaluate", "--bundle", tmp_path / "b", "--data", tmp_path / "log.parquet")
    assert r.returncode == 0, r.stderr
    assert "negatives sampled at rate 0.5" in r.stdout and "learnt position effect" in r.stdout
    r = mtrank(
        "predict",
        "--bundle",
        tmp_path / "b",
        "--data",
        tmp_path / "milli.parquet",
        "--out",
        tmp_path / "p.parquet",
    )
    assert r.returncode == 0, r.stderr
    assert "column 'price'" in r.stderr and "far outside the training range" in r.stderr
    assert "trained with price in EUR" in r.stderr


def test_position_and_sampling_shift_every_stage_of_a_staged_funnel():
    """A staged funnel with a position column and sampled negatives trains (the position tower
    and the sampling correction move the first stage and scale every entire-space product by
    the same ratio), and the shift is exact: p'_all / p_all = σ(a + s) / σ(a) for every stage."""
    import numpy as np
    import polars as pl
    import torch

    from mtrank.data.schema import Schema
    from mtrank.models.calibration import shift_ctr_logit
    from mtrank.models.config import ModelConfig
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import fit

    rng = np.random.default_rng(0)
    n = 120
    click = (rng.random(n) < 0.4).astype(np.int8)
    cart = (click * (rng.random(n) < 0.5)).astype(np.int8)
    df = pl.DataFrame(
        {
            "is_click": click,
            "is_cart": cart,
            "is_buy": (cart * (rng.random(n) < 0.5)).astype(np.int8),
            "item": rng.integers(0, 5, n),
            "x": rng.normal(size=n),
            "pos": rng.integers(1, 4, n),
        }
    )
    schema = Schema(
        funnel=[
            {"stage": "click", "label": "is_click"},
            {"stage": "cart", "label": "is_cart"},
            {"stage": "buy", "label": "is_buy"},
        ],
        categorical=["item"],
        numerical=["x"],
        position="pos",
        negative_sampling={"rate": 0.5},
    )
    splits = {"train": df.head(80), "val": df.slice(80, 20), "test": df.tail(20)}
    for name in ("esmm", "aitm"):
        run = fit(
            splits,
            schema,
            ModelConfig(name=name, tower=[8], embedding_dim=4),
            TrainConfig(epochs=1, batch_size=16),
            quiet=True,
        )
        assert run.metrics["test"]["n_impressions"] == 20

    a = torch.tensor([-1.0, 0.5])
    out = {
        "logit_click_all": a,
        "logit_click": a,
        "p_click": torch.sigmoid(a),
        "p_click_all": torch.sigmoid(a),
        "logit_buy_all": torch.tensor([-3.0, -2.0]),
        "p_buy_all": torch.sigmoid(torch.tensor([-3.0, -2.0])),
        "p_buy": torch.tensor([0.3, 0.4]),
    }
    moved = shift_ctr_logit(out, -0.7, ["click", "buy"])
    ratio = torch.sigmoid(a - 0.7) / torch.sigmoid(a)
    torch.testing.assert_close(moved["p_click"], torch.sigmoid(a - 0.7))
    torch.testing.assert_close(moved["p_buy_all"], out["p_buy_all"] * ratio)
    torch.testing.assert_close(torch.sigmoid(moved["logit_buy_all"]), out["p_buy_all"] * ratio)
    torch.testing.assert_close(moved["p_buy"], out["p_buy"])
