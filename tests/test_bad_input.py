"""Issue 8: a corpus of the failure kinds that public ESMM/MMoE issue trackers report again and
again, one table row per case. A row is (id, action, expectation): the action builds the input
and runs mtrank on it; the expectation is an exact error class plus message fragment
(:class:`Raises`) or a predicate on the returned value. A new case is one line.

Row numbers in data errors count data rows from 1, the header line not counted (row 1 = the
first line after the header), for every kind of error alike (a malformed line, a bad label, a
bad value): :class:`mtrank.errors.DataError`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mtrank.data.datasets import load_table
from mtrank.data.encoders import (
    MISSING,
    OOV,
    CategoricalEncoder,
    FeatureEncoder,
    NumericalEncoder,
)
from mtrank.data.schema import Schema
from mtrank.config import load_config
from mtrank.errors import BundleError, ConfigError, DataError, DataWarning, SchemaError
from mtrank.losses import TaskLoss, binary_cross_entropy
from mtrank.metrics import auc, gauc

SCHEMA = Schema(name="t", click="click", conversion="buy", categorical=["item"], numerical=["x"])
HEADER = "click,buy,item,x\n"
CTCVR = TaskLoss("ctcvr", label="ctcvr", outputs=("a", "b"), kind="logit_product")


@dataclass(frozen=True)
class Raises:
    error: type[Exception]
    fragment: str


@dataclass(frozen=True)
class Case:
    id: str
    action: Callable[[Path], object]
    expect: Raises | Callable[[object], bool]


W_SCHEMA = SCHEMA.model_copy(update={"weight": "w"})
W_HEADER = "click,buy,item,x,w\n"
P_SCHEMA = SCHEMA.model_copy(update={"position": "pos"})
P_HEADER = "click,buy,item,x,pos\n"
SCHEMA_ARGS = {"click": "click", "conversion": "buy", "categorical": ["item"]}
SCHEMA_YAML = "click: click\nconversion: buy\ncategorical: [item]\n"
LEAK_SCHEMA = Schema(
    click="click", conversion="buy", categorical=["item"], numerical=["refund_days"]
)


def _missingness_leak_csv() -> str:
    """200 rows; ``refund_days`` is filled in on clicked rows only (a field known after the
    click)."""
    rows = []
    for i in range(200):
        click = int(i % 10 == 0)
        rows.append(f"{click},0,{i % 7},{3 if click else ''}")
    return "click,buy,item,refund_days\n" + "\n".join(rows) + "\n"


# --- actions ---------------------------------------------------------------------------------


def csv(text: str | bytes, schema: Schema = SCHEMA) -> Callable[[Path], object]:
    def run(tmp: Path):
        p = tmp / "data.csv"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return load_table(p, schema)

    return run


def encode_cat(train: list, test: list) -> Callable[[Path], object]:
    return lambda tmp: CategoricalEncoder.fit(pl.Series("c", train)).transform(pl.Series("c", test))


def ctcvr_loss(a: float, b: float, y: float) -> Callable[[Path], object]:
    def run(tmp: Path):
        ta, tb = torch.tensor([a], requires_grad=True), torch.tensor([b], requires_grad=True)
        loss = binary_cross_entropy(CTCVR, {"a": ta, "b": tb}, torch.tensor([y])).sum()
        loss.backward()
        return float(loss.detach()), float(ta.grad.abs() + tb.grad.abs())

    return run


def finite_and_moving(r) -> bool:
    loss, grad = r
    return np.isfinite(loss) and np.isfinite(grad) and grad > 0


def autocast_step(tmp: Path):
    from mtrank.losses import total_loss
    from mtrank.models import build_model
    from mtrank.models.config import FeatureSpec, ModelConfig
    from tests.conftest import make_batch

    torch.manual_seed(0)
    model = build_model(
        FeatureSpec(cardinalities=[7, 7], n_numerical=1), ModelConfig(tower=[32, 16])
    )
    batch = make_batch(256)
    fp32, _ = total_loss(model.tasks, model(batch.categorical, batch.numerical), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = total_loss(model.tasks, model(batch.categorical, batch.numerical), batch)
    bf16.backward()
    return (
        float(fp32.detach()),
        float(bf16.detach()),
        all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None),
    )


def gauc_mixed(tmp: Path):
    y = np.array([0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9, 0.3, 0.5, 0.8])  # "mix": 1 of 2 pairs ordered → 0.5
    g = np.array(["neg", "neg", "pos", "pos", "mix", "mix", "mix"])
    return gauc(y, p, g)


def evaluate_twice(tmp: Path):
    from mtrank.data.simulate import SIMULATED_SCHEMA
    from mtrank.metrics.evaluate import evaluate_outputs

    rng = np.random.default_rng(0)

    def data(n):
        c = (rng.random(n) < 0.3).astype(float)
        out = {"p_ctr": rng.random(n), "p_cvr": rng.random(n)}
        out["p_ctcvr"] = out["p_ctr"] * out["p_cvr"]
        return out, {"click": c, "conversion": c, "ctcvr": c}

    a, b = data(500), data(300)
    first = evaluate_outputs(*a, SIMULATED_SCHEMA)
    evaluate_outputs(*b, SIMULATED_SCHEMA)
    return first == evaluate_outputs(*a, SIMULATED_SCHEMA) and first["n_impressions"] == 500


def hashseed_vocab(tmp: Path):
    code = (
        "import polars as pl, json; from mtrank.data.encoders import CategoricalEncoder;"
        "e = CategoricalEncoder.fit(pl.Series('c', ['apple', 'kiwi', 'fig', 'kiwi', 'z' * 40]));"
        "print(json.dumps([e.values, e.transform(pl.Series('c', ['fig', 'kiwi', "
        "'nope']))[0].tolist()]))"
    )
    outs = []
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.append(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
    return outs


def fit_tiny(schema: Schema, df: pl.DataFrame, batch_size: int = 16):
    from mtrank.models.config import ModelConfig
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import fit

    splits = {"train": df.head(60), "val": df.slice(60, 20), "test": df.tail(20)}
    return fit(
        splits,
        schema,
        ModelConfig(tower=[8], embedding_dim=4),
        TrainConfig(epochs=1, batch_size=batch_size),
        quiet=True,
    )


def tiny_funnel(n: int = 100) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    click = (rng.random(n) < 0.4).astype(np.int8)
    return pl.DataFrame(
        {
            "click": click,
            "buy": (click * (rng.random(n) < 0.5)).astype(np.int8),
            "item": rng.integers(0, 5, n),
            "x": rng.normal(size=n),
        }
    )


SCHEMA3 = Schema(
    name="t3",
    funnel=[
        {"stage": "click", "label": "is_click"},
        {"stage": "cart", "label": "is_cart"},
        {"stage": "buy", "label": "is_buy", "after": "click"},
    ],
    categorical=["item"],
    numerical=["x"],
)
HEADER3 = "is_click,is_cart,is_buy,item,x\n"


def tiny_funnel3() -> pl.DataFrame:
    df = tiny_funnel()
    return df.rename({"click": "is_click", "buy": "is_buy"}).with_columns(
        (pl.col("is_click") * (pl.col("x") > 0)).cast(pl.Int8).alias("is_cart")
    )


def only(kind: str):
    def run(tmp: Path):
        schema = Schema(
            click="click",
            conversion="buy",
            **({"numerical": ["x"]} if kind == "dense" else {"categorical": ["item"]}),
        )
        res = fit_tiny(schema, tiny_funnel())
        return res.metrics["test"]["n_impressions"]

    return run


def batch_size_one(tmp: Path):
    res = fit_tiny(SCHEMA, tiny_funnel(), batch_size=1)
    return res.metrics["test"]["n_impressions"], res.bundle.predict_arrays(
        res.bundle.encode(tiny_funnel().head(1))
    )["p_ctr"].shape


def reload_fresh_process(tmp: Path):
    from mtrank.workflow import predictions_frame

    res = fit_tiny(SCHEMA, tiny_funnel())
    res.bundle.save(tmp / "b")
    df = tiny_funnel().tail(20)
    df.write_parquet(tmp / "rows.parquet")
    here = predictions_frame(res.bundle, df, "rows")
    code = (
        "import polars as pl, sys; from mtrank.bundle import Bundle; from mtrank.workflow "
        "import predictions_frame;"
        f"b = Bundle.load({str(tmp / 'b')!r}); predictions_frame(b, "
        f"pl.read_parquet({str(tmp / 'rows.parquet')!r}), "
        f"'r').write_parquet({str(tmp / 'out.parquet')!r})"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONHASHSEED="99")
    )
    return here.equals(pl.read_parquet(tmp / "out.parquet"))


def reordered_columns(tmp: Path):
    from mtrank.workflow import predictions_frame

    res = fit_tiny(SCHEMA, tiny_funnel())
    df = tiny_funnel().tail(20)
    return predictions_frame(res.bundle, df, "a").equals(
        predictions_frame(res.bundle, df.select(["x", "item", "buy", "click"]), "b")
    )


def interrupted_bundle_write(tmp: Path):
    import mtrank.bundle as bundle_mod
    from mtrank.bundle import Bundle

    res = fit_tiny(SCHEMA, tiny_funnel())
    path = res.bundle.save(tmp / "b")
    before = Bundle.digest(path)
    with pytest.raises(BundleError, match="already exists"):
        res.bundle.save(path)
    original = bundle_mod.save_file

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process is interrupted half-way through the write

    bundle_mod.save_file = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            res.bundle.save(path, overwrite=True)
    finally:
        bundle_mod.save_file = original
    return Bundle.digest(path) == before and sorted(p.name for p in tmp.iterdir()) == ["b"]


def tampered_bundle(damage: Callable[[Path], None]):
    def run(tmp: Path):
        from mtrank.bundle import Bundle

        res = fit_tiny(SCHEMA, tiny_funnel())
        path = res.bundle.save(tmp / "b")
        damage(path)
        return Bundle.load(path)

    return run


def rewrite_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Tamper with the weights and re-record their sha256, so the later checks are reached."""
    import hashlib

    from safetensors.torch import load_file, save_file

    def damage(path: Path) -> None:
        state = load_file(str(path / "model.safetensors"))
        change(state)
        save_file(state, str(path / "model.safetensors"))
        cfg = json.loads((path / "config.json").read_text())
        cfg["sha256"]["model.safetensors"] = hashlib.sha256(
            (path / "model.safetensors").read_bytes()
        ).hexdigest()
        (path / "config.json").write_text(json.dumps(cfg))

    return damage


