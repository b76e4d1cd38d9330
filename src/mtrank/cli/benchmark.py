"""``mtrank benchmark``: the model zoo side by side under one protocol (see
:mod:`mtrank.benchmark`); ``mtrank sweep``: the regime map (:mod:`mtrank.sweep`). Registered by
:mod:`mtrank.cli`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from mtrank.cli.common import (
    ConfigOpt,
    DataDirOpt,
    DeviceOpt,
    PrecisionOpt,
    QuietOpt,
    _str,
    _tower,
    device_flags,
    resolve_config,
)
from mtrank.errors import ConfigError
from mtrank.io_utils import atomic_write_bytes, atomic_write_json

# Options that benchmark and sweep share (same flag, same help).
ModelsOpt = Annotated[str, typer.Option(help="comma-separated registry names")]
UsersOpt = Annotated[int | None, typer.Option(help="simulator: users")]
ItemsOpt = Annotated[int | None, typer.Option(help="simulator: items")]
SelectionOpt = Annotated[float | None, typer.Option(help="simulator: feature dependence of λ")]
FuseGridOpt = Annotated[int, typer.Option(help="fusion grid values per parameter (n³ points)")]


def _options(items: list[str] | None) -> dict[str, dict]:
    """``model.key=value`` strings → ``{model: {key: value}}`` (value parsed as JSON if it can
    be)."""
    out: dict[str, dict] = {}
    for item in items or []:
        head, sep, raw = item.partition("=")
        model, dot, key = head.partition(".")
        if not sep or not dot or not model or not key:
            raise ConfigError(
                f"--option takes model.key=value (e.g. mmoe.n_experts=8), got {item!r}"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(model, {})[key] = value
    return out


def benchmark(
    ctx: typer.Context,
    config: ConfigOpt = None,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="built-in dataset (or the config's data.dataset)"),
    ] = None,
    models: ModelsOpt = "esmm,base",
    repeats: Annotated[int, typer.Option(help="training seeds per simulator seed")] = 2,
    epochs: Annotated[int, typer.Option(help="maximum epochs (early stopping on validation)")] = 3,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="folder for benchmark.json / benchmark.md")
    ] = None,
    rows: Annotated[
        int, typer.Option(help="simulated impressions per simulator seed (simulated only)")
    ] = 200_000,
    preset: Annotated[
        str, typer.Option(help="simulator preset: default, aliccp-like, dense (simulated only)")
    ] = "default",
    sim_seeds: Annotated[
        int, typer.Option(help="simulator seeds (new mall and log each; simulated only)")
    ] = 1,
    first_sim_seed: Annotated[
        int, typer.Option(help="first simulator seed (to split a long benchmark over processes)")
    ] = 0,
    ctr: Annotated[float | None, typer.Option(help="simulator: target mean CTR")] = None,
    cvr: Annotated[
        float | None, typer.Option(help="simulator: target mean CVR given click")
    ] = None,
    n_users: UsersOpt = None,
    n_items: ItemsOpt = None,
    intent: Annotated[float | None, typer.Option(help="simulator: intent strength λ")] = None,
    selection: SelectionOpt = None,
    sharing: Annotated[
        float | None, typer.Option(help="simulator: click/conversion driver sharing ρ")
    ] = None,
    item_zipf: Annotated[
        float | None, typer.Option(help="simulator: Zipf exponent of item popularity")
    ] = None,
    slate_size: Annotated[
        int | None, typer.Option(help="simulator: candidates per request")
    ] = None,
    select: Annotated[
        str,
        typer.Option(
            help="model-selection rule for every model: a validation metric (maximised) or 'loss'"
        ),
    ] = "auc_ctcvr",
    reference: Annotated[
        str, typer.Option(help="model the others are paired against ('' = none)")
    ] = "base",
    shared_ctr: Annotated[
        bool,
        typer.Option(
            "--shared-ctr/--no-shared-ctr",
            help="the paper's shared CTR network for non-entire-space pCTCVR",
        ),
    ] = True,
    fuse_k: Annotated[
        int | None, typer.Option(help="simulator: expected GMV@K after tuning a fusion per model")
    ] = None,
    fuse_grid: FuseGridOpt = 4,
    test_fraction: Annotated[
        float, typer.Option(help="share of rows (latest, by time) that test")
    ] = 0.5,
    patience: int = 1,
    batch_size: Annotated[
        int | None, typer.Option(help="rows per step (default: the dataset's)")
    ] = None,
    lr: float = 1e-3,
    embedding_dim: int = 18,
    tower: Annotated[str, typer.Option(help="MLP sizes (paper: 360,200,80)")] = "360,200,80",
    option: Annotated[
        list[str] | None, typer.Option("--option", help="model knob, model.key=value; repeatable")
    ] = None,
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default)")] = 0,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    quiet: QuietOpt = False,
) -> None:
    """Train the models on one split per simulator seed under one protocol; print a markdown
    table with paired differences against the reference; write JSON."""
    from mtrank.benchmark import log_to_stderr, report_markdown, run_benchmark

    run_cfg = resolve_config(
        ctx,
        config,
        {
            **device_flags(device, precision),
            "dataset": ("data.dataset", dataset),
            "data_dir": ("data.data_dir", lambda: _str(data_dir)),
            "rows": ("data.simulator.rows", rows),
            "batch_size": ("training.batch_size", batch_size),
            "epochs": ("training.epochs", epochs),
            "lr": ("training.lr", lr),
            "seed": ("training.seed", seed),
            "threads": ("training.threads", threads),
            "embedding_dim": ("model.embedding_dim", embedding_dim),
            "tower": ("model.tower", lambda: _tower(tower)),
        },
    )
    if run_cfg.data.dataset is None:
        raise ConfigError("give --dataset (a built-in dataset) or a --config with data.dataset")
    dataset = run_cfg.data.dataset
    data_dir = Path(run_cfg.data.data_dir) if run_cfg.data.data_dir else None
    if config is not None and batch_size is None:
        batch_size = run_cfg.training.batch_size
    options = (
        {run_cfg.model.name: run_cfg.model.options}
        if config is not None and run_cfg.model.options
        else {}
    )
    knobs = {
        "ctr": ctr,
        "cvr": cvr,
        "n_users": n_users,
        "n_items": n_items,
        "intent": intent,
        "selection": selection,
        "sharing": sharing,
        "item_zipf": item_zipf,
        "slate_size": slate_size,
    }
    cfg = _benchmark_config(
        dataset=dataset,
        models=models,
        repeats=repeats,
        epochs=run_cfg.training.epochs,
        batch_size=batch_size,
        lr=run_cfg.training.lr,
        embedding_dim=run_cfg.model.embedding_dim,
        tower=run_cfg.model.tower,
        option=option,
        base_options=options,
        rows=run_cfg.data.simulator.rows,
        seed=run_cfg.training.seed,
        threads=run_cfg.training.threads,
        preset=preset,
        knobs=knobs,
        sim_seeds=sim_seeds,
        first_sim_seed=first_sim_seed,
        select=select,
        reference=reference,
        shared_ctr=shared_ctr,
        fuse_k=fuse_k,
        fuse_grid=fuse_grid,
        test_fraction=test_fraction,
        patience=patience,
        device=run_cfg.training.device,
        precision=run_cfg.training.precision,
    )
    out = out or Path("runs") / "benchmark" / dataset
    save_partial = lambda res: atomic_write_json(res, out / "benchmark.partial.json")
    results, timings = run_benchmark(
        cfg, data_dir, log=None if quiet else log_to_stderr, partial=save_partial
    )
    command = "mtrank " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = report_markdown(results, command)
    atomic_write_json(results, out / "benchmark.json")
    (out / "benchmark.partial.json").unlink(missing_ok=True)
    atomic_write_json(timings, out / "timings.json")
    atomic_write_bytes(md.encode(), out / "benchmark.md")
    typer.echo(md)
    if not quiet:
        print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}", file=sys.stderr)


def _benchmark_config(
    *,
    models: str,
    tower: str | list[int],
    option,
    knobs: dict,
    reference: str,
    base_options: dict | None = None,
    **kw,
):
    """A validated :class:`~mtrank.benchmark.BenchmarkConfig` from CLI values (knobs left
    unset keep the preset's)."""
    from mtrank.benchmark import BenchmarkConfig

    names = [m.strip() for m in models.split(",") if m.strip()]
    sim = {k: v for k, v in knobs.items() if v is not None}
    sizes = _tower(tower) if isinstance(tower, str) else list(tower)
    return BenchmarkConfig(
        models=names,
        tower=sizes,
        options={**(base_options or {}), **_options(option)},
        sim=sim,
        reference=reference or None,
        **kw,
    )


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option} needs at least one value")
    return values


