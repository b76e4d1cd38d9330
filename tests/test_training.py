"""Trainer and the end-to-end workflow on small simulated data."""

import numpy as np
import polars as pl
import pytest
import torch

from mtrank.errors import BundleError
from mtrank.models.config import ModelConfig
from mtrank.bundle import Bundle
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import fit, predictions_frame

SMALL = ModelConfig(tower=[32, 16], embedding_dim=8)


@pytest.fixture(scope="module")
def splits(sim_splits):
    return sim_splits


@pytest.fixture(scope="module")
def esmm_fit(splits):
    from mtrank.data.simulate import SIMULATED_SCHEMA

    return fit(
        splits, SIMULATED_SCHEMA, SMALL, TrainConfig(epochs=2, batch_size=512, seed=0), quiet=True
    )


def test_time_split_puts_the_future_in_test(splits):
    assert splits["train"]["day"].max() <= splits["test"]["day"].min()
    assert splits["val"]["day"].max() <= splits["test"]["day"].min()
    assert sum(s.height for s in splits.values()) == 40_000


def test_esmm_learns_on_simulated_data(esmm_fit):
    test = esmm_fit.metrics["test"]
    assert test["auc_ctr"] > 0.65
    assert test["auc_ctcvr"] > 0.65
    # ~300 test clicks make auc_cvr_masked noisy; the simulator's truth measures pCVR directly
    assert test["auc_cvr_masked"] > 0.5
    assert test["auc_cvr_do_all"] > 0.56
    assert test["n_impressions"] == 8_000


def test_training_is_reproducible(splits):
    from mtrank.data.simulate import SIMULATED_SCHEMA

    cfg = TrainConfig(epochs=1, batch_size=1024, seed=3)
    a = fit(splits, SIMULATED_SCHEMA, SMALL, cfg, quiet=True).metrics["test"]
    b = fit(splits, SIMULATED_SCHEMA, SMALL, cfg, quiet=True).metrics["test"]
    assert a == b


def test_early_stopping_restores_best_validation_epoch(splits):
    from mtrank.data.simulate import SIMULATED_SCHEMA

    res = fit(
        splits,
        SIMULATED_SCHEMA,
        SMALL,
        TrainConfig(epochs=4, batch_size=256, lr=1e-2, patience=0, seed=0),
        quiet=True,
    )
    losses = [h.val_loss for h in res.result.history]
    assert res.result.best_epoch == int(np.argmin(losses)) + 1
    # the restored weights are the best epoch's: recomputing the validation metric matches it
    best = res.result.history[res.result.best_epoch - 1].val_metrics
    assert res.metrics["val"]["auc_ctr"] == pytest.approx(best["auc_ctr"])


def test_batch_size_one_and_tiny_test_set(splits):
    from mtrank.data.simulate import SIMULATED_SCHEMA

    tiny = {
        "train": splits["train"].head(64),
        "val": splits["val"].head(5),
        "test": splits["test"].head(3),
    }
    res = fit(
        tiny,
        SIMULATED_SCHEMA,
        ModelConfig(tower=[4], embedding_dim=2),
        TrainConfig(epochs=1, batch_size=1),
        quiet=True,
    )
    assert res.metrics["test"]["n_impressions"] == 3


def test_dropout_active_in_training_after_validation(splits):
    from mtrank.data.simulate import SIMULATED_SCHEMA
    from mtrank.train.trainer import Trainer

    seen = []
    res = fit(
        {k: v.head(2000) for k, v in splits.items()},
        SIMULATED_SCHEMA,
        ModelConfig(tower=[8], dropout=0.5),
        TrainConfig(epochs=2, batch_size=500),
        quiet=True,
    )
    model = res.bundle.model
    hook = model.ctr_tower.register_forward_hook(lambda m, i, o: seen.append(m.training))
    Trainer(TrainConfig(epochs=2, batch_size=1000), SIMULATED_SCHEMA, quiet=True).fit(
        model, *(lambda e: (e["train"], e["val"]))(_encode(res.bundle, splits))
    )
    hook.remove()
    # 2 training batches (train mode), validation loss + metrics (eval mode), then epoch 2
    # trains in train mode again (dropout active)
    assert seen == [True, True, False, False, True, True, False, False]


def _encode(bundle, splits):
    return {k: bundle.encode(v.head(2000), with_labels=True) for k, v in splits.items()}


def test_bundle_round_trip_gives_identical_predictions(esmm_fit, splits, tmp_path):
    path = esmm_fit.bundle.save(tmp_path / "b")
    loaded = Bundle.load(path)
    df = splits["test"].head(500)
    a = predictions_frame(esmm_fit.bundle, df, "t")
    b = predictions_frame(loaded, df.select(list(reversed(df.columns))), "t")
    assert a.equals(b)
    assert set(b.columns) >= {"p_ctr", "p_cvr", "p_ctcvr", "request_id", "true_cvr_do"}
    assert list(path.iterdir()) and not any(p.suffix in {".pt", ".pkl"} for p in path.iterdir())