def _first_weight(state: dict) -> str:
    return next(k for k in state if k.endswith("weight"))


wrong_shape = rewrite_weights(lambda st: st.__setitem__(_first_weight(st), torch.zeros(3, 3)))
nan_weights = rewrite_weights(lambda st: st[_first_weight(st)].view(-1)[:1].fill_(float("nan")))


def flip_bytes_in_place(path: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-8:] = b"\xff" * 8  # same size, valid header: only the checksum can tell
    (path / "model.safetensors").write_bytes(bytes(data))


def fused(formula: str, price, **params) -> Callable[[Path], object]:
    from mtrank.ranking.fusion import make_fusion, safe_scores

    def run(tmp: Path):
        n = len(price)
        p = np.linspace(0.1, 0.5, n)
        return safe_scores(make_fusion(formula, params).score(p, p[::-1].copy(), np.asarray(price)))

    return run


def prices(values, policy: str = "error") -> Callable[[Path], object]:
    from mtrank.ranking.fusion import clean_prices

    return lambda tmp: clean_prices(values, policy=policy, floor=0.01)


def nan_score_ranked(tmp: Path):
    from mtrank.ranking.fusion import safe_scores

    scores = safe_scores(np.array([np.nan, 0.2, np.inf * 0, -np.inf, 0.1]))
    return np.argsort(-scores, kind="stable").tolist()


def no_pickle_anywhere(tmp: Path):
    src = Path(__file__).resolve().parents[1] / "src"
    hits = []
    for f in src.rglob("*.py"):
        text = f.read_text()
        for needle in ("import pickle", "torch.load(", "torch.save(", "cloudpickle", "joblib"):
            if needle in text:
                hits.append(f"{f.name}: {needle}")
    return hits


def schema_file(text: str, name: str = "s.yaml") -> Callable[[Path], object]:
    """Write ``text`` as a schema file ``<tmp>/<name>`` and read it as ``--schema`` does."""

    def run(tmp: Path):
        p = tmp / name
        p.write_bytes(text.encode())
        return Schema.from_file(p)

    return run


def config_file(text: str) -> Callable[[Path], object]:
    """Write ``text`` as ``<tmp>/run.yaml`` and read it as ``--config`` does."""

    def run(tmp: Path):
        (tmp / "run.yaml").write_text(text)
        return load_config(tmp / "run.yaml")

    return run


