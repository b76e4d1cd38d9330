"""Latency of the HTTP ranking service: p50 / p95 / p99 and requests/s for 10, 200 and 2,000
candidates per request, one uvicorn worker on 127.0.0.1, requests sent one at a time (keep-alive)
with httpx from this process (the server is a separate process).

Usage::

    PYTHONPATH=src python benchmarks/serve_latency.py [--bundle B] [--engines onnx,torch]

Without ``--bundle`` a bundle with the paper's tower (360×200×80, embedding 18) is trained for one
epoch on 20k simulated impressions in a temporary directory. Writes
``benchmarks/results/serve_latency.json`` and prints a table. Bounded: a fixed number of requests
per size, a timeout per request; the server is always stopped.

Each response's ``server-timing`` header gives the server's own time per stage (validate, encode,
infer, fuse); the rest of the client-side latency is HTTP, JSON parsing, request validation of
the body, response serialisation and the client itself — reported as ``other``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10, 200, 2000)
REQUESTS = {10: 400, 200: 300, 2000: 100}
WARMUP = 20
USER = ["user_id", "user_age", "user_gender", "user_power", "hour"]
ITEM = ["item_id", "category", "brand", "shop", "price"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bundle(workdir: Path) -> tuple[Path, Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    data = workdir / "sim.parquet"
    run = [sys.executable, "-m", "mtrank"]
    subprocess.run([*run, "simulate", "--rows", "20000", "--out", str(data)], check=True, env=env, capture_output=True, timeout=300)
    bundle = workdir / "esmm"
    subprocess.run([*run, "train", "--data", str(data), "--schema", "simulated", "--epochs", "1", "--out", str(bundle), "-q"], check=True, env=env, capture_output=True, timeout=600)
    return bundle, data


def start_server(bundle: Path, engine: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtrank", "serve", "--bundle", str(bundle), "--port", str(port), "--engine", engine, "--threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not become healthy within 120 s")


def make_requests(data: pl.DataFrame, n: int, count: int, seed: int) -> list[bytes]:
    """``count`` request bodies of ``n`` candidates: one user's context, random items."""
    rng = np.random.default_rng(seed)
    users = data.select(USER).unique(maintain_order=True)
    items = data.select(ITEM).unique(subset="item_id", maintain_order=True)
    bodies = []
    for k in range(count):
        ctx = users.row(int(rng.integers(users.height)), named=True)
        pick = rng.integers(0, items.height, n)
        bodies.append(json.dumps({"context": ctx, "candidates": items[pick].to_dicts()}).encode())
    return bodies


def measure(ports: dict[str, int], bodies: list[bytes]) -> dict[str, dict]:
    """Send every body to each engine's server in turn (interleaved, so that both engines see
    the same background load), one request at a time; latency stats per engine."""
    lat = {e: [] for e in ports}
    server = {e: [] for e in ports}
    stages: dict[str, dict[str, list[float]]] = {e: {} for e in ports}
    busy = dict.fromkeys(ports, 0.0)
    clients = {e: httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=10, headers={"content-type": "application/json"}) for e, p in ports.items()}
    try:
        for body in bodies[:WARMUP]:
            for c in clients.values():
                c.post("/rank", content=body).raise_for_status()
        for body in bodies[WARMUP:]:
            for e, c in clients.items():
                t = time.perf_counter()
                r = c.post("/rank", content=body)
                dt = time.perf_counter() - t
                r.raise_for_status()
                lat[e].append(dt)
                busy[e] += dt
                total = 0.0
                for part in r.headers.get("server-timing", "").split(","):
                    name, _, dur = part.strip().partition(";dur=")
                    if dur:
                        stages[e].setdefault(name, []).append(float(dur))
                        total += float(dur)
                server[e].append(total)
    finally:
        for c in clients.values():
            c.close()
    out = {}
    for e in ports:
        ms = np.array(lat[e]) * 1e3
        stage_ms = {k: float(np.median(v)) for k, v in stages[e].items()}
        stage_ms["other"] = float(np.median(ms)) - sum(stage_ms.values())
        out[e] = {
            "requests": len(ms),
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            # sequential requests: throughput of one client, = 1 / mean latency
            "requests_per_s": len(ms) / busy[e],
            "median_stage_ms": stage_ms,
            # time inside the scoring function only (server-timing stages summed): free of the
            # HTTP stack and the client, still subject to CPU contention
            "scoring_p50_ms": float(np.percentile(server[e], 50)),
            "scoring_p99_ms": float(np.percentile(server[e], 99)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: train a small one)")
    ap.add_argument("--data", type=Path, help="simulated Parquet to draw users and items from")
    ap.add_argument("--engines", default="onnx,torch")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_latency.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, data = args.bundle, args.data
        if bundle is None:
            print("training a benchmark bundle (20k simulated rows, 1 epoch, tower 360x200x80) …", flush=True)
            bundle, data = build_bundle(Path(tmp))
        if data is None:
            raise SystemExit("--data is required with --bundle (the simulated file the bundle was trained on)")
        frame = pl.read_parquet(data)
        results: dict[str, dict] = {}
        load_before = os.getloadavg()
        engines = args.engines.split(",")
        ports = {e: free_port() for e in engines}
        procs = {}
        try:
            for e in engines:
                procs[e] = start_server(bundle, e, ports[e])
            for n in SIZES:
                bodies = make_requests(frame, n, WARMUP + REQUESTS[n], seed=n)
                for e, r in measure(ports, bodies).items():
                    results.setdefault(e, {})[str(n)] = r
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait(timeout=30)
    report = {
        "benchmark": "serve_latency",
        "setup": "one uvicorn server (1 worker, 127.0.0.1) per engine, engine threads = 1; sequential keep-alive requests with httpx from a separate process, each body sent to every engine in turn (same background load)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "note": "2 CPU cores shared with other jobs while measured: numbers are noisy upper bounds"},
        "goal": "p99 < 10 ms for 200 candidates",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'engine':<7}{'candidates':>11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>8}{'scoring p50/p99':>17}   median server stages (ms)")
    for engine, by_n in results.items():
        for n, r in by_n.items():
            stages = " ".join(f"{k} {v:.2f}" for k, v in r["median_stage_ms"].items())
            scoring = f"{r['scoring_p50_ms']:.2f}/{r['scoring_p99_ms']:.2f}"
            print(f"{engine:<7}{n:>11}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['requests_per_s']:>8.0f}{scoring:>17}   {stages}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
