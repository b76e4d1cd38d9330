"""Offline replay: rerank each logged request's impressions by a score and measure the top K.

Protocol (vectorised; no per-request Python loop):

1. Rows are grouped by request (a dense request index ``group`` ``[N]``). Datasets without a
   request id get *pseudo-requests* (:func:`pseudo_requests`: a seeded shuffle cut into groups
   of ``size`` rows).
2. Within each request, rows are sorted by score descending (``numpy.lexsort``); non-finite
   scores go last; ties are broken by the original row order (earlier row first), so the result
   is deterministic.
3. At K, per request, then averaged over requests (a request with fewer than K candidates
   contributes all of them):

   * ``gmv@K``    = Σ_top-K conversion · value   (value = price/amount of the converted row)
   * ``orders@K`` = Σ_top-K conversion;  ``clicks@K`` = Σ_top-K click
   * ``ndcg@K``   = DCG@K / IDCG@K with gain = conversion · value, discount 1/log2(rank + 1)
     (rank 1-based), averaged over requests whose IDCG > 0 (requests with no conversion have no
     defined NDCG and are left out; their count is reported).
   * with true probabilities (the simulator): ``exp_gmv@K`` = Σ_top-K ctr·cvr·price,
     ``exp_clicks@K`` = Σ ctr, ``exp_orders@K`` = Σ ctr·cvr, free of label noise. When
     ``position_coef`` c > 0, the true CTR logged at position p is moved to the new rank r by
     ``logit ctr' = logit ctr + c·(log p − log r)`` (the simulator's position effect, c = 0.35).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from mtrank.data.schema import Schema
from mtrank.errors import ConfigError, DataError
from mtrank.data.io import ROW
from mtrank.ranking.fusion import clean_prices, safe_scores

# Per-dataset defaults (by schema name). ``value``: the GMV of a converted row; ``price``: the
# price factor a fusion sees (must be known before the conversion: Hillstrom's ``spend`` is the
# realised amount, 0 unless converted, so using it as a ranking factor would leak the label;
# its ``history``, the customer's past-year spend, is the ex-ante value proxy).
# ``pseudo_size``: rows per pseudo-request when the data has no request id.
# ``position_coef``: the simulator's position effect on logit CTR (see mtrank.data.simulate).
RANKING_DEFAULTS: dict[str, dict] = {
    "simulated": {"by": ["item_id"], "value": "price", "price": "price", "position_coef": 0.35},
    "hillstrom": {
        "by": ["segment", "channel", "history_segment"],
        "value": "spend",
        "price": "history",
        "pseudo_size": 50,
    },
    "aliccp": {"by": ["205"], "value": None, "price": None},
}
PREDICTION_COLUMNS = ("p_ctr", "p_cvr")


def replay_defaults(schema: Schema) -> dict:
    """Replay settings of a schema: entity columns ``by``, ``value`` and ``price`` columns,
    ``pseudo_size`` and ``position_coef`` (:data:`RANKING_DEFAULTS` over generic ones)."""
    generic = {
        "by": [schema.item_id] if schema.item_id else [],
        "value": schema.price,
        "price": schema.price,
        "pseudo_size": 10,
        "position_coef": 0.0,
    }
    return {**generic, **RANKING_DEFAULTS.get(schema.name, {})}


def dense_groups(request_id) -> np.ndarray:
    """Dense int64 request index ``[N]`` (0..R-1, in order of first appearance) of any ids."""
    ids = np.asarray(request_id)
    _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    # Renumber by first appearance so the numbering does not depend on the ids' sort order.
    order = np.argsort(first, kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)
    return remap[inv.ravel()].astype(np.int64)


def pseudo_requests(n_rows: int, size: int = 10, seed: int = 0) -> np.ndarray:
    """Pseudo-request index ``[n_rows]`` for data without requests: rows are shuffled with
    ``seed`` and cut into consecutive groups of ``size`` (the last group may be smaller)."""
    if size < 1:
        raise ConfigError(f"pseudo-request size must be ≥ 1, got {size}")
    perm = np.random.default_rng(seed).permutation(n_rows)
    group = np.empty(n_rows, dtype=np.int64)
    group[perm] = np.arange(n_rows) // size
    return group


def rank_order(score: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """Row indices ``[N]`` (int64) best first: by ``group`` ascending when given, then by score
    descending; non-finite scores (NaN, ±inf) after every finite one; ties by index ascending.
    The one ranking rule of replay and of the HTTP service's ``/rank``."""
    s = safe_scores(score).ravel()
    keys = (np.arange(s.size), -s) if group is None else (np.arange(s.size), -s, np.asarray(group))
    return np.lexsort(keys).astype(np.int64)


