"""The model zoo (shared-bottom, MMoE, PLE, AITM, ESMM variants, ESCM², the ESMM paper's
baselines) and the benchmark protocol."""

import json
import math

import numpy as np
import pytest
import torch

from mtrank.benchmark import (
    BenchmarkConfig,
    check_models,
    expert_divergence,
    gate_report,
    markdown_table,
    run_benchmark,
)
from mtrank.data.batch import EncodedData
from mtrank.data.datasets import DATASETS
from mtrank.errors import ConfigError
from mtrank.losses import model_loss
from mtrank.models import (
    ENTIRE_SPACE_MODELS,
    MODELS,
    PLAIN_TASK_MODELS,
    THREE_STAGE_MODELS,
    build_model,
)
from mtrank.models.baselines import aman_indices, oversampling_indices, unbias_indices
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.models.escm2 import ipw_weights
from mtrank.train.trainer import TrainConfig, Trainer
from tests.conftest import make_batch

TWO_STAGE = sorted(set(MODELS) - THREE_STAGE_MODELS)  # esm2 needs three stages: test_esm2
SPEC = FeatureSpec(cardinalities=[7, 7], n_numerical=1)
PLAIN = FeatureSpec(
    cardinalities=[7, 7], n_numerical=1, funnel=False, task_names=["income", "never_married"]
)
TINY = ModelConfig(tower=[16, 8], embedding_dim=4)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small models on a shared machine: one thread avoids oversubscription (10× faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _plain_batch(n=12):
    b = make_batch(n)
    b.labels = {"income": b.labels["click"], "never_married": b.labels["conversion"]}
    return b


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PLAIN_TASK_MODELS))
def test_plain_multitask_outputs_and_losses(name):
    torch.manual_seed(0)
    model = build_model(PLAIN, TINY.model_copy(update={"name": name}))
    b = _plain_batch()
    out = model(b.categorical, b.numerical)
    assert set(out) == {"logit_income", "p_income", "logit_never_married", "p_never_married"}
    for k, v in out.items():
        assert v.shape == (12,)
        if k.startswith("p_"):
            assert ((v >= 0) & (v <= 1)).all()
    assert [(t.name, t.label, t.mask) for t in model.tasks] == [
        ("income", "income", None),
        ("never_married", "never_married", None),
    ]
    loss, parts = model_loss(model, out, b)
    loss.backward()
    assert set(parts) == {"income", "never_married"} and torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(set(MODELS) - PLAIN_TASK_MODELS))
def test_funnel_only_models_refuse_plain_tasks(name):
    with pytest.raises(ConfigError, match="funnel"):
        build_model(PLAIN, TINY.model_copy(update={"name": name}))


def test_loss_spaces_of_the_zoo():
    names = {
        n: {
            t.name: (t.label, t.kind, t.mask)
            for t in build_model(SPEC, TINY.model_copy(update={"name": n})).tasks
        }
        for n in TWO_STAGE
    }
    for n in ("esmm", "esmm_ns", "esmm_sb", "esmm_mmoe", "escm2_ipw", "escm2_dr"):
        assert names[n]["ctcvr"] == ("ctcvr", "logit_product", None)  # through pCTR · pCVR
    for n in ("shared_bottom", "mmoe", "ple", "base"):
        assert names[n]["cvr"] == ("conversion", "logit", "click")  # clicked space only
    assert names["aitm"]["ctcvr"] == ("ctcvr", "logit", None)
    assert names["aman"]["cvr"][2] == "cvr_space"
    assert ENTIRE_SPACE_MODELS <= set(MODELS)


def test_esmm_ns_has_its_own_cvr_embedding():
    m = build_model(SPEC, TINY.model_copy(update={"name": "esmm_ns"}))
    assert m.cvr_embedding is not None and m.cvr_embedding is not m.embedding


