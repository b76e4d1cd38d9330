"""Serving: fusion, fast encoders, ONNX export, the HTTP ranking service, train/serve parity."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from mtrank.cli import app as cli_app
from mtrank.data.datasets import LoadedData
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.io import validate_frame
from mtrank.data.schema import Schema
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.data.split import SplitConfig, split_data
from mtrank.errors import ConfigError
from mtrank.models import build_model
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.ranking.fusion import Multiplicative, save_fusion
from mtrank.ranking.replay import rank_order
from mtrank.serve.app import create_app
from mtrank.bundle import Bundle
from mtrank.serve.fusion import FusionSpec, fused_scores
from mtrank.serve.service import MAX_CANDIDATES
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import fit, predictions_frame
from tests.conftest import start_server

USER = ["user_id", "user_age", "user_gender", "user_power", "hour"]
ITEM = ["item_id", "category", "brand", "shop", "price"]
MULT = {
    "formula": "multiplicative",
    "params": {"alpha": 1.0, "beta": 2.0, "gamma": 0.5, "eps": 1e-6},
}


@pytest.fixture(scope="module")
def sim() -> pl.DataFrame:
    return simulate(SimConfig(rows=6_000, n_users=300, n_items=150, cvr=0.2, seed=11))


@pytest.fixture(scope="module")
def bundle_dir(sim, tmp_path_factory):
    df, _ = validate_frame(sim, SIMULATED_SCHEMA, "sim")
    splits = split_data(LoadedData(SIMULATED_SCHEMA, {"all": df}, {"all": "sim"}), SplitConfig())
    res = fit(
        splits,
        SIMULATED_SCHEMA,
        ModelConfig(tower=[16, 8], embedding_dim=4),
        TrainConfig(epochs=1, batch_size=512, seed=0),
        quiet=True,
    )
    return res.bundle.save(tmp_path_factory.mktemp("serve") / "esmm")


@pytest.fixture(scope="module")
def clients(bundle_dir):
    # threads=0: leave torch's process-wide thread count alone for the tests that follow
    return {e: TestClient(create_app(bundle_dir, engine=e, threads=0)) for e in ("onnx", "torch")}


@pytest.fixture()
def client(clients):
    return clients["onnx"]


def request_of(rows: pl.DataFrame) -> dict:
    """One request: the first row's user features as context, items as candidates."""
    return {
        "context": rows.select(USER).row(0, named=True),
        "candidates": rows.select(ITEM).to_dicts(),
    }


# -- fusion -------------------------------------------------------------------------------------
def test_multiplicative_fusion_is_the_formula_in_log_space():
    spec = FusionSpec.model_validate(MULT)
    p_ctr, p_cvr, price = (
        np.array([0.1, 0.5, 0.0, 1.0]),
        np.array([0.2, 0.01, 0.3, 0.0]),
        np.array([10.0, 0.0, 5.0, 1e9]),
    )
    score, log_score, _ = fused_scores(spec.fusion, p_ctr, p_cvr, p_ctr * p_cvr, price)
    np.testing.assert_allclose(
        score[:2], p_ctr[:2] * p_cvr[:2] ** 2 * np.sqrt(price[:2] + 1e-6), rtol=1e-12
    )
    # probabilities of exactly 0 give a tiny but finite score, never -inf / NaN
    assert np.isfinite(log_score).all() and log_score[2] < -700 and log_score[3] < -1400
    assert (score >= 0).all() and np.isfinite(score).all()


def test_invalid_prices_give_nan_and_rank_last():
    spec = FusionSpec.model_validate(MULT)
    p = np.full(5, 0.5)
    score, log_score, _ = fused_scores(
        spec.fusion, p, p, p * p, np.array([1.0, -1.0, np.nan, np.inf, 0.0])
    )
    assert np.isnan(score[1:4]).all() and np.isfinite(score[[0, 4]]).all()
    assert rank_order(log_score).tolist() == [0, 4, 1, 2, 3]


def test_rank_order_breaks_ties_by_index():
    assert rank_order(np.array([0.5, 0.7, 0.5, np.nan, 0.7, -np.inf])).tolist() == [
        1,
        4,
        0,
        2,
        3,
        5,
    ]


