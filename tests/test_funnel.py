"""Funnels declared as stages (issue 12): one-, two- and three-stage schemas train, evaluate,
export to ONNX and serve with per-stage outputs; per-stage metrics cover exactly the rows that
reached the ``after`` stage; violations and constant labels are named."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient

from mtrank.bundle import Bundle
from mtrank.data.funnel import stage_output_names
from mtrank.data.schema import Schema
from mtrank.errors import ConfigError, SchemaError
from mtrank.losses import model_loss
from mtrank.metrics.core import auc
from mtrank.metrics.evaluate import evaluate_outputs
from mtrank.models import build_model
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.serve.app import create_app
from mtrank.serve.fusion import FusionSpec
from mtrank.serve.onnx_export import OnnxScorer, to_onnx_bytes, verify_onnx
from mtrank.serve.service import RankingService
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import evaluate_split, fit

FEATURES = {"categorical": ["item"], "numerical": ["x"]}
ONE = Schema(name="ctr_only", click="is_click", **FEATURES)
TWO = Schema(
    name="two",
    funnel=[{"stage": "click", "label": "is_click"}, {"stage": "buy", "label": "is_buy"}],
    **FEATURES,
)
THREE = Schema(
    name="three",
    funnel=[
        {"stage": "click", "label": "is_click"},
        {"stage": "cart", "label": "is_cart"},
        {"stage": "buy", "label": "is_buy", "after": "click"},
    ],
    price="price",
    **FEATURES,
)


def funnel_data(n: int = 400, seed: int = 0) -> pl.DataFrame:
    """click on the impression; cart and buy each after the click (buy independent of cart)."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 6, n)
    click = (rng.random(n) < 0.2 + 0.1 * item).astype(np.int8)
    return pl.DataFrame(
        {
            "is_click": click,
            "is_cart": (click * (rng.random(n) < 0.5)).astype(np.int8),
            "is_buy": (click * (rng.random(n) < 0.3)).astype(np.int8),
            "item": item,
            "x": rng.normal(size=n),
            "price": rng.uniform(1, 50, n),
        }
    )


def fit_small(schema: Schema, model: str = "esmm", df: pl.DataFrame | None = None):
    df = funnel_data() if df is None else df
    splits = {"train": df.head(240), "val": df.slice(240, 80), "test": df.tail(80)}
    torch.manual_seed(0)
    return fit(
        splits,
        schema,
        ModelConfig(name=model, tower=[8], embedding_dim=4),
        TrainConfig(epochs=1, batch_size=64),
        quiet=True,
    )


def test_schema_stage_tree_and_round_trip():
    assert THREE.stage_names == ["click", "cart", "buy"]
    assert THREE.stage_parents == [-1, 0, 0]
    assert (THREE.click, THREE.conversion, THREE.is_funnel) == ("is_click", "is_buy", True)
    assert Schema.model_validate(THREE.model_dump()).stage_parents == [-1, 0, 0]
    assert (ONE.is_staged, ONE.is_funnel, ONE.stage_names) == (True, False, ["click"])
    legacy = Schema(click="c", conversion="b", **FEATURES)
    assert (legacy.is_staged, legacy.label_names) == (False, ["click", "conversion"])


@pytest.mark.parametrize(
    ("stages", "fragment"),
    [
        ([{"stage": "click", "label": "a"}, {"stage": "ctr", "label": "b"}], "reserved"),
        ([{"stage": "click", "label": "a"}, {"stage": "b", "label": "b", "after": "z"}], "'z'"),
        ([{"stage": "click", "label": "a", "after": "x"}], "takes no `after`"),
        ([{"stage": "click", "label": "a"}, {"stage": "click", "label": "b"}], "twice"),
        ([{"stage": "click", "label": "a"}, {"stage": "buy", "label": "a"}], "two stages"),
        ([{"stage": "Cart", "label": "a"}], "lower-case"),
    ],
)
def test_bad_funnel_declarations_are_schema_errors(stages, fragment):
    with pytest.raises(SchemaError, match=fragment):
        Schema(funnel=stages, **FEATURES)


