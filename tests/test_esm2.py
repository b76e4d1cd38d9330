"""ESM² (Wen et al. SIGIR 2020): composition, the entire-space loss by hand, funnel checks."""

import numpy as np
import pytest
import torch

from mtrank.data.batch import Batch
from mtrank.errors import ConfigError
from mtrank.losses import model_loss
from mtrank.models import MODELS, build_model
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.models.esm2 import mixture_logit

SPEC = FeatureSpec(
    cardinalities=[6, 9], n_numerical=1, stages=["click", "cart", "buy"], parents=[-1, 0, 0]
)


def _model(**options):
    torch.manual_seed(0)
    return build_model(SPEC, ModelConfig(name="esm2", embedding_dim=4, tower=[8], options=options))


def _batch():
    # 8 impressions: o (click), a (cart, ≤ o), r (buy, ≤ o): buys with and without a cart
    o = torch.tensor([1, 1, 1, 1, 0, 0, 1, 0], dtype=torch.float32)
    a = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0], dtype=torch.float32)
    r = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.float32)
    cat = torch.tensor([[1, 2], [3, 4], [5, 1], [2, 8], [4, 4], [0, 7], [1, 1], [3, 5]])
    num = torch.linspace(-1.0, 1.0, 8).unsqueeze(1)
    labels = {"click_all": o, "cart_all": o * a, "buy_all": o * r, "click": o, "cart": a, "buy": r}
    return Batch(cat, num, labels)


def test_registered_and_composed_as_the_paper_scm():
    assert "esm2" in MODELS and MODELS["esm2"].entire_space
    model, b = _model(), _batch()
    with torch.no_grad():
        out = {k: v.double().numpy() for k, v in model(b.categorical, b.numerical).items()}
    y1, y2, y3, y4 = out["p_click"], out["p_cart"], out["p_buy_cart"], out["p_buy_nocart"]
    cvr = y2 * y3 + (1 - y2) * y4
    np.testing.assert_allclose(out["p_buy"], cvr, rtol=1e-5)
    np.testing.assert_allclose(out["p_buy_all"], y1 * cvr, rtol=1e-5)
    np.testing.assert_allclose(out["p_cart_all"], y1 * y2, rtol=1e-6)
    np.testing.assert_allclose(out["p_click_all"], y1)
    for alias, name in (("p_ctr", "p_click"), ("p_cvr", "p_buy"), ("p_ctcvr", "p_buy_all")):
        np.testing.assert_array_equal(out[alias], out[name])
    assert (out["p_buy_all"] <= out["p_click"]).all()


def test_loss_equals_the_hand_computed_entire_space_loss():
    model, b = _model(w_ctavr=0.5), _batch()
    out = model(b.categorical, b.numerical)
    loss, parts = model_loss(model, out, b)
    p = {k: v.detach().double().numpy() for k, v in out.items()}
    o, a, r = (b.labels[k].double().numpy() for k in ("click", "cart", "buy"))
    y1, y2, y3, y4 = p["p_click"], p["p_cart"], p["p_buy_cart"], p["p_buy_nocart"]

    def bce(q, y):
        return float(np.mean(-(y * np.log(q) + (1 - y) * np.log(1 - q))))

    l_ctr = bce(y1, o)  # ESM² eq. 9
    l_ctavr = bce(y1 * y2, o * a)  # eq. 10
    l_ctcvr = bce(y1 * (y2 * y3 + (1 - y2) * y4), o * r)  # eq. 11
    assert parts["click"] == pytest.approx(l_ctr, rel=1e-5)
    assert parts["cart_all"] == pytest.approx(l_ctavr, rel=1e-5)
    assert parts["buy_all"] == pytest.approx(l_ctcvr, rel=1e-5)
    total = l_ctr + 0.5 * l_ctavr + l_ctcvr  # eq. 12
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5)
    loss.backward()  # y₃ and y₄ learn only through the CTCVR mixture
    for k in ("buy_act", "buy_other"):
        assert model.towers[k].output_layer.weight.grad.abs().sum() > 0


def test_mixture_logit_is_exact_and_finite_at_extremes():
    a2 = torch.tensor([-60.0, 0.3, 60.0, 5.0, -2.0], dtype=torch.float64)
    a3 = torch.tensor([40.0, -1.0, -60.0, 30.0, 1.5], dtype=torch.float64)
    a4 = torch.tensor([-40.0, 2.0, 60.0, -30.0, -3.0], dtype=torch.float64)
    logit = mixture_logit(a2, a3, a4)
    assert torch.isfinite(logit).all()
    s = torch.sigmoid
    p = s(a2) * s(a3) + s(-a2) * s(a4)
    torch.testing.assert_close(s(logit), p, rtol=1e-9, atol=1e-300)
    # a2 = −60: no cart, so pCVR ≈ y₄ = σ(−40): the logit is −40 + O(e^−20)
    assert float(logit[0]) == pytest.approx(-40.0, abs=1e-8)


@pytest.mark.parametrize(
    "stages,parents",
    [
        ([], []),  # the two-stage click/conversion shorthand
        (["click", "cart", "buy"], [-1, 0, 1]),  # a buy only through the cart
        (["click", "buy"], [-1, 0]),
    ],
)
def test_refuses_funnels_that_are_not_the_post_click_branch(stages, parents):
    spec = FeatureSpec(cardinalities=[3], n_numerical=0, stages=stages, parents=parents)
    with pytest.raises(ConfigError, match="esm2 needs a three-stage funnel"):
        build_model(spec, ModelConfig(name="esm2", tower=[4]))


def test_negative_loss_weight_is_an_error():
    with pytest.raises(ConfigError, match="w_ctcvr must be ≥ 0"):
        _model(w_ctcvr=-1.0)
    with pytest.raises(ConfigError, match="unknown option 'alpha'"):
        _model(alpha=1.0)