def fusion_file(text: str) -> Callable[[Path], object]:
    """Write ``text`` as ``<tmp>/fusion.json`` and read it as ``--fusion`` does."""
    from mtrank.ranking.fusion import load_fusion

    def run(tmp: Path):
        (tmp / "fusion.json").write_text(text)
        return load_fusion(tmp / "fusion.json")

    return run


STAGES3 = (  # a three-stage funnel; %s completes the cart stage
    "funnel:\n  - {stage: click, label: c}\n  - {stage: cart, label: k%s}\n"
    "  - {stage: buy, label: b}\n"
)
FEATS = "categorical: [item]\n"


# --- the table -------------------------------------------------------------------------------

CASES = [
    Case(
        "01-feature-identical-to-conversion",
        csv(
            "click,buy,item,x,leak\n" + "1,1,a,0.1,1\n1,0,b,0.2,0\n0,0,c,0.3,0\n",
            Schema(click="click", conversion="buy", categorical=["item", "leak"], numerical=["x"]),
        ),
        Raises(DataError, "'leak' is identical to label column 'buy'"),
    ),
    Case(
        "01-feature-is-one-minus-the-label",
        csv(
            "click,buy,item,x,inv\n1,1,a,0.1,0\n1,0,b,0.2,1\n0,0,c,0.3,1\n",
            Schema(click="click", conversion="buy", categorical=["item"], numerical=["x", "inv"]),
        ),
        Raises(DataError, "'inv' is identical to label column 'buy' (or to 1 − label)"),
    ),
    Case(
        "01-two-valued-feature-that-is-not-the-label",
        csv("click,buy,item,x\n1,1,a,0.1\n1,0,a,0.2\n0,0,b,0.3\n1,1,b,0.3\n", SCHEMA),
        lambda r: r[0].height == 4,
    ),
    Case(
        "02-conversion-without-click",
        csv(HEADER + "1,1,a,1\n0,1,b,1\n0,0,c,1\n0,1,d,1\n"),
        Raises(DataError, "2 row(s) with buy=1 but click=0"),
    ),
    Case(
        "02-conversion-without-click-rows",
        lambda t: _rows_of(csv(HEADER + "1,1,a,1\n0,1,b,1\n0,0,c,1\n0,1,d,1\n"), t),
        lambda r: r == [2, 4],
    ),
    Case(
        "02-drop-policy",
        csv(
            HEADER + "1,1,a,1\n0,1,b,1\n0,0,c,1\n0,1,d,1\n",
            SCHEMA.model_copy(update={"funnel_violations": "drop"}),
        ),
        lambda r: r[0].height == 2 and r[1].dropped_rows == [2, 4],
    ),
    Case(
        "03-label-2",
        csv(HEADER + "0,0,a,1\n2,0,a,1\n"),
        Raises(DataError, "column 'click'; row 2] 1 label value(s) that are not 0 or 1, e.g. 2"),
    ),
    Case(
        "03-label-minus-1",
        csv(HEADER + "0,0,a,1\n-1,0,a,1\n"),
        Raises(DataError, "not 0 or 1, e.g. -1"),
    ),
    Case(
        "03-label-half",
        csv(HEADER + "0,0,a,1\n0.5,0,a,1\n"),
        Raises(DataError, "not 0 or 1, e.g. 0.5"),
    ),
    Case(
        "03-label-yes",
        csv(HEADER + "0,0,a,1\nyes,0,a,1\n"),
        Raises(DataError, "non-numeric label value(s), e.g. 'yes'"),
    ),
    Case(
        "03-label-empty",
        csv(HEADER + "0,0,a,1\n,0,a,1\n"),
        Raises(DataError, "column 'click'; row 2] 1 missing label"),
    ),
    Case("04-pctr-pcvr-exactly-one-negative", ctcvr_loss(200.0, 200.0, 0.0), finite_and_moving),
    Case(
        "04-logits-minus-50-positive",
        ctcvr_loss(-50.0, -50.0, 1.0),
        lambda r: finite_and_moving(r) and abs(r[0] - 100.0) < 1e-3,
    ),
    Case("05-bf16-autocast-step", autocast_step, lambda r: abs(r[0] - r[1]) < 1e-2 and r[2]),
    Case(
        "06-gauc-skips-single-class-users",
        gauc_mixed,
        lambda r: r.groups_used == 1 and r.groups_skipped == 2 and abs(r.value - 0.5) < 1e-12,
    ),
    Case(
        "06-all-one-class-auc-undefined",
        lambda t: auc(np.zeros(10), np.linspace(0, 1, 10)),
        lambda r: r is None,
    ),
    Case("07-evaluation-has-no-state", evaluate_twice, lambda r: r is True),
    Case(
        "08-id-larger-than-any-seen",
        encode_cat([1, 2, 3], [10**15]),
        lambda r: r[0].tolist() == [OOV] and r[2] == 1,
    ),
    Case(
        "08-nan-id",
        encode_cat([1.0, 2.0], [float("nan")]),
        lambda r: r[0].tolist() == [MISSING] and r[1] == 1,
    ),
    Case("08-empty-string-id", encode_cat(["a", "b"], [""]), lambda r: r[0].tolist() == [MISSING]),
    Case(
        "08-id-seen-only-in-validation",
        encode_cat(["a", "b"], ["only-in-val"]),
        lambda r: r[0].tolist() == [OOV],
    ),
    Case(
        "09-zero-never-seen-is-oov-not-alias",
        encode_cat([1, 2, 2], [0, 1, 2]),
        lambda r: r[0].tolist() == [OOV, 3, 2],
    ),
    Case(
        "10-same-vocab-under-any-hashseed",
        hashseed_vocab,
        lambda r: r[0] == r[1] and json.loads(r[0])[1] == [4, 2, OOV],
    ),
    Case(
        "11-dense-negative-nan-empty",
        lambda t: NumericalEncoder.fit(
            load_table(
                _write(
                    t, "click,buy,item,x\n0,0,a,-3\n0,0,a,-1\n0,0,a,0\n0,0,a,5\n0,0,a,NaN\n0,0,a,\n"
                ),
                SCHEMA,
            )[0]["x"]
        ).transform(load_table(t / "d.csv", SCHEMA)[0]["x"])[0],
        lambda r: np.isfinite(r).all() and r[4] == r[5] == 0.0,
    ),
    Case("12-only-dense-features", only("dense"), lambda r: r == 20),
    Case("12-only-categorical-features", only("categorical"), lambda r: r == 20),
    Case("13-batch-size-one-and-tiny-test", batch_size_one, lambda r: r == (20, (1,))),
    Case("14-reload-in-fresh-process", reload_fresh_process, lambda r: r is True),
    Case("15-columns-in-another-order", reordered_columns, lambda r: r is True),
    Case(
        "16-negative-price-is-an-error-by-default",
        prices([10.0, -0.5, 5.0]),
        Raises(DataError, "row 2] 1 missing, non-finite or negative price"),
    ),
    Case(
        "16-negative-price-clip-policy",
        prices([10.0, -3.0], "clip"),
        lambda r: r[0].tolist() == [10.0, 0.01] and r[1].all(),
    ),
    Case(
        "16-nan-price-drop-policy",
        prices([10.0, float("nan"), 5.0], "drop"),
        lambda r: r[1].tolist() == [True, False, True],
    ),
    Case(
        "16-string-price-in-data",
        csv(
            "click,buy,item,x,price\n1,1,a,0.5,12.5\n0,0,b,1.5,abc\n",
            SCHEMA.model_copy(update={"price": "price"}),
        ),
        Raises(DataError, "column 'price'; row 2] 1 non-numeric value(s)"),
    ),
    Case(
        "16-gamma-negative-price-zero-finite",
        fused("multiplicative", [0.0, 10.0, 0.0], alpha=1.0, beta=1.0, gamma=-1.0, eps=0.0),
        lambda r: np.isfinite(r).all(),
    ),
    Case(
        "16-nan-score-never-ranks-first",
        nan_score_ranked,
        lambda r: r[:2] == [1, 4] and set(r[2:]) == {0, 2, 3},
    ),
    Case(
        "17-integer-prices-in-cents",
        lambda t: (
            fused("multiplicative", np.array([1999, 250, 0], dtype=np.int64), gamma=0.5)(t),
            fused("multiplicative", np.array([1999.0, 250.0, 0.0]), gamma=0.5)(t),
        ),
        lambda r: np.array_equal(r[0], r[1]) and np.isfinite(r[0]).all(),
    ),
    Case("18-empty-csv", csv(""), Raises(DataError, "empty (0 bytes)")),
    Case("18-header-only", csv(HEADER), Raises(DataError, "no data rows")),
    Case(
        "18-truncated-last-line",
        csv(HEADER + "1,1,a,0.5\n0,0\n"),
        Raises(DataError, "row 2] 1 malformed line"),
    ),
    Case(
        "18-short-line-mid-file",
        csv(HEADER + "1,1,a,0.5\n0,0\n0,0,b,1\n"),
        Raises(DataError, "row 2] 1 malformed line"),
    ),
    Case(
        "18-utf8-bom",
        csv("\ufeff" + HEADER + "1,1,a,0.5\n"),
        lambda r: r[0]["click"].to_list() == [1],
    ),
    Case(
        "18-windows-line-endings",
        csv((HEADER + "1,1,a,0.5\n0,0,b,1.5\n").replace("\n", "\r\n")),
        lambda r: r[0]["item"].to_list() == ["a", "b"] and r[0]["x"].to_list() == [0.5, 1.5],
    ),
    Case(
        "20-bundle-overwrite-and-interrupted-write", interrupted_bundle_write, lambda r: r is True
    ),
    Case(
        "21-truncated-safetensors",
        tampered_bundle(
            lambda p: (p / "model.safetensors").write_bytes(
                (p / "model.safetensors").read_bytes()[:64]
            )
        ),
        Raises(BundleError, "model.safetensors does not match the sha256"),
    ),
    Case(
        "21-bytes-flipped-same-size",
        tampered_bundle(flip_bytes_in_place),
        Raises(BundleError, "model.safetensors does not match the sha256"),
    ),
    Case(
        "21-non-finite-weights",
        tampered_bundle(nan_weights),
        Raises(BundleError, "non-finite weights"),
    ),
    Case(
        "20-overwrite-refuses-a-non-bundle",
        lambda t: (
            (t / "notes").mkdir()
            or fit_tiny(SCHEMA, tiny_funnel()).bundle.save(t / "notes", overwrite=True)
        ),
        Raises(BundleError, "is not an mtrank bundle"),
    ),
    Case(
        "21-wrong-tensor-shape",
        tampered_bundle(wrong_shape),
        Raises(BundleError, "weights do not fit the model"),
    ),
    Case(
        "21-truncated-json",
        tampered_bundle(
            lambda p: (p / "config.json").write_text((p / "config.json").read_text()[:50])
        ),
        Raises(BundleError, "unreadable JSON"),
    ),
    Case("21-no-pickle-anywhere", no_pickle_anywhere, lambda r: r == []),
    # issue 13: weights, sampled negatives, positions, leakage through missingness
    Case(
        "22-weight-negative",
        csv(W_HEADER + "1,1,a,1,2\n0,0,b,1,-0.5\n", W_SCHEMA),
        Raises(DataError, "column 'w'; row 2] 1 sample weight(s) that are negative or not finite"),
    ),
    Case(
        "22-weight-infinite",
        csv(W_HEADER + "1,1,a,1,inf\n0,0,b,1,1\n", W_SCHEMA),
        Raises(DataError, "column 'w'; row 1] 1 sample weight(s) that are negative or not finite"),
    ),
    Case(
        "22-weight-missing",
        csv(W_HEADER + "1,1,a,1,1\n0,0,b,1,\n", W_SCHEMA),
        Raises(DataError, "column 'w'; row 2] 1 missing or non-numeric sample weight(s)"),
    ),
    Case(
        "22-weight-text",
        csv(W_HEADER + "1,1,a,1,heavy\n0,0,b,1,1\n", W_SCHEMA),
        Raises(DataError, "missing or non-numeric sample weight(s), e.g. 'heavy'"),
    ),
    Case(
        "22-weight-zero-is-fine",
        csv(W_HEADER + "1,1,a,1,0\n0,0,b,1,1.5\n", W_SCHEMA),
        lambda r: r[0].get_column("w").to_list() == [0.0, 1.5],
    ),
    Case(
        "23-sampling-rate-zero",
        lambda t: Schema(**SCHEMA_ARGS, negative_sampling={"rate": 0}),
        Raises(SchemaError, "negative_sampling.rate must be a sampling rate in (0, 1]"),
    ),
    Case(
        "23-sampling-rate-above-one",
        lambda t: Schema(**SCHEMA_ARGS, negative_sampling={"rate": 1.5}),
        Raises(SchemaError, "in (0, 1] (the share of unclicked impressions kept), got 1.5"),
    ),
    Case(
        "23-sampling-rate-in-a-schema-file",
        schema_file(SCHEMA_YAML + "negative_sampling: {rate: -0.2}\n"),
        Raises(SchemaError, "schema <tmp>/s.yaml: negative_sampling.rate must be a sampling rate"),
    ),
    Case(
        "23-sampling-rate-train-option",
        lambda t: load_config(_write(t, "training:\n  negative_sampling_rate: 0\n")),
        Raises(ConfigError, "negative_sampling_rate"),
    ),
    Case(
        "24-position-negative",
        csv(P_HEADER + "1,1,a,1,1\n0,0,b,1,-1\n", P_SCHEMA),
        Raises(DataError, "column 'pos'; row 2] 1 position value(s) that are not an integer ≥ 0"),
    ),
    Case(
        "24-position-fraction",
        csv(P_HEADER + "1,1,a,1,1.5\n0,0,b,1,2\n", P_SCHEMA),
        Raises(DataError, "position value(s) that are not an integer ≥ 0, e.g. 1.5"),
    ),
    Case(
        "25-feature-present-only-after-a-click",
        lambda t: load_table(_write(t, _missingness_leak_csv()), LEAK_SCHEMA),
        Raises(DataError, "column 'refund_days'] feature column 'refund_days' is non-null almost"),
    ),
    Case(
        "26-cart-without-click-any-stage",
        csv(HEADER3 + "1,1,0,a,1\n0,1,0,b,1\n1,0,1,c,1\n", SCHEMA3),
        Raises(DataError, "column 'is_cart'; row 2] 1 row(s) with is_cart=1 but is_click=0"),
    ),
    Case(
        "26-buy-without-click-on-a-branch",
        csv(HEADER3 + "1,1,0,a,1\n1,0,1,b,1\n0,0,1,c,1\n", SCHEMA3),
        Raises(DataError, "row 3] 1 row(s) with is_buy=1 but is_click=0 (a buy without a click"),
    ),
    Case(
        "26-drop-policy-counts-every-stage",
        csv(
            HEADER3 + "1,1,0,a,1\n0,1,0,b,1\n0,0,1,c,1\n0,1,1,d,1\n0,0,0,e,1\n",
            SCHEMA3.model_copy(update={"funnel_violations": "drop"}),
        ),
        lambda r: r[0].height == 2 and r[1].dropped_rows == [2, 3, 4],
    ),
    Case(
        "26-every-row-clicked-is-named",
        lambda t: fit_tiny(
            Schema(click="click", categorical=["item"], numerical=["x"]),
            tiny_funnel().with_columns(pl.lit(1, pl.Int8).alias("click")),
        ).metrics["test"]["warnings"],
        lambda r: (
            r
            == [
                "stage 'click' (column 'click') is 1 on every row (20 rows): nothing to learn "
                "or rank (auc_click, auc_click_all undefined)",
            ]
        ),
    ),
    Case(
        "26-constant-stage-after-click-is-named",
        lambda t: fit_tiny(
            SCHEMA3, tiny_funnel3().with_columns(pl.col("is_click").alias("is_cart"))
        ).metrics["test"]["warnings"],
        lambda r: (
            r
            == [
                "stage 'cart' (column 'is_cart') is 1 on every row that reached 'click' (3 "
                "rows): nothing to learn or rank (auc_cart undefined)",
            ]
        ),
    ),
    Case(
        "26-two-stage-shorthand-names-the-conversion-once",
        lambda t: fit_tiny(
            SCHEMA, tiny_funnel().with_columns(pl.lit(0, pl.Int8).alias("buy"))
        ).metrics["test"]["warnings"],
        lambda r: (
            r
            == [
                "stage 'conversion' (column 'buy') is 0 on every row (20 rows): nothing to "
                "learn or rank (auc_cvr_masked, auc_ctcvr undefined)",
            ]
        ),
    ),
    # schema, config and fusion files: one line naming the file and the key, or line and column
    Case(
        "27-schema-after-unknown-stage",
        schema_file(STAGES3 % ", after: cartt" + FEATS),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: funnel.1.after: unknown stage 'cartt' (stages: click, cart, buy)",
        ),
    ),
    Case(
        "27-schema-after-a-later-stage-is-a-cycle",
        schema_file(STAGES3.replace("label: b", "label: b, after: cart") % ", after: buy" + FEATS),
        Raises(SchemaError, "schema <tmp>/s.yaml: funnel.1.after: stage 'buy' is declared after"),
    ),
    Case(
        "27-schema-after-itself",
        schema_file(STAGES3 % ", after: cart" + FEATS),
        Raises(SchemaError, "<tmp>/s.yaml: funnel.1.after: stage 'cart' cannot follow itself"),
    ),
    Case(
        "27-schema-label-of-two-stages",
        schema_file(STAGES3.replace("label: b", "label: k") % "" + FEATS),
        Raises(
            SchemaError,
            "<tmp>/s.yaml: funnel.2.label: label column 'k' is used by two stages "
            "('cart' at funnel.1 and 'buy')",
        ),
    ),
    Case(
        "27-schema-stage-declared-twice",
        schema_file(STAGES3.replace("stage: buy", "stage: cart") % "" + FEATS),
        Raises(SchemaError, "<tmp>/s.yaml: funnel.2.stage: stage 'cart' is declared twice"),
    ),
    Case(
        "27-schema-json-file",
        schema_file('{"click": "c", "conversion": "b", "categorical": ["c"]}', "s.json"),
        Raises(SchemaError, "schema <tmp>/s.json: label column 'c' is also listed as a feature"),
    ),
    Case(
        "27-schema-field-errors-on-one-line",
        schema_file("funnel:\n  - {stage: click, lable: c}\nlists: [{column: t, max_len: 0}]\n"),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: funnel.0.label: Field required; funnel.0.lable: unknown key "
            "(did you mean 'label'?); lists.0.max_len: Input should be greater than or equal to "
            "1 (got 0)",
        ),
    ),
    Case(
        "27-schema-unknown-key",
        schema_file(SCHEMA_YAML + "weigth: w\n"),
        Raises(SchemaError, "schema <tmp>/s.yaml: weigth: unknown key (did you mean 'weight'?)"),
    ),
    Case(
        "27-schema-tab",
        schema_file("click: c\n\tcategorical: [item]\n"),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: line 2, column 1: not valid YAML: found character '\\t' that "
            "cannot start any token (YAML indents with spaces, not tabs)",
        ),
    ),
    Case(
        "27-schema-unclosed-bracket",
        schema_file("click: c\ncategorical: [item, x\nnumerical: [y]\n"),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: line 3, column 10: not valid YAML: expected ',' or ']', but got "
            "':' (in a flow sequence opened at line 2, column 14)",
        ),
    ),
    Case(
        "27-schema-not-utf8",
        lambda t: (t / "s.yaml").write_bytes(b"click: c\xff\n") and Schema.from_file(t / "s.yaml"),
        Raises(SchemaError, "schema <tmp>/s.yaml: not UTF-8 text (byte 0xff at offset 8)"),
    ),
    Case(
        "27-schema-control-character",
        schema_file("click: c\nconversion: b\x01\n"),
        Raises(SchemaError, "<tmp>/s.yaml: line 2, column 14: not valid YAML: character '\\x01'"),
    ),
    Case(
        "27-schema-a-list",
        schema_file("- click\n- buy\n"),
        Raises(
            SchemaError, "schema <tmp>/s.yaml: expected a mapping of keys (key: value), got list"
        ),
    ),
    Case(
        "27-schema-missing",
        lambda t: Schema.from_file(t / "nope.yaml"),
        Raises(SchemaError, "cannot read schema <tmp>/nope.yaml: No such file or directory"),
    ),
    Case(
        "27-config-tab",
        config_file("training:\n\tepochs: 3\n"),
        Raises(ConfigError, "config <tmp>/run.yaml: line 2, column 1: not valid YAML: found"),
    ),
    Case(
        "27-config-unclosed-brace",
        config_file("training: {epochs: 3\nmodel: {name: esmm}\n"),
        Raises(
            ConfigError,
            "config <tmp>/run.yaml: line 2, column 6: not valid YAML: expected ',' or '}', but got "
            "':' (in a flow mapping opened at line 1, column 11)",
        ),
    ),
    Case(
        "27-config-every-field-error",
        config_file("training:\n  epochs: 0\n  lr: -1\nserve: {port: 0}\n"),
        Raises(
            ConfigError,
            "config <tmp>/run.yaml: training.epochs: Input should be greater than or equal to 1 "
            "(got 0); training.lr: Input should be greater than 0 (got -1); serve.port:",
        ),
    ),
    Case(
        "27-fusion-broken-json",
        fusion_file('{"formula": "multiplicative", "params": {"alpha": 1'),
        Raises(
            ConfigError,
            "fusion file <tmp>/fusion.json: line 1, column 52: not valid JSON: Expecting ','",
        ),
    ),
    Case(
        "27-fusion-param-not-a-number",
        fusion_file('{"formula": "multiplicative", "params": {"alpha": "x"}}'),
        Raises(
            ConfigError, 'fusion file <tmp>/fusion.json: params.alpha: expected a number, got "x"'
        ),
    ),
    Case(
        "27-fusion-unknown-formula",
        fusion_file('{"formula": ["multiplicative"]}'),
        Raises(ConfigError, "fusion file <tmp>/fusion.json: formula: unknown fusion formula"),
    ),
]

