"""The config commands: ``mtrank config init`` (a commented template) and ``mtrank config show``
(a config as every verb resolves it). Registered by :mod:`mtrank.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtrank.cli.common import _check_choice, console
from mtrank.config import config_template, dataset_config, load_config
from mtrank.data.datasets import DATASETS
from mtrank.errors import ConfigError
from mtrank.io_utils import atomic_write_bytes

config_app = typer.Typer(
    no_args_is_help=True,
    help="Run configs (mtrank.yaml): write a template, show a resolved config.",
)


def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="YAML file to write")] = Path(
        "mtrank.yaml"
    ),
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help=f"fill in a built-in dataset: {', '.join(DATASETS)}"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
) -> None:
    """Write a commented run config holding every key with its default (or a dataset's values)."""
    _check_choice(dataset, DATASETS, "--dataset")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    atomic_write_bytes(config_template(dataset_config(dataset)).encode("utf-8"), out)
    console.print(f"wrote {out}; run it with: mtrank train --config {out}")


def show(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
) -> None:
    """Validate a run config and print it with every default filled in."""
    typer.echo(config_template(load_config(config)), nl=False)


config_app.command()(init)
config_app.command()(show)
