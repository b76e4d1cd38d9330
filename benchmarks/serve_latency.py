"""Latency of the HTTP ranking service, three modes, localhost only (127.0.0.1):

* ``sequential``: p50 / p95 / p99 and requests/s for 10, 200 and 2,000 candidates per request,
  one uvicorn worker, requests sent one at a time (keep-alive) with :class:`Client` from this
  process (the server is a separate process); requests/s is also given as a fraction of the
  **inference-only limit** (1 / the median time of the ONNX session alone on the same 200
  encoded candidates, one thread, measured in this process).
* ``concurrent``: ``--clients`` (default 16) keep-alive connections, each with one request in
  flight, driven by one ``selectors`` event-loop thread (:class:`LoadGenerator`), send /rank
  with 200 candidates to a server with ``--workers`` (default 2) until ``--total`` (10,000)
  requests are done or ``--max-seconds`` (240) have passed; p50 / p99, requests/s, the count
  of 5xx, and the servers' RSS (all worker processes) after the warm-up, every 1,000 requests
  and at the end.
* ``memory``: adversarial bodies of at most 1 MB (one 1 MB string id, 2,000 candidates of
  500-character ids, 100,000-deep arrays, 300,000 empty objects, 1 MB of invalid UTF-8) sent 20
  times each; the servers' RSS growth.

The load generator is a raw-socket HTTP/1.1 keep-alive client (request bytes built once per
body, replies read with ``recv_into`` into a reusable buffer, only the head parsed): it costs
about 0.1 ms of CPU per request with 200 candidates (client process CPU / requests, 100-140 µs
measured on the loaded 2-core machine, of which 55-75 µs are the bare send and receive system
calls), against 0.25-0.33 ms for ``http.client`` (sequential, or 16 threads). On 2 cores the
client competes with the server for CPU, and 16 client threads would also wait for the GIL
inside the measured latency; so, as ``wrk`` does, one thread drives every connection and does
as little as it can. Its CPU per request is in the report (``client_cpu_ms_per_request``).

Usage::

    PYTHONPATH=src python benchmarks/serve_latency.py [--bundle B --data D] \
        [--engines onnx,torch] [--modes sequential,concurrent,memory] [--clients 16] \
        [--total 10000] [--max-seconds 240] [--requests-scale 0.1] [--out report.json]

Without ``--bundle`` a bundle with the paper's tower (360×200×80, embedding 18) is trained for one
epoch on 20k simulated impressions in a temporary directory. Writes
``benchmarks/results/serve_latency.json`` (or ``--out``) and prints a table. Bounded: a fixed
number of requests per size, a timeout per request; the server is always stopped.

Each response's ``server-timing`` header gives the server's own time per stage (validate, encode,
infer, fuse); the rest of the client-side latency is HTTP, JSON parsing, request validation of
the body, response serialisation and the client itself — reported as ``other``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10, 200, 2000)
COLUMNAR = "200 columnar"  # the 200-candidate requests with `candidates` in the columnar form
REQUESTS = {10: 400, 200: 300, 2000: 100}
WARMUP = 20
USER = ["user_id", "user_age", "user_gender", "user_power", "hour"]
ITEM = ["item_id", "category", "brand", "shop", "price"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reply:
    """Status, headers (names lower-case) and body of one response."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.content[:200]!r}")


class ProtocolError(OSError):
    """A reply this client cannot read: malformed, or framed in a way it refuses."""


HEAD_LIMIT = 64 * 1024  # bytes of status line + headers
HEX = frozenset(b"0123456789abcdefABCDEF")


