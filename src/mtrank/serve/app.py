"""The HTTP ranking service (FastAPI): ``POST /rank``, ``POST /score``, ``GET /health``,
``GET /metadata``; OpenAPI docs at ``/docs`` (schema at ``/openapi.json``).

Build it with :func:`create_app` (tests use ``fastapi.testclient.TestClient`` on it; ``mtrank
serve`` runs it under uvicorn, one process per ``--workers``). See ``docs/serving.md`` for the
request and response shapes.

The event loop reads request bodies (with the size limit of :mod:`mtrank.serve.body`);
decoding, validation, encoding, inference and serialisation run in a pool of scoring threads,
so ``/health`` and other requests are answered while one request scores. A quick request from
a client that sends one at a time is scored on the event loop instead (:meth:`Scoring.inline`:
expected to take at most :data:`INLINE_BUDGET_S`), which saves two thread wake-ups. The two
scoring routes are answered by :class:`RankingApp` before FastAPI's routing and middleware
(the hot path).
Every 4xx has one shape, :class:`ErrorResponse`, listed in the OpenAPI schema for each status.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

import mtrank
from mtrank.serve.body import (
    DEFAULT_MAX_BODY_BYTES,
    check_length,
    check_media_type,
    decode_json,
    too_large,
)
from mtrank.serve.fusion import FusionSpec
from mtrank.serve.openapi import request_schemas
from mtrank.serve.errors import RequestError, bounded, summary
from mtrank.serve.service import MAX_CANDIDATES, MAX_ID_CHARS, RankingService, Scored

SETTINGS_ENV = "MTRANK_SERVE_SETTINGS"  # create_app's arguments as JSON, for worker processes
# Requests scored at once per worker process (its scoring threads). Scoring is CPU-bound with
# one engine thread; two let one request's Python work overlap another's ONNX run (which
# releases the GIL); more only add GIL contention and per-thread malloc arenas (RSS). Measured
# with benchmarks/serve_latency.py --modes concurrent (16 clients, 2 workers): p99 38-49 ms
# with 2 threads, 42-69 ms with 4 (docs/serving.md).
SCORING_THREADS = 2
MAX_DETAIL_BYTES = 16_384  # the JSON of an error answer's detail entries, at most
# A request is scored on the event loop itself, without the thread hop (two thread wake-ups:
# 0.1-0.2 ms of a sequential request's latency here), only when it comes from a client that
# sends one request at a time: no other request being answered in this process, and the last
# SAME_CONNECTION requests came over the same connection as this one (several connections
# taking turns are a queue: the threads let one request's ONNX run overlap another's Python).
# It must also be expected to take at most INLINE_BUDGET_S (moving average cost per body
# byte): /health and other connections then wait at most about that long.
INLINE_BUDGET_S = 0.005
SAME_CONNECTION = 8


class ScoredCandidate(BaseModel):
    """One candidate's scores. Probabilities in [0, 1]; ``score`` = fused score
    (``log_score`` its natural log); null only if not finite (such a candidate ranks last)."""

    index: int = Field(description="position of the candidate in the request (0-based)")
    p_ctr: float | None
    p_cvr: float | None
    p_ctcvr: float | None
    score: float | None
    log_score: float | None


class RankedCandidate(ScoredCandidate):
    """A candidate of ``/rank`` with its rank (1 = first)."""

    rank: int = Field(description="1 = best")


class ScoredColumns(BaseModel):
    """The candidates of a columnar request's answer: one array per field, element i for
    the i-th candidate of the answer (as :class:`ScoredCandidate`; null where not finite)."""

    index: list[int] = Field(description="position of each candidate in the request (0-based)")
    p_ctr: list[float | None]
    p_cvr: list[float | None]
    p_ctcvr: list[float | None]
    score: list[float | None]
    log_score: list[float | None]


class RankedColumns(ScoredColumns):
    """:class:`ScoredColumns` of ``/rank``, best first, with each candidate's rank."""

    rank: list[int] = Field(description="1 = best")


