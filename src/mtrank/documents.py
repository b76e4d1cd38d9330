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
  a model validator makes (an :class:`~mtrank.errors.MtrankError` raised while validating);
* ``schema s.yaml: line 5: key 'categorical' given twice (first at line 3)``: a key written
  twice in one mapping (YAML) or object (JSON), which the parsers would let the last one win;
* ``schema s.yaml: categorcial: unknown key (did you mean 'categorical'?)``: a key the model
  does not have, with the closest key it has (:func:`difflib.get_close_matches`).
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mtrank.errors import MtrankError

M = TypeVar("M", bound=BaseModel)

MAX_PROBLEMS = 5  # field errors shown on the one line; the rest are counted


class _DuplicateKey(Exception):
    """A key given twice in one mapping: ``line L: key 'k' given twice (first at line K)``."""

    def __init__(self, key: Any, line: int | None, first: int | None) -> None:
        at, before = (f"line {line}: ", f" (first at line {first})") if line else ("", "")
        super().__init__(f"{at}key {key!r} given twice{before}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last value, so ``categorical: [uid]`` after ``categorical: [uid, item]`` would
    drop a feature without a word). Keys merged in by ``<<`` may be overridden."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}  # key -> 1-based line of its first occurrence
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if seen:
                    raise _DuplicateKey(key, line, first[key])
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object's pairs as a dict (``json`` ``object_pairs_hook``); a key given twice raises
    :class:`_DuplicateKey` (without lines: :func:`_json_duplicate` finds them)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, None, None)
        out[key] = value
    return out


def _json_duplicate(text: str) -> _DuplicateKey | None:
    """The first key given twice in one object of ``text`` (valid JSON apart from that), with
    the lines of both occurrences."""
    stack: list[dict[str, int] | None] = []  # per open object: key -> offset; None: an array
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            key, end = json.decoder.scanstring(text, i + 1)
            colon = end
            while colon < n and text[colon] in " \t\r\n":
                colon += 1
            keys = stack[-1] if stack else None
            if keys is not None and colon < n and text[colon] == ":":  # an object's key
                if key in keys:
                    line = text.count("\n", 0, i) + 1
                    return _DuplicateKey(key, line, text.count("\n", 0, keys[key]) + 1)
                keys[key] = i
            i = end
            continue
        if c == "{":
            stack.append({})
        elif c == "[":
            stack.append(None)
        elif c in "}]":
            stack.pop()
        i += 1
    return None


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
        as one line ``<kind> <path>: line L, column C: <problem>``; a key given twice in one
        mapping, as ``<kind> <path>: line L: key 'k' given twice (first at line K)``.
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
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as exc:
            raise error(
                f"{kind} {p}: line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"
            ) from None
        except _DuplicateKey as exc:
            raise error(f"{kind} {p}: {_json_duplicate(text) or exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise error(f"{kind} {p}: {_yaml_problem(exc, text)}") from None
    except _DuplicateKey as exc:
        raise error(f"{kind} {p}: {exc}") from None


def _submodel(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside a field's type (``X``, ``X | None``, ``list[X]``,
    ``dict[str, X]``), if any, and whether a list index or a dict key comes before its keys."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict):
        for arg in typing.get_args(annotation):
            found, _ = _submodel(arg)
            if found is not None:
                return found, origin in (list, dict)
    return None, False


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the model at ``loc`` (the location of one of its keys) accepts; [] when the
    path leaves the models."""
    current: type[BaseModel] | None = model
    step_over = False  # the next part is a list index or a dict key
    for part in loc[:-1]:
        if current is None:
            return []
        if step_over or part not in current.model_fields:
            step_over = False
            continue  # an index, a key, or a validator's tag
        current, step_over = _submodel(current.model_fields[str(part)].annotation)
    if current is None:
        return []
    return [f.alias or name for name, f in current.model_fields.items()]


def problem_text(e: dict, model: type[BaseModel] | None = None) -> str:
    """One pydantic error as ``<dotted key>: <message> (got <value>)``; an unknown key of
    ``model`` (the validated model) with the closest known key, ``(did you mean 'x'?)``."""
    key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "dict[")))
    ctx = e.get("ctx") or {}
    if e["type"] == "model_option":  # a nested model's option, checked by a field validator
        return f"{key}.{ctx['key']}: {ctx['msg']}"
    if e["type"] == "extra_forbidden":
        known = _keys_at(model, tuple(e["loc"])) if model is not None else []
        close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
        return f"{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = (
        ""
        if isinstance(got, dict | list) or e["type"] == "missing"
        else f" (got {json.dumps(got, default=str, ensure_ascii=False)})"
    )
    return f"{key or '<root>'}: {msg}{shown}"


def validation_text(
    exc: ValidationError, limit: int = MAX_PROBLEMS, model: type[BaseModel] | None = None
) -> str:
    """Every problem of a pydantic ValidationError on one line, joined by ``; `` (the first
    ``limit``, then how many more); ``model``, the validated model, suggests known keys."""
    problems = [problem_text(e, model) for e in exc.errors()]
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
        raise error(f"{origin}: {validation_text(exc, model=model)}") from None
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