def request_bytes(path: str, body: bytes, port: int) -> bytes:
    """The whole request (request line, headers, body) of a JSON ``POST``, built once per body."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class ReplyReader:
    """Incremental reader of one HTTP/1.1 reply at a time over a reusable buffer (grown to the
    largest reply seen, never shrunk): ``space()`` is where the next ``recv_into`` writes,
    ``feed(k)`` takes the ``k`` bytes received and returns the :class:`Reply` once it is complete
    (None before), ``eof()`` is called when the server closed the connection.

    Framing: ``content-length``; ``transfer-encoding: chunked`` (extensions and trailers
    skipped); neither: the body runs until the server closes (then ``keep_alive`` is False);
    204 and 304 have no body. Refused with :class:`ProtocolError`: a malformed status line,
    header line, content-length or chunk size; another transfer-encoding; a 1xx reply (this
    client never sends ``expect``); bytes after the end of the reply (one request in flight);
    a head over 64 kB; a close before the reply is complete."""

    __slots__ = (
        "buf",
        "view",
        "n",
        "head_end",
        "end",
        "mode",
        "pos",
        "chunks",
        "trailer",
        "status",
        "headers",
        "keep_alive",
    )

    def __init__(self, size: int = 1 << 16) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.reset()

    def reset(self) -> None:
        """Forget the last reply (its bytes stay in the buffer, overwritten by the next)."""
        self.n, self.head_end, self.end, self.mode = 0, -1, -1, ""

    def space(self) -> memoryview:
        if len(self.buf) - self.n < 16384:
            self._grow(2 * len(self.buf))
        return self.view[self.n :]

    def _grow(self, size: int) -> None:
        buf = bytearray(size)
        buf[: self.n] = self.view[: self.n]
        self.buf, self.view = buf, memoryview(buf)

    def feed(self, k: int) -> Reply | None:
        self.n += k
        if self.head_end < 0 and not self._head():
            return None
        if self.mode == "length":
            if self.n < self.end:
                return None
            if self.n > self.end:
                raise ProtocolError(f"{self.n - self.end} bytes after the end of the reply")
            return Reply(self.status, self.headers, bytes(self.view[self.head_end : self.end]))
        if self.mode == "chunked":
            return self._chunks()
        return None  # body until the server closes

    def eof(self) -> Reply:
        if self.mode == "close":
            return Reply(self.status, self.headers, bytes(self.view[self.head_end : self.n]))
        if self.n == 0:
            raise ProtocolError("connection closed by the server before a reply")
        raise ProtocolError(f"connection closed by the server after {self.n} bytes of a reply")

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n", 0, self.n)
        if end < 0:
            if self.n > HEAD_LIMIT:
                raise ProtocolError(f"reply head over {HEAD_LIMIT} bytes")
            return False
        lines = str(self.view[:end], "latin-1").split("\r\n")  # one decode: cheapest
        line = lines[0]
        code = line[9:12]
        if not (
            line[:7] == "HTTP/1."
            and len(code) == 3
            and code.isascii()
            and code.isdigit()
            and line[12:13] in ("", " ")
        ):
            raise ProtocolError(f"malformed status line {line[:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for h in lines[1:]:
            name, sep, value = h.partition(":")
            if not sep or not name or name[-1] in " \t":
                raise ProtocolError(f"malformed header line {h[:80]!r}")
            key, val = name.lower(), value.strip()
            if key in headers:  # a repeated header: joined, as http.client does
                val = f"{headers[key]}, {val}"
            headers[key] = val
        conn = headers.get("connection", "").lower()
        self.keep_alive = (
            "close" not in conn if line[7] == "1" else "keep-alive" in conn  # 1.1 / 1.0
        )
        self.status, self.headers, self.head_end = status, headers, end + 4
        te, length = headers.get("transfer-encoding"), headers.get("content-length")
        if status < 200:
            raise ProtocolError(f"interim reply {status} (no 'expect' was sent)")
        if status in (204, 304):
            self.mode, self.end = "length", self.head_end
        elif te is not None:
            if te.lower() != "chunked":
                raise ProtocolError(f"unsupported transfer-encoding {te!r}")
            self.mode, self.pos, self.chunks, self.trailer = "chunked", self.head_end, [], False
        elif length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError(f"malformed content-length {length!r}")
            self.mode, self.end = "length", self.head_end + int(length)
            if self.end > len(self.buf):
                self._grow(self.end + 16384)
        else:
            self.mode, self.keep_alive = "close", False
        return True

    def _chunks(self) -> Reply | None:
        buf, n = self.buf, self.n
        while True:
            eol = buf.find(b"\r\n", self.pos, n)
            if eol < 0:
                if n - self.pos > 4096:
                    raise ProtocolError("chunk-size or trailer line over 4096 bytes")
                return None
            if self.trailer:  # after the last chunk: trailer lines until an empty one
                if eol > self.pos:
                    self.pos = eol + 2
                    continue
                if eol + 2 != n:
                    raise ProtocolError(f"{n - eol - 2} bytes after the end of the reply")
                return Reply(self.status, self.headers, b"".join(self.chunks))
            field = bytes(buf[self.pos : eol]).partition(b";")[0].strip()
            if not field or not HEX.issuperset(field):
                raise ProtocolError(f"malformed chunk size {field[:40]!r}")
            size = int(field, 16)
            if size == 0:
                self.trailer, self.pos = True, eol + 2
                continue
            start = eol + 2
            stop = start + size
            if n < stop + 2:
                if stop + 2 > len(self.buf):
                    self._grow(stop + 2 + 16384)
                return None
            if buf[stop : stop + 2] != b"\r\n":
                raise ProtocolError("chunk data not followed by CRLF")
            self.chunks.append(bytes(self.view[start:stop]))
            self.pos = stop + 2


def connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


IDLE_CHECK_S = 1.0  # a connection idle longer is checked before reuse (uvicorn closes at 5 s)


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server has closed this idle keep-alive connection: a non-blocking peek."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Client:
    """A lean keep-alive HTTP/1.1 client on a raw socket (TCP_NODELAY), one request at a time:
    each body's request bytes built once and cached, the reply read with ``recv_into`` into a
    reusable buffer (:class:`ReplyReader`). Any failure (reset, timeout, malformed reply) closes
    the connection and raises :class:`OSError`; the next request reconnects. On 2 cores the
    client competes with the server for CPU, so it does as little as it can (as ``wrk`` does)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None
        self.reader = ReplyReader()
        self.requests: dict[tuple[str, bytes], bytes] = {}
        self.last = 0.0  # time.monotonic() of the last reply

    def post(self, path: str, body: bytes) -> Reply:
        req = self.requests.get((path, body))
        if req is None:
            req = self.requests[path, body] = request_bytes(path, body, self.port)
        reader = self.reader
        if self.sock is not None and time.monotonic() - self.last > IDLE_CHECK_S:
            if closed_by_peer(self.sock):  # the server's keep-alive timeout: not a failure
                self.close()
        try:
            sock = self.sock or self._connect()
            sock.sendall(req)
            reader.reset()
            while True:
                k = sock.recv_into(reader.space())
                reply = reader.feed(k) if k else reader.eof()
                if reply is not None:
                    break
        except OSError as e:
            self.close()  # reconnects on the next request
            raise OSError(f"POST {path} on port {self.port}: {type(e).__name__}: {e}") from None
        if not reader.keep_alive:
            self.close()
        self.last = time.monotonic()
        return reply

    def _connect(self) -> socket.socket:
        self.sock = connect(self.port, self.timeout)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Conn:
    """One connection of :class:`LoadGenerator`: at most one request in flight."""

    __slots__ = ("sock", "reader", "out", "t0", "busy")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.reader = ReplyReader()
        self.out: memoryview | None = None  # request bytes not yet sent
        self.t0 = 0.0
        self.busy = False