def test_ctcvr_is_the_default_and_fuse_json_extra_keys_are_ignored(tmp_path):
    p_ctr, p_cvr = np.array([0.2, 0.4]), np.array([0.5, 0.1])
    score, _, _ = fused_scores(FusionSpec().fusion, p_ctr, p_cvr, p_ctr * p_cvr)
    assert score.tolist() == (p_ctr * p_cvr).tolist()
    f = tmp_path / "fusion.json"
    f.write_text(json.dumps({**MULT, "metrics": {"gmv@10": 1.2}, "grid": [1, 2]}))
    spec = FusionSpec.from_file(f)
    assert spec.formula == "multiplicative" and spec.params["beta"] == 2.0 and spec.needs_price
    f.write_text(json.dumps({"formula": "multiplicative", "params": {"eps": 0}}))
    with pytest.raises(ConfigError, match="params.eps"):
        FusionSpec.from_file(f)


# -- encoders ------------------------------------------------------------------------------------
def test_bundle_encoder_matches_a_naive_mapping_on_a_whole_table(bundle_dir, sim):
    from test_encoders import naive_transform

    b = Bundle.load(bundle_dir)
    a = b.encoder.transform(sim)
    for j, enc in enumerate(b.encoder.categorical):
        idx, n_missing, n_oov = naive_transform(enc, sim.get_column(enc.column))
        assert a.categorical[:, j].tolist() == idx
        assert a.n_oov[enc.column] == n_oov and a.n_missing[enc.column] == n_missing


def test_service_without_categorical_features_or_price(tmp_path):
    df = pl.DataFrame(
        {
            "click": [0, 1, 1, 0],
            "buy": [0, 1, 0, 0],
            "x": [1.0, 2.0, 3.0, 4.0],
            "y": [0.5, 0.1, 0.2, 0.3],
        }
    )
    schema = Schema(click="click", conversion="buy", numerical=["x", "y"])
    enc = FeatureEncoder.fit(df, schema)
    spec = FeatureSpec(cardinalities=enc.cardinalities, n_numerical=len(enc.numerical))
    cfg = ModelConfig(tower=[8], embedding_dim=3)
    path = Bundle(build_model(spec, cfg).eval(), enc, schema, cfg, spec).save(tmp_path / "b")
    client = TestClient(create_app(path))
    body = client.post(
        "/rank", json={"candidates": [{"x": 1.0, "y": None}, {"x": 2, "y": 0.3}]}
    ).json()
    assert body["counts"] == {
        "missing": {"x": 0, "y": 1},
        "oov": {},
        "out_of_range": {"x": 0, "y": 0},
    }
    want = predictions_frame(
        Bundle.load(path), pl.DataFrame({"x": [1.0, 2.0], "y": [None, 0.3]}), "t"
    )
    got = sorted(body["candidates"], key=lambda c: c["index"])
    np.testing.assert_allclose(
        [c["p_ctr"] for c in got], want["p_ctr"].to_numpy(), atol=1e-6, rtol=0
    )
    r = client.post("/rank", json={"candidates": [{"x": 1.0, "y": 2.0}], "fusion": MULT})
    assert (
        r.status_code == 422
        and "body.fusion" in r.json()["message"]
        and "no price column" in r.json()["message"]
    )
    with pytest.raises(ConfigError, match="no price column"):
        create_app(path, FusionSpec.model_validate(MULT))


