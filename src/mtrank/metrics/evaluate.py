"""Named metrics of a model's outputs on one split.

Funnel datasets (ESMM paper §3.2 protocol):

* ``auc_ctr``, ``logloss_ctr``, ``calib_ctr``: pCTR vs click, over all impressions;
* ``auc_cvr_masked``, ``logloss_cvr_masked``, ``calib_cvr_masked``: pCVR vs conversion, over
  **clicked impressions only** (the only rows where conversion is observed);
* ``auc_ctcvr``, ``logloss_ctcvr``, ``calib_ctcvr``: pCTCVR vs click ∧ conversion, all impressions;
* ``gauc_ctr`` (and ``gauc_ctcvr``) per user when the schema has a user id;
* with the simulator's exact ground truth (:data:`mtrank.data.simulate.TRUTH_COLUMNS`), metrics
  named ``<kind>_<truth>_<rows>``: ``auc_cvr_clicked_all`` and ``auc_cvr_do_all`` (soft AUC,
  :func:`~mtrank.metrics.core.soft_auc`, of pCVR against ``true_cvr_clicked`` = p(conv | click, x),
  what ESMM and BASE estimate, and against ``true_cvr_do`` = p(conv | do(click), x), the
  counterfactual CVR of ESCM², over all impressions), and ``bias_cvr_clicked_{all,clicked,
  unclicked}``, ``bias_cvr_do_{all,clicked,unclicked}`` (mean pCVR − truth over those rows):
  the direct measures of sample selection bias.

Plain multi-task datasets: ``auc_<task>``, ``logloss_<task>``, ``calib_<task>``.
"""

from __future__ import annotations

import numpy as np

from mtrank.data.schema import Schema
from mtrank.metrics.core import auc, calibration, gauc, logloss, soft_auc


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
        if "true_cvr_clicked" in side and "true_cvr_do" in side:
            m.update(truth_metrics(np.asarray(outputs["p_cvr"], dtype=np.float64), click > 0, side))
    else:
        for task in schema.tasks:
            y, p = labels[task], outputs[f"p_{task}"]
            m[f"n_{task}_positive"] = int(y.sum())
            m[f"auc_{task}"] = auc(y, p)
            m[f"logloss_{task}"] = logloss(y, p)
            m[f"calib_{task}"] = calibration(y, p)
        m["n_rows"] = int(next(iter(labels.values())).size) if labels else 0
    return m


TRUTH_METRICS = [
    "auc_cvr_clicked_all", "auc_cvr_do_all",
    "bias_cvr_clicked_all", "bias_cvr_clicked_clicked", "bias_cvr_clicked_unclicked",
    "bias_cvr_do_all", "bias_cvr_do_clicked", "bias_cvr_do_unclicked",
]


def truth_metrics(p_cvr: np.ndarray, clicked: np.ndarray, side: dict[str, np.ndarray]) -> dict[str, float | None]:
    """pCVR ``[N]`` against the simulator's ``true_cvr_clicked`` and ``true_cvr_do`` ``[N]``
    (``clicked``: ``[N]`` bool). Keys: :data:`TRUTH_METRICS` (None where the rows are empty)."""
    m: dict[str, float | None] = {}
    rows = {"all": np.ones(p_cvr.size, bool), "clicked": clicked, "unclicked": ~clicked}
    for truth in ("cvr_clicked", "cvr_do"):
        t = np.asarray(side[f"true_{truth}"], dtype=np.float64)
        m[f"auc_{truth}_all"] = soft_auc(t, p_cvr)
        for name, keep in rows.items():
            m[f"bias_{truth}_{name}"] = float((p_cvr[keep] - t[keep]).mean()) if keep.any() else None
    return m
