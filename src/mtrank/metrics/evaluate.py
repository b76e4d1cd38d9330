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

Staged funnels (:mod:`mtrank.data.funnel`), per stage ``s``: ``auc_s``, ``logloss_s``,
``calib_s`` (``p_s`` on the rows that reached its ``after`` stage) and ``auc_s_all`` … (``p_s_all``
on all impressions, ``gauc_s_all`` per user), with ``n_s_rows`` / ``n_s_positive`` (and the
``_all`` pair) counting the rows covered and their positives; a funnel of ≥ 2 stages also gets
the three metrics above through ``p_ctr`` / ``p_cvr`` / ``p_ctcvr``. A stage (or task) whose
label is constant on the rows a task of it covers is named once in ``warnings``
(:func:`degenerate_label_warnings`).

Plain multi-task datasets: ``auc_<task>``, ``logloss_<task>``, ``calib_<task>``.

With sample weights ``[N]`` (the schema's weight column, or 1/r on the unclicked rows of a file
whose negatives were kept at rate r), every ``auc_``, ``logloss_`` and ``calib_`` metric is also
reported weighted, under its name plus :data:`~mtrank.metrics.summary.WEIGHTED`
(``auc_ctr_weighted`` …): weighted AUC counts each (positive, negative) pair w_i·w_j; GAUC stays
unweighted.