class LoadGenerator:
    """``clients`` keep-alive connections driven by one thread with a ``selectors`` event loop,
    each with at most one request in flight (as ``clients`` sequential clients would): no
    threads, so no GIL waits inside the measured latency. A request's latency runs from just
    before its first byte is sent to the moment its reply is complete; a failed request (reset,
    timeout, malformed reply) counts with status -1 and its connection is reopened."""

    def __init__(self, port: int, clients: int, timeout: float = 30.0) -> None:
        self.port, self.timeout = port, timeout
        self.sel = selectors.DefaultSelector()
        self.conns = [_Conn() for _ in range(clients)]
        for c in self.conns:
            self._open(c)

    def _open(self, c: _Conn) -> None:
        if c.sock is not None:
            self.sel.unregister(c.sock)
            c.sock.close()
            c.sock = None
        try:
            sock = connect(self.port, self.timeout)
        except OSError:
            return  # this connection is out; the others go on
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, c)
        c.sock = sock

    def run(
        self,
        requests: list[bytes],
        total: int,
        max_seconds: float,
        every: int = 0,
        on_every: Callable[[int], None] | None = None,
    ) -> tuple[list[float], dict[int, int], float]:
        """Send ``requests`` in turn (cycling) until ``total`` are done or ``max_seconds`` have
        passed (requests in flight then finish); ``on_every(done)`` is called after each
        ``every`` completed requests. Returns the latencies (s), the count per status and the
        wall time (s)."""
        lat: list[float] = []
        codes: dict[int, int] = {}
        clock = time.perf_counter
        t_start = clock()
        deadline = t_start + max_seconds
        state = [0, 0]  # issued, in flight
        write = selectors.EVENT_READ | selectors.EVENT_WRITE

        def start(c: _Conn) -> None:
            while c.sock is not None and state[0] < total:  # a loop: a failed send goes on
                now = clock()
                if now >= deadline:
                    return
                req = requests[state[0] % len(requests)]
                state[0] += 1
                state[1] += 1
                c.reader.reset()
                c.busy, c.t0 = True, now
                try:
                    sent = c.sock.send(req)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    record(c, None, clock())
                    continue
                if sent < len(req):
                    c.out = memoryview(req)[sent:]
                    self.sel.modify(c.sock, write, c)
                return

        def record(c: _Conn, reply: Reply | None, now: float) -> None:
            lat.append(now - c.t0)
            code = -1 if reply is None else reply.status_code
            codes[code] = codes.get(code, 0) + 1
            state[1] -= 1
            c.busy = False
            if reply is None or not c.reader.keep_alive or c.out is not None:
                c.out = None  # (a reply before the whole request was sent: not reusable)
                self._open(c)
            if on_every is not None and every and len(lat) % every == 0:
                on_every(len(lat))

        def finish(c: _Conn, reply: Reply | None, now: float) -> None:
            record(c, reply, now)
            start(c)

        for c in self.conns:
            if c.sock is None or closed_by_peer(c.sock):  # idle since the last run
                self._open(c)
            start(c)
        next_check = t_start + 1.0
        while state[1]:
            for key, mask in self.sel.select(1.0):
                c = key.data
                if not c.busy:  # the server closed an idle connection
                    self._open(c)
                    continue
                reply = None
                try:
                    if mask & selectors.EVENT_WRITE and c.out is not None:
                        sent = c.sock.send(c.out)
                        c.out = c.out[sent:] if sent < len(c.out) else None
                        if c.out is None:
                            self.sel.modify(c.sock, selectors.EVENT_READ, c)
                    if mask & selectors.EVENT_READ:
                        k = c.sock.recv_into(c.reader.space())
                        reply = c.reader.feed(k) if k else c.reader.eof()
                except BlockingIOError:
                    continue
                except OSError:
                    finish(c, None, clock())
                    continue
                if reply is not None:
                    finish(c, reply, clock())
            now = clock()
            if now >= next_check:  # requests past the timeout fail
                next_check = now + 1.0
                for c in self.conns:
                    if c.busy and now - c.t0 > self.timeout:
                        finish(c, None, now)
        return lat, codes, clock() - t_start

    def close(self) -> None:
        for c in self.conns:
            if c.sock is not None:
                self.sel.unregister(c.sock)
                c.sock.close()
                c.sock = None
        self.sel.close()


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