def test_a_mtrank_fuse_file_loads_in_serve_and_in_the_request_field(
    bundle_dir, client, sim, tmp_path
):
    """save_fusion (what `mtrank fuse` writes) → `mtrank serve --fusion` and `/rank`'s `fusion`."""
    path = save_fusion(
        Multiplicative(alpha=1.0, beta=2.0, gamma=0.5, eps=1e-6),
        tmp_path / "fusion.json",
        k=10,
        metrics={"gmv@10": 1.5},
    )
    assert json.loads(path.read_text())["format"] == "mtrank.fusion/1"
    req = {"candidates": sim.slice(0, 20).select(SIMULATED_SCHEMA.feature_columns).to_dicts()}
    want = client.post("/rank", json={**req, "fusion": MULT}).json()
    served = TestClient(create_app(bundle_dir, path, threads=0))
    assert served.get("/metadata").json()["fusion"] == {
        "formula": "multiplicative",
        "params": MULT["params"],
    }
    by_default = served.post("/rank", json=req).json()
    by_field = client.post("/rank", json={**req, "fusion": json.loads(path.read_text())}).json()
    for body in (by_default, by_field):
        assert body["candidates"] == want["candidates"] and body["fusion"] == want["fusion"]
    data, preds = tmp_path / "rows.parquet", tmp_path / "preds.parquet"
    sim.slice(0, 20).write_parquet(data)
    r = CliRunner().invoke(
        cli_app,
        [
            "predict",
            "--bundle",
            str(bundle_dir),
            "--data",
            str(data),
            "--out",
            str(preds),
            "--fusion",
            str(path),
        ],
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(
        pl.read_parquet(preds)["score"].to_numpy(),
        [c["score"] for c in sorted(want["candidates"], key=lambda c: c["index"])],
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "fusion",
    [
        {"formula": "offset_multiplicative", "params": {"b2": 0.05, "gamma": 0.3}},
        {"formula": "linear", "params": {"w1": 1.0, "w2": 5.0, "w3": -0.2}},
        {"formula": "expected_gmv"},
        {"formula": "single", "params": {"which": "ctr"}},
    ],
)
def test_every_ranking_formula_is_served_as_the_ranking_module_computes_it(client, sim, fusion):
    from mtrank.ranking.fusion import make_fusion

    req = request_of(sim.slice(0, 30))
    body = client.post("/rank", json={**req, "fusion": fusion}).json()
    f = make_fusion(fusion["formula"], fusion.get("params"))
    assert body["fusion"] == {"formula": f.name, "params": f.params}
    cands = sorted(body["candidates"], key=lambda c: c["index"])
    price = np.array([c["price"] for c in req["candidates"]])
    key = f.score([c["p_ctr"] for c in cands], [c["p_cvr"] for c in cands], price)
    assert [c["index"] for c in body["candidates"]] == rank_order(key).tolist()
    got = np.array([c["score"] for c in cands], dtype=np.float64)
    np.testing.assert_allclose(got, np.exp(key) if f.log_space else key, rtol=1e-12)


def test_fusion_params_out_of_range_are_422(client, sim):
    """One error per offending parameter, located at it; a string value is never echoed."""
    req = request_of(sim.slice(0, 2))
    many = {f"p{i}": 1 for i in range(200)}
    for fusion, kinds, n_errors in (
        ({"formula": "multiplicative", "params": {"eps": -1}}, [("eps", "value_error")], 1),
        ({"formula": "linear", "params": {"m1": 0}}, [("m1", "value_error")], 1),
        (
            {"formula": "multiplicative", "params": {"delta": 1, "alpha": True, "beta": "2"}},
            [("delta", "extra_forbidden"), ("alpha", "float_type"), ("beta", "float_type")],
            3,
        ),
        (  # a mistyped parameter does not hide the others' ranges
            {"formula": "multiplicative", "params": {"alpha": -1, "beta": "1", "eps": 0}},
            [("beta", "float_type"), ("alpha", "value_error"), ("eps", "value_error")],
            3,
        ),
        ({"formula": "single", "params": {"which": "gmv" * 1000}}, [("which", "value_error")], 1),
        (
            {"formula": "ctcvr", "params": many},
            [(f"p{i}", "extra_forbidden") for i in range(5)],
            200,
        ),
    ):
        r = client.post("/rank", json={**req, "fusion": fusion})
        body = r.json()
        assert r.status_code == 422 and body["n_errors"] == n_errors, r.text
        assert [(e["loc"][-1], e["type"]) for e in body["detail"]] == kinds, r.text
        assert all(e["loc"][:3] == ["body", "fusion", "params"] for e in body["detail"])
        assert "gmvgmv" not in r.text
    assert body["detail"][0]["msg"] == "not a parameter of 'ctcvr' (its parameters: none)"


def test_a_misspelt_fusion_key_is_422_other_keys_are_ignored(client, sim):
    """`parms` would silently rank by the defaults: refused with a hint; the keys a `mtrank
    fuse` file carries besides formula and params (format, metrics) stay ignored."""
    req = request_of(sim.slice(0, 2))
    fusion = {"formula": "multiplicative", "parms": {"alpha": 1}, "Formula": "x"}
    r = client.post("/rank", json={**req, "fusion": fusion})
    assert r.status_code == 422 and r.json()["n_errors"] == 2, r.text
    assert [(e["loc"], e["msg"]) for e in r.json()["detail"]] == [
        (["body", "fusion", "parms"], "not a key of a fusion object: did you mean 'params'?"),
        (["body", "fusion", "Formula"], "not a key of a fusion object: did you mean 'formula'?"),
    ]
    pasted = {"format": "mtrank.fusion/1", "formula": "multiplicative", "k": 10, "dataset": "x"}
    assert client.post("/rank", json={**req, "fusion": pasted}).status_code == 200


# -- the HTTP service ---------------------------------------------------------------------------
def test_openapi_health_metadata(client, bundle_dir):
    spec = client.app.openapi()
    assert {"/rank", "/score", "/health", "/metadata"} <= set(spec["paths"])
    rows, columns = spec["components"]["schemas"]["RankRequest"]["properties"]["candidates"][
        "anyOf"
    ]
    assert rows["minItems"] == 1 and rows["maxItems"] == MAX_CANDIDATES
    assert columns == {"$ref": "#/components/schemas/FeatureColumns"}
    by_column = spec["components"]["schemas"]["FeatureColumns"]
    assert set(by_column["properties"]) == {*SIMULATED_SCHEMA.categorical, "price"}
    assert by_column["properties"]["price"]["maxItems"] == MAX_CANDIDATES
    assert by_column["additionalProperties"] is False
    assert "RankResponse" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["bundle_sha256"] == Bundle.digest(bundle_dir) and meta["model"] == "esmm"
    assert (
        meta["features"]["categorical"] == SIMULATED_SCHEMA.categorical
        and meta["features"]["price"] == "price"
    )
    assert meta["schema"]["name"] == "simulated" and meta["engine"] == "onnx"


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_train_serve_parity(engine, clients, bundle_dir, sim, tmp_path):
    """The same rows through predictions_frame / `mtrank predict --fusion` and through /rank."""
    rows = sim.slice(1000, 300)
    b = Bundle.load(bundle_dir)
    batch = predictions_frame(b, rows, "rows")
    fusion = tmp_path / "fusion.json"
    fusion.write_text(json.dumps(MULT))
    data, preds = tmp_path / "rows.parquet", tmp_path / "preds.parquet"
    rows.write_parquet(data)
    r = CliRunner().invoke(
        cli_app,
        [
            "predict",
            "--bundle",
            str(bundle_dir),
            "--data",
            str(data),
            "--out",
            str(preds),
            "--fusion",
            str(fusion),
        ],
    )
    assert r.exit_code == 0, r.output
    cli = pl.read_parquet(preds)
    assert cli.select("p_ctr", "p_cvr", "p_ctcvr").equals(batch.select("p_ctr", "p_cvr", "p_ctcvr"))
    # every feature per candidate (300 rows span several users); ids as JSON ints
    req = {"candidates": rows.select(SIMULATED_SCHEMA.feature_columns).to_dicts(), "fusion": MULT}
    resp = clients[engine].post("/rank", json=req)
    assert resp.status_code == 200, resp.text
    got = pl.DataFrame(resp.json()["candidates"]).sort("index")
    assert got["index"].to_list() == list(range(300))
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        if engine == "torch":  # same encoders, same feature order, same kernels: bit-identical
            assert got[k].to_list() == batch[k].to_list()
        else:  # onnxruntime kernels round differently in the last float32 bits
            np.testing.assert_allclose(got[k].to_numpy(), batch[k].to_numpy(), rtol=0, atol=1e-6)
    if engine == "torch":
        assert got["score"].to_list() == cli["score"].to_list()
    else:
        np.testing.assert_allclose(got["score"].to_numpy(), cli["score"].to_numpy(), rtol=1e-5)


def test_rank_order_is_the_sorted_fused_score_with_index_ties(client, sim):
    rows = sim.slice(0, 40)
    req = request_of(rows)
    req["candidates"] += [req["candidates"][5], req["candidates"][0]]  # exact duplicates: tied
    req["fusion"] = MULT
    body = client.post("/rank", json=req).json()
    cands = body["candidates"]
    idx = np.array([c["index"] for c in cands])
    log_score = np.array([c["log_score"] for c in sorted(cands, key=lambda c: c["index"])])
    assert idx.tolist() == np.lexsort((np.arange(42), -log_score)).tolist()
    assert [c["rank"] for c in cands] == list(range(1, 43))
    pos = {c["index"]: i for i, c in enumerate(cands)}
    by_index = {c["index"]: c for c in cands}
    for a, b in ((5, 40), (0, 41)):  # exact duplicates tie; the lower request index ranks first
        assert by_index[a]["log_score"] == by_index[b]["log_score"] and pos[a] < pos[b]
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True)
    price = {i: d["price"] for i, d in enumerate(req["candidates"])}
    for c in cands:
        want = c["p_ctr"] * c["p_cvr"] ** 2 * math.sqrt(price[c["index"]] + 1e-6)
        assert c["score"] == pytest.approx(want, rel=1e-12)
    assert body["fusion"]["formula"] == "multiplicative" and body["n_candidates"] == 42
    top = client.post("/rank", json={**req, "top_k": 3}).json()["candidates"]
    assert [c["index"] for c in top] == idx[:3].tolist()


