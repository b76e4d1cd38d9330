"""DCMT (ICDE 2023) and ChorusCVR (2025): the loss against a hand computation on a fixed batch,
the stop-gradients, learning on the simulator, a bundle round trip and the ONNX export."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from mtrank.data.batch import Batch
from mtrank.errors import ConfigError
from mtrank.losses import model_loss
from mtrank.models import ENTIRE_SPACE_MODELS, MODELS, build_model
from mtrank.models.config import FeatureSpec, ModelConfig

SPEC = FeatureSpec(cardinalities=[7, 7], n_numerical=1)
TINY = ModelConfig(tower=[16, 8], embedding_dim=4)

# A fixed batch of 6 impressions: clicked + converted, clicked only, unclicked; row 3 has
# pCTR ≈ 0.0025 (1/ô clipped to 100), row 4 pCTR ≈ 0.9975 unclicked (1/(1 − ô) clipped to 100).
CLICK = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
CONV = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
LOGIT_CTR = [0.3, -1.2, -2.0, -6.0, 6.0, 1.5]
LOGIT_CVR = [0.8, -0.5, -1.5, 0.2, -3.0, 2.2]
LOGIT_OTHER = [-0.4, 0.9, 1.1, -0.7, 2.5, -1.8]  # counterfactual CVR (DCMT) / unCVR (ChorusCVR)


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def _batch() -> Batch:
    click, conv = torch.tensor(CLICK), torch.tensor(CONV)
    return Batch(
        categorical=torch.zeros(6, 2, dtype=torch.int64),
        numerical=torch.zeros(6, 1),
        labels={"click": click, "conversion": conv, "ctcvr": click * conv},
    )


def _outputs(other: str) -> dict[str, torch.Tensor]:
    a, b, c = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in
               (LOGIT_CTR, LOGIT_CVR, LOGIT_OTHER))  # fmt: skip
    return {
        "logit_ctr": a,
        "p_ctr": torch.sigmoid(a),
        "logit_cvr": b,
        "p_cvr": torch.sigmoid(b),
        f"logit_{other}": c,
        f"p_{other}": torch.sigmoid(c),
    }


def _model(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(SPEC, TINY.model_copy(update={"name": name, "options": options}))


# --- registry and outputs -------------------------------------------------------------------------


def test_registered_as_entire_space_funnel_models():
    assert {"dcmt", "chorus_cvr"} <= ENTIRE_SPACE_MODELS <= set(MODELS)
    b = _batch()
    for name, extra in (("dcmt", "cvr_cf"), ("chorus_cvr", "uncvr")):
        out = _model(name)(b.categorical, b.numerical)
        assert {"logit_ctr", "p_ctr", "logit_cvr", "p_cvr", "p_ctcvr", f"p_{extra}"} <= set(out)
        torch.testing.assert_close(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"])
        torch.testing.assert_close(out[f"p_{extra}"], torch.sigmoid(out[f"logit_{extra}"]))
    with pytest.raises(ConfigError, match="propensity_clip"):
        _model("dcmt", propensity_clip=0.5)
    with pytest.raises(ConfigError, match="unknown option 'lambda1'"):
        _model("dcmt", lambda1=0.1)
    with pytest.raises(ConfigError, match="align_weight"):
        _model("chorus_cvr", align_weight=-1.0)
    with pytest.raises(ConfigError, match="funnel"):
        build_model(
            FeatureSpec(cardinalities=[3], n_numerical=0, funnel=False, task_names=["a"]),
            TINY.model_copy(update={"name": "dcmt"}),
        )


def test_dcmt_defaults_are_the_reimplementations():
    o = _model("dcmt").options
    assert (o.cvr_weight, o.ctcvr_weight, o.prior_weight, o.propensity_clip) == (1, 1, 1e-3, 0.01)
    assert [(t.name, t.weight) for t in _model("dcmt").tasks] == [("ctr", 1.0), ("ctcvr", 1.0)]
    o = _model("chorus_cvr").options
    assert (o.align_weight, o.propensity_clip, o.ctr_weight) == (1.0, 0.01, 0.0)
    assert [t.name for t in _model("chorus_cvr").tasks] == ["ctcvr"]  # no standalone CTR loss


def test_complement_heads_start_at_one_minus_the_cvr_rate():
    from mtrank.models.layers import init_output_bias, prior_logit

    for name, tower in (("dcmt", "cvr_cf_tower"), ("chorus_cvr", "uncvr_tower")):
        model = _model(name)
        done = init_output_bias(model, {"ctr": 0.04, "cvr": 0.2})
        assert done == pytest.approx(
            {"ctr": prior_logit(0.04), "cvr": prior_logit(0.2), "not_cvr": prior_logit(0.8)}
        )
        assert float(getattr(model, tower).output_layer.bias) == pytest.approx(prior_logit(0.8))


# --- the loss, by hand ----------------------------------------------------------------------------


def test_dcmt_loss_equals_a_hand_computation():
    w_cvr, w_ctcvr, lam = 0.5, 2.0, 0.1
    model = _model("dcmt", cvr_weight=w_cvr, ctcvr_weight=w_ctcvr, prior_weight=lam)
    out = _outputs("cvr_cf")
    total, parts = model_loss(model, out, _batch())
    ctr = ctcvr = ipw = prior = 0.0
    for o, r, a, b, c in zip(CLICK, CONV, LOGIT_CTR, LOGIT_CVR, LOGIT_OTHER, strict=True):
        p_ctr, p_cvr, p_cf = _sig(a), _sig(b), _sig(c)
        ctr += _bce(p_ctr, o)
        ctcvr += _bce(p_ctr * p_cvr, o * r)
        w1, w0 = 1.0 / max(p_ctr, 0.01), 1.0 / max(1.0 - p_ctr, 0.01)
        ipw += o * w1 * _bce(p_cvr, r) + (1 - o) * w0 * _bce(p_cf, 1 - r)
        prior += abs(1.0 - (p_cvr + p_cf))
    n = len(CLICK)
    e_dcmt = ipw / n + lam * prior / n
    assert parts["ctr"] == pytest.approx(ctr / n, rel=1e-9)
    assert parts["ctcvr"] == pytest.approx(ctcvr / n, rel=1e-9)
    assert parts["extra"] == pytest.approx(w_cvr * e_dcmt, rel=1e-9)
    assert float(total.detach()) == pytest.approx(
        ctr / n + w_cvr * e_dcmt + w_ctcvr * ctcvr / n, rel=1e-9
    )
    # the clipped rows: 1/ô = 100 on row 3 (ô ≈ 0.0025), 1/(1 − ô) = 100 on row 4
    assert 1.0 / _sig(LOGIT_CTR[3]) > 100 and 1.0 / (1 - _sig(LOGIT_CTR[4])) > 100


def test_dcmt_ipw_weights_are_detached_and_the_prior_reaches_the_factual_tower():
    model = _model("dcmt", prior_weight=1.0)
    out = _outputs("cvr_cf")
    model.dcmt_risk(out, _batch()).backward()
    assert out["logit_ctr"].grad is None  # no path from the risk to pCTR
    # on an unclicked row only the prior reaches the factual tower: d|1 − r̂ − r̂*| / db
    b, c = LOGIT_CVR[2], LOGIT_OTHER[2]
    sign = -1.0 if 1.0 - _sig(b) - _sig(c) > 0 else 1.0
    want = sign * _sig(b) * (1 - _sig(b)) / 6
    assert float(out["logit_cvr"].grad[2]) == pytest.approx(want, rel=1e-9)


def test_chorus_loss_equals_a_hand_computation():
    align_w, ctr_w = 0.5, 0.3
    model = _model("chorus_cvr", align_weight=align_w, ctr_weight=ctr_w)
    out = _outputs("uncvr")
    total, parts = model_loss(model, out, _batch())
    ctr = ctcvr = ctuncvr = cvr_ipw = uncvr_ipw = align = 0.0
    for o, r, a, b, c in zip(CLICK, CONV, LOGIT_CTR, LOGIT_CVR, LOGIT_OTHER, strict=True):
        p_ctr, p_cvr, p_un = _sig(a), _sig(b), _sig(c)
        w1, w0 = 1.0 / max(p_ctr, 0.01), 1.0 / max(1.0 - p_ctr, 0.01)
        ctr += _bce(p_ctr, o)
        ctcvr += _bce(p_ctr * p_cvr, o * r)  # eq. 3
        ctuncvr += _bce(p_ctr * p_un, o * (1 - r))  # eq. 7
        cvr_ipw += o * w1 * _bce(p_cvr, r)  # eq. 4
        uncvr_ipw += o * w1 * _bce(p_un, 1 - r)  # eq. 9
        align += (o * w1 + (1 - o) * w0) * (_bce(p_cvr, 1 - p_un) + _bce(p_un, 1 - p_cvr))  # 10
    n = len(CLICK)
    extra = (ctuncvr + cvr_ipw + uncvr_ipw + align_w * align) / n
    assert parts["ctcvr"] == pytest.approx(ctcvr / n, rel=1e-9)
    assert parts["ctr"] == pytest.approx(ctr / n, rel=1e-9)
    assert parts["extra"] == pytest.approx(extra, rel=1e-9)
    assert float(total.detach()) == pytest.approx(ctcvr / n + ctr_w * ctr / n + extra, rel=1e-9)
    terms = model.chorus_terms(out, _batch())
    assert float(terms["align"].detach()) == pytest.approx(align / n, rel=1e-9)


def test_chorus_soft_targets_and_ipw_weights_are_detached():
    model = _model("chorus_cvr")
    out = _outputs("uncvr")
    t = model.chorus_terms(out, _batch())
    (t["cvr_ipw"] + t["uncvr_ipw"] + t["align"]).backward()
    assert out["logit_ctr"].grad is None  # no path from the risk to pCTR
    out = _outputs("uncvr")
    model.chorus_terms(out, _batch())["align"].backward()
    # unclicked row 2: d/db BCE(σ(b), sg(1 − u)) = σ(b) − (1 − u), weighted by 1/(1 − ô), / n
    p_ctr, p_cvr, p_un = _sig(LOGIT_CTR[2]), _sig(LOGIT_CVR[2]), _sig(LOGIT_OTHER[2])
    want = (p_cvr - (1 - p_un)) / (1 - p_ctr) / 6
    assert float(out["logit_cvr"].grad[2]) == pytest.approx(want, rel=1e-9)


# --- learning, bundle, ONNX -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(sim_splits):
    from mtrank.data.simulate import SIMULATED_SCHEMA
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import fit

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            name: fit(
                sim_splits,
                SIMULATED_SCHEMA,
                ModelConfig(name=name, tower=[16, 8], embedding_dim=4),
                TrainConfig(epochs=2, batch_size=512, lr=3e-3, seed=0),
                quiet=True,
            )
            for name in ("dcmt", "chorus_cvr")
        }
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["dcmt", "chorus_cvr"])
def test_trained_pcvr_beats_a_constant_on_the_simulator(fitted, sim_splits, name):
    res = fitted[name]
    test = sim_splits["test"]
    out = res.bundle.predict_arrays(res.bundle.encode(test, with_labels=True))
    clicked = test["click"].to_numpy() == 1
    # a constant has AUC 0.5 and rank correlation 0 with the simulator's true CVR
    assert res.metrics["test"]["auc_cvr_masked"] > 0.6, res.metrics["test"]
    rho = spearmanr(out["p_cvr"], test["true_cvr_do"].to_numpy()).statistic
    rho_clicked = spearmanr(
        out["p_cvr"][clicked], test["true_cvr_clicked"].to_numpy()[clicked]
    ).statistic
    assert rho > 0.3 and rho_clicked > 0.3, (rho, rho_clicked)


@pytest.mark.parametrize("name", ["dcmt", "chorus_cvr"])
def test_config_round_trip_bundle_and_onnx(fitted, sim_splits, tmp_path, name):
    from mtrank.bundle import Bundle
    from mtrank.serve.onnx_export import export_onnx

    res = fitted[name]
    path = res.bundle.save(tmp_path / "b")
    loaded = Bundle.load(path)
    assert type(loaded.model) is type(res.bundle.model)
    assert loaded.model.options == res.bundle.model.options
    data = loaded.encode(sim_splits["test"].head(2000), with_labels=True)
    a, b = res.bundle.predict_arrays(data), loaded.predict_arrays(data)
    assert {"p_ctr", "p_cvr", "p_ctcvr"} <= set(a)  # (+ p_cvr_cf or p_uncvr, p_ctuncvr)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a["p_ctcvr"], a["p_ctr"] * a["p_cvr"], rtol=1e-6)
    onnx_path, diffs = export_onnx(path, tmp_path / "m.onnx")  # verified against torch inside
    assert onnx_path.stat().st_size > 0 and max(diffs.values()) < 1e-5
