"""Converters of public raw logs: Ali-CCP raw files, Taobao UserBehavior, RetailRocket events.

Every fixture is written here, in the files' own format; no real rows are shipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from mtrank.data.aliccp_raw import convert_aliccp_raw, parse_fields_option
from mtrank.data.staged_logs import convert_staged_log
from mtrank.errors import ConfigError, DataError


def _entries(items) -> str:
    return "\x01".join(f"{f}\x02{i}\x03{v}" for f, i, v in items)


COMMON = {
    "u1": [("101", "u1", 1), ("124", "m", 1), ("109_14", "c1", 3), ("109_14", "c2", 1.5)],
    "u2": [("101", "u2", 1), ("124", "f", 1), ("150_14", "n9", 2)],
}
SKELETON = [
    ("1", 1, 0, "u1", [("205", "i1", 1), ("206", "c1", 1), ("508", "x", 2.0)]),
    ("2", 0, 0, "u2", [("205", "i2", 1), ("206", "c2", 1), ("777", "t1", 1), ("777", "t2", 1)]),
    ("3", 1, 1, "u1", [("205", "i3", 1)]),
]


def write_aliccp(folder: Path, skeleton=SKELETON, common=COMMON, split="train", extra=()) -> Path:
    """Raw Ali-CCP files: ``sample_skeleton_<split>.csv`` and ``common_features_<split>.csv``;
    ``extra``: raw lines appended to the skeleton file."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"common_features_{split}.csv", "w") as fh:
        for key, e in common.items():
            fh.write(f"{key},{len(e)},{_entries(e)}\n")
    with open(folder / f"sample_skeleton_{split}.csv", "w") as fh:
        for sid, c, b, key, e in skeleton:
            fh.write(f"{sid},{c},{b},{key},{len(e)},{_entries(e)}\n")
        for line in extra:
            fh.write(line + "\n")
    return folder


def _read(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path / "*.parquet").sort("sample_id")


EXPECTED = {
    "sample_id": ["1", "2", "3"],
    "click": [1, 0, 1],
    "buy": [0, 0, 1],
    "101": ["u1", "u2", "u1"],
    "124": ["m", "f", "m"],
    "205": ["i1", "i2", "i3"],
    "206": ["c1", "c2", None],
    "109_14": [
        [{"id": "c1", "weight": 3.0}, {"id": "c2", "weight": 1.5}],
        [],
        [{"id": "c1", "weight": 3.0}, {"id": "c2", "weight": 1.5}],
    ],
    "150_14": [[], [{"id": "n9", "weight": 2.0}], []],
    "508": [[{"id": "x", "weight": 2.0}], [], []],
    "777": [[], ["t1", "t2"], []],
}


@pytest.mark.parametrize("buckets", [1, 3])
def test_aliccp_raw_values_kinds_and_schema(tmp_path, buckets):
    src = write_aliccp(tmp_path / "raw")
    rep = convert_aliccp_raw(src, tmp_path / "out", buckets=buckets, block_bytes=64)
    df = _read(tmp_path / "out" / "train")
    assert {c: df[c].to_list() for c in EXPECTED} == EXPECTED
    assert df.schema["109_14"] == pl.List(pl.Struct({"id": pl.String, "weight": pl.Float64}))
    assert df.schema["777"] == pl.List(pl.String)  # undeclared, several entries, values 1
    assert rep.rows == {"train": 3} and rep.buckets == buckets
    assert rep.fields["777"]["kind"] == "list" and rep.fields["109_14"]["max_entries"] == 2
    assert "205" in rep.fields and "207" in rep.absent_fields  # declared, never seen
    schema = yaml.safe_load((tmp_path / "out" / "schema.yaml").read_text())
    assert schema["click"] == "click" and schema["conversion"] == "buy"
    assert schema["categorical"] == ["101", "124", "205", "206"]
    assert schema["lists"] == [  # declared fields in ALICCP_SPARSE's order, then inferred ones
        {"column": "508", "weighted": True, "max_len": 1, "pooling": "mean"},
        {"column": "109_14", "weighted": True, "max_len": 2, "pooling": "mean"},
        {"column": "150_14", "weighted": True, "max_len": 1, "pooling": "mean"},
        {"column": "777", "weighted": False, "max_len": 2, "pooling": "mean"},
    ]
    written = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert written["rows"] == {"train": 3}


