"""Matplotlib figures of the report, each returned as a base64 PNG string (no files, no network)."""

from __future__ import annotations

import base64
import io
import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

DPI = 80


def to_base64(fig) -> str:
    """Encode a figure as base64 PNG and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def training_curves(histories: dict[str, list[dict]], auc_keys: list[str]) -> str:
    """Train loss, val loss and val AUC(s) per epoch; one line per run label.

    Args:
        histories: {label: bundle meta ``history`` (list of per-epoch dicts)}.
        auc_keys: validation metrics to plot, one panel each (e.g. ``auc_ctr``).
    """
    panels = [("train_loss", "train loss"), ("val_loss", "val loss")] + [
        (k, f"val {k}") for k in auc_keys
    ]
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for label, hist in histories.items():
            xs, ys = [], []
            for h in hist:
                v = (
                    h.get(key)
                    if key in ("train_loss", "val_loss")
                    else (h.get("val_metrics") or {}).get(key)
                )
                if isinstance(v, (int, float)):
                    xs.append(h["epoch"])
                    ys.append(v)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def reliability(curves: dict[str, dict[str, dict]]) -> str:
    """Predicted vs observed rate per bin, one panel per task, one line per model.

    Args:
        curves: {task: {model: {"pred": [...], "obs": [...], "n": [...]}}}.
    """
    tasks = list(curves)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        hi = 0.0
        for model, c in curves[task].items():
            pred, obs = np.asarray(c["pred"]), np.asarray(c["obs"])
            if len(pred):
                ax.plot(pred, obs, marker="o", markersize=4, label=model)
                hi = max(hi, float(pred.max()), float(obs.max()))
        hi = hi * 1.05 or 1.0
        ax.plot([0, hi], [0, hi], color="grey", linestyle="--", linewidth=1, label="calibrated")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_title(f"{task}: predicted vs observed")
        ax.set_xlabel("mean predicted (bin)")
        ax.set_ylabel("observed rate (bin)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def grouped_bars(
    values: dict[str, dict[str, float | None]], title: str, ylabel: str, zero_line: bool = True
) -> str:
    """Grouped bar chart: groups are the outer keys (models), bars the inner keys (series)."""
    groups = list(values)
    series = list(dict.fromkeys(k for v in values.values() for k in v))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(
        figsize=(min(12.0, max(5.0, 0.45 * len(groups) * max(len(series), 1) + 2)), 3.6)
    )
    x = np.arange(len(groups))
    for i, s in enumerate(series):
        ys = [values[g].get(s) for g in groups]
        ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            [y if y is not None else np.nan for y in ys],
            width,
            label=s,
        )
    if zero_line:
        ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def gate_weights(gates: dict[str, dict[str, list[float]]]) -> str:
    """Mean gate weight per expert per task, one panel per model.

    Args:
        gates: {model: {task: [mean weight per expert]}}.
    """
    models = list(gates)
    fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes.flat, models):
        tasks = list(gates[model])
        n_exp = max(len(w) for w in gates[model].values())
        width = 0.8 / max(len(tasks), 1)
        x = np.arange(n_exp)
        for i, task in enumerate(tasks):
            w = gates[model][task]
            ax.bar(np.arange(len(w)) + (i - (len(tasks) - 1) / 2) * width, w, width, label=task)
        ax.axhline(1 / n_exp, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(x, [f"e{j}" for j in x])
        ax.set_title(f"{model}: mean gate weight")
        ax.set_xlabel("expert (dashed: uniform)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def regime_heatmap(doc: dict, metric: str, dpi: int = DPI) -> bytes:
    """The regime map of one metric as PNG bytes: one panel per (compared model, sharing ρ),
    conversion density (CVR given click) down, selection strength λ across, colour = mean paired
    Δ against the reference (diverging, 0 = white), each cell annotated with Δ and the count of
    runs in which the model beat the reference.

    Args:
        doc: :func:`mtrank.sweep.run_sweep`'s result. metric: a key of its ``metrics``.
    """
    cfg = doc["config"]
    ref = cfg["base"]["reference"]
    models = [m for m in cfg["base"]["models"] if m != ref]
    cvrs, intents, sharings = cfg["cvr"], cfg["intent"], cfg["sharing"]
    grid = {(c["cvr"], c["intent"], c["sharing"]): c for c in doc["cells"]}
    vals = np.full((len(models), len(sharings), len(cvrs), len(intents)), np.nan)
    wins = np.zeros_like(vals)
    runs = np.zeros_like(vals)
    for (mi, m), (si, s), (ci, c), (ii, i) in itertools.product(
        enumerate(models), enumerate(sharings), enumerate(cvrs), enumerate(intents)
    ):
        d = grid.get((c, i, s), {}).get("paired", {}).get(m, {}).get(metric)
        if d is not None:
            vals[mi, si, ci, ii], wins[mi, si, ci, ii], runs[mi, si, ci, ii] = (
                d["mean"],
                d["better"],
                d["n"],
            )
    lim = np.nanmax(np.abs(vals)) if np.isfinite(vals).any() else 1.0
    lim = lim or 1.0
    fig, axes = plt.subplots(
        len(models),
        len(sharings),
        figsize=(2.9 * len(sharings) + 1.0, 2.7 * len(models) + 0.6),
        squeeze=False,
    )
    fig.subplots_adjust(hspace=0.5)
    unit = " (%)" if metric.startswith("exp_gmv") else ""
    for mi, si in itertools.product(range(len(models)), range(len(sharings))):
        ax = axes[mi, si]
        im = ax.imshow(
            vals[mi, si], cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto"
        )
        for ci, ii in itertools.product(range(len(cvrs)), range(len(intents))):
            v = vals[mi, si, ci, ii]
            if np.isfinite(v):
                text = f"{v:+.2f}" if unit else f"{v:+.3f}"
                ax.text(
                    ii,
                    ci,
                    f"{text}\n{int(wins[mi, si, ci, ii])}/{int(runs[mi, si, ci, ii])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                )
        ax.set_xticks(range(len(intents)), [f"{i:g}" for i in intents])
        ax.set_yticks(range(len(cvrs)), [f"{c:g}" for c in cvrs])
        ax.set_title(f"{models[mi]} − {ref}, ρ = {sharings[si]:g}", fontsize=9)
        if mi == len(models) - 1:
            ax.set_xlabel("selection strength λ")
        if si == 0:
            ax.set_ylabel("CVR given click")
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"Δ {metric}{unit}")
    fig.suptitle(
        f"Paired Δ {metric} against {ref} (annotation: Δ, runs better / runs)", fontsize=10
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
