"""The OpenAPI (JSON Schema) description of a service's request bodies, generated from the
bundle's schema: every feature with its type and nullability, the price rule, each fusion
formula with its parameters and their ranges. It states exactly what
:meth:`mtrank.serve.service.RankingService.parse` and :meth:`~RankingService.frame` accept, so
that a client generated from ``/openapi.json`` (or a property-based fuzzer) sends only valid
requests and every invalid one is a documented 4xx.

Rules a plain object schema cannot state are written as ``if``/``else`` on the request: a feature
absent from ``context`` is required in every candidate (or, in the columnar form, as a column); a
candidate's price may be null or absent only when ``context`` holds a numeric price. One rule no
JSON Schema states: the columnar form's arrays all have one length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrank.ranking.fusion import FORMULAS
from mtrank.serve.lists import openapi_property
from mtrank.serve.service import INT64, MAX_CANDIDATES, MAX_ID_CHARS

if TYPE_CHECKING:
    from mtrank.serve.service import RankingService

NULL = {"type": "null"}


def _feature(service: RankingService, col: str) -> dict:
    if col in service.categorical:
        return {
            "anyOf": [
                {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]},
                {"type": "string", "maxLength": MAX_ID_CHARS},
                NULL,
            ],
            "description": "categorical id (string or int64; null = missing; unseen → OOV index)",
        }
    bound = service.bounds[col]
    if col == service.price:
        return {
            "anyOf": [{"type": "number", "minimum": 0, "maximum": bound}, NULL],
            "description": "price in currency units, finite and ≥ 0; null or absent in a "
            "candidate takes the context's",
        }
    return {
        "anyOf": [{"type": "number", "minimum": -bound, "maximum": bound}, NULL],
        "description": "numerical feature (finite; null = missing, imputed with the training mean)",
    }


def _param(formula: str, name: str, kind: type) -> dict:
    cls = FORMULAS[formula]
    if kind is str:  # Single.which
        return {"type": "string", "enum": ["ctr", "ctcvr"]}
    out: dict = {"type": "number"}
    if name in cls.limits:
        lo, hi, lo_incl = cls.limits[name]
        out["minimum" if lo_incl else "exclusiveMinimum"] = lo
        out["maximum"] = hi
    return out


def fusion_schema() -> dict:
    """One variant per formula (``formula`` defaults to ``ctcvr``); unknown params are refused,
    other keys of the object ignored (a ``mtrank fuse`` file carries metrics), except, in a
    request, one that resembles ``formula`` or ``params`` (refused by the service)."""
    variants = []
    for name, cls in FORMULAS.items():
        params = {p: _param(name, p, t) for p, t in cls.param_types().items()}
        variant = {
            "type": "object",
            "title": name,
            "properties": {
                "formula": {"const": name},
                "params": {
                    "anyOf": [
                        {"type": "object", "properties": params, "additionalProperties": False},
                        NULL,
                    ]
                },
            },
            "required": [] if name == "ctcvr" else ["formula"],
        }
        variants.append(variant)
    return {
        "oneOf": variants,
        "description": "score fusion (see docs/ranking.md); default: the server's --fusion, "
        "else score = p_ctcvr",
    }


def request_schemas(service: RankingService) -> dict[str, dict]:
    """Component schemas: ``Features``, ``FeatureColumns``, ``Fusion``, ``ScoreRequest``,
    ``RankRequest``. A rule's ``else`` holds ``items`` (for the row form, an array) beside
    ``required`` (for the columnar form, an object): each keyword applies to its own type."""
    features = {c: _feature(service, c) for c in service.features}
    for f in service.list_features:
        features[f.column] = openapi_property(f, MAX_ID_CHARS, INT64)
    rules = []
    for col in [*service.features, *(f.column for f in service.list_features)]:
        if col == service.price:
            number = {"properties": {col: {"type": "number"}}, "required": [col]}
            numbers = {"properties": {col: {"items": {"type": "number"}}}, "required": [col]}
            rules.append(
                {
                    "if": {
                        "required": ["context"],
                        "properties": {"context": {"type": "object", **number}},
                    },
                    "else": {"properties": {"candidates": {"items": number, **numbers}}},
                }
            )
        else:
            rules.append(
                {
                    "if": {
                        "required": ["context"],
                        "properties": {"context": {"type": "object", "required": [col]}},
                    },
                    "else": {
                        "properties": {
                            "candidates": {"items": {"required": [col]}, "required": [col]}
                        }
                    },
                }
            )
    columns = {
        col: {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_CANDIDATES,
            "items": schema,
            "description": "one value per candidate, in candidate order",
        }
        for col, schema in features.items()
    }
    score = {
        "type": "object",
        "properties": {
            "context": {
                "anyOf": [{"$ref": "#/components/schemas/Features"}, NULL],
                "description": "column → value shared by every candidate; a candidate's "
                "non-null value overrides it",
            },
            "candidates": {
                "anyOf": [
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_CANDIDATES,
                        "items": {"$ref": "#/components/schemas/Features"},
                    },
                    {"$ref": "#/components/schemas/FeatureColumns"},
                ],
                "description": f"1 to {MAX_CANDIDATES} candidates: each an object of column → "
                "value (the row form), or one array per column, all of one length (the columnar "
                "form: a third of the bytes, answered in columns too)",
            },
            "fusion": {"anyOf": [{"$ref": "#/components/schemas/Fusion"}, NULL]},
        },
        "required": ["candidates"],
        "additionalProperties": False,
        "allOf": rules,
    }
    rank = {
        **score,
        "properties": {
            **score["properties"],
            "top_k": {
                "anyOf": [{"type": "integer", "minimum": 1}, NULL],
                "description": "return only the best k candidates (all by default)",
            },
        },
    }
    return {
        "Features": {
            "type": "object",
            "properties": features,
            "description": "feature columns of the bundle's schema (other keys are ignored)",
        },
        "FeatureColumns": {
            "type": "object",
            "properties": columns,
            "additionalProperties": False,
            "minProperties": 1,
            "description": "the columnar form: feature column → one value per candidate (every "
            "array of one length; other keys are refused)",
        },
        "Fusion": fusion_schema(),
        "ScoreRequest": score,
        "RankRequest": rank,
    }
