"""Property-based fuzzing of the HTTP service from its own published OpenAPI schema
(Schemathesis, in process over ASGI: no socket, no network). Positive mode sends requests the
schema allows; negative mode sends requests it forbids and expects a 4xx. In both: never a 5xx,
and every response (errors included) conforms to the schema of its status code (see
:func:`generation_schema` for the one relaxation). Bounded: a fixed number of examples per
operation and mode, a fixed seed, no example database.
"""

from __future__ import annotations

import copy

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from mtrank.serve.app import create_app
from tests.test_attack_rows import bundle_dir

EXAMPLES = 25  # per operation and mode: about a minute for both modes on 2 busy cores


def generation_schema(app, mode: GenerationMode) -> dict:
    """The published schema with its request-level ``if``/``else`` rules (a feature absent from
    ``context`` is required in every candidate; a candidate's price may be null only when the
    context has a price) resolved, as the generator cannot handle them: for positive requests
    always by the ``else`` branch (every candidate carries every feature and a numeric price:
    a subset of what is valid, so every one must be accepted), for negative ones by dropping
    them (a superset of what is valid, so whatever breaks it must be refused). The columnar
    form's one rule no schema states (arrays of one length) is met, for positive requests, by
    arrays of exactly one value. Responses are checked against the schema as published."""
    spec = copy.deepcopy(app.openapi())
    for name in ("RankRequest", "ScoreRequest"):
        body = spec["components"]["schemas"][name]
        rules = body.pop("allOf")
        if mode == GenerationMode.POSITIVE:
            rows, columns = body["properties"]["candidates"]["anyOf"]
            item = {"$ref": "#/components/schemas/Features"}
            branches = [r["else"]["properties"]["candidates"] for r in rules]
            rows["items"] = {"allOf": [item, *(b["items"] for b in branches)]}
            one = {
                "properties": {c: {"maxItems": 1} for c in APP.state.service.features},
                "required": list(APP.state.service.features),
            }
            columns = {
                "allOf": [
                    columns,
                    one,
                    *({k: v for k, v in b.items() if k != "items"} for b in branches),
                ]
            }
            body["properties"]["candidates"]["anyOf"] = [rows, columns]
    return spec


def fuzz_schema(mode: GenerationMode):
    loaded = schemathesis.openapi.from_dict(generation_schema(APP, mode))
    loaded.app = APP
    loaded.config.generation.update(
        modes=[mode], max_examples=EXAMPLES, database="none", deterministic=True
    )
    return loaded


# built at collection (a lazy fixture-based schema does not work with this pytest): ~5 s
APP = create_app(bundle_dir(), threads=0)
positive = fuzz_schema(GenerationMode.POSITIVE)
negative = fuzz_schema(GenerationMode.NEGATIVE)
CONFORMS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@positive.parametrize()
@SETTINGS
def test_valid_requests_are_accepted_and_conform(case):
    case.call_and_validate(checks=[*CONFORMS, positive_data_acceptance])


@negative.parametrize()
@SETTINGS
def test_invalid_requests_are_4xx_and_conform(case):
    case.call_and_validate(checks=[*CONFORMS, negative_data_rejection])
