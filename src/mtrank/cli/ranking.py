"""The ranking commands: ``mtrank quadrants`` and ``mtrank fuse`` (registered by
:mod:`mtrank.cli`)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.table import Table

from mtrank.bundle import Bundle
from mtrank.cli.common import (
    DataDirOpt,
    DataOpt,
    DatasetOpt,
    ConfigOpt,
    SchemaOpt,
    _check_choice,
    _fmt,
    _str,
    console,
    err,
    resolve_config,
)
from mtrank.data.schema import Schema
from mtrank.data.split import SplitConfig, split_data
from mtrank.errors import ConfigError, DataError
from mtrank.io_utils import atomic_write_bytes, atomic_write_json
from mtrank.ranking.fusion import Single, ctr_only_fusions, save_fusion
from mtrank.ranking.quadrants import (
    ctr_axis_stats,
    near_constant_axes,
    QUADRANT_NAMES,
    assign_quadrants,
    entity_stats,
    plot_quadrants,
    quadrant_table,
    thresholds,
)
from mtrank.ranking.replay import (
    PREDICTION_COLUMNS,
    bootstrap_lift,
    per_request,
    replay_defaults,
    replay_from_frame,
    top_k_share,
)
from mtrank.ranking.tune import TuneConfig, tune
from mtrank.workflow import load_data, predictions_frame, resolve_schema

_defaults = replay_defaults

OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="output directory")]


def _from_config(ctx, config, dataset, data, schema, data_dir, bundle) -> tuple:
    """(dataset, data, schema, data_dir, bundle): the flags, or with ``--config`` the config's
    keys with the flags given on the command line written over them."""
    if config is None:
        return dataset, data, schema, data_dir, bundle
    cfg = resolve_config(
        ctx,
        config,
        {
            "dataset": ("data.dataset", dataset),
            "data": ("data.paths", lambda: [str(data)] if data else None),
            "schema": ("data.schema", schema),
            "data_dir": ("data.data_dir", lambda: _str(data_dir)),
            "bundle": ("export.out", lambda: _str(bundle)),
        },
    )
    d = cfg.data
    if len(d.paths) > 1:
        raise ConfigError("data.paths (--data) takes one file here")
    path = Path(d.paths[0]) if d.paths else None
    return (
        d.dataset,
        path,
        d.schema_,
        (Path(d.data_dir) if d.data_dir else None),
        Path(cfg.export.out),
    )


def _columns(text: str | None) -> list[str] | None:
    if text is None:
        return None
    cols = [c.strip() for c in text.split(",") if c.strip()]
    if not cols:
        raise ConfigError(f"expected comma-separated column names, got {text!r}")
    return cols


def _load(
    dataset, data, schema, data_dir, bundle_path, split
) -> tuple[pl.DataFrame, pl.DataFrame, Schema, Bundle | None, str]:
    """(selected split, all rows, schema, bundle, source) with p_ctr / p_cvr attached when a
    bundle is given. ``split``: ``all``, or ``test`` re-derived with the bundle's split config."""
    _check_choice(split, ("all", "test"), "--split")
    bundle = Bundle.load(bundle_path) if bundle_path is not None else None
    if dataset is None and data is None:
        raise ConfigError(
            "give the rows to analyse: --dataset (a built-in dataset) or --data (a file)"
        )
    if bundle is not None:
        sch = bundle.schema
        name = dataset
    else:
        sch = resolve_schema(schema, dataset) if (schema or data) else None
        name = dataset
    loaded = load_data(name if data is None else None, data=data, schema=sch, data_dir=data_dir)
    sch = loaded.schema
    everything = (
        pl.concat(list(loaded.splits.values()), how="diagonal_relaxed")
        if len(loaded.splits) > 1
        else next(iter(loaded.splits.values()))
    )
    if split == "test":
        cfg = (
            SplitConfig.model_validate(bundle.meta.get("split", {}))
            if bundle is not None
            else SplitConfig()
        )
        frame = split_data(loaded, cfg)["test"]
    else:
        frame = everything
    source = ", ".join(loaded.sources.values())
    if bundle is not None:
        frame = _attach_predictions(bundle, frame, source)
    return frame, everything, sch, bundle, source