# --- a fresh user's trial: one column in two label roles, keys given twice, misspelt keys ------


def read_yaml(text: str) -> Callable[[Path], object]:
    """Write ``text`` as ``<tmp>/d.yaml`` and parse it as every schema / config is parsed."""
    from mtrank.documents import read_document

    def run(tmp: Path):
        (tmp / "d.yaml").write_text(text)
        return read_document(tmp / "d.yaml", "schema", SchemaError)

    return run


def message_of(action: Callable[[Path], object]) -> Callable[[Path], object]:
    """The message of the MtrankError ``action`` raises."""
    from mtrank.errors import MtrankError

    def run(tmp: Path):
        with pytest.raises(MtrankError) as info:
            action(tmp)
        return str(info.value)

    return run


def malformed_and_bad_label_rows(tmp: Path):
    """The rows named for line 51 of a file (header, a blank line, 48 rows, then the bad line):
    malformed there, then a bad label there."""
    good = [f"{i % 2},0,a,0.5" for i in range(48)]
    lines = [HEADER.strip(), good[0], "", *good[1:], "%s", "0,0,b,1"]
    text = "\n".join(lines) + "\n"
    return _rows_of(csv(text % "1,0"), tmp), _rows_of(csv(text % "1,2,a,0.5"), tmp)