def make_requests(
    data: pl.DataFrame, n: int, count: int, seed: int, *, columnar: bool = False
) -> list[bytes]:
    """``count`` request bodies of ``n`` candidates: one user's context, random items; with
    ``columnar`` the candidates as one array per feature (the same values for the same seed)."""
    rng = np.random.default_rng(seed)
    users = data.select(USER).unique(maintain_order=True)
    items = data.select(ITEM).unique(subset="item_id", maintain_order=True)
    bodies = []
    for k in range(count):
        ctx = users.row(int(rng.integers(users.height)), named=True)
        pick = rng.integers(0, items.height, n)
        cands = items[pick].to_dict(as_series=False) if columnar else items[pick].to_dicts()
        bodies.append(json.dumps({"context": ctx, "candidates": cands}).encode())
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
        cpu = time.process_time()
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
        # the client's CPU (this process: sends, reply parsing, bookkeeping) per request
        cpu_ms = (time.process_time() - cpu) / (len(bodies[WARMUP:]) * len(clients)) * 1e3
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
            "client_cpu_ms_per_request": cpu_ms,
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


def server_pids(pid: int) -> set[int]:
    """The server process and all its descendants (the uvicorn workers)."""
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
    return pids


def rss_mb(pids: set[int]) -> float:
    """Resident memory of the given processes (MB); those gone count 0."""
    total = 0
    for p in pids:
        try:
            for line in (Path("/proc") / str(p) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server and all its descendants (MB)."""
    return rss_mb(server_pids(pid))


def concurrent(
    port: int,
    pid: int,
    bodies: list[bytes],
    clients: int = 16,
    total: int = 10_000,
    max_seconds: float = 240.0,
) -> dict:
    """``clients`` keep-alive connections driven by one event-loop thread
    (:class:`LoadGenerator`), each with one request in flight, until ``total`` requests or
    ``max_seconds``; latency, throughput, status counts, server RSS after warm-up, every 1,000
    requests and at the end, and the client's CPU per request (this process)."""
    requests = [request_bytes("/rank", b, port) for b in bodies]
    load = LoadGenerator(port, clients, timeout=30)
    try:
        load.run(requests, total=5 * clients, max_seconds=max_seconds)  # warm-up, not counted
        time.sleep(1.0)
        pids = server_pids(pid)  # the workers, found once: /proc is not scanned in the loop
        rss_start = rss_mb(pids)
        rss: list[tuple[int, float]] = [(0, rss_start)]
        cpu = time.process_time()
        lat, codes, wall = load.run(
            requests,
            total=total,
            max_seconds=max_seconds,
            every=1000,
            on_every=lambda done: rss.append((done, rss_mb(pids))),
        )
        cpu = time.process_time() - cpu
    finally:
        load.close()
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
        "client_cpu_ms_per_request": cpu / len(ms) * 1e3,
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
    ap.add_argument("--clients", type=int, default=16, help="connections in the concurrent mode")
    ap.add_argument(
        "--max-seconds", type=float, default=240.0, help="time bound of the concurrent mode"
    )
    ap.add_argument(
        "--requests-scale",
        type=float,
        default=1.0,
        help="scale the sequential mode's request counts (e.g. 0.1 for a smoke run)",
    )
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
            report["sequential"] = sequential(
                bundle, frame, args.engines.split(","), scale=args.requests_scale
            )
        if "concurrent" in modes or "memory" in modes:
            port = free_port()
            proc = start_server(bundle, "onnx", port, workers=args.workers)
            try:
                bodies = make_requests(frame, 200, 200, seed=7)
                if "concurrent" in modes:
                    report["concurrent"] = {
                        "workers": args.workers,
                        "candidates": 200,
                        **concurrent(
                            port,
                            proc.pid,
                            bodies,
                            clients=args.clients,
                            total=args.total,
                            max_seconds=args.max_seconds,
                        ),
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


def sequential(bundle: Path, frame: pl.DataFrame, engines: list[str], scale: float = 1.0) -> dict:
    results: dict[str, dict] = {}
    ports = {e: free_port() for e in engines}
    procs = {}
    try:
        for e in engines:
            procs[e] = start_server(bundle, e, ports[e])
        for n in SIZES:
            count = max(10, round(REQUESTS[n] * scale))
            bodies = make_requests(frame, n, WARMUP + count, seed=n)
            for e, r in measure(ports, bodies).items():
                results.setdefault(e, {})[str(n)] = r
        # the same 200-candidate requests in the columnar form (answered in columns too)
        count = max(10, round(REQUESTS[200] * scale))
        bodies = make_requests(frame, 200, WARMUP + count, seed=200, columnar=True)
        for e, r in measure(ports, bodies).items():
            results[e][COLUMNAR] = r
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
    limit = inference_limit(bundle, make_requests(frame, 200, 20, seed=200))
    for e in results:
        for r in (results[e]["200"], results[e][COLUMNAR]):
            r["inference_only"] = limit
            r["fraction_of_inference_limit"] = r["requests_per_s"] / limit["limit_requests_per_s"]
    return {
        "setup": "one uvicorn server (1 worker, 127.0.0.1) per engine, engine threads = 1; "
        "sequential keep-alive requests with a raw-socket client from a separate process, "
        "each body sent to every engine in turn (same background load)",
        "results": results,
    }


def verdicts(report: dict) -> dict[str, dict]:
    """Each performance goal of the service (issue 15) with the measured values and met or not;
    goals whose mode did not run are left out."""
    out: dict[str, dict] = {}
    onnx = report.get("sequential", {}).get("results", {}).get("onnx", {})
    for key, goal in (("200", "sequential_200"), (COLUMNAR, "sequential_200_columnar")):
        seq = onnx.get(key)
        if seq:
            frac, p99 = seq["fraction_of_inference_limit"], seq["p99_ms"]
            out[goal] = {
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
            and c["requests"] >= 10_000
            and c["clients"] == 16,
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
            for key in ("200", COLUMNAR):
                r = by_n.get(key)
                if not r:
                    continue
                lim = r["inference_only"]
                print(
                    f"{engine:<7} {key} candidates: {r['requests_per_s']:.0f} req/s = "
                    f"{r['fraction_of_inference_limit']:.2f} x the inference-only limit "
                    f"({lim['limit_requests_per_s']:.0f} req/s, ONNX alone "
                    f"{lim['infer_median_ms']:.2f} ms); client CPU "
                    f"{1e3 * r['client_cpu_ms_per_request']:.0f} µs/request"
                )
    if "concurrent" in report:
        c = report["concurrent"]
        print(
            f"\nconcurrent: {c['clients']} clients, {c['workers']} workers, {c['requests']} "
            f"requests in {c['seconds']:.0f} s: {c['requests_per_s']:.0f} req/s, p50 "
            f"{c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, 5xx {c['n_5xx']}, server RSS "
            f"{c['server_rss_mb_after_warmup']:.0f} → {c['server_rss_mb_after_1000']:.0f} "
            f"(1,000 requests) → {c['server_rss_mb_end']:.0f} MB (end; "
            f"{100 * c['rss_growth_fraction_after_1000']:+.1f} % after the first 1,000); "
            f"client CPU {1e3 * c['client_cpu_ms_per_request']:.0f} µs/request"
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
            print(f"  {goal:<25}{'MET' if v['met'] else 'NOT MET':<9}{values}")


if __name__ == "__main__":
    main()
