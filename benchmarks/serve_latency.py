"""Latency of the HTTP ranking service, three modes, localhost only (127.0.0.1):

* ``sequential``: p50 / p95 / p99 and requests/s for 10, 200 and 2,000 candidates per request,
  one uvicorn worker, requests sent one at a time (keep-alive) with ``http.client`` from this
  process (the
  server is a separate process); requests/s is also given as a fraction of the
  **inference-only limit** (1 / the median time of the ONNX session alone on the same 200
  encoded candidates, one thread, measured in this process).
* ``concurrent``: 16 client threads, each with its own keep-alive connection, send /rank with
  200 candidates to a server with ``--workers`` (default 2) until 10,000 requests are done or
  240 s have passed; p50 / p99, requests/s, the count of 5xx, and the servers' RSS (all worker
  processes) after the warm-up and at the end.
* ``memory``: adversarial bodies of at most 1 MB (one 1 MB string id, 2,000 candidates of
  500-character ids, 100,000-deep arrays, 300,000 empty objects, 1 MB of invalid UTF-8) sent 20
  times each; the servers' RSS growth.

Usage::

    PYTHONPATH=src python benchmarks/serve_latency.py [--bundle B --data D] \
        [--engines onnx,torch] [--modes sequential,concurrent,memory]

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
import http.client
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


class Reply:
    """Status, headers and body of one response."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.content[:200]!r}")


