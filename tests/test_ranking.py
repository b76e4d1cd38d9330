"""Score fusion, replay metrics, tuning, Beta smoothing and quadrants, against hand-computed
values."""

import json
import math

import numpy as np
import polars as pl
import pytest

from mtrank.data.weights import mean_log_price, price_weights
from mtrank.errors import ConfigError, DataError
from mtrank.ranking.fusion import (
    ExpectedGMV,
    Linear,
    Multiplicative,
    OffsetMultiplicative,
    clean_prices,
    load_fusion,
    make_fusion,
    save_fusion,
    usable_prices,
)
from mtrank.ranking.quadrants import (
    BetaPrior,
    assign_quadrants,
    entity_stats,
    quadrant_table,
    thresholds,
)
from mtrank.ranking.replay import (
    ReplayData,
    bootstrap_lift,
    dense_groups,
    per_request,
    pseudo_requests,
    rank_within,
    replay_metrics,
    top_k_share,
)
from mtrank.ranking.tune import TuneConfig, pareto_frontier, tune

P_CTR = np.array([0.1, 0.2])
P_CVR = np.array([0.5, 0.05])
PRICE = np.array([9.0, 99.0])


# --- formulas ------------------------------------------------------------------------------


def test_multiplicative_matches_hand_computation():
    f = Multiplicative(alpha=1.0, beta=2.0, gamma=0.5, eps=1.0)
    # 0.1 · 0.5² · 10^0.5 and 0.2 · 0.05² · 100^0.5
    np.testing.assert_allclose(
        np.exp(f.score(P_CTR, P_CVR, PRICE)),
        [0.1 * 0.25 * math.sqrt(10), 0.2 * 0.0025 * 10],
        rtol=1e-12,
    )


def test_offset_multiplicative_matches_hand_computation():
    f = OffsetMultiplicative(alpha=1, beta=1, gamma=1, b1=0.1, b2=0.5, b3=1.0)
    # (0.1+0.1)(0.5+0.5)(1+9) = 2.0 and (0.1+0.2)(0.5+0.05)(1+99) = 16.5
    np.testing.assert_allclose(np.exp(f.score(P_CTR, P_CVR, PRICE)), [2.0, 16.5], rtol=1e-12)


def test_linear_matches_hand_computation():
    f = Linear(w1=1, w2=1, w3=1)
    np.testing.assert_allclose(
        f.score(P_CTR, P_CVR, PRICE), [0.6 + math.log(10), 0.25 + math.log(100)], rtol=1e-12
    )
    g = Linear.fitted_scales(P_CTR, P_CVR, PRICE, w1=2.0, w2=0.0, w3=0.0)
    assert g.m1 == pytest.approx(0.15) and g.m3 == pytest.approx((math.log(10) + math.log(100)) / 2)
    np.testing.assert_allclose(g.score(P_CTR, P_CVR, PRICE), [2 * 0.1 / 0.15, 2 * 0.2 / 0.15])


def test_expected_gmv_matches_hand_computation():
    np.testing.assert_allclose(
        np.exp(ExpectedGMV().score(P_CTR, P_CVR, PRICE)), [0.45, 0.99], rtol=1e-12
    )


def test_fusion_json_round_trip(tmp_path):
    f = Multiplicative(alpha=0.7, beta=1.3, gamma=0.4, eps=2.0)
    path = save_fusion(f, tmp_path / "fusion.json", k=10)
    doc = json.loads(path.read_text())
    assert doc == {
        "format": "mtrank.fusion/1",
        "formula": "multiplicative",
        "params": {"alpha": 0.7, "beta": 1.3, "gamma": 0.4, "eps": 2.0},
        "k": 10,
    }
    g = load_fusion(path)
    np.testing.assert_array_equal(g.score(P_CTR, P_CVR, PRICE), f.score(P_CTR, P_CVR, PRICE))
    (tmp_path / "bad.json").write_text('{"formula": "nope"}')
    with pytest.raises(ConfigError, match="unknown fusion formula"):
        load_fusion(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="bad params"):
        make_fusion("multiplicative", {"delta": 1})


# --- prices --------------------------------------------------------------------------------


