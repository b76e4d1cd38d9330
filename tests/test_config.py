"""The run config (mtrank.yaml): the config route reproduces the flag route, errors are one line
naming the file and the key, the shipped configs load, the bundle keeps the resolved config."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import cli_in_process

from mtrank.bundle import Bundle
from mtrank.config import RunConfig, config_template, dataset_config, load_config, parse_config
from mtrank.data.datasets import DATASETS
from mtrank.errors import ConfigError
from mtrank.train.progress import EpochProgress

REPO = Path(__file__).resolve().parents[1]


mtrank = cli_in_process


def test_config_route_reproduces_flag_route(shared_data, tmp_path):
    small = ["--epochs", 1, "--tower", "16", "--embedding-dim", 4, "--threads", 1, "-q"]
    by_flags = mtrank(
        "train",
        "--dataset",
        "hillstrom",
        "--data-dir",
        shared_data,
        "--batch-size",
        256,
        *small,
        "--out",
        tmp_path / "flags",
    )
    assert by_flags.returncode == 0, by_flags.stderr
    by_config = mtrank(
        "train",
        "--config",
        REPO / "configs" / "hillstrom.yaml",
        "--data-dir",
        shared_data,
        *small,
        "--out",
        tmp_path / "config",
    )
    assert by_config.returncode == 0, by_config.stderr
    a, b = Bundle.load(tmp_path / "flags").meta, Bundle.load(tmp_path / "config").meta
    assert a["metrics"] == b["metrics"] and 0.55 < b["metrics"]["test"]["auc_ctr"] < 0.75
    assert a["split"] == b["split"] and a["train"] == b["train"]
    # the bundle keeps the resolved config: the file's keys with the flags written over them
    resolved = parse_config(b["config"], "bundle")
    assert resolved.data.dataset == "hillstrom" and resolved.data.data_dir == str(shared_data)
    assert (
        resolved.training.batch_size == 256
        and resolved.model.tower == [16]
        and resolved.export.out == str(tmp_path / "config")
    )
    assert a["config"] == b["config"] | {"export": a["config"]["export"]}


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "training:\n  epochs: 0\n",
            "training.epochs: Input should be greater than or equal to 1 (got 0)",
        ),
        ("training:\n  epoch: 3\n", "training.epoch: unknown key"),
        (
            "model:\n  name: mmoe\n  options: {n_expert: 8}\n",
            "model.options.n_expert: unknown option of 'mmoe'",
        ),
        (
            "model:\n  name: esmm\n  options: {shared_embedding: maybe}\n",
            "model.options.shared_embedding: Input should be a valid boolean",
        ),
        ("data:\n  dataset: nope\n", "data.dataset: unknown dataset 'nope'"),
        ("serve:\n  port: 0\n", "serve.port: Input should be greater than or equal to 1"),
        ("training: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"config {path}: ")
    assert expected in msg and "\n" not in msg


def test_bad_config_on_the_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  name: mmoe\n  options: {n_expert: 8}\n")
    r = subprocess.run(
        [sys.executable, "-m", "mtrank", "train", "--config", "run.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: config run.yaml: model.options.n_expert: unknown option of 'mmoe' (its options: "
        "['expert_hidden', 'n_experts', 'tower_hidden'])"
    ]
    r = mtrank("train", "--config", tmp_path / "run.yaml", "--model", "mmoe", "--epochs", 0)
    assert r.returncode == 2  # the file's error comes first


def test_flag_error_names_the_flag_and_key():
    r = mtrank("train", "--dataset", "hillstrom", "--epochs", 0)
    assert (
        r.returncode == 2
        and "--epochs (training.epochs): Input should be greater than or equal to 1" in r.stderr
    )


def test_template_round_trip_and_shipped_configs(tmp_path):
    for name in DATASETS:
        shipped = load_config(REPO / "configs" / f"{name}.yaml")
        assert shipped == dataset_config(name), (
            f"configs/{name}.yaml is stale: rewrite it with mtrank config init"
        )
        assert parse_config(yaml.safe_load(config_template(shipped)), "t") == shipped
    assert (
        dataset_config("hillstrom").training.batch_size == 256
        and dataset_config("census").model.name == "mmoe"
    )
    small = load_config(REPO / "configs" / "simulated-small.yaml")
    assert (
        small.data.simulator.rows == 200_000
        and small.training.epochs == 2
        and small.model == RunConfig().model
    )
    r = mtrank("config", "init", "--dataset", "aliccp", "--out", tmp_path / "a.yaml")
    assert r.returncode == 0 and load_config(tmp_path / "a.yaml") == dataset_config("aliccp")
    assert "# Where the rows come from" in (tmp_path / "a.yaml").read_text()
    assert (
        mtrank("config", "init", "--out", tmp_path / "a.yaml").returncode == 2
    )  # never overwritten silently


def test_override_keys():
    cfg = RunConfig().override(
        {"training.epochs": 7, "model.options": {"n_experts": 2}, "model.name": "mmoe"}
    )
    assert cfg.training.epochs == 7 and cfg.model.options == {"n_experts": 2}
    with pytest.raises(ConfigError, match="command line: traning.epochs: unknown key"):
        RunConfig().override({"traning.epochs": 7})


def test_progress_lines_without_a_terminal():
    stream = io.StringIO()  # not a tty: plain lines
    bar = EpochProgress("epoch 1/2", 4, batch_size=100, interval=0.0, stream=stream)
    for i in range(4):
        bar.update(loss=1.0 / (i + 1))
    bar.close()
    bar.report("val loss 0.5000")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5
    assert (
        lines[0].startswith("epoch 1/2: 1/4 batches, ")
        and "rows/s, ETA " in lines[0]
        and lines[0].endswith("loss 1.0000")
    )
    assert lines[-1].startswith("epoch 1/2: 4 batches in ") and lines[-1].endswith(
        "; val loss 0.5000"
    )
    quiet = io.StringIO()
    q = EpochProgress("epoch 1/1", 2, interval=0.0, quiet=True, stream=quiet)
    q.update(1.0)
    q.close()
    q.report("x")
    assert quiet.getvalue() == ""


def test_quickstart_piped_to_a_file_prints_every_epoch(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "mtrank",
                "quickstart",
                "--config",
                REPO / "configs" / "simulated-small.yaml",
                "--rows",
                "3000",
                "--models",
                "esmm",
                "--out",
                tmp_path / "qs",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert r.returncode == 0, text
    for epoch in (1, 2):  # simulated-small.yaml: 2 epochs
        assert any(
            line.startswith(f"epoch {epoch}/2: ") and "rows/s" in line for line in text.splitlines()
        ), text
    assert "» loading simulated" in text and "» seed 0: training esmm" in text
    meta = json.loads((tmp_path / "qs" / "esmm-seed0" / "config.json").read_text())["meta"]
    assert meta["config"]["data"]["simulator"]["rows"] == 3000 and meta["train"]["epochs"] == 2


def test_tensorboard_is_written_while_training(small_sim, sim_schema, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtrank.data.io import validate_frame
    from mtrank.data.split import SplitConfig, split_data
    from mtrank.models.config import ModelConfig
    from mtrank.report.tensorboard import EpochWriter
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import LoadedData, fit

    seen = []
    writer = EpochWriter(tmp_path / "tb")

    def on_epoch(log):
        writer.write(log)
        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        seen.append([e.step for e in acc.Scalars("train/loss")])

    df, _ = validate_frame(small_sim.head(4000), sim_schema, "sim")
    splits = split_data(LoadedData(sim_schema, {"all": df}, {"all": "sim"}), SplitConfig())
    fit(
        splits,
        sim_schema,
        ModelConfig(tower=[8], embedding_dim=4),
        TrainConfig(epochs=2, patience=5, batch_size=512),
        quiet=True,
        on_epoch=on_epoch,
    )
    writer.close()
    assert seen == [[1], [1, 2]]  # epoch 1 was on disk before epoch 2 trained


def test_serve_workers_and_body_limit_live_in_the_run_config(tmp_path):
    from mtrank.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("serve: {workers: 2, max_body_bytes: 4096}\n")
    cfg = load_config(path)
    assert (cfg.serve.workers, cfg.serve.max_body_bytes) == (2, 4096)
    path.write_text("serve: {max_body_bytes: 10}\n")
    with pytest.raises(ConfigError, match=r"serve\.max_body_bytes"):
        load_config(path)
