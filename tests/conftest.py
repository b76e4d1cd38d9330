"""Shared fixtures. The real data is read from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mtrank.data.batch import Batch
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MTRANK_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared test data is missing: {SHARED_DATA} (set MTRANK_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_sim() -> pl.DataFrame:
    """40k simulated impressions, shared by tests that need a learnable funnel."""
    return simulate(SimConfig(rows=40_000, n_users=2_000, n_items=500, cvr=0.2, seed=7))


@pytest.fixture(scope="session")
def sim_splits(small_sim) -> dict[str, pl.DataFrame]:
    """``small_sim`` validated and split by time (train / val / test), shared by training tests."""
    from mtrank.data.datasets import LoadedData
    from mtrank.data.io import validate_frame
    from mtrank.data.split import SplitConfig, split_data

    df, _ = validate_frame(small_sim, SIMULATED_SCHEMA, "sim")
    return split_data(LoadedData(SIMULATED_SCHEMA, {"all": df}, {"all": "sim"}), SplitConfig())


@pytest.fixture()
def sim_schema():
    return SIMULATED_SCHEMA


def make_batch(n: int = 8, n_cat: int = 2, n_num: int = 1, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    click = (torch.rand(n, generator=g) < 0.5).float()
    conv = click * (torch.rand(n, generator=g) < 0.5).float()
    return Batch(
        categorical=torch.randint(0, 5, (n, n_cat), generator=g),
        numerical=torch.randn(n, n_num, generator=g),
        labels={"click": click, "conversion": conv, "ctcvr": click * conv},
    )


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def start_server(*args: str, timeout: float = 120):
    """Start ``mtrank serve <args> --port P`` on 127.0.0.1 and wait until /health answers.
    Returns (process, port); the caller terminates the process."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtrank", "serve", *map(str, args), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)


def cli_in_process(*args):
    """Run an ``mtrank`` command in-process through typer's runner; an mtrank error comes back as
    exit code 2 with its message in ``stderr`` (as ``mtrank.cli.main`` prints it), anything else
    is re-raised."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from mtrank.cli import app
    from mtrank.errors import MtrankError

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        if not isinstance(res.exception, MtrankError):
            raise res.exception
        return SimpleNamespace(returncode=2, stdout=res.stdout, stderr=f"error: {res.exception}")
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr)