def test_aliccp_raw_schema_loads_when_lists_exist(tmp_path):
    from mtrank.data.schema import Schema

    if "lists" not in Schema.model_fields:
        pytest.skip("the schema has no `lists` kind on this branch yet")
    convert_aliccp_raw(write_aliccp(tmp_path / "raw"), tmp_path / "out")
    schema = Schema.from_file(tmp_path / "out" / "schema.yaml")
    assert [f.column for f in schema.lists] == ["508", "109_14", "150_14", "777"]


def test_aliccp_raw_declared_kind_and_both_splits(tmp_path):
    src = write_aliccp(tmp_path / "raw")
    write_aliccp(src, skeleton=SKELETON[:1], split="test")
    rep = convert_aliccp_raw(src, tmp_path / "out", fields=parse_fields_option(["777=list"]))
    assert rep.rows == {"train": 3, "test": 1}
    assert _read(tmp_path / "out" / "test")["205"].to_list() == ["i1"]
    with pytest.raises(ConfigError, match="FIELD=KIND"):
        parse_fields_option(["777=bag"])


BAD_LINES = [
    ("9,1,0,u1", "row 4", "4 comma-separated fields, expected 6"),
    ("9,1,0,u1,1,205i9", "row 4", "not field_id"),
    ("9,1,0,u1,1,205\x02i9\x03-1", "row 4", "finite number >= 0"),
    ("9,1,0,u1,2,205\x02i9\x031", "row 4", "feature_num is not the number of entries"),
    ("9,2,0,u1,1,205\x02i9\x031", "row 4", "click must be 0 or 1"),
    ("9,1,0,zz,1,205\x02i9\x031", "row 4", "md5 key is not in common_features_train.csv"),
]


@pytest.mark.parametrize("line,row,message", BAD_LINES)
def test_aliccp_raw_bad_rows_named_or_skipped(tmp_path, line, row, message):
    src = write_aliccp(tmp_path / "raw", extra=[line])
    with pytest.raises(DataError, match=message) as info:
        convert_aliccp_raw(src, tmp_path / "out")
    assert "sample_skeleton_train.csv" in str(info.value) and row in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging
    rep = convert_aliccp_raw(src, tmp_path / "out", bad_rows="skip")
    assert rep.rows == {"train": 3}
    assert sum(rep.skipped.values()) == 1


def test_aliccp_raw_row_numbers_across_blocks_after_skipped_lines(tmp_path):
    # 3 good rows, a short line (row 4), 3 good rows, then a row with a bad label (row 8):
    # read 40 bytes at a time, the error must still name row 8
    good = [(str(10 + k), 0, 0, "u1", [("205", f"i{k}", 1)]) for k in range(6)]
    src = write_aliccp(tmp_path / "raw", skeleton=good[:3])
    with open(src / "sample_skeleton_train.csv", "a") as fh:
        fh.write("99,1\n")
        for sid, c, b, key, e in good[3:]:
            fh.write(f"{sid},{c},{b},{key},{len(e)},{_entries(e)}\n")
        fh.write("98,7,0,u1,1,205\x02i9\x031\n")
    bad = src / "sample_skeleton_train.csv"
    with pytest.raises(DataError, match=r"row 4\]"):
        convert_aliccp_raw(src, tmp_path / "out", block_bytes=40)
    rep = convert_aliccp_raw(src, tmp_path / "out", block_bytes=40, bad_rows="skip")
    assert rep.rows == {"train": 6}
    assert rep.skipped == {
        f"{bad}: wrong field count": 1,
        f"{bad}: click must be 0 or 1": 1,
    }
    # without the short line, the bad label (now row 7, in a later block) is named exactly
    lines = bad.read_text().splitlines(keepends=True)
    bad.write_text("".join(lines[:3] + lines[4:]))
    with pytest.raises(DataError, match=r"row 7\] click must be 0 or 1"):
        convert_aliccp_raw(src, tmp_path / "out2", block_bytes=40)


def test_aliccp_raw_duplicate_md5_and_multi_valued_categorical(tmp_path):
    src = write_aliccp(tmp_path / "raw")
    with open(src / "common_features_train.csv", "a") as fh:
        fh.write("u1,1,101\x02other\x031\n")
    with pytest.raises(DataError, match=r"rows 1, 3\] md5 key 'u1' appears on more than one line"):
        convert_aliccp_raw(src, tmp_path / "out")
    rep = convert_aliccp_raw(src, tmp_path / "out", bad_rows="skip")
    assert _read(tmp_path / "out" / "train")["101"].to_list() == ["u1", "u2", "u1"]  # first kept
    assert list(rep.skipped.values()) == [1]
    two = [("5", 0, 0, "u2", [("205", "a", 1), ("205", "b", 1)])]
    src2 = write_aliccp(tmp_path / "raw2", skeleton=SKELETON + two)
    with pytest.raises(DataError, match=r"row 4\] field 205 is declared categorical"):
        convert_aliccp_raw(src2, tmp_path / "out2")


