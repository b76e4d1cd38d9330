"""Atomic file and directory writes: a reader never sees a half-written file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
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
    return atomic_write_bytes(
        (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode(), path
    )


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def atomic_write_safetensors(
    tensors: dict, path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write torch tensors as one safetensors file (no pickle), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_parquet(
    df: pl.DataFrame,
    path: Path,
    row_group_size: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``df`` as Parquet atomically; ``metadata``: key-value pairs stored in the file."""
    return _atomic_write(
        path, lambda tmp: df.write_parquet(tmp, row_group_size=row_group_size, metadata=metadata)
    )


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux ≥ 3.15): swap two paths atomically
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (renameat2 RENAME_EXCHANGE).
    False where the system or file system does not support it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _backup_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_replaced_dir(target: Path) -> None:
    """Finish an interrupted :func:`atomic_replace_dir` that used the rename-aside fallback:
    when ``target`` is missing but its backup is there, put the backup back."""
    target = Path(target)
    backup = _backup_name(target)
    if not target.exists() and backup.is_dir():
        os.replace(backup, target)


def atomic_replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory to ``target``, replacing any old one.

    ``target`` is never absent: an existing directory is swapped with ``staging`` in one atomic
    ``renameat2(RENAME_EXCHANGE)`` (Linux), and the old one, now at the staging path, removed.
    Where the exchange is not supported, the old directory is renamed to ``.<name>.old`` first;
    a kill between the two renames is repaired by :func:`recover_replaced_dir`, which
    :meth:`Bundle.load <mtrank.bundle.Bundle.load>` and checkpoint loading call.
    """
    target = Path(target)
    publish_mode(staging)
    for child in Path(staging).iterdir():
        publish_mode(child)
    recover_replaced_dir(target)
    if target.is_dir() and _exchange(Path(staging), target):
        shutil.rmtree(staging, ignore_errors=True)
        return
    backup = None
    if target.exists():
        backup = _backup_name(target)
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


INCOMPLETE = "_INCOMPLETE"  # marker inside a parts directory still being written
MANIFEST = "_manifest.json"  # parts and their rows, written last


def write_parts_dir(
    parts,
    path: str | Path,
    *,
    row_group_size: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an iterable of DataFrames as ``path/part-00000.parquet`` … through a staging
    directory renamed into place at the end (:func:`atomic_replace_dir`): a kill at any moment
    leaves ``path`` as it was. The staging directory holds an ``_INCOMPLETE`` marker until the
    last part is written; ``_manifest.json`` lists the parts and their rows (see
    :func:`mtrank.data.stream.check_parts_dir`).

    An existing ``path`` is replaced whole; callers refuse a non-empty one first unless asked
    to overwrite (:func:`mtrank.data.io.refuse_nonempty`). ``metadata``: key-value pairs stored
    in every part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (staging / INCOMPLETE).write_text(
            "parts are being written; this directory is not a data set yet\n"
        )
        listed = []
        for k, part in enumerate(parts):
            name = f"part-{k:05d}.parquet"
            part.write_parquet(staging / name, row_group_size=row_group_size, metadata=metadata)
            listed.append({"name": name, "rows": part.height})
        atomic_write_json(
            {"format": "mtrank.parts/1", "parts": listed, "rows": sum(p["rows"] for p in listed)},
            staging / MANIFEST,
        )
        (staging / INCOMPLETE).unlink()
        if path.exists() and not path.is_dir():
            path.unlink()
        atomic_replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