def _attach_predictions(bundle: Bundle, frame: pl.DataFrame, source: str) -> pl.DataFrame:
    preds = predictions_frame(bundle, frame, source)
    missing = [c for c in PREDICTION_COLUMNS if c not in preds.columns]
    if missing == ["p_cvr"] and not bundle.schema.is_funnel:  # CTR-only: pCTR, no fake pCVR
        return frame.with_columns(preds.get_column("p_ctr"))
    if missing:
        if "score" in preds.columns:  # a ranker (LTR) with its own score: nothing to fuse
            raise ConfigError(
                f"model {bundle.model_config.name!r} ranks by its own score and has no "
                "pCTR/pCVR to fuse; compare it with fused rankings in "
                "benchmarks/ltr_side_by_side.py (docs/ltr.md)"
            )
        raise ConfigError(
            f"the bundle does not predict {missing}: fusion needs a funnel model (ESMM)"
        )
    return frame.with_columns(preds.get_column(c) for c in PREDICTION_COLUMNS)


def _write_csv(df: pl.DataFrame, path: Path) -> Path:
    return atomic_write_bytes(df.write_csv().encode(), path)


def _table(title: str, df: pl.DataFrame, cols: list[str]) -> Table:
    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="left" if df.schema[c] == pl.String else "right")
    for row in df.select(cols).iter_rows():
        t.add_row(*[_fmt(v) for v in row])
    return t


def quadrants(
    ctx: typer.Context,
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    schema: SchemaOpt = None,
    data_dir: DataDirOpt = None,
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", "-b", help="add mean predicted pCTR / pCVR per entity"),
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(
            help="entity column(s), comma-separated and combined (default: item id; Hillstrom "
            "segment,channel,history_segment)"
        ),
    ] = None,
    value: Annotated[
        str | None,
        typer.Option("--value-col", help="GMV of a converted row (default: the schema's price)"),
    ] = None,
    price: Annotated[
        str | None, typer.Option("--price-col", help="column averaged as mean_price")
    ] = None,
    mean_of: Annotated[
        str | None,
        typer.Option(help="further numeric column(s) to average per entity and quadrant"),
    ] = None,
    threshold: Annotated[
        str, typer.Option(help="axis split: 'mean' (exposure-weighted) or 'median'")
    ] = "mean",
    split: Annotated[
        str, typer.Option(help="rows to analyse: all, or the bundle's test split")
    ] = "all",
    out: OutDirOpt = Path("runs/quadrants"),
) -> None:
    """Four-quadrant CTR × CVR analysis of items (or shops, segments …): tables, JSON and a plot."""
    dataset, data, schema, data_dir, bundle = _from_config(
        ctx, config, dataset, data, schema, data_dir, bundle
    )
    _check_choice(threshold, ("mean", "median"), "--threshold")
    frame, _, sch, b, source = _load(dataset, data, schema, data_dir, bundle, split)
    if not sch.is_funnel and sch.click is not None:
        _ctr_axis(frame, sch, b, _columns(by) or _defaults(sch)["by"], threshold, source, out)
        return
    if not sch.is_funnel:
        raise ConfigError(
            f"schema {sch.name!r} has no click → conversion funnel; quadrants need one"
        )
    d = _defaults(sch)
    by_cols = _columns(by) or d["by"]
    if not by_cols:
        raise ConfigError(f"schema {sch.name!r} has no item id: give entity column(s) with --by")
    value_col = value if value is not None else d["value"]
    price_col = price if price is not None else d["price"]
    extra = _columns(mean_of) or []
    notes = []
    if value_col is None:
        notes.append(
            f"no price/amount column in {sch.name!r}: GMV, GMV share and mean price are n/a"
        )
    stats, priors = entity_stats(
        frame,
        by_cols,
        click=sch.click,
        conversion=sch.conversion,
        value=value_col,
        price=price_col,
        mean_of=extra,
        p_ctr="p_ctr" if b else None,
        p_cvr="p_cvr" if b else None,
    )
    cut = thresholds(stats, threshold)
    stats = assign_quadrants(stats, cut)
    table = quadrant_table(stats, extra)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(table, out / "quadrants.csv")
    _write_csv(stats, out / "entities.csv")
    plot_quadrants(
        stats, cut, out / "quadrants.png", f"{sch.name}: {' × '.join(by_cols)} (size ∝ impressions)"
    )
    doc = {
        **_doc_head(sch, source, frame, by_cols, stats),
        "value_column": value_col,
        "price_column": price_col,
        "threshold_method": threshold,
        "thresholds": cut,
        "smoothing": {
            "method": "Beta prior by the method of moments (trial-weighted, sampling variance "
            "removed); rate = (successes + alpha) / (trials + alpha + beta)",
            "ctr": asdict(priors["ctr"]),
            "cvr": asdict(priors["cvr"]),
        },
        "quadrants": table.to_dicts(),
        "notes": notes,
        "warnings": near_constant_axes(stats),
    }
    atomic_write_json(doc, out / "quadrants.json")
    cols = [
        c
        for c in table.columns
        if c not in ("description",)
        and not (value_col is None and c in ("gmv", "gmv_share", "mean_price"))
    ]
    console.print(
        _table(
            f"{sch.name}: {stats.height:,} entities by {' × '.join(by_cols)}; CTR ≥ "
            f"{cut['ctr']:.4f}, CVR ≥ {cut['cvr']:.4f} is high",
            table,
            cols,
        )
    )
    for q in table.get_column("quadrant"):
        console.print(f"  {q}: {QUADRANT_NAMES[q]}")
    for n in notes:
        err.print(f"[yellow]note: {n}[/yellow]")
    for w in doc["warnings"]:
        err.print(f"[yellow]warning: {w}[/yellow]")
    console.print(f"wrote {out}/quadrants.csv, entities.csv, quadrants.json, quadrants.png")