CASES += [
    Case(
        "27-schema-click-is-conversion",
        schema_file("click: buy\nconversion: buy\n" + FEATS),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: conversion: the same column as click ('buy'); each label needs "
            "its own column",
        ),
    ),
    Case(
        "27-schema-two-tasks-one-column",
        schema_file("tasks: {income: y, married: y}\n" + FEATS),
        Raises(SchemaError, "tasks.married: the same column as tasks.income ('y'); each label"),
    ),
    Case(
        "27-schema-stage-label-twice",
        schema_file(STAGES3.replace("label: b", "label: c") % "" + FEATS),
        Raises(SchemaError, "funnel.2.label: label column 'c' is used by two stages"),
    ),
    Case(
        "27-schema-price-is-a-label",
        schema_file(SCHEMA_YAML + "price: buy\n"),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: price: the same column as conversion ('buy'); a label column "
            "cannot also be the price column",
        ),
    ),
    Case(
        "27-schema-weight-is-a-label",
        schema_file(SCHEMA_YAML + "weight: click\n"),
        Raises(SchemaError, "weight: column 'click' is also a feature or a label"),
    ),
    Case(
        "27-schema-key-twice",
        schema_file(SCHEMA_YAML + "numerical: [x]\ncategorical: [uid]\n"),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: line 5: key 'categorical' given twice (first at line 3)",
        ),
    ),
    Case(
        "27-schema-key-twice-in-a-flow-mapping",
        schema_file(
            "funnel:\n  - {stage: click, label: c}\n  - {stage: buy, label: b,\n"
            "     label: d}\n" + FEATS
        ),
        Raises(SchemaError, "<tmp>/s.yaml: line 4: key 'label' given twice (first at line 3)"),
    ),
    Case(
        "27-yaml-merge-key-may-be-overridden",
        read_yaml("base: &b {a: 1, c: 3}\nother:\n  <<: *b\n  a: 2\n"),
        lambda r: r == {"base": {"a": 1, "c": 3}, "other": {"a": 2, "c": 3}},
    ),
    Case(
        "27-config-key-twice",
        config_file("training:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n"),
        Raises(
            ConfigError, "config <tmp>/run.yaml: line 4: key 'epochs' given twice (first at line 2)"
        ),
    ),
    Case(
        "27-fusion-key-twice",
        fusion_file('{"formula": "multiplicative",\n "params": {"alpha": 1,\n  "alpha": 2}}'),
        Raises(
            ConfigError,
            "fusion file <tmp>/fusion.json: line 3: key 'alpha' given twice (first at line 2)",
        ),
    ),
    Case(
        "27-fusion-same-key-in-two-objects",
        fusion_file('{"formula": "multiplicative", "params": {"alpha": 1}, "x": {"alpha": 2}}'),
        lambda r: r is not None,
    ),
    Case(
        "27-schema-unknown-key-did-you-mean",
        schema_file(SCHEMA_YAML.replace("categorical", "categorcial")),
        Raises(
            SchemaError,
            "schema <tmp>/s.yaml: categorcial: unknown key (did you mean 'categorical'?)",
        ),
    ),
    Case(
        "27-schema-unknown-key-no-close-match",
        message_of(schema_file(SCHEMA_YAML + "zzz: 1\n")),
        lambda r: r.endswith("s.yaml: zzz: unknown key"),
    ),
    Case(
        "27-config-unknown-key-did-you-mean",
        config_file("training:\n  epoch: 3\nserv: {port: 8000}\n"),
        Raises(
            ConfigError,
            "config <tmp>/run.yaml: training.epoch: unknown key (did you mean 'epochs'?); serv: "
            "unknown key (did you mean 'serve'?)",
        ),
    ),
    Case(
        "18-malformed-line-and-bad-label-name-the-same-row",
        malformed_and_bad_label_rows,
        lambda r: r == ([49], [49]),
    ),
]