class FeatureCounts(BaseModel):
    """How many feature values were missing or unseen (out of vocabulary) in a request."""

    missing: dict[str, int] = Field(
        description="per feature column: null values (encoded as missing / mean-imputed)"
    )
    oov: dict[str, int] = Field(
        description="per categorical column: values unseen in training, scored with the OOV index"
    )
    out_of_range: dict[str, int] = Field(
        default_factory=dict,
        description="per numerical column: values far outside the training range (beyond the "
        "0.1-99.9 % quantile range by more than its width; e.g. a price in cents sent to a "
        "model trained in units), scored as sent",
    )


class FusionOut(BaseModel):
    """The fusion a response was ranked with: formula and every parameter."""

    formula: str
    params: dict[str, float | str]


class ScoreResponse(BaseModel):
    """The response of ``/score``: the candidates' probabilities and fused scores, in request
    order."""

    model: str
    bundle_sha256: str
    score_source: str = Field(
        description="'fusion': score = the fusion of the model's pCTR/pCVR/pCTCVR; 'ranker': "
        "the model's own ranking score (LTR), and p_ctr, p_cvr, p_ctcvr, log_score "
        "are null"
    )
    fusion: FusionOut
    n_candidates: int
    candidates: list[ScoredCandidate] | ScoredColumns = Field(
        description="one object per candidate; one array per field when the request's "
        "candidates came as columns"
    )
    counts: FeatureCounts


class RankResponse(ScoreResponse):
    """The response of ``/rank``: the candidates sorted by fused score, best first."""

    candidates: list[RankedCandidate] | RankedColumns  # type: ignore[assignment]


class ErrorDetail(BaseModel):
    """One problem of a request: where (``loc``), what (``msg``), its kind (``type``)."""

    loc: list[str | int] = Field(
        description='path in the request, e.g. ["body", "candidates", 3, "price"]'
    )
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """The one shape of every 4xx answer (400 bad JSON, 404, 405, 413 too large, 415 not JSON,
    422 invalid request)."""

    message: str = Field(description="one line naming up to 5 fields and what is wrong")
    n_errors: int
    detail: list[ErrorDetail] = Field(description="at most 100 structured errors")


ERRORS = {
    400: "the body is not UTF-8 or not valid JSON (line and column given), or nested too deeply",
    413: "the body exceeds the size limit (--max-body-bytes); refused before it is parsed",
    415: "the content-type is not application/json",
    422: "the request is valid JSON but not a valid request (fields named in `message`)",
}


