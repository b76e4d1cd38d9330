"""Named metrics of a model's outputs on one split.

Funnel datasets (ESMM paper §3.2 protocol):

* ``auc_ctr``, ``logloss_ctr``, ``calib_ctr``: pCTR vs click, over all impressions;
* ``auc_cvr_masked``, ``logloss_cvr_masked``, ``calib_cvr_masked``: pCVR vs conversion, over
  **clicked impressions only** (the only rows where conversion is observed);
* ``auc_ctcvr``, ``logloss_ctcvr``, ``calib_ctcvr``: pCTCVR vs click ∧ conversion, all impressions;
* ``gauc_ctr`` (and ``gauc_ctcvr``) per user when the schema has a user id;
* with the simulator's ground truth (``true_cvr`` / ``true_ctr`` columns): ``cvr_bias_entire``
  (mean pCVR − true CVR over all impressions), ``cvr_bias_clicked``, ``cvr_bias_unclicked``
  and ``auc_cvr_entire_truth`` (AUC of pCVR at telling impressions whose true CVR is above the
  median from the rest, over all impressions): the direct measures of sample selection bias.

Plain multi-task datasets: ``auc_<task>``, ``logloss_<task>``, ``calib_<task>``.
"""

from __future__ import annotations

import numpy as np

from mtrank.data.schema import Schema
from mtrank.metrics.core import auc, calibration, gauc, logloss


def evaluate_outputs(
    outputs: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    schema: Schema,
    side: dict[str, np.ndarray] | None = None,
) -> dict[str, float | int | None]:
    """Compute every metric for one split.

    Args:
        outputs: model outputs ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (funnel) or ``p_<task>``, ``[N]``.
        labels: ``click``, ``conversion``, ``ctcvr`` (funnel) or task names, ``[N]`` 0/1.
        schema: the dataset schema (says which side columns are user ids and ground truth).
        side: side columns by name (user ids, ``true_cvr`` …), ``[N]`` each.

    Returns:
        A flat dict of named metrics; a metric that is undefined on this split is None.
    """
    side = side or {}
    m: dict[str, float | int | None] = {}
    if schema.is_funnel:
        click, conv, ctcvr = labels["click"], labels["conversion"], labels["ctcvr"]
        m["n_impressions"] = int(click.size)
        m["n_clicks"] = int(click.sum())
        m["n_conversions"] = int(ctcvr.sum())
        spaces = {
            "ctr": (click, outputs["p_ctr"], None),
            "cvr_masked": (conv, outputs["p_cvr"], click),
            "ctcvr": (ctcvr, outputs["p_ctcvr"], None),
        }
        for name, (y, p, w) in spaces.items():
            m[f"auc_{name}"] = auc(y, p, w)
            m[f"logloss_{name}"] = logloss(y, p, w)
            m[f"calib_{name}"] = calibration(y, p, w)
        if schema.user_id is not None and schema.user_id in side:
            for name in ("ctr", "ctcvr"):
                g = gauc(spaces[name][0], spaces[name][1], side[schema.user_id])
                m[f"gauc_{name}"] = g.value
                m[f"gauc_{name}_users"] = g.groups_used
                m[f"gauc_{name}_skipped"] = g.groups_skipped
        if "true_cvr" in side:
            true_cvr = np.asarray(side["true_cvr"], dtype=np.float64)
            p_cvr = np.asarray(outputs["p_cvr"], dtype=np.float64)
            m["cvr_bias_entire"] = float((p_cvr - true_cvr).mean())
            clicked = click > 0
            m["cvr_bias_clicked"] = float((p_cvr[clicked] - true_cvr[clicked]).mean()) if clicked.any() else None
            m["cvr_bias_unclicked"] = float((p_cvr[~clicked] - true_cvr[~clicked]).mean()) if (~clicked).any() else None
            high = (true_cvr > np.median(true_cvr)).astype(np.float64)
            m["auc_cvr_entire_truth"] = auc(high, p_cvr)
    else:
        for task in schema.tasks:
            y, p = labels[task], outputs[f"p_{task}"]
            m[f"n_{task}_positive"] = int(y.sum())
            m[f"auc_{task}"] = auc(y, p)
            m[f"logloss_{task}"] = logloss(y, p)
            m[f"calib_{task}"] = calibration(y, p)
        m["n_rows"] = int(next(iter(labels.values())).size) if labels else 0
    return m


CALIBRATION_BINS = 10


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Equal-count bins of ``p`` (``[N]`` probabilities, labels ``y`` ``[N]`` 0/1): mean
    predicted ``pred``, observed rate ``obs`` and count ``n`` per bin (lists)."""
    order = np.argsort(p, kind="stable")
    pred, obs, n = [], [], []
    for idx in np.array_split(order, min(bins, max(len(p), 1))):
        if len(idx):
            pred.append(float(p[idx].mean()))
            obs.append(float(y[idx].mean()))
            n.append(len(idx))
    return {"pred": pred, "obs": obs, "n": n}


def calibration_curves(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], schema: Schema) -> dict[str, dict]:
    """Reliability bins (:func:`reliability_bins`) and the calibration ratio Σp / Σy per task:
    ``ctr``, ``cvr (clicked)`` (clicked rows only) and ``ctcvr`` on funnel data, else each task.
    What a run saves so that the report need not score the data again."""
    labels = {k: np.asarray(v, dtype=np.float64) for k, v in labels.items()}
    if schema.is_funnel:
        click = labels["click"] > 0
        pairs = {"ctr": (labels["click"], outputs["p_ctr"], None), "cvr (clicked)": (labels["conversion"], outputs["p_cvr"], click),
                 "ctcvr": (labels["ctcvr"], outputs["p_ctcvr"], None)}
    else:
        pairs = {t: (labels[t], outputs[f"p_{t}"], None) for t in labels if f"p_{t}" in outputs}
    out = {}
    for task, (y, p, mask) in pairs.items():
        p = np.asarray(p, dtype=np.float64)
        if mask is not None:
            y, p = y[mask], p[mask]
        if len(y) == 0:
            continue
        curve = reliability_bins(y, p)
        curve["ratio"] = float(p.sum() / y.sum()) if y.sum() > 0 else None
        out[task] = curve
    return out
