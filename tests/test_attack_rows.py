"""Issue 15: the twenty attacks that failed, one table row each (the sibling of
``test_bad_input.py`` for the service, the CLI's outputs and the run's files). A row is
(id, action, expectation) as there: the action attacks, the expectation is an exact error class
plus message fragment (:class:`Raises`) or a predicate on what the action returns. Row ids start
with the attack's number in the issue's table.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from mtrank.data.encoders import OOV, CategoricalEncoder
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.errors import BundleError, ConfigError, DataError
from tests.conftest import start_server
from tests.test_bad_input import Case, Raises, check_case

USER = ["user_id", "user_age", "user_gender", "user_power", "hour"]
ITEM = ["item_id", "category", "brand", "shop", "price"]


# --- shared, built once per run --------------------------------------------------------------


@cache
def sim() -> pl.DataFrame:
    return simulate(SimConfig(rows=6_000, n_users=300, n_items=150, cvr=0.2, seed=11))


@cache
def bundle_dir() -> Path:
    import tempfile

    from mtrank.data.datasets import LoadedData
    from mtrank.data.io import validate_frame
    from mtrank.data.split import SplitConfig, split_data
    from mtrank.models.config import ModelConfig
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import fit

    df, _ = validate_frame(sim(), SIMULATED_SCHEMA, "sim")
    splits = split_data(LoadedData(SIMULATED_SCHEMA, {"all": df}, {"all": "sim"}), SplitConfig())
    res = fit(
        splits,
        SIMULATED_SCHEMA,
        ModelConfig(tower=[16, 8], embedding_dim=4),
        TrainConfig(epochs=1, batch_size=512, seed=0),
        quiet=True,
    )
    return res.bundle.save(Path(tempfile.mkdtemp(prefix="mtrank-attack-")) / "esmm")


@cache
def client(max_body_bytes: int = 1 << 20) -> TestClient:
    from mtrank.serve.app import create_app

    return TestClient(create_app(bundle_dir(), threads=0, max_body_bytes=max_body_bytes))


def request_of(n: int = 5, start: int = 0) -> dict:
    rows = sim().slice(start, n)
    return {
        "context": rows.select(USER).row(0, named=True),
        "candidates": rows.select(ITEM).to_dicts(),
    }


def post(body, path: str = "/rank", **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = kw.pop("headers", {"content-type": "application/json"})
    return client(**kw).post(path, content=content, headers=headers)


def status_and_message(r: httpx.Response) -> tuple[int, str, int]:
    body = r.json()
    return r.status_code, body.get("message", ""), body.get("n_errors", -1)


def cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtrank", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )


def one_error_line(r: subprocess.CompletedProcess) -> bool:
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    return (
        r.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("error:")
        and "Traceback" not in r.stderr
    )


# --- 1: long string ids ------------------------------------------------------------------------


def long_id_encoded(tmp: Path):
    enc = CategoricalEncoder.fit(pl.Series("c", ["a", "b", "b"]))
    values = ["a"] * 50 + ["x" * 1_000_000, None]
    tracemalloc.start()
    try:
        idx, _, n_oov = enc.transform(pl.Series("c", values))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the old lookup widened 52 values to 1M characters each (≈ 208 MB of UCS-4)
    return idx[[0, 50, 51]].tolist(), n_oov, peak


def long_id_request(tmp: Path):
    req = request_of(3)
    req["candidates"][1]["shop"] = "s" * 100_000
    return status_and_message(post(req))


# --- 2: other requests answered while one scores ------------------------------------------------


def health_while_scoring(tmp: Path):
    from mtrank.serve.app import create_app

    app = create_app(bundle_dir(), threads=0)
    service = app.state.service
    infer = service._infer

    def slow(cat, num):
        time.sleep(1.5)
        return infer(cat, num)

    service._infer = slow

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            ranking = asyncio.create_task(c.post("/rank", json=request_of(3)))
            await asyncio.sleep(0.2)
            t = time.perf_counter()
            health = await c.get("/health")
            waited = time.perf_counter() - t
            return health.status_code, waited, (await ranking).status_code

    return asyncio.run(run())


# --- 3: several worker processes -----------------------------------------------------------


def workers_serve_concurrently(tmp: Path):
    from concurrent.futures import ThreadPoolExecutor

    proc, port = start_server(
        "--bundle", bundle_dir(), "--workers", "2", "--engine", "torch", timeout=300
    )
    try:
        body = json.dumps(request_of(20))
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c,
            ThreadPoolExecutor(16) as pool,
        ):
            codes = list(
                pool.map(
                    lambda _: (
                        c.post(
                            "/rank", content=body, headers={"content-type": "application/json"}
                        ).status_code
                    ),
                    range(64),
                )
            )
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        return sorted(set(codes)), len(children)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- 4: body size limit ------------------------------------------------------------------------


def oversize_body(chunked: bool):
    def run(tmp: Path):
        big = json.dumps(
            {"candidates": [{"item_id": i} for i in range(20_000)]}
        ).encode()  # ≈ 400 kB
        c = client(max_body_bytes=64 * 1024)
        content = (big[i : i + 8192] for i in range(0, len(big), 8192)) if chunked else big
        r = c.post("/rank", content=content, headers={"content-type": "application/json"})
        return status_and_message(r)

    return run


# --- 5, 16, 17, 20: content type, JSON errors, surrogates, duplicate keys ---------------------


def raw(body: bytes | str, content_type: str = "application/json"):
    return lambda tmp: status_and_message(post(body, headers={"content-type": content_type}))


def with_surrogate_id(tmp: Path):
    req = request_of(2)
    req["candidates"][1]["item_id"] = "\ud800"
    return status_and_message(post(json.dumps(req)))  # ensure_ascii: the body holds "\\ud800"


def with_surrogate_param(tmp: Path):
    req = dict(request_of(2), fusion={"formula": "multiplicative", "params": {"\ud800": 1}})
    return status_and_message(post(json.dumps(req)))


def duplicate_price(tmp: Path):
    text = json.dumps(request_of(2)).replace('"price": ', '"price": -5, "price": ', 1)
    return status_and_message(post(text))


def null_price_takes_context(tmp: Path):
    req = request_of(3)
    want = post(req, "/score").json()["candidates"]
    price = req["candidates"][1]["price"]
    req["context"]["price"] = price
    req["candidates"][1]["price"] = None
    got = post(req, "/score")
    return got.status_code, [c["score"] for c in got.json()["candidates"]] == [
        c["score"] for c in want
    ]


def error_shape_documented(tmp: Path):
    spec = client().app.openapi()
    codes = {}
    for path in ("/rank", "/score"):
        for code in ("400", "413", "415", "422"):
            codes[(path, code)] = spec["paths"][path]["post"]["responses"][code]["content"][
                "application/json"
            ]["schema"]["$ref"]
    return set(codes.values()), spec["components"]["schemas"]["ErrorResponse"]["required"]


# --- 6: torchrun children die with the parent ---------------------------------------------


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_nproc_parent(tmp: Path):
    data = tmp / "s.parquet"
    simulate(SimConfig(rows=60_000, n_users=500, n_items=300, seed=3)).write_parquet(data)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrank",
            "train",
            "--data",
            data,
            "--schema",
            "simulated",
            "--epochs",
            "50",
            "--batch-size",
            "64",
            "--tower",
            "16",
            "--threads",
            "1",
            "--nproc",
            "2",
            "-q",
            "--out",
            tmp / "b",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    kids: set[int] = set()
    while time.monotonic() < deadline and len(kids) < 3:  # torchrun and its two ranks
        kids = descendants(proc.pid)
        time.sleep(0.5)
    assert len(kids) >= 3, f"torchrun did not start its ranks: {kids}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(k) for k in kids):
        time.sleep(0.5)
    left = [k for k in kids if alive(k)]
    for k in left:  # never leave strays behind, whatever the outcome
        os.kill(k, signal.SIGKILL)
    return left, (tmp / "b").exists()


# --- 7, 8: simulate parts -------------------------------------------------------------------


def kill_during_parts(tmp: Path):
    out = tmp / "parts"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrank",
            "simulate",
            "--rows",
            "400000",
            "--part-rows",
            "10000",
            "--n-users",
            "2000",
            "--n-items",
            "500",
            "--out",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    staging: list[Path] = []
    while time.monotonic() < deadline:
        staging = [d for d in tmp.glob(".parts.tmp-*") if len(list(d.glob("part-*.parquet"))) >= 3]
        if staging or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staging, "no staging directory with parts was seen"
    from mtrank.data.stream import expand_paths

    with pytest.raises(DataError, match="incomplete"):
        expand_paths(staging[0])
    return out.exists()


def simulate_twice(overwrite: bool):
    def run(tmp: Path):
        from mtrank.data.simulate import write_simulated

        out = tmp / "parts"
        write_simulated(SimConfig(rows=4000, n_users=100, n_items=50), out, part_rows=1000)
        try:
            write_simulated(
                SimConfig(rows=2000, n_users=100, n_items=50, seed=1),
                out,
                part_rows=1000,
                overwrite=overwrite,
            )
            outcome = "written"
        except ConfigError as exc:
            outcome = str(exc)
        return outcome, pl.scan_parquet(out / "*.parquet").select(pl.len()).collect().item()

    return run


# --- 9: output paths --------------------------------------------------------------------------


def invoke(*args) -> BaseException | None:
    """Run a command in this process (typer's runner): the exception it ends with, if any."""
    from typer.testing import CliRunner

    from mtrank.cli import app

    return CliRunner().invoke(app, [str(a) for a in args]).exception


def bad_outputs(tmp: Path):
    (tmp / "afile").write_text("x")
    data = tmp / "rows.parquet"
    sim().slice(0, 50).write_parquet(data)
    b = bundle_dir()
    started = time.perf_counter()
    refused = {
        "train-under-file": invoke(
            "train",
            "--data",
            data,
            "--schema",
            "simulated",
            "--epochs",
            1,
            "--out",
            tmp / "afile" / "bundle",
            "-q",
        ),
        "predict-dir": invoke("predict", "--bundle", b, "--data", data, "--out", tmp),
        "predict-under-file": invoke(
            "predict", "--bundle", b, "--data", data, "--out", tmp / "afile" / "p.parquet"
        ),
        "evaluate-dir": invoke("evaluate", "--bundle", b, "--data", data, "--out", tmp),
        "export-under-file": invoke("export", "--bundle", b, "--out", tmp / "afile" / "m.onnx"),
        "simulate-dir": invoke("simulate", "--rows", 100, "--out", tmp),
        "simulate-parts-on-file": invoke(
            "simulate", "--rows", 100, "--part-rows", 10, "--out", tmp / "afile"
        ),
    }
    quick = (
        time.perf_counter() - started < 20
    )  # refused before training, loading or simulating anything
    named = {k: type(e).__name__ + ": " + str(e) for k, e in refused.items()}
    os_error = cli("predict", "--bundle", b, "--data", data, "--out", "/proc/mtrank-test.parquet")
    return named, quick, one_error_line(os_error), os_error.stderr


# --- 10: resume fingerprint ------------------------------------------------------------------


def resume_with(change: str):
    def run(tmp: Path):
        from mtrank.data.datasets import LoadedData
        from mtrank.data.io import validate_frame
        from mtrank.data.split import SplitConfig, split_data
        from mtrank.models.config import ModelConfig
        from mtrank.train.trainer import TrainConfig
        from mtrank.workflow import fit

        def splits(seed):
            df, _ = validate_frame(
                simulate(SimConfig(rows=3000, n_users=100, n_items=60, seed=seed)),
                SIMULATED_SCHEMA,
                "s",
            )
            return split_data(
                LoadedData(SIMULATED_SCHEMA, {"all": df}, {"all": "s"}), SplitConfig()
            )

        cfg = TrainConfig(epochs=1, batch_size=256)
        fit(
            splits(0),
            SIMULATED_SCHEMA,
            ModelConfig(tower=[8], embedding_dim=4),
            cfg,
            quiet=True,
            checkpoint=tmp / "ck",
        )
        data = splits(1 if change == "data" else 0)
        model = ModelConfig(tower=[16, 8] if change == "tower" else [8], embedding_dim=4)
        return fit(
            data, SIMULATED_SCHEMA, model, cfg, quiet=True, checkpoint=tmp / "ck", resume=True
        )

    return run


# --- 11, 12: bundle replacement and checksums ---------------------------------------------------


def killed_between_renames(tmp: Path):
    """A child saves over a bundle and is killed (os._exit) at the moment the new directory
    would be renamed into place, with the renameat2 exchange unavailable (the fallback path)."""
    from mtrank.bundle import Bundle

    path = tmp / "b"
    Bundle.load(bundle_dir()).save(path)
    before = Bundle.digest(path)
    code = (
        "import os, sys; import mtrank.io_utils as io; from mtrank.bundle import Bundle\n"
        "io._exchange = lambda a, b: False\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if '.tmp-' in str(src) and str(dst) == sys.argv[2]: os._exit(9)\n"
        "    return real(src, dst)\n"
        "os.replace = replace\n"
        "Bundle.load(sys.argv[1]).save(sys.argv[2], overwrite=True)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(bundle_dir()), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 9, r.stderr
    Bundle.load(path)  # repairs an interrupted replace, or raises "no bundle"
    return Bundle.digest(path) == before


def exchange_replaces_in_one_step(tmp: Path):
    """With the exchange available, os.replace never touches the bundle path: there is no
    moment without a bundle."""
    import mtrank.io_utils as io
    from mtrank.bundle import Bundle

    path = tmp / "b"
    b = Bundle.load(bundle_dir())
    b.save(path)
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(str(dst))
        return real(src, dst)

    io.os.replace = spy
    try:
        b.save(path, overwrite=True)
    finally:
        io.os.replace = real
    return str(path) not in seen and Bundle.load(path) is not None and not list(tmp.glob(".b*"))


def strip_checksums(tmp: Path):
    from mtrank.bundle import Bundle

    path = Bundle.load(bundle_dir()).save(tmp / "b")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["sha256"]
    (path / "config.json").write_text(json.dumps(cfg))
    return Bundle.load(path)


# --- 13: port in use --------------------------------------------------------------------------


def serve_on_busy_port(tmp: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        r = cli("serve", "--bundle", bundle_dir(), "--port", s.getsockname()[1], timeout=120)
    return one_error_line(r), "serving" in r.stdout, "cannot listen" in r.stderr


# --- 14: fuse names file rows ------------------------------------------------------------------


def fuse_bad_prices(tmp: Path):
    df = sim()
    bad = [3, 10, 5990]  # 0-based file positions: 5990 lies in the (time-ordered) test split
    price = df["price"].to_numpy().copy()
    price[bad] = -1.0  # a negative price is invalid (0 is a valid price)
    data = tmp / "rows.parquet"
    df.with_columns(pl.Series("price", price)).write_parquet(data)
    r = cli(
        "fuse",
        "--bundle",
        bundle_dir(),
        "--data",
        data,
        "--out",
        tmp / "fusion.json",
        "--trials",
        2,
    )
    return one_error_line(r), r.stderr


# --- 15: help matches the options ----------------------------------------------------------


def help_mentions_only_real_options(tmp: Path):
    import re

    import typer

    from mtrank.cli import app

    group = typer.main.get_command(app)
    wrong = {}
    for name, cmd in group.commands.items():
        options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        texts = [cmd.help or ""] + [getattr(p, "help", "") or "" for p in cmd.params]
        for text in texts:
            for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
                if (
                    opt not in options
                    and f"mtrank {name}" not in text.split(opt)[0][-60:]
                    and not re.search(r"mtrank \w+ [^.]*$", text.split(opt)[0])
                ):
                    wrong.setdefault(name, set()).add(opt)
    return wrong


# --- 18: the OpenAPI schema says what is accepted ------------------------------------------


def openapi_request(tmp: Path):
    spec = client().app.openapi()
    s = spec["components"]["schemas"]
    feats = s["Features"]["properties"]
    price = feats["price"]["anyOf"][0]
    formulas = {v["title"]: v["properties"]["params"]["anyOf"][0] for v in s["Fusion"]["oneOf"]}
    return (
        set(feats) == set(SIMULATED_SCHEMA.categorical) | {"price"},
        price["type"] == "number" and price["minimum"] == 0,
        formulas["multiplicative"]["properties"]["eps"].get("exclusiveMinimum") == 0,
        formulas["ctcvr"]["properties"] == {}
        and formulas["linear"]["additionalProperties"] is False,
        spec["paths"]["/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "$ref"
        ].endswith("RankRequest"),
    )


def unknown_param_message(tmp: Path):
    return status_and_message(post(dict(request_of(2), fusion={"params": {"x": ""}})))


# --- 19: extreme fusion params --------------------------------------------------------------


def extreme_fusion(formula: str):
    """Every corner of the formula's parameter box, with prices 0 and the largest accepted:
    200, and every candidate whose score is null ranks after every candidate with a score."""
    import itertools

    from mtrank.ranking.fusion import FORMULAS

    def run(tmp: Path):
        cls = FORMULAS[formula]
        bound = client().app.state.service.bounds["price"]
        names = list(cls.limits)
        sides = [
            ((lo if incl else float(np.nextafter(lo, np.inf))), hi)
            for lo, hi, incl in (cls.limits[n] for n in names)
        ]
        corners = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*sides)]
        corners = corners[:: max(1, len(corners) // 16)]
        failures = []
        for params in corners:
            req = request_of(6)
            for i, c in enumerate(req["candidates"]):
                c["price"] = [0.0, bound, 1.0, 0.0, bound, 3.0][i]
            r = post(dict(req, fusion={"formula": formula, "params": params}))
            if r.status_code != 200:
                failures.append((params, r.status_code, r.text[:200]))
                continue
            scores = [c["score"] for c in r.json()["candidates"]]
            first_null = next((i for i, s in enumerate(scores) if s is None), len(scores))
            if any(s is not None for s in scores[first_null:]):
                failures.append((params, scores))
        return failures

    return run


def issue_example_gamma(tmp: Path):
    req = request_of(4)
    for c, p in zip(req["candidates"], (10.0, 0.0, 5.0, 0.0), strict=True):
        c["price"] = p
    r = post(
        dict(req, fusion={"formula": "multiplicative", "params": {"gamma": -100, "eps": 1e-300}})
    )
    cands = r.json()["candidates"]
    return r.status_code, [c["score"] is None for c in cands], [c["index"] for c in cands][:2]


# --- the table -------------------------------------------------------------------------------

ROWS = [
    Case(
        "01-long-id-in-a-file-bounded-memory",
        long_id_encoded,
        lambda r: r[0] == [3, OOV, 0] and r[1] == 1 and r[2] < 30e6,
    ),
    Case(
        "01-long-id-in-a-request-is-422",
        long_id_request,
        lambda r: (
            r[0] == 422 and "body.candidates.1.shop" in r[1] and "at most 1024 characters" in r[1]
        ),
    ),
    Case(
        "02-health-answers-while-a-request-scores",
        health_while_scoring,
        lambda r: r[0] == 200 and r[1] < 0.7 and r[2] == 200,
    ),
    Case(
        "03-two-workers-serve-16-concurrent-clients",
        workers_serve_concurrently,
        lambda r: r[0] == [200] and r[1] >= 2,
    ),
    Case(
        "04-oversize-body-is-413",
        oversize_body(chunked=False),
        lambda r: r[0] == 413 and "limit is 65,536" in r[1] and r[2] == 1,
    ),
    Case(
        "04-oversize-chunked-body-is-413",
        oversize_body(chunked=True),
        lambda r: r[0] == 413 and "limit of 65,536" in r[1],
    ),
    Case(
        "05-text-plain-is-415",
        raw(json.dumps(request_of(2)), "text/plain"),
        lambda r: r[0] == 415 and "content-type application/json" in r[1],
    ),
    Case(
        "05-json-in-latin-1-is-415",
        raw(json.dumps(request_of(2)), "application/json; charset=ISO-8859-1"),
        lambda r: r[0] == 415 and "got charset='iso-8859-1'" in r[1],
    ),
    Case(
        "05-json-with-charset-utf-8-is-200",
        raw(json.dumps(request_of(2)), 'application/json; charset="UTF-8"'),
        lambda r: r[0] == 200,
    ),
    Case(
        "05-bad-json-names-line-and-column",
        raw('{"candidates": [\n  {"item_id": 1,}\n]}'),
        lambda r: r[0] == 400 and "not valid JSON at line 2 column 17" in r[1],
    ),
    Case("06-nproc-children-die-with-the-parent", kill_nproc_parent, lambda r: r == ([], False)),
    Case("07-killed-simulate-leaves-no-data-set", kill_during_parts, lambda r: r is False),
    Case(
        "08-simulate-refuses-a-non-empty-directory",
        simulate_twice(overwrite=False),
        lambda r: "exists and is not empty; pass --overwrite" in r[0] and r[1] == 4000,
    ),
    Case(
        "08-simulate-overwrite-replaces-whole",
        simulate_twice(overwrite=True),
        lambda r: r == ("written", 2000),
    ),
    Case(
        "09-output-paths-checked-first-one-error-line",
        bad_outputs,
        lambda r: (
            all(v.startswith("ConfigError: --out ") for v in r[0].values())
            and r[1]
            and r[2]
            and "/proc/" in r[3]
        ),
    ),
    Case(
        "10-resume-with-other-data",
        resume_with("data"),
        Raises(ConfigError, "made with other data, encoders, model than this run"),
    ),
    Case(
        "10-resume-with-another-tower",
        resume_with("tower"),
        Raises(ConfigError, "made with other model than this run"),
    ),
    Case("11-kill-between-renames-keeps-a-bundle", killed_between_renames, lambda r: r is True),
    Case("11-exchange-never-empties-the-path", exchange_replaces_in_one_step, lambda r: r is True),
    Case(
        "12-bundle-without-checksums-refused",
        strip_checksums,
        Raises(BundleError, "records no sha256 for ['encoders.json', 'model.safetensors']"),
    ),
    Case(
        "13-port-in-use-one-error-line-no-serving",
        serve_on_busy_port,
        lambda r: r == (True, False, True),
    ),
    Case(
        "14-fuse-bad-prices-named-by-file-row",
        fuse_bad_prices,
        lambda r: r[0] and "row 5991]" in r[1],
    ),
    Case("15-help-mentions-only-real-options", help_mentions_only_real_options, lambda r: r == {}),
    Case(
        "16-lone-surrogate-id-is-422",
        with_surrogate_id,
        lambda r: (
            r[0] == 422 and "body.candidates.1.item_id" in r[1] and "lone UTF-16 surrogate" in r[1]
        ),
    ),
    Case(
        "16-lone-surrogate-param-name-is-422",
        with_surrogate_param,
        lambda r: (
            r[0] == 422
            and "body.fusion.params.\\ud800: not a parameter of 'multiplicative'" in r[1]
        ),
    ),
    Case(
        "17-invalid-utf8-is-400-in-the-error-shape",
        raw(b'{"candidates": ["\xff"]}'),
        lambda r: r[0] == 400 and "not valid UTF-8" in r[1] and r[2] == 1,
    ),
    Case(
        "17-deep-nesting-is-400-in-the-error-shape",
        raw("[" * 100_000 + "]" * 100_000),
        lambda r: r[0] == 400 and "nested too deeply" in r[1],
    ),
    Case(
        "17-every-4xx-documented-with-one-shape",
        error_shape_documented,
        lambda r: r == ({"#/components/schemas/ErrorResponse"}, ["message", "n_errors", "detail"]),
    ),
    Case("18-openapi-has-features-price-rule-params", openapi_request, lambda r: all(r)),
    Case(
        "18-unknown-param-named-not-leaked",
        unknown_param_message,
        lambda r: (
            r[0] == 422
            and "body.fusion.params.x: not a parameter of 'ctcvr'" in r[1]
            and "__init__" not in r[1]
        ),
    ),
    Case("19-multiplicative-at-its-bounds", extreme_fusion("multiplicative"), lambda r: r == []),
    Case(
        "19-offset-multiplicative-at-its-bounds",
        extreme_fusion("offset_multiplicative"),
        lambda r: r == [],
    ),
    Case("19-linear-at-its-bounds", extreme_fusion("linear"), lambda r: r == []),
    Case(
        "19-gamma-minus-100-eps-1e-300-null-ranks-last",
        issue_example_gamma,
        lambda r: r[0] == 200 and r[1] == [False, False, True, True],
    ),
    Case(
        "20-duplicate-key-is-422",
        duplicate_price,
        lambda r: r[0] == 422 and "duplicate key 'price'" in r[1],
    ),
    Case(
        "20-null-price-takes-the-context-price",
        null_price_takes_context,
        lambda r: r == (200, True),
    ),
]


@pytest.mark.parametrize("case", ROWS, ids=[c.id for c in ROWS])
def test_attack(case: Case, tmp_path: Path):
    check_case(case, tmp_path)