def test_bad_prices_error_clip_drop():
    raw = [10, -2, -1, float("nan"), None, float("inf")]
    with pytest.raises(DataError) as e:
        clean_prices(raw, column="price", source="x.parquet")
    assert (
        "x.parquet" in str(e.value)
        and "'price'" in str(e.value)
        and "rows 2, 3, 4, 5, 6" in str(e.value)
    )
    p, keep = clean_prices(raw, policy="clip", floor=0.5)
    np.testing.assert_array_equal(p, [10, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert keep.all()
    p, keep = clean_prices(raw, policy="drop")
    np.testing.assert_array_equal(keep, [True, False, False, False, False, False])
    cents, _ = clean_prices(np.array([1999, 5], dtype=np.int64))
    assert cents.dtype == np.float64 and cents.tolist() == [1999.0, 5.0]
    # one price policy offline and in serving: 0 (a free item) is a price, a negative one is not
    free, keep = clean_prices([0.0, 3.0])
    assert free.tolist() == [0.0, 3.0] and keep.all()
    np.testing.assert_array_equal(
        usable_prices([0.0, -0.01, np.nan, np.inf, 5.0]), [True, False, False, False, True]
    )


def test_non_finite_scores_never_rank_first():
    # A NaN price gives a NaN score; it must rank last, and a +inf score too.
    score = Multiplicative().score([0.5, 0.1, 0.2], [0.5, 0.1, 0.2], [np.nan, 10, 20])
    assert np.isnan(score[0])
    np.testing.assert_array_equal(rank_within(np.zeros(3, int), score), [2, 1, 0])
    np.testing.assert_array_equal(
        rank_within(np.zeros(3, int), np.array([np.inf, 1.0, -np.inf])), [1, 0, 2]
    )


def test_ties_are_broken_by_row_order_and_one_candidate_requests_work():
    np.testing.assert_array_equal(
        rank_within(np.array([1, 0, 1, 0, 2]), np.ones(5)), [0, 0, 1, 1, 0]
    )
    data = _two_requests()
    single = data.subset(
        np.array([True, False, False, False, False])
    )  # a request with one candidate
    m = replay_metrics(single, np.array([1.0]), k=10)
    assert (
        m["gmv@10"] == 0.0
        and m["clicks@10"] == 1.0
        and m["ndcg@10"] is None
        and m["ndcg_requests"] == 0
    )


# --- replay --------------------------------------------------------------------------------


def _two_requests() -> ReplayData:
    # request "a": 3 candidates, request "b": 2 candidates
    return ReplayData(
        group=np.array(["a", "a", "a", "b", "b"]),
        click=np.array([1, 1, 0, 1, 1]),
        conversion=np.array([0, 1, 0, 1, 1]),
        value=np.array([10.0, 20.0, 30.0, 5.0, 50.0]),
        price=np.array([10.0, 20.0, 30.0, 5.0, 50.0]),
        p_ctr=np.full(5, 0.1),
        p_cvr=np.full(5, 0.1),
        true_ctr=np.array([0.1, 0.2, 0.3, 0.4, 0.5]),
        true_cvr=np.array([0.5, 0.5, 0.5, 0.1, 0.1]),
    )


def test_gmv_and_ndcg_at_k_on_two_requests():
    data = _two_requests()
    score = np.array([3.0, 2.0, 1.0, 0.5, 0.9])
    m = replay_metrics(data, score, k=2)
    # a: top 2 = rows 0, 1 → GMV 20, 1 order, 2 clicks; b: both rows → GMV 55, 2 orders, 2 clicks
    assert m["gmv@2"] == pytest.approx((20 + 55) / 2)
    assert m["orders@2"] == pytest.approx(1.5) and m["clicks@2"] == pytest.approx(2.0)
    # NDCG a: DCG = 20/log2(3), IDCG = 20; b: DCG = IDCG = 50 + 5/log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    # expected GMV: a rows 0, 1: 0.1·0.5·10 + 0.2·0.5·20 = 2.5; b: 0.4·0.1·5 + 0.5·0.1·50 = 2.7
    assert m["exp_gmv@2"] == pytest.approx((2.5 + 2.7) / 2)
    m1 = replay_metrics(data, score, k=1)
    assert m1["gmv@1"] == pytest.approx(25.0) and m1["ndcg@1"] == pytest.approx(0.5)


def test_position_effect_moves_true_ctr_to_the_new_rank():
    data = ReplayData(
        group=np.zeros(2, int),
        click=np.zeros(2),
        conversion=np.zeros(2),
        value=np.ones(2),
        price=np.ones(2),
        p_ctr=np.ones(2) / 2,
        p_cvr=np.ones(2) / 2,
        position=np.array([1.0, 2.0]),
        true_ctr=np.array([0.5, 0.5]),
        true_cvr=np.ones(2),
    )
    m = replay_metrics(data, np.array([0.0, 1.0]), k=1, position_coef=1.0)
    # row 1 logged at position 2, now at rank 1: logit 0 + 1·(log 2 − log 1) → σ(log 2) = 2/3
    assert m["exp_clicks@1"] == pytest.approx(2 / 3)


def test_groups_and_pseudo_requests():
    np.testing.assert_array_equal(dense_groups(np.array([7, 3, 7, 9])), [0, 1, 0, 2])
    g = pseudo_requests(25, size=10, seed=1)
    assert np.bincount(g).tolist() == [10, 10, 5]
    np.testing.assert_array_equal(g, pseudo_requests(25, size=10, seed=1))


def test_top_k_share():
    data = _two_requests()
    flag = np.array([False, False, True, False, True])
    assert top_k_share(data, np.array([3.0, 2.0, 1.0, 0.5, 0.9]), flag, k=1) == pytest.approx(0.5)


# --- tuning --------------------------------------------------------------------------------


def test_pareto_frontier():
    t = pl.DataFrame({"clicks": [1.0, 2.0, 1.5, 0.5, 2.0], "gmv": [5.0, 1.0, 4.0, 6.0, 0.5]})
    f = pareto_frontier(t, "clicks", "gmv")
    assert f.rows() == [(0.5, 6.0), (1.0, 5.0), (1.5, 4.0), (2.0, 1.0)]


def test_tune_grid_prefers_price_when_labels_reward_it():
    rng = np.random.default_rng(0)
    n_req, s = 400, 20
    price = np.exp(rng.normal(3, 1, n_req * s))
    ctr = rng.uniform(0.05, 0.3, n_req * s)
    cvr = np.full(n_req * s, 0.2)
    click = rng.random(n_req * s) < ctr
    conv = click & (rng.random(n_req * s) < cvr)
    data = ReplayData(
        np.repeat(np.arange(n_req), s),
        click,
        conv,
        price,
        price,
        ctr,
        cvr,
        true_ctr=ctr,
        true_cvr=cvr,
    )
    res = tune(
        data,
        TuneConfig(
            method="grid", grid_points=3, objective="exp_gmv", click_floor=None, fixed={"eps": 0.0}
        ),
    )
    assert res.trials.height == 27
    assert res.best.gamma > 0  # with constant pCVR, GMV needs price
    assert res.heldout["fused"]["exp_gmv@10"] > res.heldout["pctr"]["exp_gmv@10"]
    floor = tune(
        data,
        TuneConfig(
            method="grid", grid_points=3, objective="exp_gmv", click_floor=0.99, fixed={"eps": 0.0}
        ),
    )
    assert floor.tuning["fused"]["exp_clicks@10"] >= 0.99 * floor.tuning["pctr"]["exp_clicks@10"]


def test_tune_optuna_is_seeded():
    rng = np.random.default_rng(1)
    n = 2000
    p = rng.uniform(0.01, 0.5, (3, n))
    data = ReplayData(
        np.arange(n) // 20,
        rng.random(n) < p[0],
        rng.random(n) < p[0] * p[1],
        1 + 100 * p[2],
        1 + 100 * p[2],
        p[0],
        p[1],
    )
    a = tune(data, TuneConfig(method="optuna", trials=12, seed=3))
    b = tune(data, TuneConfig(method="optuna", trials=12, seed=3))
    assert a.best.params == b.best.params and a.trials.height == 12


# --- Beta smoothing and quadrants ----------------------------------------------------------


def test_beta_prior_method_of_moments_by_hand():
    s = np.array([0, 50, 5, 40])
    n = np.array([100, 100, 10, 200])
    prior = BetaPrior.fit(s, n)
    m = 95 / 410
    spread = (100 * m**2 + 100 * (0.5 - m) ** 2 + 10 * (0.5 - m) ** 2 + 200 * (0.2 - m) ** 2) / 410
    kappa = m * (1 - m) / (spread - m * (1 - m) * 4 / 410) - 1
    assert kappa == pytest.approx(4.71298, rel=1e-4)
    assert prior.alpha == pytest.approx(kappa * m) and prior.beta == pytest.approx(kappa * (1 - m))
    smoothed = prior.smooth(s, n)
    assert smoothed[2] == pytest.approx((5 + kappa * m) / (10 + kappa), rel=1e-12)
    assert smoothed[2] == pytest.approx(0.41406, abs=1e-4)  # 5/10 shrunk toward 0.23
    # no spread beyond binomial noise → every entity gets the pooled mean
    flat = BetaPrior.fit([10, 10, 10], [100, 100, 100])
    np.testing.assert_allclose(flat.smooth([10, 3], [100, 3]), [0.1, 0.1], atol=1e-5)


def test_quadrant_assignment_on_a_hand_made_table():
    stats = pl.DataFrame(
        {
            "item": ["a", "b", "c", "d", "e"],
            "impressions": [100, 100, 100, 100, 100],
            "clicks": [10, 1, 1, 10, 5],
            "conversions": [2, 1, 0, 0, 1],
            "gmv": [20.0, 10.0, 0.0, 0.0, 5.0],
            "ctr": [0.1, 0.01, 0.01, 0.1, 0.05],
            "cvr": [0.2, 0.2, 0.01, 0.01, 0.1],
        }
    )
    q = assign_quadrants(stats, {"ctr": 0.05, "cvr": 0.1})
    assert q.get_column("quadrant").to_list() == [
        "I",
        "II",
        "III",
        "IV",
        "III",
    ]  # on the line = low
    cut = thresholds(stats)
    assert cut["ctr"] == pytest.approx(0.054)  # impression-weighted (equal weights)
    assert cut["cvr"] == pytest.approx(
        (10 * 0.2 + 0.2 + 0.01 + 10 * 0.01 + 5 * 0.1) / 27
    )  # click-weighted
    assert thresholds(stats, "median") == {"ctr": 0.05, "cvr": 0.1}
    t = quadrant_table(q)
    assert t.get_column("entities").to_list() == [1, 1, 2, 1]
    assert t.get_column("gmv_share").to_list() == pytest.approx([20 / 35, 10 / 35, 5 / 35, 0.0])
    assert t.get_column("impressions_share").to_list() == pytest.approx([0.2, 0.2, 0.4, 0.2])
    assert t.get_column("cvr").to_list() == pytest.approx([0.2, 1.0, 1 / 6, 0.0])  # pooled


def test_entity_stats_smooths_small_entities_and_combines_columns():
    df = pl.DataFrame(
        {
            "shop": ["s"] * 1000 + ["t"] * 1000 + ["u"] * 3,
            "cat": ["x"] * 500 + ["y"] * 500 + ["x"] * 1000 + ["x"] * 3,
            "click": [1] * 100 + [0] * 900 + [1] * 20 + [0] * 980 + [1, 1, 1],
            "conversion": [1] * 10 + [0] * 990 + [1] * 10 + [0] * 990 + [1, 1, 1],
            "price": [2.0] * 2003,
        }
    )
    stats, priors = entity_stats(
        df, ["shop", "cat"], click="click", conversion="conversion", value="price", price="price"
    )
    assert stats.height == 4
    u = stats.filter(pl.col("shop") == "u").row(0, named=True)
    assert (u["impressions"], u["clicks"], u["conversions"], u["gmv"]) == (3, 3, 3, 6.0)
    assert u["ctr_raw"] == 1.0 and u["ctr"] < 0.5  # 3/3 clicks is shrunk well below 1
    assert u["ctr"] == pytest.approx(priors["ctr"].smooth(3, 3))


# --- training weights ----------------------------------------------------------------------


def test_price_weights_as_documented():
    price, conv = np.array([10, 100, 50, 7]), np.array([1, 1, 0, 0])
    mean = (math.log1p(10) + math.log1p(100)) / 2
    assert mean_log_price(price, conv) == pytest.approx(mean)
    np.testing.assert_allclose(
        price_weights(price, conv),
        [1 + math.log1p(10) / mean, 1 + math.log1p(100) / mean, 1, 1],
        rtol=1e-6,
    )
    np.testing.assert_allclose(price_weights(price, conv, cap=0.5), [1.5, 1.5, 1, 1])
    with pytest.raises(DataError, match="row 1"):
        price_weights(np.array([np.nan, 5.0]), np.array([1, 0]))
    with pytest.raises(DataError, match="no"):
        price_weights(price, np.zeros(4))


def test_per_request_and_bootstrap_lift():
    data = _two_requests()
    pr = per_request(data, np.array([3.0, 2.0, 1.0, 0.5, 0.9]), k=2)
    np.testing.assert_allclose(pr["gmv"], [20.0, 55.0])
    np.testing.assert_allclose(pr["exp_gmv"], [2.5, 2.7])
    ci = bootstrap_lift(np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]), n=50)
    assert (
        ci["lift"] == pytest.approx(1.0)
        and ci["low"] == pytest.approx(1.0)
        and ci["high"] == pytest.approx(1.0)
    )
    ci = bootstrap_lift(np.arange(1.0, 101.0), np.full(100, 50.5), n=200, seed=1)
    assert ci["lift"] == pytest.approx(0.0) and ci["low"] < 0 < ci["high"]
