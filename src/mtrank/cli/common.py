"""What the command modules share: the consoles, the common options, metric tables, option
parsing. Part of the CLI layer; nothing below :mod:`mtrank.cli` imports it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mtrank.data.datasets import DATASETS
from mtrank.errors import ConfigError

# Wide enough for the metric tables when output goes to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

DatasetOpt = Annotated[str | None, typer.Option("--dataset", "-d", help=f"built-in dataset: {', '.join(DATASETS)}")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="a CSV/Parquet file (with --schema)")]
SchemaOpt = Annotated[str | None, typer.Option("--schema", help="schema YAML, or a built-in dataset name")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="folder holding the built-in datasets (default: $MTRANK_DATA_DIR, else ./data)")]
FunnelOpt = Annotated[str | None, typer.Option("--funnel-violations", help="conversion without click: 'error' (default) or 'drop'")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
SUMMARY = ["auc_ctr", "auc_cvr_masked", "auc_ctcvr", "gauc_ctr", "logloss_ctr", "logloss_cvr_masked", "logloss_ctcvr", "calib_ctcvr", "auc_cvr_entire_truth", "cvr_bias_entire"]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _metric_table(title: str, rows: dict[str, dict], keys: list[str] | None = None) -> Table:
    keys = keys or [k for k in SUMMARY if any(k in r for r in rows.values())]
    if not keys:  # plain multi-task data (e.g. census): auc_<task>, logloss_<task>
        keys = [k for k in next(iter(rows.values()), {}) if k.startswith(("auc_", "logloss_"))]
    table = Table(title=title)
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[_fmt(r.get(k)) for k in keys])
    return table


def _tower(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--tower takes comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise ConfigError(f"--tower needs positive sizes, got {text!r}")
    return sizes


def _check_choice(value: str | None, choices, option: str) -> None:
    if value is not None and value not in choices:
        raise ConfigError(f"{option} must be one of {sorted(choices)}, got {value!r}")
