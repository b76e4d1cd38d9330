"""The regime map: where does entire-space learning pay?

One :func:`mtrank.benchmark.run_benchmark` per cell of a grid over the simulator's conversion
density (CVR given click), selection strength (the intent's strength λ, with its feature
dependence fixed by the preset) and click/conversion driver sharing ρ; each cell reports the
paired differences of every model against the reference (BASE) on the same test rows
(:func:`mtrank.benchmark.paired_differences`). The CLI is ``mtrank sweep``; the heatmaps are
:func:`mtrank.report.plots.regime_heatmap`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mtrank.benchmark import BenchmarkConfig, check_config, run_benchmark
from mtrank.errors import ConfigError
from mtrank.io_utils import atomic_write_json

# The metrics a cell reports (paired Δ against the reference), in display order; with
# ``fuse_k`` also ``exp_gmv_fused@K`` (relative Δ in %).
SWEEP_METRICS = ["auc_ctcvr", "auc_cvr_masked", "auc_cvr_clicked_all", "auc_cvr_do_all"]


class SweepConfig(BaseModel):
    """A grid of simulator regimes, each benchmarked with ``base`` (a :class:`BenchmarkConfig`
    on ``dataset="simulated"``; its ``sim`` knobs are the fixed ones).

    Attributes:
        cvr: conversion densities (mean CVR given click). intent: selection strengths λ.
        sharing: driver sharing ρ values. At least one value each; every value range-checked
        like the simulator option of the same name.
    """

    model_config = ConfigDict(extra="forbid")

    base: BenchmarkConfig
    cvr: list[float] = Field(default_factory=lambda: [0.01, 0.04, 0.15])
    intent: list[float] = Field(default_factory=lambda: [0.0, 0.75, 1.5])
    sharing: list[float] = Field(default_factory=lambda: [0.0, 0.6])


def cells(cfg: SweepConfig) -> list[dict[str, float]]:
    """The grid's cells, ``{"cvr", "intent", "sharing"}`` each, density slowest."""
    return [
        {"cvr": c, "intent": i, "sharing": s}
        for c, i, s in itertools.product(cfg.cvr, cfg.intent, cfg.sharing)
    ]


def run_sweep(
    cfg: SweepConfig, out: Path | None = None, log: Callable[[str], None] | None = None
) -> dict:
    """Benchmark every cell; with ``out``, rewrite ``out`` (JSON, atomically) after each cell so
    a stopped sweep keeps what it measured.

    Returns:
        ``{"config", "metrics", "cells": [{"cvr", "intent", "sharing", "split", "paired",
        "summary", "seconds"}]}`` where ``paired`` is :func:`~mtrank.benchmark.paired_differences`
        restricted to :data:`SWEEP_METRICS` (and ``exp_gmv_fused@K``).

    Raises:
        ConfigError: a base config that is not the simulator's, an empty axis, or a value out
        of range (names the option).
    """
    log = log or (lambda _msg: None)
    if cfg.base.dataset != "simulated":
        raise ConfigError(
            f"mtrank sweep runs on the simulator; --dataset {cfg.base.dataset!r} has no "
            "regimes to sweep"
        )
    for axis in ("cvr", "intent", "sharing"):
        if not getattr(cfg, axis):
            raise ConfigError(f"--{axis} needs at least one value")
    grid = cells(cfg)
    for cell in grid:  # range-check every cell before spending any time
        check_config(cfg.base.model_copy(update={"sim": {**cfg.base.sim, **cell}}))
    metrics = SWEEP_METRICS + ([f"exp_gmv_fused@{cfg.base.fuse_k}"] if cfg.base.fuse_k else [])
    doc = {"config": cfg.model_dump(mode="json"), "metrics": metrics, "cells": []}
    for n, cell in enumerate(grid, 1):
        start = time.perf_counter()
        bcfg = cfg.base.model_copy(update={"sim": {**cfg.base.sim, **cell}})
        results, _ = run_benchmark(bcfg)
        keep = lambda d: {k: v for k, v in d.items() if k in metrics}
        doc["cells"].append(
            {
                **cell,
                "split": results["split"],
                "paired": {m: keep(d) for m, d in results["paired"].items()},
                "summary": {m: keep(d) for m, d in results["summary"].items()},
                "warnings": results["warnings"],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        d = results["paired"]
        log(
            f"cell {n}/{len(grid)} {cell}: "
            + ", ".join(
                f"{m} Δauc_ctcvr {v['auc_ctcvr']['mean']:+.4f}"
                for m, v in d.items()
                if "auc_ctcvr" in v
            )
            + f" ({doc['cells'][-1]['seconds']:.0f}s)"
        )
        if out is not None:
            atomic_write_json(doc, out)
    return doc


def sweep_markdown(doc: dict, command: str) -> str:
    """The map as markdown: one table per compared model, a row per cell, a column per metric
    (mean paired Δ ± std, runs better / total)."""
    ref = doc["config"]["base"]["reference"]
    lines = [
        f"# Regime map (paired Δ against `{ref}`)",
        "",
        "Command:",
        "",
        f"```\n{command}\n```",
        "",
    ]
    models = [m for m in doc["config"]["base"]["models"] if m != ref]
    for model in models:
        lines += [
            f"## {model} − {ref}",
            "",
            "| cvr | intent | sharing | Spearman(cvr_clicked, cvr_do) | test conv. | "
            + " | ".join(doc["metrics"])
            + " |",
            "|---:|---:|---:|---:|---:|" + "---:|" * len(doc["metrics"]),
        ]
        for c in doc["cells"]:
            p = c["paired"].get(model, {})
            cells_txt = []
            for key in doc["metrics"]:
                d = p.get(key)
                digits = 2 if key.startswith("exp_gmv") else 4
                cells_txt.append(
                    "n/a"
                    if d is None
                    else f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f} ({d['better']}/{d['n']})"
                )
            sp = c["split"]
            lines.append(
                f"| {c['cvr']} | {c['intent']} | {c['sharing']} | "
                f"{sp.get('spearman_cvr_clicked_do', float('nan')):.3f} | "
                f"{sp.get('conversions_test')} | " + " | ".join(cells_txt) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def merge_sweeps(docs: list[dict]) -> dict:
    """One map from :func:`run_sweep` results over disjoint cells of the same base config (e.g.
    one process per sharing value); the axes are the union of the parts', sorted.

    Raises:
        ConfigError: the parts' base configs differ.
    """
    if any(d["config"]["base"] != docs[0]["config"]["base"] for d in docs):
        raise ConfigError("sweeps to merge must share their base benchmark config")
    config = dict(docs[0]["config"])
    for axis in ("cvr", "intent", "sharing"):
        config[axis] = sorted({v for d in docs for v in d["config"][axis]})
    cells_ = sorted(
        (c for d in docs for c in d["cells"]), key=lambda c: (c["cvr"], c["intent"], c["sharing"])
    )
    return {"config": config, "metrics": docs[0]["metrics"], "cells": cells_}
