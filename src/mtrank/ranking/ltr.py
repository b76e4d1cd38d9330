"""Training and evaluating the LTR ranker (:mod:`mtrank.models.ltr`) on request-grouped
impressions, with the ranking metrics of :mod:`mtrank.ranking.replay` (GMV@K, orders@K,
clicks@K, NDCG@K; exact expected GMV@K on the simulator).

:func:`fit_ltr` is what ``mtrank train --model ltr`` runs: encoders fitted on train (the same
encoders every model uses), grades and levels from train, LightGBM lambdarank early-stopped on
validation NDCG@K or GMV@K, metrics on validation and test, and a :class:`Bundle`.
:func:`evaluate_ranker` scores any bundle's ranking of a labelled table the same way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from mtrank.data.batch import EncodedData
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.io import ROW
from mtrank.data.schema import Schema
from mtrank.errors import ConfigError, DataError
from mtrank.models.config import ModelConfig
from mtrank.models.ltr import (
    GradeLevels,
    LTRConfig,
    RankingSet,
    features_matrix,
    relevance_grades,
    request_groups,
    train_lambdarank,
    trainable_requests,
)
from mtrank.ranking.replay import (
    ReplayData,
    ndcg_per_request,
    rank_within,
    replay_defaults,
    replay_from_frame,
    replay_metrics,
)
from mtrank.bundle import Bundle
from mtrank.workflow import feature_spec


@dataclass
class RankedSplit:
    """One labelled split ready for LTR: encoded features, request groups, grades, replay.

    Attributes:
        data: :class:`EncodedData`. group: dense request index ``[N]``; sizes: rows per
        request ``[R]``. grade: relevance grade ``[N]``. replay: the split's
        :class:`ReplayData` (same requests). counts: bad-input counts (``bad_value``, ...).
    """

    data: EncodedData
    group: np.ndarray
    sizes: np.ndarray
    grade: np.ndarray
    replay: ReplayData
    counts: dict = field(default_factory=dict)


def check_ltr_schema(schema: Schema) -> None:
    """Raises ConfigError unless ``schema`` is a funnel with a request id column."""
    if not schema.is_funnel:
        raise ConfigError(
            f"LTR needs a funnel schema (click and conversion labels); schema {schema.name!r} "
            f"has plain tasks {list(schema.tasks)}"
        )
    if schema.request_id is None:
        raise ConfigError(
            f"LTR groups impressions by request, and schema {schema.name!r} declares no "
            "request_id column; "
            "set `request_id` in the schema (rows of a request contiguous)"
        )


def ranked_split(
    df: pl.DataFrame,
    schema: Schema,
    encoder: FeatureEncoder,
    cfg: LTRConfig,
    *,
    source: str = "<table>",
) -> RankedSplit:
    """Encode one split and derive its requests, grades and replay data.

    Raises:
        DataError: the request id column is absent, has a missing value, or a request's rows
            are not contiguous (naming the column and the first row).
    """
    col = schema.request_id
    if col is None or col not in df.columns:
        raise DataError(
            f"no request id column {col!r}: LTR groups impressions by request",
            file=source,
            column=col,
        )
    rows = df.get_column(ROW).to_numpy() if ROW in df.columns else None
    group, sizes = request_groups(df.get_column(col), col, rows, source)
    d = replay_defaults(schema)
    price_col = d["price"] if d["price"] in df.columns else None
    value_col = d["value"] if d["value"] in df.columns else None
    replay, _, _ = replay_from_frame(
        df,
        schema,
        value_col=value_col or schema.conversion,
        price_col=price_col or schema.conversion,
        policy="clip",
        source=source,
        predictions=(),
    )
    value = replay.value if value_col else None
    grade, bad = relevance_grades(replay.click, replay.conversion, value, cfg)
    data = EncodedData.from_frame(df, schema, encoder)
    counts = {
        "bad_value": bad,
        **({"value_column": value_col} if value_col else {"value_column": None}),
    }
    return RankedSplit(data, group, sizes, grade, replay, counts)


def ranking_metrics(
    split: RankedSplit, score: np.ndarray, k: int, *, position_coef: float = 0.0
) -> dict:
    """GMV@K, orders@K, clicks@K, NDCG@K (GMV gain) of :func:`replay_metrics`, plus
    ``ndcg_grade@K``: NDCG with the relevance grade as gain (what LTR optimises), averaged over
    requests with a positive grade."""
    out = replay_metrics(split.replay, score, k, position_coef=position_coef)
    nd = ndcg_per_request(
        split.group, split.grade, rank_within(split.group, score), k, n_requests=split.sizes.size
    )
    has = np.isfinite(nd)
    out[f"ndcg_grade@{k}"] = float(nd[has].mean()) if has.any() else None
    out["requests"] = int(split.sizes.size)
    return out


@dataclass
class LTRFit:
    """What :func:`fit_ltr` returns: the unsaved bundle, metrics per split (val, test), training
    info (best iteration, request counts, levels) and wall seconds."""

    bundle: Bundle
    metrics: dict[str, dict]
    info: dict
    seconds: float


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def fit_ltr(
    splits: dict[str, pl.DataFrame],
    schema: Schema,
    cfg: LTRConfig,
    *,
    meta: dict | None = None,
    log: Callable[[str], None] | None = None,
    hash_buckets: dict[str, int] | None = None,
) -> LTRFit:
    """Train LambdaMART on ``splits['train']``, early-stopped on ``splits['val']``, evaluated on
    val and test with :func:`ranking_metrics`. Returns the (unsaved) bundle and the metrics.

    Bad input is handled and counted (``info['train_requests']``, logged): requests with one
    candidate, with no positive, or with one grade for all candidates have no pair to learn
    from and are left out of training (kept in evaluation); a converted row with a missing or
    non-finite value is graded as a purchase of value 0.

    Raises:
        ConfigError: not a funnel schema, no request id, or no trainable request.
        DataError: missing / non-contiguous request ids (see :func:`ranked_split`).
    """
    start = time.perf_counter()
    check_ltr_schema(schema)
    encoder = FeatureEncoder.fit(splits["train"], schema, hash_buckets=hash_buckets)
    spec = feature_spec(encoder, schema)
    parts = {
        name: ranked_split(df, schema, encoder, cfg, source=f"{name} split")
        for name, df in splits.items()
        if df.height
    }
    train = parts["train"]
    keep, counts = trainable_requests(train.group, train.sizes, train.grade)
    bad_values = {name: p.counts["bad_value"] for name, p in parts.items() if p.counts["bad_value"]}
    if bad_values:
        _say(
            log,
            "ltr: converted rows with a missing, negative or non-finite value, graded as "
            f"value 0: {bad_values}",
        )
    left_out = counts["one_candidate"] + counts["no_positive"] + counts["all_equal"]
    if left_out:
        _say(
            log,
            f"ltr: {left_out:,} of {counts['requests']:,} training requests have no pair to "
            "learn from "
            f"({counts['one_candidate']:,} with one candidate, {counts['no_positive']:,} with "
            "no positive, "
            f"{counts['all_equal']:,} with one grade for all); left out of training, kept in "
            "evaluation",
        )
    if all((p.sizes <= cfg.k).all() for p in parts.values()):
        _say(
            log,
            f"ltr: warning: every request has ≤ {cfg.k} candidates, so GMV@{cfg.k}, "
            f"orders@{cfg.k} and clicks@{cfg.k} "
            "cannot depend on the ranking (only NDCG can); use a smaller k (--ltr-option k=5) "
            "or larger requests",
        )
    if not keep.any():
        raise ConfigError(
            "no training request has two candidates with different grades: LTR has nothing to learn"
        )
    levels = GradeLevels.fit(train.grade[keep], train.replay.conversion[keep], cfg.levels)
    n_cat = len(spec.cardinalities)

    def ranking_set(p: RankedSplit, mask: np.ndarray | None = None) -> RankingSet:
        x = features_matrix(p.data.categorical.numpy(), p.data.numerical.numpy())
        label = levels.labels(p.grade, p.replay.conversion)
        sizes = p.sizes
        if mask is not None:
            x, label = x[mask], label[mask]
            sizes = np.bincount(p.group[mask], minlength=p.sizes.size)
            sizes = sizes[sizes > 0]
        return RankingSet(x, label, sizes)

    val = parts.get("val")
    pos_coef = replay_defaults(schema)["position_coef"]
    feval = None
    if val is not None and cfg.early_stopping == "gmv":
        feval = lambda s: replay_metrics(val.replay, s, cfg.k)[f"gmv@{cfg.k}"]
    model, info = train_lambdarank(
        ranking_set(train, keep),
        ranking_set(val) if val is not None else None,
        n_cat,
        levels.gains,
        cfg,
        feval=feval,
    )
    _say(
        log,
        f"ltr: best iteration {info['best_iteration']} of {cfg.n_estimators} "
        f"({info['best_score']})",
    )
    metrics = {}
    for name, p in parts.items():
        if name == "train":
            continue
        score = model(p.data.categorical.numpy(), p.data.numerical.numpy())["score"]
        metrics[name] = ranking_metrics(p, score, cfg.k, position_coef=pos_coef)
    seconds = time.perf_counter() - start
    info = {
        **info,
        "train_requests": counts,
        "bad_value_rows": bad_values,
        "levels": {"edges": levels.edges, "gains": levels.gains},
    }
    bundle_meta = {
        **(meta or {}),
        "ltr": cfg.model_dump(mode="json"),
        "rows": {k: v.height for k, v in splits.items()},
        "best_iteration": info["best_iteration"],
        "history": info["history"],
        "metrics": metrics,
        "seconds": seconds,
        "train_requests": counts,
        "levels": info["levels"],
    }
    model_cfg = ModelConfig(name="ltr", options={k: v for k, v in cfg.model_dump().items()})
    return LTRFit(
        Bundle(model, encoder, schema, model_cfg, spec, bundle_meta), metrics, info, seconds
    )


def evaluate_ranker(
    bundle: Bundle, df: pl.DataFrame, *, k: int | None = None, source: str = "<table>"
) -> dict:
    """Ranking metrics (:func:`ranking_metrics`) of a bundle's ranking score on a labelled
    table: a ranker's ``score``, or a neural model's ``p_ctcvr``.

    Raises:
        ConfigError / DataError: as :func:`check_ltr_schema` and :func:`ranked_split`.
    """
    check_ltr_schema(bundle.schema)
    cfg = (
        LTRConfig.model_validate(bundle.model_config.options)
        if bundle.model_config.name == "ltr"
        else LTRConfig()
    )
    k = k or cfg.k
    split = ranked_split(df, bundle.schema, bundle.encoder, cfg, source=source)
    out = bundle.scorer(split.data.categorical.numpy(), split.data.numerical.numpy())
    score = out["score"] if "score" in out else out["p_ctcvr"]
    return ranking_metrics(
        split, score, k, position_coef=replay_defaults(bundle.schema)["position_coef"]
    )


def listwise_loss(
    score: torch.Tensor, grade: torch.Tensor, slot: torch.Tensor, n_lists: int, width: int
) -> torch.Tensor:
    """Softmax cross-entropy over slates (ListNet top-1, Cao et al. ICML 2007): per request,
    −Σ_i t_i · log softmax(s)_i with targets t = grade / Σ grade; mean over requests.

    ``score``, ``grade``: ``[B]`` rows; ``slot``: ``[B]`` flat index list·width + position of
    each row in a ``[n_lists, width]`` padded slate (padding scores −inf, weight 0). Every
    list must have a positive grade sum.
    """
    s = (
        torch.full((n_lists * width,), float("-inf"), dtype=score.dtype)
        .index_put((slot,), score)
        .view(n_lists, width)
    )
    g = (
        torch.zeros(n_lists * width, dtype=score.dtype)
        .index_put((slot,), grade)
        .view(n_lists, width)
    )
    logp = torch.log_softmax(s, dim=1)
    t = g / g.sum(1, keepdim=True)
    return -(t * torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))).sum(1).mean()


def fit_listwise(
    train: RankedSplit,
    val: RankedSplit,
    spec,
    model_cfg: ModelConfig,
    *,
    k: int = 10,
    epochs: int = 3,
    lists_per_batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """The neural counterpart of LambdaMART for the side-by-side comparison: mtrank's own
    embedding + MLP (:class:`mtrank.models.base.SingleTaskNet`, the same features and capacity
    as one BASE tower) trained with :func:`listwise_loss` on the trainable requests
    (:func:`mtrank.models.ltr.trainable_requests`), Adam, early stopping (patience 1) on
    validation grade NDCG@K. Returns (model at its best epoch, eval mode; info). Not a bundle
    model (yet): it is scored in memory by the benchmark."""
    from mtrank.models.base import SingleTaskNet

    torch.manual_seed(seed)
    net = SingleTaskNet(spec, model_cfg)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    keep, _ = trainable_requests(train.group, train.sizes, train.grade)
    rows = np.flatnonzero(keep)
    g = train.group[rows]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]  # contiguous requests
    lens = np.diff(np.r_[starts, rows.size])
    width = int(lens.max())
    pos = np.arange(rows.size) - np.repeat(starts, lens)
    cat, num = train.data.categorical, train.data.numerical
    grade = torch.from_numpy(train.grade.astype(np.float32))
    rng = np.random.default_rng(seed)

    def val_ndcg() -> float:
        with torch.no_grad():
            net.eval()
            sc = net(val.data.categorical, val.data.numerical).numpy()
            net.train()
        return ranking_metrics(val, sc, k)[f"ndcg_grade@{k}"] or 0.0

    best, best_state, history = -1.0, None, []
    for epoch in range(epochs):
        for chunk in np.array_split(
            rng.permutation(starts.size), max(1, starts.size // lists_per_batch)
        ):
            n_rows = lens[chunk]
            idx = np.repeat(starts[chunk] - (np.cumsum(n_rows) - n_rows), n_rows) + np.arange(
                n_rows.sum()
            )
            slot = torch.from_numpy(
                np.repeat(np.arange(chunk.size), lens[chunk]) * width + pos[idx]
            )
            r = torch.from_numpy(rows[idx])
            loss = listwise_loss(net(cat[r], num[r]), grade[r], slot, chunk.size, width)
            opt.zero_grad()
            loss.backward()
            opt.step()
        nd = val_ndcg()
        history.append(nd)
        _say(log, f"listwise: epoch {epoch + 1} val ndcg_grade@{k} {nd:.4f}")
        if nd > best:
            best, best_state = nd, {n: p.detach().clone() for n, p in net.state_dict().items()}
        else:
            break
    net.load_state_dict(best_state)
    return net.eval(), {"best_epoch": int(np.argmax(history)) + 1, "history": history}


def ltr_options(items: list[str] | None, **overrides) -> LTRConfig:
    """``["key=value", ...]`` (value parsed as JSON when it can be) plus ``overrides`` →
    :class:`LTRConfig`. Raises ConfigError on a malformed item, pydantic's ValidationError on
    an unknown key or an out-of-range value."""
    import json

    opts: dict = dict(overrides)
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--ltr-option takes key=value (e.g. learning_rate=0.1), got {item!r}"
            )
        try:
            opts[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key.strip()] = raw
    return LTRConfig.model_validate(opts)


def train_ltr_run(
    dataset: str | None,
    data: str | None,
    schema: Schema | None,
    data_dir,
    split_cfg,
    cfg: LTRConfig,
    *,
    funnel_violations: str | None = None,
    meta: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> LTRFit:
    """Load (built-in ``dataset`` or a ``data`` file with ``schema``), split with ``split_cfg``
    and :func:`fit_ltr`: what ``mtrank train --model ltr`` runs (the bundle is not saved)."""
    from mtrank.data.split import split_data
    from mtrank.workflow import load_data

    loaded = load_data(
        dataset, data=data, schema=schema, data_dir=data_dir, funnel_violations=funnel_violations
    )
    check_ltr_schema(loaded.schema)
    splits = split_data(loaded, split_cfg)
    meta = {
        "dataset": dataset or loaded.schema.name,
        "sources": loaded.sources,
        "split": split_cfg.model_dump(),
        **(meta or {}),
    }
    return fit_ltr(splits, loaded.schema, cfg, meta=meta, log=log)


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


__all__ = [
    "LTRFit",
    "RankedSplit",
    "check_ltr_schema",
    "evaluate_ranker",
    "fit_listwise",
    "fit_ltr",
    "listwise_loss",
    "ltr_options",
    "ranked_split",
    "ranking_metrics",
    "train_ltr_run",
]
