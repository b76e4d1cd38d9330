"""The report command: ``mtrank report`` (registered by :mod:`mtrank.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtrank.cli.common import console
from mtrank.report.build import write_report


def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="run directories: quickstart, train (bundle), benchmark, quadrants or fuse outputs"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")] = Path(
        "report.html"
    ),
    calibration: Annotated[
        bool,
        typer.Option(
            "--calibration/--no-calibration",
            help="draw the calibration the bundles recorded on their test split",
        ),
    ] = True,
) -> None:
    """Write one self-contained HTML report (plots embedded) of one or more run directories,
    from what the runs saved (no data is read again)."""
    path = write_report(run_dirs, out, calibrate=calibration)
    console.print(f"report written to {path}")
