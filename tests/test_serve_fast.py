"""The service's columnar fast path (:meth:`RankingService.columns`) against the exact path
(:meth:`RankingService.frame` + :meth:`RankingService.encode`): the same encoded features,
counts and prices for every request the fast path takes; the exact path for every request it
must not take (so that errors still name each field)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from mtrank.data.datasets import LoadedData
from mtrank.data.io import validate_frame
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.data.split import SplitConfig, split_data
from mtrank.models.config import ModelConfig
from mtrank.serve.body import decode_json
from mtrank.serve.service import MAX_ID_CHARS, RankingService, RequestError
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import fit

# "hour" as a numerical feature: a numerical column that may be null (mean-imputed), beside
# the price, which may not
SCHEMA = SIMULATED_SCHEMA.model_copy(
    update={
        "categorical": [c for c in SIMULATED_SCHEMA.categorical if c != "hour"],
        "numerical": ["price", "hour"],
    }
)
USER = ["user_id", "user_age", "user_gender", "user_power", "hour"]
ITEM = ["item_id", "category", "brand", "shop", "price"]


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> RankingService:
    sim = simulate(SimConfig(rows=3_000, n_users=200, n_items=100, cvr=0.2, seed=5))
    df, _ = validate_frame(sim, SCHEMA, "sim")
    splits = split_data(LoadedData(SCHEMA, {"all": df}, {"all": "sim"}), SplitConfig())
    res = fit(
        splits,
        SCHEMA,
        ModelConfig(tower=[8], embedding_dim=4),
        TrainConfig(epochs=1, batch_size=512, seed=0),
        quiet=True,
    )
    path = res.bundle.save(tmp_path_factory.mktemp("fast") / "esmm")
    return RankingService(path, engine="torch", threads=0)


@pytest.fixture(scope="module")
def rows(service) -> pl.DataFrame:
    return simulate(SimConfig(rows=400, n_users=200, n_items=100, cvr=0.2, seed=6))


def base_request(rows: pl.DataFrame, n: int = 30) -> tuple[dict, list[dict]]:
    context = rows.select(USER).row(0, named=True)
    return context, rows.head(n).select(ITEM).to_dicts()


def exact(service: RankingService, context: dict, candidates: list[dict]):
    df = service.frame(context, candidates)
    data = service.encode(df)
    price = df.get_column(service.price).to_numpy()
    return data, price, service.bundle.encoder.out_of_range_counts(df)


def fast(service: RankingService, context: dict, candidates: list[dict]):
    cols = service.columns(context, candidates)
    assert cols is not None, "the fast path refused a request it should take"
    data = service.bundle.encoder.transform_columns(cols, len(candidates))
    return data, cols[service.price], service.bundle.encoder.out_of_range_counts(cols)


def assert_same(a, b) -> None:
    (da, pa, oa), (db, pb, ob) = a, b
    np.testing.assert_array_equal(da.categorical, db.categorical)
    assert da.numerical.dtype == db.numerical.dtype == np.float32
    np.testing.assert_array_equal(da.numerical, db.numerical)  # bit for bit
    assert da.n_missing == db.n_missing and da.n_oov == db.n_oov
    np.testing.assert_array_equal(pa, pb)
    assert oa == ob


def variants(context: dict, cands: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
    """Valid requests of the forms the fast path takes."""

    def edit(fn, ctx=None):
        out = [dict(c) for c in cands]
        for i, c in enumerate(out):
            fn(i, c)
        return (dict(context) if ctx is None else ctx), out

    def string_ids(i, c):
        c["item_id"], c["shop"] = str(c["item_id"]), str(c["shop"])

    def nulls(i, c):
        if i % 3 == 0:
            c["brand"] = None  # categorical string-less null: missing
        if i % 4 == 0:
            c["price"] = None  # takes the context's price

    def unseen(i, c):
        c["item_id"] = 10_000_000 + i  # OOV ids
        c["category"] = f"never-{i}"

    def context_override(i, c):
        if i % 2:
            c["user_age"] = context["user_age"]  # a candidate's value overrides the context
            c["hour"] = 5.5

    def empty_string(i, c):
        c["shop"] = "" if i % 5 == 0 else str(c["shop"])  # "" is missing

    ctx_price = {**context, "price": 12.5}
    all_in_candidates = {}
    moved = edit(lambda i, c: c.update({k: context[k] for k in USER}), ctx=all_in_candidates)
    hour_null = edit(lambda i, c: c.update(hour=None if i % 2 else 3), ctx={**context})
    hour_null[0].pop("hour")  # null in a candidate, key absent from the context: missing
    return {
        "ints": (dict(context), cands),
        "string ids": edit(string_ids),
        "nulls and context fill": edit(nulls, ctx=ctx_price),
        "unseen ids": edit(unseen),
        "candidate overrides context": edit(context_override),
        "empty strings": edit(empty_string),
        "no context": moved,
        "numerical nulls": hour_null,
        "big price (out of range)": edit(lambda i, c: c.update(price=1e6 * (i + 1))),
        "integer prices": edit(lambda i, c: c.update(price=int(c["price"]))),
        "all-null column": edit(lambda i, c: c.update(brand=None)),
        "integer id null (no context)": edit(lambda i, c: c.update(brand=None if i == 3 else i)),
    }


def test_fast_path_encodes_exactly_as_the_exact_path(service, rows):
    context, cands = base_request(rows)
    for name, (ctx, cs) in variants(context, cands).items():
        try:
            assert_same(fast(service, ctx, cs), exact(service, ctx, cs))
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_fast_path_counts_are_the_real_counts(service, rows):
    context, cands = base_request(rows, n=10)
    ctx, cs = variants(context, cands)["unseen ids"]
    data, _, _ = fast(service, ctx, cs)
    assert data.n_oov["item_id"] == 10 and data.n_oov["category"] == 10
    ctx, cs = variants(context, cands)["all-null column"]
    data, _, _ = fast(service, ctx, cs)
    assert data.n_missing["brand"] == 10 and (data.categorical[:, 6] == 0).all()


def refused(context: dict, cands: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
    """Requests the fast path must leave to the exact path (invalid, or rarer valid forms)."""

    def one(key, value, i=3, ctx=None):
        out = [dict(c) for c in cands]
        out[i][key] = value
        return (dict(context) if ctx is None else ctx), out

    absent = one("brand", 1)
    del absent[1][2]["brand"]
    return {
        "negative price": one("price", -1.0),
        "null price, no context price": one("price", None),
        "NaN price": one("price", float("nan")),
        "infinite": one("price", float("inf")),
        "boolean id": one("item_id", True),
        "float id": one("item_id", 3.0),
        "mixed int and str ids": one("item_id", "7"),
        "id beyond int64": one("item_id", 2**64),
        "over-long id": one("shop", "x" * (MAX_ID_CHARS + 1)),
        "lone surrogate": one("shop", "\ud800"),
        "whitespace id": one("shop", " 7"),
        "numerical string": one("price", "3"),
        "price too large": one("price", 1e301),
        "object value": one("brand", {"a": 1}),
        "absent from a candidate": absent,
        "bad context value": ({**context, "user_id": [1]}, [dict(c) for c in cands]),
        "negative context price": ({**context, "price": -2.0}, [dict(c) for c in cands]),
        "non-integral float id in context": ({**context, "user_power": 1.5}, cands),
    }


def test_fast_path_leaves_the_rest_to_the_exact_path(service, rows):
    context, cands = base_request(rows, n=8)
    for name, (ctx, cs) in refused(context, cands).items():
        assert service.columns(ctx, cs) is None, name


def test_exact_path_still_names_the_field(service, rows):
    context, cands = base_request(rows, n=8)
    ctx, cs = refused(context, cands)["negative price"]
    with pytest.raises(RequestError) as err:
        service.score(ctx, cs)
    assert [e["loc"] for e in err.value.errors] == [["candidates", 3, "price"]]
    ctx, cs = refused(context, cands)["absent from a candidate"]
    with pytest.raises(RequestError) as err:
        service.score(ctx, cs)
    assert err.value.errors[0]["loc"] == ["candidates", 2, "brand"]


def test_scores_are_the_same_on_both_paths(service, rows):
    context, cands = base_request(rows)
    scored = service.score(context, cands)  # fast
    df = service.frame(context, cands)
    data = service.encode(df)
    raw = service._infer(data.categorical, data.numerical)
    slow = service.fuse(raw, df.get_column("price").to_numpy(), data, service.fusion)
    np.testing.assert_array_equal(scored.score, slow.score)
    np.testing.assert_array_equal(scored.order(), slow.order())


def to_columns(cands: list[dict]) -> dict[str, list]:
    """The columnar form of row-form candidates (a key some candidates lack: null in theirs,
    which is the same where the context has it)."""
    keys = dict.fromkeys(k for c in cands for k in c)
    return {k: [c.get(k) for c in cands] for k in keys}


def outcome(service: RankingService, ctx: dict, cands) -> tuple:
    """Scores and counts, or the errors (locations in the row form's terms)."""
    try:
        s = service.score(ctx, cands)
    except RequestError as exc:
        swap = type(cands) is dict
        return tuple(
            (
                *(
                    [e["loc"][0], e["loc"][2], e["loc"][1]]
                    if swap and len(e["loc"]) == 3
                    else e["loc"]
                ),
                e["type"],
            )
            for e in exc.errors
        )
    return s.score.tolist(), s.probs["p_cvr"].tolist(), s.n_missing, s.n_oov, s.n_out_of_range


def test_the_columnar_form_scores_and_fails_as_the_row_form(service, rows):
    """Every variant, valid or not, through both forms: the same scores and counts (the fast
    path taken or refused alike), or the same errors with ``[candidates, column, i]``."""
    context, cands = base_request(rows, n=12)
    cases = {**variants(context, cands), **refused(context, cands)}
    del cases["absent from a candidate"]  # no columnar form: a column has a value per candidate
    assert len(cases) == 29
    for name, (ctx, cs) in cases.items():
        cols = to_columns(cs)
        assert (service.columns(ctx, cols) is None) == (service.columns(ctx, cs) is None), name
        assert outcome(service, ctx, cols) == outcome(service, ctx, cs), name
    ctx, cs = refused(context, cands)["negative price"]
    assert outcome(service, ctx, to_columns(cs)) == (
        ("candidates", 3, "price", "greater_than_equal"),
    )


COLUMNS_OK = {"item_id": [1, 2], "category": [3, 4], "brand": [5, 6], "shop": [7, 8]}


@pytest.mark.parametrize(
    "candidates, loc, kind, words",
    [
        ({**COLUMNS_OK, "price": [1.0]}, ["candidates", "price"], "length_mismatch", "has 1 "),
        (
            {**COLUMNS_OK, "price": [1, 2], "Brand": [0, 0]},
            ["candidates", "Brand"],
            "extra_forbidden",
            "did you mean 'brand'",
        ),
        ({**COLUMNS_OK, "price": 9.5}, ["candidates", "price"], "list_type", "got a number"),
        ({}, ["candidates"], "too_short", "at least 1 feature column"),
        ({k: [] for k in COLUMNS_OK}, ["candidates", "item_id"], "too_short", "at least 1"),
        ({"price": [1.0] * 2001}, ["candidates", "price"], "too_long", "at most 2000"),
        (COLUMNS_OK, ["candidates", "price"], "missing", "a price (a number ≥ 0)"),
        ({**COLUMNS_OK, "price": [1, None]}, ["candidates", "price", 1], "missing", "a price"),
        (
            {**COLUMNS_OK, "price": [1, 2], "shop": [7, "x" * 2000]},
            ["candidates", "shop", 1],
            "categorical_type",
            "at most 1024",
        ),
    ],
)
def test_a_bad_columnar_request_names_the_column(service, rows, candidates, loc, kind, words):
    context = rows.select(USER).row(0, named=True)
    with pytest.raises(RequestError) as err:
        req = service.parse({"context": context, "candidates": candidates}, ranked=True)
        service.score(req.context, req.candidates)
    first = err.value.errors[0]
    assert (first["loc"], first["type"]) == (loc, kind) and words in first["msg"], first
    assert len(err.value.errors) == 1


def test_a_columnar_request_is_answered_in_columns(service, rows):
    """/rank's answer to the columnar form: one array per field, the row-form answer
    transposed (top_k included); a duplicate column is a 422 naming `candidates`."""
    import orjson

    from mtrank.serve.app import answer

    context, cands = base_request(rows, n=40)
    header = {"model": "m"}
    for top_k in (None, 7):
        by_rows = {"context": context, "candidates": cands, "top_k": top_k}
        by_cols = {**by_rows, "candidates": to_columns(cands)}
        a = orjson.loads(answer(service, header, orjson.dumps(by_rows), True).body)
        b = orjson.loads(answer(service, header, orjson.dumps(by_cols), True).body)
        cols = b.pop("candidates")
        assert list(cols) == ["index", "rank", "p_ctr", "p_cvr", "p_ctcvr", "score", "log_score"]
        assert [dict(zip(cols, v, strict=True)) for v in zip(*cols.values())] == a.pop("candidates")
        assert a == b and len(cols["rank"]) == (top_k or 40)
    reply = answer(service, header, b'{"candidates": {"price": [1], "price": [2]}}', True)
    assert reply.status == 422 and orjson.loads(reply.body)["detail"][0]["loc"] == [
        "body",
        "candidates",
    ]


@pytest.mark.parametrize(
    ("body", "duplicate", "loc"),
    [
        (
            b'{"candidates": [{"price": 1}, {"price": -5, "price": 73.8}]}',
            "price",
            ["candidates", 1],
        ),
        # a colon inside a string makes the raw colon count equal to the decoded keys: the
        # count of colons outside strings still finds the duplicate
        (b'{"context": {"shop": "a:b"}, "candidates": [{"x": 1, "x": 2}]}', "x", ["candidates", 0]),
        (
            b'{"context": {"shop": "a\\\\\\":b"}, "candidates": [{"x": 1, "x": 2}]}',
            "x",
            ["candidates", 0],
        ),
        (
            b'{"fusion": {"params": {"alpha": 1, "alpha": 2}}, "candidates": []}',
            "alpha",
            ["fusion", "params"],
        ),
        # a non-object candidate adds its length to the decoded count and could balance it
        (b'{"candidates": [{"price": -5, "price": 73.8}, "a"]}', "price", ["candidates", 0]),
        (b'{"context": {"u": 1, "u": 2}, "candidates": [{"item_id": 3}, [0]]}', "u", ["context"]),
        (b'{"top_k": 1, "top_k": 2, "candidates": [{"b": [{"c": 1, "c": 1}]}]}', "top_k", []),
    ],
)
def test_duplicate_keys_are_found_by_the_colon_counts(body, duplicate, loc):
    with pytest.raises(RequestError) as err:
        decode_json(body)
    assert err.value.errors[0] == {
        "loc": loc,
        "msg": f"duplicate key '{duplicate}' in this object: give each key once",
        "type": "duplicate_key",
    }


def test_every_duplicate_key_is_named_with_its_path():
    body = b'{"candidates": [{"a": 1}, {"p": 1, "q": 2, "p": 3, "q": 4}], "top_k": 1, "top_k": 2}'
    with pytest.raises(RequestError) as err:
        decode_json(body)
    assert [(e["loc"], e["msg"].split("'")[1]) for e in err.value.errors] == [
        ([], "top_k"),
        (["candidates", 1], "p"),
        (["candidates", 1], "q"),
    ]


def test_colons_inside_strings_are_not_keys():
    body = b'{"context": {"shop": "a:b:c", "brand": "\\":"}, "candidates": [{"x": 1}]}'
    assert decode_json(body) == {
        "context": {"shop": "a:b:c", "brand": '":'},
        "candidates": [{"x": 1}],
    }


def test_an_unexpected_error_is_a_500_in_the_error_shape_never_a_traceback(service, rows, caplog):
    from fastapi.testclient import TestClient

    from mtrank.serve.app import create_app

    app = create_app(service.bundle_path, engine="torch", threads=0)
    client = TestClient(app)
    context, cands = base_request(rows, n=3)
    ok = client.post("/rank", json={"context": context, "candidates": cands})
    assert ok.status_code == 200 and [c["rank"] for c in ok.json()["candidates"]] == [1, 2, 3]

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    app.scoring.service.score = broken
    r = client.post("/rank", json={"context": context, "candidates": cands})
    assert r.status_code == 500
    assert r.json() == {
        "message": "internal error (logged by the server)",
        "n_errors": 1,
        "detail": [{"loc": [], "msg": "internal error (logged by the server)", "type": "internal"}],
    }
    assert "ZeroDivisionError: a bug" in caplog.text
    assert client.get("/health").json() == {"status": "ok"}  # the service goes on


def test_an_absent_price_says_a_number_is_needed_not_null(service, rows):
    context, cands = base_request(rows, n=3)
    del cands[1]["price"]
    with pytest.raises(RequestError) as err:
        service.score(context, cands)
    assert err.value.errors == [
        {
            "loc": ["candidates", 1, "price"],
            "msg": "Field required: a price (a number ≥ 0) in the candidate or in `context`",
            "type": "missing",
        }
    ]


def test_a_misspelt_feature_is_named_in_the_missing_error(service, rows):
    context, cands = base_request(rows, n=2)
    cands = [{("Brand" if k == "brand" else k): v for k, v in c.items()} for c in cands]
    cands[1]["brnd"] = cands[1].pop("Brand")
    with pytest.raises(RequestError) as err:
        service.score(context, cands)
    assert [e["msg"].rpartition(" (")[2] for e in err.value.errors] == [
        "the request's 'Brand' is not a feature and was ignored)",
        "the request's 'brnd' is not a feature and was ignored)",
    ]


def test_only_a_quick_request_from_a_one_at_a_time_client_skips_the_thread_hop(service, rows):
    """Scoring.inline: the first request (cost unknown), the first SAME_CONNECTION requests of
    a connection, a request expected to take longer than INLINE_BUDGET_S and a request after
    another connection's go to the scoring threads; the rest is scored on the event loop's own
    thread; the same answer either way."""
    import asyncio
    import threading

    import httpx

    from mtrank.serve.app import INLINE_BUDGET_S, SAME_CONNECTION, create_app

    app = create_app(service.bundle_path, engine="torch", threads=0)
    scoring = app.scoring
    infer, threads = scoring.service._infer, []

    def recorded(*args):
        threads.append(threading.current_thread().name.startswith("mtrank-score"))
        return infer(*args)

    scoring.service._infer = recorded
    context, cands = base_request(rows, n=5)
    body = {"context": context, "candidates": cands}

    async def run(client: tuple, n: int) -> list[dict]:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            replies = []
            for _ in range(n):
                replies.append((await c.post("/rank", json=body)).json())
                assert 0 < scoring.seconds_per_byte < 1  # measured
                scoring.seconds_per_byte = 1e-9  # as after a few quick answers
        return replies

    k = SAME_CONNECTION
    replies = asyncio.run(run(("10.0.0.1", 1), k + 2))
    # the first: cost unknown; then k - 1 more before the connection counts as one at a time
    assert threads == [True] * k + [False] * 2
    replies += asyncio.run(run(("10.0.0.2", 7), k + 1))  # another connection: threads again
    assert threads[k + 2 :] == [True] * k + [False]
    assert scoring.active == 0
    scoring.seconds_per_byte = INLINE_BUDGET_S  # a byte costs the whole budget
    assert not scoring.inline(2, ("10.0.0.2", 7))
    assert all(r["candidates"] == replies[0]["candidates"] for r in replies)


def test_errors_are_counted_exactly_and_bounded_whatever_the_request_holds(service, rows):
    """``n_errors`` counts every offending value (each check names the first five); a key is
    named as sent, cut to 64 characters; the answer stays small however long the key."""
    from fastapi.testclient import TestClient

    from mtrank.serve.app import create_app

    client = TestClient(create_app(service.bundle_path, engine="torch", threads=0))
    context = rows.select(USER).row(0, named=True)
    n = 200
    cols = {k: [v[0]] * n for k, v in COLUMNS_OK.items()}
    r = client.post("/rank", json={"context": context, "candidates": {**cols, "price": [-1.0] * n}})
    body = r.json()
    assert (r.status_code, body["n_errors"], len(body["detail"])) == (422, n, 5)
    assert [e["loc"] for e in body["detail"]] == [
        ["body", "candidates", "price", i] for i in range(5)
    ]
    assert body["message"].endswith(" (and 195 more)")

    long_key = "k" * 400_000
    r = client.post("/rank", json={"context": context, "candidates": cols, long_key: 1})
    assert r.status_code == 422 and len(r.content) < 4_000
    assert r.json()["detail"][0]["loc"] == ["body", "k" * 64 + "… (400,000 characters)"]

    r = client.post("/rank", json={"context": context, "candidates": {**cols, "prïce": [1.0] * n}})
    assert r.status_code == 422
    assert ["body", "candidates", "prïce"] in [e["loc"] for e in r.json()["detail"]]
    r = client.post(
        "/rank",
        content=b'{"candidates": {"item_id": [1], "\\ud800": [2]}, "context": {}}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422
    assert ["body", "candidates", "\\ud800"] in [e["loc"] for e in r.json()["detail"]]


def test_an_error_answer_stays_small_however_deep_or_wide_the_request():
    """A duplicate key 900 objects deep under 64-character keys: its location keeps its first
    six and last five parts; a request whose every value is wrong: ``detail`` stops at 16 KB
    of JSON while ``n_errors`` still counts every error."""
    from mtrank.serve.app import error_reply
    from mtrank.serve.errors import Errors

    key = "k" * 70
    body = '{"a": 1, "a": 2}'
    for _ in range(900):
        body = f'{{"{key}": {body}}}'
    with pytest.raises(RequestError) as err:
        decode_json(body.encode())
    reply = error_reply(err.value)
    doc = json.loads(reply.body)
    cut = "k" * 64 + "… (70 characters)"
    assert doc["detail"][0]["loc"] == ["body", *[cut] * 5, "… (890 levels)", *[cut] * 5]
    assert len(reply.body) < 3_000 and doc["n_errors"] == 1

    errors = Errors()
    errors.first(range(300), lambda i: {"loc": ["candidates", i, "x" * 300], "msg": "m" * 600})
    doc = json.loads(error_reply(RequestError(errors)).body)
    assert doc["n_errors"] == 300 and len(doc["detail"]) == 5
    many = [{"loc": ["candidates", i, "x" * 60], "msg": "m" * 400, "type": "t"} for i in range(100)]
    reply = error_reply(RequestError(many))
    doc = json.loads(reply.body)
    assert doc["n_errors"] == 100 and len(doc["detail"]) == 31 and len(reply.body) < 20_000
    assert doc["message"].endswith("(and 95 more)")


def test_a_refused_context_value_is_one_error_not_one_per_candidate(service, rows):
    context, cands = base_request(rows, n=8)
    for c in cands:
        del c["price"]
    for bad, kind in ((-3.0, "greater_than_equal"), ("cheap", "float_type")):
        with pytest.raises(RequestError) as err:
            service.score({**context, "price": bad}, cands)
        assert [(e["loc"], e["type"]) for e in err.value.errors] == [(["context", "price"], kind)]


def test_every_non_object_candidate_is_counted(service):
    with pytest.raises(RequestError) as err:
        service.parse({"candidates": [{}] + [1] * 200}, ranked=True)
    assert err.value.n_errors == 200
    assert [e["loc"] for e in err.value.errors] == [["candidates", i] for i in range(1, 6)]


def test_a_misspelling_hint_compares_only_the_first_unknown_keys(service, rows):
    from mtrank.serve.service import HINT_KEYS

    context, cands = base_request(rows, n=2)
    del context["user_age"]
    for position, hinted in ((10, True), (HINT_KEYS, False)):
        ctx = {**{f"x{i}": 0 for i in range(position)}, "user_agee": 1, **context}
        with pytest.raises(RequestError) as err:
            service.score(ctx, cands)
        assert ("'user_agee' is not a feature" in err.value.errors[0]["msg"]) is hinted


@pytest.mark.parametrize(
    "content_type, refused",
    [
        ("application/json", None),
        ('application/json; charset="UTF-8"', None),
        ("application/json;charset=utf8; q=1", None),
        ('application/json; foo="a;charset=latin-1"', None),
        ("application/vnd.api+json", None),
        ("application/json; charset=latin-1", "got charset='latin-1'"),
        ("application/json; charset=UTF_8", "got charset='utf_8'"),
        ("application/json; charset=é", "got charset='é'"),
        ('application/json; charset="utf-8"; charset=latin-1', "got charset='latin-1'"),
        ("application/json; charset*0=ut; charset*1=f-8", None),
        ("application/+json", "got 'application/+json'"),
        ("text/json", "got 'text/json'"),
        (None, "got 'none'"),
    ],
)
def test_the_media_type_and_its_charset(content_type, refused):
    from mtrank.serve.body import check_media_type

    if refused is None:
        check_media_type(content_type)
        return
    with pytest.raises(RequestError) as err:
        check_media_type(content_type)
    assert err.value.status == 415 and refused in str(err.value)


@pytest.mark.parametrize(
    "body, words",
    [
        (b'\xef\xbb\xbf{"candidates": []}', "starts with a byte-order mark (U+FEFF)"),
        (b'{"candidates": [{"item_id": ' + b"7" * 5000 + b"}]}", "more than 4,300 digits"),
    ],
)
def test_a_body_json_refuses_says_why(body, words):
    with pytest.raises(RequestError) as err:
        decode_json(body)
    assert err.value.status == 400 and words in str(err.value)
    assert "sys.set_int_max_str_digits" not in str(err.value)


def test_a_columnar_request_counts_its_shape_and_its_values_together(service, rows):
    """Every unknown, non-array or odd-length column in one answer; an absent column is a value
    error, counted with the others (as in the row form)."""
    context = rows.select(USER).row(0, named=True)
    with pytest.raises(RequestError) as err:
        service.parse(
            {
                "candidates": {
                    "zz": [1] * 3,
                    "shop": 5,
                    "brand": [1],
                    "item_id": [1] * 3,
                    "category": [2] * 3,
                }
            },
            ranked=True,
        )
    assert [(e["loc"], e["type"]) for e in err.value.errors] == [
        (["candidates", "zz"], "extra_forbidden"),
        (["candidates", "shop"], "list_type"),
        (["candidates", "brand"], "length_mismatch"),
    ]
    cols = {"item_id": [1] * 9, "category": [1] * 9, "shop": [1] * 9, "price": [-1.0] * 9}
    with pytest.raises(RequestError) as err:
        service.score(context, cols)
    assert err.value.n_errors == 10
    assert [(e["loc"], e["type"]) for e in err.value.errors] == [
        (["candidates", "brand"], "missing"),
        *[(["candidates", "price", i], "greater_than_equal") for i in range(5)],
    ]


def test_an_error_answer_is_bounded_in_bytes_not_characters():
    """Astral characters take 12 bytes each in ASCII JSON (\\ud83d\\ude00): the bounds hold
    in bytes."""
    from mtrank.serve.app import error_reply

    key = "\U0001f600" * 65
    body = '{"%sa":1,"%sa":2,"%sb":1,"%sb":2,"%sc":1,"%sc":2}' % ((key,) * 6)
    for i in range(8):
        body = '{"%s%d":%s}' % (key, i, body)
    with pytest.raises(RequestError) as err:
        decode_json(body.encode())
    reply = error_reply(err.value)
    doc = json.loads(reply.body)
    assert doc["n_errors"] == 3 and len(reply.body) < 20_000, len(reply.body)
    assert len(json.dumps(doc["message"])) < 2_100