def test_ple_levels_and_bad_options():
    m = build_model(
        SPEC,
        TINY.model_copy(
            update={
                "name": "ple",
                "options": {"n_levels": 2, "task_experts": 1, "shared_experts": 3},
            }
        ),
    )
    assert (
        len(m.body.levels) == 2
        and m.body.levels[0].shared_gate is not None
        and m.body.levels[1].shared_gate is None
    )
    b = make_batch(5)
    w = m.gate_weights(b.categorical, b.numerical)
    assert w["ctr"].shape == (5, 4)  # 1 task expert + 3 shared
    torch.testing.assert_close(w["ctr"].sum(1), torch.ones(5))
    with pytest.raises(ConfigError, match="n_experts"):
        build_model(SPEC, TINY.model_copy(update={"name": "mmoe", "options": {"n_experts": 0}}))
    with pytest.raises(ConfigError, match="tower_hidden"):
        build_model(
            SPEC, TINY.model_copy(update={"name": "ple", "options": {"tower_hidden": "wide"}})
        )
    linear = build_model(
        SPEC, TINY.model_copy(update={"name": "shared_bottom", "options": {"tower_hidden": []}})
    )
    assert (
        isinstance(linear.towers["ctr"].net[0], torch.nn.Linear)
        and len(linear.towers["ctr"].net) == 1
    )
    with pytest.raises(ConfigError, match="has no gates"):
        build_model(SPEC, TINY.model_copy(update={"name": "shared_bottom"})).gate_weights(
            b.categorical, b.numerical
        )


# --- MMoE experts --------------------------------------------------------------------------------


