"""Request errors of the ranking service: what a 4xx says, bounded whatever the request holds.

An error is a dict ``{"loc": [...], "msg": str, "type": str}`` whose ``loc`` is the path inside
the body (``["candidates", 3, "price"]``). A check that finds many offending candidates keeps
the first :data:`MAX_PER_CHECK` as errors and only counts the rest (:class:`Errors`), so
``n_errors`` is exact while the errors held stay few. A key of the request is named as sent,
cut to :data:`MAX_KEY_CHARS` characters, a location to :data:`MAX_LOC_PARTS` parts, a message
to :data:`MAX_MSG_CHARS`; the one-line summary to :data:`MAX_SUMMARY_BYTES`: an answer never
grows with the request's keys, values or depth (the app also bounds its ``detail`` in bytes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

MAX_PER_CHECK = 5  # offending candidates named per check (the rest counted)
MAX_KEY_CHARS = 64  # a request's key, as an error names it
MAX_LOC_PARTS = 12  # a deeper location keeps its first 6 and last 5 parts
MAX_MSG_CHARS = 500
MAX_NAMED = 5  # errors named in the one-line message
MAX_SUMMARY_BYTES = 2000  # of the message as ASCII JSON (an emoji takes 12 bytes: \ud83d\ude00)


def error(loc: list, msg: str, kind: str = "value_error") -> dict:
    """One error: where (``loc``, path in the body), what (``msg``), its ``type``."""
    return {"loc": loc, "msg": msg, "type": kind}


class Errors(list):
    """The errors of one request, in the order found, and ``omitted``: how many more the
    checks found than they kept (see :meth:`first`)."""

    def __init__(self, errors: Iterable[dict] = ()) -> None:
        super().__init__(errors)
        self.omitted = 0

    def first(self, items: Iterable[Any], make: Callable[[Any], dict]) -> None:
        """Append ``make(item)`` for the first :data:`MAX_PER_CHECK` of ``items`` (e.g. the
        offending candidates' indices, as Python ints); count the others in ``omitted``."""
        items = list(items)
        self.extend(map(make, items[:MAX_PER_CHECK]))
        self.omitted += max(len(items) - MAX_PER_CHECK, 0)

    def absorb(self, errors: list[dict]) -> None:
        """Append ``errors`` with what they only counted."""
        self.extend(errors)
        self.omitted += getattr(errors, "omitted", 0)


class RequestError(Exception):
    """Invalid request. ``errors`` are dicts (``loc``, ``msg``, ``type``; ``loc`` the path inside
    the body, ``["candidates", 3, "price"]``); ``status`` the HTTP status; ``n_errors`` how many
    problems were found (``len(errors)`` plus those an :class:`Errors` only counted)."""

    def __init__(self, errors: list[dict], status: int = 422) -> None:
        self.errors = errors
        self.status = status
        self.n_errors = len(errors) + getattr(errors, "omitted", 0)
        super().__init__(summary([bounded(e) for e in errors[:MAX_NAMED]], self.n_errors))


def echo(key: Any) -> Any:
    """A key of the request as an error names it: as sent (so ``loc`` equals the client's key),
    a lone UTF-16 surrogate backslash-escaped (such text cannot be encoded), cut to
    :data:`MAX_KEY_CHARS` characters with its length. Indices (int) pass unchanged."""
    if type(key) is not str:
        return key
    n = len(key)
    key = echo_text(key[: MAX_KEY_CHARS + 1])
    return f"{key[:MAX_KEY_CHARS]}… ({n:,} characters)" if len(key) > MAX_KEY_CHARS else key


def bounded(e: dict) -> dict:
    """``e`` with each ``loc`` key named by :func:`echo`, a ``loc`` of more than
    :data:`MAX_LOC_PARTS` parts cut in its middle, and ``msg`` cut to :data:`MAX_MSG_CHARS`
    characters."""
    loc, msg = e["loc"], echo_text(e["msg"])
    if len(loc) > MAX_LOC_PARTS:
        loc = [*loc[:6], f"… ({len(loc) - 11:,} levels)", *loc[-5:]]
    if len(msg) > MAX_MSG_CHARS:
        msg = f"{msg[:MAX_MSG_CHARS]}… (cut)"
    return {**e, "loc": [echo(x) for x in loc], "msg": msg}


def echo_text(text: str) -> str:
    """``text`` with any lone surrogate escaped (such text cannot be encoded as UTF-8)."""
    return text if is_utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """False when ``text`` cannot be encoded as UTF-8 (it holds a lone UTF-16 surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def summary(errors: list[dict], n_errors: int) -> str:
    """The one-line message: the first :data:`MAX_NAMED` errors (already :func:`bounded`) as
    ``loc: msg`` (``loc`` joined by dots), then ``(and N more)`` for the other ``n_errors``;
    at most :data:`MAX_SUMMARY_BYTES` bytes of ASCII JSON before that count."""
    named = errors[:MAX_NAMED]
    message = "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in named
    )
    if len(json.dumps(message)) > MAX_SUMMARY_BYTES:  # the longest prefix that fits
        lo, hi = 0, len(message)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(json.dumps(message[:mid])) <= MAX_SUMMARY_BYTES:
                lo = mid
            else:
                hi = mid - 1
        message = f"{message[:lo]}… (cut)"
    if n_errors > len(named):
        message += f" (and {n_errors - len(named)} more)"
    return message


def json_type(value: Any) -> str:
    """The JSON type of a decoded value, as a message names it (``an array``)."""
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)