def test_aliccp_raw_missing_files_and_existing_output(tmp_path):
    with pytest.raises(DataError, match="tianchi.aliyun.com/dataset/408"):
        convert_aliccp_raw(tmp_path, tmp_path / "out")
    src = write_aliccp(tmp_path / "raw")
    (src / "common_features_train.csv").unlink()
    with pytest.raises(DataError, match="needs common_features_train.csv"):
        convert_aliccp_raw(src, tmp_path / "out")
    src = write_aliccp(tmp_path / "raw")
    convert_aliccp_raw(src, tmp_path / "out")
    with pytest.raises(ConfigError, match="--overwrite"):
        convert_aliccp_raw(src, tmp_path / "out")


# --- staged event logs -------------------------------------------------------------------------

TAOBAO = """1,10,100,pv,1000
1,10,100,cart,1005
1,10,100,buy,1010
1,11,101,pv,1001
1,11,101,fav,1002
2,10,100,buy,990
2,10,100,pv,995
2,12,102,buy,3000
3,13,103,pv,50
3,13,103,pv,40
"""
RETAILROCKET = """timestamp,visitorid,event,itemid,transactionid
1433221332117,257597,view,355908,
1433224214164,992329,view,248676,
1433224214165,992329,addtocart,248676,
1433224214166,992329,transaction,248676,4000
1433224214167,5,transaction,7,4001
1433224214168,6,view,7,
1433224214169,6,transaction,7,4002
"""


@pytest.mark.parametrize("buckets", [1, 2])
def test_taobao_rows_labels_and_dependency_counts(tmp_path, buckets):
    (tmp_path / "UserBehavior.csv").write_text(TAOBAO)
    rep = convert_staged_log(
        tmp_path / "UserBehavior.csv", tmp_path / "out", "taobao", buckets=buckets
    )
    df = pl.read_parquet(tmp_path / "out" / "data" / "*.parquet").sort("user_id", "item_id")
    assert df.rows() == [
        ("1", "10", "100", 1000, 1, 0, 1),
        ("1", "11", "101", 1001, 0, 1, 0),
        ("2", "10", "100", 995, 0, 0, 1),  # bought at 990, viewed at 995
        ("3", "13", "103", 40, 0, 0, 0),  # first view
    ]
    assert df.columns == ["user_id", "item_id", "category_id", "timestamp", "cart", "fav", "buy"]
    assert rep.events == 10 and rep.rows == 4
    assert rep.positives == {"cart": 1, "fav": 1, "buy": 2}
    assert rep.dropped_not_viewed["buy without pv"] == 1  # user 2, item 12
    assert rep.before_first_view["buy before first pv"] == 1
    assert rep.funnel_violations == {"buy without cart": 1}
    schema = yaml.safe_load((tmp_path / "out" / "schema.yaml").read_text())
    assert schema["funnel"] == [
        {"stage": "cart", "label": "cart"},
        {"stage": "buy", "label": "buy"},
    ]
    assert schema["passthrough"] == ["fav"] and schema["time"] == "timestamp"
    assert schema["categorical"] == ["user_id", "item_id", "category_id"]


def test_retailrocket_rows_and_custom_funnel(tmp_path):
    (tmp_path / "events.csv").write_text(RETAILROCKET)
    rep = convert_staged_log(
        tmp_path / "events.csv", tmp_path / "out", "retailrocket", funnel=["transaction"]
    )
    df = pl.read_parquet(tmp_path / "out" / "data" / "*.parquet").sort("visitorid")
    assert df.rows() == [
        ("257597", "355908", 1433221332117, 0, 0),
        ("6", "7", 1433224214168, 0, 1),
        ("992329", "248676", 1433224214164, 1, 1),
    ]
    assert rep.dropped_not_viewed["transaction without view"] == 1
    assert rep.funnel_violations == {}  # one-stage funnel: nothing to violate
    schema = yaml.safe_load((tmp_path / "out" / "schema.yaml").read_text())
    assert schema["funnel"] == [{"stage": "transaction", "label": "transaction"}]
    assert schema["passthrough"] == ["addtocart"]
    rep = convert_staged_log(
        tmp_path / "events.csv", tmp_path / "out", "retailrocket", overwrite=True
    )
    assert rep.funnel_violations == {"transaction without addtocart": 1}  # visitor 6