def create_app(
    bundle_path: str | Path,
    fusion: FusionSpec | str | Path | None = None,
    *,
    engine: str = "onnx",
    threads: int = 1,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """Build the service for one bundle.

    Args:
        bundle_path: bundle directory. fusion: default fusion (spec, JSON path, or None for
            ``ctcvr``). engine: ``onnx`` (default) or ``torch``. threads: engine threads.
        max_body_bytes: larger request bodies get 413 before they are parsed (default 1 MiB).

    Raises:
        BundleError, ConfigError: see :class:`RankingService`.
    """
    service = RankingService(bundle_path, fusion, engine=engine, threads=threads)
    app = RankingApp(
        lifespan=_bound_thread_pool,
        title="mtrank ranking service",
        version=mtrank.__version__,
        description="Ranks candidates by a fusion of ESMM's pCTR, pCVR and pCTCVR. Model "
        f"{service.bundle.model_config.name!r}, schema "
        f"{service.bundle.schema.name!r}. No authentication: run it behind a "
        "gateway.",
    )
    app.state.service = service
    header = {
        "model": service.bundle.model_config.name,
        "bundle_sha256": service.digest,
        "score_source": service.score_source,
    }
    error_docs = {
        code: {"model": ErrorResponse, "description": text} for code, text in ERRORS.items()
    }

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(
            RequestError(
                [{"loc": [], "msg": str(exc.detail), "type": "http"}], status=exc.status_code
            )
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the bundle is loaded and the engine ready."""
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        """Model name, schema, feature names, bundle sha256, engine, default fusion and limits
        (no file system paths)."""
        b = service.bundle
        return {
            **header,
            "schema": b.schema.model_dump(mode="json"),
            "features": {
                "categorical": service.categorical,
                "numerical": service.numerical,
                "price": service.price,
                "lists": {f.column: {"max_len": f.max_len} for f in service.list_features},
            },
            "model_config": b.model_config.model_dump(mode="json"),
            "engine": service.engine,
            "fusion": service.fusion.model_dump(mode="json"),
            "limits": {
                "max_candidates": MAX_CANDIDATES,
                "max_body_bytes": max_body_bytes,
                "max_id_chars": MAX_ID_CHARS,
            },
            "max_candidates": MAX_CANDIDATES,
            "trained": {k: b.meta[k] for k in ("dataset", "best_epoch", "rows") if k in b.meta},
            "mtrank_version": mtrank.__version__,
        }

    async def handle(request: Request, ranked: bool) -> Response:
        # declared for the OpenAPI schema; RankingApp answers these routes before routing
        reply = await score_request(app.scoring, request.headers.get, request.stream(), ranked)
        return reply.response()

    def body_doc(name: str) -> dict:
        return {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
                },
            }
        }

    @app.post(
        "/rank",
        response_model=RankResponse,
        responses=error_docs,
        openapi_extra=body_doc("RankRequest"),
    )
    async def rank(request: Request) -> Response:
        """Score the candidates and return them best first (ties by request index; a
        candidate whose score is not finite after every finite one)."""
        return await handle(request, ranked=True)

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses=error_docs,
        openapi_extra=body_doc("ScoreRequest"),
    )
    async def score(request: Request) -> Response:
        """Score the candidates, in request order (no ranking)."""
        return await handle(request, ranked=False)

    generated = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = generated()
            spec.setdefault("components", {}).setdefault("schemas", {}).update(
                request_schemas(service)
            )
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.scoring = Scoring(service, header, max_body_bytes)
    return app


@dataclass
class Scoring:
    """What a scoring request needs: the service, the response header fields, the body limit
    and the worker threads that score (:data:`SCORING_THREADS`)."""

    service: RankingService
    header: dict
    max_body_bytes: int
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(SCORING_THREADS, "mtrank-score")
    )
    active: int = 0  # requests read and not yet answered (changed on the event loop only)
    last_connection: Any = None  # the ASGI scope's "client" of the last request
    same_connection: int = 0  # requests in a row over that connection before this one
    seconds_per_byte: float = float("inf")  # moving average cost of a body byte (inf: unknown)

    def inline(self, size: int, connection: Any) -> bool:
        """Whether a body of ``size`` bytes, just read from ``connection`` (the ASGI scope's
        ``client``), is scored on the event loop: the only request in the process, the last
        :data:`SAME_CONNECTION` requests over the same connection, and expected to take at most
        :data:`INLINE_BUDGET_S` (never before the first measured answer)."""
        if connection is not None and connection == self.last_connection:
            self.same_connection += 1
        else:
            self.last_connection, self.same_connection = connection, 0
        return (
            self.active == 1
            and self.same_connection >= SAME_CONNECTION
            and self.seconds_per_byte * size <= INLINE_BUDGET_S
        )

    def answer(self, body: bytes, ranked: bool) -> Reply:
        """:func:`answer`, timed into :attr:`seconds_per_byte` (weight 0.1 per request)."""
        t = time.perf_counter()
        reply = answer(self.service, self.header, body, ranked)
        cost = (time.perf_counter() - t) / max(len(body), 1)
        old = self.seconds_per_byte
        self.seconds_per_byte = cost if old == float("inf") else 0.9 * old + 0.1 * cost
        return reply


@dataclass
class Reply:
    """A finished answer: status, JSON body, extra headers (``server-timing``)."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def response(self) -> Response:
        """As a Starlette response (the declared routes)."""
        return Response(
            self.body,
            status_code=self.status,
            media_type="application/json",
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers},
        )

    async def send(self, send: Send) -> None:
        """As the two ASGI messages (the fast path of :class:`RankingApp`)."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            *self.headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


async def score_request(
    scoring: Scoring,
    get_header: Callable[[str], str | None],
    chunks: AsyncIterator[bytes],
    ranked: bool,
    connection: Any = None,
) -> Reply:
    """One ``/rank`` (``ranked``) or ``/score`` request: media type and size checked, the body
    read on the event loop (dropped once over the limit), the rest in a scoring thread
    (:func:`answer`), so that the event loop answers other requests meanwhile; or, for a quick
    request from a client that sends one at a time (:meth:`Scoring.inline`), on the event loop
    itself."""
    try:
        check_media_type(get_header("content-type"))
        check_length(get_header("content-length"), scoring.max_body_bytes)
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > scoring.max_body_bytes:
                raise too_large(scoring.max_body_bytes)
    except RequestError as exc:
        return error_reply(exc)
    scoring.active += 1
    try:
        if scoring.inline(len(body), connection):
            return scoring.answer(bytes(body), ranked)
        return await asyncio.get_running_loop().run_in_executor(
            scoring.executor, scoring.answer, bytes(body), ranked
        )
    finally:
        scoring.active -= 1


class RankingApp(FastAPI):
    """The FastAPI app, which answers ``POST /rank`` and ``POST /score`` itself, before routing
    and middleware (:func:`score_request`; the routes stay declared for the OpenAPI schema and
    give the same answers): about 0.5 ms less CPU per request than FastAPI's stack and anyio's
    thread hop. An unexpected exception there is logged and answered 500 in the error shape.
    Every other request goes through FastAPI."""

    scoring: Scoring
    _PATHS = {"/rank": True, "/score": False}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the two scoring routes; pass everything else to FastAPI."""
        ranked = self._PATHS.get(scope.get("path")) if scope["type"] == "http" else None
        if ranked is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        try:
            reply = await score_request(
                self.scoring,
                _header_getter(scope["headers"]),
                _body_chunks(receive),
                ranked,
                scope.get("client"),
            )
        except Exception:  # never a traceback to the client
            logging.getLogger("mtrank.serve").exception("scoring failed")
            reply = error_reply(
                RequestError(
                    [
                        {
                            "loc": [],
                            "msg": "internal error (logged by the server)",
                            "type": "internal",
                        }
                    ],
                    status=500,
                )
            )
        await reply.send(send)


def _header_getter(headers: list[tuple[bytes, bytes]]) -> Callable[[str], str | None]:
    """``get(name)``: the first value of a header (lower-case name), as Starlette's."""

    def get(name: str) -> str | None:
        key = name.encode("latin-1")
        for k, v in headers:
            if k == key:
                return v.decode("latin-1")
        return None

    return get


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives (ends early if the client disconnects)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


@contextlib.asynccontextmanager
async def _bound_thread_pool(app: RankingApp):
    """Start-up: at most :data:`SCORING_THREADS` requests score at once in this process (the
    scoring threads, and anyio's for FastAPI's own). The scoring threads outlive a lifespan (an
    app may be started again, as tests do); idle, they end with the process."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = SCORING_THREADS
    yield


def app_from_env() -> FastAPI:
    """The app of one worker process of ``mtrank serve --workers N`` (uvicorn factory): the
    arguments of :func:`create_app` come as JSON in ``$MTRANK_SERVE_SETTINGS``."""
    app = create_app(**json.loads(os.environ[SETTINGS_ENV]))
    freeze_heap()
    return app


def freeze_heap() -> None:
    """In a server process, once its app is built: the objects loaded so far (model, encoders'
    vocabularies, libraries; about 3e5) leave the garbage collector's generations
    (``gc.freeze``), so that its full collections no longer traverse them on the request path
    (benchmarks/serve_latency.py: about 0.05-0.1 ms less per request, a lower p99). Not for a
    process that goes on to build other apps (tests): frozen objects are never collected."""
    gc.collect()
    gc.freeze()


def answer(service: RankingService, header: dict, body: bytes, ranked: bool) -> Reply:
    """Decode, validate, score and serialise one request (runs in a scoring thread)."""
    try:
        req = service.parse(decode_json(body), ranked=ranked)
        scored = service.score(req.context, req.candidates, req.fusion)
    except RequestError as exc:
        return error_reply(exc)
    order = scored.order() if ranked else np.arange(len(scored.score))
    if ranked and req.top_k is not None:
        order = order[: req.top_k]
    return _respond(header, scored, order, ranked=ranked, columnar=req.columnar)


def error_response(exc: RequestError) -> Response:
    """:func:`error_reply` as a Starlette response."""
    return error_reply(exc).response()


def error_reply(exc: RequestError) -> Reply:
    """``exc`` in the one error shape: a one-line ``message`` naming up to 5 errors, ``n_errors``
    (every problem the checks found, :attr:`RequestError.n_errors`), and ``detail``: the
    structured errors, each bounded (:func:`~mtrank.serve.errors.bounded`: keys as sent, cut to
    64 characters), at most 100 and :data:`MAX_DETAIL_BYTES` of JSON. Locations start with
    ``body`` (except for 404, 405 and 5xx, which are not about the body: their ``loc`` stays
    empty). ASCII JSON; about 20 KB at most, whatever the request."""
    about_body = exc.status < 500 and exc.status not in (404, 405)  # else: not the body's fault
    prefix = ["body"] if about_body else []
    detail, size = [], 0
    for e in exc.errors[:100]:
        e = bounded({**e, "loc": e["loc"] if e["loc"][:1] == ["body"] else [*prefix, *e["loc"]]})
        size += len(json.dumps(e, ensure_ascii=True))
        if size > MAX_DETAIL_BYTES and detail:
            break
        detail.append(e)
    content = {"message": summary(detail, exc.n_errors), "n_errors": exc.n_errors, "detail": detail}
    return Reply(exc.status, json.dumps(content, ensure_ascii=True).encode())


def _respond(
    header: dict, scored: Scored, order: np.ndarray, *, ranked: bool, columnar: bool = False
) -> Reply:
    """Serialise without a per-candidate Python loop or object: the candidate array is written
    column by column (:func:`json_rows`), or for a columnar request as one array per field
    (:class:`ScoredColumns`), the rest by orjson."""
    cols: dict[str, np.ndarray] = {"index": order}
    if ranked:
        cols["rank"] = np.arange(1, len(order) + 1)
    for k, v in scored.probs.items():
        cols[k] = v[order]
    cols["score"] = scored.score[order]
    cols["log_score"] = scored.log_score[order]
    head = orjson.dumps(
        {
            **header,
            "fusion": scored.fusion.model_dump(mode="json"),
            "n_candidates": len(scored.score),
        }
    )
    counts = orjson.dumps(
        {"missing": scored.n_missing, "oov": scored.n_oov, "out_of_range": scored.n_out_of_range}
    )
    candidates = (
        orjson.dumps(cols, option=orjson.OPT_SERIALIZE_NUMPY) if columnar else json_rows(cols)
    )
    body = b"".join((head[:-1], b',"candidates":', candidates, b',"counts":', counts, b"}"))
    timing = ", ".join(f"{k};dur={v:.3f}" for k, v in scored.timings_ms.items())
    return Reply(200, body, [(b"server-timing", timing.encode())])


def json_rows(cols: dict[str, np.ndarray]) -> bytes:
    """A JSON array with one object per row of equal-length 1-D numeric columns (keys in
    ``cols`` order; a non-finite float is null; floats round-trip exact).

    Each column is serialised once by orjson, all values split at once, and interleaved with
    the keys by slice assignment (C loops, no Python per row)."""
    n, k = len(next(iter(cols.values()))), len(cols)
    if n == 0:
        return b"[]"
    keys = [f',"{name}":'.encode() for name in cols]
    keys[0] = b"},{" + keys[0][1:]  # each row after the first closes the one before
    parts = [b""] * (2 * k * n)  # key, value, key, value, … row after row
    parts[0::2] = keys * n
    for j, v in enumerate(cols.values()):
        text = orjson.dumps(np.ascontiguousarray(v), option=orjson.OPT_SERIALIZE_NUMPY)
        parts[2 * j + 1 :: 2 * k] = text[1:-1].split(b",")
    parts[0] = b"{" + keys[0][3:]
    return b"[" + b"".join(parts) + b"}]"
