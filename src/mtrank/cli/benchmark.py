"""``mtrank benchmark``: the model zoo side by side under the ESMM paper's protocol
(see :mod:`mtrank.benchmark`). Registered by :mod:`mtrank.cli`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from mtrank.cli.common import ConfigOpt, DataDirOpt, QuietOpt, _str, _tower, resolve_config
from mtrank.errors import ConfigError
from mtrank.io_utils import atomic_write_json


def _options(items: list[str] | None) -> dict[str, dict]:
    """``model.key=value`` strings → ``{model: {key: value}}`` (value parsed as JSON if it can be)."""
    out: dict[str, dict] = {}
    for item in items or []:
        head, sep, raw = item.partition("=")
        model, dot, key = head.partition(".")
        if not sep or not dot or not model or not key:
            raise ConfigError(f"--option takes model.key=value (e.g. mmoe.n_experts=8), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(model, {})[key] = value
    return out


def benchmark(
    ctx: typer.Context,
    config: ConfigOpt = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="built-in dataset (or the config's data.dataset)")] = None,
    models: Annotated[str, typer.Option(help="comma-separated registry names")] = "esmm,base",
    repeats: Annotated[int, typer.Option(help="training seeds; mean ± std over them")] = 2,
    epochs: Annotated[int, typer.Option(help="maximum epochs (early stopping on validation)")] = 3,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="folder for benchmark.json / benchmark.md")] = None,
    rows: Annotated[int, typer.Option(help="simulated impressions (simulated only)")] = 200_000,
    batch_size: Annotated[int | None, typer.Option(help="rows per step (default: the dataset's)")] = None,
    lr: float = 1e-3,
    embedding_dim: int = 18,
    tower: Annotated[str, typer.Option(help="MLP sizes (paper: 360,200,80)")] = "360,200,80",
    option: Annotated[list[str] | None, typer.Option("--option", help="model knob, model.key=value; repeatable")] = None,
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default)")] = 0,
    data_dir: DataDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train the models on one split under the ESMM paper's protocol; print a markdown table,
    write JSON."""
    from mtrank.benchmark import BenchmarkConfig, log_to_stderr, report_markdown, run_benchmark

    cfg = resolve_config(ctx, config, {
        "dataset": ("data.dataset", dataset), "data_dir": ("data.data_dir", lambda: _str(data_dir)),
        "rows": ("data.simulator.rows", rows), "batch_size": ("training.batch_size", batch_size),
        "epochs": ("training.epochs", epochs), "lr": ("training.lr", lr), "seed": ("training.seed", seed),
        "threads": ("training.threads", threads), "embedding_dim": ("model.embedding_dim", embedding_dim),
        "tower": ("model.tower", lambda: _tower(tower)),
    })
    if cfg.data.dataset is None:
        raise ConfigError("give --dataset (a built-in dataset) or a --config with data.dataset")
    dataset, rows, seed, lr, epochs = cfg.data.dataset, cfg.data.simulator.rows, cfg.training.seed, cfg.training.lr, cfg.training.epochs
    data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else None
    threads, embedding_dim = cfg.training.threads, cfg.model.embedding_dim
    if config is not None and batch_size is None:
        batch_size = cfg.training.batch_size
    options = {cfg.model.name: cfg.model.options} if config is not None and cfg.model.options else {}
    names = [m.strip() for m in models.split(",") if m.strip()]
    cfg = BenchmarkConfig(
        dataset=dataset, models=names, repeats=repeats, epochs=epochs, batch_size=batch_size, lr=lr,
        embedding_dim=embedding_dim, tower=cfg.model.tower, options={**options, **_options(option)}, rows=rows, seed=seed, threads=threads,
    )
    out = out or Path("runs") / "benchmark" / dataset
    if dataset == "simulated" and data_dir is None:
        data_dir = out / "data"
    results, timings = run_benchmark(cfg, data_dir, log=None if quiet else log_to_stderr)
    command = "mtrank " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = report_markdown(results, command)
    atomic_write_json(results, out / "benchmark.json")
    atomic_write_json(timings, out / "timings.json")
    (out / "benchmark.md").write_text(md)
    typer.echo(md)
    if not quiet:
        print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}", file=sys.stderr)
