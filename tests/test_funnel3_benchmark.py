"""benchmarks/funnel3.py on a tiny log: every model trains, metrics against the stage truths,
the paired table against ESMM (two stages) through mtrank.benchmark.paired_differences."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import polars as pl

from mtrank.benchmark import paired_differences

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "funnel3.py"


def _script():
    spec = importlib.util.spec_from_file_location("funnel3", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_metrics_against_known_truth():
    f3 = _script()
    test = pl.DataFrame(
        {
            "click": [1, 1, 1, 0, 0, 1],
            "cart": [1, 0, 1, 0, 0, 0],
            "conversion": [1, 0, 0, 0, 0, 1],
            "true_cvr_clicked": [0.4, 0.1, 0.3, 0.2, 0.05, 0.35],
            "true_ctcvr": [0.1, 0.01, 0.05, 0.02, 0.001, 0.08],
            "true_cart": [0.5, 0.1, 0.4, 0.2, 0.1, 0.3],
            "true_buy_cart": [0.6, 0.3, 0.5, 0.4, 0.2, 0.5],
            "true_buy_nocart": [0.2, 0.05, 0.1, 0.1, 0.01, 0.3],
        }
    )
    truth = lambda c: test[c].to_numpy()  # noqa: E731
    out = {
        "p_ctr": np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.6]),
        "p_cvr": truth("true_cvr_clicked"),  # the exact P(buy | click, x)
        "p_ctcvr": 1.0 - truth("true_ctcvr"),  # the reversed ranking
        "p_cart": truth("true_cart"),
    }
    m = f3.run_metrics(out, test, stages3=True)
    assert m["spearman_cvr_truth"] == 1.0 and m["spearman_ctcvr_truth"] == -1.0
    assert m["bias_cvr_clicked"] == 0.0
    assert m["auc_ctr"] == 1.0  # every click above every non-click
    assert m["auc_cvr_masked"] == 1.0  # buys 0.4, 0.35 above 0.1, 0.3 among clicked rows
    assert m["n_clicks"] == 4 and m["n_conversions"] == 2


def test_paired_differences_takes_a_metric_list():
    runs = {
        "ref": [{"sim_seed": s, "seed": 0, "auc_x": 0.5, "auc_ctr": 0.6} for s in range(3)],
        "m": [{"sim_seed": s, "seed": 0, "auc_x": 0.5 + 0.1 * s, "auc_ctr": 0.6} for s in range(3)],
    }
    d = paired_differences(runs, "ref", ["auc_x"])["m"]
    assert list(d) == ["auc_x"]
    assert abs(d["auc_x"]["mean"] - 0.1) < 1e-12 and d["auc_x"]["better"] == 2


def test_tiny_run_writes_results(tmp_path):
    f3 = _script()
    code = f3.main(
        [
            "--rows", "6000", "--sim-seeds", "2", "--epochs", "1",
            "--models", "esmm_2stage,esm2", "--tower", "8", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [len(r) for r in res["per_repeat"].values()] == [2, 2]
    esm2 = res["per_repeat"]["esm2"][0]
    assert 0.0 < esm2["auc_cvr_truth"] < 1.0 and 0.0 < esm2["auc_cart_truth"] < 1.0
    assert "auc_cart" not in res["per_repeat"]["esmm_2stage"][0]
    assert res["paired"]["esm2"]["auc_cvr_truth"]["n"] == 2
    md = (tmp_path / "results.md").read_text()
    assert "python benchmarks/funnel3.py --rows 6000" in md and "load average" in md