def test_mmoe_experts_differ_at_init_and_after_training(small_sim):
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.data.simulate import SIMULATED_SCHEMA

    torch.manual_seed(0)
    enc = FeatureEncoder.fit(small_sim, SIMULATED_SCHEMA)
    data = EncodedData.from_frame(small_sim, SIMULATED_SCHEMA, enc)
    spec = FeatureSpec(cardinalities=enc.cardinalities, n_numerical=len(enc.numerical))
    model = build_model(
        spec, ModelConfig(name="mmoe", tower=[16, 8], embedding_dim=4, options={"n_experts": 3})
    )
    weights = [e.net[0].weight.detach().clone() for e in model.body.experts.experts]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    x = (data.categorical[:2000], data.numerical[:2000])
    with torch.no_grad():
        before = expert_divergence(model.expert_outputs(*x))
    Trainer(TrainConfig(epochs=1, batch_size=1024, seed=0), SIMULATED_SCHEMA, quiet=True).fit(
        model, data
    )
    with torch.no_grad():
        after = expert_divergence(model.expert_outputs(*x))
    assert before["divergence"] > 0.05 and after["divergence"] > 0.01
    cos = np.array(after["cosine"])
    assert np.allclose(np.diag(cos), 1.0, atol=1e-6) and (cos[~np.eye(3, dtype=bool)] < 0.999).all()
    rep = gate_report(model, data)
    for g in rep["gates"].values():
        assert sum(g["mean"]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < g["entropy"] <= math.log(3) + 1e-9


def test_identical_experts_have_zero_divergence():
    e = torch.randn(10, 1, 4).expand(10, 3, 4)
    assert expert_divergence(e)["divergence"] == pytest.approx(0.0, abs=1e-9)


# --- the ESMM paper's baselines ------------------------------------------------------------------


def _funnel_tensors():
    g = torch.Generator().manual_seed(0)
    click = (torch.rand(10_000, generator=g) < 0.3).float()
    conv = click * (torch.rand(10_000, generator=g) < 0.2).float()
    p_ctr = torch.rand(10_000, generator=g) * 0.9 + 0.05
    return click, conv, p_ctr


def test_resampling_counts_on_a_fixed_seed():
    click, conv, p_ctr = _funnel_tensors()
    assert int(click.sum()) == 2951 and int(conv.sum()) == 617
    aman = aman_indices(click, 0.1, torch.Generator().manual_seed(1))
    assert len(aman) == 3661  # all 2,951 clicked rows + 710 of the 7,049 unclicked (≈ 10 %)
    assert int(click[aman].sum()) == 2951
    assert torch.equal(aman, aman_indices(click, 0.1, torch.Generator().manual_seed(1)))
    over = oversampling_indices(click, conv, 5)
    assert len(over) == 2951 + 4 * 617 and int(conv[over].sum()) == 5 * 617
    unb = unbias_indices(click, p_ctr, 0.05, torch.Generator().manual_seed(1))
    assert len(unb) == 853 and bool((click[unb] == 1).all())
    q = torch.quantile(p_ctr[click > 0].double(), 0.05)
    low = (click > 0) & (p_ctr <= q)  # acceptance probability 1
    assert set(low.nonzero().squeeze(1).tolist()) <= set(unb.tolist())
    # the resample leans towards rows that were unlikely to be clicked: mean pCTR drops
    assert float(p_ctr[unb].mean()) < float(p_ctr[click > 0].mean()) - 0.1
    with pytest.raises(ConfigError, match="negative_rate"):
        aman_indices(click, 0.0, torch.Generator())
    with pytest.raises(ConfigError, match="oversample_rate"):
        oversampling_indices(click, conv, 0)


def test_prepare_split_flags_ctr_and_cvr_rows():
    click, conv, p_ctr = _funnel_tensors()
    n = click.numel()
    data = EncodedData(
        torch.zeros(n, 2, dtype=torch.int64),
        torch.zeros(n, 1),
        {"click": click, "conversion": conv, "ctcvr": click * conv},
        side={"propensity_ctr": p_ctr.numpy()},
    )
    model = build_model(
        SPEC, TINY.model_copy(update={"name": "aman", "options": {"negative_rate": 0.1}})
    )
    train = model.prepare_split(data, "train", seed=1)
    assert len(train) == n + 3661
    assert (
        int(train.labels["ctr_space"].sum()) == n and int(train.labels["cvr_space"].sum()) == 3661
    )
    val = model.prepare_split(data, "val", seed=1)
    assert len(val) == n and torch.equal(val.labels["cvr_space"], click)
    unbias = build_model(SPEC, TINY.model_copy(update={"name": "unbias"}))
    assert int(unbias.prepare_split(data, "train", seed=1).labels["cvr_space"].sum()) == 853
    data.side = {}
    with pytest.raises(ConfigError, match="propensit"):
        unbias.prepare_split(data, "train", seed=1)


def test_division_pcvr_is_clipped_to_one():
    torch.manual_seed(0)
    model = build_model(SPEC, TINY.model_copy(update={"name": "division"}))
    with torch.no_grad():
        model.ctr_model.tower.net[-1].bias.fill_(-8.0)  # pCTR ≈ 3e-4
        model.ctcvr_model.tower.net[-1].bias.fill_(8.0)  # pCTCVR ≈ 1 > pCTR
    b = make_batch(16)
    out = model(b.categorical, b.numerical)
    assert (out["p_ctcvr"] > out["p_ctr"]).all()
    assert torch.equal(out["p_cvr"], torch.ones(16))
    assert torch.isfinite(out["logit_cvr"]).all() and (out["logit_cvr"] > 13).all()
    with torch.no_grad():
        model.ctcvr_model.tower.net[-1].bias.fill_(-12.0)
    out = model(b.categorical, b.numerical)
    torch.testing.assert_close(out["p_cvr"], out["p_ctcvr"] / out["p_ctr"])
    assert ((out["p_cvr"] >= 0) & (out["p_cvr"] < 1)).all()


# --- AITM and ESCM² -----------------------------------------------------------------------------


def test_aitm_calibrator_penalises_only_pctcvr_above_pctr():
    model = build_model(
        SPEC, TINY.model_copy(update={"name": "aitm", "options": {"calibrator_weight": 0.5}})
    )
    b = make_batch(4)
    outs = {
        "p_ctr": torch.tensor([0.5, 0.2, 0.1, 0.3]),
        "p_ctcvr": torch.tensor([0.1, 0.2, 0.3, 0.7]),
    }
    assert float(model.extra_loss(outs, b)) == pytest.approx(0.5 * (0.2 + 0.4) / 4)
    outs["p_ctcvr"] = outs["p_ctr"] / 2
    assert float(model.extra_loss(outs, b)) == 0.0
    out = model(b.categorical, b.numerical)
    assert ((out["transfer_weight"] > 0) & (out["transfer_weight"] < 1)).all()
    total, parts = model_loss(model, out, b)
    assert "extra" in parts and float(total.detach()) == pytest.approx(
        parts["ctr"] + parts["ctcvr"] + parts["extra"], rel=1e-5
    )
    total.backward()
    assert (
        model.transfer[0].weight.grad.abs().sum() > 0
    )  # the CTCVR loss reaches the transfer layer


@pytest.mark.parametrize("name", ["escm2_ipw", "escm2_dr"])
def test_escm2_ipw_weight_is_finite_for_pctr_near_zero(name):
    assert torch.equal(
        ipw_weights(torch.tensor([0.0, 1e-30, 0.005, 0.5, 1.0]), 0.01),
        torch.tensor([100.0, 100.0, 100.0, 2.0, 1.0]),
    )
    torch.manual_seed(0)
    model = build_model(SPEC, TINY.model_copy(update={"name": name}))
    b = make_batch(16)
    out = model(b.categorical, b.numerical)
    logit_ctr = torch.full((16,), -80.0, requires_grad=True)  # pCTR ≈ 2e-35
    out = dict(out, logit_ctr=logit_ctr, p_ctr=torch.sigmoid(logit_ctr))
    extra = model.extra_loss(out, b)
    assert torch.isfinite(extra)  # (a DR risk may be negative: ê + o(e − ê)/p̂)
    extra.backward()
    assert logit_ctr.grad is None or torch.equal(
        logit_ctr.grad, torch.zeros(16)
    )  # the propensity is detached
    risk, imputation = model.counterfactual_risk(out, b)
    if name == "escm2_ipw":
        err = torch.nn.functional.binary_cross_entropy_with_logits(
            out["logit_cvr"], b.labels["conversion"], reduction="none"
        )
        assert float(risk.detach()) == pytest.approx(
            float((b.labels["click"] * err.detach() * 100).mean()), rel=1e-5
        )
        assert imputation is None
    else:
        assert imputation is not None and torch.isfinite(imputation)
    with pytest.raises(ConfigError, match="propensity_clip"):
        build_model(
            SPEC, TINY.model_copy(update={"name": name, "options": {"propensity_clip": 0.0}})
        )


# --- learning, through the benchmark --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    cfg = BenchmarkConfig(
        dataset="simulated",
        models=TWO_STAGE,
        repeats=1,
        epochs=3,
        batch_size=512,
        lr=2e-3,
        embedding_dim=8,
        tower=[32, 16],
        rows=40_000,
        test_fraction=0.25,
        threads=1,
    )
    return run_benchmark(cfg, tmp_path_factory.mktemp("sim"))[0]