def rank_within(group: np.ndarray, score: np.ndarray) -> np.ndarray:
    """0-based rank ``[N]`` of each row within its group, by score descending.

    Non-finite scores rank last; ties go to the earlier row. ``group``: int ``[N]``.
    """
    order = rank_order(score, group)
    n = order.size
    idx = np.arange(n)
    g = np.asarray(group)[order]
    start = np.r_[True, g[1:] != g[:-1]] if n else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(start, idx, 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = idx - first
    return rank


@dataclass
class ReplayData:
    """Logged impressions for replay, all ``[N]``.

    Attributes:
        group: dense request index. click, conversion: 0/1 labels.
        value: GMV of the row if it converts (price or amount, currency units; ≥ 0).
        price: the price factor a fusion sees (> 0, see
            :func:`~mtrank.ranking.fusion.clean_prices`).
        p_ctr, p_cvr: model predictions (optional: a ranker with its own score has none; the
            fusion tuner needs them). position: logged 1-based position, optional.
        true_ctr, true_cvr: true probabilities (simulator), optional.
    """

    group: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    value: np.ndarray
    price: np.ndarray
    p_ctr: np.ndarray | None = None
    p_cvr: np.ndarray | None = None
    position: np.ndarray | None = None
    true_ctr: np.ndarray | None = None
    true_cvr: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.group = dense_groups(self.group)
        n = self.group.size
        for name in (
            "click",
            "conversion",
            "value",
            "price",
            "p_ctr",
            "p_cvr",
            "position",
            "true_ctr",
            "true_cvr",
        ):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v, dtype=np.float64).ravel()
                if v.size != n:
                    raise ValueError(f"{name} has {v.size} rows, group has {n}")
                setattr(self, name, v)
        self.n_requests = int(self.group.max()) + 1 if n else 0
        self.gain = self.conversion * np.nan_to_num(self.value, nan=0.0)
        self._ideal_rank = rank_within(self.group, self.gain)
        self.sizes = np.bincount(self.group, minlength=self.n_requests)

    def subset(self, mask: np.ndarray) -> ReplayData:
        """The rows where ``mask`` is True (keep whole requests for a fair replay)."""
        pick = lambda v: None if v is None else v[mask]
        return ReplayData(
            self.group[mask],
            self.click[mask],
            self.conversion[mask],
            self.value[mask],
            self.price[mask],
            pick(self.p_ctr),
            pick(self.p_cvr),
            pick(self.position),
            pick(self.true_ctr),
            pick(self.true_cvr),
        )


def _moved_ctr(data: ReplayData, rank: np.ndarray, position_coef: float) -> np.ndarray:
    """True CTR moved from the logged position to the new rank (see the module docstring)."""
    ctr = data.true_ctr
    if position_coef and data.position is not None:
        c = np.clip(ctr, 1e-12, 1 - 1e-12)
        logit = (
            np.log(c) - np.log1p(-c) + position_coef * (np.log(data.position) - np.log(rank + 1.0))
        )
        ctr = 1.0 / (1.0 + np.exp(-logit))
    return ctr


def _per_request_mean(data: ReplayData, weights: np.ndarray) -> float:
    return float(weights.sum() / max(data.n_requests, 1))


