import numpy as np
import pytest
import torch

from mtrank.errors import ConfigError
from mtrank.losses import model_loss, total_loss
from mtrank.models import MODELS, THREE_STAGE_MODELS, build_model
from mtrank.models.config import FeatureSpec, ModelConfig
from tests.conftest import make_batch

SPEC = FeatureSpec(cardinalities=[7, 7], n_numerical=1)
KEYS = {"logit_ctr", "logit_cvr", "p_ctr", "p_cvr", "p_ctcvr"}
# models whose pCTCVR comes from its own head (pCVR = clip(pCTCVR / pCTR, 0, 1)), not a product
OWN_CTCVR_HEAD = {"aitm", "division"}


@pytest.mark.parametrize("name", sorted(set(MODELS) - THREE_STAGE_MODELS))  # esm2: test_esm2
@pytest.mark.parametrize("n", [1, 33])
def test_named_outputs_shapes_and_bounds(name, n):
    torch.manual_seed(0)
    model = build_model(SPEC, ModelConfig(name=name, tower=[16, 8]))
    b = make_batch(n)
    out = model(b.categorical, b.numerical)
    assert KEYS <= set(out)
    for v in out.values():
        assert v.shape == (n,)
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        assert ((out[k] >= 0) & (out[k] <= 1)).all()
    if name not in OWN_CTCVR_HEAD:  # pCTCVR = pCTR · pCVR by construction
        assert (out["p_ctcvr"] <= out["p_ctr"]).all()
        torch.testing.assert_close(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"])
    if hasattr(model, "prepare_split"):  # the sampling baselines train on flagged rows
        b.labels.update(ctr_space=torch.ones(n), cvr_space=b.labels["click"])
    loss, parts = model_loss(model, out, b)
    loss.backward()
    assert torch.isfinite(loss)


def test_esmm_trains_cvr_tower_through_the_product_only():
    torch.manual_seed(0)
    model = build_model(SPEC, ModelConfig(name="esmm", tower=[8]))
    assert {t.name for t in model.tasks} == {"ctr", "ctcvr"}
    b = make_batch(16)
    loss, _ = total_loss(model.tasks, model(b.categorical, b.numerical), b)
    loss.backward()
    assert model.cvr_tower.net[0].weight.grad.abs().sum() > 0


def test_base_cvr_model_ignores_unclicked_rows():
    torch.manual_seed(0)
    model = build_model(SPEC, ModelConfig(name="base", tower=[8]))
    b = make_batch(32)
    out = model(b.categorical, b.numerical)
    cvr_task = [t for t in model.tasks if t.name == "cvr"]
    loss, _ = total_loss(cvr_task, out, b)
    loss.backward()
    # the CTR network receives no gradient from the CVR loss: the models are independent
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.ctr_model.parameters())
    g1 = [p.grad.clone() for p in model.cvr_model.parameters()]
    model.zero_grad()
    b.numerical[b.labels["click"] == 0] += 100.0  # change only unclicked rows
    loss2, _ = total_loss(cvr_task, model(b.categorical, b.numerical), b)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item())
    for a, c in zip(g1, [p.grad for p in model.cvr_model.parameters()], strict=True):
        torch.testing.assert_close(a, c)


def test_funnel_models_refuse_plain_multitask_data():
    spec = FeatureSpec(cardinalities=[3], n_numerical=0, funnel=False, task_names=["a", "b"])
    with pytest.raises(ConfigError, match="funnel"):
        build_model(spec, ModelConfig(name="esmm"))


def test_unknown_model_and_no_features():
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(SPEC, ModelConfig(name="nope"))
    with pytest.raises(ConfigError, match="at least one"):
        build_model(FeatureSpec(cardinalities=[], n_numerical=0), ModelConfig())


def test_only_numerical_or_only_categorical_features():
    for spec, b in (
        (FeatureSpec(cardinalities=[], n_numerical=1), make_batch(4, n_cat=0)),
        (FeatureSpec(cardinalities=[7], n_numerical=0), make_batch(4, n_cat=1, n_num=0)),
    ):
        out = build_model(spec, ModelConfig(tower=[4]))(b.categorical, b.numerical)
        assert np.isfinite(out["p_ctcvr"].detach().numpy()).all()