def test_every_model_learns_on_the_simulator(tiny_bench):
    assert tiny_bench["split"]["by_time"] is True
    assert tiny_bench["split"]["rows"]["test"] == 10_000
    # a tiny budget (27k training rows, ~1,100 clicks, 3 epochs): thresholds say "learnt", not
    # "good"
    for name, s in tiny_bench["summary"].items():
        assert s["auc_ctr"]["mean"] > 0.55, name
        assert -0.3 < s["bias_cvr_clicked_all"]["mean"] < 0.5, name
        if name in ENTIRE_SPACE_MODELS:  # the simulator's truth: pCVR ranks the entire space
            assert s["auc_ctcvr"]["mean"] > 0.52, name
            assert s["auc_cvr_clicked_all"]["mean"] > 0.54, name
    run = tiny_bench["per_repeat"]
    for name in TWO_STAGE:
        m = run[name][0]
        assert m["ctcvr_source"] == ("own" if name in ENTIRE_SPACE_MODELS else "shared_ctr_x_pcvr")
        assert m["auc_ctcvr"] == (
            m["auc_ctcvr_own"] if name in ENTIRE_SPACE_MODELS else m["auc_ctcvr_shared"]
        )
        assert m["gauc_ctr"] is not None and m["gauc_cvr_masked"] is not None
    assert set(tiny_bench["gates"]) == {"mmoe", "esmm_mmoe", "ple"}
    table = markdown_table(tiny_bench)
    assert table.count("\n") == len(TWO_STAGE) + 1 and "| esmm | 0." in table


def test_base_ctr_network_equals_the_shared_ctr_network(tmp_path):
    # BASE's CTR network is built first from the same seed as the shared CTR network, sees the
    # same batches, and (one epoch, so no early-stopping choice) ends with identical weights
    cfg = BenchmarkConfig(
        dataset="simulated",
        models=["base"],
        repeats=1,
        epochs=1,
        batch_size=512,
        embedding_dim=4,
        tower=[8],
        rows=8_000,
        threads=1,
    )
    res, _ = run_benchmark(cfg, tmp_path)
    assert res["per_repeat"]["base"][0]["auc_ctr"] == res["shared_ctr"][0]["auc_ctr"]


