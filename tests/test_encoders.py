import numpy as np
import polars as pl
import pytest

from mtrank.data.encoders import (
    MISSING,
    N_RESERVED,
    OOV,
    CategoricalEncoder,
    FeatureEncoder,
    NumericalEncoder,
    canonical_ids,
)
from mtrank.data.schema import Schema


def naive_transform(enc: CategoricalEncoder, series: pl.Series) -> tuple[list[int], int, int]:
    """Reference encoding: a plain dict from canonical id to index (0 missing, 1 OOV, 2..
    vocabulary)."""
    table = {v: i + N_RESERVED for i, v in enumerate(enc.values)}
    idx = [MISSING if v is None else table.get(v, OOV) for v in canonical_ids(series).to_list()]
    return idx, idx.count(MISSING), idx.count(OOV)


@pytest.mark.parametrize(
    "train,query",
    [
        (
            ["a", "b", "b", " c", "", None, "longer value", "é"],
            ["b", "c ", "zz", None, "", "é", "longer valu", "longer value!", "a"],
        ),
        ([3, 1, 1, 7, None], [1.0, 3.0, 7.0, 8.0, None, float("nan")]),
        ([10, 2, 2], [2, 10, 100, -2]),
        (["a\x00", "a"], ["a", "a\x00", "b"]),
        ([None, None], ["x", None]),
    ],
)
def test_sorted_lookup_equals_a_naive_mapping(train, query):
    enc = CategoricalEncoder.fit(pl.Series("c", train, strict=False))
    q = pl.Series("c", query, strict=False)
    want, got = naive_transform(enc, q), enc.transform(q)
    assert got[0].tolist() == want[0] and got[1:] == want[1:]


def test_sorted_lookup_mixed_case_is_built_once_and_matches_a_naive_mapping():
    # vocabulary from ints, integral floats with NaN, and strings with empty / padded values
    train = pl.concat(
        [
            canonical_ids(pl.Series("c", [7, 7, 3, -1, 2**40])),
            canonical_ids(pl.Series("c", [3.0, float("nan"), 12.0, None])),
            canonical_ids(pl.Series("c", ["x", "", "  y ", "x", "3", None])),
        ]
    )
    enc = CategoricalEncoder.fit(train.rename("c"))
    assert enc.values[:2] == ["3", "7"] and "" not in enc.values and "y" in enc.values
    assert enc._table is None  # built lazily, on the first transform
    queries = [
        pl.Series("c", [7, 3, -1, 2**40, 99, None, 12]),  # ints, one unseen, one missing
        pl.Series("c", [3.0, float("nan"), 12.0, None, 4.0, -1.0]),  # floats with NaN, unseen 4
        pl.Series("c", ["x", "", " y", "unseen", None, "3", "7 ", "12.0"]),  # strings with empty
        pl.Series("c", [1.5, float("nan"), 3.0]),  # non-integral floats: "3.0" is not "3"
        pl.Series("c", [], dtype=pl.String),
    ]
    for q in queries:
        got, want = enc.transform(q), naive_transform(enc, q)
        assert got[0].dtype == np.int64 and got[0].tolist() == want[0] and got[1:] == want[1:], q
    table = enc._table
    enc.transform(queries[0])
    assert enc._table is table  # the sorted lookup is cached on the instance
    enc.values = [*enc.values, "new"]  # a new vocabulary rebuilds it
    assert enc.transform(pl.Series("c", ["new"]))[0].tolist() == [len(enc.values) + 1]


def test_vocabulary_order_and_reserved_indices():
    enc = CategoricalEncoder.fit(pl.Series("c", ["b", "a", "b", "c", "a", "b"]))
    assert enc.values == ["b", "a", "c"]  # by count, ties by value
    idx, n_missing, n_oov = enc.transform(pl.Series("c", ["a", "zzz", None, "", "b"]))
    assert idx.tolist() == [3, OOV, MISSING, MISSING, 2]
    assert (n_missing, n_oov) == (2, 1)


def test_unseen_zero_is_oov_not_an_alias():
    enc = CategoricalEncoder.fit(pl.Series("c", [1, 2, 2]))
    idx, _, n_oov = enc.transform(pl.Series("c", [0, 1, 2, 10**12]))
    assert idx.tolist() == [OOV, 3, 2, OOV] and n_oov == 2


def test_int_and_float_ids_map_alike():
    enc = CategoricalEncoder.fit(pl.Series("c", [5, 7]))
    idx, n_missing, _ = enc.transform(pl.Series("c", [5.0, float("nan"), 7.0]))
    assert idx.tolist() == [enc.values.index("5") + 2, MISSING, enc.values.index("7") + 2]
    assert n_missing == 1
    assert canonical_ids(pl.Series("c", [1.5, 2.0])).to_list() == ["1.5", "2.0"]


def test_min_count_and_max_size_send_rare_values_to_oov():
    enc = CategoricalEncoder.fit(pl.Series("c", ["a"] * 3 + ["b"] * 2 + ["c"]), min_count=2)
    assert enc.values == ["a", "b"]
    assert CategoricalEncoder.fit(pl.Series("c", ["a"] * 3 + ["b"] * 2), max_size=1).values == ["a"]


def test_numerical_imputation_and_standardisation():
    enc = NumericalEncoder.fit(pl.Series("x", [-3.0, -1.0, 0.0, 5.0, None, float("nan")]))
    assert enc.mean == pytest.approx(0.25)
    assert enc.std == pytest.approx(np.std([-3, -1, 0, 5]))
    x, n_imputed = enc.transform(pl.Series("x", [0.25, None, float("nan"), float("inf")]))
    assert np.isfinite(x).all() and x.tolist() == [0.0, 0.0, 0.0, 0.0] and n_imputed == 3


def test_constant_column_does_not_divide_by_zero():
    enc = NumericalEncoder.fit(pl.Series("x", [2.0, 2.0]))
    assert enc.std == 1.0


def test_json_round_trip_and_column_order():
    schema = Schema(click="c", conversion="v", categorical=["a", "b"], numerical=["x"])
    df = pl.DataFrame({"a": ["u", "v", "u"], "b": [1, 2, 3], "x": [0.1, 0.2, None]})
    enc = FeatureEncoder.fit(df, schema)
    again = FeatureEncoder.from_json(enc.to_json())
    one = enc.transform(df)
    two = again.transform(df.select(["x", "b", "a"]))
    assert (one.categorical == two.categorical).all() and (one.numerical == two.numerical).all()


def test_lookup_in_blocks_equals_one_block(monkeypatch):
    import mtrank.data.encoders as encoders

    enc = CategoricalEncoder.fit(pl.Series("c", ["a", "b", "b", "c", "d"]))
    q = pl.Series("c", ["b", " a", "", None, "zz", "d", "c ", "a", "e", None, "b"])
    whole = enc.transform(q)
    monkeypatch.setattr(encoders, "_BLOCK", 3)  # 11 values in 4 blocks, the last one short
    blocks = enc.transform(q)
    assert blocks[0].tolist() == whole[0].tolist() == naive_transform(enc, q)[0]
    assert blocks[1:] == whole[1:] == (3, 2)  # "", None, None missing; "zz", "e" OOV
