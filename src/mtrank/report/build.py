"""Collects what run directories hold and renders the experiment report (one HTML file).

A run directory is recognised by its files (a directory and its direct sub-directories are
searched):

- quickstart run: ``metrics.json`` with ``runs`` / ``summary``, plus bundles ``<model>-seed<k>/``;
- bundle (``mtrank train``): ``config.json`` + ``model.safetensors``;
- benchmark (``mtrank benchmark``): ``benchmark.json`` with ``per_repeat`` / ``summary``;
- quadrants (``mtrank quadrants``): ``quadrants.json`` (+ ``quadrants.png``);
- fusion (``mtrank fuse``): ``fusion.json`` + ``replay.json`` (+ ``frontier.png``).

Sections that do not apply are left out. Everything comes from what the runs saved: metrics,
training histories and the test split's calibration bins (a bundle's ``meta.calibration``); no
data is loaded and nothing is scored again.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import jinja2
import numpy as np

from mtrank.errors import MtrankError
from mtrank.metrics.evaluate import CALIBRATION_BINS, reliability_bins  # noqa: F401 (re-exported)
from mtrank.metrics.summary import fmt as _fmt
from mtrank.metrics.summary import metric_names, summarise
from mtrank.metrics.summary import number as _num

# Comparison-table columns, in this order, when present.
TABLE_KEYS = metric_names("report")
BIAS_KEYS = [
    "bias_cvr_clicked_all",
    "bias_cvr_clicked_clicked",
    "bias_cvr_clicked_unclicked",
    "bias_cvr_do_all",
    "bias_cvr_do_unclicked",
]


def direction(key: str) -> str | None:
    """How a metric's best value is chosen: ``max`` (AUCs), ``min`` (logloss), ``one``
    (calibration ratio, best closest to 1), ``zero`` (bias, closest to 0); None: not ranked."""
    if key.endswith(("_users", "_skipped")):
        return None
    if key.startswith(("auc_", "gauc_")):
        return "max"
    if key.startswith("logloss_"):
        return "min"
    if key.startswith("calib_"):
        return "one"
    if key.startswith("bias_"):
        return "zero"
    return None


def best_rows(values: dict[str, float | None], key: str) -> set[str]:
    """Names of the rows holding the best value of ``key`` (ties all marked)."""
    how = direction(key)
    vals = {n: v for n, v in values.items() if v is not None}
    if how is None or len(vals) < 2:
        return set()
    score = {"max": lambda v: -v, "min": lambda v: v, "one": lambda v: abs(v - 1.0), "zero": abs}[
        how
    ]
    best = min(score(v) for v in vals.values())
    return {n for n, v in vals.items() if abs(score(v) - best) <= 1e-12}


def comparison_table(title: str, summary: dict[str, dict[str, dict]], note: str = "") -> dict:
    """A table dict for the template from ``{model: {metric: {mean, std, n?}}}``."""
    names = dict.fromkeys(k for s in summary.values() for k in s)
    present = [
        k
        for k in names
        if any(_num((s.get(k) or {}).get("mean")) is not None for s in summary.values())
    ]
    keys = [k for k in TABLE_KEYS if k in present]
    if not keys:  # plain multi-task data (census): auc_<task>, logloss_<task>, calib_<task>
        keys = [
            k
            for k in present
            if k.startswith(("auc_", "gauc_", "logloss_", "calib_")) and direction(k) is not None
        ]
    if "auc_ctcvr" not in keys:
        note = ""  # the CTCVR protocol note only applies to funnel data
    best = {
        k: best_rows({m: _num((s.get(k) or {}).get("mean")) for m, s in summary.items()}, k)
        for k in keys
    }
    rows = []
    for m, s in summary.items():
        cells = []
        for k in keys:
            c = s.get(k) or {}
            std = _num(c.get("std")) if int(c.get("n", 1) or 1) > 1 else None
            cells.append({"text": _fmt(_num(c.get("mean")), std), "best": m in best[k]})
        rows.append({"name": m, "cells": cells})
    legend = {"max": "↑", "min": "↓", "one": "→1", "zero": "→0"}
    return {
        "title": title,
        "columns": [{"name": k, "dir": legend.get(direction(k) or "", "")} for k in keys],
        "rows": rows,
        "note": note,
    }


def funnel_rates(m: dict) -> dict | None:
    """CTR, CVR on clicks and CTCVR from a metrics dict's ``n_impressions / n_clicks /
    n_conversions``."""
    imp, clk, conv = (_num(m.get(k)) for k in ("n_impressions", "n_clicks", "n_conversions"))
    if not imp:
        return None
    return {
        "impressions": int(imp),
        "clicks": int(clk or 0),
        "conversions": int(conv or 0),
        "ctr": (clk or 0) / imp,
        "cvr": (conv or 0) / clk if clk else None,
        "ctcvr": (conv or 0) / imp,
    }


def _img(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


@dataclass
class BundleRun:
    """One saved bundle: its directory, model name, seed and config.json."""

    path: Path
    model: str
    seed: int
    config: dict

    @property
    def meta(self) -> dict:
        """The bundle's ``meta`` (training config, metrics, history, calibration)."""
        return self.config.get("meta") or {}


