"""The ranking service's core, independent of the web framework: validate a request's features,
encode them with the bundle's own encoders, run the model, fuse, rank.

Request semantics (shared by ``POST /rank`` and ``POST /score``):

* ``context``: column → value shared by every candidate (typically the user's features);
* ``candidates``: 1 to :data:`MAX_CANDIDATES` dicts of column → value (item features, price).
  A candidate's non-null value overrides the context; a null (or absent) one takes the
  context's value. Keys that are not features are ignored.
* Every feature column of the bundle's schema must be given, in the context or in every
  candidate; its value may be null (a missing value, encoded like a missing value in training:
  categorical index 0, numerical mean imputation). Categorical values are strings or integers
  (an integral float such as ``3.0`` is read as ``3``, a boolean as 0/1); numerical values are
  finite numbers. The price column (schema ``price``), when declared, is required, finite and
  ≥ 0 for every candidate (see :mod:`mtrank.serve.fusion` for the price policy).
* Unseen categorical values are scored with the OOV index (1) and counted, never an error.

A bundle whose scorer has its own ranking ``score`` and no probabilities (a LambdaMART LTR
ranker, :mod:`mtrank.models.ltr`) is served by that score: ``p_ctr``, ``p_cvr``, ``p_ctcvr``
and ``log_score`` are null (never invented), ``score_source`` is ``"ranker"`` (``"fusion"``
otherwise), and a request that asks for a fusion is rejected (422): there is nothing to fuse.

Scoring is vectorised: the candidate list becomes one polars DataFrame, encoded by
:meth:`Bundle.encode` (the training encoders themselves), scored in one batch, fused by the
ranking module's formulas (:mod:`mtrank.ranking.fusion`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, Required

import numpy as np
import polars as pl
import torch
from pydantic import AllowInfNan, Field, Strict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from mtrank.errors import BundleError, ConfigError, DataError
from mtrank.bundle import Bundle
from mtrank.ranking.replay import rank_order
from mtrank.serve.fusion import FusionSpec, fused_scores

MAX_CANDIDATES = 2000
ENGINES = ("onnx", "torch")
PROBS = ("p_ctr", "p_cvr", "p_ctcvr")

# ids are int64 in every table mtrank reads; a larger integer is a mistyped id (422)
CategoricalValue = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | str | None
NumericalValue = Annotated[float, Strict(), AllowInfNan(False)] | None
PriceValue = Annotated[float, Strict(), AllowInfNan(False), Field(ge=0.0)]


class RequestError(Exception):
    """Invalid request features. ``errors`` are pydantic-style dicts (``loc``, ``msg``,
    ``type``) whose ``loc`` starts with ``"context"`` or ``"candidates"``."""

    def __init__(self, errors: list[dict]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


@dataclass
class Scored:
    """Scores of N candidates, in request order.

    Attributes:
        probs: float64 ``[N]`` per name (``p_ctr``, ``p_cvr``, ``p_ctcvr``).
        score, log_score: float64 ``[N]`` fused score and its log (NaN when not finite).
        rank_key: float64 ``[N]`` what :meth:`order` ranks by (``log_score``, or ``score`` for a
            fusion that is not computed in log space).
        n_missing: per feature column, missing values (after the context fill).
        n_oov: per categorical column, values unseen in training (scored with index 1).
        timings_ms: wall time per stage (validate, encode, infer, fuse).
    """

    probs: dict[str, np.ndarray]
    score: np.ndarray
    log_score: np.ndarray
    rank_key: np.ndarray
    n_missing: dict[str, int]
    n_oov: dict[str, int]
    fusion: FusionSpec
    timings_ms: dict[str, float] = field(default_factory=dict)

    def order(self) -> np.ndarray:
        """Candidate indices best first (see :func:`mtrank.ranking.replay.rank_order`)."""
        return rank_order(self.rank_key)


class RankingService:
    """Loads a bundle once and scores candidate lists.

    Args:
        bundle_path: bundle directory (see :class:`Bundle`).
        fusion: default :class:`FusionSpec`, or a path to its JSON, or None (``ctcvr``).
        engine: ``"onnx"`` (onnxruntime, the default: about 2-3× faster than PyTorch on one
            CPU thread for this MLP) or ``"torch"`` (no_grad, eval mode; bit-identical to
            ``mtrank predict``).
        threads: intra-op threads of the engine (1 suits one worker per core; 0 = library default).

    Raises:
        BundleError: bad bundle, or not a funnel model (the service returns pCTR, pCVR, pCTCVR).
        ConfigError: bad fusion file, unknown engine, or a fusion needing a price the schema
            lacks.
    """

    def __init__(self, bundle_path: str | Path, fusion: FusionSpec | str | Path | None = None, *, engine: str = "onnx", threads: int = 1) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
        self.bundle_path = Path(bundle_path)
        bundle = Bundle.load(bundle_path)
        if not bundle.spec.funnel:
            raise BundleError(f"bundle {bundle_path}: the ranking service needs a funnel model (click → conversion); this one predicts {bundle.spec.task_names}")
        self.bundle = bundle
        self.digest = Bundle.digest(bundle_path)
        # a ranker with its own score (LTR) is served by that score: nothing to fuse
        self.own_score = "score" in bundle.scorer.outputs
        self.score_source = "ranker" if self.own_score else "fusion"
        if self.own_score and fusion is not None:
            raise ConfigError(f"model {bundle.model_config.name!r} ranks by its own score and has no pCTR/pCVR: a fusion does not apply; drop --fusion")
        if not isinstance(fusion, FusionSpec):
            fusion = FusionSpec() if fusion is None else FusionSpec.from_file(fusion)
        self.fusion = fusion
        self.check_fusion(self.fusion)
        schema = self.bundle.schema
        self.categorical: list[str] = list(schema.categorical)
        self.numerical: list[str] = list(schema.numerical)
        self.price: str | None = schema.price
        self.features: list[str] = list(dict.fromkeys([*self.categorical, *self.numerical, *([self.price] if self.price else [])]))
        self._feature_set = frozenset(self.features)
        self.engine = engine
        self.threads = threads
        self._infer = self._make_engine(engine, threads)  # may set self.engine = "native"
        self._context_adapter = TypeAdapter(self._typed_dict("Context", required=frozenset()))
        # columns validate_frame requires that are not features (ids, time): added as nulls
        self._filler = [c for c in schema.required_columns() if c not in schema.label_columns and c not in self.features]

    # -- setup ---------------------------------------------------------------------------------
    def check_fusion(self, spec: FusionSpec) -> None:
        """Raises ConfigError when ``spec`` needs a price and the schema declares none."""
        if spec.needs_price and self.bundle.schema.price is None:
            raise ConfigError(f"fusion {spec.formula!r} {spec.params} needs a price, but schema {self.bundle.schema.name!r} declares no price column")

    def _make_engine(self, engine: str, threads: int):
        if self.own_score:  # not a neural network: the model's own scorer (e.g. LightGBM)
            self.engine = "native"
            return self.bundle.scorer
        if engine == "torch":
            if threads > 0:
                torch.set_num_threads(threads)
            model = self.bundle.model.eval()

            def run(cat: np.ndarray, num: np.ndarray) -> dict[str, np.ndarray]:
                with torch.inference_mode():
                    out = model(torch.from_numpy(cat), torch.from_numpy(num))
                return {k: out[k].numpy() for k in PROBS}

            return run
        from mtrank.serve.onnx_export import OnnxScorer, to_onnx_bytes, verify_onnx

        onnx_bytes = to_onnx_bytes(self.bundle)
        verify_onnx(self.bundle, onnx_bytes, batches=(1, 7), atol=1e-5)
        return OnnxScorer(onnx_bytes, threads=threads)

    def _value_type(self, column: str):
        if column == self.price:
            return PriceValue
        return CategoricalValue if column in self.categorical else NumericalValue

    def _typed_dict(self, name: str, required: frozenset[str]) -> type:
        fields = {c: (Required if c in required else NotRequired)[self._value_type(c)] for c in self.features}
        return TypedDict(name, fields)  # type: ignore[operator]

    @lru_cache(maxsize=64)  # noqa: B019 - one service per process; keyed by the context's columns
    def _candidates_adapter(self, given: frozenset[str]) -> TypeAdapter:
        required = frozenset(c for c in self.features if c not in given)
        return TypeAdapter(list[self._typed_dict("Candidate", required)])

    # -- request → frame ----------------------------------------------------------------------
    def frame(self, context: dict[str, Any], candidates: list[dict[str, Any]]) -> pl.DataFrame:
        """Validate the features and build one row per candidate (context filled in).

        Raises:
            RequestError: a feature is absent from both the context and a candidate, mistyped,
                non-finite, or a price is negative/null; an empty or over-long list.
        """
        if not candidates:
            raise RequestError([{"loc": ["candidates"], "msg": "give at least one candidate", "type": "too_short"}])
        if len(candidates) > MAX_CANDIDATES:
            raise RequestError([{"loc": ["candidates"], "msg": f"at most {MAX_CANDIDATES} candidates per request, got {len(candidates)}", "type": "too_long"}])
        errors: list[dict] = []
        try:
            ctx = self._context_adapter.validate_python(context)
        except ValidationError as exc:
            errors += _errors(exc, "context", self.categorical)
            ctx = {}
        try:
            rows = self._candidates_adapter(frozenset(c for c in context if c in self._feature_set)).validate_python(candidates)
        except ValidationError as exc:
            errors += _errors(exc, "candidates", self.categorical)
            rows = []
        if errors:
            raise RequestError(errors)
        # Categorical columns: Int64 when every value is an integer, else String (integers
        # written as "3"): canonical_ids maps both to the same strings, and the Int64 path avoids
        # string cleaning. Numerical columns: Float64.
        numeric = {c: pl.Float64 for c in self.features if c not in self.categorical}
        df = pl.from_dicts(rows, schema_overrides=numeric, infer_schema_length=None, strict=False)
        cols = []
        for col in self.features:
            dtype = df.schema.get(col, pl.Null)
            value = ctx.get(col)
            if col in numeric:
                expr = pl.col(col) if col in df.columns else pl.lit(None, dtype=pl.Float64).alias(col)
                if value is not None:
                    expr = expr.fill_null(float(value))
            elif value is not None and isinstance(value, int) and dtype in (pl.Int64, pl.Null):
                expr = (pl.col(col) if col in df.columns else pl.lit(None)).cast(pl.Int64).fill_null(value).alias(col)
            elif value is not None:
                expr = (pl.col(col) if col in df.columns else pl.lit(None)).cast(pl.String).fill_null(str(value)).alias(col)
            elif dtype == pl.Null:
                expr = (pl.col(col) if col in df.columns else pl.lit(None)).cast(pl.String).alias(col)
            else:
                continue
            cols.append(expr)
        cols += [pl.lit(None).alias(c) for c in self._filler]
        return df.with_columns(cols) if cols else df

    # -- scoring ------------------------------------------------------------------------------
    def score(self, context: dict[str, Any], candidates: list[dict[str, Any]], fusion: FusionSpec | None = None) -> Scored:
        """Score candidates (request order). See :meth:`frame` for the validation.

        Raises:
            RequestError: invalid features, or a fusion that needs a price the schema lacks.
        """
        t0 = time.perf_counter()
        spec = fusion or self.fusion
        if fusion is not None and self.own_score:
            raise RequestError([{"loc": ["fusion"], "msg": f"model {self.bundle.model_config.name!r} ranks by its own score and has no pCTR/pCVR: a fusion does not apply", "type": "value_error"}])
        if fusion is not None:
            try:
                self.check_fusion(fusion)
            except ConfigError as exc:
                raise RequestError([{"loc": ["fusion"], "msg": str(exc), "type": "value_error"}]) from None
        df = self.frame(context, candidates)
        t1 = time.perf_counter()
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                data = self.bundle.encode(df, "request")
        except DataError as exc:  # validated above; a defensive net so a bad value is never a 500
            raise RequestError([{"loc": ["candidates", exc.column or ""], "msg": str(exc), "type": "value_error"}]) from None
        num = data.numerical.numpy()
        finite = np.isfinite(num).all(axis=0)
        if not finite.all():  # e.g. 1e308: finite as float64, overflows once standardised in float32
            bad = [c for c, ok in zip(self.bundle.encoder.numerical, finite, strict=True) if not ok]
            raise RequestError([{"loc": ["candidates", e.column], "msg": f"value too large: its standardised value (x - {e.mean:.4g}) / {e.std:.4g} overflows float32", "type": "value_error"} for e in bad])
        t2 = time.perf_counter()
        raw = self._infer(data.categorical.numpy(), num)
        t3 = time.perf_counter()
        if self.own_score:
            score = raw["score"].astype(np.float64)
            probs = {k: np.full(score.size, np.nan) for k in PROBS}
            log_score, key = np.full(score.size, np.nan), score
        else:
            probs = {k: raw[k].astype(np.float64) for k in PROBS}
            price = df.get_column(self.price).to_numpy() if self.price else None
            score, log_score, key = fused_scores(spec.fusion, probs["p_ctr"], probs["p_cvr"], probs["p_ctcvr"], price)
        t4 = time.perf_counter()
        timings = {"validate": t1 - t0, "encode": t2 - t1, "infer": t3 - t2, "fuse": t4 - t3}
        n_missing = {c: data.n_missing.get(c, 0) for c in self.features if c in data.n_missing}
        n_oov = {c: data.n_oov.get(c, 0) for c in self.categorical}
        return Scored(probs, score, log_score, key, n_missing, n_oov, spec, {k: v * 1e3 for k, v in timings.items()})


def _errors(exc: ValidationError, where: Literal["context", "candidates"], categorical: list[str]) -> list[dict]:
    """pydantic errors as JSON-safe dicts (no ``input``: it may be NaN), one per field, with
    the union branch tags (``int`` / ``str``) folded into one readable message."""
    out: dict[tuple, dict] = {}
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = list(e["loc"])
        if len(loc) >= 2 and loc[-1] in ("int", "constrained-int", "str") and str(loc[-2]) in categorical:
            loc = loc[:-1]
            msg = "a categorical value must be a string, a 64-bit integer or null"
        elif e["type"] == "missing" and where == "candidates":
            msg = "Field required: give this feature in `context` or in every candidate (null for a missing value)"
        else:
            msg = e["msg"]
        key = (where, *loc)
        if key not in out:
            out[key] = {"loc": [where, *loc], "msg": msg, "type": e["type"]}
    return list(out.values())
