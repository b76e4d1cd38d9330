"""``mtrank benchmark`` as a user runs it (subprocess): table on stdout, JSON + markdown files."""

import json
import subprocess
import sys


def mtrank(*args):
    return subprocess.run(
        [sys.executable, "-m", "mtrank", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_benchmark_command_on_hillstrom(shared_data, tmp_path):
    out = tmp_path / "bench"
    r = mtrank(
        "benchmark",
        "--dataset",
        "hillstrom",
        "--data-dir",
        shared_data,
        "--models",
        "esmm,mmoe,division",
        "--repeats",
        "1",
        "--epochs",
        "1",
        "--tower",
        "8",
        "--embedding-dim",
        "4",
        "--threads",
        "1",
        "--option",
        "mmoe.n_experts=2",
        "--out",
        out,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert (
        "| esmm | 0." in r.stdout and "| division | 0." in r.stdout and "auc_cvr_masked" in r.stdout
    )
    res = json.loads((out / "benchmark.json").read_text())
    assert res["split"]["rows"] == {"train": 25_600, "val": 6_400, "test": 32_000}
    assert res["benchmark"]["options"] == {"mmoe": {"n_experts": 2}}
    assert len(res["gates"]["mmoe"][0]["gates"]["ctr"]["mean"]) == 2
    assert res["per_repeat"]["division"][0]["ctcvr_source"] == "shared_ctr_x_pcvr"
    assert "mtrank benchmark --dataset hillstrom" in (out / "benchmark.md").read_text()


def test_benchmark_refuses_funnel_models_on_plain_tasks(shared_data, tmp_path):
    r = mtrank(
        "benchmark",
        "--dataset",
        "census",
        "--data-dir",
        shared_data,
        "--models",
        "mmoe,esmm",
        "--out",
        tmp_path,
    )
    assert r.returncode == 2
    assert (
        "error:" in r.stderr and "'esmm' needs a click" in r.stderr and "Traceback" not in r.stderr
    )
    r = mtrank(
        "benchmark",
        "--dataset",
        "census",
        "--models",
        "mmoe",
        "--option",
        "oops",
        "--out",
        tmp_path,
    )
    assert r.returncode == 2 and "model.key=value" in r.stderr
