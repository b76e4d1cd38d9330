"""Validation at the boundary: each error names the file, the column and the rows."""

from pathlib import Path

import polars as pl
import pytest

from mtrank.data.datasets import load_table
from mtrank.data.schema import Schema
from mtrank.errors import DataError, SchemaError

SCHEMA = Schema(
    name="t", click="click", conversion="buy", price="price", categorical=["item"], numerical=["x"]
)
HEADER = "click,buy,item,x,price\n"


def write(tmp_path: Path, text: str, name: str = "d.csv", mode: str = "w") -> Path:
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def load(path, schema=SCHEMA):
    return load_table(path, schema)


def test_clean_file_loads_with_clean_dtypes(tmp_path):
    df, rep = load(write(tmp_path, HEADER + "1,1,a,0.5,10\n0,0,b,,3\n1,0,,2,5\n"))
    assert df["click"].dtype == pl.Int8 and df["buy"].to_list() == [1, 0, 0]
    assert df["x"].dtype == pl.Float64 and df["x"].to_list()[1] is None
    assert rep.rows_read == 3 and rep.funnel_violations == 0


def test_missing_column_names_file_and_columns(tmp_path):
    p = write(tmp_path, "click,buy,item\n1,1,a\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['x', 'price'\]") as e:
        load(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("2", "not 0 or 1"),
        ("-1", "not 0 or 1"),
        ("0.5", "not 0 or 1"),
        ("yes", "non-numeric label"),
        ("", "missing label"),
    ],
)
def test_bad_label_names_column_and_row(tmp_path, value, fragment):
    p = write(tmp_path, HEADER + "0,0,a,1,1\n0,0,a,1,1\n" + f"{value},0,a,1,1\n")
    with pytest.raises(DataError, match=fragment) as e:
        load(p)
    assert "column 'click'" in str(e.value) and "row 3" in str(e.value) and str(p) in str(e.value)


def test_funnel_violation_is_an_error_with_count_and_rows(tmp_path):
    p = write(tmp_path, HEADER + "1,1,a,1,1\n0,1,a,1,1\n0,0,a,1,1\n0,1,b,1,1\n")
    with pytest.raises(DataError, match=r"2 row\(s\) with buy=1 but click=0") as e:
        load(p)
    assert e.value.rows == [2, 4] and e.value.count == 2


def test_funnel_violation_drop_policy_drops_and_reports(tmp_path):
    p = write(tmp_path, HEADER + "1,1,a,1,1\n0,1,a,1,1\n0,0,a,1,1\n0,1,b,1,1\n")
    df, rep = load(p, SCHEMA.model_copy(update={"funnel_violations": "drop"}))
    assert df.height == 2 and rep.dropped_rows == [2, 4] and rep.funnel_violations == 2


def test_feature_identical_to_label_is_leakage(tmp_path):
    schema = Schema(click="click", conversion="buy", categorical=["item"], numerical=["x"])
    p = write(tmp_path, "click,buy,item,x\n1,1,1,0.3\n1,0,0,0.1\n0,0,0,0.2\n")
    with pytest.raises(DataError, match="identical to label column 'buy'") as e:
        load(p, schema)
    assert "column 'item'" in str(e.value)


def test_label_declared_as_feature_is_rejected_by_the_schema():
    with pytest.raises(SchemaError, match="leaks"):
        Schema(click="click", conversion="buy", categorical=["buy"])


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load(write(tmp_path, ""))


def test_header_only_file(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        load(write(tmp_path, HEADER))


def test_non_numeric_numerical_value(tmp_path):
    with pytest.raises(DataError, match="non-numeric value") as e:
        load(write(tmp_path, HEADER + "1,1,a,0.5,1\n0,0,b,abc,1\n"))
    assert "column 'x'" in str(e.value) and "row 2" in str(e.value)


def test_bom_and_windows_line_endings(tmp_path):
    text = ("\ufeff" + HEADER + "1,1,a,0.5,1\n0,0,b,1.5,2\n").replace("\n", "\r\n").encode("utf-8")
    df, _ = load(write(tmp_path, text, mode="wb"))
    assert (
        df.columns[1] == "click"
        and df["x"].to_list() == [0.5, 1.5]
        and df["item"].to_list() == ["a", "b"]
    )


def test_truncated_last_line_is_reported(tmp_path):
    p = write(tmp_path, HEADER + "1,1,a,0.5,1\n0,0\n")
    with pytest.raises(DataError) as e:
        load(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope.csv")


def test_parquet_is_read_by_schema(tmp_path):
    p = tmp_path / "d.parquet"
    pl.DataFrame(
        {"x": [1.0, 2.0], "item": ["a", "b"], "price": [1, 2], "buy": [0, 1], "click": [1, 1]}
    ).write_parquet(p)
    df, _ = load(p)
    assert df["buy"].to_list() == [0, 1]
