"""Request bodies of the HTTP service: media type, size limit, strict JSON decoding.

Every failure is a :class:`~mtrank.serve.errors.RequestError` with the HTTP status it maps to,
rendered by the app in the one error shape (``message``, ``n_errors``, ``detail``):

* ``415``: the ``content-type`` is not ``application/json`` (or ``application/*+json``), or
  names a ``charset`` other than UTF-8 (JSON is UTF-8, RFC 8259 §8.1);
* ``413``: the body is larger than the limit (``Content-Length`` checked before anything is
  read; a chunked body is counted while it arrives and dropped once over the limit);
* ``400``: not UTF-8, not JSON ("not valid JSON at line L column C: …"), or nested too deeply;
* ``422``: a key given twice in one JSON object (``{"price": -5, "price": 73.8}``): never
  "last key wins".

Decoding: orjson on the fast path, with a count of the keys in the raw text (its colons; when
some are inside strings, a vectorised count of the colons outside strings) against the keys of
the decoded objects the service reads, so that a duplicate key is detected without a
per-object hook. When orjson refuses the text (NaN,
a lone surrogate, a syntax error), or the counts differ, the body is decoded again by the
standard library with a duplicate-detecting hook, which gives the exact error (or accepts NaN
and lone surrogates, for the service's validation to reject with 422 naming the field).
"""

from __future__ import annotations

import json
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any

import numpy as np
import orjson

from mtrank.serve.errors import Errors, RequestError, echo

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 2,000 candidates of 10 features take about 250 kB
_QUOTE, _BACKSLASH, _COLON = ord('"'), ord("\\"), ord(":")


def body_error(status: int, msg: str, kind: str) -> RequestError:
    """A body-level error (``loc`` = ``["body"]``) with its HTTP status."""
    return RequestError([{"loc": ["body"], "msg": msg, "type": kind}], status=status)


def check_media_type(content_type: str | None) -> None:
    """Raises RequestError 415 unless the media type is JSON (``application/json`` or
    ``application/<name>+json``), in UTF-8 when a ``charset`` parameter is given (RFC 8259
    §8.1; parameters parsed by the standard library's MIME header parser, quotes included)."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (
        media.startswith("application/")
        and media.endswith("+json")
        and media != "application/+json"  # a name is required before +json
    ):
        raise body_error(
            415,
            f"the body must be JSON: send content-type application/json, got {media or 'none'!r}",
            "unsupported_media_type",
        )
    if params:
        header = Message()
        header["content-type"] = content_type
        for name, value in header.get_params()[1:]:  # every charset, RFC 2231 forms decoded
            charset = collapse_rfc2231_value(value).strip().lower()
            if name.lower() == "charset" and charset not in ("utf-8", "utf8"):
                raise body_error(
                    415,
                    f"JSON is UTF-8: send charset=utf-8 or no charset, got charset={charset!r}",
                    "unsupported_media_type",
                )


def check_length(content_length: str | None, limit: int) -> None:
    """Raises RequestError 413 when the declared ``Content-Length`` exceeds ``limit`` bytes."""
    if (
        content_length is not None
        and content_length.strip().isdigit()
        and int(content_length) > limit
    ):
        raise body_error(
            413,
            f"the body has {int(content_length):,} bytes; the limit is {limit:,} (mtrank serve "
            "--max-body-bytes)",
            "too_large",
        )


def too_large(limit: int) -> RequestError:
    """413 for a body that passed ``limit`` bytes while it arrived."""
    return body_error(
        413,
        f"the body is larger than the limit of {limit:,} bytes (mtrank serve --max-body-bytes)",
        "too_large",
    )


def decode_json(body: bytes) -> Any:
    """The JSON document in ``body``. Raises RequestError (400, or 422 for a duplicate key)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _decode_exactly(body)
    keys = _key_count(doc)
    # every key has a colon after it; a colon inside a string is the only other kind: equal
    # counts mean no duplicate (and no colon in a string), without scanning the strings
    if body.count(b":") != keys and _raw_key_count(body) != keys:
        return _decode_exactly(body)
    return doc


