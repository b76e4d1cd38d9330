"""The ranking service's core, independent of the web framework: validate a request, encode its
features with the bundle's own encoders, run the model, fuse, rank.

Request semantics (shared by ``POST /rank`` and ``POST /score``; the OpenAPI schema that
:mod:`mtrank.serve.openapi` builds from the bundle's schema states the same rules):

* ``context``: column → value shared by every candidate (typically the user's features);
* ``candidates``: 1 to :data:`MAX_CANDIDATES` objects of column → value (item features, price).
  A candidate's non-null value overrides the context; a null (or absent) one takes the
  context's value. Keys that are not features are ignored.
* Every feature column of the bundle's schema must be given, in the context or in every
  candidate; its value may be null (a missing value, encoded like a missing value in training:
  categorical index 0, numerical mean imputation).
* Types are strict (no coercion): a categorical value is a JSON string of at most
  :data:`MAX_ID_CHARS` characters, an integer in the int64 range (``3.0`` is the integer 3, as
  in JSON Schema; ``2.5``, ``true`` and ``"3"`` are not integers), or null; a numerical value
  is a finite JSON number (not a boolean) whose magnitude keeps its standardised value
  ``(x - mean) / std`` within ±1e30 (the bound per column is in the OpenAPI schema), or null.
* The price column (schema ``price``), when declared, must end up a finite number ≥ 0 for every
  candidate: a candidate's null or absent price takes the context's (see
  :mod:`mtrank.serve.fusion` for the price policy).
* Unseen categorical values are scored with the OOV index (1) and counted, never an error.

A bundle whose scorer has its own ranking ``score`` and no probabilities (a LambdaMART LTR
ranker, :mod:`mtrank.models.ltr`) is served by that score: ``p_ctr``, ``p_cvr``, ``p_ctcvr``
and ``log_score`` are null (never invented), ``score_source`` is ``"ranker"`` (``"fusion"``
otherwise), and a request that asks for a fusion is rejected (422): there is nothing to fuse.

Validation and encoding are columnar: each feature's values are gathered once per column, their
types checked as a set, and the column built as one polars Series and encoded by the training
encoders (:meth:`FeatureEncoder.transform`); no per-candidate model object is created. The
whole batch is scored at once and fused by the ranking module's formulas
(:mod:`mtrank.ranking.fusion`).
"""

from __future__ import annotations

import difflib
import operator
import time
from dataclasses import dataclass, field
from collections import Counter
from itertools import islice, repeat
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from pydantic import ValidationError

from mtrank.bundle import Bundle
from mtrank.data.encoders import EncodedFeatures, IntIds
from mtrank.errors import BundleError, ConfigError
from mtrank.ranking.fusion import FORMULAS
from mtrank.ranking.replay import rank_order
from mtrank.serve.fusion import FusionSpec, build_fusion, fused_scores
from mtrank.serve.errors import Errors, RequestError, echo, echo_text, is_utf8, json_type
from mtrank.serve.errors import error as _error
from mtrank.serve.lists import list_columns

MAX_CANDIDATES = 2000
HINT_KEYS = 64  # unknown keys per object compared with a missing feature's name
MAX_ID_CHARS = 1024  # a longer categorical string is a 422: ids are short; memory stays bounded
MAX_STANDARDISED = 1e30  # |(x - mean) / std| allowed for a numerical value (float32 holds 3.4e38)
ENGINES = ("onnx", "torch")
PROBS = ("p_ctr", "p_cvr", "p_ctcvr")
INT64 = (-(2**63), 2**63 - 1)
_ABSENT = object()
_CATEGORICAL_MSG = (
    "a categorical value must be a string, a 64-bit integer or null (a "
    f"string of at most {MAX_ID_CHARS} characters)"
)
_TOP_LEVEL = {"context", "candidates", "fusion"}
_FUSION_KEYS = ("formula", "params")
_PRICE_REQUIRED = "Field required: a price (a number ≥ 0) in the candidate or in `context`"