def test_output_and_loss_names_of_a_three_stage_esmm():
    spec = FeatureSpec(
        cardinalities=[8], n_numerical=1, funnel=False, stages=THREE.stage_names, parents=[-1, 0, 0]
    )
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(tower=[4], embedding_dim=2))
    out = model(torch.tensor([[2], [3]]), torch.tensor([[0.1], [-0.2]]))
    assert set(stage_output_names(THREE.stage_names)) <= set(out)
    assert [t.name for t in model.tasks] == ["click", "cart_all", "buy_all"]
    p = {k: v.detach() for k, v in out.items()}
    torch.testing.assert_close(p["p_cart_all"], p["p_click"] * p["p_cart"])
    torch.testing.assert_close(p["p_buy_all"], p["p_click"] * p["p_buy"])
    torch.testing.assert_close(p["p_cvr"], p["p_buy"])  # P(last stage | click)
    torch.testing.assert_close(p["p_ctcvr"], p["p_buy_all"])
    # the loss is ESMM's per stage, on all impressions: hand-computed
    from mtrank.data.batch import Batch

    y = {"click": torch.tensor([1.0, 0.0]), "cart": torch.tensor([1.0, 0.0])}
    y["buy"] = torch.tensor([0.0, 0.0])
    labels = {**y, "click_all": y["click"], "cart_all": y["cart"], "buy_all": y["buy"]}
    batch = Batch(torch.tensor([[2], [3]]), torch.tensor([[0.1], [-0.2]]), labels)
    loss, parts = model_loss(model, out, batch)

    def bce(q, t):
        return float(-(t * torch.log(q) + (1 - t) * torch.log(1 - q)).mean())

    want = (
        bce(p["p_click"], y["click"])
        + bce(p["p_cart_all"], y["cart"])
        + bce(p["p_buy_all"], y["buy"])
    )
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)


