"""The evidence protocol: soft AUC, truth metrics, one selection rule, paired differences against
BASE, simulator knobs in the benchmark, the regime map and its heatmap."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mtrank.benchmark import (
    BenchmarkConfig,
    check_config,
    merge_results,
    paired_differences,
    run_benchmark,
)
from mtrank.errors import ConfigError
from mtrank.metrics.core import auc, hanley_mcneil_se, soft_auc
from mtrank.metrics.evaluate import truth_metrics
from mtrank.sweep import SweepConfig, merge_sweeps, run_sweep


def test_soft_auc_equals_auc_on_hard_labels_and_a_hand_computed_case():
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.3).astype(float)
    p = np.round(rng.random(500), 2)  # ties
    assert soft_auc(y, p) == pytest.approx(auc(y, p), abs=1e-12)
    # t = (0.9, 0.1), p = (1, 0): pairs i≠j weigh t_i(1 − t_j): (0,1) 0.81 concordant, (1,0) 0.01
    # discordant
    assert soft_auc(np.array([0.9, 0.1]), np.array([1.0, 0.0])) == pytest.approx(0.81 / 0.82)
    assert soft_auc(np.array([0.9, 0.1]), np.array([0.0, 1.0])) == pytest.approx(0.01 / 0.82)
    assert soft_auc(np.array([0.5, 0.5]), np.array([0.3, 0.3])) == pytest.approx(0.5)


def test_hanley_mcneil_standard_error():
    # Hanley & McNeil (1982), Table 1 style: A = 0.8, 50 positives, 50 negatives
    a, n = 0.8, 50
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    expected = np.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert hanley_mcneil_se(a, n, n) == pytest.approx(expected)
    assert hanley_mcneil_se(0.8, 500, 500) < hanley_mcneil_se(0.8, 50, 50)


def test_truth_metrics_are_named_by_truth_and_rows():
    p = np.array([0.2, 0.1, 0.3, 0.05])
    clicked = np.array([True, False, True, False])
    side = {
        "true_cvr_clicked": np.array([0.25, 0.1, 0.2, 0.1]),
        "true_cvr_do": np.array([0.1, 0.05, 0.1, 0.05]),
    }
    m = truth_metrics(p, clicked, side)
    assert m["bias_cvr_clicked_all"] == pytest.approx(np.mean(p - side["true_cvr_clicked"]))
    assert m["bias_cvr_do_unclicked"] == pytest.approx(np.mean([0.1 - 0.05, 0.05 - 0.05]))
    assert m["bias_cvr_do_clicked"] == pytest.approx(np.mean([0.2 - 0.1, 0.3 - 0.1]))
    assert m["auc_cvr_do_all"] == pytest.approx(soft_auc(side["true_cvr_do"], p))


def test_paired_differences_by_hand():
    runs = lambda vals: [
        {
            "sim_seed": s,
            "seed": r,
            "auc_ctcvr": v,
            "bias_cvr_do_all": -v,
            "n_conversions": 100,
            "n_impressions": 10_000,
        }
        for (s, r), v in vals.items()
    ]
    per = {
        "base": runs({(0, 0): 0.70, (0, 1): 0.72, (1, 0): 0.60}),
        "esmm": runs({(0, 0): 0.71, (0, 1): 0.71, (1, 0): 0.63}),
    }
    d = paired_differences(per, "base")["esmm"]["auc_ctcvr"]
    diffs = [0.01, -0.01, 0.03]
    assert d["mean"] == pytest.approx(np.mean(diffs)) and d["std"] == pytest.approx(
        np.std(diffs, ddof=1)
    )
    assert (d["better"], d["worse"], d["n"]) == (2, 1, 3)
    assert d["se_seeds"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3))
    assert d["se_hanley_mcneil"] == pytest.approx(
        np.mean(
            [
                np.hypot(hanley_mcneil_se(a, 100, 9_900), hanley_mcneil_se(b, 100, 9_900))
                for a, b in ((0.71, 0.70), (0.71, 0.72), (0.63, 0.60))
            ]
        )
    )
    # a bias compares |bias|: esmm's |−0.71| > |−0.70| is worse
    assert paired_differences(per, "base")["esmm"]["bias_cvr_do_all"]["worse"] == 2


def test_benchmark_options_are_checked_with_the_option_named():
    with pytest.raises(
        ConfigError, match="--select auc_cvr_do_all: truth metrics exist only on the simulator"
    ):
        check_config(
            BenchmarkConfig(dataset="hillstrom", models=["esmm", "base"], select="auc_cvr_do_all")
        )
    with pytest.raises(
        ConfigError,
        match="--preset, --sim-seeds and simulator knobs apply to --dataset simulated only",
    ):
        check_config(
            BenchmarkConfig(dataset="hillstrom", models=["esmm", "base"], preset="aliccp-like")
        )
    with pytest.raises(ConfigError, match="--fuse-k needs the simulator"):
        check_config(BenchmarkConfig(dataset="hillstrom", models=["esmm", "base"], fuse_k=10))
    with pytest.raises(ConfigError, match="--preset must be one of"):
        check_config(BenchmarkConfig(dataset="simulated", models=["esmm", "base"], preset="nope"))
    with pytest.raises(ConfigError, match="--sharing must be ≤ 1"):
        check_config(
            BenchmarkConfig(dataset="simulated", models=["esmm", "base"], sim={"sharing": 2.0})
        )
    with pytest.raises(ConfigError, match="--reference 'esmm_ns' is not among --models"):
        check_config(BenchmarkConfig(dataset="simulated", models=["esmm"], reference="esmm_ns"))
    check_config(
        BenchmarkConfig(dataset="simulated", models=["esmm", "mmoe"])
    )  # default reference: pairs only when BASE runs


def test_benchmark_cli_truth_metric_on_real_data_is_one_error_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtrank",
            "benchmark",
            "--dataset",
            "hillstrom",
            "--select",
            "auc_cvr_clicked_all",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert (
        r.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("error: --select auc_cvr_clicked_all")
    ), r.stderr


@pytest.fixture(scope="module")
def small_bench():
    cfg = BenchmarkConfig(
        dataset="simulated",
        models=["esmm", "base"],
        repeats=2,
        sim_seeds=1,
        epochs=2,
        batch_size=1024,
        embedding_dim=4,
        tower=[16],
        rows=30_000,
        preset="dense",
        sim={"n_users": 1_500, "n_items": 400, "cvr": 0.2},
        shared_ctr=False,
        fuse_k=5,
        fuse_grid=2,
        threads=1,
    )
    return cfg, run_benchmark(cfg)[0]


def test_benchmark_selects_every_model_by_the_same_rule_and_pairs_runs(small_bench):
    cfg, res = small_bench
    assert res["protocol"]["select"] == "auc_ctcvr"
    assert [(r["sim_seed"], r["seed"]) for r in res["per_repeat"]["esmm"]] == [(0, 0), (0, 1)]
    for name in ("esmm", "base"):
        for r in res["per_repeat"][name]:
            assert (
                0 < r["auc_cvr_do_all"] < 1 and 0 < r["auc_cvr_clicked_all"] < 1
            )  # tiny model: no quality claim
            assert r["exp_gmv_oracle@5"] >= r["exp_gmv_fused@5"] > 0
    d = res["paired"]["esmm"]["auc_ctcvr"]
    diffs = [
        a["auc_ctcvr"] - b["auc_ctcvr"]
        for a, b in zip(res["per_repeat"]["esmm"], res["per_repeat"]["base"], strict=True)
    ]
    assert d["mean"] == pytest.approx(np.mean(diffs)) and d["n"] == 2
    assert res["split"]["conversions_test"] < 1000 and "conversions (< 1,000)" in res["warnings"][0]
    assert res["simulator"][0]["preset"] == "dense" and res["simulator"][0]["cvr"] == 0.2
    # a second process on simulator seed 1 merges into one result over both seeds
    other, _ = run_benchmark(
        cfg.model_copy(update={"first_sim_seed": 1, "repeats": 1}).model_copy(update={"repeats": 2})
    )
    merged = merge_results([other, res])
    assert [r["sim_seed"] for r in merged["per_repeat"]["base"]] == [0, 0, 1, 1]
    assert merged["paired"]["esmm"]["auc_ctcvr"]["n"] == 4 and merged["benchmark"]["sim_seeds"] == 2


def test_a_later_run_of_other_models_merges_paired_with_the_reference(small_bench):
    cfg, res = small_bench
    later, _ = run_benchmark(cfg.model_copy(update={"models": ["dcmt"], "repeats": 1}))
    assert later["paired"] == {}  # no BASE in the later run itself
    old = json.loads(json.dumps(res))
    old["benchmark"].pop("precision")  # a part written before a setting existed: its default
    merged = merge_results([old, later])
    assert merged["benchmark"]["models"] == ["esmm", "base", "dcmt"]
    assert "dcmt" in merged["protocol"]["entire_space_models"]
    d = merged["paired"]["dcmt"]["auc_ctcvr"]
    base0 = res["per_repeat"]["base"][0]
    assert d["n"] == 1 and base0["seed"] == 0
    assert d["mean"] == pytest.approx(
        later["per_repeat"]["dcmt"][0]["auc_ctcvr"] - base0["auc_ctcvr"]
    )
    assert merged["paired"]["esmm"]["auc_ctcvr"] == res["paired"]["esmm"]["auc_ctcvr"]
    other = json.loads(json.dumps(later))
    other["split"]["per_sim_seed"][0]["conversions_test"] += 1
    with pytest.raises(ConfigError, match="split simulator seed 0 differently"):
        merge_results([res, other])
    other = json.loads(json.dumps(later))
    other["benchmark"]["epochs"] = 9
    with pytest.raises(ConfigError, match="every setting but their seeds and models"):
        merge_results([res, other])


def test_sweep_cells_merge_and_draw(tmp_path):
    from mtrank.report.plots import regime_heatmap

    base = BenchmarkConfig(
        dataset="simulated",
        models=["esmm", "base"],
        repeats=1,
        epochs=1,
        batch_size=1024,
        embedding_dim=4,
        tower=[8],
        rows=8_000,
        preset="dense",
        sim={"n_users": 500, "n_items": 200},
        shared_ctr=False,
        threads=1,
    )
    parts = [
        run_sweep(
            SweepConfig(base=base, cvr=[0.2], intent=[0.0, 1.0], sharing=[rho]),
            tmp_path / f"s{rho}.json",
        )
        for rho in (0.0, 0.6)
    ]
    doc = merge_sweeps(parts)
    assert [(c["intent"], c["sharing"]) for c in doc["cells"]] == [
        (0.0, 0.0),
        (0.0, 0.6),
        (1.0, 0.0),
        (1.0, 0.6),
    ]
    flat = doc["cells"][0]["split"]["spearman_cvr_clicked_do"]
    assert flat > 0.999 and doc["cells"][2]["split"]["spearman_cvr_clicked_do"] < flat
    assert (
        json.loads((tmp_path / "s0.0.json").read_text())["cells"][0]["paired"]["esmm"]["auc_ctcvr"][
            "n"
        ]
        == 1
    )
    png = regime_heatmap(doc, "auc_cvr_do_all")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    # the HTML report shows one heatmap per metric of a sweep directory
    from mtrank.io_utils import atomic_write_json
    from mtrank.report.build import write_report

    atomic_write_json(doc, tmp_path / "map" / "sweep.json")
    page = write_report([tmp_path / "map"], tmp_path / "r.html").read_text()
    assert (
        page.count('alt="regime map ') == len(doc["metrics"])
        and "Regime map: where does entire-space learning pay?" in page
    )
    with pytest.raises(ConfigError, match="sweep runs on the simulator"):
        run_sweep(
            SweepConfig(
                base=base.model_copy(
                    update={"dataset": "hillstrom", "sim": {}, "preset": "default"}
                )
            )
        )