@dataclass
class RunDir:
    """What one run directory holds, by kind."""

    path: Path
    quickstart: dict | None = None
    bundles: list[BundleRun] = field(default_factory=list)
    benchmarks: list[tuple[Path, dict]] = field(default_factory=list)
    quadrants: list[tuple[Path, dict]] = field(default_factory=list)
    fusions: list[tuple[Path, dict, dict]] = field(default_factory=list)
    sweeps: list[tuple[Path, dict]] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        """The kinds of output found (quickstart, bundle, benchmark, quadrants, fuse)."""
        return [
            k
            for k, v in [
                ("quickstart", self.quickstart),
                ("bundle", self.bundles and not self.quickstart),
                ("benchmark", self.benchmarks),
                ("quadrants", self.quadrants),
                ("fuse", self.fusions),
                ("sweep", self.sweeps),
            ]
            if v
        ]


def _bundle(path: Path) -> BundleRun | None:
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        return None
    cfg = _read_json(path / "config.json")
    if cfg is None or "model" not in cfg:
        return None
    seed = ((cfg.get("meta") or {}).get("train") or {}).get("seed", 0)
    return BundleRun(path, (cfg.get("model") or {}).get("name", path.name), int(seed or 0), cfg)


def scan(path: str | Path) -> RunDir:
    """Detect the kinds of output a directory (and its direct sub-directories) holds."""
    path = Path(path)
    run = RunDir(path)
    for d in [path, *sorted(p for p in path.iterdir() if p.is_dir())] if path.is_dir() else []:
        metrics = _read_json(d / "metrics.json")
        if d == path and metrics is not None and "runs" in metrics:
            run.quickstart = metrics
        if (b := _bundle(d)) is not None:
            run.bundles.append(b)
        bench = _read_json(d / "benchmark.json")
        if bench is not None and "per_repeat" in bench:
            run.benchmarks.append((d, bench))
        quad = _read_json(d / "quadrants.json")
        if quad is not None and "quadrants" in quad:
            run.quadrants.append((d, quad))
        fusion, replay = _read_json(d / "fusion.json"), _read_json(d / "replay.json")
        if fusion is not None and "formula" in fusion:
            run.fusions.append((d, fusion, replay or {}))
        sweep = _read_json(d / "sweep.json")
        if sweep is not None and "cells" in sweep:
            run.sweeps.append((d, sweep))
    return run


def collect_runs(paths: list[str | Path]) -> list[RunDir]:
    """Scan each run directory.

    Raises:
        MtrankError: a path is not a directory, or holds nothing the report knows.
    """
    runs = []
    for p in paths:
        if not Path(p).is_dir():
            raise MtrankError(
                f"{p} is not a directory (give run directories: quickstart, train, benchmark, "
                "quadrants or fuse outputs)"
            )
        run = scan(p)
        if not run.kinds:
            raise MtrankError(
                f"{p} holds no metrics.json, bundle config.json, benchmark.json, "
                "quadrants.json, fusion.json or sweep.json"
            )
        runs.append(run)
    return runs


# -- sections -------------------------------------------------------------------------------------
def _command(text: str) -> str:
    """A recorded command line with its program path (``…/mtrank/__main__.py``, ``…/bin/mtrank``)
    shown as ``mtrank``."""
    prog, _, rest = str(text).partition(" ")
    return (
        f"mtrank {rest}".strip()
        if prog.endswith(("__main__.py", "/mtrank", "mtrank"))
        else str(text)
    )


