"""Ranking-score fusion: one score per candidate from pCTR, pCVR and price.

The one implementation of the fusion formulas, used by ``mtrank fuse`` (tuning), ``mtrank
predict --fusion`` and the HTTP service (:mod:`mtrank.serve.fusion` only wraps them in a pydantic
request model). Each formula is a small class with ``score(p_ctr, p_cvr, price) -> np.ndarray``
(the ranking key, higher first):

* :class:`Multiplicative`        ``pCTR^α · pCVR^β · (price + ε)^γ``
* :class:`OffsetMultiplicative`  ``(b1 + pCTR)^α · (b2 + pCVR)^β · (b3 + price)^γ``
* :class:`Linear`                ``w1·pCTR/m1 + w2·pCVR/m2 + w3·log1p(price)/m3``
* :class:`ExpectedGMV`           ``pCTR · pCVR · price``
* :class:`Single`                ``pCTR`` or ``pCTR · pCVR`` (reference rankings)
* :class:`CTCVR`                 the model's own ``pCTCVR`` (the serving default)

The product formulas are computed in log space (a sum of logs), which is finite where the
product would underflow and ranks identically (log is monotone); probabilities are floored at
the smallest normal float64 (``TINY`` ≈ 2.2e-308, log ≈ -708) so a probability of exactly 0
gives a very low but finite key. :meth:`Fusion.fused` returns the score in its own units and its
log (what the service reports). A fusion is stored as a small JSON document (the format the
serving service reads; see :func:`save_fusion`)::

    {"format": "mtrank.fusion/1", "formula": "multiplicative",
     "params": {"alpha": 1.0, "beta": 0.8, "gamma": 0.4, "eps": 1.0},
     "k": 10, "price_policy": "error", ...metadata...}

Price policy (:func:`usable_prices`, the one rule, offline and in serving): a price is usable
when it is finite and ≥ 0 (0 is a free item: every formula scores it finitely). Offline,
:func:`clean_prices` applies it to a whole table: ``error`` (default) raises
:class:`~mtrank.errors.DataError` naming the rows; ``clip`` replaces missing, non-finite or
negative prices by ``price_floor``; ``drop`` removes those rows. In serving, the HTTP service
rejects such a request and batch scoring gives such a row a null score
(:mod:`mtrank.serve.fusion`). Integer prices (cents) are
accepted and cast to float64. Whatever the inputs, :func:`safe_scores` maps a non-finite score
to ``-inf`` so that it ranks last, never first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from mtrank.documents import read_document
from mtrank.errors import ConfigError, DataError
from mtrank.io_utils import atomic_write_json

FORMAT = "mtrank.fusion/1"
PricePolicy = Literal["error", "clip", "drop"]
TINY = float(np.finfo(np.float64).tiny)  # ≈ 2.2e-308: log(p) stays finite (≈ -708) for p = 0


def _arrays(p_ctr, p_cvr, price) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(p_ctr, dtype=np.float64).ravel()
    b = np.asarray(p_cvr, dtype=np.float64).ravel()
    c = np.asarray(price, dtype=np.float64).ravel()
    if not (a.shape == b.shape == c.shape):
        raise ValueError(
            f"p_ctr {a.shape}, p_cvr {b.shape} and price {c.shape} must have the same length"
        )
    return a, b, c


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.maximum(x, TINY))


@dataclass
class Fusion:
    """Base class: a fused ranking score. Subclasses define :meth:`score`.

    Class attributes: ``name`` (the ``formula`` in JSON); ``log_space``: :meth:`score` returns
    the log of the fused score (all product formulas) rather than the score itself (``Linear``);
    ``limits``: per parameter ``(low, high, low_inclusive)``, the range a served fusion must
    respect (see :meth:`problems`).
    """

    name: ClassVar[str] = "base"
    log_space: ClassVar[bool] = True
    limits: ClassVar[dict[str, tuple[float, float, bool]]] = {}

    def score(self, p_ctr, p_cvr, price) -> np.ndarray:  # pragma: no cover - abstract
        """Ranking keys ``[N]`` float64 (higher ranks first) from ``[N]`` pCTR, pCVR and price."""
        raise NotImplementedError

    @property
    def params(self) -> dict[str, float]:
        """The formula's parameters as floats, by name (what the JSON document stores)."""
        return {k: float(v) for k, v in asdict(self).items()}

    @property
    def uses_price(self) -> bool:
        """True when the score depends on the price (so a price column is required)."""
        return True

    @property
    def uses_cvr(self) -> bool:
        """True when the score depends on pCVR (so a CTR-only model cannot be fused with it)."""
        return True

    def fused(self, p_ctr, p_cvr, price=None, p_ctcvr=None) -> tuple[np.ndarray, np.ndarray]:
        """(score, log_score), float64 ``[N]``: the fused score in its own units and its natural
        log. For a log-space formula ``log_score`` is :meth:`score` and ``score`` its exp (which
        may underflow to 0: rank by :meth:`rank_key`); for ``Linear`` ``log_score`` is NaN
        where the score is ≤ 0. ``price`` may be None when :attr:`uses_price` is False;
        ``p_ctcvr`` is the model's own pCTCVR (used by :class:`CTCVR`)."""
        if price is None:
            if self.uses_price:
                raise ConfigError(f"fusion {self.name!r} {self.params} needs a price")
            price = np.zeros(np.shape(p_ctr))
        key = self.score(p_ctr, p_cvr, price)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            if self.log_space:
                return np.exp(key), key
            return key, np.where(key > 0, np.log(np.where(key > 0, key, 1.0)), np.nan)

    def rank_key(self, score: np.ndarray, log_score: np.ndarray) -> np.ndarray:
        """The array to rank by among :meth:`fused`'s outputs (the log for log-space formulas),
        NaN wherever the score itself is not finite (e.g. ``exp`` of a log-space key above 709
        overflows): a candidate whose score is null in a response always ranks after every
        candidate with a finite score (:func:`~mtrank.ranking.replay.rank_order`), never first.
        A score that underflows to 0 is finite and keeps its (log) key."""
        key = log_score if self.log_space else score
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(score) & np.isfinite(key), key, np.nan)

    @classmethod
    def param_types(cls) -> dict[str, type]:
        """Parameter name → ``float`` or ``str`` (the dataclass fields)."""
        return {f.name: (str if f.type in (str, "str") else float) for f in fields(cls)}

    def problems(self) -> list[tuple[str, str]]:
        """(parameter, message) for every parameter outside :attr:`limits` or not finite;
        empty when the fusion is fit to serve."""
        out = []
        for k, v in self.params.items():
            if k not in self.limits:
                continue
            lo, hi, lo_incl = self.limits[k]
            if not np.isfinite(v):
                out.append((k, f"must be a finite number, got {v}"))
            elif (v < lo if lo_incl else v <= lo) or v > hi:
                out.append((k, f"must be {'≥' if lo_incl else '>'} {lo:g} and ≤ {hi:g}, got {v:g}"))
        return out

    def to_json(self, **meta) -> dict:
        """The serving document: format, formula, params, plus any metadata (k, metrics …)."""
        return {"format": FORMAT, "formula": self.name, "params": self.params, **meta}


