"""The serving commands: ``mtrank export`` and ``mtrank serve`` (registered by
:mod:`mtrank.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtrank.cli.common import BundleOpt, ConfigOpt, _str, console, resolve_config
from mtrank.errors import ConfigError
from mtrank.data.io import check_output


def export(
    ctx: typer.Context,
    config: ConfigOpt = None,
    bundle: BundleOpt = None,
    format: Annotated[str, typer.Option("--format", help="export format: onnx")] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="file to write (default: <bundle>/model.onnx)"),
    ] = None,
) -> None:
    """Export a bundle's model to ONNX (dynamic batch axis), verified against PyTorch at batch
    sizes 1, 7 and 1000 (max |diff| ≤ 1e-5) before the file is written."""
    if format != "onnx":
        raise ConfigError(f"--format must be 'onnx', got {format!r}")
    cfg = resolve_config(
        ctx,
        config,
        {"bundle": ("export.out", lambda: _str(bundle)), "out": ("export.onnx", lambda: _str(out))},
    )
    bundle, out = Path(cfg.export.out), (Path(cfg.export.onnx) if cfg.export.onnx else None)
    if out is not None:
        check_output(out)
    from mtrank.serve.onnx_export import export_onnx, graph_signature

    path, diffs = export_onnx(bundle, out)
    inputs, outputs = graph_signature(path)
    checks = ", ".join(f"batch {b}: {d:.1e}" for b, d in diffs.items())
    console.print(
        f"wrote {path}; inputs {_tensors(inputs)}; outputs {_tensors(outputs)}; "
        f"max |onnx - torch| {checks}",
        markup=False,  # the shapes' brackets are text, not rich markup
        highlight=False,
        soft_wrap=True,
    )


def _tensors(tensors) -> str:
    """``name dtype [dims]`` per graph tensor (:class:`mtrank.serve.onnx_export.GraphTensor`),
    consecutive tensors of one type and shape sharing it: ``p_ctr, p_cvr float32 [batch]``."""
    groups: list[tuple[list[str], str]] = []
    for t in tensors:
        kind = f"{t.dtype} [{', '.join(map(str, t.shape))}]"
        if groups and groups[-1][1] == kind:
            groups[-1][0].append(t.name)
        else:
            groups.append(([t.name], kind))
    return ", ".join(f"{', '.join(names)} {kind}" for names, kind in groups)


def serve(
    ctx: typer.Context,
    config: ConfigOpt = None,
    bundle: BundleOpt = None,
    fusion: Annotated[
        Path | None,
        typer.Option(
            "--fusion", help="fusion JSON (as written by `mtrank fuse`); default score = p_ctcvr"
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every "
            "interface, put a gateway in front)"
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
    workers: Annotated[
        int, typer.Option(help="worker processes (one per core suits --threads 1)", min=1)
    ] = 1,
    engine: Annotated[
        str, typer.Option(help="inference engine: onnx (onnxruntime) or torch")
    ] = "onnx",
    threads: Annotated[
        int, typer.Option(help="engine intra-op threads per worker (0 = library default)")
    ] = 1,
    max_body_bytes: Annotated[
        int, typer.Option(help="larger request bodies get 413 before they are parsed", min=1024)
    ] = 1 << 20,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Run the HTTP ranking service (POST /rank, POST /score, GET /health, GET /metadata, /docs)
    with uvicorn: the port is bound first, the bundle loaded and checked, then --workers
    processes serve it."""
    cfg = resolve_config(
        ctx,
        config,
        {
            "bundle": ("export.out", lambda: _str(bundle)),
            "fusion": ("fusion.file", lambda: _str(fusion)),
            **{
                name: (f"serve.{name}", value)
                for name, value in [
                    ("host", host),
                    ("port", port),
                    ("engine", engine),
                    ("threads", threads),
                    ("workers", workers),
                    ("max_body_bytes", max_body_bytes),
                    ("log_level", log_level),
                ]
            },
        },
    )
    s = cfg.serve
    bundle, fusion = Path(cfg.export.out), (Path(cfg.fusion.file) if cfg.fusion.file else None)
    host, port, engine, threads, log_level = s.host, s.port, s.engine, s.threads, s.log_level
    workers, max_body_bytes = s.workers, s.max_body_bytes

    from mtrank.serve.app import create_app
    from mtrank.serve.server import ServeSettings, bind
    from mtrank.serve.server import serve as run_server

    sock = bind(host, port)
    settings = ServeSettings(
        str(bundle.resolve()),
        str(fusion.resolve()) if fusion else None,
        engine,
        threads,
        max_body_bytes,
    )
    application = create_app(
        settings.bundle_path,
        settings.fusion,
        engine=engine,
        threads=threads,
        max_body_bytes=max_body_bytes,
    )
    console.print(
        f"serving {bundle} ({engine}, {workers} worker(s)) on http://{host}:{port} — docs at /docs"
    )
    run_server(
        settings,
        sock,
        workers=workers,
        log_level=log_level,
        app=application if workers == 1 else None,
    )
