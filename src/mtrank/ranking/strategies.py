"""Three ways to rank for GMV, side by side on the same test requests.

The founding write-up names three strategies for ranking with several objectives:

(a) **fusion**: independent models per objective (BASE: a CTR and a CVR network) and a score
    formula on their outputs, tuned for GMV;
(b) **learning to rank**: one ranker trained on relevance grades that encode the objectives
    (LambdaMART, :mod:`mtrank.models.ltr`); and, with ``listwise=True``, the same grades with a
    softmax cross-entropy over each slate on mtrank's own embedding + MLP (one BASE tower's
    features and capacity, :func:`mtrank.ranking.ltr.fit_listwise`);
(c) **multi-task learning**: ESMM (or a relative) and the same tuned fusion on its pCTR / pCVR.

Protocol (:func:`compare_strategies`):

* One split (the caller's: train / val / test). Every model trains on train, early-stops on val.
* The fusion (``multiplicative``: pCTR^α · pCVR^β · (price + 1)^γ) of each multi-task model is
  tuned by optuna on the **validation** requests for GMV@K (realised, no click floor, the same
  objective the LTR ranker early-stops on with ``early_stopping="gmv"``; by default it stops on
  NDCG@K of its grades), then frozen.
* Every strategy ranks the **same test requests**; metrics from
  :func:`mtrank.ranking.ltr.ranking_metrics` (GMV@K, orders@K, clicks@K, NDCG@K, grade NDCG@K
  and on the simulator the exact expected GMV@K, with the position effect moved to the new
  rank). Each strategy is compared with (a) request by request: the relative lift of the
  per-request sums with a 95 % percentile bootstrap interval over requests
  (:func:`mtrank.ranking.replay.bootstrap_lift`, 1000 resamples, paired).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import polars as pl
import torch

from mtrank.data.schema import Schema
from mtrank.models.config import ModelConfig
from mtrank.models.ltr import LTRConfig
from mtrank.ranking.fusion import make_fusion
from mtrank.ranking.ltr import (
    RankedSplit,
    check_ltr_schema,
    fit_listwise,
    fit_ltr,
    ranked_split,
    ranking_metrics,
)
from mtrank.ranking.replay import (
    ReplayData,
    bootstrap_lift,
    ndcg_per_request,
    per_request,
    pseudo_requests,
    rank_within,
    replay_defaults,
)
from mtrank.ranking.tune import TuneConfig, tune
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import fit


def with_pseudo_requests(
    splits: dict[str, pl.DataFrame],
    schema: Schema,
    size: int,
    seed: int = 0,
    column: str = "pseudo_request",
) -> tuple[dict[str, pl.DataFrame], Schema]:
    """For data without requests (Hillstrom): within each split, rows shuffled (seeded) and cut
    into pseudo-requests of ``size`` rows (:func:`mtrank.ranking.replay.pseudo_requests`),
    sorted so that a request's rows are contiguous. Returns the splits and a schema copy whose
    ``request_id`` is ``column``."""
    out = {}
    for i, (name, df) in enumerate(splits.items()):
        rid = pseudo_requests(df.height, size, seed + i)
        out[name] = df.with_columns(pl.Series(column, rid)).sort(column, maintain_order=True)
    return out, schema.model_copy(update={"request_id": column})


def _tuned_fusion(
    val: RankedSplit,
    p_val: dict[str, np.ndarray],
    k: int,
    trials: int,
    seed: int,
    position_coef: float,
):
    r = val.replay
    data = ReplayData(
        r.group,
        r.click,
        r.conversion,
        r.value,
        r.price,
        p_val["p_ctr"],
        p_val["p_cvr"],
        r.position,
        r.true_ctr,
        r.true_cvr,
    )
    cfg = TuneConfig(
        formula="multiplicative",
        method="optuna",
        k=k,
        objective="gmv",
        click_floor=None,
        trials=trials,
        holdout=0.0,
        seed=seed,
        fixed={"eps": 1.0},
        position_coef=position_coef,
    )
    return tune(data, cfg).best


def compare_strategies(
    splits: dict[str, pl.DataFrame],
    schema: Schema,
    *,
    models: tuple[str, ...] = ("esmm",),
    k: int = 10,
    train_cfg: TrainConfig | None = None,
    model_cfg: ModelConfig | None = None,
    ltr_cfg: LTRConfig | None = None,
    trials: int = 100,
    seed: int = 0,
    bootstrap: int = 1000,
    listwise: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Rank the test requests by (a) BASE + tuned fusion, (b) LTR, (c) each of ``models`` +
    tuned fusion, plus reference rankings (BASE pCTR only; logged order and the true expected
    GMV on the simulator). See the module docstring.

    Returns:
        JSON-able dict: ``metrics`` per ranking, ``vs_base_fusion`` (bootstrap lifts per
        ranking and metric), ``fusions`` (tuned params), ``ltr`` (best iteration, request
        counts), ``test`` (rows, requests), ``seconds`` per strategy.

    Raises:
        ConfigError: the schema has no funnel or request id (see :func:`check_ltr_schema`).
    """
    say = log or (lambda _m: None)
    check_ltr_schema(schema)
    train_cfg = train_cfg or TrainConfig(epochs=3, batch_size=2048, seed=seed, patience=1)
    model_cfg = model_cfg or ModelConfig()
    ltr_cfg = ltr_cfg or LTRConfig(k=k, seed=seed)
    pos = replay_defaults(schema)["position_coef"]
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    lt = fit_ltr(splits, schema, ltr_cfg, log=say)
    seconds["ltr"] = time.perf_counter() - t
    enc = lt.bundle.encoder
    val = ranked_split(splits["val"], schema, enc, ltr_cfg, source="val split")
    test = ranked_split(splits["test"], schema, enc, ltr_cfg, source="test split")
    scores: dict[str, np.ndarray] = {"ltr": lt.bundle.predict_arrays(test.data)["score"]}
    say(f"ltr: best iteration {lt.info['best_iteration']} ({seconds['ltr']:.0f}s)")
    listwise_info = None
    if listwise:
        t = time.perf_counter()
        train = ranked_split(splits["train"], schema, enc, ltr_cfg, source="train split")
        net, listwise_info = fit_listwise(
            train,
            val,
            lt.bundle.spec,
            model_cfg,
            k=k,
            epochs=train_cfg.epochs,
            lr=train_cfg.lr,
            seed=seed,
            log=say,
        )
        with torch.no_grad():
            scores["listwise nn"] = net(test.data.categorical, test.data.numerical).double().numpy()
        seconds["listwise nn"] = time.perf_counter() - t

    fusions = {}
    for name in ("base", *models):
        t = time.perf_counter()
        res = fit(
            splits, schema, model_cfg.model_copy(update={"name": name}), train_cfg, quiet=True
        )
        p_val = res.bundle.predict_arrays(res.bundle.encode(splits["val"]))
        p_test = res.bundle.predict_arrays(res.bundle.encode(splits["test"]))
        best = _tuned_fusion(val, p_val, k, trials, seed, pos)
        seconds[name] = time.perf_counter() - t
        fusions[name] = {
            "formula": best.name,
            "params": best.params,
            "best_epoch": res.result.best_epoch,
        }
        scores[f"{name}+fusion"] = best.score(p_test["p_ctr"], p_test["p_cvr"], test.replay.price)
        if name == "base":
            scores["base pctr only"] = make_fusion("single", {"which": "ctr"}).score(
                p_test["p_ctr"], p_test["p_cvr"], test.replay.price
            )
        say(
            f"{name}: best epoch {res.result.best_epoch}, fusion {best.params} "
            f"({seconds[name]:.0f}s)"
        )
    r = test.replay
    if r.position is not None:
        scores["logged order"] = -r.position
    if r.true_ctr is not None and r.true_cvr is not None:
        scores["oracle: true expected GMV"] = r.true_ctr * r.true_cvr * r.price

    learned = ["ltr", *(["listwise nn"] if listwise else [])]
    order = [
        "base+fusion",
        *learned,
        *[f"{m}+fusion" for m in models],
        *[n for n in scores if "+" not in n and n not in learned],
    ]
    metrics = {name: ranking_metrics(test, scores[name], k, position_coef=pos) for name in order}
    ref = scores["base+fusion"]
    ref_req = per_request(r, ref, k, position_coef=pos)
    ref_ndcg = ndcg_per_request(test.group, r.gain, rank_within(test.group, ref), k)
    has = np.isfinite(ref_ndcg)
    lifts: dict[str, dict] = {}
    for name in order[1:]:
        req = per_request(r, scores[name], k, position_coef=pos)
        lifts[name] = {
            f"{key}@{k}": bootstrap_lift(req[key], ref_req[key], n=bootstrap, seed=seed)
            for key in req
        }
        nd = ndcg_per_request(test.group, r.gain, rank_within(test.group, scores[name]), k)
        lifts[name][f"ndcg@{k}"] = bootstrap_lift(nd[has], ref_ndcg[has], n=bootstrap, seed=seed)
    return {
        "k": k,
        "metrics": metrics,
        "vs_base_fusion": lifts,
        "fusions": fusions,
        "listwise": listwise_info,
        "ltr": {
            "best_iteration": lt.info["best_iteration"],
            "train_requests": lt.info["train_requests"],
            "config": ltr_cfg.model_dump(),
            "levels": lt.info["levels"],
        },
        "test": {
            "rows": int(r.group.size),
            "requests": int(r.n_requests),
            "conversions": int(r.conversion.sum()),
            "clicks": int(r.click.sum()),
        },
        "rows": {name: df.height for name, df in splits.items()},
        "train": train_cfg.model_dump(mode="json"),
        "model": model_cfg.model_dump(mode="json"),
        "trials": trials,
        "seconds": seconds,
    }