@dataclass
class Multiplicative(Fusion):
    """``score = pCTR^α · pCVR^β · (price + ε)^γ``, returned as its log
    ``α·log pCTR + β·log pCVR + γ·log(price + ε)`` (same order, no underflow).

    α = β = γ = 1, ε = 0 is expected GMV per impression; γ < 1 damps price, γ = 0 ranks by
    pCTR^α·pCVR^β (α = β: pCTCVR). Probabilities are floored at TINY (2.2e-308) before the log.
    Only the ratios α : β : γ matter for the ranking.
    """

    name: ClassVar[str] = "multiplicative"
    limits: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "alpha": (0.0, 100.0, True),
        "beta": (0.0, 100.0, True),
        "gamma": (-100.0, 100.0, True),
        "eps": (0.0, 1e6, False),
    }
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    eps: float = 1.0

    @property
    def uses_cvr(self) -> bool:
        """True unless β = 0."""
        return self.beta != 0.0

    @property
    def uses_price(self) -> bool:
        """True unless γ = 0."""
        return self.gamma != 0.0

    def score(self, p_ctr, p_cvr, price) -> np.ndarray:
        """``α·log pCTR + β·log pCVR + γ·log(price + ε)`` ``[N]``."""
        a, b, c = _arrays(p_ctr, p_cvr, price)
        return self.alpha * _log(a) + self.beta * _log(b) + self.gamma * _log(c + self.eps)


