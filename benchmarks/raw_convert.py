"""Speed and peak memory of the raw-log converters (``mtrank convert aliccp-raw`` and
``mtrank convert taobao``) on generated files in the raw formats.

The Ali-CCP generator writes ``--rows`` skeleton lines for ``--rows / 10`` users, in the raw
layout (fields separated by ``\\x01``, ``field\\x02id\\x03value``): 9 single-valued user fields
and 4 weighted user-history lists of mean length ``--list-len`` in the common features; 6
single-valued item/context fields and 4 weighted combination fields in the skeleton. The Taobao
generator writes ``--events`` UserBehavior lines (pv 89 %, cart 5.5 %, fav 3 %, buy 2.5 %).

Each conversion runs in its own process; the table gives its wall time, input rows per second
and peak RSS (``VmHWM``): with the defaults (64 MB text blocks, one bucket at these sizes), and
with 4 MB blocks and many buckets (the bounded-memory path the tens-of-GB real files take), the
latter also on 4× the Ali-CCP rows with 4× the buckets: peak RSS should stay about flat.

Run (about a minute on 2 idle cores)::

    PYTHONPATH=src python benchmarks/raw_convert.py --rows 100000 --events 1000000

Writes ``benchmarks/results/raw_convert.json`` (unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
USER_SINGLE = ["101", "121", "122", "124", "125", "126", "127", "128", "129"]
USER_LISTS = ["109_14", "110_14", "127_14", "150_14"]
ITEM_SINGLE = ["205", "206", "207", "210", "216", "301"]
COMBOS = ["508", "509", "702", "853"]


def _entry(field: str, ids: pl.Expr, value: pl.Expr | str = "1") -> pl.Expr:
    v = pl.lit(value) if isinstance(value, str) else value.cast(pl.String)
    return pl.concat_str(pl.lit(f"{field}\x02"), ids.cast(pl.String), pl.lit("\x03"), v)


def write_aliccp(folder: Path, rows: int, list_len: int, seed: int = 0) -> dict:
    """Raw Ali-CCP train files with ``rows`` samples; returns sizes."""
    rng = np.random.default_rng(seed)
    users = max(1, rows // 10)
    folder.mkdir(parents=True, exist_ok=True)
    # common features: one line per user
    lens = rng.poisson(list_len, size=(users, len(USER_LISTS))).clip(1)
    long = pl.DataFrame(
        {
            "u": np.repeat(np.tile(np.arange(users), len(USER_LISTS)), lens.T.ravel()),
            "f": np.repeat(np.repeat(np.arange(len(USER_LISTS)), users), lens.T.ravel()),
        }
    ).with_columns(
        id=pl.Series(rng.integers(0, 50_000, size=int(lens.sum()))),
        w=pl.Series(rng.integers(1, 20, size=int(lens.sum()))),
    )
    long = long.with_columns(
        e=pl.concat_str(
            pl.col("f").replace_strict(dict(enumerate(USER_LISTS)), return_dtype=pl.String),
            pl.lit("\x02"),
            pl.col("id").cast(pl.String),
            pl.lit("\x03"),
            pl.col("w").cast(pl.String),
        )
    )
    lists = long.group_by("u").agg(pl.col("e").str.join("\x01"), pl.len().alias("n")).sort("u")
    single = pl.DataFrame({"u": np.arange(users)}).with_columns(
        s=pl.concat_str(
            [_entry(f, (pl.col("u") * (k + 7)) % (10**k + 3)) for k, f in enumerate(USER_SINGLE)],
            separator="\x01",
        )
    )
    common = (
        single.join(lists, on="u")
        .select(
            pl.concat_str(pl.lit("md5_"), pl.col("u").cast(pl.String)).alias("md5"),
            (pl.col("n") + len(USER_SINGLE)).cast(pl.String).alias("num"),
            pl.concat_str("s", "e", separator="\x01").alias("features"),
        )
        .sample(fraction=1.0, shuffle=True, seed=seed)
    )
    common.write_csv(
        folder / "common_features_train.csv", include_header=False, quote_style="never"
    )
    # skeleton: one line per impression
    item = rng.zipf(1.3, size=rows) % 500_000
    click = rng.random(rows) < 0.04
    sk = pl.DataFrame(
        {
            "sid": np.arange(1, rows + 1),
            "click": click.astype(np.int8),
            "buy": (click & (rng.random(rows) < 0.05)).astype(np.int8),
            "u": rng.integers(0, users, size=rows),
            "item": item,
            "w": rng.integers(1, 9, size=rows),
        }
    )
    feats = [
        _entry(f, (pl.col("item") * (k + 3)) % (10 ** (k + 2))) for k, f in enumerate(ITEM_SINGLE)
    ]
    feats += [_entry(f, pl.col("item") % 1000, pl.col("w")) for f in COMBOS]
    sk.select(
        pl.col("sid"),
        pl.col("click"),
        pl.col("buy"),
        pl.concat_str(pl.lit("md5_"), pl.col("u").cast(pl.String)).alias("md5"),
        pl.lit(str(len(feats))).alias("num"),
        pl.concat_str(feats, separator="\x01").alias("features"),
    ).write_csv(folder / "sample_skeleton_train.csv", include_header=False, quote_style="never")
    return {
        "skeleton_rows": rows,
        "common_rows": users,
        "bytes": sum(p.stat().st_size for p in folder.iterdir()),
    }


def write_taobao(path: Path, events: int, seed: int = 0) -> dict:
    """A UserBehavior-layout file with ``events`` lines."""
    rng = np.random.default_rng(seed)
    users = max(1, events // 100)
    kinds = rng.choice(["pv", "cart", "fav", "buy"], p=[0.89, 0.055, 0.03, 0.025], size=events)
    item = rng.zipf(1.4, size=events) % 200_000
    pl.DataFrame(
        {
            "u": rng.integers(0, users, size=events),
            "i": item,
            "c": item % 5_000,
            "b": kinds,
            "t": rng.integers(1_511_539_200, 1_512_316_799, size=events),
        }
    ).write_csv(path, include_header=False)
    return {"events": events, "bytes": path.stat().st_size}


_CHILD = """
import json, sys, time
from mtrank.data.aliccp_raw import convert_aliccp_raw
from mtrank.data.staged_logs import convert_staged_log
kind, src, out, buckets, block = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6])
t = time.perf_counter()
if kind == "aliccp":
    rep = convert_aliccp_raw(src, out, buckets=buckets or None, block_bytes=block)
    rows = rep.rows["train"]
