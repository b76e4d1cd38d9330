"""CPU time per stage of a ``/rank`` request (200 candidates): a measure that holds on a busy,
shared machine, where wall-clock latency does not.

Three views, all CPU time (``time.thread_time`` / ``time.process_time`` / the server's
``/proc/<pid>/stat`` ticks), medians over the requests:

* ``stages``: the service's own steps called one by one in this process (one thread): decode
  the JSON body, top-level parse, validate features (the columnar frame), encode, infer (ONNX,
  one thread), fuse + rank, serialise the response;
* ``asgi``: the whole app driven in-process through ASGI (FastAPI/Starlette routing, body
  read, the worker-thread hop, the response) — process CPU per request; minus the stages'
  sum, that is the framework's share;
* ``server``: a real ``mtrank serve`` (1 worker, 127.0.0.1) sent the requests one at a time
  over keep-alive by ``serve_latency``'s raw-socket client; the server process's CPU per
  request (its utime + stime; HTTP parsing by uvicorn included) and the client's (entries
  labelled ``before``, ``after`` and ``final`` measured ``http.client``: 0.41-0.47 ms).

On a quiet 2-core machine the sequential latency is about server CPU + client CPU per request
(one waits for the other) plus loopback; the inference-only limit is 1 / the infer stage.

Usage::

    PYTHONPATH=src python benchmarks/serve_profile.py [--bundle B --data D] [--label before]

Without ``--bundle`` the same bundle as ``serve_latency.py`` is trained (20k simulated rows, one
epoch). Writes ``benchmarks/results/serve_profile.json`` (one entry per ``--label``, earlier
labels kept) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import (  # noqa: E402
    ROOT,
    Client,
    build_bundle,
    free_port,
    make_requests,
    start_server,
)

CANDIDATES = 200


def stage_cpu(bundle: Path, bodies: list[bytes]) -> dict[str, float]:
    """Median thread CPU (ms) of each step of :func:`mtrank.serve.app.answer`, called directly."""
    from mtrank.serve.app import _respond
    from mtrank.serve.body import decode_json
    from mtrank.serve.service import RankingService

    service = RankingService(bundle, engine="onnx", threads=1)
    header = {"model": "m", "bundle_sha256": service.digest, "score_source": "fusion"}
    clock = time.thread_time
    rows: dict[str, list[float]] = {}
    for k, body in enumerate(bodies):
        t = [clock()]
        doc = decode_json(body)
        t.append(clock())
        req = service.parse(doc, ranked=True)
        t.append(clock())
        cols = service.columns(req.context, req.candidates)  # the fast path (None: exact)
        t.append(clock())
        data = service.bundle.encoder.transform_columns(cols, len(req.candidates))
        t.append(clock())
        raw = service._infer(data.categorical, data.numerical)
        t.append(clock())
        scored = service.fuse(raw, cols[service.price], data, service.fusion)
        order = scored.order()
        t.append(clock())
        _respond(header, scored, order, ranked=True)
        t.append(clock())
        if k < 20:  # warm-up
            continue
        names = ("decode", "parse", "validate", "encode", "infer", "fuse_rank", "respond")
        for name, a, b in zip(names, t, t[1:], strict=False):
            rows.setdefault(name, []).append((b - a) * 1e3)
    out = {k: float(np.median(v)) for k, v in rows.items()}
    out["total"] = sum(out.values())
    return out


def asgi_cpu(bundle: Path, bodies: list[bytes]) -> float:
    """Median process CPU (ms) per request of the whole app driven through ASGI in-process."""
    from mtrank.serve.app import create_app

    app = create_app(bundle, engine="onnx", threads=1)

    async def one(body: bytes) -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/rank",
            "raw_path": b"/rank",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        sent = False
        status = [0]

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]

        await app(scope, receive, send)
        return status[0]

    async def run() -> list[float]:
        async with _lifespan(app):
            times = []
            for k, body in enumerate(bodies):
                t = time.process_time()
                assert await one(body) == 200
                if k >= 20:
                    times.append((time.process_time() - t) * 1e3)
            return times

    return float(np.median(asyncio.run(run())))


class _lifespan:
    """Run the app's lifespan start-up (the thread-pool bound) around the requests."""

    def __init__(self, app) -> None:
        self.app = app

    async def __aenter__(self):
        self.cm = self.app.router.lifespan_context(self.app)
        await self.cm.__aenter__()

    async def __aexit__(self, *exc):
        await self.cm.__aexit__(*exc)


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and its children that are alive (clock ticks)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            fields = (Path("/proc") / str(p) / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        text = (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def server_cpu(bundle: Path, bodies: list[bytes]) -> dict[str, float]:
    """Server and client CPU (ms) per request, sequential keep-alive requests to ``mtrank
    serve`` (1 worker) with the raw-socket :class:`serve_latency.Client`; and the wall time per
    request (under load: an upper bound)."""
    port = free_port()
    proc = start_server(bundle, "onnx", port)
    try:
        conn = Client(port, timeout=30)

        def post(body: bytes) -> None:
            conn.post("/rank", body).raise_for_status()

        for body in bodies[:20]:
            post(body)
        hz = os.sysconf("SC_CLK_TCK")
        s0, c0, w0 = _cpu_ticks(proc.pid), time.process_time(), time.perf_counter()
        n = 0
        for _ in range(3):  # enough requests for the 10 ms tick to be a small error
            for body in bodies[20:]:
                post(body)
                n += 1
        s1, c1, w1 = _cpu_ticks(proc.pid), time.process_time(), time.perf_counter()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "requests": n,
        "server_cpu_ms_per_request": (s1 - s0) / hz / n * 1e3,
        "client_cpu_ms_per_request": (c1 - c0) / n * 1e3,
        "wall_ms_per_request_under_load": (w1 - w0) / n * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--label", default="current")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_profile.json"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, data = args.bundle, args.data
        if bundle is None:
            print("training a benchmark bundle (20k simulated rows, 1 epoch) …", flush=True)
            bundle, data = build_bundle(Path(tmp))
        bodies = make_requests(pl.read_parquet(data), CANDIDATES, 20 + args.requests, seed=200)
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "uptime_before": uptime,
            "candidates": CANDIDATES,
            "stages_thread_cpu_ms": stage_cpu(bundle, bodies),
            "asgi_process_cpu_ms": asgi_cpu(bundle, bodies),
            "server": server_cpu(bundle, bodies),
        }
    stages = result["stages_thread_cpu_ms"]
    result["framework_cpu_ms"] = result["asgi_process_cpu_ms"] - stages["total"]
    srv = result["server"]
    # sequential, quiet machine: the client waits for the server and vice versa
    est = srv["server_cpu_ms_per_request"] + srv["client_cpu_ms_per_request"]
    result["estimate_quiet"] = {
        "sequential_ms_per_request": est,
        "inference_limit_req_s": 1e3 / stages["infer"],
        "fraction_of_inference_limit": (1e3 / est) / (1e3 / stages["infer"]),
    }
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    print(f"\nwrote {args.out}")


def print_table(doc: dict) -> None:
    """One column per label: the CPU ms of each stage."""
    labels = list(doc)
    names = list(doc[labels[-1]]["stages_thread_cpu_ms"])
    print(f"\n{'CPU ms per request (200 candidates)':<40}" + "".join(f"{x:>12}" for x in labels))
    for n in names:
        vals = [doc[x]["stages_thread_cpu_ms"].get(n, float("nan")) for x in labels]
        print(f"  {n:<38}" + "".join(f"{v:>12.3f}" for v in vals))
    rows = [
        ("ASGI app in-process (all)", lambda r: r["asgi_process_cpu_ms"]),
        ("  of which framework", lambda r: r["framework_cpu_ms"]),
        ("server process (HTTP incl.)", lambda r: r["server"]["server_cpu_ms_per_request"]),
        ("client", lambda r: r["server"]["client_cpu_ms_per_request"]),
        ("est. quiet sequential ms", lambda r: r["estimate_quiet"]["sequential_ms_per_request"]),
        ("est. x inference limit", lambda r: r["estimate_quiet"]["fraction_of_inference_limit"]),
        ("wall ms/request (under load)", lambda r: r["server"]["wall_ms_per_request_under_load"]),
    ]
    for name, get in rows:
        print(f"{name:<40}" + "".join(f"{get(doc[x]):>12.3f}" for x in labels))


if __name__ == "__main__":
    main()