# --- issue 13: list and sequence features ----------------------------------------------------
LIST_SCHEMA = Schema(
    click="click",
    conversion="buy",
    categorical=["item"],
    numerical=["x"],
    lists=[{"column": "tags", "sep": "|", "max_len": 3}],
    sequences=[{"column": "hist", "shares": "item", "sep": "|", "max_len": 2}],
)
WEIGHTED = Schema(
    click="click",
    conversion="buy",
    categorical=["item"],
    numerical=["x"],
    lists=[{"column": "tags", "sep": "|", "weighted": True}],
)
LIST_HEADER = "click,buy,item,x,tags,hist\n"


def parquet(columns: dict, schema: Schema) -> Callable[[Path], object]:
    def run(tmp: Path):
        p = tmp / "data.parquet"
        n = len(next(iter(columns.values())))
        base = {"click": [1, 0, 0][:n], "buy": [0] * n, "item": ["a", "b", "c"][:n], "x": [1.0] * n}
        pl.DataFrame({**base, **columns}).write_parquet(p)
        return load_table(p, schema)

    return run


def warned(action: Callable[[Path], object]) -> Callable[[Path], object]:
    """The action's DataWarning messages (it must not raise)."""

    def run(tmp: Path):
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            action(tmp)
        return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]

    return run


