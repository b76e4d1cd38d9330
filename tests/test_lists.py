"""List and sequence features (issue 13): encoding, pooling, streaming, and the whole path
simulator → train → evaluate → export → serve."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest
import torch

from mtrank.data.encoders import FeatureEncoder, ListEncoder
from mtrank.data.schema import ListFeature, Schema
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.models import THREE_STAGE_MODELS, MODELS, build_model
from mtrank.models.config import FeatureSpec, ListInput, ModelConfig
from mtrank.models.layers import FeatureEmbedding

TOY = Schema(
    click="c",
    conversion="v",
    categorical=["item"],
    lists=[{"column": "tags", "sep": "|", "max_len": 3}],
    sequences=[{"column": "hist", "shares": "item", "max_len": 4}],
)


def test_list_vocabulary_is_fitted_on_train_only_and_encoded_per_element():
    train = pl.DataFrame(
        {"item": [1, 2], "tags": ["x|y|x", "y|x"], "hist": [[2], [1, 2]], "c": [1, 0], "v": [0, 0]}
    )
    test = pl.DataFrame(
        {"item": [2], "tags": ["x|new||y|x"], "hist": [[9, 2, 1, 2, 1]], "c": [0], "v": [0]}
    )
    enc = FeatureEncoder.fit(train, TOY)
    assert enc.lists[0].vocab.values == ["x", "y"]  # by count (3, 2)
    out = enc.transform(test)
    tags, hist = out.extra
    # x → 2, new → OOV 1, "" → missing 0, then truncated to 3
    assert tags.tolist() == [[2, 1, 0]]
    # the history uses item's vocabulary, fitted on the item column ("1" → 2, "2" → 3): 9 is
    # OOV; cut at 4
    assert hist.tolist() == [[1, 3, 2, 3]]
    assert out.n_truncated == {"tags": 1, "hist": 1}
    assert out.n_oov["tags"] == 1 and out.n_missing["tags"] == 1 and out.n_oov["hist"] == 1


def test_weighted_list_from_strings_and_structs_is_the_same():
    f = ListFeature(column="w", sep="|", weighted=True)
    enc = ListEncoder.fit(pl.Series("w", ["a:1|b:0.5"]), f)
    strings = enc.transform(pl.Series("w", ["b:0.25|a:2", None]), None)[0]
    structs = enc.transform(
        pl.Series("w", [[{"id": "b", "weight": 0.25}, {"id": "a", "weight": 2.0}], None]), None
    )[0]
    assert strings[0].tolist() == structs[0].tolist() == [[3, 2], [0, 0]]
    assert strings[1].tolist() == structs[1].tolist() == [[0.25, 2.0], [0.0, 0.0]]


def test_pooling_by_hand():
    spec = [
        ListInput(column="s", kind="list", cardinality=4, pooling="sum"),
        ListInput(column="m", kind="list", cardinality=4, pooling="mean", weighted=True),
    ]
    emb = FeatureEmbedding([3], 0, 2, spec)
    with torch.no_grad():
        emb.table.weight.copy_(torch.arange(22, dtype=torch.float32).reshape(11, 2))
    ids = torch.tensor([[2, 3, 0]])
    w = torch.tensor([[1.0, 3.0, 5.0]])
    out = emb(torch.tensor([[1]]), torch.zeros(1, 0), ids, ids, w)
    # rows: item field 0-2, list s 3-6, list m 7-10; padding (id 0) is masked out
    t = emb.table.weight
    expect_sum = t[3 + 2] + t[3 + 3]
    expect_mean = (1.0 * t[7 + 2] + 3.0 * t[7 + 3]) / 4.0
    assert torch.allclose(out[0], torch.cat([t[1], expect_sum, expect_mean]))


def test_target_attention_ignores_padding_and_uses_the_candidate():
    spec = [ListInput(column="h", kind="sequence", shares=0, pooling="attention")]
    torch.manual_seed(0)
    emb = FeatureEmbedding([10], 0, 4, spec)
    cat = torch.tensor([[3], [4]])
    hist = torch.tensor([[5, 6, 0, 0], [5, 6, 0, 0]])
    a = emb(cat, torch.zeros(2, 0), hist)
    b = emb(cat, torch.zeros(2, 0), hist[:, :2])  # shorter padding: same result
    assert torch.allclose(a, b)
    assert not torch.allclose(a[0, 4:], a[1, 4:])  # another candidate, another pooled history
    empty = emb(cat, torch.zeros(2, 0), torch.zeros(2, 3, dtype=torch.int64))
    assert torch.equal(empty[:, 4:], torch.zeros(2, 4))
    with pytest.raises(Exception, match="need 1"):
        emb(cat, torch.zeros(2, 0))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_takes_list_features_without_change(name):
    """Every neural model of the registry (a new one too) pools list and sequence features
    through its FeatureEmbedding."""
    staged = {"stages": ["click", "cart", "buy"], "parents": [-1, 0, 0]}
    spec = FeatureSpec(
        **(staged if name in THREE_STAGE_MODELS else {}),
        cardinalities=[6, 9],
        n_numerical=1,
        lists=[
            ListInput(column="t", kind="list", cardinality=5, weighted=True),
            ListInput(column="h", kind="sequence", shares=1, pooling="attention"),
        ],
    )
    model = build_model(spec, ModelConfig(name=name, tower=[8], embedding_dim=4))
    out = model(
        torch.randint(0, 6, (3, 2)),
        torch.randn(3, 1),
        torch.randint(0, 5, (3, 4)),
        torch.rand(3, 4),
        torch.randint(0, 9, (3, 7)),
    )
    assert out["p_ctcvr"].shape == (3,)


def test_streamed_encoder_equals_in_memory_and_pieces_of_different_widths_concat(tmp_path):
    from mtrank.data.stream import ParquetStream, fit_encoder_streaming

    df = pl.DataFrame(
        {
            "item": [1, 2, 3, 1],
            "tags": ["a|b", "b", "c|b|a", "a"],
            "hist": [[1, 2, 3, 1], [2], [], [3]],
            "c": [1, 0, 0, 1],
            "v": [0, 0, 0, 1],
        }
    )
    df.head(2).write_parquet(tmp_path / "p0.parquet")
    df.tail(2).write_parquet(tmp_path / "p1.parquet")
    paths = [tmp_path / "p0.parquet", tmp_path / "p1.parquet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = fit_encoder_streaming(paths, TOY)
        assert streamed.to_json() == FeatureEncoder.fit(df, TOY).to_json()
        data = ParquetStream(paths, TOY, streamed).load_all()
    assert [t.shape for t in data.extra] == [(4, 3), (4, 4)]
    assert data.extra[1][2].tolist() == [0, 0, 0, 0]


@pytest.fixture(scope="module")
def history_bundle(tmp_path_factory):
    """ESMM on the simulator with the purchase history (attention) and carts as a text list."""
    from mtrank.data.datasets import LoadedData
    from mtrank.data.io import validate_frame
    from mtrank.data.split import SplitConfig, split_data
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import fit

    df = simulate(
        SimConfig(rows=20_000, n_users=1_000, n_items=300, cvr=0.2, seed=3, history_len=10)
    ).with_columns(pl.col("hist_carted").cast(pl.List(pl.String)).list.join("|").alias("carted"))
    doc = SIMULATED_SCHEMA.model_dump(mode="json")
    doc["lists"] = [{"column": "carted", "sep": "|", "max_len": 10}]
    doc["sequences"] = [{"column": "hist_purchased", "shares": "item_id", "max_len": 10}]
    schema = Schema.model_validate(doc)
    clean, _ = validate_frame(df, schema, "sim")
    splits = split_data(LoadedData(schema, {"all": clean}, {"all": "sim"}), SplitConfig())
    out = fit(
        splits,
        schema,
        ModelConfig(tower=[16], embedding_dim=4),
        TrainConfig(epochs=2, batch_size=256, lr=3e-3, seed=0),
        quiet=True,
    )
    path = tmp_path_factory.mktemp("b") / "bundle"
    out.bundle.save(path)
    return path, out, splits


def test_end_to_end_train_evaluate_export_serve(history_bundle):
    from mtrank.bundle import Bundle
    from mtrank.serve.onnx_export import export_onnx
    from mtrank.serve.service import RankingService, RequestError

    path, out, splits = history_bundle
    assert out.bundle.spec.lists[1].pooling == "attention"
    assert 0.6 < out.metrics["test"]["auc_ctr"] < 1.0
    loaded = Bundle.load(path)
    test = splits["test"].head(50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = loaded.predict(test)
        direct = out.bundle.predict(test)
    assert np.allclose(again["p_ctr"].to_numpy(), direct["p_ctr"].to_numpy(), atol=1e-6)
    onnx_path, diffs = export_onnx(path)
    assert onnx_path.exists() and max(diffs.values()) < 1e-5
    row = test.row(0, named=True)
    context = {c: row[c] for c in ("user_id", "user_age", "user_gender", "user_power", "hour")}
    context["hist_purchased"] = row["hist_purchased"]
    cands = [
        {c: r[c] for c in ("item_id", "category", "brand", "shop", "price")}
        | {"carted": r["carted"].split("|") if r["carted"] else None}
        for r in test.filter(pl.col("user_id") == row["user_id"]).head(5).iter_rows(named=True)
    ]
    frame = test.filter(pl.col("user_id") == row["user_id"]).head(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = loaded.predict(frame)["p_ctr"].to_numpy()
    scores = {}
    for engine in ("torch", "onnx"):
        svc = RankingService(path, engine=engine)
        scores[engine] = svc.score(context, cands).probs["p_ctr"]
        assert np.allclose(scores[engine], want, atol=1e-5), engine
    with pytest.raises(RequestError) as info:
        svc.score({**context, "hist_purchased": list(range(11))}, cands)
    assert info.value.errors[0]["loc"] == ["context", "hist_purchased"]
    assert "at most 10 elements" in info.value.errors[0]["msg"]
    with pytest.raises(RequestError) as info:
        svc.score(context, [{**cands[0], "carted": [1, {"x": 1}]}])
    assert info.value.errors[0]["loc"] == ["candidates", 0, "carted"]
    # the columnar form: a list feature's column holds one list per candidate
    columns = {k: [c[k] for c in cands] for k in cands[0]}
    assert svc.parse({"context": context, "candidates": columns}, ranked=False)
    np.testing.assert_array_equal(svc.score(context, columns).probs["p_ctr"], scores["onnx"])
    columns["carted"] = [*columns["carted"][:4], [1, {"x": 1}]]
    with pytest.raises(RequestError) as info:
        svc.score(context, columns)
    assert info.value.errors[0]["loc"] == ["candidates", "carted", 4]


def test_history_changes_the_score(history_bundle):
    """A user's history moves the candidate's pCTR (the sequence is really used)."""
    from mtrank.serve.service import RankingService

    path, _, splits = history_bundle
    row = splits["test"].row(0, named=True)
    svc = RankingService(path, engine="torch")
    context = {c: row[c] for c in ("user_id", "user_age", "user_gender", "user_power", "hour")}
    cand = [{c: row[c] for c in ("item_id", "category", "brand", "shop", "price")} | {"carted": []}]
    a = svc.score({**context, "hist_purchased": []}, cand).probs["p_ctr"]
    b = svc.score({**context, "hist_purchased": [row["item_id"]] * 5}, cand).probs["p_ctr"]
    assert abs(a[0] - b[0]) > 1e-6


def test_request_lists_weighted_context_fill_and_errors():
    from mtrank.serve.errors import Errors
    from mtrank.serve.lists import list_columns

    feats = [ListFeature(column="w", weighted=True, max_len=3), ListFeature(column="t", max_len=2)]
    ok = dict(max_id_chars=8, int64=(-(2**63), 2**63 - 1))
    errors = Errors()
    cols = list_columns(
        feats,
        {"t": ["a", "b"]},
        [{"w": [{"id": 5, "weight": 0.5}], "t": None}, {"w": None, "t": [3.0]}],
        errors,
        **ok,
    )
    assert errors == []
    assert cols["w"].to_list() == [[{"id": 5, "weight": 0.5}], None]
    assert cols["t"].to_list() == [["a", "b"], ["3"]]  # context fills the null; 3.0 is the id 3
    for bad, loc in (
        ({"w": [{"id": 1, "weight": -1}], "t": []}, ["candidates", 0, "w"]),
        ({"w": [{"id": 1, "weight": "x"}], "t": []}, ["candidates", 0, "w"]),
        ({"w": [], "t": ["a", "b", "c"]}, ["candidates", 0, "t"]),
        ({"w": [], "t": ["a" * 9]}, ["candidates", 0, "t"]),
        ({"w": [], "t": "a|b"}, ["candidates", 0, "t"]),
        ({"w": []}, ["candidates", 0, "t"]),
    ):
        errors = Errors()
        list_columns(feats, {}, [bad], errors, **ok)
        assert [e["loc"] for e in errors] == [loc], (bad, errors)
