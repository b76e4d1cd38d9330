"""Atomic file and directory writes: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import stat
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a file made by ``tempfile`` (0600 / 0700) the usual permissions under the umask."""
    p = Path(path)
    base = 0o777 if p.is_dir() else 0o666
    os.chmod(p, base & ~_umask() & (stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO))


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_name)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return _atomic_write(path, write)


def atomic_write_json(obj, path: Path) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary file, then rename); returns ``path``."""
    return atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode(), path)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def atomic_write_parquet(df: pl.DataFrame, path: Path, row_group_size: int | None = None) -> Path:
    """Write a Parquet file atomically (temporary file, then rename); returns ``path``."""
    return _atomic_write(path, lambda tmp: df.write_parquet(tmp, row_group_size=row_group_size))


def atomic_replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory to ``target``, replacing any old one.

    The old directory is renamed aside first and removed only after the new one is in place,
    so an interruption leaves either the old or the new directory, never a mixture.
    """
    target = Path(target)
    publish_mode(staging)
    for child in Path(staging).iterdir():
        publish_mode(child)
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