def report_markdown(result: dict, title: str) -> str:
    """The comparison as a markdown table: metrics per ranking, and each ranking's lift over
    BASE + fusion on GMV@K (expected GMV@K when known) with its 95 % bootstrap interval."""
    k = result["k"]
    m = result["metrics"]
    first = next(iter(m.values()))
    keys = [
        key
        for key in (
            f"gmv@{k}",
            f"orders@{k}",
            f"clicks@{k}",
            f"ndcg@{k}",
            f"ndcg_grade@{k}",
            f"exp_gmv@{k}",
            f"exp_orders@{k}",
            f"exp_clicks@{k}",
        )
        if key in first
    ]
    lift_keys = [
        key
        for key in (f"gmv@{k}", f"exp_gmv@{k}", f"orders@{k}", f"clicks@{k}", f"ndcg@{k}")
        if key in next(iter(result["vs_base_fusion"].values()), {})
    ]
    lines = [
        f"### {title}",
        "",
        "| ranking | "
        + " | ".join(keys)
        + " | "
        + " | ".join(f"Δ{key} vs base+fusion (95 % CI)" for key in lift_keys)
        + " |",
    ]
    lines.append("|" + "---|" * (1 + len(keys) + len(lift_keys)))
    for name, row in m.items():
        cells = [f"{row[key]:.4f}" if row.get(key) is not None else "n/a" for key in keys]
        lf = result["vs_base_fusion"].get(name)
        lcells = [
            "(reference)"
            if lf is None
            else f"{100 * lf[key]['lift']:+.1f} % ({100 * lf[key]['low']:+.1f} … "
            f"{100 * lf[key]['high']:+.1f})"
            for key in lift_keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(lcells) + " |")
    t = result["test"]
    lines += [
        "",
        f"Test: {t['rows']:,} impressions in {t['requests']:,} requests ({t['clicks']:,} "
        f"clicks, {t['conversions']:,} conversions); K = {k}.",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["compare_strategies", "report_markdown", "with_pseudo_requests"]