def test_staged_schema_loads_when_funnels_exist(tmp_path):
    from mtrank.data.schema import Schema

    if "funnel" not in Schema.model_fields:
        pytest.skip("the schema has no `funnel` key on this branch yet")
    (tmp_path / "events.csv").write_text(RETAILROCKET)
    convert_staged_log(tmp_path / "events.csv", tmp_path / "out", "retailrocket")
    schema = Schema.from_file(tmp_path / "out" / "schema.yaml")
    assert schema.label_columns == ["addtocart", "transaction"]


@pytest.mark.parametrize(
    "text,layout,match",
    [
        (TAOBAO + "4,14,104,click,7\n", "taobao", r"row 11\].*event must be one of"),
        (TAOBAO + "4,14,104,pv,soon\n", "taobao", r"row 11\].*time is not an integer"),
        (TAOBAO + "4,14,104,pv\n", "taobao", r"row 11\].*4 comma-separated fields"),
        (RETAILROCKET + "1,,view,7,\n", "retailrocket", r"row 8\].*empty id"),
        ("ts,visitor,event,item,tx\n1,2,view,3,\n", "retailrocket", "the header is"),
    ],
)
def test_staged_bad_rows(tmp_path, text, layout, match):
    (tmp_path / "log.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        convert_staged_log(tmp_path / "log.csv", tmp_path / "out", layout)
    assert not (tmp_path / "out").exists()


def test_staged_bad_options(tmp_path):
    (tmp_path / "log.csv").write_text(TAOBAO)
    with pytest.raises(ConfigError, match="distinct stages"):
        convert_staged_log(tmp_path / "log.csv", tmp_path / "out", "taobao", funnel=["view"])
    with pytest.raises(ConfigError, match="unknown layout"):
        convert_staged_log(tmp_path / "log.csv", tmp_path / "out", "criteo")


def test_convert_cli(tmp_path):
    from conftest import cli_in_process

    src = write_aliccp(tmp_path / "raw")
    ok = cli_in_process("convert", "aliccp-raw", "--src", src, "--out", tmp_path / "o")
    assert ok.returncode == 0, ok.stderr
    assert "train 3 rows" in ok.stdout and "--schema" in ok.stdout
    (tmp_path / "ub.csv").write_text(TAOBAO)
    ok = cli_in_process("convert", "taobao", "--src", tmp_path / "ub.csv", "--out", tmp_path / "t")
    assert ok.returncode == 0, ok.stderr
    assert "{'buy without cart': 1}" in ok.stdout and "{'buy without pv': 1}" in ok.stdout
    # as a user runs it: an existing output is one error line and exit code 2
    cmd = [sys.executable, "-m", "mtrank", "convert", "aliccp-raw", "--src", str(src)]
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    assert "--overwrite" in bad.stderr


def test_compressed_inputs(tmp_path):
    import gzip

    src = write_aliccp(tmp_path / "raw")
    for name in ("sample_skeleton_train.csv", "common_features_train.csv"):
        data = (src / name).read_bytes()
        (src / name).unlink()
        (src / f"{name}.gz").write_bytes(gzip.compress(data))
    rep = convert_aliccp_raw(src, tmp_path / "out")
    assert rep.rows == {"train": 3}
    assert _read(tmp_path / "out" / "train")["205"].to_list() == ["i1", "i2", "i3"]
    (tmp_path / "events.csv.gz").write_bytes(gzip.compress(RETAILROCKET.encode()))
    rep = convert_staged_log(tmp_path / "events.csv.gz", tmp_path / "rr", "retailrocket")
    assert rep.rows == 3


def test_staged_time_split(tmp_path):
    (tmp_path / "ub.csv").write_text(TAOBAO)
    # view times 40 … 1001: the last 10 % of the span starts at 1001 - 96.1 → 904
    rep = convert_staged_log(
        tmp_path / "ub.csv", tmp_path / "out", "taobao", buckets=2, test_fraction=0.1
    )
    assert rep.view_time_range == [40, 1001] and rep.test_from == 904
    train = pl.read_parquet(tmp_path / "out" / "train" / "*.parquet")
    test = pl.read_parquet(tmp_path / "out" / "test" / "*.parquet").sort("timestamp")
    assert test["timestamp"].to_list() == [995, 1000, 1001] and train["timestamp"].to_list() == [40]
    assert rep.rows == 4 and rep.rows_test == 3
    with pytest.raises(ConfigError, match="test-fraction"):
        convert_staged_log(tmp_path / "ub.csv", tmp_path / "o2", "taobao", test_fraction=1.0)