@dataclass
class Scored:
    """Scores of N candidates, in request order.

    Attributes:
        probs: float64 ``[N]`` per name (``p_ctr``, ``p_cvr``, ``p_ctcvr``).
        score, log_score: float64 ``[N]`` fused score and its log (NaN when not finite).
        rank_key: float64 ``[N]`` what :meth:`order` ranks by (``log_score``, or ``score`` for a
            fusion that is not computed in log space; NaN where the score is not finite).
        n_missing: per feature column, missing values (after the context fill).
        n_oov: per categorical column, values unseen in training (scored with index 1).
        timings_ms: wall time per stage (validate, encode, infer, fuse).
        n_out_of_range: per numerical column, values far outside the training range
            (:meth:`mtrank.data.encoders.NumericalEncoder.out_of_range`; scored as sent).
    """

    probs: dict[str, np.ndarray]
    score: np.ndarray
    log_score: np.ndarray
    rank_key: np.ndarray
    n_missing: dict[str, int]
    n_oov: dict[str, int]
    fusion: FusionSpec
    timings_ms: dict[str, float] = field(default_factory=dict)
    n_out_of_range: dict[str, int] = field(default_factory=dict)

    def order(self) -> np.ndarray:
        """Candidate indices best first (see :func:`mtrank.ranking.replay.rank_order`)."""
        return rank_order(self.rank_key)