def test_score_keeps_request_order_and_defaults_to_ctcvr(client, sim):
    body = client.post("/score", json=request_of(sim.slice(0, 10))).json()
    assert [c["index"] for c in body["candidates"]] == list(range(10))
    assert all(c["score"] == c["p_ctcvr"] and "rank" not in c for c in body["candidates"])
    assert body["fusion"]["formula"] == "ctcvr"


def test_far_out_of_range_prices_are_counted(client, sim):
    req = request_of(sim.slice(0, 4))
    req["candidates"][0]["price"] = 523_000.0  # a price in thousandths sent to a unit model
    req["candidates"][2]["price"] = 1e7
    body = client.post("/rank", json=req).json()
    assert body["counts"]["out_of_range"] == {"price": 2}


def test_unseen_and_missing_values_are_scored_and_counted(client, sim):
    req = request_of(sim.slice(0, 4))
    req["candidates"][1]["item_id"] = 987654321
    req["candidates"][2]["item_id"] = "never-seen"
    req["candidates"][3]["brand"] = None
    req["context"]["user_id"] = "someone-new"
    r = client.post("/score", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["counts"]["oov"]["item_id"] == 2 and body["counts"]["oov"]["user_id"] == 4
    assert body["counts"]["missing"]["brand"] == 1 and body["counts"]["missing"]["item_id"] == 0
    # both unseen ids use the same OOV row: same item features otherwise → same pCTR iff same rest
    same = dict(req["candidates"][1], item_id="another-unseen")
    twin = client.post("/score", json={**req, "candidates": [req["candidates"][1], same]}).json()[
        "candidates"
    ]
    assert twin[0]["p_ctr"] == twin[1]["p_ctr"] and 0 < twin[0]["p_ctr"] < 1


def test_candidate_values_override_the_context(client, sim):
    rows = sim.slice(0, 3)  # one slate: one user, one hour
    assert rows["user_id"].n_unique() == 1 and rows["hour"].n_unique() == 1
    full = {"candidates": rows.select(SIMULATED_SCHEMA.feature_columns).to_dicts()}
    want = [c["p_ctr"] for c in client.post("/score", json=full).json()["candidates"]]
    # the context holds the right user but wrong other values; candidates override them, and a
    # candidate's null user_id inherits the context's
    hour = rows["hour"][0]
    ctx = {
        "user_id": rows["user_id"][0],
        "hour": (hour + 1) % 24,
        "user_age": 0,
        "user_gender": 0,
        "user_power": 0,
    }
    mixed = [dict(c, user_id=None) for c in full["candidates"]]
    got = client.post("/score", json={"context": ctx, "candidates": mixed}).json()["candidates"]
    assert [c["p_ctr"] for c in got] == want
    # without its own hour, a candidate takes the context's (another hour → another score)
    no_hour = [{k: v for k, v in c.items() if k != "hour"} for c in mixed]
    other = client.post("/score", json={"context": ctx, "candidates": no_hour}).json()["candidates"]
    assert [c["p_ctr"] for c in other] != want


@pytest.mark.parametrize(
    "mutate,field,fragment",
    [
        (lambda r: r["candidates"][1].pop("price"), "candidates.1.price", "Field required"),
        (
            lambda r: r["context"].pop("user_id"),
            "candidates.0.user_id",
            "in `context` or in every candidate",
        ),
        (lambda r: r["candidates"][2].update(price="cheap"), "candidates.2.price", "valid number"),
        (
            lambda r: r["candidates"][0].update(price=-3.0),
            "candidates.0.price",
            "greater than or equal to 0",
        ),
        (
            lambda r: r["candidates"][0].update(price=None),
            "candidates.0.price",
            "Field required: a price (a number ≥ 0) in the candidate or in `context`",
        ),
        (
            lambda r: r["candidates"][0].update(price=1e308),
            "candidates.0.price",
            "value too large: |x| must be ≤",
        ),
        (lambda r: r["candidates"][0].update(price=True), "candidates.0.price", "valid number"),
        (
            lambda r: r["candidates"][0].update(category=True),
            "candidates.0.category",
            "string, a 64-bit integer or null",
        ),
        (lambda r: r.update(top_k="2"), "body.top_k", "integer ≥ 1"),
        (lambda r: r.update(top_k=True), "body.top_k", "integer ≥ 1"),
        (
            lambda r: r.update(fusion={"formula": "multiplicative", "params": {"alpha": True}}),
            "body.fusion",
            "params.alpha: must be a number, got a boolean",
        ),
        (
            lambda r: r.update(fusion={"params": {"x": ""}}),
            "body.fusion",
            "params.x: not a parameter of 'ctcvr' (its parameters: none)",
        ),
        (
            lambda r: r["candidates"][0].update(category=[1, 2]),
            "candidates.0.category",
            "string, a 64-bit integer or null",
        ),
        (
            lambda r: r["candidates"][0].update(category=2.5),
            "candidates.0.category",
            "string, a 64-bit integer or null",
        ),
        (
            lambda r: r["context"].update(user_age={"a": 1}),
            "context.user_age",
            "string, a 64-bit integer or null",
        ),
        (
            lambda r: r["candidates"][0].update(item_id=2**70),
            "candidates.0.item_id",
            "string, a 64-bit integer or null",
        ),
        (lambda r: r.update(candidates=[]), "body.candidates", "at least 1 item"),
        (
            lambda r: r.update(candidates=r["candidates"] * 1000),
            "body.candidates",
            f"at most {MAX_CANDIDATES} items",
        ),
        (
            lambda r: r.update(fusion={"formula": "sum"}),
            "body.fusion.formula",
            "'multiplicative', 'offset_multiplicative', 'linear', 'expected_gmv', 'single' or "
            "'ctcvr'",
        ),
        (lambda r: r.update(candidate=[]), "body.candidate", "Extra inputs"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(client, sim, mutate, field, fragment):
    req = request_of(sim.slice(0, 3))
    mutate(req)
    r = client.post("/rank", json=req)
    assert r.status_code == 422, r.text
    body = r.json()
    assert field in body["message"] and fragment in body["message"], body["message"]


def test_nan_price_is_422_not_500(client, sim):
    req = request_of(sim.slice(0, 2))
    text = json.dumps(req).replace(str(req["candidates"][1]["price"]), "NaN", 1)
    r = client.post("/rank", content=text, headers={"content-type": "application/json"})
    assert (
        r.status_code == 422
        and "candidates.1.price: Input should be a finite number" in r.json()["message"]
    )


# -- a real server, started and stopped by the test ---------------------------------------------
def test_mtrank_serve_runs_on_localhost(bundle_dir, sim):
    proc, port = start_server("--bundle", bundle_dir, "--engine", "torch")
    try:
        r = httpx.post(
            f"http://127.0.0.1:{port}/rank", json=request_of(sim.slice(0, 5)), timeout=10
        )
        assert r.status_code == 200 and len(r.json()["candidates"]) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_bound_socket_is_tcp_so_asyncio_sets_nodelay():
    # asyncio sets TCP_NODELAY on an accepted socket only when its proto is IPPROTO_TCP; with
    # proto 0 every keep-alive /rank response waited ~40 ms (Nagle + delayed ACK)
    import socket

    from mtrank.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname())
        conn, _ = sock.accept()
        assert conn.proto == socket.IPPROTO_TCP
        conn.close()
        client.close()
    finally:
        sock.close()


def test_json_rows_writes_one_object_per_row_with_null_for_non_finite():
    from mtrank.serve.app import json_rows

    cols = {
        "index": np.array([2, 0, 1]),
        "rank": np.arange(1, 4),
        "score": np.array([0.25, np.nan, -np.inf]),
    }
    assert json_rows(cols) == (
        b'[{"index":2,"rank":1,"score":0.25},{"index":0,"rank":2,"score":null},'
        b'{"index":1,"rank":3,"score":null}]'
    )
    one = json_rows({"index": np.array([5]), "p": np.array([1e-300])})
    assert one == b'[{"index":5,"p":1e-300}]'
    assert json_rows({"index": np.zeros(0, np.int64)}) == b"[]"
    x = np.random.default_rng(0).random(50)
    assert [r["x"] for r in json.loads(json_rows({"x": x}))] == x.tolist()  # round-trip exact


def test_scoring_fast_path_leaves_other_methods_to_the_app(client):
    r = client.get("/rank")
    assert r.status_code == 405 and r.json()["n_errors"] == 1
    r = client.post("/rank/", json={}, follow_redirects=False)  # not the fast path: the router's
    assert r.status_code == 307 and r.headers["location"].endswith("/rank")
