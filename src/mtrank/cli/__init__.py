"""The ``mtrank`` command: the top layer. It imports the domain; nothing in mtrank imports it.

Every command is a plain function in one of the modules below, registered here explicitly:

* :mod:`mtrank.cli.pipeline`: simulate, train, evaluate, predict, quickstart
* :mod:`mtrank.cli.benchmark`: benchmark, sweep
* :mod:`mtrank.cli.ranking`: quadrants, fuse
* :mod:`mtrank.cli.serve`: export, serve
* :mod:`mtrank.cli.report`: report
* :mod:`mtrank.cli.config`: config init, config show
* :mod:`mtrank.cli.convert`: convert aliccp-raw, convert taobao, convert retailrocket

Every expected failure (bad data, missing files, bad bundle, bad option) is printed as one
``error:`` line naming what to change, with exit code 2; never a stack trace.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.text import Text

from mtrank.cli import benchmark, pipeline, ranking, report, serve
from mtrank.cli.config import config_app
from mtrank.cli.convert import convert_app
from mtrank.cli.common import err
from mtrank.errors import MtrankError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="mtrank: multi-objective ranking for e-commerce around ESMM (pCTR, pCVR, pCTCVR).",
)

for _command in (
    pipeline.simulate,
    pipeline.train,
    pipeline.evaluate,
    pipeline.predict,
    pipeline.quickstart,
    benchmark.benchmark,
    benchmark.sweep,
    ranking.quadrants,
    ranking.fuse,
    serve.export,
    serve.serve,
    report.report,
):
    app.command()(_command)
app.add_typer(config_app, name="config")
app.add_typer(convert_app, name="convert")


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and abort classes of click, and of the copy of click that typer vendors."""
    import click

    errors, aborts = [click.exceptions.ClickException], [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored  # typer ≥ 0.2x ships its own click
    except ImportError:
        vendored = None
    if vendored is not None:
        errors += [c for c in (getattr(vendored, "ClickException", None),) if c]
        aborts += [
            c for c in (getattr(vendored, "Abort", None), getattr(vendored, "Exit", None)) if c
        ]
    return tuple(errors), tuple(aborts)


def main() -> None:
    """Entry point: run the app, turning mtrank's own errors and invalid options into one
    ``error:`` line and exit code 2 (never a stack trace)."""
    from pydantic import ValidationError

    click_errors, aborts = _click_exception_types()

    code = 0
    try:
        app(standalone_mode=False)
    except MtrankError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        code = 2
    except ValidationError as exc:  # an option value out of range (pydantic config models)
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        err.print(
            Text.assemble(("error: ", "bold red"), f"invalid option value: {problems}"),
            highlight=False,
            soft_wrap=True,
        )
        code = 2
    except click_errors as exc:
        exc.show()
        code = exc.exit_code
    except OSError as exc:  # disk full, permission denied, … while writing or reading a path
        where = f": {exc.filename}" if exc.filename else ""
        err.print(
            Text.assemble(("error: ", "bold red"), f"{exc.strerror or exc}{where}"),
            highlight=False,
            soft_wrap=True,
        )
        code = 2
    except aborts:
        code = 130
    # Leave without interpreter teardown on error paths: native thread pools (pyarrow, torch)
    # still shutting down can abort the process ("terminate called …") and mask the exit code.
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