def sweep(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for sweep.json, sweep.md and the heatmaps")
    ] = Path("runs/sweep"),
    models: ModelsOpt = "esmm,esmm_ns,base,escm2_dr",
    cvr: Annotated[
        str, typer.Option(help="conversion densities (CVR given click), comma-separated")
    ] = "0.01,0.04,0.15",
    intent: Annotated[
        str, typer.Option(help="selection strengths λ, comma-separated")
    ] = "0,0.75,1.5",
    sharing: Annotated[
        str, typer.Option(help="driver sharing ρ values, comma-separated")
    ] = "0,0.6",
    preset: Annotated[
        str, typer.Option(help="simulator preset the other knobs come from")
    ] = "dense",
    rows: Annotated[
        int, typer.Option(help="simulated impressions per cell and simulator seed")
    ] = 200_000,
    n_users: UsersOpt = None,
    n_items: ItemsOpt = None,
    selection: SelectionOpt = None,
    repeats: Annotated[int, typer.Option(help="training seeds per cell and simulator seed")] = 2,
    sim_seeds: Annotated[int, typer.Option(help="simulator seeds per cell")] = 1,
    epochs: int = 2,
    select: Annotated[str, typer.Option(help="model-selection rule for every model")] = "auc_ctcvr",
    reference: str = "base",
    fuse_k: Annotated[
        int | None, typer.Option(help="expected GMV@K after fusion tuning (0 = off)")
    ] = 10,
    fuse_grid: FuseGridOpt = 4,
    test_fraction: float = 0.5,
    batch_size: int = 2048,
    lr: float = 1e-3,
    embedding_dim: int = 18,
    tower: str = "360,200,80",
    seed: int = 0,
    threads: int = 0,
    quiet: QuietOpt = False,
) -> None:
    """The regime map: benchmark every (density × selection × sharing) cell, paired against the
    reference; write sweep.json, sweep.md and one heatmap PNG per metric."""
    from mtrank.benchmark import log_to_stderr
    from mtrank.report.plots import regime_heatmap
    from mtrank.sweep import SweepConfig, run_sweep, sweep_markdown

    base = _benchmark_config(
        dataset="simulated",
        models=models,
        repeats=repeats,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        embedding_dim=embedding_dim,
        tower=tower,
        option=None,
        rows=rows,
        seed=seed,
        threads=threads,
        preset=preset,
        sim_seeds=sim_seeds,
        select=select,
        knobs={"n_users": n_users, "n_items": n_items, "selection": selection},
        reference=reference,
        shared_ctr=False,
        fuse_k=fuse_k or None,
        fuse_grid=fuse_grid,
        test_fraction=test_fraction,
    )
    cfg = SweepConfig(
        base=base,
        cvr=_floats(cvr, "--cvr"),
        intent=_floats(intent, "--intent"),
        sharing=_floats(sharing, "--sharing"),
    )
    doc = run_sweep(cfg, out / "sweep.json", log=None if quiet else log_to_stderr)
    command = "mtrank " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    doc["command"] = command
    atomic_write_json(doc, out / "sweep.json")
    atomic_write_bytes(sweep_markdown(doc, command).encode(), out / "sweep.md")
    for metric in doc["metrics"]:
        atomic_write_bytes(
            regime_heatmap(doc, metric, dpi=110), out / f"regime_{metric.replace('@', '_at_')}.png"
        )
    typer.echo(sweep_markdown(doc, command))
