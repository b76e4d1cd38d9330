"""The HTTP ranking service (FastAPI): ``POST /rank``, ``POST /score``, ``GET /health``,
``GET /metadata``; OpenAPI docs at ``/docs``.

Build it with :func:`create_app` (tests use ``fastapi.testclient.TestClient`` on it; ``mtrank
serve`` runs it under uvicorn). See ``docs/serving.md`` for the request and response shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

import mtrank
from mtrank.serve.fusion import FusionSpec
from mtrank.serve.service import MAX_CANDIDATES, RankingService, RequestError, Scored


class ScoreRequest(BaseModel):
    """Body of ``POST /rank`` and ``POST /score``."""

    model_config = ConfigDict(extra="forbid")

    context: dict[str, Any] = Field(default_factory=dict, description="column → value shared by every candidate (e.g. user features); a candidate's non-null value overrides it")
    candidates: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_CANDIDATES, description=f"1 to {MAX_CANDIDATES} candidates, each a dict of column → value (item features, price)")
    fusion: FusionSpec | None = Field(None, description="score fusion for this request (default: the server's --fusion, else score = p_ctcvr)")


class RankRequest(ScoreRequest):
    """Body of ``POST /rank``: a :class:`ScoreRequest` plus an optional cut-off."""

    top_k: int | None = Field(None, ge=1, description="return only the best k candidates (all by default)")


class ScoredCandidate(BaseModel):
    """One candidate's scores. Probabilities in [0, 1]; ``score`` = fused score
    (``log_score`` its natural log); null only if not finite."""

    index: int = Field(description="position of the candidate in the request (0-based)")
    p_ctr: float | None
    p_cvr: float | None
    p_ctcvr: float | None
    score: float | None
    log_score: float | None


class RankedCandidate(ScoredCandidate):
    """A candidate of ``/rank`` with its rank (1 = first)."""
    rank: int = Field(description="1 = best")


class FeatureCounts(BaseModel):
    """How many feature values were missing or unseen (out of vocabulary) in a request."""
    missing: dict[str, int] = Field(description="per feature column: null values (encoded as missing / mean-imputed)")
    oov: dict[str, int] = Field(description="per categorical column: values unseen in training, scored with the OOV index")


class ScoreResponse(BaseModel):
    """The response of ``/score``: the candidates' probabilities and fused scores, in request
    order."""
    model: str
    bundle_sha256: str
    score_source: str = Field(description="'fusion': score = the fusion of the model's pCTR/pCVR/pCTCVR; 'ranker': the model's own ranking score (LTR), and p_ctr, p_cvr, p_ctcvr, log_score are null")
    fusion: FusionSpec
    n_candidates: int
    candidates: list[ScoredCandidate]
    counts: FeatureCounts


class RankResponse(ScoreResponse):
    """The response of ``/rank``: the candidates sorted by fused score, best first."""
    candidates: list[RankedCandidate]  # type: ignore[assignment]


def create_app(bundle_path: str | Path, fusion: FusionSpec | str | Path | None = None, *, engine: str = "onnx", threads: int = 1) -> FastAPI:
    """Build the service for one bundle.

    Args:
        bundle_path: bundle directory. fusion: default fusion (spec, JSON path, or None for
            ``ctcvr``). engine: ``onnx`` (default) or ``torch``. threads: engine threads.

    Raises:
        BundleError, ConfigError: see :class:`RankingService`.
    """
    service = RankingService(bundle_path, fusion, engine=engine, threads=threads)
    app = FastAPI(
        title="mtrank ranking service",
        version=mtrank.__version__,
        description=f"Ranks candidates by a fusion of ESMM's pCTR, pCVR and pCTCVR. Model {service.bundle.model_config.name!r}, schema {service.bundle.schema.name!r}.",
    )
    app.state.service = service
    header = {"model": service.bundle.model_config.name, "bundle_sha256": service.digest, "score_source": service.score_source}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return _unprocessable(errors)

    @app.exception_handler(RequestError)
    async def _bad_features(request: Request, exc: RequestError) -> JSONResponse:
        return _unprocessable([{**e, "loc": ["body", *e["loc"]]} for e in exc.errors])

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the bundle is loaded and the engine ready."""
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        """Model name, schema, feature names, bundle sha256, engine and default fusion."""
        b = service.bundle
        return {
            **header,
            "bundle": str(service.bundle_path),
            "schema": b.schema.model_dump(mode="json"),
            "features": {"categorical": service.categorical, "numerical": service.numerical, "price": service.price},
            "model_config": b.model_config.model_dump(mode="json"),
            "engine": service.engine,
            "fusion": service.fusion.model_dump(mode="json"),
            "max_candidates": MAX_CANDIDATES,
            "trained": {k: b.meta[k] for k in ("dataset", "best_epoch", "rows") if k in b.meta},
            "mtrank_version": mtrank.__version__,
        }

    @app.post("/rank", response_model=RankResponse)
    async def rank(req: RankRequest) -> Response:
        """Score the candidates and return them best first (ties by request index)."""
        scored = service.score(req.context, req.candidates, req.fusion)
        order = scored.order()
        if req.top_k is not None:
            order = order[: req.top_k]
        return _respond(header, scored, order, ranked=True)

    @app.post("/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> Response:
        """Score the candidates, in request order (no ranking)."""
        scored = service.score(req.context, req.candidates, req.fusion)
        return _respond(header, scored, np.arange(len(scored.score)), ranked=False)

    return app


def _unprocessable(errors: list[dict]) -> JSONResponse:
    """422 with a one-line ``message`` naming the fields, and at most 100 structured errors."""
    message = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors[:5])
    if len(errors) > 5:
        message += f" (and {len(errors) - 5} more)"
    return JSONResponse(status_code=422, content={"message": message, "n_errors": len(errors), "detail": errors[:100]})


def _respond(header: dict, scored: Scored, order: np.ndarray, *, ranked: bool) -> Response:
    """Serialise without a per-candidate Python loop: the candidate array is written by polars
    (non-finite floats become null; floats are printed round-trip exact)."""
    cols: dict[str, np.ndarray] = {"index": order}
    if ranked:
        cols["rank"] = np.arange(1, len(order) + 1)
    for k, v in scored.probs.items():
        cols[k] = v[order]
    cols["score"] = scored.score[order]
    cols["log_score"] = scored.log_score[order]
    table = pl.DataFrame(cols).with_columns(pl.col(pl.Float64).fill_nan(None)).write_json()
    head = json.dumps({**header, "fusion": scored.fusion.model_dump(mode="json"), "n_candidates": len(scored.score)})
    counts = json.dumps({"missing": scored.n_missing, "oov": scored.n_oov})
    body = f'{head[:-1]}, "candidates": {table}, "counts": {counts}}}'
    timing = ", ".join(f"{k};dur={v:.3f}" for k, v in scored.timings_ms.items())
    return Response(body, media_type="application/json", headers={"server-timing": timing})