def _metadata(run: RunDir) -> dict:
    first = run.bundles[0].meta if run.bundles else {}
    qs = run.quickstart or {}
    bench = run.benchmarks[0][1] if run.benchmarks else {}
    test = (first.get("metrics") or {}).get("test") or {}
    if not test and qs.get("runs"):
        test = next(iter(qs["runs"].values()))[0]
    if not test and bench:
        test = next(iter(bench["per_repeat"].values()))[0]
    seeds = sorted({b.seed for b in run.bundles}) or (
        list(range(qs["seeds"])) if qs.get("seeds") else []
    )
    versions = {}
    for b in run.bundles:
        versions.update(b.config.get("versions") or {})
    commands = list(
        dict.fromkeys(_command(b.meta["command"]) for b in run.bundles if b.meta.get("command"))
    )
    items = [
        ("kinds", ", ".join(run.kinds)),
        ("dataset", first.get("dataset") or qs.get("dataset") or bench.get("dataset")),
        (
            "sources",
            ", ".join(
                str(v)
                for v in (
                    first.get("sources") or qs.get("sources") or bench.get("sources") or {}
                ).values()
                if v
            ),
        ),
        (
            "rows",
            ", ".join(
                f"{k} {v:,}"
                for k, v in (
                    first.get("rows") or (bench.get("split") or {}).get("rows") or {}
                ).items()
            ),
        ),
        ("split", ", ".join(f"{k}={v}" for k, v in (first.get("split") or {}).items())),
        ("seeds", ", ".join(map(str, seeds))),
        (
            "epochs",
            qs.get("epochs")
            or (first.get("train") or {}).get("epochs")
            or (bench.get("benchmark") or {}).get("epochs"),
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
    ]
    return {
        "path": str(run.path),
        "items": [(k, v) for k, v in items if v not in (None, "", [])],
        "funnel": funnel_rates(test),
        "commands": commands,
    }


def _histories(run: RunDir) -> dict[str, list[dict]]:
    many_seeds = len({b.seed for b in run.bundles}) > 1
    return {
        (f"{b.model} s{b.seed}" if many_seeds else b.model): b.meta.get("history") or []
        for b in run.bundles
        if b.meta.get("history")
    }


def _curve_keys(histories: dict[str, list[dict]]) -> list[str]:
    seen = dict.fromkeys(
        k for h in histories.values() for e in h for k in (e.get("val_metrics") or {})
    )
    funnel = [k for k in ("auc_ctr", "auc_cvr_masked", "auc_ctcvr") if k in seen]
    return funnel or [k for k in seen if k.startswith("auc_")][:3]


def calibration_curves(b: BundleRun) -> dict[str, dict]:
    """Reliability bins and calibration ratio (Σp / Σy) per task of one bundle on its test
    split, as the run saved them (``meta.calibration`` of its config.json; see
    :func:`mtrank.metrics.evaluate.calibration_curves`); nothing is scored again.

    Raises:
        MtrankError: the bundle holds no calibration record (written by an older mtrank, or
            trained without a test split).
    """
    saved = b.meta.get("calibration") or {}
    if not saved.get("tasks"):
        raise MtrankError(
            "the bundle holds no calibration record (no test split, or written by an older "
            "mtrank: retrain it)"
        )
    return saved["tasks"]


def _calibration(run: RunDir) -> dict | None:
    from mtrank.report import plots

    if not run.bundles:
        return None
    seed0 = min(b.seed for b in run.bundles)
    chosen = [b for b in run.bundles if b.seed == seed0]
    curves: dict[str, dict[str, dict]] = {}
    notes = []
    for b in chosen:
        try:
            per_task = calibration_curves(b)
        except MtrankError as exc:
            notes.append(f"{b.path.name}: calibration skipped ({exc})")
            continue
        for task, c in per_task.items():
            curves.setdefault(task, {})[b.model] = c
    if not curves:
        return {"img": None, "table": None, "notes": notes}
    summary = {
        m: {f"calib_{t}": {"mean": curves[t].get(m, {}).get("ratio"), "n": 1} for t in curves}
        for m in dict.fromkeys(b.model for b in chosen)
    }
    table = _ratio_table(summary, list(curves))
    return {
        "img": plots.reliability(curves),
        "table": table,
        "notes": notes,
        "seed": seed0,
        "bins": CALIBRATION_BINS,
    }


def _ratio_table(summary: dict[str, dict[str, dict]], tasks: list[str]) -> dict:
    best = {
        t: best_rows({m: _num(s[f"calib_{t}"]["mean"]) for m, s in summary.items()}, "calib_x")
        for t in tasks
    }
    rows = [
        {
            "name": m,
            "cells": [
                {"text": _fmt(_num(s[f"calib_{t}"]["mean"])), "best": m in best[t]} for t in tasks
            ],
        }
        for m, s in summary.items()
    ]
    return {
        "title": "calibration ratio Σp / Σy on test",
        "columns": [{"name": t, "dir": "→1"} for t in tasks],
        "rows": rows,
        "note": "",
    }


def _bias(summary: dict[str, dict[str, dict]], title: str) -> str | None:
    from mtrank.report import plots

    values = {
        m: {k: _num((s.get(k) or {}).get("mean")) for k in BIAS_KEYS} for m, s in summary.items()
    }
    values = {m: v for m, v in values.items() if any(x is not None for x in v.values())}
    if not values:
        return None
    return plots.grouped_bars(values, title, "mean(pCVR − truth)")


def _gates(bench: dict) -> dict | None:
    from mtrank.report import plots

    gates = bench.get("gates") or {}
    means: dict[str, dict[str, list[float]]] = {}
    rows = []
    for model, reps in gates.items():
        tasks = dict.fromkeys(t for r in reps for t in (r.get("gates") or {}))
        for t in tasks:
            ws = [r["gates"][t]["mean"] for r in reps if t in (r.get("gates") or {})]
            means.setdefault(model, {})[t] = [
                float(x) for x in np.mean(np.asarray(ws, dtype=float), axis=0)
            ]
            ent = [r["gates"][t].get("entropy") for r in reps if t in r.get("gates", {})]
            rows.append(
                {
                    "model": model,
                    "task": t,
                    "weights": ", ".join(f"{w:.3f}" for w in means[model][t]),
                    "entropy": _fmt(_num(float(np.mean(ent))) if ent else None),
                    "max_entropy": _fmt(_num(reps[0]["gates"][t].get("max_entropy"))),
                }
            )
        div = [r["experts"]["divergence"] for r in reps if "experts" in r]
        if div:
            rows[-1]["divergence"] = _fmt(float(np.mean(div)))
    if not means:
        return None
    return {"img": plots.gate_weights(means), "rows": rows}


def _quadrants(path: Path, doc: dict) -> dict:
    table = doc.get("quadrants") or []
    cols = [c for c in (table[0] if table else {}) if c != "description"]
    rows = [
        [
            (
                f"{r[c]:.4g}"
                if isinstance(r.get(c), float)
                else ("n/a" if r.get(c) is None else str(r[c]))
            )
            for c in cols
        ]
        for r in table
    ]
    descr = [(r.get("quadrant"), r.get("description")) for r in table if r.get("description")]
    cut = doc.get("thresholds") or {}
    return {
        "path": str(path),
        "img": _img(path / "quadrants.png"),
        "columns": cols,
        "rows": rows,
        "descriptions": descr,
        "entity": " × ".join(doc.get("entity") or []),
        "entities": doc.get("entities"),
        "thresholds": ", ".join(
            f"{k} ≥ {v:.4f}" for k, v in cut.items() if isinstance(v, (int, float))
        ),
    }


def _fusion(path: Path, fusion: dict, replay: dict) -> dict:
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in (fusion.get("params") or {}).items()
    )
    heldout = replay.get("heldout") or {}
    metrics = list(
        dict.fromkeys(k for v in heldout.values() for k in v if not k.endswith("_requests"))
    )
    rows = [
        [name, *[f"{v[k]:.4f}" if isinstance(v.get(k), float) else "n/a" for k in metrics]]
        for name, v in heldout.items()
    ]
    return {
        "path": str(path),
        "img": _img(path / "frontier.png"),
        "formula": fusion.get("formula"),
        "params": params,
        "objective": fusion.get("objective"),
        "click_floor": fusion.get("click_floor"),
        "tuned_on": fusion.get("tuned_on") or {},
        "lift": (replay.get("lift") or {}).get("lines") or [],
        "columns": ["ranking", *metrics],
        "rows": rows,
    }