def test_benchmark_is_reproducible_and_checks_models(tmp_path):
    cfg = BenchmarkConfig(
        dataset="simulated",
        models=["esmm", "mmoe"],
        repeats=2,
        epochs=1,
        batch_size=1024,
        embedding_dim=4,
        tower=[8],
        rows=5_000,
        threads=1,
    )
    a, _ = run_benchmark(cfg, tmp_path)
    b, _ = run_benchmark(cfg, tmp_path)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    s = a["summary"]["esmm"]["auc_ctr"]
    assert s["n"] == 2 and s["std"] > 0  # two seeds, two different fits
    with pytest.raises(ConfigError, match="needs a click"):
        check_models(["esmm"], DATASETS["census"].schema)
    with pytest.raises(ConfigError, match="unknown model"):
        check_models(["nope"], DATASETS["simulated"].schema)


def test_plain_multitask_models_learn(small_sim):
    from mtrank.data.datasets import LoadedData
    from mtrank.data.io import validate_frame
    from mtrank.data.schema import Schema
    from mtrank.data.split import SplitConfig, split_data
    from mtrank.workflow import fit

    schema = Schema(
        name="two_tasks",
        tasks={"cheap": "cheap", "young": "young"},
        categorical=["item_id", "category", "user_id", "user_age"],
        numerical=[],
    )
    df = small_sim.with_columns(
        cheap=(small_sim["price"] < 60).cast(int), young=(small_sim["user_age"] < 3).cast(int)
    )
    df, _ = validate_frame(df, schema, "sim")
    splits = split_data(LoadedData(schema, {"all": df}, {"all": "sim"}), SplitConfig())
    for name in sorted(PLAIN_TASK_MODELS):
        res = fit(
            splits,
            schema,
            ModelConfig(name=name, tower=[16, 8], embedding_dim=4),
            TrainConfig(epochs=1, batch_size=512),
            quiet=True,
        )
        test = res.metrics["test"]
        assert test["auc_cheap"] > 0.85 and test["auc_young"] > 0.85, name


@pytest.mark.parametrize("name", ["ple", "escm2_dr", "aman"])
def test_new_models_round_trip_through_a_bundle(small_sim, tmp_path, name):
    from mtrank.data.datasets import LoadedData
    from mtrank.data.io import validate_frame
    from mtrank.data.simulate import SIMULATED_SCHEMA
    from mtrank.data.split import SplitConfig, split_data
    from mtrank.bundle import Bundle
    from mtrank.workflow import fit

    df, _ = validate_frame(small_sim.head(6_000), SIMULATED_SCHEMA, "sim")
    splits = split_data(LoadedData(SIMULATED_SCHEMA, {"all": df}, {"all": "sim"}), SplitConfig())
    cfg = ModelConfig(
        name=name, tower=[8], embedding_dim=4, options={"n_levels": 2} if name == "ple" else {}
    )
    res = fit(splits, SIMULATED_SCHEMA, cfg, TrainConfig(epochs=1, batch_size=1024), quiet=True)
    res.bundle.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    data = loaded.encode(splits["test"], with_labels=True)
    a, b = res.bundle.predict_arrays(data), loaded.predict_arrays(data)
    assert set(a) == {"p_ctr", "p_cvr", "p_ctcvr"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_model_loss_adds_any_models_extra_loss():
    from mtrank.losses import TaskLoss

    class WithExtra(torch.nn.Module):
        tasks = [TaskLoss("ctr", label="click", outputs=("logit_ctr",))]

        def extra_loss(self, outputs, batch):
            return outputs["logit_ctr"].new_tensor(0.25)

    b = make_batch(8)
    out = {"logit_ctr": torch.zeros(8)}
    total, parts = model_loss(WithExtra(), out, b)
    assert parts == {"ctr": pytest.approx(math.log(2)), "extra": 0.25}
    assert float(total) == pytest.approx(math.log(2) + 0.25)
    plain = torch.nn.Module()
    plain.tasks = WithExtra.tasks
    assert model_loss(plain, out, b)[1] == {"ctr": pytest.approx(math.log(2))}