def truncated_encoding(tmp: Path):
    from mtrank.data.batch import EncodedData

    df, _ = csv(LIST_HEADER + "1,0,a,1,p|q,a|b|c\n0,0,b,1,,b\n", LIST_SCHEMA)(tmp)
    enc = FeatureEncoder.fit(df, LIST_SCHEMA)
    data = EncodedData.from_frame(df, LIST_SCHEMA, enc)
    return data.extra[1].tolist(), data.n_truncated


CASES += [
    Case(
        "13-list-element-of-the-wrong-type",
        parquet({"tags": [[[1]], [[2, 3]], []], "hist": [["a"], [], []]}, LIST_SCHEMA),
        Raises(DataError, "list elements must be ids (integers or strings), got List(Int64)"),
    ),
    Case(
        "13-list-element-wrong-type-names-file-column-rows",
        parquet({"tags": [[], [[2, 3]], []], "hist": [["a"], [], []]}, LIST_SCHEMA),
        Raises(DataError, "column 'tags'; row 2]"),
    ),
    Case(
        "13-weight-not-a-number",
        csv("click,buy,item,x,tags\n1,0,a,1,p:0.5|q:x\n0,0,b,1,p:1\n", WEIGHTED),
        Raises(DataError, "column 'tags'; row 1] 1 list element weight(s) missing, not a number"),
    ),
    Case(
        "13-weight-negative",
        csv("click,buy,item,x,tags\n1,0,a,1,p:0.5\n0,0,b,1,p:-1\n", WEIGHTED),
        Raises(DataError, "row 2] 1 list element weight(s)"),
    ),
    Case(
        "13-weight-missing",
        csv("click,buy,item,x,tags\n1,0,a,1,p|q:1\n0,0,b,1,p:1\n", WEIGHTED),
        Raises(DataError, "row 1] 1 list element weight(s) missing"),
    ),
    Case(
        "13-separator-declared-but-absent",
        csv(LIST_HEADER + '1,0,a,1,"p,q",a\n0,0,b,1,r,b\n', LIST_SCHEMA),
        Raises(
            DataError, "separator '|' declared but absent from every cell, while 1 cell(s) hold ','"
        ),
    ),
    Case(
        "13-text-list-without-separator",
        csv(
            LIST_HEADER + "1,0,a,1,p,a\n",
            LIST_SCHEMA.model_copy(
                update={"lists": [LIST_SCHEMA.lists[0].model_copy(update={"sep": None})]}
            ),
        ),
        Raises(DataError, "declares no separator"),
    ),
    Case(
        "13-nested-nulls-are-missing-elements-with-a-warning",
        warned(
            parquet({"tags": [["p", None], None, ["q"]], "hist": [["a"], [None], []]}, LIST_SCHEMA)
        ),
        lambda msgs: (
            len(msgs) == 2
            and "column 'tags'; row 1] 1 null or empty element(s)" in msgs[0]
            and "column 'hist'; row 2] 1 null or empty element(s)" in msgs[1]
        ),
    ),
    Case(
        "13-sequence-longer-than-max-len-truncated-with-a-count",
        warned(csv(LIST_HEADER + "1,0,a,1,p,a|b|c\n0,0,b,1,,b\n1,0,c,1,,a|b|c|d\n", LIST_SCHEMA)),
        lambda msgs: (
            msgs
            == [
                "[file {}; column 'hist'; rows 1, 3] 2 row(s) hold more than max_len=2 elements "
                "(longest 4); kept the first 2".format(msgs[0].split(";")[0].removeprefix("[file "))
            ]
        ),
    ),
    Case(
        "13-sequence-truncated-keeps-the-most-recent",
        truncated_encoding,
        lambda r: r == ([[2, 3], [3, 0]], {"tags": 0, "hist": 1}),
    ),
    Case(
        "13-sequence-longer-than-max-len-error",
        csv(
            LIST_HEADER + "1,0,a,1,p,a|b|c\n",
            LIST_SCHEMA.model_copy(
                update={
                    "sequences": [
                        LIST_SCHEMA.sequences[0].model_copy(update={"on_overflow": "error"})
                    ]
                }
            ),
        ),
        Raises(DataError, "column 'hist'; row 1] 1 row(s) hold more than max_len=2 elements"),
    ),
    Case(
        "13-scalar-column-declared-as-list",
        csv(
            LIST_HEADER.replace("tags", "tags") + "1,0,a,1,1,a\n",
            Schema(
                click="click",
                conversion="buy",
                categorical=["item"],
                numerical=["x"],
                lists=[{"column": "tags"}],
                sequences=[{"column": "hist", "shares": "item", "sep": "|"}],
            ),
        ),
        Raises(DataError, "declared as a list but holds Int64 values"),
    ),
]


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "d.csv"
    p.write_text(text)
    return p