# A hand-made 12-row file: click on 6 rows, cart on 3 of them, buy on 3 of them (1 both).
TWELVE = pl.DataFrame(
    {
        "is_click": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        "is_cart": [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        "is_buy": [1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        "item": list(range(12)),
        "x": [0.0] * 12,
        "price": [1.0] * 12,
    }
)


def test_per_stage_metrics_cover_exactly_the_rows_that_reached_the_after_stage():
    rng = np.random.default_rng(3)
    labels = {k: TWELVE.get_column(f"is_{k}").to_numpy().astype(float) for k in THREE.stage_names}
    from mtrank.data.funnel import derived_labels

    labels.update(derived_labels(labels, THREE.stage_names, THREE.stage_parents))
    outs = {f"p_{s}": rng.random(12) for s in THREE.stage_names}
    outs["p_click_all"] = outs["p_click"]
    outs["p_cart_all"] = outs["p_click"] * outs["p_cart"]
    outs["p_buy_all"] = outs["p_click"] * outs["p_buy"]
    outs |= {"p_ctr": outs["p_click"], "p_cvr": outs["p_buy"], "p_ctcvr": outs["p_buy_all"]}
    m = evaluate_outputs(outs, labels, THREE)
    clicked = np.arange(6)
    # rows covered and positives, per metric
    assert (m["n_click_rows"], m["n_click_positive"]) == (12, 6)
    assert (m["n_cart_rows"], m["n_cart_positive"]) == (6, 3)
    assert (m["n_buy_rows"], m["n_buy_positive"]) == (6, 3)
    assert (m["n_cart_all_rows"], m["n_cart_all_positive"]) == (12, 3)
    assert (m["n_buy_all_rows"], m["n_buy_all_positive"]) == (12, 3)
    # the AUCs are those of exactly these rows
    y = {k: TWELVE.get_column(f"is_{k}").to_numpy() for k in ("click", "cart", "buy")}
    assert m["auc_cart"] == auc(y["cart"][clicked], outs["p_cart"][clicked])
    assert m["auc_buy"] == auc(y["buy"][clicked], outs["p_buy"][clicked])
    assert m["auc_cart_all"] == auc(y["cart"], outs["p_cart_all"])
    assert m["auc_buy_all"] == auc(y["buy"], outs["p_buy_all"])
    assert m["auc_click"] == m["auc_click_all"] == m["auc_ctr"] == auc(y["click"], outs["p_click"])
    assert m["auc_cvr_masked"] == m["auc_buy"] and m["auc_ctcvr"] == m["auc_buy_all"]
    want = {
        f"{k}_{s}{a}"
        for k in ("auc", "logloss", "calib")
        for s in THREE.stage_names
        for a in ("", "_all")
    }
    assert want <= set(m) and "warnings" not in m


@pytest.mark.parametrize(
    ("schema", "model"),
    [
        (ONE, "esmm"),
        (ONE, "mmoe"),
        (TWO, "esmm"),
        (THREE, "esmm"),
        (THREE, "aitm"),
        (THREE, "esm2"),
    ],
    ids=["one-esmm", "one-mmoe", "two-esmm", "three-esmm", "three-aitm", "three-esm2"],
)
def test_stages_train_evaluate_export_and_serve(schema, model, tmp_path):
    res = fit_small(schema, model)
    names = stage_output_names(schema.stage_names)
    m = res.metrics["test"]
    for s in schema.stage_names:
        assert 0.0 <= m[f"auc_{s}"] <= 1.0 and 0.0 <= m[f"auc_{s}_all"] <= 1.0
    assert ("auc_cvr_masked" in m) == (len(schema.stage_names) > 1)
    path = res.bundle.save(tmp_path / "b")
    b = Bundle.load(path)
    assert b.scorer.outputs == tuple(names)
    again = evaluate_split(b.model, b.encode(funnel_data().tail(80), with_labels=True), b.schema)
    assert again["auc_click"] == pytest.approx(m["auc_click"])
    pred = b.predict(funnel_data().head(5), "t")
    assert set(names) <= set(pred.columns)
    # ONNX: every per-stage output, equal to PyTorch
    onnx_bytes = to_onnx_bytes(b)
    verify_onnx(b, onnx_bytes, batches=(1, 7), atol=1e-5)
    enc = b.encoder.transform(funnel_data().head(5))
    got = OnnxScorer(onnx_bytes)(enc.categorical, enc.numerical)
    for k in names:
        np.testing.assert_allclose(got[k], pred[k].to_numpy(), atol=1e-5)
    # serve: per-stage probabilities in the response
    client = TestClient(create_app(path))
    cands = [{"item": 1, "x": 0.3, "price": 2.0}, {"item": 4, "x": -1.0, "price": 9.0}]
    body = client.post("/score", json={"candidates": cands}).json()
    want = b.predict(pl.DataFrame(cands), "t")
    for c in body["candidates"]:
        for k in names:
            assert c[k] == pytest.approx(want[k][c["index"]], abs=1e-5)
    if len(schema.stage_names) == 1:
        assert body["candidates"][0]["p_cvr"] is None and body["fusion"]["formula"] == "single"
        r = client.post("/score", json={"candidates": cands, "fusion": {"formula": "ctcvr"}})
        assert r.status_code == 422 and "needs pCVR" in r.json()["message"]


def test_two_stage_models_refuse_an_n_stage_schema():
    with pytest.raises(ConfigError, match="BASE is a two-stage model .* 3-stage funnel"):
        fit_small(THREE, "base")
    with pytest.raises(ConfigError, match="ESCM2"):
        fit_small(ONE, "escm2_ipw")


def test_ctr_only_service_fuses_with_pctr_and_price_only(tmp_path):
    path = fit_small(ONE).bundle.save(tmp_path / "b")
    svc = RankingService(path, engine="torch")
    cands = [{"item": 1, "x": 0.3}, {"item": 5, "x": 0.1}]
    s = svc.score({}, cands)
    np.testing.assert_array_equal(s.score, s.probs["p_ctr"])
    assert np.isnan(s.probs["p_cvr"]).all()
    mult = FusionSpec(formula="multiplicative", params={"beta": 0.0, "gamma": 0.0})
    s2 = svc.score({}, cands, mult)
    np.testing.assert_allclose(s2.log_score, np.log(s.probs["p_ctr"]))
    with pytest.raises(ConfigError, match="needs pCVR"):
        RankingService(path, FusionSpec(formula="expected_gmv"), engine="torch")


def test_ctr_only_quadrants_fuse_and_a_constant_click_are_named(tmp_path):
    import json

    from conftest import cli_in_process

    df = funnel_data(600)
    df.select("is_click", "item", "x").write_csv(tmp_path / "ctr.csv")
    df.select("item", "x").with_columns(pl.lit(1).alias("is_click")).write_csv(tmp_path / "all.csv")
    (tmp_path / "s.yaml").write_text(
        "name: hotel\nclick: is_click\nitem_id: item\ncategorical: [item]\nnumerical: [x]\n"
    )
    args = ["--schema", tmp_path / "s.yaml", "--by", "item"]
    r = cli_in_process("quadrants", "--data", tmp_path / "ctr.csv", *args, "--out", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "q" / "quadrants.json").read_text())
    assert doc["cvr_axis"] is None and "needs a conversion stage" in doc["notes"][0]
    assert sum(row["impressions"] for row in doc["ctr_axis"]) == 600 and doc["warnings"] == []
    assert "CVR axis needs a conversion stage" in r.stderr
    r = cli_in_process("quadrants", "--data", tmp_path / "all.csv", *args, "--out", tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "quadrants.json").read_text())
    assert len(doc["warnings"]) == 1 and "CTR axis is near-constant" in doc["warnings"][0]
    assert "warning: the CTR axis is near-constant" in r.stderr
    path = fit_small(ONE).bundle.save(tmp_path / "b")
    r = cli_in_process("fuse", "--bundle", path, "--data", tmp_path / "ctr.csv", "-o", tmp_path)
    assert r.returncode == 2 and "CTR-only" in r.stderr and "single (which=ctr)" in r.stderr


def test_ctr_only_with_the_simulators_cvr_truth_columns_evaluates_without_cvr_metrics():
    """A CTR-only schema that keeps the simulator's CVR truths as passthrough columns (copied
    from the simulated schema) trains: there is no pCVR to score against them, so no truth
    metric is computed (was KeyError 'p_cvr')."""
    rng = np.random.default_rng(1)
    df = funnel_data().with_columns(
        pl.Series("true_cvr_clicked", rng.random(400)),
        pl.Series("true_cvr_do", rng.random(400)),
    )
    schema = Schema(click="is_click", passthrough=["true_cvr_clicked", "true_cvr_do"], **FEATURES)
    m = fit_small(schema, df=df).metrics["test"]
    assert m["n_impressions"] == 80
    assert m["auc_click"] is not None
    assert not any(k.startswith("auc_cvr_") for k in m)
