"""Reading the YAML / JSON documents a user writes (dataset schemas, run configs, fusion files),
with every problem reported as one line that names the file and the key or the line.

The one reader of such files: :func:`read_document` parses (YAML, or JSON for ``.json`` files),
:func:`validate_document` checks the parsed document against a pydantic model, and
:func:`load_document` does both. Errors read ``<kind> <path>: <where>: <what>``, e.g.

* ``schema s.yaml: line 4, column 10: not valid YAML: expected ',' or ']', but got ':' (in a
  flow sequence opened at line 3, column 14)``: broken YAML;
* ``config run.yaml: training.epochs: Input should be greater than or equal to 1 (got 0)``: a
  field error (several problems are joined by ``; `` on the same line);
* ``schema s.yaml: funnel.1.after: unknown stage 'cartt' (stages: click, cart, buy)``: a check
  a model validator makes (an :class:`~mtrank.errors.MtrankError` raised while validating).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mtrank.errors import MtrankError

M = TypeVar("M", bound=BaseModel)

MAX_PROBLEMS = 5  # field errors shown on the one line; the rest are counted


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """``line L, column C: not valid YAML: problem (context)`` of a YAML error in ``text``,
    1-based, without the snippet PyYAML prints (and without its ``<unicode string>`` name)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        ch = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        return (
            f"line {line}, column {column}: not valid YAML: character {ch!r} "
            f"(U+{ord(ch[:1] or ' '):04X}) is not allowed in YAML"
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return "not valid YAML: " + " ".join(str(exc).split())
    mark, problem = exc.problem_mark, " ".join((exc.problem or str(exc)).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces, not tabs)"
    cm = exc.context_mark
    if (
        exc.context
        and cm is not None
        and (mark is None or (cm.line, cm.column) != (mark.line, mark.column))
    ):
        # where the construct that broke began (an unclosed bracket is reported where it ends)
        what = exc.context.removeprefix("while parsing ").removeprefix("while scanning ")
        problem += f" (in {what} opened at line {cm.line + 1}, column {cm.column + 1})"
    return f"{where}not valid YAML: {problem}"


def read_document(
    path: str | Path,
    kind: str,
    error: type[MtrankError],
    syntax: Literal["yaml", "json"] | None = None,
) -> Any:
    """The parsed content of a YAML or JSON file.

    Args:
        kind: what the file is (``schema``, ``config``, ``fusion file``), first word of errors.
        error: the error class to raise.
        syntax: ``json`` or ``yaml``; None: JSON when ``path`` ends in ``.json``, else YAML.

    Returns:
        the document (an empty file gives None).

    Raises:
        ``error``: the file is missing or unreadable, not UTF-8 text, or not valid YAML / JSON,
        as one line ``<kind> <path>: line L, column C: <problem>``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {kind} {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise error(
            f"{kind} {p}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
    if syntax == "json" or (syntax is None and p.suffix.lower() == ".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(
                f"{kind} {p}: line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{kind} {p}: {_yaml_problem(exc, text)}") from None


def problem_text(e: dict) -> str:
    """One pydantic error as ``<dotted key>: <message> (got <value>)``."""
    key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "dict[")))
    ctx = e.get("ctx") or {}
    if e["type"] == "model_option":  # a nested model's option, checked by a field validator
        return f"{key}.{ctx['key']}: {ctx['msg']}"
    if e["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = (
        ""
        if isinstance(got, dict | list) or e["type"] == "missing"
        else f" (got {json.dumps(got, default=str, ensure_ascii=False)})"
    )
    return f"{key or '<root>'}: {msg}{shown}"


def validation_text(exc: ValidationError, limit: int = MAX_PROBLEMS) -> str:
    """Every problem of a pydantic ValidationError on one line, joined by ``; `` (the first
    ``limit``, then how many more)."""
    problems = [problem_text(e) for e in exc.errors()]
    more = len(problems) - limit
    return "; ".join(problems[:limit]) + (f"; (and {more} more)" if more > 0 else "")


def validate_document(model: type[M], doc: Any, origin: str, error: type[MtrankError]) -> M:
    """``model`` validated from a parsed document; an empty document (None) is ``{}``.

    Args:
        origin: names the document in errors (``schema s.yaml``, ``command line``).

    Raises:
        ``error``: not a mapping, a field error, or an mtrank error a validator raised, as one
        line ``<origin>: <key>: <message>``.
    """
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise error(f"{origin}: expected a mapping of keys (key: value), got {type(doc).__name__}")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise error(f"{origin}: {validation_text(exc)}") from None
    except MtrankError as exc:  # a model validator's own check (e.g. SchemaError)
        raise error(f"{origin}: {exc}") from None


def load_document(path: str | Path, model: type[M], kind: str, error: type[MtrankError]) -> M:
    """:func:`read_document` then :func:`validate_document` (origin ``<kind> <path>``)."""
    doc = read_document(path, kind, error)
    return validate_document(model, doc, f"{kind} {Path(path)}", error)


__all__ = [
    "load_document",
    "problem_text",
    "read_document",
    "validate_document",
    "validation_text",
]