def ndcg_per_request(
    group: np.ndarray,
    gain: np.ndarray,
    rank: np.ndarray,
    k: int,
    *,
    ideal_rank: np.ndarray | None = None,
    n_requests: int | None = None,
) -> np.ndarray:
    """NDCG@k per request ``[R]`` (float64; NaN where the ideal DCG is 0, i.e. no gain).

    DCG@k = Σ_{rank < k} gain / log2(rank + 2) with 0-based ``rank`` within the request
    (Järvelin & Kekäläinen 2002); the ideal DCG ranks by ``gain`` itself. ``group``: dense
    request index ``[N]``; ``gain`` ≥ 0 ``[N]``; ``rank``: from :func:`rank_within`.
    """
    group = np.asarray(group)
    gain = np.asarray(gain, dtype=np.float64)
    R = int(group.max()) + 1 if n_requests is None and group.size else (n_requests or 0)
    if ideal_rank is None:
        ideal_rank = rank_within(group, gain)
    dcg = np.bincount(group, weights=(rank < k) * gain / np.log2(rank + 2.0), minlength=R)
    idcg = np.bincount(
        group, weights=(ideal_rank < k) * gain / np.log2(ideal_rank + 2.0), minlength=R
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)


def replay_metrics(
    data: ReplayData, score: np.ndarray, k: int = 10, *, position_coef: float = 0.0
) -> dict[str, float]:
    """Metrics at ``k`` of ranking every request by ``score`` ``[N]`` (see module docstring).

    Returns:
        ``gmv@k``, ``orders@k``, ``clicks@k`` (means per request), ``ndcg@k`` (mean over
        requests with a conversion; None if there is none), ``ndcg_requests``, and with true
        probabilities ``exp_gmv@k``, ``exp_orders@k``, ``exp_clicks@k``.
    """
    if k < 1:
        raise ConfigError(f"K must be ≥ 1, got {k}")
    rank = rank_within(data.group, score)
    top = rank < k
    out: dict[str, float | None] = {
        f"gmv@{k}": _per_request_mean(data, top * data.gain),
        f"orders@{k}": _per_request_mean(data, top * data.conversion),
        f"clicks@{k}": _per_request_mean(data, top * data.click),
    }
    ndcg = ndcg_per_request(
        data.group, data.gain, rank, k, ideal_rank=data._ideal_rank, n_requests=data.n_requests
    )
    has = np.isfinite(ndcg)
    out[f"ndcg@{k}"] = float(ndcg[has].mean()) if has.any() else None
    out["ndcg_requests"] = int(has.sum())
    if data.true_ctr is not None and data.true_cvr is not None:
        ctr = _moved_ctr(data, rank, position_coef)
        out[f"exp_clicks@{k}"] = _per_request_mean(data, top * ctr)
        out[f"exp_orders@{k}"] = _per_request_mean(data, top * ctr * data.true_cvr)
        out[f"exp_gmv@{k}"] = _per_request_mean(data, top * ctr * data.true_cvr * data.price)
    return out


def per_request(
    data: ReplayData, score: np.ndarray, k: int = 10, *, position_coef: float = 0.0
) -> dict[str, np.ndarray]:
    """Per-request sums at ``k`` (``[R]`` each): ``gmv``, ``orders``, ``clicks`` and, with true
    probabilities, ``exp_gmv``, ``exp_clicks`` (the terms :func:`replay_metrics` averages)."""
    rank = rank_within(data.group, score)
    top = rank < k
    R = data.n_requests
    out = {
        "gmv": np.bincount(data.group, weights=top * data.gain, minlength=R),
        "orders": np.bincount(data.group, weights=top * data.conversion, minlength=R),
        "clicks": np.bincount(data.group, weights=top * data.click, minlength=R),
    }
    if data.true_ctr is not None and data.true_cvr is not None:
        ctr = _moved_ctr(data, rank, position_coef)
        out["exp_gmv"] = np.bincount(
            data.group, weights=top * ctr * data.true_cvr * data.price, minlength=R
        )
        out["exp_clicks"] = np.bincount(data.group, weights=top * ctr, minlength=R)
    return out