@dataclass
class OffsetMultiplicative(Fusion):
    """``score = (b1 + pCTR)^α · (b2 + pCVR)^β · (b3 + price)^γ``, returned as its log.

    The offsets b1, b2, b3 ≥ 0 soften each factor: with a large b2 an item with pCVR ≈ 0 is not
    wiped out. (The "α-β-γ with offsets" form used in industrial rank fusion.)
    """

    name: ClassVar[str] = "offset_multiplicative"
    limits: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "alpha": (0.0, 100.0, True),
        "beta": (0.0, 100.0, True),
        "gamma": (-100.0, 100.0, True),
        **{b: (0.0, 1e6, True) for b in ("b1", "b2", "b3")},
    }
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    b1: float = 0.0
    b2: float = 0.0
    b3: float = 1.0

    @property
    def uses_cvr(self) -> bool:
        """True unless β = 0."""
        return self.beta != 0.0

    @property
    def uses_price(self) -> bool:
        """True unless γ = 0."""
        return self.gamma != 0.0

    def score(self, p_ctr, p_cvr, price) -> np.ndarray:
        """``α·log(b1 + pCTR) + β·log(b2 + pCVR) + γ·log(b3 + price)`` ``[N]``."""
        a, b, c = _arrays(p_ctr, p_cvr, price)
        return (
            self.alpha * _log(self.b1 + a)
            + self.beta * _log(self.b2 + b)
            + self.gamma * _log(self.b3 + c)
        )


@dataclass
class Linear(Fusion):
    """``score = w1·pCTR/m1 + w2·pCVR/m2 + w3·log1p(price)/m3``.

    Each factor is normalised by a scale m (by default its mean over the data the fusion was
    tuned on, stored with the params so serving uses the same constants); log1p tames price's
    heavy tail. Weights are free (the scale of the score does not matter for ranking).
    """

    name: ClassVar[str] = "linear"
    log_space: ClassVar[bool] = False
    limits: ClassVar[dict[str, tuple[float, float, bool]]] = {
        **{w: (-1e6, 1e6, True) for w in ("w1", "w2", "w3")},
        **{m: (0.0, 1e12, False) for m in ("m1", "m2", "m3")},
    }
    w1: float = 1.0
    w2: float = 1.0
    w3: float = 1.0
    m1: float = 1.0
    m2: float = 1.0
    m3: float = 1.0

    @property
    def uses_cvr(self) -> bool:
        """True unless w2 = 0."""
        return self.w2 != 0.0

    @property
    def uses_price(self) -> bool:
        """True unless w3 = 0."""
        return self.w3 != 0.0

    def score(self, p_ctr, p_cvr, price) -> np.ndarray:
        """``w1·pCTR/m1 + w2·pCVR/m2 + w3·log1p(price)/m3`` ``[N]`` (not a log)."""
        a, b, c = _arrays(p_ctr, p_cvr, price)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (
                self.w1 * a / self.m1
                + self.w2 * b / self.m2
                + self.w3 * np.log1p(np.maximum(c, 0.0)) / self.m3
            )

    @classmethod
    def fitted_scales(cls, p_ctr, p_cvr, price, **weights: float) -> Linear:
        """A Linear fusion whose scales are the means of the given factors (non-zero)."""
        a, b, c = _arrays(p_ctr, p_cvr, price)
        m = [float(np.nanmean(x)) for x in (a, b, np.log1p(np.maximum(c, 0.0)))]
        m = [x if np.isfinite(x) and x > 0 else 1.0 for x in m]
        return cls(**weights, m1=m[0], m2=m[1], m3=m[2])


@dataclass
class ExpectedGMV(Fusion):
    """``score = pCTR · pCVR · price``: expected GMV of one impression (returned as its log)."""

    name: ClassVar[str] = "expected_gmv"

    def score(self, p_ctr, p_cvr, price) -> np.ndarray:
        """``log pCTR + log pCVR + log price`` ``[N]``."""
        a, b, c = _arrays(p_ctr, p_cvr, price)
        return _log(a) + _log(b) + _log(c)


