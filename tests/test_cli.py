"""The command line, end to end, as a user runs it (subprocesses)."""

import json
import subprocess
import sys

import polars as pl
import pytest


def mtrank(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mtrank", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "sim.parquet"
    r = mtrank(
        "simulate",
        "--rows",
        30_000,
        "--n-items",
        300,
        "--n-users",
        1000,
        "--cvr",
        0.2,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def bundle(sim_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "esmm"
    r = mtrank(
        "train",
        "--data",
        sim_file,
        "--schema",
        "simulated",
        "--epochs",
        1,
        "--batch-size",
        256,
        "--lr",
        0.01,
        "--tower",
        "32,16",
        "--out",
        out,
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert "auc_cvr_masked" in r.stdout and "bundle written" in r.stdout
    return out


def test_train_predict_evaluate(bundle, sim_file, tmp_path):
    preds = tmp_path / "p.parquet"
    r = mtrank("predict", "--bundle", bundle, "--data", sim_file, "--out", preds)
    assert r.returncode == 0, r.stderr
    df = pl.read_parquet(preds)
    assert df.height == 30_000 and {"p_ctr", "p_cvr", "p_ctcvr", "request_id"} <= set(df.columns)
    assert (df["p_ctcvr"] <= df["p_ctr"]).all()
    metrics = tmp_path / "m.json"
    r = mtrank("evaluate", "--bundle", bundle, "--data", sim_file, "--out", metrics)
    assert r.returncode == 0, r.stderr
    m = json.loads(metrics.read_text())
    assert m["n_impressions"] == 30_000 and 0.5 < m["auc_ctr"] < 1


def test_quickstart_on_hillstrom(shared_data, tmp_path):
    r = mtrank(
        "quickstart",
        "--dataset",
        "hillstrom",
        "--data-dir",
        shared_data,
        "--epochs",
        1,
        "--out",
        tmp_path / "qs",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert set(m["summary"]) == {"esmm", "base"}
    for model in ("esmm", "base"):
        run = m["runs"][model][0]
        assert run["n_impressions"] == 12_800
        assert 0.55 < run["auc_ctr"] < 0.75
    assert (tmp_path / "qs" / "esmm-seed0" / "model.safetensors").exists()


def test_quickstart_simulated_small(tmp_path):
    r = mtrank("quickstart", "--rows", 20_000, "--epochs", 1, "--out", tmp_path / "qs", "-q")
    assert r.returncode == 0, r.stderr
    assert "esmm" in r.stdout and "base" in r.stdout
    assert (tmp_path / "qs" / "data" / "simulated" / "simulated-20000-seed0.parquet").exists()
    assert (
        "report written to" in r.stdout
        and 'src="data:image/png;base64,' in (tmp_path / "qs" / "report.html").read_text()
    )


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["train", "--dataset", "hillstrom", "--data-dir", "/nonexistent"], "none of"),
        (["train", "--dataset", "nope"], "unknown dataset"),
        (["train", "--dataset", "hillstrom", "--model", "nope"], "--model must be one of"),
        (["predict", "--bundle", "/nonexistent", "--data", "x.csv"], "no bundle at"),
    ],
)
def test_errors_are_one_clear_line(args, fragment, tmp_path):
    r = mtrank(*args, "--out" if args[0] == "train" else "--out", tmp_path / "o", cwd=tmp_path)
    assert r.returncode == 2
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_bad_data_file_error_names_file_column_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("click,buy,item\n1,1,a\n0,1,b\n" + "1,0,c\n0,0,d\n" * 10)
    schema = tmp_path / "s.yaml"
    schema.write_text("click: click\nconversion: buy\ncategorical: [item]\n")
    r = mtrank("train", "--data", bad, "--schema", schema, "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "bad.csv" in r.stderr and "'buy'" in r.stderr and "row 2" in r.stderr
    assert "Traceback" not in r.stderr
    r = mtrank(
        "train",
        "--data",
        bad,
        "--schema",
        schema,
        "--out",
        tmp_path / "o",
        "--funnel-violations",
        "drop",
        "--epochs",
        1,
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert "dropped 1 funnel-violating row" in r.stderr


# -- fresh-user findings: export summary, constant-label warnings, evaluate -q -------------------
STAGED_SCHEMA = """name: shop
funnel:
  - {stage: click, label: is_click}
  - {stage: cart, label: is_cart}
  - {stage: buy, label: is_buy, after: click}
categorical: [item]
numerical: [x]
lists:
  - {column: tags, sep: "|", weighted: true, max_len: 3}
sequences:
  - {column: hist, shares: item, sep: "|", max_len: 4}
"""


def staged_csv(path, n=600, buy=True):
    """A three-stage log (click → cart, click → buy) with a weighted list and a sequence."""
    import numpy as np

    rng = np.random.default_rng(0)
    item = rng.integers(0, 6, n)
    click = (rng.random(n) < 0.2 + 0.1 * item).astype(np.int8)
    pl.DataFrame(
        {
            "is_click": click,
            "is_cart": (click * (rng.random(n) < 0.5)).astype(np.int8),
            "is_buy": (click * (rng.random(n) < 0.3)).astype(np.int8) * int(buy),
            "item": item,
            "x": rng.normal(size=n),
            "tags": [f"t{a}:0.5|t{b}:1.0" for a, b in rng.integers(0, 4, (n, 2))],
            "hist": ["|".join(map(str, rng.integers(0, 6, 3))) for _ in range(n)],
        }
    ).write_csv(path)
    return path


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    """A staged-funnel bundle trained by `mtrank train` on a log whose buy label is always 0."""
    from conftest import cli_in_process

    tmp = tmp_path_factory.mktemp("staged")
    (tmp / "s.yaml").write_text(STAGED_SCHEMA)
    data = staged_csv(tmp / "log.csv", buy=False)
    args = ["--data", data, "--schema", tmp / "s.yaml", "--epochs", 1, "--tower", 8]
    r = cli_in_process("train", *args, "--embedding-dim", 4, "--out", tmp / "b", "-q")
    assert r.returncode == 0, r.stderr
    return tmp, r


def test_export_names_every_input_and_output_of_the_graph(staged_run, tmp_path):
    from conftest import cli_in_process

    r = cli_in_process("export", "--bundle", staged_run[0] / "b", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    head, _, checks = r.stdout.strip().partition("; max |onnx - torch| ")
    assert head == (
        f"wrote {tmp_path / 'm.onnx'}; inputs categorical int64 [batch, 1], "
        "numerical float32 [batch, 1], tags int64 [batch, len_0], "
        "tags.weight float32 [batch, len_1], hist int64 [batch, len_2]; "
        "outputs p_click, p_click_all, p_cart, p_cart_all, p_buy, p_buy_all, p_ctr, p_cvr, "
        "p_ctcvr float32 [batch]"
    )
    assert checks.startswith("batch 1: ") and "batch 1000: " in checks


def test_a_constant_stage_is_warned_once_per_split_naming_it(staged_run):
    stderr = staged_run[1].stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {split}: stage 'buy' (column 'is_buy') is 0 on every row ({n} rows): nothing "
        "to learn or rank (auc_buy, auc_buy_all undefined)"
        for split, n in (("val", 60), ("test", 120))
    ]


def test_evaluate_takes_quiet_and_names_the_file_in_its_warnings(staged_run):
    from conftest import cli_in_process

    tmp = staged_run[0]
    args = ["evaluate", "--bundle", tmp / "b", "--data", tmp / "log.csv"]
    loud, quiet = cli_in_process(*args), cli_in_process(*args, "-q")
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    warning = (
        f"warning: {tmp / 'log.csv'}: stage 'buy' (column 'is_buy') is 0 on every row (600 "
        "rows): nothing to learn or rank (auc_buy, auc_buy_all undefined)"
    )
    assert loud.stderr.splitlines() == [
        f"» loading {tmp / 'log.csv'}",
        "» scoring 600 rows with esmm",
        warning,
    ]
    assert quiet.stderr.splitlines() == [warning]
    assert quiet.stdout == loud.stdout and "auc_click" in quiet.stdout
