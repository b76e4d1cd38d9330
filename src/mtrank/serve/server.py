"""Running the HTTP service: bind first, then serve with uvicorn in one or several worker
processes (``mtrank serve``).

The listening socket is bound before anything is printed or loaded twice, so a port in use is
one ``error:`` line and never a "serving …" message followed by a crash. With ``workers > 1``
uvicorn's supervisor starts that many processes on the same socket; each builds its app from
``$MTRANK_SERVE_SETTINGS`` (:func:`mtrank.serve.app.app_from_env`) and the supervisor restarts
a worker that dies.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass

from mtrank.errors import ConfigError
from mtrank.serve.body import DEFAULT_MAX_BODY_BYTES


@dataclass
class ServeSettings:
    """What ``mtrank serve`` runs: the arguments of :func:`mtrank.serve.app.create_app`."""

    bundle_path: str
    fusion: str | None = None
    engine: str = "onnx"
    threads: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        ConfigError: the address is in use, not local, or not permitted (one line).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on accepted sockets whose
        # proto says TCP; without it every keep-alive response waits ~40 ms (Nagle + delayed ACK)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    settings: ServeSettings,
    sock: socket.socket,
    *,
    workers: int = 1,
    log_level: str = "warning",
    app=None,
) -> None:
    """Serve on the bound ``sock`` until interrupted (blocks). ``app``: the already built app
    of a single worker (else each worker builds its own from ``settings``)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {workers}")
    os.environ["MTRANK_SERVE_SETTINGS"] = json.dumps(asdict(settings))
    if workers == 1 and app is not None:
        from mtrank.serve.app import freeze_heap

        freeze_heap()
        uvicorn.Server(
            uvicorn.Config(app, log_level=log_level, access_log=False, proxy_headers=False)
        ).run(sockets=[sock])
        return
    config = uvicorn.Config(
        "mtrank.serve.app:app_from_env",
        factory=True,
        workers=workers,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,  # the service reads no client address (one ASGI layer less)
    )
    if workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