def bootstrap_lift(
    a: np.ndarray, b: np.ndarray, *, n: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Relative lift Σa / Σb − 1 of per-request values ``a`` over ``b`` (both ``[R]``, paired by
    request) with a percentile bootstrap interval over requests (``n`` resamples, seeded)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    lifts = np.empty(n)
    for start in range(0, n, 100):  # 100 resamples at a time bounds memory at 100·R indices
        idx = rng.integers(0, a.size, size=(min(100, n - start), a.size))
        lifts[start : start + idx.shape[0]] = (
            a[idx].sum(1) / np.maximum(b[idx].sum(1), 1e-300) - 1.0
        )
    lo, hi = np.quantile(lifts, [(1 - level) / 2, (1 + level) / 2])
    return {
        "lift": float(a.sum() / b.sum() - 1.0) if b.sum() else float("nan"),
        "low": float(lo),
        "high": float(hi),
        "level": level,
    }


def top_k_share(data: ReplayData, score: np.ndarray, flag: np.ndarray, k: int = 10) -> float:
    """Share of the top-``k`` slots (over all requests) held by rows where ``flag`` is True."""
    top = rank_within(data.group, score) < k
    return float((top & np.asarray(flag, bool)).sum() / max(top.sum(), 1))


def replay_from_frame(
    frame: pl.DataFrame,
    sch: Schema,
    *,
    value_col: str | None,
    price_col: str | None,
    policy: str = "error",
    floor: float = 0.01,
    pseudo_size: int = 10,
    seed: int = 0,
    source: str = "<table>",
    predictions: tuple[str, ...] = PREDICTION_COLUMNS,
) -> tuple[ReplayData, np.ndarray, dict]:
    """A :class:`ReplayData` from a labelled table: requests by the schema's request id (else
    pseudo-requests of ``pseudo_size`` rows, seeded), GMV from ``value_col`` (missing → 0,
    counted), the fusion's price factor from ``price_col`` under ``policy`` (see
    :func:`~mtrank.ranking.fusion.clean_prices`), and the ``predictions`` columns (``p_ctr``,
    ``p_cvr``; pass ``()`` for a ranker with its own score).

    Returns:
        (data, keep, info): ``keep`` bool ``[rows of frame]`` marks the rows replayed (all but
        those the price policy dropped); ``info`` says how requests were formed and what was
        dropped or set to 0.

    Raises:
        DataError: a prediction, price or value column is missing (naming it and the source),
            or a bad price under ``policy="error"``.
    """
    info: dict = {}
    for c in predictions:
        if c not in frame.columns:
            raise DataError(
                f"no {c!r} column: give --bundle (with --dataset/--data) or a predictions file "
                "that has it",
                file=source,
            )
    for c, what in ((price_col, "--price-col"), (value_col, "--value-col")):
        if c is None or c not in frame.columns:
            raise DataError(
                f"fusion needs a price column ({what}); {c!r} is not in the table {frame.columns}",
                file=source,
            )
    rows = (
        frame.get_column(ROW).to_numpy() if ROW in frame.columns else None
    )  # file rows, not split positions
    price, keep = clean_prices(
        frame.get_column(price_col).to_numpy(),
        policy=policy,
        floor=floor,
        column=price_col,
        source=source,
        rows=rows,
    )
    if not keep.all():
        info["dropped_price_rows"] = int((~keep).sum())
        frame = frame.filter(pl.Series(keep))
        price = price[keep]
    if sch.request_id and sch.request_id in frame.columns:
        group = frame.get_column(sch.request_id).to_numpy()
        info["requests"] = f"logged request id {sch.request_id!r}"
    else:
        group = pseudo_requests(frame.height, pseudo_size, seed)
        info["requests"] = (
            f"pseudo-requests: rows shuffled with seed {seed}, cut into groups of {pseudo_size}"
        )
    value = frame.get_column(value_col).cast(pl.Float64).to_numpy()
    bad_value = ~np.isfinite(value)
    if bad_value.any():
        info["missing_values_set_to_0"] = int(bad_value.sum())
        value = np.where(bad_value, 0.0, value)
    get = lambda c: frame.get_column(c).cast(pl.Float64).to_numpy() if c in frame.columns else None
    data = ReplayData(
        group=group,
        click=get(sch.click),
        conversion=get(sch.conversion),
        value=value,
        price=price,
        p_ctr=get("p_ctr"),
        p_cvr=get("p_cvr"),
        position=get("position"),
        true_ctr=get("true_ctr"),
        true_cvr=get("true_cvr_clicked"),
    )
    return data, keep, info


__all__ = [
    "PREDICTION_COLUMNS",
    "RANKING_DEFAULTS",
    "ReplayData",
    "bootstrap_lift",
    "dense_groups",
    "ndcg_per_request",
    "per_request",
    "pseudo_requests",
    "rank_within",
    "replay_defaults",
    "replay_from_frame",
    "replay_metrics",
    "top_k_share",
]