@dataclass
class Single(Fusion):
    """A reference ranking by one model output: ``score = pCTR`` (``which="ctr"``) or
    ``score = pCTR·pCVR`` (``which="ctcvr"``). Not tuned; stored for completeness."""

    name: ClassVar[str] = "single"
    which: str = field(default="ctr")

    @property
    def params(self) -> dict:
        """``{"which": "ctr" | "ctcvr"}``."""
        return {"which": self.which}

    @property
    def uses_cvr(self) -> bool:
        """True unless ``which="ctr"``."""
        return self.which != "ctr"

    @property
    def uses_price(self) -> bool:
        """Never: the score ignores the price."""
        return False

    def problems(self) -> list[tuple[str, str]]:
        """A problem when ``which`` is neither ``ctr`` nor ``ctcvr``."""
        return [] if self.which in ("ctr", "ctcvr") else [("which", "must be 'ctr' or 'ctcvr'")]

    def score(self, p_ctr, p_cvr, price) -> np.ndarray:
        """``log pCTR`` or ``log pCTR + log pCVR`` ``[N]``."""
        a, b, _ = _arrays(p_ctr, p_cvr, price)
        return _log(a) if self.which == "ctr" else _log(a) + _log(b)


@dataclass
class CTCVR(Fusion):
    """``score = pCTCVR``, the model's own post-view conversion rate (ESMM: pCTR · pCVR), ranked
    by its log. The default of ``mtrank serve`` and ``mtrank predict --fusion``; no params.

    :meth:`score` (from pCTR and pCVR alone) is :class:`Single` ``ctcvr``; :meth:`fused` with the
    model's ``p_ctcvr`` returns that output itself as the score (bit for bit) and its log."""

    name: ClassVar[str] = "ctcvr"

    @property
    def uses_price(self) -> bool:
        """Never: the score ignores the price."""
        return False

    def score(self, p_ctr, p_cvr, price) -> np.ndarray:
        """``log pCTR + log pCVR`` ``[N]`` (without the model's own pCTCVR)."""
        return Single("ctcvr").score(p_ctr, p_cvr, price)

    def fused(self, p_ctr, p_cvr, price=None, p_ctcvr=None) -> tuple[np.ndarray, np.ndarray]:
        """The model's own pCTCVR as the score and its log ``[N]``, when given."""
        if p_ctcvr is None:
            return super().fused(p_ctr, p_cvr, price)
        score = np.array(p_ctcvr, dtype=np.float64).ravel()
        log_score = _log(score)
        score[~np.isfinite(log_score)] = np.nan
        return score, log_score


FORMULAS: dict[str, type[Fusion]] = {
    c.name: c for c in (Multiplicative, OffsetMultiplicative, Linear, ExpectedGMV, Single, CTCVR)
}


def make_fusion(formula: str, params: dict | None = None) -> Fusion:
    """Build a fusion by name. Raises ConfigError for an unknown formula or parameter."""
    if formula not in FORMULAS:
        raise ConfigError(f"unknown fusion formula {formula!r}; choose one of {sorted(FORMULAS)}")
    cls = FORMULAS[formula]
    unknown = sorted(set(params or {}) - set(cls.param_types()))
    if unknown:  # named here, never as a TypeError from the dataclass's __init__
        names = sorted(cls.param_types()) or "none"
        raise ConfigError(
            f"fusion {formula!r}: bad params {[ascii(k)[1:-1] for k in unknown]}: not "
            f"parameters of this formula (its parameters: {names})"
        )
    return cls(**(params or {}))


def save_fusion(fusion: Fusion, path: str | Path, **meta) -> Path:
    """Write the fusion's JSON document (see the module docstring) atomically."""
    return atomic_write_json(fusion.to_json(**meta), Path(path))


def read_fusion_doc(path: str | Path) -> dict:
    """The JSON document of a fusion file (as :func:`save_fusion` writes it; ``format`` may be
    absent, other keys are kept).

    Raises:
        ConfigError: the file is missing, not JSON (naming the line and column), of another
            format, or has no ``formula`` (:func:`mtrank.documents.read_document`).
    """
    p = Path(path)
    doc = read_document(p, "fusion file", ConfigError, syntax="json")
    if not isinstance(doc, dict) or doc.get("format", FORMAT) != FORMAT or "formula" not in doc:
        raise ConfigError(
            f"fusion file {p}: expected a {FORMAT!r} document with 'formula' and 'params'"
        )
    return doc


