import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from mtrank.data.simulate import SIMULATED_SCHEMA
from mtrank.metrics import auc, calibration, gauc, logloss
from mtrank.metrics.evaluate import evaluate_outputs


def test_auc_matches_sklearn_with_ties(rng):
    y = rng.integers(0, 2, 5000)
    p = np.round(rng.random(5000), 2)  # many ties
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_known_value():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_undefined_on_one_class():
    assert auc([0, 0, 0], [0.1, 0.2, 0.3]) is None
    assert auc([1, 1], [0.1, 0.2]) is None


def test_logloss_matches_sklearn(rng):
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000).clip(0.01, 0.99)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_calibration_ratio():
    assert calibration([1, 0, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(1.0)
    assert calibration([0, 0], [0.1, 0.1]) is None


def test_gauc_hand_computed_and_skips_single_class_users():
    # user a: 4 rows, AUC 0.75; user b: 2 rows, AUC 1.0; user c: only negatives; d: only positives
    y = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.5, 0.6, 0.7])
    g = np.array(["a", "a", "a", "a", "b", "b", "c", "c", "d"])
    res = gauc(y, p, g)
    assert res.value == pytest.approx((4 * 0.75 + 2 * 1.0) / 6)
    assert res.groups_used == 2 and res.groups_skipped == 2


def test_gauc_matches_sklearn_per_user(rng):
    n = 3000
    g = rng.integers(0, 30, n)
    y = rng.integers(0, 2, n)
    p = np.round(rng.random(n), 2)
    expected_num = expected_den = 0.0
    for u in np.unique(g):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            expected_num += m.sum() * roc_auc_score(y[m], p[m])
            expected_den += m.sum()
    assert gauc(y, p, g).value == pytest.approx(expected_num / expected_den, abs=1e-12)


def _funnel(rng, n=2000):
    click = (rng.random(n) < 0.3).astype(float)
    conv = click * (rng.random(n) < 0.4)
    out = {"p_ctr": rng.random(n), "p_cvr": rng.random(n)}
    out["p_ctcvr"] = out["p_ctr"] * out["p_cvr"]
    labels = {"click": click, "conversion": conv, "ctcvr": click * conv}
    side = {"user_id": rng.integers(0, 50, n)}
    return out, labels, side


def test_auc_cvr_masked_uses_clicked_rows_only(rng):
    out, labels, side = _funnel(rng)
    m1 = evaluate_outputs(out, labels, SIMULATED_SCHEMA, side)
    clicked = labels["click"] == 1
    assert m1["auc_cvr_masked"] == pytest.approx(
        roc_auc_score(labels["conversion"][clicked], out["p_cvr"][clicked])
    )
    out2 = dict(out, p_cvr=np.where(clicked, out["p_cvr"], 1.0 - out["p_cvr"]))
    m2 = evaluate_outputs(out2, labels, SIMULATED_SCHEMA, side)
    assert m2["auc_cvr_masked"] == m1["auc_cvr_masked"]
    assert m2["logloss_cvr_masked"] == m1["logloss_cvr_masked"]
    assert m1["auc_ctr"] == pytest.approx(roc_auc_score(labels["click"], out["p_ctr"]))
    assert m1["auc_ctcvr"] == pytest.approx(roc_auc_score(labels["ctcvr"], out["p_ctcvr"]))
    assert m1["n_clicks"] == int(clicked.sum())


def test_evaluation_is_stateless(rng):
    out, labels, side = _funnel(rng)
    out_b, labels_b, side_b = _funnel(np.random.default_rng(5))
    first = evaluate_outputs(out, labels, SIMULATED_SCHEMA, side)
    evaluate_outputs(out_b, labels_b, SIMULATED_SCHEMA, side_b)
    assert evaluate_outputs(out, labels, SIMULATED_SCHEMA, side) == first
