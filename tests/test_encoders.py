import numpy as np
import polars as pl
import pytest

from mtrank.data.encoders import MISSING, OOV, CategoricalEncoder, FeatureEncoder, NumericalEncoder, canonical_ids
from mtrank.data.schema import Schema


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
