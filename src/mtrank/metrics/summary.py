"""The one place that names the reported metrics, summarises repeated runs and formats numbers.

Used by the CLI's tables, the benchmark's markdown and the HTML report alike.
"""

from __future__ import annotations

import math
import statistics

# Every named metric a table may show, in display order, with the views that show it:
# c = the CLI's compact tables, b = the benchmark's markdown, r = the HTML report.
_METRICS = (
    ("auc_ctr", "cbr"),
    ("auc_cvr_masked", "cbr"),
    ("auc_ctcvr", "cbr"),
    ("auc_ctcvr_own", "b"),
    ("gauc_ctr", "cbr"),
    ("gauc_cvr_masked", "br"),
    ("gauc_ctcvr", "br"),
    ("logloss_ctr", "cbr"),
    ("logloss_cvr_masked", "cbr"),
    ("logloss_ctcvr", "cbr"),
    ("calib_ctr", "r"),
    ("calib_cvr_masked", "r"),
    ("calib_ctcvr", "cr"),
    # the simulator's exact truths (mtrank.metrics.evaluate.truth_metrics), named by truth and rows
    ("auc_cvr_clicked_all", "cbr"),
    ("auc_cvr_do_all", "cbr"),
    ("bias_cvr_clicked_all", "cbr"),
    ("bias_cvr_clicked_unclicked", "r"),
    ("bias_cvr_do_all", "br"),
    ("bias_cvr_do_unclicked", "br"),
    # with sample weights (a schema weight column, or 1/r on the unclicked rows of a file whose
    # negatives were sampled at rate r): the same metrics, each row weighted (WEIGHTED suffix)
    ("auc_ctr_weighted", "cbr"),
    ("auc_cvr_masked_weighted", "br"),
    ("auc_ctcvr_weighted", "cbr"),
    ("logloss_ctr_weighted", "cbr"),
    ("logloss_cvr_masked_weighted", "br"),
    ("logloss_ctcvr_weighted", "cbr"),
    ("calib_ctr_weighted", "cr"),
    ("calib_cvr_masked_weighted", "r"),
    ("calib_ctcvr_weighted", "cr"),
)
WEIGHTED = "_weighted"  # suffix of a metric computed with sample weights
# Per stage s of a staged funnel (mtrank.data.funnel; mtrank.metrics.evaluate.stage_eval_tasks),
# shown after the fixed metrics above, stage by stage.
_STAGE_METRICS = (
    ("auc_{}", "cbr"),
    ("auc_{}_all", "cbr"),
    ("gauc_{}_all", "br"),
    ("logloss_{}", "br"),
    ("logloss_{}_all", "br"),
    ("calib_{}", "r"),
    ("calib_{}_all", "r"),
)
METRIC_NAMES: tuple[str, ...] = tuple(name for name, _ in _METRICS)
VIEWS = {"cli": "c", "benchmark": "b", "report": "r"}


def metric_names(view: str, stages: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The metric names a view shows (``cli``, ``benchmark`` or ``report``), in display order,
    followed by the per-stage metrics of a staged funnel's ``stages``.

    Raises:
        KeyError: an unknown view.
    """
    flag = VIEWS[view]
    fixed = [name for name, views in _METRICS if flag in views]
    return fixed + [p.format(s) for s in stages for p, views in _STAGE_METRICS if flag in views]


def number(v) -> float | None:
    """``v`` as a float when it is a finite int or float (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def summarise(runs: list[dict]) -> dict[str, dict[str, float | int]]:
    """Mean, sample standard deviation (0 for one run) and count of every numeric metric over
    runs (seeds or repeats); non-numeric and non-finite values are left out, as are metrics with
    no numeric value. Keys keep their first-seen order.

    Returns:
        ``{metric: {"mean": float, "std": float, "n": int}}``.
    """
    out: dict[str, dict[str, float | int]] = {}
    for k in dict.fromkeys(k for r in runs for k in r):
        vals = [v for r in runs if (v := number(r.get(k))) is not None]
        if vals:
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[k] = {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}
    return out


def fmt(value, std: float | None = None, digits: int = 4) -> str:
    """A table cell: ``n/a`` for None, floats with ``digits`` decimals (``mean ± std`` when
    ``std`` is given), anything else as ``str``."""
    if value is None:
        return "n/a"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.{digits}f}" if std is None else f"{value:.{digits}f} ± {std:.{digits}f}"
