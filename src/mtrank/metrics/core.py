"""AUC, GAUC, logloss and calibration on whole arrays.

AUC is computed exactly from average ranks (the Mann-Whitney U statistic), so tied scores count
one half, as scikit-learn's ``roc_auc_score`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.stats import rankdata


def _as_arrays(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in length")
    return y, p


def auc(
    y: np.ndarray,
    p: np.ndarray,
    weight: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> float | None:
    """Area under the ROC curve.

    Args:
        y: 0/1 labels ``[N]``; p: scores ``[N]``; weight: optional 0/1 row mask ``[N]``
            selecting the evaluation space (e.g. clicked impressions for CVR).
        sample_weight: optional weights ``[N]`` ≥ 0: each (positive, negative) pair counts
            w_i·w_j (:func:`pair_auc`); None = every row weighs 1.

    Returns:
        The AUC in [0, 1], or None when the space holds a single class (undefined, not 0.5).
    """
    y, p = _as_arrays(y, p)
    if weight is not None:
        keep = np.asarray(weight).ravel() > 0
        y, p = y[keep], p[keep]
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64).ravel()[keep]
    if sample_weight is not None:
        w = np.asarray(sample_weight, dtype=np.float64).ravel()
        return pair_auc(p, w * y, w * (1.0 - y))
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(p, method="average")
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def soft_auc(t: np.ndarray, p: np.ndarray) -> float | None:
    """AUC of scores ``p`` against probabilistic labels ``t`` (e.g. a simulator's true CVR).

    Every row counts as a positive with weight t_i and as a negative with weight 1 − t_i; the
    result is Σ_{i≠j} t_i·(1 − t_j)·H(p_i − p_j) / Σ_{i≠j} t_i·(1 − t_j), H(0) = ½: the
    expected AUC if labels were drawn from ``t``. With 0/1 ``t`` it equals :func:`auc`.
    Exact, O(N log N).

    Args:
        t: ``[N]`` probabilities in [0, 1]; p: ``[N]`` scores.

    Returns:
        The soft AUC in [0, 1], or None when no pair has positive weight.
    """
    t, p = _as_arrays(t, p)
    return pair_auc(p, t, 1.0 - t, self_pairs=float((t * (1.0 - t)).sum()))


def pair_auc(
    p: np.ndarray, pos: np.ndarray, neg: np.ndarray, self_pairs: float = 0.0
) -> float | None:
    """Σ_{i,j} pos_i·neg_j·H(p_i − p_j) / Σ_{i,j} pos_i·neg_j (H(0) = ½), less the ``self_pairs``
    weight of i = j: the AUC where row i counts as a positive with weight ``pos_i`` and as a
    negative with weight ``neg_i`` (``[N]`` each, ≥ 0). Exact, O(N log N). None when no pair has
    positive weight."""
    _, group = np.unique(p, return_inverse=True)  # groups in ascending score order
    pos = np.bincount(group, weights=pos)
    neg = np.bincount(group, weights=neg)
    below = np.cumsum(neg) - neg
    den = float(pos.sum() * neg.sum()) - self_pairs
    if den <= 0:
        return None
    return float(((pos * (below + 0.5 * neg)).sum() - 0.5 * self_pairs) / den)


def hanley_mcneil_se(value: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil, Radiology 1982, eq. 2), from the AUC and the
    numbers of positives and negatives."""
    a = value
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / max(
        n_pos * n_neg, 1
    )
    return float(np.sqrt(max(var, 0.0)))


@dataclass(frozen=True)
class GroupAUC:
    """GAUC result: the impression-weighted mean of per-group AUCs, and how many groups counted."""

    value: float | None
    groups_used: int
    groups_skipped: int


def gauc(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, weight: np.ndarray | None = None
) -> GroupAUC:
    """Group AUC (Zhou et al., DIN, KDD 2018, eq. 9): Σ_u n_u·AUC_u / Σ_u n_u over groups (users)
    with both classes; single-class groups are skipped and counted. Vectorised with polars.

    Args:
        y, p, groups: ``[N]`` labels, scores and group ids; weight: optional 0/1 space mask.
    """
    y, p = _as_arrays(y, p)
    df = pl.DataFrame({"g": np.asarray(groups), "y": y, "p": p})
    if weight is not None:
        df = df.filter(pl.Series(np.asarray(weight).ravel() > 0))
    per = (
        df.with_columns(r=pl.col("p").rank("average").over("g"))
        .group_by("g")
        .agg(
            n=pl.len(),
            pos=pl.col("y").sum(),
            rpos=(pl.col("r") * pl.col("y")).sum(),
        )
        .with_columns(neg=pl.col("n") - pl.col("pos"))
    )
    both = per.filter((pl.col("pos") > 0) & (pl.col("neg") > 0)).sort("g")  # fixed summation order
    skipped = per.height - both.height
    if both.height == 0:
        return GroupAUC(None, 0, skipped)
    both = both.with_columns(
        auc=(pl.col("rpos") - pl.col("pos") * (pl.col("pos") + 1) / 2)
        / (pl.col("pos") * pl.col("neg"))
    )
    value = float((both["auc"] * both["n"]).sum() / both["n"].sum())
    return GroupAUC(value, both.height, skipped)


def _space(
    y: np.ndarray, p: np.ndarray, weight, sample_weight
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predictions, weights) of the rows the 0/1 mask ``weight`` keeps."""
    y, p = _as_arrays(y, p)
    w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, np.float64).ravel()
    if weight is not None:
        keep = np.asarray(weight).ravel() > 0
        y, p, w = y[keep], p[keep], w[keep]
    return y, p, w


def logloss(
    y: np.ndarray,
    p: np.ndarray,
    weight: np.ndarray | None = None,
    eps: float = 1e-7,
    sample_weight: np.ndarray | None = None,
) -> float | None:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 − eps] (weighted by
    ``sample_weight`` ``[N]`` when given: Σ w·ll / Σ w); None on an empty space."""
    y, p, w = _space(y, p, weight, sample_weight)
    if y.size == 0 or w.sum() <= 0:
        return None
    p = np.clip(p, eps, 1 - eps)
    return float(-(w * (y * np.log(p) + (1 - y) * np.log1p(-p))).sum() / w.sum())


def calibration(
    y: np.ndarray,
    p: np.ndarray,
    weight: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> float | None:
    """Calibration ratio Σp / Σy (1.0 = calibrated on average; > 1 over-predicts); Σw·p / Σw·y
    with ``sample_weight`` ``[N]``."""
    y, p, w = _space(y, p, weight, sample_weight)
    if (w * y).sum() == 0:
        return None
    return float((w * p).sum() / (w * y).sum())