Each evaluated task is declared once (:class:`EvalTask`, like TorchRec's ``RecTaskInfo``): its
label, its prediction, the rows its metrics cover and which metrics; :func:`eval_tasks` gives a
schema's tasks, and the metrics and the calibration curves are both derived from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtrank.data.schema import Schema
from mtrank.metrics.core import auc, calibration, gauc, logloss, soft_auc
from mtrank.metrics.summary import WEIGHTED


@dataclass(frozen=True)
class EvalTask:
    """One evaluated task.

    Attributes:
        name: the metrics' suffix (``auc_<name>`` …): ``ctr``, ``cvr_masked``, ``ctcvr`` or a
            plain task's name.
        label: the label key, ``[N]`` 0/1.
        prediction: the model output key, ``[N]`` probabilities (``p_ctr`` …).
        rows: the label key whose 1-rows the metrics cover (``click`` for CVR: conversion is
            only observed after a click); None covers every row.
        gauc: also report the per-user GAUC when the schema has a user id.
        curve: the task's name in calibration plots.
    """

    name: str
    label: str
    prediction: str
    rows: str | None = None
    gauc: bool = False
    curve: str = ""


# The ESMM paper's protocol (§3.2): CTR and CTCVR over all impressions, CVR over clicked ones.
FUNNEL_TASKS = (
    EvalTask("ctr", "click", "p_ctr", gauc=True, curve="ctr"),
    EvalTask("cvr_masked", "conversion", "p_cvr", rows="click", curve="cvr (clicked)"),
    EvalTask("ctcvr", "ctcvr", "p_ctcvr", gauc=True, curve="ctcvr"),
)


def stage_eval_tasks(stages: list[str], parents: list[int]) -> tuple[EvalTask, ...]:
    """Per stage ``s`` of a staged funnel (:mod:`mtrank.data.funnel`): ``s`` (``p_s`` vs the
    label on the rows that reached the ``after`` stage; every row for the first stage) and
    ``s_all`` (``p_s_all`` vs "reached s" on all impressions, with GAUC)."""
    out = []
    for s, parent in zip(stages, parents, strict=True):
        rows = None if parent < 0 else f"{stages[parent]}_all"
        out.append(EvalTask(s, s, f"p_{s}", rows=rows, curve=s))
        out.append(EvalTask(f"{s}_all", f"{s}_all", f"p_{s}_all", gauc=True, curve=f"{s} (all)"))
    return tuple(out)


FUNNEL_NAMES = frozenset(t.name for t in FUNNEL_TASKS)


def eval_tasks(schema: Schema) -> tuple[EvalTask, ...]:
    """The tasks evaluated on a schema's data: the funnel's three (a staged funnel of ≥ 2
    stages keeps them, through its ``p_ctr`` / ``p_cvr`` / ``p_ctcvr``), then the stages' of
    :func:`stage_eval_tasks`; or one per plain task."""
    staged = stage_eval_tasks(schema.stage_names, schema.stage_parents)
    if schema.is_funnel:
        return FUNNEL_TASKS + staged
    if staged:
        return staged
    return tuple(EvalTask(t, t, f"p_{t}", curve=t) for t in schema.tasks)


def degenerate_label_warnings(labels: dict[str, np.ndarray], schema: Schema) -> list[str]:
    """One line per funnel stage (or plain task) whose label is constant on the rows one of its
    tasks covers: its AUC is undefined and a model learns nothing there (e.g. every row clicked
    in a log without impressions). A stage is named once, by the widest such rows, with the
    AUCs left undefined; a staged funnel's ``p_ctr`` / ``p_cvr`` / ``p_ctcvr`` aliases are not
    named again. The line does not name the split: the caller knows it.

    Args:
        labels: label arrays ``[N]`` 0/1 by key (``click``, ``conversion``, ``ctcvr``, the
            stages' ``s`` and ``s_all``, or the plain tasks').
        schema: the dataset schema (its stages, or tasks, and their label columns).
    """
    out = []
    for kind, name, column, tasks in _label_groups(schema):
        constant = []
        for t in tasks:
            if t.label not in labels:
                continue
            y = np.asarray(labels[t.label])
            if t.rows is not None:
                y = y[np.asarray(labels[t.rows]) > 0]
            if y.size and y.min() == y.max():
                constant.append((t, y))
        if not constant:
            continue
        # the widest rows first: "0 on every row" says more than "0 on every clicked row"
        t, y = next(((t, y) for t, y in constant if t.rows is None), constant[0])
        where = (
            "every row"
            if t.rows is None
            else f"every row that reached {t.rows.removesuffix('_all')!r}"
        )
        aucs = ", ".join(f"auc_{c.name}" for c, _ in constant)
        out.append(
            f"{kind} {name!r} (column {column!r}) is {int(y[0])} on {where} ({y.size:,} rows): "
            f"nothing to learn or rank ({aucs} undefined)"
        )
    return out


def _label_groups(schema: Schema) -> list[tuple[str, str, str, tuple[EvalTask, ...]]]:
    """(``stage`` or ``task``, its name, its label column, its evaluated tasks) per funnel stage
    or plain task: a staged funnel's ``s`` and ``s_all``; the two-stage shorthand's click (CTR)
    and conversion (CVR on clicked rows, CTCVR)."""
    if schema.is_staged:
        tasks = stage_eval_tasks(schema.stage_names, schema.stage_parents)
        return [
            (
                "stage",
                s.stage,
                s.label,
                tuple(t for t in tasks if t.name in (s.stage, f"{s.stage}_all")),
            )
            for s in schema.stages
        ]
    if schema.is_funnel:
        ctr, cvr, ctcvr = FUNNEL_TASKS
        return [
            ("stage", "click", schema.click, (ctr,)),
            ("stage", "conversion", schema.conversion, (cvr, ctcvr)),
        ]
    return [("task", t, col, (EvalTask(t, t, f"p_{t}"),)) for t, col in schema.tasks.items()]


def evaluate_outputs(
    outputs: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    schema: Schema,
    side: dict[str, np.ndarray] | None = None,
    weight: np.ndarray | None = None,
) -> dict[str, float | int | None]:
    """Compute every metric for one split.

    Args:
        outputs: model outputs ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (funnel) or ``p_<task>``, ``[N]``.
        labels: ``click``, ``conversion``, ``ctcvr`` (funnel) or task names, ``[N]`` 0/1.
        schema: the dataset schema (says which side columns are user ids and ground truth).
        side: side columns by name (user ids, ``true_cvr_do`` …), ``[N]`` each.
        weight: optional sample weights ``[N]`` ≥ 0: the ``*_weighted`` metrics are added.

    Returns:
        A flat dict of named metrics; a metric that is undefined on this split is None.
    """
    side = side or {}
    m: dict[str, float | int | None] = {}
    if schema.is_funnel or schema.is_staged:
        click = labels["click"]
        m["n_impressions"] = int(click.size)
        m["n_clicks"] = int(click.sum())
        if schema.is_funnel:
            m["n_conversions"] = int(labels["ctcvr"].sum())
        tasks = eval_tasks(schema)
        for t in tasks:
            y, p, w = (
                labels[t.label],
                outputs[t.prediction],
                (None if t.rows is None else labels[t.rows]),
            )
            if schema.is_staged and t.name not in FUNNEL_NAMES:
                m[f"n_{t.name}_rows"] = int(y.size if w is None else (w > 0).sum())
                m[f"n_{t.name}_positive"] = int(y.sum() if w is None else (y * (w > 0)).sum())
            m[f"auc_{t.name}"] = auc(y, p, w)
            m[f"logloss_{t.name}"] = logloss(y, p, w)
            m[f"calib_{t.name}"] = calibration(y, p, w)
            m.update(weighted_metrics(t.name, y, p, w, weight))
        warnings = degenerate_label_warnings(labels, schema)
        if warnings:
            m["warnings"] = warnings  # type: ignore[assignment]
        if schema.user_id is not None and schema.user_id in side:
            for t in (t for t in tasks if t.gauc):
                g = gauc(labels[t.label], outputs[t.prediction], side[schema.user_id])
                m[f"gauc_{t.name}"] = g.value
                m[f"gauc_{t.name}_users"] = g.groups_used
                m[f"gauc_{t.name}_skipped"] = g.groups_skipped
        if "true_cvr_clicked" in side and "true_cvr_do" in side and "p_cvr" in outputs:
            m.update(truth_metrics(np.asarray(outputs["p_cvr"], dtype=np.float64), click > 0, side))
    else:
        for t in eval_tasks(schema):
            y, p = labels[t.label], outputs[t.prediction]
            m[f"n_{t.name}_positive"] = int(y.sum())
            m[f"auc_{t.name}"] = auc(y, p)
            m[f"logloss_{t.name}"] = logloss(y, p)
            m[f"calib_{t.name}"] = calibration(y, p)
            m.update(weighted_metrics(t.name, y, p, None, weight))
        m["n_rows"] = int(next(iter(labels.values())).size) if labels else 0
        warnings = degenerate_label_warnings(labels, schema)
        if warnings:
            m["warnings"] = warnings  # type: ignore[assignment]
    return m


def weighted_metrics(
    name: str, y: np.ndarray, p: np.ndarray, rows: np.ndarray | None, weight: np.ndarray | None
) -> dict[str, float | None]:
    """``auc_``, ``logloss_``, ``calib_<name>`` + :data:`WEIGHTED` of one task over the 0/1
    ``rows`` mask with sample weights ``weight`` ``[N]``; empty when ``weight`` is None."""
    if weight is None:
        return {}
    return {
        f"auc_{name}{WEIGHTED}": auc(y, p, rows, sample_weight=weight),
        f"logloss_{name}{WEIGHTED}": logloss(y, p, rows, sample_weight=weight),
        f"calib_{name}{WEIGHTED}": calibration(y, p, rows, sample_weight=weight),
    }


TRUTH_METRICS = [
    "auc_cvr_clicked_all",
    "auc_cvr_do_all",
    "bias_cvr_clicked_all",
    "bias_cvr_clicked_clicked",
    "bias_cvr_clicked_unclicked",
    "bias_cvr_do_all",
    "bias_cvr_do_clicked",
    "bias_cvr_do_unclicked",
]


def truth_metrics(
    p_cvr: np.ndarray, clicked: np.ndarray, side: dict[str, np.ndarray]
) -> dict[str, float | None]:
    """pCVR ``[N]`` against the simulator's ``true_cvr_clicked`` and ``true_cvr_do`` ``[N]``
    (``clicked``: ``[N]`` bool). Keys: :data:`TRUTH_METRICS` (None where the rows are empty)."""
    m: dict[str, float | None] = {}
    rows = {"all": np.ones(p_cvr.size, bool), "clicked": clicked, "unclicked": ~clicked}
    for truth in ("cvr_clicked", "cvr_do"):
        t = np.asarray(side[f"true_{truth}"], dtype=np.float64)
        m[f"auc_{truth}_all"] = soft_auc(t, p_cvr)
        for name, keep in rows.items():
            m[f"bias_{truth}_{name}"] = (
                float((p_cvr[keep] - t[keep]).mean()) if keep.any() else None
            )
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


def calibration_curves(
    outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], schema: Schema
) -> dict[str, dict]:
    """Reliability bins (:func:`reliability_bins`) and the calibration ratio Σp / Σy per task of
    :func:`eval_tasks` over the rows it covers: ``ctr``, ``cvr (clicked)`` and ``ctcvr`` on
    funnel data, else each task. What a run saves so that the report need not score the data
    again."""
    labels = {k: np.asarray(v, dtype=np.float64) for k, v in labels.items()}
    out = {}
    for t in eval_tasks(schema):
        if t.label not in labels or t.prediction not in outputs:
            continue
        task, y, p = t.curve, labels[t.label], np.asarray(outputs[t.prediction], dtype=np.float64)
        if t.rows is not None:
            covered = labels[t.rows] > 0
            y, p = y[covered], p[covered]
        if len(y) == 0:
            continue
        curve = reliability_bins(y, p)
        curve["ratio"] = float(p.sum() / y.sum()) if y.sum() > 0 else None
        out[task] = curve
    return out