def test_bundle_refuses_to_overwrite_and_replaces_atomically(esmm_fit, tmp_path):
    path = esmm_fit.bundle.save(tmp_path / "b")
    weights = (path / "model.safetensors").read_bytes()
    (path / "marker").write_text("old bundle")
    with pytest.raises(BundleError, match="already exists"):
        esmm_fit.bundle.save(path)
    assert (path / "marker").exists()  # refused: untouched
    esmm_fit.bundle.save(path, overwrite=True)
    assert not (path / "marker").exists()  # replaced as a whole directory
    assert (path / "model.safetensors").read_bytes() == weights
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging or backup left behind


@pytest.mark.parametrize(
    "damage,fragment",
    [
        (lambda p: (p / "config.json").write_text("{not json"), "unreadable JSON"),
        (
            lambda p: (p / "model.safetensors").write_bytes(
                (p / "model.safetensors").read_bytes()[:100]
            ),
            "model.safetensors",
        ),
        (lambda p: (p / "encoders.json").unlink(), "missing"),
        (
            lambda p: (p / "encoders.json").write_text(
                '{"format": "mtrank.encoders/1", "categorical": [], "numerical": []}'
            ),
            "does not match",
        ),
    ],
)
def test_tampered_bundle_is_a_clear_error(esmm_fit, tmp_path, damage, fragment):
    path = esmm_fit.bundle.save(tmp_path / "b")
    damage(path)
    with pytest.raises(BundleError, match=fragment):
        Bundle.load(path)


def test_unseen_and_missing_ids_at_predict_time(esmm_fit, splits):
    df = (
        splits["test"]
        .head(4)
        .with_columns(
            pl.Series("item_id", [10**9, None, 3, 4], dtype=pl.Int64),
            pl.Series("brand", ["", "x", "y", "z"]),
        )
    )
    data = esmm_fit.bundle.encode(df)
    assert (
        data.n_oov["item_id"] >= 1
        and data.n_missing["item_id"] == 1
        and data.n_missing["brand"] == 1
    )
    probs = esmm_fit.bundle.predict_arrays(data)
    assert np.isfinite(probs["p_ctcvr"]).all()


def _tiny_funnel(click, conv, weight=None):
    from mtrank.data.batch import EncodedData

    n = len(click)
    return EncodedData(
        categorical=torch.zeros(n, 1, dtype=torch.int64),
        numerical=torch.zeros(n, 1),
        labels={
            "click": torch.tensor(click, dtype=torch.float32),
            "conversion": torch.tensor(conv, dtype=torch.float32),
            "ctcvr": torch.tensor(click, dtype=torch.float32)
            * torch.tensor(conv, dtype=torch.float32),
        },
        weight=None if weight is None else torch.tensor(weight, dtype=torch.float32),
    )


def test_label_rates_hand_computed():
    from mtrank.data.simulate import SIMULATED_SCHEMA
    from mtrank.train.trainer import label_rates

    data = _tiny_funnel([1, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0])
    assert label_rates(data, SIMULATED_SCHEMA) == {"ctr": 3 / 8, "cvr": 1 / 3}
    # weighted: clicks 2 + 1 of total weight 5; conversions 2 of click weight 3
    weighted = _tiny_funnel([1, 0, 1, 0], [1, 0, 0, 0], weight=[2.0, 1.0, 1.0, 1.0])
    assert label_rates(weighted, SIMULATED_SCHEMA) == {"ctr": 3 / 5, "cvr": 2 / 3}
    assert label_rates(data, SIMULATED_SCHEMA, rows=2) == {"ctr": 0.5, "cvr": 1.0}
    assert label_rates(_tiny_funnel([0, 0], [0, 0]), SIMULATED_SCHEMA) == {
        "ctr": 0.0
    }  # no clicks: no cvr


def test_trainer_starts_each_head_at_its_base_rate(splits):
    """With a learning rate of 1e-12, one epoch leaves the output biases where the prior put
    them: log-odds of the click rate (CTR tower) and of conversions per click (CVR tower)."""
    from mtrank.data.batch import EncodedData
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.data.simulate import SIMULATED_SCHEMA as S
    from mtrank.models import build_model
    from mtrank.train.trainer import Trainer
    from mtrank.workflow import feature_spec

    enc = FeatureEncoder.fit(splits["train"], S)
    train = EncodedData.from_frame(splits["train"], S, enc)
    click = splits["train"]["click"].to_numpy().astype(float)
    conv = splits["train"]["conversion"].to_numpy().astype(float)
    ctr, cvr = click.mean(), (click * conv).sum() / click.sum()
    for prior in (True, False):
        torch.manual_seed(0)
        model = build_model(feature_spec(enc, S), SMALL)
        untouched = model.cvr_tower.output_layer.bias.item()
        Trainer(
            TrainConfig(epochs=1, batch_size=len(train), lr=1e-12, prior_output_bias=prior),
            S,
            quiet=True,
        ).fit(model, train, None)
        b_ctr, b_cvr = (
            model.ctr_tower.output_layer.bias.item(),
            model.cvr_tower.output_layer.bias.item(),
        )
        if prior:
            assert b_ctr == pytest.approx(np.log(ctr / (1 - ctr)), abs=1e-5)
            assert b_cvr == pytest.approx(np.log(cvr / (1 - cvr)), abs=1e-5)
        else:
            assert b_cvr == pytest.approx(untouched, abs=1e-6)