def _key_count(doc: Any) -> int:
    """Keys of the objects the service reads: the body, ``context``, each candidate,
    ``fusion`` and its ``params`` (other objects make the count differ: decoded exactly then)."""
    if type(doc) is not dict:
        return 0
    n = len(doc)
    ctx, cands, fusion = doc.get("context"), doc.get("candidates"), doc.get("fusion")
    if type(ctx) is dict:
        n += len(ctx)
    if type(cands) is list:
        if set(map(type, cands)) - {dict}:  # a string or array would add its length: exact path
            return -1
        n += sum(map(len, cands))
    elif type(cands) is dict:  # the columnar form: objects inside its arrays make counts differ
        n += len(cands)
    if type(fusion) is dict:
        n += len(fusion)
        if type(fusion.get("params")) is dict:
            n += len(fusion["params"])
    return n


def _raw_key_count(body: bytes) -> int:
    """Colons outside JSON strings (= object keys) in ``body``, vectorised: a quote is a string
    delimiter unless an odd run of backslashes precedes it."""
    b = np.frombuffer(body, dtype=np.uint8)
    colons = np.flatnonzero(b == _COLON)
    if colons.size == 0:
        return 0
    quotes = np.flatnonzero(b == _QUOTE)
    if quotes.size and (b == _BACKSLASH).any():
        pos = np.arange(b.size)
        last_other = np.maximum.accumulate(np.where(b != _BACKSLASH, pos, -1))
        run = (quotes - 1) - last_other[np.maximum(quotes - 1, 0)]
        run[quotes == 0] = 0
        quotes = quotes[run % 2 == 0]
    return int((np.searchsorted(quotes, colons) % 2 == 0).sum())


class _Duplicates(dict):
    """A decoded JSON object that gave a key more than once (``duplicates``: those keys, in
    order); its value is the last one given, as ``dict`` takes it."""

    duplicates: list[str]


def _no_duplicates(pairs: list[tuple[str, Any]], found: list) -> dict:
    """``object_pairs_hook``: the object, a :class:`_Duplicates` (appended to ``found``) if a
    key is given twice."""
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    marked = _Duplicates(d)
    found.append(marked)
    seen: set[str] = set()
    marked.duplicates = list(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return marked


def duplicate_key_errors(doc: Any) -> Errors:
    """One error per key given twice in an object of ``doc`` (decoded with
    :func:`_no_duplicates`), located by its path (``["candidates", 3]``), document order; an
    iterative walk (any depth the decoder accepted) that holds each value's parent, not its
    path, so its memory does not grow with the depth. The first five are kept, the rest
    counted (:meth:`~mtrank.serve.errors.Errors.first`)."""
    found: list[tuple[tuple | None, str]] = []  # (the object's node, the key given twice)
    stack: list[tuple[tuple | None, Any]] = [(None, doc)]  # node: (parent node, key) or None
    while stack:
        node, value = stack.pop()
        if type(value) is _Duplicates:
            found += [(node, k) for k in value.duplicates]
        if isinstance(value, dict):
            stack += reversed([((node, k), v) for k, v in value.items()])
        elif type(value) is list:
            stack += reversed([((node, i), v) for i, v in enumerate(value)])
    errors = Errors()
    errors.first(
        found,
        lambda f: {
            "loc": _path(f[0]),
            "msg": f"duplicate key '{echo(f[1])}' in this object: give each key once",
            "type": "duplicate_key",
        },
    )
    return errors


def _path(node: tuple | None) -> list:
    """The location (keys and indices from the root) of a walk's node."""
    loc = []
    while node is not None:
        node, key = node
        loc.append(key)
    return loc[::-1]


def _decode_exactly(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise body_error(
            400, f"the body is not valid UTF-8 (byte {exc.start}: {exc.reason})", "utf8"
        ) from None
    if text.startswith("\ufeff"):
        raise body_error(
            400,
            "the body starts with a byte-order mark (U+FEFF), which JSON text must not "
            "(RFC 8259 §8.1): send it without",
            "json_invalid",
        )
    found: list[_Duplicates] = []
    decoder = json.JSONDecoder(object_pairs_hook=lambda pairs: _no_duplicates(pairs, found))
    try:
        doc = decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise body_error(
            400,
            f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            "json_invalid",
        ) from None
    except RecursionError:
        raise body_error(400, "not valid JSON here: nested too deeply", "json_invalid") from None
    except ValueError:  # the only other: an integer of more than 4,300 digits
        raise body_error(
            400,
            "not valid JSON here: an integer of more than 4,300 digits (an id that long is "
            "refused anyway: send it as a string of at most 1,024 characters)",
            "json_invalid",
        ) from None
    if found:  # located by a walk of the document (only then)
        raise RequestError(duplicate_key_errors(doc))
    return doc