def _doc_head(sch, source, frame, by_cols, stats) -> dict:
    """The first keys of quadrants.json: dataset, source, rows, entity columns, entities."""
    return {
        "dataset": sch.name,
        "source": source,
        "rows": frame.height,
        "entity": by_cols,
        "entities": stats.height,
    }


CVR_AXIS_NOTE = (
    "the CVR axis needs a conversion stage (declare `conversion`, or a funnel of ≥ 2 stages); "
    "this data is CTR-only, so entities are split on the CTR axis alone"
)


def _ctr_axis(frame, sch, b, by_cols, threshold, source, out: Path) -> None:
    """``mtrank quadrants`` on CTR-only data: the CTR axis (high / low), and a note that the
    CVR axis needs a conversion stage."""
    if not by_cols:
        raise ConfigError(f"schema {sch.name!r} has no item id: give entity column(s) with --by")
    stats, prior = ctr_axis_stats(frame, by_cols, click=sch.click, p_ctr="p_ctr" if b else None)
    if threshold == "mean":
        w = pl.col("impressions").cast(pl.Float64)
        cut = float(stats.select((pl.col("ctr") * w).sum() / w.sum()).item())
    else:
        cut = float(stats.get_column("ctr").median())
    stats = stats.with_columns(
        pl.when(pl.col("ctr") > cut).then(pl.lit("high")).otherwise(pl.lit("low")).alias("axis")
    )
    table = (
        stats.group_by("axis")
        .agg(pl.len().alias("entities"), pl.col("impressions").sum(), pl.col("clicks").sum())
        .with_columns((pl.col("clicks") / pl.col("impressions")).alias("ctr"))
        .sort("axis")
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(stats, out / "entities.csv")
    warnings = near_constant_axes(stats)
    doc = {
        **_doc_head(sch, source, frame, by_cols, stats),
        "threshold_method": threshold,
        "thresholds": {"ctr": cut, "cvr": None},
        "smoothing": {"ctr": asdict(prior), "cvr": None},
        "ctr_axis": table.to_dicts(),
        "cvr_axis": None,
        "notes": [CVR_AXIS_NOTE],
        "warnings": warnings,
    }
    atomic_write_json(doc, out / "quadrants.json")
    console.print(
        _table(
            f"{sch.name}: {stats.height:,} entities by {' × '.join(by_cols)}; CTR > {cut:.4f} "
            "is high",
            table,
            table.columns,
        )
    )
    err.print(f"[yellow]note: {CVR_AXIS_NOTE}[/yellow]")
    for w in warnings:
        err.print(f"[yellow]warning: {w}[/yellow]")
    console.print(f"wrote {out}/entities.csv, quadrants.json")


_replay_data = replay_from_frame


def _plot_frontier(
    trials: pl.DataFrame,
    frontier: pl.DataFrame,
    refs: dict[str, dict],
    best: dict,
    k: int,
    objective: str,
    path: Path,
    floor: float | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clicks = f"{'exp_clicks' if objective == 'exp_gmv' else 'clicks'}@{k}"
    gmv = f"{objective}@{k}"
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    ax.scatter(
        trials.get_column("clicks"),
        trials.get_column("gmv"),
        s=8,
        c="lightgrey",
        label="evaluated points",
    )
    ax.plot(
        frontier.get_column("clicks"),
        frontier.get_column("gmv"),
        "-o",
        ms=3,
        c="tab:blue",
        label="Pareto frontier",
    )
    markers = {"pctr": "s", "pctcvr": "^", "expected_gmv": "D", "logged": "v"}
    for name, m in refs.items():
        ax.scatter([m[clicks]], [m[gmv]], marker=markers.get(name, "x"), s=60, label=name, zorder=3)
    ax.scatter(
        [best["clicks"]], [best["gmv"]], marker="*", s=200, c="tab:red", label="chosen", zorder=4
    )
    if floor is not None:
        ax.axvline(
            floor * refs["pctr"][clicks],
            color="k",
            lw=0.8,
            ls="--",
            label=f"click floor ({floor:g} × pCTR-only)",
        )
    ax.set_xlabel(f"{clicks} per request (tuning requests)")
    ax.set_ylabel(f"{gmv} per request (tuning requests)")
    ax.set_title("fusion: clicks vs GMV")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def fuse(
    ctx: typer.Context,
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    schema: SchemaOpt = None,
    data_dir: DataDirOpt = None,
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", "-b", help="score the data with this bundle (labels kept)"),
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="a scored table that also holds the labels (p_ctr, p_cvr, click, conversion, "
            "price)",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="with --bundle: the bundle's 'test' split (default) or 'all' rows")
    ] = "test",
    formula: Annotated[
        str, typer.Option(help="multiplicative, offset_multiplicative, linear, expected_gmv")
    ] = "multiplicative",
    method: Annotated[str, typer.Option(help="optuna (TPE, seeded) or grid")] = "optuna",
    k: Annotated[int, typer.Option("--k", help="cut-off K", min=1)] = 10,
    objective: Annotated[
        str, typer.Option(help="gmv (labels) or exp_gmv (true probabilities; simulator)")
    ] = "gmv",
    click_floor: Annotated[
        float, typer.Option(help="keep clicks@K ≥ this × pCTR-only clicks@K (0: no constraint)")
    ] = 0.97,
    trials: Annotated[int, typer.Option(help="optuna trials", min=1)] = 200,
    grid_points: Annotated[int, typer.Option(help="grid values per parameter", min=2)] = 9,
    eps: Annotated[float, typer.Option(help="ε of the multiplicative formula (price + ε)")] = 1.0,
    price_col: Annotated[
        str | None, typer.Option(help="the price factor column (default per dataset)")
    ] = None,
    value_col: Annotated[
        str | None, typer.Option(help="GMV of a converted row (default per dataset)")
    ] = None,
    price_policy: Annotated[
        str, typer.Option(help="bad (missing, non-finite, negative) prices: error, clip or drop")
    ] = "error",
    price_floor: Annotated[
        float, typer.Option(help="replacement price under --price-policy clip")
    ] = 0.01,
    pseudo_request_size: Annotated[
        int | None, typer.Option(help="rows per pseudo-request when there is no request id")
    ] = None,
    position_coef: Annotated[
        float | None,
        typer.Option(help="position effect on logit CTR for expected metrics (simulator: 0.35)"),
    ] = None,
    by: Annotated[
        str | None, typer.Option(help="entity column(s) for the quadrant II exposure check")
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="fraction of requests held out for reporting")
    ] = 0.5,
    seed: int = 0,
    out: OutDirOpt = Path("runs/fuse"),
) -> None:
    """Tune a ranking-score fusion of pCTR, pCVR and price offline by replay; write fusion.json."""
    dataset, data, schema, data_dir, bundle = _from_config(
        ctx, config, dataset, data, schema, data_dir, bundle
    )
    _check_choice(method, ("optuna", "grid"), "--method")
    _check_choice(price_policy, ("error", "clip", "drop"), "--price-policy")
    _check_choice(objective, ("gmv", "exp_gmv"), "--objective")
    if predictions is not None:
        from mtrank.data.io import read_table

        if bundle is not None:
            raise ConfigError("give either --predictions or --bundle, not both")
        sch = resolve_schema(schema, dataset)
        frame = read_table(predictions)
        everything, source = frame, str(predictions)
        for c in (sch.click, sch.conversion):
            if c not in frame.columns:
                raise DataError(
                    f"no label column {c!r}: `mtrank predict` output has no labels; use "
                    "--bundle with --dataset/--data instead, or join the labels",
                    file=source,
                )
    else:
        if bundle is None:
            raise ConfigError("give --bundle (with --dataset or --data) or --predictions")
        frame, everything, sch, _, source = _load(dataset, data, schema, data_dir, bundle, split)
    if not sch.is_funnel and sch.click is not None:
        raise ConfigError(
            f"schema {sch.name!r} is CTR-only (one funnel stage): fuse tunes for orders / GMV, "
            f"which need a conversion stage; {ctr_only_fusions()}. Serve one of the former "
            "with `mtrank serve --fusion FILE`"
        )
    d = _defaults(sch)
    price_c = price_col or d["price"]
    value_c = value_col or d["value"]
    rd, keep, info = _replay_data(
        frame,
        sch,
        value_col=value_c,
        price_col=price_c,
        policy=price_policy,
        floor=price_floor,
        pseudo_size=pseudo_request_size or d["pseudo_size"],
        seed=seed,
        source=source,
    )
    if (rd.sizes <= k).all():
        err.print(
            f"[yellow]warning: every request has ≤ {k} candidates, so GMV@{k}, orders@{k} and "
            f"clicks@{k} cannot depend on the ranking (only NDCG can); use a smaller --k or "
            "larger requests[/yellow]"
        )
    cfg = TuneConfig(
        formula=formula,
        method=method,
        k=k,
        objective=objective,
        click_floor=click_floor or None,
        trials=trials,
        grid_points=grid_points,
        holdout=holdout,
        seed=seed,
        fixed={"eps": eps} if formula == "multiplicative" else {},
        position_coef=position_coef if position_coef is not None else d["position_coef"],
    )
    res = tune(rd, cfg, progress=sys.stderr.isatty())
    out.mkdir(parents=True, exist_ok=True)
    summary = _summary(res, k, objective, seed)
    quadrant_info = _quadrant_exposure(
        frame.filter(pl.Series(keep)) if not keep.all() else frame,
        everything,
        sch,
        rd,
        res,
        k,
        _columns(by) or d["by"],
    )
    meta = {
        "k": k,
        "objective": f"{objective}@{k}",
        "click_floor": cfg.click_floor,
        "price_column": price_c,
        "price_policy": price_policy,
        "price_floor": price_floor,
        "dataset": sch.name,
        "source": source,
        "tuned_on": {
            "method": method,
            "trials": res.trials.height,
            "holdout": holdout,
            "seed": seed,
            **info,
        },
        "heldout_vs_pctr": {key: v for key, v in summary.items() if key != "lines"},
    }
    save_fusion(res.best, out / "fusion.json", **meta)
    _write_csv(res.frontier, out / "frontier.csv")
    _write_csv(res.trials, out / "trials.csv")
    best_row = {
        "clicks": res.tuning["fused"][
            f"{'exp_clicks' if objective == 'exp_gmv' else 'clicks'}@{k}"
        ],
        "gmv": res.tuning["fused"][f"{objective}@{k}"],
    }
    _plot_frontier(
        res.trials,
        res.frontier,
        {n: m for n, m in res.tuning.items() if n != "fused"},
        best_row,
        k,
        objective,
        out / "frontier.png",
        cfg.click_floor,
    )
    atomic_write_json(
        {
            "config": asdict(cfg),
            "data": info,
            "rows": int(rd.group.size),
            "requests": rd.n_requests,
            "heldout": res.heldout,
            "tuning": res.tuning,
            "lift": summary,
            "quadrant_II": quadrant_info,
        },
        out / "replay.json",
    )
    keys = [f"gmv@{k}", f"orders@{k}", f"clicks@{k}", f"ndcg@{k}"] + (
        [f"exp_gmv@{k}", f"exp_clicks@{k}"] if rd.true_ctr is not None else []
    )
    t = Table(
        title=f"{sch.name}: held-out requests ({info['requests']}); best {res.best.name} "
        f"{res.best.params}"
    )
    t.add_column("ranking")
    for key in keys:
        t.add_column(key, justify="right")
    for name, m in res.heldout.items():
        t.add_row(name, *[_fmt(m.get(key)) for key in keys])
    console.print(t)
    for line in summary["lines"]:
        console.print(line)
    if quadrant_info:
        console.print(
            f"quadrant II share of top-{k} slots: pCTR-only {quadrant_info['pctr']:.4f} → "
            f"fused {quadrant_info['fused']:.4f}"
        )
    console.print(f"wrote {out}/fusion.json, frontier.csv, trials.csv, replay.json, frontier.png")


