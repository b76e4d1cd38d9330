"""What the command modules share: the consoles, the common options, metric tables, option
parsing. Part of the CLI layer; nothing below :mod:`mtrank.cli` imports it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mtrank.config import RunConfig, load_config
from mtrank.data.datasets import DATASETS
from mtrank.errors import ConfigError
from mtrank.metrics.summary import fmt as _fmt
from mtrank.metrics.summary import metric_names

# Wide enough for the metric tables when output goes to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", "-d", help=f"built-in dataset: {', '.join(DATASETS)}")
]
DataOpt = Annotated[Path | None, typer.Option("--data", help="a CSV/Parquet file (with --schema)")]
SchemaOpt = Annotated[
    str | None, typer.Option("--schema", help="schema YAML, or a built-in dataset name")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="folder holding the built-in datasets (default: $MTRANK_DATA_DIR, else ./data)",
    ),
]
FunnelOpt = Annotated[
    str | None,
    typer.Option(
        "--funnel-violations", help="conversion without click: 'error' (default) or 'drop'"
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace an existing, non-empty --out whole")
]
ParquetOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="forward-pass precision: fp32, bf16 or fp16 (loss and weights stay fp32)",
    ),
]
BundleOpt = Annotated[
    Path | None,
    typer.Option(
        "--bundle", "-b", help="bundle directory (default: the config's export.out, runs/model)"
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="run config YAML (see `mtrank config init`); the flags given on the command line "
        "override its keys",
    ),
]
SUMMARY = metric_names("cli")


def _metric_table(
    title: str, rows: dict[str, dict], keys: list[str] | None = None, stages: list[str] = ()
) -> Table:
    shown = metric_names("cli", stages) if stages else SUMMARY
    keys = keys or [k for k in shown if any(k in r for r in rows.values())]
    if not keys:  # plain multi-task data (e.g. census): auc_<task>, logloss_<task>
        keys = [k for k in next(iter(rows.values()), {}) if k.startswith(("auc_", "logloss_"))]
    table = Table(title=title)
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[_fmt(r.get(k)) for k in keys])
    return table


def _print_warnings(metrics: dict[str, dict]) -> None:
    """Print the ``warnings`` of metrics by split (e.g. a constant label) on stderr, in yellow,
    each after the name of its split (``val``, ``test``, or the file evaluated)."""
    for split, m in metrics.items():
        for line in dict.fromkeys(m.get("warnings") or ()):
            err.print(Text(f"warning: {split}: {line}", style="yellow"), soft_wrap=True)


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


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    from click.core import ParameterSource

    source = ctx.get_parameter_source(name)
    return source is not None and source.name in (
        ParameterSource.COMMANDLINE.name,
        ParameterSource.ENVIRONMENT.name,
    )


def resolve_config(
    ctx: typer.Context, path: Path | None, flags: dict[str, tuple[str, Any]]
) -> RunConfig:
    """The run config of a command: the ``--config`` file (or the defaults) with the flags
    written over their keys (a flag left unset, None, changes nothing). Without a file every
    flag counts (its default included), so a
    command without ``--config`` behaves as its flags say; with a file only the flags given on
    the command line override it.

    Args:
        flags: ``{parameter name: (config key, value or a function returning it)}``.

    Raises:
        ConfigError: an unreadable file, an unknown key, or a bad value (naming the file and
            key, or the flag).
    """
    base = load_config(path) if path is not None else RunConfig()
    updates, flag_of = {}, {}
    for name, (key, value) in flags.items():
        if path is None or _on_command_line(ctx, name):
            value = value() if callable(value) else value
            if value is not None:  # an unset optional flag leaves the key as it is
                updates[key] = value
                flag_of[key] = "--" + name.replace("_", "-")
    try:
        return base.override(updates, origin="command line")
    except ConfigError as exc:
        text = str(exc).removeprefix("command line: ")
        key = text.partition(": ")[0]
        raise ConfigError(
            f"{flag_of[key]} ({key}): {text.partition(': ')[2]}" if key in flag_of else str(exc)
        ) from None


def device_flags(device: str, precision: str) -> dict[str, tuple[str, Any]]:
    """``--device`` and ``--precision`` (:data:`DeviceOpt`, :data:`PrecisionOpt`) as
    :func:`resolve_config` flags, checked first.

    Raises:
        ConfigError: an unknown or unavailable device, or a precision it cannot run.
    """
    from mtrank.train.device import resolve_device, resolve_precision

    resolve_precision(precision, resolve_device(device))
    return {"device": ("training.device", device), "precision": ("training.precision", precision)}


def _str(path: Path | None) -> str | None:
    """A path option as the config stores it (None stays None)."""
    return None if path is None else str(path)


def phase(message: str, quiet: bool = False) -> None:
    """A progress line naming the phase a long command has reached (stderr; not when quiet)."""
    if not quiet:
        err.print(f"[dim]» {message}[/dim]", highlight=False)