else:
    rep = convert_staged_log(src, out, "taobao", buckets=buckets or None, block_bytes=block)
    rows = rep.events
sec = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": sec, "rows": rows, "peak_rss_mb": int(hwm) / 1024,
                  "buckets": rep.buckets}))
"""


def run_child(kind: str, src: Path, out: Path, buckets: int, block_mb: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(src), str(out), str(buckets), str(block_mb << 20)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="Ali-CCP skeleton rows")
    ap.add_argument("--list-len", type=int, default=10, help="mean user-history list length")
    ap.add_argument("--events", type=int, default=1_000_000, help="Taobao events")
    ap.add_argument("--many-buckets", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "raw_convert.json")
    args = ap.parse_args()
    results: dict = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": os.getloadavg(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        results["aliccp_input"] = write_aliccp(tmp / "raw", args.rows, args.list_len)
        results["aliccp_input_x4"] = write_aliccp(tmp / "raw4", 4 * args.rows, args.list_len)
        results["taobao_input"] = write_taobao(tmp / "ub.csv", args.events)
        results["generate_seconds"] = round(time.perf_counter() - t, 1)
        # (converter, input, buckets (0 = from the default 512 MB per bucket), block MB)
        plan = [
            ("aliccp", tmp / "raw", 0, 64),
            ("aliccp", tmp / "raw", args.many_buckets, 4),
            ("aliccp", tmp / "raw4", 4 * args.many_buckets, 4),
            ("taobao", tmp / "ub.csv", 0, 64),
            ("taobao", tmp / "ub.csv", args.many_buckets, 4),
        ]
        for k, (kind, src, buckets, block_mb) in enumerate(plan):
            r = run_child(kind, src, tmp / f"out-{k}", buckets, block_mb)
            r.update(converter=kind, block_mb=block_mb, rows_per_s=round(r["rows"] / r["seconds"]))
            results["runs"].append(r)
    results["load_after"] = os.getloadavg()
    print(
        f"{'converter':<10} {'buckets':>7} {'block MB':>8} {'rows':>10} {'seconds':>8} "
        f"{'rows/s':>10} {'peak RSS MB':>12}"
    )
    for r in results["runs"]:
        print(
            f"{r['converter']:<10} {r['buckets']:>7} {r['block_mb']:>8} {r['rows']:>10,} "
            f"{r['seconds']:>8.2f} {r['rows_per_s']:>10,} {r['peak_rss_mb']:>12.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