class Client:
    """A keep-alive HTTP/1.1 client on the standard library's ``http.client``: about half the
    CPU per request of httpx, so that less of the measured latency is the client's own (on
    2 cores the client competes with the server)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.headers = {"content-type": "application/json"}

    def post(self, path: str, body: bytes) -> Reply:
        try:
            self.conn.request("POST", path, body=body, headers=self.headers)
            r = self.conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnects on the next request
            raise OSError("connection failed") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_bundle(workdir: Path) -> tuple[Path, Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    data = workdir / "sim.parquet"
    run = [sys.executable, "-m", "mtrank"]
    subprocess.run(
        [*run, "simulate", "--rows", "20000", "--out", str(data)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    bundle = workdir / "esmm"
    subprocess.run(
        [
            *run,
            "train",
            "--data",
            str(data),
            "--schema",
            "simulated",
            "--epochs",
            "1",
            "--out",
            str(bundle),
            "-q",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    return bundle, data


def start_server(bundle: Path, engine: str, port: int, workers: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrank",
            "serve",
            "--bundle",
            str(bundle),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--engine",
            engine,
            "--threads",
            "1",
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not become healthy within 300 s")


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
    clients = {e: Client(p, timeout=10) for e, p in ports.items()}
    try:
        for body in bodies[:WARMUP]:
            for c in clients.values():
                c.post("/rank", body).raise_for_status()
        for body in bodies[WARMUP:]:
            for e, c in clients.items():
                t = time.perf_counter()
                r = c.post("/rank", body)
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


def inference_limit(bundle: Path, bodies: list[bytes], repeat: int = 300) -> dict:
    """req/s if only the ONNX session ran: the median time of the engine alone (one thread) on
    the encoded candidates of the given bodies, measured in this process."""
    from mtrank.serve.service import RankingService

    service = RankingService(bundle, engine="onnx", threads=1)
    encoded = []
    for body in bodies[:20]:
        doc = json.loads(body)
        enc = service.bundle.encoder.transform(service.frame(doc["context"], doc["candidates"]))
        encoded.append((enc.categorical, enc.numerical))
    times = []
    for k in range(repeat):
        cat, num = encoded[k % len(encoded)]
        t = time.perf_counter()
        service._infer(cat, num)
        times.append(time.perf_counter() - t)
    ms = float(np.median(times) * 1e3)
    return {
        "infer_median_ms": ms,
        "infer_p99_ms": float(np.percentile(times, 99) * 1e3),
        "limit_requests_per_s": 1e3 / ms,
    }


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server and all its descendants (MB)."""
    pids, frontier = {pid}, {pid}
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - pids
        pids |= frontier
    total = 0
    for p in pids:
        try:
            for line in (Path("/proc") / str(p) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def concurrent(
    port: int,
    pid: int,
    bodies: list[bytes],
    clients: int = 16,
    total: int = 10_000,
    max_seconds: float = 240.0,
) -> dict:
    """``clients`` threads, one keep-alive connection each, until ``total`` requests or
    ``max_seconds``; latency, throughput, status counts, server RSS after warm-up and at the end."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    sent = [0]
    stop = time.monotonic() + max_seconds

    def client(k: int) -> None:
        with Client(port, timeout=30) as c:
            for body in bodies[:5]:  # warm-up, not counted
                c.post("/rank", body)
            while time.monotonic() < stop:
                with lock:
                    if sent[0] >= total:
                        return
                    sent[0] += 1
                    i = sent[0]
                t = time.perf_counter()
                try:
                    code = c.post("/rank", bodies[i % len(bodies)]).status_code
                except OSError:
                    code = -1
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    codes[code] = codes.get(code, 0) + 1

    rss: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:  # server RSS every 1,000 requests
        mark = 0
        while not done.wait(0.2):
            if len(lat) >= mark:
                rss.append((len(lat), server_rss_mb(pid)))
                mark += 1000

    time.sleep(1.0)
    rss_start = server_rss_mb(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    rss_end = server_rss_mb(pid)
    after_1000 = next((m for n, m in rss if n >= 1000), rss_start)
    ms = np.array(lat) * 1e3
    return {
        "clients": clients,
        "requests": len(ms),
        "seconds": wall,
        "requests_per_s": len(ms) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "status_counts": {str(k): v for k, v in sorted(codes.items())},
        "n_5xx": sum(v for k, v in codes.items() if k >= 500 or k < 0),
        "server_rss_mb_after_warmup": rss_start,
        "server_rss_mb_after_1000": after_1000,
        "server_rss_mb_end": rss_end,
        "rss_growth_fraction": (rss_end - rss_start) / rss_start,
        "rss_growth_fraction_after_1000": (rss_end - after_1000) / after_1000,
        "rss_mb_by_requests": rss,
    }


def adversarial_bodies() -> dict[str, bytes]:
    """Bodies of at most 1 MB built to cost memory: each stays within the service's limit."""
    mb = 1_000_000
    bodies = {
        "one_1MB_string_id": json.dumps({"candidates": [{"item_id": "x" * (mb - 100)}]}).encode(),
        "2000_candidates_500_char_ids": json.dumps(
            {"candidates": [{"shop": "s" * 480, "item_id": i} for i in range(2000)]}
        ).encode(),
        "100000_deep_arrays": b"[" * 100_000 + b"]" * 100_000,
        "300000_empty_objects": b'{"candidates": [' + b",".join([b"{}"] * 300_000) + b"]}",
        "1MB_invalid_utf8": b'{"candidates": [{"item_id": "' + b"\xff" * (mb - 100) + b'"}]}',
    }
    return {k: v[: 1 << 20] if len(v) > (1 << 20) else v for k, v in bodies.items()}


def memory(port: int, pid: int, repeat: int = 20) -> dict:
    out = {"server_rss_mb_before": server_rss_mb(pid)}
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        timeout=60,
        headers={"content-type": "application/json"},
    ) as c:
        for name, body in adversarial_bodies().items():
            codes = sorted({c.post("/rank", content=body).status_code for _ in range(repeat)})
            out[name] = {
                "bytes": len(body),
                "status": codes,
                "server_rss_mb_after": server_rss_mb(pid),
            }
    out["server_rss_growth_mb"] = (
        max(v["server_rss_mb_after"] for k, v in out.items() if isinstance(v, dict))
        - out["server_rss_mb_before"]
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: train a small one)")
    ap.add_argument("--data", type=Path, help="simulated Parquet to draw users and items from")
    ap.add_argument("--engines", default="onnx,torch")
    ap.add_argument("--modes", default="sequential,concurrent,memory")
    ap.add_argument(
        "--workers", type=int, default=2, help="server workers in the concurrent and memory modes"
    )
    ap.add_argument("--total", type=int, default=10_000, help="requests in the concurrent mode")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_latency.json"
    )
    args = ap.parse_args()
    modes = args.modes.split(",")
    report: dict = {
        "benchmark": "serve_latency",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "uptime_before": subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        bundle, data = args.bundle, args.data
        if bundle is None:
            print(
                "training a benchmark bundle (20k simulated rows, 1 epoch, tower 360x200x80) …",
                flush=True,
            )
            bundle, data = build_bundle(Path(tmp))
        if data is None:
            raise SystemExit(
                "--data is required with --bundle (the simulated file the bundle was trained on)"
            )
        frame = pl.read_parquet(data)
        load_before = os.getloadavg()
        if "sequential" in modes:
            report["sequential"] = sequential(bundle, frame, args.engines.split(","))
        if "concurrent" in modes or "memory" in modes:
            port = free_port()
            proc = start_server(bundle, "onnx", port, workers=args.workers)
            try:
                bodies = make_requests(frame, 200, 200, seed=7)
                if "concurrent" in modes:
                    report["concurrent"] = {
                        "workers": args.workers,
                        "candidates": 200,
                        **concurrent(port, proc.pid, bodies, total=args.total),
                    }
                if "memory" in modes:
                    report["memory"] = {"workers": args.workers, **memory(port, proc.pid)}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    report["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "uptime_after": subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "note": "2 CPU cores, shared by the client and the servers (see loadavg_before for "
        "other load): numbers are upper bounds",
    }
    report["goals"] = {
        "sequential_200": "requests/s >= 0.6 x inference-only limit, p99 < 10 ms (1 worker)",
        "concurrent_200": "16 clients, 2 workers: p99 < 50 ms, 0 x 5xx, RSS flat within 10 % "
        "over 10,000 requests",
        "memory": "any request <= 1 MB: server RSS grows < 100 MB",
    }
    report["verdicts"] = verdicts(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"\nwrote {args.out}")


def sequential(bundle: Path, frame: pl.DataFrame, engines: list[str]) -> dict:
    results: dict[str, dict] = {}
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
    limit = inference_limit(bundle, make_requests(frame, 200, 20, seed=200))
    for e in results:
        r = results[e]["200"]
        r["inference_only"] = limit
        r["fraction_of_inference_limit"] = r["requests_per_s"] / limit["limit_requests_per_s"]
    return {
        "setup": "one uvicorn server (1 worker, 127.0.0.1) per engine, engine threads = 1; "
        "sequential keep-alive requests with http.client from a separate process, each body "
        "sent to every engine in turn (same background load)",
        "results": results,
    }


def verdicts(report: dict) -> dict[str, dict]:
    """Each performance goal of the service (issue 15) with the measured values and met or not;
    goals whose mode did not run are left out."""
    out: dict[str, dict] = {}
    seq = report.get("sequential", {}).get("results", {}).get("onnx", {}).get("200")
    if seq:
        frac, p99 = seq["fraction_of_inference_limit"], seq["p99_ms"]
        out["sequential_200"] = {
            "fraction_of_inference_limit": frac,
            "p99_ms": p99,
            "met": frac >= 0.6 and p99 < 10,
        }
    c = report.get("concurrent")
    if c:
        out["concurrent_200"] = {
            "p99_ms": c["p99_ms"],
            "n_5xx": c["n_5xx"],
            "rss_growth_fraction": c["rss_growth_fraction"],
            "rss_growth_fraction_after_1000": c["rss_growth_fraction_after_1000"],
            "met": c["p99_ms"] < 50
            and c["n_5xx"] == 0
            and abs(c["rss_growth_fraction"]) <= 0.10
            and abs(c["rss_growth_fraction_after_1000"]) <= 0.10
            and c["requests"] >= 10_000,
        }
    m = report.get("memory")
    if m:
        out["memory"] = {
            "server_rss_growth_mb": m["server_rss_growth_mb"],
            "met": m["server_rss_growth_mb"] < 100,
        }
    return out


def print_report(report: dict) -> None:
    if "sequential" in report:
        print(
            f"\n{'engine':<7}{'candidates':>11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
            f"{'req/s':>8}{'scoring p50/p99':>17} "
            "  median server stages (ms)"
        )
        for engine, by_n in report["sequential"]["results"].items():
            for n, r in by_n.items():
                stages = " ".join(f"{k} {v:.2f}" for k, v in r["median_stage_ms"].items())
                scoring = f"{r['scoring_p50_ms']:.2f}/{r['scoring_p99_ms']:.2f}"
                print(
                    f"{engine:<7}{n:>11}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                    f"{r['requests_per_s']:>8.0f}{scoring:>17} "
                    f"  {stages}"
                )
            r = by_n.get("200")
            if r:
                lim = r["inference_only"]
                print(
                    f"{engine:<7} 200 candidates: {r['requests_per_s']:.0f} req/s = "
                    f"{r['fraction_of_inference_limit']:.2f} x the inference-only limit "
                    f"({lim['limit_requests_per_s']:.0f} req/s, ONNX alone "
                    f"{lim['infer_median_ms']:.2f} ms)"
                )
    if "concurrent" in report:
        c = report["concurrent"]
        print(
            f"\nconcurrent: {c['clients']} clients, {c['workers']} workers, {c['requests']} "
            f"requests in {c['seconds']:.0f} s: {c['requests_per_s']:.0f} req/s, p50 "
            f"{c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, 5xx {c['n_5xx']}, server RSS "
            f"{c['server_rss_mb_after_warmup']:.0f} → {c['server_rss_mb_after_1000']:.0f} "
            f"(1,000 requests) → {c['server_rss_mb_end']:.0f} MB (end; "
            f"{100 * c['rss_growth_fraction_after_1000']:+.1f} % after the first 1,000)"
        )
    if "memory" in report:
        m = report["memory"]
        print(
            f"\nmemory: server RSS {m['server_rss_mb_before']:.0f} MB before; growth over all "
            f"adversarial bodies {m['server_rss_growth_mb']:.1f} MB"
        )
        for k, v in m.items():
            if isinstance(v, dict):
                print(
                    f"  {k:<32}{v['bytes']:>9} bytes  status {v['status']}  RSS after "
                    f"{v['server_rss_mb_after']:.0f} MB"
                )
    if report.get("verdicts"):
        print("\ngoals (issue 15):")
        for goal, v in report["verdicts"].items():
            values = ", ".join(
                f"{k} {x:.3g}" for k, x in v.items() if k != "met" and not isinstance(x, bool)
            )
            print(f"  {goal:<16}{'MET' if v['met'] else 'NOT MET':<9}{values}")


if __name__ == "__main__":
    main()