def _summary(res, k: int, objective: str, seed: int) -> dict:
    """Relative change of the fused ranking vs pCTR-only on the held-out requests, with a 95 %
    paired bootstrap interval over requests (1000 resamples)."""
    held = res.held
    fused = per_request(
        held,
        res.best.score(held.p_ctr, held.p_cvr, held.price),
        k,
        position_coef=res.config.position_coef,
    )
    base = per_request(
        held,
        Single("ctr").score(held.p_ctr, held.p_cvr, held.price),
        k,
        position_coef=res.config.position_coef,
    )
    out: dict = {}
    for key in fused:
        ci = bootstrap_lift(fused[key], base[key], seed=seed)
        out[f"{key}@{k}_vs_pctr"] = ci
        out.setdefault("lines", []).append(
            f"{key}@{k}: fused {fused[key].mean():.4f} vs pCTR-only {base[key].mean():.4f} per "
            "request: "
            f"{100 * ci['lift']:+.1f}% (95% CI {100 * ci['low']:+.1f}% … {100 * ci['high']:+.1f}%)"
        )
    return out


def _quadrant_exposure(frame, everything, sch, rd, res, k, by_cols) -> dict | None:
    """Share of top-K slots held by quadrant II entities (quadrants from all rows), for the
    pCTR-only and the fused ranking over all replayed requests."""
    if not by_cols or any(c not in frame.columns or c not in everything.columns for c in by_cols):
        return None
    stats, _ = entity_stats(everything, by_cols, click=sch.click, conversion=sch.conversion)
    stats = assign_quadrants(stats, thresholds(stats))
    lab = (
        frame.select(by_cols)
        .with_row_index("_r")
        .join(stats.select([*by_cols, "quadrant"]), on=by_cols, how="left")
        .sort("_r")
    )
    flag = (lab.get_column("quadrant") == "II").fill_null(False).to_numpy()
    fused = res.best.score(rd.p_ctr, rd.p_cvr, rd.price)
    pctr = Single("ctr").score(rd.p_ctr, rd.p_cvr, rd.price)
    return {
        "entity": by_cols,
        "rows_in_quadrant_II": float(flag.mean()),
        "pctr": top_k_share(rd, pctr, flag, k),
        "fused": top_k_share(rd, fused, flag, k),
        "logged": top_k_share(rd, -rd.position, flag, k) if rd.position is not None else None,
    }