@dataclass
class ParsedRequest:
    """A request body after top-level validation (features are checked by
    :meth:`RankingService.frame`). ``candidates``: one object per candidate (the row form), or
    one array per feature column, all of one length (the columnar form)."""

    context: dict[str, Any]
    candidates: list[dict[str, Any]] | dict[str, list]
    fusion: FusionSpec | None
    top_k: int | None

    @property
    def columnar(self) -> bool:
        """Whether the candidates came in the columnar form (the response then does too)."""
        return type(self.candidates) is dict


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

    def __init__(
        self,
        bundle_path: str | Path,
        fusion: FusionSpec | str | Path | None = None,
        *,
        engine: str = "onnx",
        threads: int = 1,
    ) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
        self.bundle_path = Path(bundle_path)
        bundle = Bundle.load(bundle_path)
        if not (bundle.spec.funnel or bundle.spec.stages):
            raise BundleError(
                f"bundle {bundle_path}: the ranking service needs a funnel model (click → "
                f"conversion, or a staged funnel); this one predicts {bundle.spec.task_names}"
            )
        self.bundle = bundle
        # every probability the model outputs is served (the stages' too); a one-stage
        # (CTR-only) model has no pCVR / pCTCVR: they are null, and so is any fusion needing them
        self.probs: tuple[str, ...] = tuple(dict.fromkeys([*PROBS, *bundle.scorer.outputs]))
        self.ctr_only = "p_cvr" not in bundle.scorer.outputs and "score" not in self.probs
        self.digest = Bundle.digest(bundle_path)
        # a ranker with its own score (LTR) is served by that score: nothing to fuse
        self.own_score = "score" in bundle.scorer.outputs
        self.score_source = "ranker" if self.own_score else "fusion"
        if self.own_score and fusion is not None:
            raise ConfigError(
                f"model {bundle.model_config.name!r} ranks by its own score and has no "
                "pCTR/pCVR: a fusion does not apply; drop --fusion"
            )
        if not isinstance(fusion, FusionSpec):
            default = (
                FusionSpec(formula="single", params={"which": "ctr"}) if self.ctr_only else None
            )
            fusion = (default or FusionSpec()) if fusion is None else FusionSpec.from_file(fusion)
        self.fusion = fusion
        self.check_fusion(self.fusion)
        schema = self.bundle.schema
        self.categorical: list[str] = list(schema.categorical)
        self.numerical: list[str] = list(schema.numerical)
        self.price: str | None = schema.price
        self.features: list[str] = list(
            dict.fromkeys(
                [*self.categorical, *self.numerical, *([self.price] if self.price else [])]
            )
        )
        self.list_features = [*schema.lists, *schema.sequences]  # see mtrank.serve.lists
        self._categorical_set = set(self.categorical)
        self._getters = {c: operator.itemgetter(c) for c in self.features}
        self._known_columns = {*self.features, *(f.column for f in self.list_features)}
        self.engine = engine
        self.threads = threads
        self._infer = self._make_engine(engine, threads)  # may set self.engine = "native"
        self.bounds = self._numerical_bounds()

    # -- setup ---------------------------------------------------------------------------------
    def check_fusion(self, spec: FusionSpec) -> None:
        """Raises ConfigError when ``spec`` needs a price and the schema declares none, or
        pCVR and the model is CTR-only."""
        if self.ctr_only and spec.fusion.uses_cvr:
            raise ConfigError(
                f"fusion {spec.formula!r} {spec.params} needs pCVR, but the model is CTR-only "
                "(a one-stage funnel); use single (which=ctr), or multiplicative / "
                "offset_multiplicative with beta=0, or linear with w2=0"
            )
        if spec.needs_price and self.bundle.schema.price is None:
            raise ConfigError(
                f"fusion {spec.formula!r} {spec.params} needs a price, but schema "
                f"{self.bundle.schema.name!r} declares no price column"
            )

    def _numerical_bounds(self) -> dict[str, float]:
        """Largest |x| accepted per numerical column (and the price): standardised by the
        training mean and std, such a value stays within ±:data:`MAX_STANDARDISED`."""
        out = {}
        for e in self.bundle.encoder.numerical:
            out[e.column] = float(min(1e300, max(1.0, MAX_STANDARDISED * e.std - abs(e.mean))))
        if self.price and self.price not in out:
            out[self.price] = 1e300
        return out

    def _make_engine(self, engine: str, threads: int):
        if self.own_score:  # not a neural network: the model's own scorer (e.g. LightGBM)
            self.engine = "native"
            return self.bundle.scorer
        if engine == "torch":
            if threads > 0:
                torch.set_num_threads(threads)
            model = self.bundle.model.eval()

            def run(cat: np.ndarray, num: np.ndarray, *extra: np.ndarray) -> dict[str, np.ndarray]:
                with torch.inference_mode():
                    out = model(
                        torch.from_numpy(cat),
                        torch.from_numpy(num),
                        *(torch.from_numpy(t) for t in extra),
                    )
                return {k: out[k].numpy() for k in self.bundle.scorer.outputs}

            return run
        from mtrank.serve.onnx_export import OnnxScorer, to_onnx_bytes, verify_onnx

        onnx_bytes = to_onnx_bytes(self.bundle)
        verify_onnx(self.bundle, onnx_bytes, batches=(1, 7), atol=1e-5)
        return OnnxScorer(onnx_bytes, threads=threads)

    # -- request body → parts -----------------------------------------------------------------
    def parse(self, doc: Any, *, ranked: bool) -> ParsedRequest:
        """Top-level validation of a decoded JSON body: an object with ``candidates`` (1 to
        :data:`MAX_CANDIDATES` objects), optional ``context`` (object or null), ``fusion``
        (object or null) and, for ``/rank``, ``top_k`` (integer ≥ 1 or null). Strict types.

        Raises:
            RequestError: any of the above violated, or an unknown top-level key.
        """
        if type(doc) is not dict:
            raise RequestError(
                [_error([], f"the body must be a JSON object, got {json_type(doc)}", "model_type")]
            )
        allowed = _TOP_LEVEL | ({"top_k"} if ranked else set())
        errors = Errors()
        errors.first(
            (k for k in doc if k not in allowed),
            lambda k: _error([k], "Extra inputs are not permitted", "extra_forbidden"),
        )
        context = doc.get("context")
        if context is None:
            context = {}
        elif type(context) is not dict:
            errors.append(
                _error(["context"], f"must be an object, got {json_type(context)}", "dict_type")
            )
        candidates = doc.get("candidates", _ABSENT)
        if candidates is _ABSENT:
            errors.append(_error(["candidates"], "Field required", "missing"))
        elif type(candidates) is dict:
            errors.absorb(self._check_columnar(candidates))
        elif type(candidates) is not list:
            errors.append(
                _error(
                    ["candidates"],
                    "must be an array (one object per candidate) or an object (one array per "
                    f"feature), got {json_type(candidates)}",
                    "list_type",
                )
            )
        elif not candidates:
            errors.append(_error(["candidates"], "give at least 1 item (a candidate)", "too_short"))
        elif len(candidates) > MAX_CANDIDATES:
            errors.append(
                _error(
                    ["candidates"],
                    f"give at most {MAX_CANDIDATES} items (candidates), got {len(candidates)}",
                    "too_long",
                )
            )
        elif set(map(type, candidates)) != {dict}:
            errors.first(
                (i for i, c in enumerate(candidates) if type(c) is not dict),
                lambda i: _error(
                    ["candidates", i],
                    f"a candidate must be an object, got {json_type(candidates[i])}",
                    "dict_type",
                ),
            )
        top_k = doc.get("top_k")
        if type(top_k) is float and top_k.is_integer():  # JSON Schema: 3.0 is the integer 3
            top_k = int(top_k)
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            errors.append(_error(["top_k"], "must be an integer ≥ 1 (or null)", "int_type"))
        fusion = None
        if doc.get("fusion") is not None:
            try:
                fusion = self.validate_fusion(doc["fusion"])
            except RequestError as exc:
                errors.absorb(exc.errors)
        if errors:
            raise RequestError(errors)
        return ParsedRequest(context, candidates, fusion, top_k)

    def _check_columnar(self, columns: dict) -> Errors:
        """Errors of a columnar ``candidates`` (feature column → array): only the model's
        feature columns, at least one, each an array, all of one length from 1 to
        :data:`MAX_CANDIDATES`. The values are checked later, as in the row form."""
        known = self._known_columns
        errors = Errors()
        errors.first(
            (k for k in columns if k not in known),
            lambda k: _error(
                ["candidates", k],
                "not a feature of this model (the columnar form takes only feature columns)"
                + self._misspelt_feature(k),
                "extra_forbidden",
            ),
        )
        arrays = {k: v for k, v in columns.items() if k in known}
        for k, v in arrays.items():
            if type(v) is not list:
                errors.append(
                    _error(
                        ["candidates", k],
                        f"must be an array (one value per candidate), got {json_type(v)}",
                        "list_type",
                    )
                )
        if not arrays:
            errors.append(
                _error(
                    ["candidates"],
                    "give at least 1 feature column (an array with one value per candidate)",
                    "too_short",
                )
            )
        arrays = {k: v for k, v in arrays.items() if type(v) is list}
        if not arrays:
            return errors
        lengths = Counter(map(len, arrays.values()))
        n = lengths.most_common(1)[0][0]  # the others are named
        first = next(k for k, v in arrays.items() if len(v) == n)
        mismatched = [
            _error(
                ["candidates", k],
                f"has {len(v)} value{'s' * (len(v) != 1)}, {first!r}"
                + (f" and {lengths[n] - 1} other columns have" if lengths[n] > 1 else " has")
                + f" {n}: give one value per candidate in every column",
                "length_mismatch",
            )
            for k, v in arrays.items()
            if len(v) != n
        ]
        errors.extend(mismatched)
        if not mismatched and n == 0:
            errors.append(_error(["candidates", first], "give at least 1 value", "too_short"))
        elif not mismatched and n > MAX_CANDIDATES:
            errors.append(
                _error(
                    ["candidates", first],
                    f"give at most {MAX_CANDIDATES} values (candidates), got {n}",
                    "too_long",
                )
            )
        return errors

    def _misspelt_feature(self, key: Any) -> str:
        """A hint naming the feature that ``key`` looks like (another case, a typo)."""
        close = _resembles(key, sorted(self._known_columns))
        return f": did you mean '{close}'?" if close else ""

    def validate_fusion(self, value: Any) -> FusionSpec:
        """A request's ``fusion`` object as a :class:`FusionSpec`. Raises RequestError."""
        if type(value) is not dict:
            raise RequestError(
                [_error(["fusion"], f"must be an object, got {json_type(value)}", "dict_type")]
            )
        errors = Errors()
        # keys other than formula and params are ignored (a `mtrank fuse` file carries `format`
        # and metrics), except a misspelling of either, which would silently take the defaults
        errors.first(
            (
                k
                for k in value
                if k not in _FUSION_KEYS and k != "format" and _resembles(k, _FUSION_KEYS)
            ),
            lambda k: _error(
                ["fusion", k],
                f"not a key of a fusion object: did you mean '{_resembles(k, _FUSION_KEYS)}'?",
                "extra_forbidden",
            ),
        )
        formula, params = value.get("formula", "ctcvr"), value.get("params")
        if type(formula) is str and formula in FORMULAS and type(params) is dict:
            _, problems = build_fusion(formula, params)  # one error per parameter, counted
            errors.first(problems, lambda p: _error(["fusion", "params", p[0]], p[1], p[2]))
        if errors:
            raise RequestError(errors)
        try:
            spec = FusionSpec.model_validate(value, strict=False)
        except ValidationError as exc:
            raise RequestError(
                [
                    _error(
                        ["fusion", *e["loc"]],
                        echo_text(e["msg"]).removeprefix("Value error, "),
                        e["type"],
                    )
                    for e in exc.errors(
                        include_url=False, include_input=False, include_context=False
                    )
                ]
            ) from None
        try:
            self.check_fusion(spec)
        except ConfigError as exc:
            raise RequestError([_error(["fusion"], str(exc))]) from None
        return spec

    # -- features → columns (fast path) ------------------------------------------------------
    def columns(
        self, context: dict[str, Any], candidates: list[dict[str, Any]]
    ) -> dict[str, IntIds | np.ndarray | list] | None:
        """The feature columns of a request that passes every check of :meth:`frame`, gathered
        without polars or per-candidate objects (C-level ``map`` over the candidates, numpy
        checks), in the form :meth:`FeatureEncoder.transform_columns` encodes: categorical
        integer ids (:class:`IntIds`) or a list of string ids (None = missing), numerical
        float64 ``[N]`` (NaN = missing), context filled in (a categorical column that only the
        context gives has length 1).

        Returns None whenever a value needs the exact path: anything :meth:`frame` would reject,
        and the rarer valid forms it handles (ids given as integers and strings in one column,
        integral floats as ids, ids with surrounding whitespace,
        list/sequence features). :meth:`frame` then gives the same encoded result, or the
        errors naming each field (tested against each other in tests/test_serve_fast.py).
        ``candidates`` in the columnar form (checked by :meth:`parse`) needs no gathering.
        """
        if self.list_features:
            return None
        columnar = type(candidates) is dict
        n = _count(candidates)
        out: dict[str, IntIds | np.ndarray | list] = {}
        given = candidates if columnar else set().union(*candidates) if context else ()
        for col in self.features:
            ctx = context.get(col)
            if ctx is not None and col not in given:  # a context feature (the user's)
                column = self._fast_column(col, [ctx], 0)
                if column is None:
                    return None
                # checked once; a categorical one is encoded once (a length-1 column)
                out[col] = np.repeat(column, n) if type(column) is np.ndarray else column
                continue
            if columnar:
                values = candidates.get(col)
                if values is None:  # absent: missing if the context has it as null
                    if col not in context:
                        return None  # frame names it
                    values = [None] * n
            else:
                try:  # itemgetter: a C loop (dict.get by map is 3× slower)
                    values = list(map(self._getters[col], candidates))
                except KeyError:  # absent in some candidate: null, or the context's value
                    values = list(map(dict.get, candidates, repeat(col)))
            n_null = values.count(None)
            if ctx is not None:
                if n_null == n:
                    values = [ctx] * n
                elif n_null:
                    values = [ctx if v is None else v for v in values]
                elif self._fast_column(col, [ctx], 0) is None:
                    return None  # the context's value is checked even when no candidate takes it
                n_null = 0
            elif n_null and col not in context and not columnar:
                if not all(map(operator.contains, candidates, repeat(col))):
                    return None  # absent from a candidate and the context: frame names it
            column = self._fast_column(col, values, n_null)
            if column is None:
                return None
            out[col] = column
        return out

    def _fast_column(
        self, col: str, values: list, n_null: int
    ) -> IntIds | np.ndarray | list | None:
        """One column of :meth:`columns`, or None when it needs the exact path."""
        kinds = set(map(type, values))
        kinds.discard(type(None))
        if col in self._categorical_set:
            if kinds == {int}:
                ids = list(filter(_not_none, values)) if n_null else values
                if min(ids) < INT64[0] or max(ids) > INT64[1]:
                    return None  # beyond int64: frame names it
                return IntIds(values)
            if kinds == {str} or not kinds:
                ids = list(filter(None, values)) if n_null else values
                if (
                    max(map(len, ids), default=0) > MAX_ID_CHARS
                    or list(map(str.strip, ids)) != ids  # frame strips (polars' rule)
                    or not is_utf8("".join(ids))
                ):
                    return None
                return values
            return None
        if not kinds <= {int, float} or (n_null and col == self.price):
            return None
        try:
            x = np.array(values, dtype=np.float64)  # None → NaN
        except (OverflowError, TypeError, ValueError):
            return None
        low = 0.0 if col == self.price else -self.bounds[col]
        inside = (x >= low) & (x <= self.bounds[col])  # False for NaN and ±inf
        if n_null:  # a null is missing (NaN here); a NaN sent as such is not finite
            inside |= np.fromiter(map(operator.is_, values, repeat(None)), bool, len(values))
        return x if inside.all() else None

    # -- features → frame ---------------------------------------------------------------------
    def frame(
        self, context: dict[str, Any], candidates: list[dict[str, Any]], skip: Errors | None = None
    ) -> pl.DataFrame:
        """Validate the features and build one column per feature, one row per candidate
        (context filled in), column by column. ``skip``: errors already found, one per absent
        column (``["candidates", column]``): those columns are not checked again, and the
        errors are raised with the others.

        Raises:
            RequestError: a feature absent from both the context and a candidate, mistyped,
                non-finite, too large, an over-long string, or a price that is negative or
                null in both the candidate and the context.
        """
        errors = Errors(skip or ())
        skipped = {e["loc"][1] for e in errors}
        cols: dict[str, pl.Series] = {}
        n = len(candidates)
        for col in self.features:
            if col in skipped:
                continue
            ctx_given = col in context
            ctx = (
                None
                if context.get(col) is None
                else self._column(col, [context[col]], errors, loc=["context", col])
            )
            if ctx_given:
                values = [c.get(col) for c in candidates]
            else:
                values = [c.get(col, _ABSENT) for c in candidates]
                if _ABSENT in values:
                    errors.first(
                        (i for i, v in enumerate(values) if v is _ABSENT),
                        lambda i: _error(
                            ["candidates", i, col],
                            (
                                _PRICE_REQUIRED
                                if col == self.price
                                else "Field required: give this feature in `context` or in every "
                                "candidate (null for a missing value)"
                            )
                            + self._misspelt(col, context, candidates[i]),
                            "missing",
                        ),
                    )
                    continue
            series = self._column(col, values, errors)
            if series is None:
                continue
            if ctx is not None and series.null_count():
                if series.dtype == pl.Null:
                    series = ctx.new_from_index(0, n).alias(col)
                else:
                    if series.dtype != ctx.dtype:  # ids given as integers and as strings: "3" == 3
                        series, ctx = series.cast(pl.String), ctx.cast(pl.String)
                    series = series.fill_null(ctx[0])
            if ctx is None and context.get(col) is not None:
                pass  # the context's value is refused (one error): its candidates' nulls stay
            elif col == self.price and (series.dtype == pl.Null or series.null_count()):
                nulls = (
                    range(n)
                    if series.dtype == pl.Null
                    else np.flatnonzero(series.is_null().to_numpy()).tolist()
                )
                errors.first(
                    nulls, lambda i: _error(["candidates", i, col], _PRICE_REQUIRED, "missing")
                )
                continue
            cols[col] = series
        if self.list_features:
            cols.update(
                list_columns(
                    [f for f in self.list_features if f.column not in skipped],
                    context,
                    candidates,
                    errors,
                    max_id_chars=MAX_ID_CHARS,
                    int64=INT64,
                )
            )
        if errors:
            raise RequestError(errors)
        return pl.DataFrame(list(cols.values()))

    def frame_any(
        self, context: dict[str, Any], candidates: list[dict[str, Any]] | dict[str, list]
    ) -> pl.DataFrame:
        """:meth:`frame` of candidates in either form. The columnar form (checked by
        :meth:`parse`) is turned into rows, and each error's location given back in its terms:
        ``["candidates", column, i]``; a feature absent from both the columns and the context
        is one error naming the column.

        Raises:
            RequestError: as :meth:`frame`.
        """
        if type(candidates) is not dict:
            return self.frame(context, candidates)
        absent = Errors(
            _error(
                ["candidates", c],
                (
                    _PRICE_REQUIRED
                    if c == self.price
                    else "Field required: give this feature in `context` or as a column of "
                    "`candidates` (null for a missing value)"
                ),
                "missing",
            )
            for c in sorted(self._known_columns)
            if c not in candidates and c not in context
        )
        names = list(candidates)
        rows = [dict(zip(names, values, strict=True)) for values in zip(*candidates.values())]
        try:
            return self.frame(context, rows, skip=absent)
        except RequestError as exc:
            for e in exc.errors:
                loc = e["loc"]
                if loc[:1] == ["candidates"] and len(loc) >= 3 and type(loc[1]) is int:
                    e["loc"] = ["candidates", loc[2], loc[1], *loc[3:]]
            raise

    def _misspelt(self, col: str, *objects: dict) -> str:
        """A hint when the request holds a key that is not a feature and looks like ``col``
        (another case, a typo): such keys are ignored, so the feature counts as absent. Only
        the first :data:`HINT_KEYS` such keys of each object are compared (a courtesy whose
        cost must not grow with the request)."""
        ignored = [
            k
            for o in objects
            for k in islice((k for k in o if type(k) is str and k not in self.features), HINT_KEYS)
        ]
        close = _resembles(col, ignored)
        return f" (the request's '{echo(close)}' is not a feature and was ignored)" if close else ""

    def _column(
        self, col: str, values: list, errors: Errors, loc: list | None = None
    ) -> pl.Series | None:
        """The values of one column as a typed Series (Int64 / String / Float64), or None after
        appending errors that name the first offending candidates."""

        def where(i: int) -> list:
            return loc if loc is not None else ["candidates", i, col]

        kinds = set(map(type, values))
        kinds.discard(type(None))
        if col in self.categorical:
            if (
                float in kinds
            ):  # JSON Schema: 3.0 is the integer 3 (2.5 is not an id); beyond 2^53 a
                # float is not exact (and a JSON integer outside int64 arrives as one): refused
                values = [
                    int(v) if type(v) is float and v.is_integer() and abs(v) < 2**53 else v
                    for v in values
                ]
                kinds = set(map(type, values)) - {type(None)}
            if not kinds <= {int, str}:
                bad = [
                    i for i, v in enumerate(values) if v is not None and type(v) not in (int, str)
                ]
                errors.first(bad, lambda i: _error(where(i), _CATEGORICAL_MSG, "categorical_type"))
                return None
            if kinds == {int} or not kinds:
                try:
                    return pl.Series(col, values, dtype=pl.Int64 if kinds else pl.Null, strict=True)
                except (TypeError, OverflowError, ValueError, pl.exceptions.PolarsError):
                    bad = [
                        i
                        for i, v in enumerate(values)
                        if type(v) is int and not INT64[0] <= v <= INT64[1]
                    ]
                    errors.first(
                        bad, lambda i: _error(where(i), _CATEGORICAL_MSG, "categorical_type")
                    )
                    return None
            bad = [
                i for i, v in enumerate(values) if type(v) is int and not INT64[0] <= v <= INT64[1]
            ]
            bad += [
                i
                for i, v in enumerate(values)
                if type(v) is str and (len(v) > MAX_ID_CHARS or not is_utf8(v))
            ]
            if bad:
                errors.first(
                    sorted(bad),
                    lambda i: _error(where(i), _bad_string(values[i]), "categorical_type"),
                )
                return None
            return pl.Series(
                col,
                [str(v) if type(v) is int else v for v in values] if int in kinds else values,
                dtype=pl.String,
            )
        if not kinds <= {int, float}:
            bad = [i for i, v in enumerate(values) if v is not None and type(v) not in (int, float)]
            errors.first(
                bad,
                lambda i: _error(
                    where(i), "Input should be a valid number (or null)", "float_type"
                ),
            )
            return None
        bound = self.bounds[col]
        try:
            series = pl.Series(col, values, dtype=pl.Float64, strict=True)
        except (
            OverflowError,
            TypeError,
            ValueError,
            pl.exceptions.PolarsError,
        ):  # an integer beyond float64
            bad = [i for i, v in enumerate(values) if type(v) is int and abs(v) > bound]
            errors.first(
                bad,
                lambda i: _error(
                    where(i), f"value too large: |x| must be ≤ {bound:.6g}", "less_than_equal"
                ),
            )
            return None
        x = series.to_numpy()
        with np.errstate(invalid="ignore"):
            nonfinite = ~np.isfinite(x)
            if series.null_count():  # a null is missing, not non-finite
                nonfinite &= ~series.is_null().to_numpy()
            large = np.abs(x) > bound
            negative = (x < 0) if col == self.price else np.zeros(x.size, bool)
        if nonfinite.any() or large.any() or negative.any():

            def problem(i: int) -> dict:
                if nonfinite[i]:
                    return _error(where(i), "Input should be a finite number", "finite_number")
                if negative[i]:
                    return _error(
                        where(i), "Input should be greater than or equal to 0", "greater_than_equal"
                    )
                return _error(
                    where(i),
                    f"value too large: |x| must be ≤ {bound:.6g} (its standardised "
                    "value would overflow float32)",
                    "less_than_equal",
                )

            errors.first(np.flatnonzero(nonfinite | large | negative).tolist(), problem)
            return None
        return series

    # -- scoring ------------------------------------------------------------------------------
    def score(
        self,
        context: dict[str, Any],
        candidates: list[dict[str, Any]] | dict[str, list],
        fusion: FusionSpec | None = None,
    ) -> Scored:
        """Score candidates (request order), given as one object per candidate or, checked by
        :meth:`parse`, one array per feature column. See :meth:`frame` for the validation.

        Raises:
            RequestError: invalid features, or a fusion that needs a price the schema lacks.
        """
        t0 = time.perf_counter()
        spec = fusion or self.fusion
        if fusion is not None and self.own_score:
            raise RequestError(
                [
                    {
                        "loc": ["fusion"],
                        "msg": f"model {self.bundle.model_config.name!r} ranks by its own "
                        "score and has no pCTR/pCVR: a fusion does not apply",
                        "type": "value_error",
                    }
                ]
            )
        if fusion is not None:
            try:
                self.check_fusion(fusion)
            except ConfigError as exc:
                raise RequestError([_error(["fusion"], str(exc))]) from None
        columns = self.columns(context, candidates)
        if columns is None:  # the exact path: same result, or the errors naming each field
            df = self.frame_any(context, candidates)
            t1 = time.perf_counter()
            data = self.encode(df)
            price = df.get_column(self.price).to_numpy() if self.price else None
            out_of_range = self.bundle.encoder.out_of_range_counts(df)
        else:
            t1 = time.perf_counter()
            data = self._checked(
                lambda c: self.bundle.encoder.transform_columns(c, _count(candidates)), columns
            )
            price = columns[self.price] if self.price else None
            out_of_range = self.bundle.encoder.out_of_range_counts(columns)
        t2 = time.perf_counter()
        raw = self._infer(data.categorical, data.numerical, *data.extra)
        t3 = time.perf_counter()
        scored = self.fuse(raw, price, data, spec)
        scored.n_out_of_range = out_of_range
        t4 = time.perf_counter()
        timings = {"validate": t1 - t0, "encode": t2 - t1, "infer": t3 - t2, "fuse": t4 - t3}
        scored.timings_ms = {k: v * 1e3 for k, v in timings.items()}
        return scored

    def encode(self, df: pl.DataFrame) -> EncodedFeatures:
        """The validated frame (:meth:`frame`) encoded by the bundle's training encoders:
        categorical int64 ``[N, n_cat]``, numerical float32 ``[N, n_num]``, counts of missing
        and OOV values.

        Raises:
            RequestError: a standardised numerical value overflows float32 (defensive: the
                bounds of :meth:`frame` keep every value finite).
        """
        return self._checked(self.bundle.encoder.transform, df)

    def _checked(self, transform, columns) -> EncodedFeatures:
        """``transform(columns)`` (an encoder's), with the check of :meth:`encode`."""
        with np.errstate(over="ignore", invalid="ignore"):
            data = transform(columns)
        num = data.numerical
        if not np.isfinite(num).all():
            bad = [
                c
                for c, ok in zip(self.numerical, np.isfinite(num).all(axis=0), strict=True)
                if not ok
            ]
            raise RequestError(
                [
                    _error(
                        ["candidates", c],
                        "value too large: its standardised value overflows float32",
                    )
                    for c in bad
                ]
            )
        return data

    def fuse(
        self,
        raw: dict[str, np.ndarray],
        price: np.ndarray | None,
        data: EncodedFeatures,
        spec: FusionSpec,
    ) -> Scored:
        """The engine's outputs (``raw``: float32 ``[N]`` per name) fused by ``spec`` with the
        candidates' ``price`` (float64 ``[N]``, or None without a price column); a ranker's own
        ``score`` is used as is. ``n_out_of_range`` is left empty (set by :meth:`score`)."""
        if self.own_score:
            score = raw["score"].astype(np.float64)
            probs = {k: np.full(score.size, np.nan) for k in PROBS}
            log_score, key = np.full(score.size, np.nan), score
        else:
            nan = np.full(len(data.categorical), np.nan)
            probs = {k: raw[k].astype(np.float64) if k in raw else nan for k in self.probs}
            score, log_score, key = fused_scores(
                spec.fusion, probs["p_ctr"], probs["p_cvr"], probs["p_ctcvr"], price
            )
        n_missing = {c: data.n_missing.get(c, 0) for c in self.features if c in data.n_missing}
        n_oov = {c: data.n_oov.get(c, 0) for c in self.categorical}
        for f in self.list_features:  # elements of list/sequence features
            n_missing[f.column], n_oov[f.column] = data.n_missing[f.column], data.n_oov[f.column]
        return Scored(
            probs,
            score,
            log_score,
            key,
            n_missing,
            n_oov,
            spec,
        )


def _count(candidates: list | dict[str, list]) -> int:
    """How many candidates a request holds, in either form."""
    if type(candidates) is dict:
        return len(next(iter(candidates.values())))
    return len(candidates)


def _not_none(value: Any) -> bool:
    return value is not None


def _resembles(key: Any, names: list[str] | tuple[str, ...]) -> str | None:
    """The first of ``names`` that ``key`` looks like: the same but for case, else the closest
    with a similarity of at least 0.75 (``difflib``); None when none does or ``key`` is not
    a string."""
    if type(key) is not str:
        return None
    by_case = [k for k in names if k.lower() == key.lower()]
    close = by_case or difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    return close[0] if close else None


def _bad_string(value: Any) -> str:
    if type(value) is int:
        return _CATEGORICAL_MSG
    if len(value) > MAX_ID_CHARS:
        return f"a categorical string has at most {MAX_ID_CHARS} characters, got {len(value):,}"
    return "a categorical string must be valid Unicode text (it holds a lone UTF-16 surrogate)"
