"""Errors raised by mtrank. Every one says what is wrong and where, in words a user can act on."""

from __future__ import annotations

from collections.abc import Sequence


class MtrankError(Exception):
    """Base class of every error mtrank raises on purpose."""


class DataError(MtrankError, ValueError):
    """Bad input data: names the file, the column and the (1-based) data rows.

    Row numbers count data rows from 1, not counting the header, so row 1 is the
    first line after the header of a CSV file.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        rows: Sequence[int] | None = None,
        count: int | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.rows = list(rows) if rows is not None else []
        self.count = count
        parts = []
        if file is not None:
            parts.append(f"file {file}")
        if column is not None:
            parts.append(f"column {column!r}")
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:10])
            more = f" (and {count - len(self.rows[:10])} more)" if count and count > 10 else ""
            parts.append(f"row{'s' if len(self.rows) > 1 else ''} {shown}{more}")
        where = f"[{'; '.join(parts)}] " if parts else ""
        super().__init__(where + message)


class DataWarning(UserWarning):
    """Data used with a change the user should know of (rows truncated, null list elements),
    worded like :class:`DataError` (file, column, rows)."""


class SchemaError(MtrankError):
    """A dataset schema that cannot work (for example a label used as a feature).

    Deliberately not a ValueError, so pydantic validators let it through unchanged.
    """


class DatasetNotFoundError(MtrankError, FileNotFoundError):
    """A built-in dataset's files are not where they are expected; says where to get them."""


class BundleError(MtrankError, ValueError):
    """A model bundle that is missing, incomplete, tampered with or of another version."""


class ConfigError(MtrankError, ValueError):
    """Invalid model or training configuration."""