def load_fusion(path: str | Path) -> Fusion:
    """Read a fusion JSON document written by :func:`save_fusion` (``mtrank fuse``): the one
    loader of fusion files, for replay, batch scoring and serving
    (:meth:`mtrank.serve.fusion.FusionSpec.from_file` wraps it).

    Raises:
        ConfigError: the file is missing, not JSON, of another format, names an unknown formula
            or parameter, or a parameter is outside the formula's :attr:`Fusion.limits` (the
            message names the file and the field).
    """
    doc = read_fusion_doc(path)
    if not isinstance(doc["formula"], str) or doc["formula"] not in FORMULAS:
        raise ConfigError(
            f"fusion file {path}: formula: unknown fusion formula {doc['formula']!r}; choose one "
            f"of {sorted(FORMULAS)}"
        )
    params = doc.get("params")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(
            f"fusion file {path}: params: expected an object, got {type(params).__name__}"
        )
    for key, value in (params or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"fusion file {path}: params.{key}: expected a number, got {json.dumps(value)}"
            )
    try:
        fusion = make_fusion(doc["formula"], params or {})
        fusion = make_fusion(fusion.name, fusion.params)  # the params as the class reads them
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"fusion file {path}: {exc}") from None
    problems = fusion.problems()
    if problems:
        raise ConfigError(
            f"fusion file {path}: " + "; ".join(f"params.{k}: {msg}" for k, msg in problems)
        )
    return fusion


def safe_scores(score: np.ndarray) -> np.ndarray:
    """Scores with every NaN / ±inf replaced by -inf, so a non-finite score ranks last."""
    s = np.asarray(score, dtype=np.float64)
    return np.where(np.isfinite(s), s, -np.inf)


def usable_prices(price) -> np.ndarray:
    """The price policy: bool ``[N]``, True where a price is finite and ≥ 0 (currency units).

    Args:
        price: ``[N]`` numbers (NaN for missing).
    """
    p = np.asarray(price, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(p) & (p >= 0)


def clean_prices(
    price,
    *,
    policy: PricePolicy = "error",
    floor: float = 0.01,
    column: str = "price",
    source: str | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate prices for fusion.

    Args:
        price: ``[N]`` numbers (int or float; None / NaN allowed on input).
        policy: ``error``: raise on any price :func:`usable_prices` rejects (missing,
            non-finite or negative);
            ``clip``: replace them by ``floor``; ``drop``: flag them for removal.
        floor: the replacement price under ``clip`` (currency units, > 0).
        column, source: named in the error message.
        rows: the 1-based file row of each value (e.g. the ``__row`` column of a split that
            :func:`mtrank.data.io.read_table` read), so that the error names rows of the file;
            default: positions 1..N.

    Returns:
        (price float64 ``[N]``, keep bool ``[N]``). ``keep`` is all True except under ``drop``.

    Raises:
        DataError: policy ``error`` and bad prices (names the column and 1-based rows).
        ConfigError: an unknown policy or a non-positive floor.
    """
    if policy not in ("error", "clip", "drop"):
        raise ConfigError(f"price policy must be 'error', 'clip' or 'drop', got {policy!r}")
    if not floor > 0:
        raise ConfigError(f"price floor must be > 0, got {floor}")
    p = (
        np.array([np.nan if v is None else v for v in price], dtype=np.float64)
        if isinstance(price, list)
        else np.asarray(price, dtype=np.float64).ravel()
    )
    bad = ~usable_prices(p)
    keep = np.ones(p.size, dtype=bool)
    if bad.any():
        if policy == "error":
            where = np.flatnonzero(bad)
            rows = (np.asarray(rows)[where] if rows is not None else where + 1).tolist()
            raise DataError(
                f"{len(rows)} missing, non-finite or negative price(s), e.g. {float(p[bad][0])}; "
                "prices must be finite and ≥ 0 (or pass --price-policy clip / drop)",
                file=source,
                column=column,
                rows=rows[:10],
                count=len(rows),
            )
        if policy == "clip":
            p = np.where(bad, floor, p)
        else:
            keep = ~bad
    return p, keep


__all__ = [
    "CTCVR",
    "FORMULAS",
    "TINY",
    "ExpectedGMV",
    "Fusion",
    "Linear",
    "Multiplicative",
    "OffsetMultiplicative",
    "Single",
    "clean_prices",
    "load_fusion",
    "usable_prices",
    "make_fusion",
    "read_fusion_doc",
    "safe_scores",
    "save_fusion",
]


def ctr_only_fusions() -> str:
    """Which formulas apply to a CTR-only model (no pCVR), and which need pCVR: one message,
    shared by ``mtrank fuse`` and the service."""
    return (
        "formulas that apply without pCVR: single (which=ctr), multiplicative and "
        "offset_multiplicative with beta=0 (pCTR and price), linear with w2=0; formulas "
        "that need pCVR (a conversion stage): ctcvr, expected_gmv, single (which=ctcvr), and "
        "the others with beta / w2 ≠ 0"
    )