def build_context(runs: list[RunDir], *, calibrate: bool = True) -> dict:
    """Everything the template shows, section by section (lists are empty when n/a)."""
    from mtrank import __version__
    from mtrank.report import plots

    ctx: dict = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "runs": [],
        "tables": [],
        "curves": [],
        "calibration": [],
        "bias": [],
        "gates": [],
        "quadrants": [],
        "fusions": [],
        "regimes": [],
    }
    for run in runs:
        name = run.path.name or str(run.path)
        ctx["runs"].append(_metadata(run))
        summaries: list[tuple[str, dict, str]] = []
        if run.quickstart:
            qs = run.quickstart
            summary = {m: summarise(r) for m, r in (qs.get("runs") or {}).items() if r}
            n = qs.get("seeds", 1)
            summaries.append(
                (
                    f"{name}: test metrics, {n} seed(s)" + (" (mean ± std)" if n and n > 1 else ""),
                    summary,
                    "",
                )
            )
        elif run.bundles:
            by_model: dict[str, list[dict]] = {}
            for b in run.bundles:
                by_model.setdefault(b.model, []).append(
                    (b.meta.get("metrics") or {}).get("test") or {}
                )
            summaries.append(
                (f"{name}: test metrics", {m: summarise(r) for m, r in by_model.items()}, "")
            )
        for path, bench in run.benchmarks:
            reps = (bench.get("benchmark") or {}).get("repeats", 1)
            summaries.append(
                (
                    f"{path.name or name}: benchmark on {bench.get('dataset')}, {reps} "
                    "repeat(s) (mean ± std)",
                    bench.get("summary") or {},
                    (bench.get("protocol") or {}).get("auc_ctcvr", ""),
                )
            )
        for title, summary, note in summaries:
            if summary:
                ctx["tables"].append(comparison_table(title, summary, note))
                if (
                    img := _bias(summary, f"{title.split(':')[0]}: entire-space pCVR bias")
                ) is not None:
                    ctx["bias"].append({"title": title.split(":")[0], "img": img})
        hist = _histories(run)
        if hist:
            ctx["curves"].append(
                {"title": name, "img": plots.training_curves(hist, _curve_keys(hist))}
            )
        if calibrate and run.bundles:
            cal = _calibration(run)
            if cal is not None:
                ctx["calibration"].append({"title": name, **cal})
        for _path, bench in run.benchmarks:
            if (g := _gates(bench)) is not None:
                ctx["gates"].append(
                    {"title": f"{_path.name or name} ({bench.get('dataset')})", **g}
                )
        ctx["quadrants"] += [_quadrants(p, d) for p, d in run.quadrants]
        ctx["fusions"] += [_fusion(p, f, r) for p, f, r in run.fusions]
        for p, doc in run.sweeps:
            for metric in doc.get("metrics") or []:
                png = plots.regime_heatmap(doc, metric)
                ctx["regimes"].append(
                    {"path": str(p), "metric": metric, "img": base64.b64encode(png).decode("ascii")}
                )
    return ctx


def render_report(ctx: dict) -> str:
    """The HTML page for a context from :func:`build_context` (autoescaped jinja2 template)."""
    text = (
        resources.files("mtrank.report")
        .joinpath("templates/report.html.j2")
        .read_text(encoding="utf-8")
    )
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    return env.from_string(text).render(**ctx)


def write_report(paths: list[str | Path], out: str | Path, *, calibrate: bool = True) -> Path:
    """Build the report of run directories ``paths`` and write it to ``out`` (atomically).

    Args:
        paths: run directories (quickstart, train, benchmark, quadrants or fuse outputs).
        out: the HTML file to write. calibrate: draw the calibration the bundles recorded.

    Returns:
        The path written.

    Raises:
        MtrankError: a path is not a run directory.
    """
    from mtrank.io_utils import atomic_write_bytes

    runs = collect_runs(list(paths))
    page = render_report(build_context(runs, calibrate=calibrate))
    return atomic_write_bytes(page.encode("utf-8"), Path(out))