def _rows_of(action, tmp):
    try:
        action(tmp)
    except DataError as e:
        return e.rows
    return None


def check_case(case: Case, tmp_path: Path) -> None:
    """Run one row: its action raises the expected error (exact class, message fragment, one
    line), or its result satisfies the predicate. ``<tmp>`` in a fragment is the row's folder."""
    if isinstance(case.expect, Raises):
        with pytest.raises(case.expect.error) as info:
            case.action(tmp_path)
        assert type(info.value) is case.expect.error
        fragment = case.expect.fragment.replace("<tmp>", str(tmp_path))
        assert fragment in str(info.value), str(info.value)
        assert "\n" not in str(info.value), str(info.value)
    else:
        result = case.action(tmp_path)
        assert case.expect(result), result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, tmp_path: Path):
    check_case(case, tmp_path)


CLI_FILES = {  # verb and files → the one stderr line (after "error: "), <tmp> the test's folder
    "schema-funnel": (
        ["train", "--data", "d.csv", "--schema", "s.yaml"],
        {"s.yaml": STAGES3 % ", after: cartt" + FEATS},
        "schema s.yaml: funnel.1.after: unknown stage 'cartt' (stages: click, cart, buy)",
    ),
    "config-names-a-broken-schema": (
        ["train", "--config", "run.yaml"],
        {"run.yaml": "data:\n  paths: [d.csv]\n  schema: <tmp>/s.yaml\n", "s.yaml": "a: [1\n"},
        "schema <tmp>/s.yaml: line 2, column 1: not valid YAML: expected ',' or ']', but got "
        "'<stream end>' (in a flow sequence opened at line 1, column 4)",
    ),
    "schema-click-is-conversion": (
        ["train", "--data", "d.csv", "--schema", "s.yaml"],
        {"s.yaml": "click: buy\nconversion: buy\n" + FEATS},
        "schema s.yaml: conversion: the same column as click ('buy'); each label needs its own "
        "column",
    ),
    "fusion-json": (
        ["predict", "--bundle", "b", "--data", "d.csv", "--fusion", "f.json", "--out", "o.csv"],
        {"f.json": '{"formula": "linear",\n "params": {"alpha": 1,}}'},
        "fusion file f.json: line 2, column 24: not valid JSON: Expecting property name "
        "enclosed in double quotes",
    ),
}


@pytest.mark.parametrize("name", list(CLI_FILES))
def test_bad_file_on_the_command_line_is_one_line_and_exit_2(name, tmp_path):
    """Case 27 through the CLI: exit 2, one ``error:`` line naming the file, no traceback."""
    args, files, line = CLI_FILES[name]
    (tmp_path / "d.csv").write_text(HEADER + "1,1,a,1\n")
    for file, text in files.items():
        (tmp_path / file).write_text(text.replace("<tmp>", str(tmp_path)))
    r = subprocess.run(
        [sys.executable, "-m", "mtrank", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    said = [x for x in r.stderr.strip().splitlines() if not x.startswith("» ")]  # progress
    assert said == ["error: " + line.replace("<tmp>", str(tmp_path))], r.stderr


def test_evaluate_without_data_on_an_own_data_bundle_asks_for_data(tmp_path):
    """``evaluate --bundle B`` without ``--data``: a bundle trained on the user's own file names
    its schema, not a built-in dataset, so mtrank asks for the file (and does not look the
    schema's name up among the built-in datasets)."""
    from tests.conftest import cli_in_process

    schema = SCHEMA.model_copy(update={"name": "my_mall"})
    path = fit_tiny(schema, tiny_funnel()).bundle.save(tmp_path / "b")
    r = cli_in_process("evaluate", "--bundle", path)
    assert r.returncode == 2
    assert r.stderr == (
        f"error: bundle {path} was trained on your own data (schema 'my_mall'), not a built-in "
        "dataset: pass --data FILE"
    )


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    """Case 19: SIGKILL during an epoch, then --resume: the same final test metrics."""

    def cli(*args):
        return [sys.executable, "-m", "mtrank", *map(str, args)]

    subprocess.run(
        cli(
            "simulate",
            "--rows",
            30_000,
            "--n-items",
            300,
            "--n-users",
            500,
            "--out",
            tmp_path / "s.parquet",
        ),
        check=True,
        capture_output=True,
    )
    common = [
        "train",
        "--data",
        tmp_path / "s.parquet",
        "--schema",
        "simulated",
        "--epochs",
        2,
        "--batch-size",
        256,
        "--tower",
        "64,32",
        "--threads",
        1,
        "-q",
    ]
    full = subprocess.run(cli(*common, "--out", tmp_path / "full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    ckpt = tmp_path / "cut.ckpt"
    proc = subprocess.Popen(
        cli(*common, "--out", tmp_path / "cut", "--checkpoint-every", 10),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        meta = ckpt / "trainer.json"
        if meta.exists() and json.loads(meta.read_text())["batches_done"] >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((ckpt / "trainer.json").read_text())
    assert state["epoch"] == 1 and state["batches_done"] > 0  # killed mid-epoch 1
    assert not (tmp_path / "cut").exists()
    resumed = subprocess.run(
        cli(*common, "--out", tmp_path / "cut", "--checkpoint-every", 10, "--resume"),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "config.json").read_text())["meta"]["metrics"]["test"]
    b = json.loads((tmp_path / "cut" / "config.json").read_text())["meta"]["metrics"]["test"]
    for k in ("auc_ctr", "auc_cvr_masked", "auc_ctcvr", "logloss_ctr", "logloss_ctcvr"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
