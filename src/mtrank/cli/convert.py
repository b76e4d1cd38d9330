"""The convert commands: public raw logs → Parquet parts + a schema YAML that trains as it is.

* ``mtrank convert aliccp-raw --src DIR --out DIR``: Ali-CCP's raw skeleton + common-features
  files (:mod:`mtrank.data.aliccp_raw`);
* ``mtrank convert taobao --src FILE --out DIR`` and ``mtrank convert retailrocket ...``: staged
  event logs, one row per viewed (user, item) pair and a label per stage
  (:mod:`mtrank.data.staged_logs`).

Registered by :mod:`mtrank.cli`.
"""

# No ``from __future__ import annotations``: :func:`_staged_command`'s ``--src`` option is built
# from its argument, so its annotations must be evaluated where the function is defined.
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from mtrank.cli.common import OverwriteOpt, console
from mtrank.data.io import check_output

convert_app = typer.Typer(
    no_args_is_help=True,
    help="Convert public raw logs (Ali-CCP raw, Taobao UserBehavior, RetailRocket) to Parquet "
    "and a schema YAML.",
)

OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="output directory (Parquet parts, schema.yaml)")
]
BadRowsOpt = Annotated[
    str,
    typer.Option(
        "--bad-rows", help="error (default: stop at the first bad row) or skip (drop and count)"
    ),
]
BucketOpt = Annotated[
    int, typer.Option("--bucket-mb", help="raw MB per on-disk hash bucket (memory ≈ 3-5×)")
]


def aliccp_raw(
    src: Annotated[
        Path,
        typer.Option(
            "--src", help="folder with sample_skeleton_{train,test}.csv and common_features_*.csv"
        ),
    ],
    out: OutOpt,
    field: Annotated[
        list[str] | None,
        typer.Option("--field", help="FIELD=KIND (categorical, list, weighted_list); repeatable"),
    ] = None,
    bad_rows: BadRowsOpt = "error",
    part_rows: Annotated[int, typer.Option(help="rows per Parquet part at most")] = 500_000,
    bucket_mb: BucketOpt = 512,
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert raw Ali-CCP (https://tianchi.aliyun.com/dataset/408) to OUT/{train,test}/ Parquet
    parts, OUT/schema.yaml and OUT/conversion.json."""
    from mtrank.data.aliccp_raw import convert_aliccp_raw, parse_fields_option

    check_output(out, kind="dir")
    rep = convert_aliccp_raw(
        src,
        out,
        fields=parse_fields_option(field),
        bad_rows=bad_rows,
        part_rows=part_rows,
        bucket_mb=bucket_mb,
        overwrite=overwrite,
    )
    kinds: dict[str, int] = {}
    for f in rep.fields.values():
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    rows = ", ".join(f"{s} {n:,}" for s, n in rep.rows.items())
    console.print(f"wrote {out}: {rows} rows; fields {kinds}; {rep.seconds:.1f} s")
    _skipped(rep.skipped)
    test = f" --test-data {out}/test" if "test" in rep.rows else ""
    console.print(
        f"train with: mtrank train --stream --data {out}/train{test} --schema {out}/schema.yaml"
    )


def _skipped(skipped: dict[str, int]) -> None:
    for where, n in skipped.items():
        console.print(f"skipped {n:,} rows: {where}")


TestFractionOpt = Annotated[
    float,
    typer.Option(
        "--test-fraction",
        help="rows first viewed in the last F of the log's time span go to OUT/test (0: none)",
    ),
]
FunnelOpt = Annotated[
    str | None,
    typer.Option("--funnel", help="comma-separated stage order for the schema (default shown)"),
]


def _staged_command(layout: str, src_help: str, doc: str) -> Callable[..., None]:
    """The ``convert <layout>`` command of a staged event log
    (:func:`mtrank.data.staged_logs.convert_staged_log`): every layout takes the same options
    but ``--src``, whose help (``src_help``) names the layout's file; ``doc`` is its help."""

    def command(
        src: Annotated[Path, typer.Option("--src", help=src_help)],
        out: OutOpt,
        funnel: FunnelOpt = None,
        bad_rows: BadRowsOpt = "error",
        bucket_mb: BucketOpt = 512,
        overwrite: OverwriteOpt = False,
        test_fraction: TestFractionOpt = 0.0,
    ) -> None:
        from mtrank.data.staged_logs import convert_staged_log

        check_output(out, kind="dir")
        stages = [s.strip() for s in funnel.split(",")] if funnel else None
        rep = convert_staged_log(
            src,
            out,
            layout,
            funnel=stages,
            bad_rows=bad_rows,
            bucket_mb=bucket_mb,
            overwrite=overwrite,
            test_fraction=test_fraction,
        )
        console.print(
            f"wrote {out}: {rep.rows:,} viewed (user, item) rows from {rep.events:,} events; "
            f"positives {rep.positives}; {rep.seconds:.1f} s"
        )
        for title, counts in (
            ("dropped (never viewed)", rep.dropped_not_viewed),
            ("stage before the first view (kept)", rep.before_first_view),
            (
                "funnel violations (kept; the schema drops them when training)",
                rep.funnel_violations,
            ),
        ):
            shown = {k: v for k, v in counts.items() if v}
            if shown:
                console.print(f"{title}: {shown}")
        _skipped(rep.skipped)
        data = f"{out}/data"
        if rep.test_from is not None:
            console.print(f"test: {rep.rows_test:,} rows first viewed at time ≥ {rep.test_from}")
            data = f"{out}/train --test-data {out}/test"
        console.print(f"train with: mtrank train --stream --data {data} --schema {out}/schema.yaml")

    command.__name__ = command.__qualname__ = layout
    command.__doc__ = doc
    return command


taobao = _staged_command(
    "taobao",
    "UserBehavior.csv (or .csv.gz)",
    """Taobao UserBehavior (https://tianchi.aliyun.com/dataset/649): one row per viewed (user,
    item) pair, labels cart, fav, buy; default funnel cart,buy.""",
)
retailrocket = _staged_command(
    "retailrocket",
    "events.csv (or .csv.gz)",
    """RetailRocket events (Kaggle retailrocket/ecommerce-dataset): one row per viewed (visitor,
    item) pair, labels addtocart, transaction; default funnel addtocart,transaction.""",
)


convert_app.command("aliccp-raw")(aliccp_raw)
convert_app.command("taobao")(taobao)
convert_app.command("retailrocket")(retailrocket)
