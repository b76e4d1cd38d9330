"""The HTML experiment report (``mtrank report``, and the one ``mtrank quickstart`` writes)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtrank.report.build import (
    best_rows,
    comparison_table,
    funnel_rates,
    reliability_bins,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
IMG = '<img alt="'
PNG = 'src="data:image/png;base64,'


def mtrank(*args):
    return subprocess.run(
        [sys.executable, "-m", "mtrank", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    """A quickstart-shaped run dir (bundles, metrics.json, simulated data) with tiny towers, and
    its report.

    ``tests/test_cli.py::test_quickstart_simulated_small`` checks that quickstart itself writes
    the report; this builds the same layout in-process, small enough to be fast.
    """
    from mtrank.data.simulate import SimConfig
    from mtrank.data.split import SplitConfig, split_data
    from mtrank.models.config import ModelConfig
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import fit, load_data

    out = tmp_path_factory.mktemp("report") / "qs"
    loaded = load_data(
        "simulated", data_dir=out / "data", sim=SimConfig(rows=20_000, n_users=2_000, n_items=500)
    )
    split_cfg = SplitConfig(seed=0)
    splits = split_data(loaded, split_cfg)
    runs = {}
    for m in ("esmm", "base"):
        meta = {
            "dataset": "simulated",
            "sources": loaded.sources,
            "split": split_cfg.model_dump(),
            "command": f"mtrank quickstart --models {m}",
        }
        res = fit(
            splits,
            loaded.schema,
            ModelConfig(name=m, embedding_dim=4, tower=[16]),
            TrainConfig(epochs=2, batch_size=1024, lr=0.01, seed=0, patience=2, threads=1),
            quiet=True,
            meta=meta,
        )
        res.bundle.save(out / f"{m}-seed0")
        runs[m] = [dict(res.metrics["test"], best_epoch=res.result.best_epoch)]
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "simulated",
                "sources": loaded.sources,
                "seeds": 1,
                "epochs": 2,
                "runs": runs,
            }
        )
    )
    write_report([out], out / "report.html")
    return out


def test_quickstart_writes_a_self_contained_report(quickstart_run):
    page = (quickstart_run / "report.html").read_text()
    metrics = json.loads((quickstart_run / "metrics.json").read_text())
    assert not re.search(r"https?://", page), "the page must not load anything from the network"
    assert "<script" not in page
    for section in ("Model comparison", "Training curves", "Calibration", "Entire-space pCVR bias"):
        assert section in page
    assert page.count(PNG) >= 3  # curves, reliability, bias
    assert page.count(IMG) == page.count(PNG)  # every image is embedded
    # the comparison table holds each model with its test values
    for model in ("esmm", "base"):
        run = metrics["runs"][model][0]
        row = re.search(rf"<tr><td>{model}</td>(.*?)</tr>", page, re.DOTALL).group(1)
        assert f"{run['auc_ctr']:.4f}" in row and f"{run['logloss_ctcvr']:.4f}" in row
    assert 'class="best"' in page
    # run metadata: funnel rates from the test counts, split and command
    esmm = metrics["runs"]["esmm"][0]
    assert f"{100 * esmm['n_clicks'] / esmm['n_impressions']:.2f}%" in page
    assert "test_fraction=0.2" in page and "quickstart" in page and "torch" in page
    assert "calibration skipped" not in page


def test_report_command_with_benchmark_quadrants_and_fusion(quickstart_run, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    shutil.copy(
        REPO / "benchmarks" / "results" / "simulated" / "benchmark.json", bench / "benchmark.json"
    )
    quad = tmp_path / "quad"
    quad.mkdir()
    (quad / "quadrants.json").write_text(
        json.dumps(
            {
                "entity": ["item_id"],
                "entities": 2,
                "thresholds": {"ctr": 0.04, "cvr": 0.1},
                "quadrants": [
                    {
                        "quadrant": "I",
                        "description": "high CTR / high CVR",
                        "entities": 1,
                        "ctr": 0.12,
                    },
                    {
                        "quadrant": "II",
                        "description": "low CTR / high CVR (under-valued)",
                        "entities": 1,
                        "ctr": 0.02,
                    },
                ],
            }
        )
    )
    (quad / "fusion.json").write_text(
        json.dumps(
            {
                "format": "mtrank.fusion/1",
                "formula": "multiplicative",
                "params": {"alpha": 1.25},
                "objective": "gmv@10",
            }
        )
    )
    (quad / "replay.json").write_text(
        json.dumps(
            {"heldout": {"pctr": {"gmv@10": 1.5}}, "lift": {"lines": ["gmv@10: fused +3.0%"]}}
        )
    )
    out = tmp_path / "r.html"
    r = mtrank("report", quickstart_run, bench, quad, "-o", out, "--no-calibration")
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert "Gates of MMoE / PLE" in page and "esmm_mmoe" in page and "ple" in page
    repeats = json.loads((bench / "benchmark.json").read_text())["benchmark"]["repeats"]
    assert f"benchmark on simulated, {repeats} repeat(s)" in page
    assert "Four-quadrant analysis" in page and "under-valued" in page
    assert "multiplicative" in page and "alpha=1.25" in page and "gmv@10: fused +3.0%" in page
    assert 'id="calibration"' not in page


def test_calibration_comes_from_what_the_run_saved(quickstart_run, tmp_path):
    # The report reads the bins each bundle recorded at training time: with the data gone (the
    # run moved, its sources renamed) the section is still drawn, and no data is loaded.
    run = tmp_path / "moved"
    shutil.copytree(quickstart_run, run, ignore=shutil.ignore_patterns("data", "report.html"))
    for cfg_path in run.glob("*-seed0/config.json"):
        cfg = json.loads(cfg_path.read_text())
        cfg["meta"]["sources"] = {"all": str(tmp_path / "gone.parquet")}
        cfg["meta"]["dataset"] = "mine"
        cfg_path.write_text(json.dumps(cfg))
    page = write_report([run], tmp_path / "r.html").read_text()
    assert (
        "calibration skipped" not in page
        and 'id="calibration"' in page
        and "Model comparison" in page
    )
    saved = json.loads((run / "esmm-seed0" / "config.json").read_text())["meta"]["calibration"]
    assert (
        saved["split"] == "test"
        and saved["bins"] == 10
        and set(saved["tasks"]) == {"ctr", "cvr (clicked)", "ctcvr"}
    )
    ctr = saved["tasks"]["ctr"]
    assert (
        sum(ctr["n"])
        == json.loads((run / "metrics.json").read_text())["runs"]["esmm"][0]["n_impressions"]
    )
    assert ctr["pred"] == sorted(ctr["pred"])  # equal-count bins of the predicted pCTR, ascending
    # a bundle without the record (an older mtrank) gets a note; the rest of the page stays
    for cfg_path in run.glob("*-seed0/config.json"):
        cfg = json.loads(cfg_path.read_text())
        del cfg["meta"]["calibration"]
        cfg_path.write_text(json.dumps(cfg))
    page = write_report([run], tmp_path / "r2.html").read_text()
    assert (
        "calibration skipped" in page
        and "no calibration record" in page
        and "Model comparison" in page
    )


def test_report_of_a_non_run_directory_is_one_error_line(tmp_path):
    r = mtrank("report", tmp_path, "-o", tmp_path / "r.html")
    assert r.returncode == 2 and "error:" in r.stderr and "holds no metrics.json" in r.stderr


def test_best_per_column_follows_the_metric_direction():
    assert best_rows({"a": 0.7, "b": 0.8}, "auc_ctr") == {"b"}
    assert best_rows({"a": 0.3, "b": 0.2}, "logloss_ctr") == {"b"}
    assert best_rows({"a": 1.3, "b": 0.9}, "calib_ctcvr") == {"b"}
    assert best_rows({"a": -0.01, "b": 0.05}, "bias_cvr_do_all") == {"a"}
    assert best_rows({"a": 1.0, "b": 2.0}, "best_epoch") == set()
    t = comparison_table(
        "t",
        {
            "a": {"auc_ctr": {"mean": 0.7, "std": 0.01, "n": 2}},
            "b": {"auc_ctr": {"mean": 0.8, "std": 0.02, "n": 2}},
        },
    )
    assert [c["text"] for r in t["rows"] for c in r["cells"]] == [
        "0.7000 ± 0.0100",
        "0.8000 ± 0.0200",
    ]
    assert [c["best"] for r in t["rows"] for c in r["cells"]] == [False, True]


def test_reliability_bins_and_funnel_rates():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, 10_000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    bins = reliability_bins(y, p, bins=10)
    assert sum(bins["n"]) == 10_000 and bins["pred"] == sorted(bins["pred"])
    assert np.allclose(bins["pred"], bins["obs"], atol=0.02)  # calibrated by construction
    rates = funnel_rates({"n_impressions": 1000, "n_clicks": 40, "n_conversions": 4})
    assert rates["ctr"] == 0.04 and rates["cvr"] == 0.1 and rates["ctcvr"] == 0.004


def test_tensorboard_history_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtrank.report.tensorboard import write_history

    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 0.9 / e,
            "val_metrics": {"auc_ctr": 0.6 + e / 100, "n_clicks": 40},
            "seconds": 1.0,
            "samples_per_second": 1000.0,
        }
        for e in (1, 2, 3)
    ]
    path = write_history(history, tmp_path / "tb", run="esmm")
    acc = EventAccumulator(str(path))
    acc.Reload()
    assert {"train/loss", "val/loss", "val/auc_ctr", "speed/samples_per_second"} <= set(
        acc.Tags()["scalars"]
    )
    assert [(s.step, round(s.value, 4)) for s in acc.Scalars("val/auc_ctr")] == [
        (1, 0.61),
        (2, 0.62),
        (3, 0.63),
    ]


def test_comparison_table_on_plain_multitask_metrics():
    t = comparison_table(
        "census",
        {
            "mmoe": {
                "auc_income": {"mean": 0.94, "n": 1},
                "logloss_income": {"mean": 0.2, "n": 1},
                "best_epoch": {"mean": 2, "n": 1},
            },
            "ple": {
                "auc_income": {"mean": 0.95, "n": 1},
                "logloss_income": {"mean": 0.19, "n": 1},
                "best_epoch": {"mean": 3, "n": 1},
            },
        },
        note="CTCVR protocol",
    )
    assert [c["name"] for c in t["columns"]] == ["auc_income", "logloss_income"]
    assert [r["name"] for r in t["rows"] if all(c["best"] for c in r["cells"])] == ["ple"]
    assert t["note"] == ""  # the funnel-only note is dropped
