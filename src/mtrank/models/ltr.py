"""Learning to rank (LTR): LambdaMART on graded relevance that encodes the objectives.

The third way to rank for several objectives at once (next to fusing per-objective scores and
multi-task learning): one ranker trained on a relevance grade per impression that already says
how much each outcome is worth (Burges 2010, *From RankNet to LambdaRank to LambdaMART*,
MSR-TR-2010-82; LightGBM's ``lambdarank`` objective, Ke et al. 2017).

Grade (:func:`relevance_grades`, :class:`LTRConfig`)::

    grade = click_grade · click + conversion · (order_grade + value_coef · log(1 + value))

so by default 0 = not clicked, 1 = clicked, and a purchase 1 + a·log(1 + price). LightGBM's
lambdarank takes integer labels with a gain per label (``label_gain``), so grades are mapped to
levels (:class:`GradeLevels`): 0 and 1 keep their own level, purchases are cut into
``levels`` quantile bins of their grade (edges fitted on the training purchases), and each
level's gain is the mean grade of its training rows. NDCG as LightGBM computes it is then NDCG
with the grade as gain, up to the binning.

Input: request-grouped impressions; the rows of a request must be contiguous
(:func:`request_groups`). Features: the encoded features every mtrank model uses (categorical
ids, as LightGBM categorical features; standardised numericals).

The model (:class:`LambdaMART`) is stored as LightGBM's own text format (``model.txt``), no
pickle, and scores with :meth:`LambdaMART.__call__`: one ranking score ``[N]`` per row; it has
no pCTR / pCVR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mtrank.errors import BundleError, ConfigError, DataError
from mtrank.models.config import FeatureSpec, ModelConfig


class LTRConfig(BaseModel):
    """LambdaMART settings (flat, so that they fit :attr:`ModelConfig.options`).

    Attributes:
        k: cut-off K of the early-stopping metric (NDCG@K or GMV@K on validation).
        early_stopping: ``ndcg`` (grade-gain NDCG@K, LightGBM's own metric) or ``gmv``
            (GMV@K by :func:`mtrank.ranking.replay.replay_metrics`).
        n_estimators: most boosting rounds. patience: rounds without improvement before stopping.
        learning_rate, num_leaves, min_data_in_leaf: LightGBM tree settings.
        click_grade, order_grade, value_coef: the grade (module docstring).
        levels: quantile bins of the purchase grade (LightGBM needs integer labels, ≤ 30 levels).
        threads: LightGBM threads (0 = its default). seed: LightGBM seed (deterministic mode).
    """

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1)
    early_stopping: str = Field("ndcg", pattern="^(ndcg|gmv)$")
    n_estimators: int = Field(300, ge=1)
    patience: int = Field(30, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    num_leaves: int = Field(31, ge=2)
    min_data_in_leaf: int = Field(50, ge=1)
    click_grade: float = Field(1.0, ge=0)
    order_grade: float = Field(0.0, ge=0)
    value_coef: float = Field(1.0, ge=0)
    levels: int = Field(16, ge=1, le=28)
    threads: int = Field(0, ge=0)
    seed: int = 0


def relevance_grades(
    click: np.ndarray, conversion: np.ndarray, value: np.ndarray | None, cfg: LTRConfig
) -> tuple[np.ndarray, int]:
    """Relevance grade ``[N]`` (float64, ≥ 0) of each impression (module docstring).

    A converted row whose value is missing, non-finite or negative is graded with value 0 (a
    purchase of unknown value) and counted.

    Returns:
        (grade, n_bad_value).
    """
    click = np.asarray(click, dtype=np.float64)
    conversion = np.asarray(conversion, dtype=np.float64)
    v = np.zeros_like(conversion) if value is None else np.asarray(value, dtype=np.float64)
    bad = (conversion > 0) & ~(np.isfinite(v) & (v >= 0))
    v = np.where(np.isfinite(v) & (v >= 0), v, 0.0)
    grade = cfg.click_grade * click + conversion * (cfg.order_grade + cfg.value_coef * np.log1p(v))
    return grade, int(bad.sum())


@dataclass
class GradeLevels:
    """Integer levels for LightGBM's lambdarank: 0 (grade 0), 1 (non-purchase positive grade),
    2.. (purchase grade bins). ``edges``: inner bin edges of the purchase grade; ``gains``: the
    gain of each level (LightGBM ``label_gain``)."""

    edges: list[float]
    gains: list[float]

    @classmethod
    def fit(cls, grade: np.ndarray, conversion: np.ndarray, levels: int) -> GradeLevels:
        """Quantile bins of the purchase grades (at most ``levels``); gains = mean grade per
        level."""
        grade = np.asarray(grade, dtype=np.float64)
        buy = np.asarray(conversion) > 0
        other = grade[~buy & (grade > 0)]
        g1 = float(other.mean()) if other.size else 1.0
        pg = grade[buy]
        if pg.size == 0:
            return cls([], [0.0, g1])
        edges = (
            np.unique(np.quantile(pg, np.linspace(0, 1, levels + 1)[1:-1]))
            if levels > 1
            else np.zeros(0)
        )
        b = np.searchsorted(edges, pg, side="right")
        gains = [0.0, g1] + [
            float(pg[b == i].mean()) if (b == i).any() else float(pg.mean())
            for i in range(edges.size + 1)
        ]
        return cls([float(e) for e in edges], gains)

    def labels(self, grade: np.ndarray, conversion: np.ndarray) -> np.ndarray:
        """Integer level ``[N]`` (int32) of each row."""
        grade = np.asarray(grade, dtype=np.float64)
        buy = np.asarray(conversion) > 0
        lab = np.where(grade > 0, 1, 0)
        if len(self.gains) > 2:
            lab = np.where(
                buy, 2 + np.searchsorted(np.asarray(self.edges), grade, side="right"), lab
            )
        return lab.astype(np.int32)


def request_groups(
    request_id: pl.Series, column: str, rows: np.ndarray | None = None, source: str = "<table>"
) -> tuple[np.ndarray, np.ndarray]:
    """Check that every request's rows are contiguous and return (dense group ``[N]`` int64,
    sizes ``[R]`` int64) in order of appearance (what LightGBM's ``group`` needs).

    ``request_id``: the request id column; ``rows``: 1-based source row numbers for the
    message (default 1..N).

    Raises:
        DataError: a missing request id (null or NaN) or a request whose rows are not
            contiguous, naming ``column`` and the first offending rows.
    """
    n = request_id.len()
    rows = np.arange(1, n + 1) if rows is None else np.asarray(rows)
    missing = request_id.is_null()
    if request_id.dtype.is_float():
        missing = missing | request_id.is_nan().fill_null(True)
    missing = missing.to_numpy()
    if missing.any():
        hit = rows[missing]
        raise DataError(
            "missing request id: LTR groups impressions by request; give every row its request id",
            file=source,
            column=column,
            rows=hit[:10].tolist(),
            count=int(hit.size),
        )
    ids = request_id.to_numpy()
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.r_[True, ids[1:] != ids[:-1]]
    run = np.cumsum(change) - 1  # run index of each row
    starts = ids[change]
    _, counts = np.unique(starts, return_counts=True)
    if (counts > 1).any():
        _, first_run = np.unique(starts, return_index=True)
        seen = np.zeros(starts.size, bool)
        seen[first_run] = True
        bad_run = int(np.flatnonzero(~seen)[0])
        first_row = int(rows[np.flatnonzero(run == bad_run)[0]])
        raise DataError(
            f"request {starts[bad_run]!r} is not contiguous: its rows are split by other requests; "
            "sort the table by request id (LTR groups impressions by runs of rows)",
            file=source,
            column=column,
            rows=[first_row],
        )
    sizes = np.diff(np.r_[np.flatnonzero(change), n]).astype(np.int64)
    return run.astype(np.int64), sizes


def trainable_requests(
    group: np.ndarray, sizes: np.ndarray, grade: np.ndarray
) -> tuple[np.ndarray, dict[str, int]]:
    """Requests a pairwise / listwise loss can learn from: more than one candidate and at least
    two different grades. Returns (row mask ``[N]``, counts: ``requests``, ``one_candidate``,
    ``no_positive`` (all grades 0), ``all_equal`` (several candidates, one grade > 0))."""
    R = sizes.size
    gmax = np.full(R, -np.inf)
    np.maximum.at(gmax, group, grade)
    gmin = np.full(R, np.inf)
    np.minimum.at(gmin, group, grade)
    one = sizes == 1
    no_pos = ~one & (gmax <= 0)
    equal = ~one & ~no_pos & (gmax == gmin)
    keep = ~(one | no_pos | equal)
    return keep[group], {
        "requests": int(R),
        "one_candidate": int(one.sum()),
        "no_positive": int(no_pos.sum()),
        "all_equal": int(equal.sum()),
    }


def features_matrix(categorical: np.ndarray, numerical: np.ndarray) -> np.ndarray:
    """``[N, n_cat + n_num]`` float64: encoded categorical ids (LightGBM categorical features,
    first ``n_cat`` columns) then standardised numericals."""
    return np.hstack(
        [np.asarray(categorical, dtype=np.float64), np.asarray(numerical, dtype=np.float64)]
    )


class LambdaMART:
    """A trained LightGBM lambdarank model; a bundle's scorer and its own weights codec.

    Scorer: ``model(categorical int64 [N, n_cat], numerical float32 [N, n_num])`` →
    ``{"score": float64 [N]}`` (higher ranks first; a raw ranking score, not a probability).
    Codec: :attr:`weights_file` (LightGBM text format), :meth:`save_weights`,
    :meth:`load_weights`, :meth:`scorer` (see :mod:`mtrank.bundle`).
    """

    outputs = ("score",)
    weights_file = "model.txt"

    def __init__(self, booster, n_categorical: int, n_numerical: int) -> None:
        self.booster = booster
        self.n_categorical = n_categorical
        self.n_numerical = n_numerical

    def __call__(self, categorical: np.ndarray, numerical: np.ndarray) -> dict[str, np.ndarray]:
        """``{"score": float64 [N]}`` for encoded rows (int64 ``[N, n_cat]``, float32 ``[N,
        n_num]``)."""
        x = features_matrix(categorical, numerical)
        if x.shape[0] == 0:
            return {"score": np.zeros(0)}
        return {"score": np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64)}

    # -- codec ------------------------------------------------------------------------------
    @classmethod
    def scorer(cls, model: LambdaMART, spec: FeatureSpec) -> LambdaMART:
        """The model itself: a LambdaMART is its own scorer."""
        return model

    @classmethod
    def save_weights(cls, model: LambdaMART, folder: Path) -> None:
        """Write ``model.txt`` (LightGBM text format, best iteration only)."""
        text = model.booster.model_to_string(num_iteration=-1)
        (Path(folder) / cls.weights_file).write_text(text)

    @classmethod
    def load_weights(cls, folder: Path, spec: FeatureSpec, cfg: ModelConfig) -> LambdaMART:
        """Read ``model.txt``.

        Raises:
            BundleError: unreadable, or its feature count does not match ``spec``.
        """
        import lightgbm as lgb

        path = Path(folder) / cls.weights_file
        try:
            booster = lgb.Booster(model_str=path.read_text())
        except (OSError, UnicodeDecodeError, lgb.basic.LightGBMError) as exc:
            raise BundleError(
                f"bundle {folder}: cannot read {cls.weights_file} "
                f"({str(exc).splitlines()[0] if str(exc) else exc})"
            ) from None
        n_cat, n_num = len(spec.cardinalities), spec.n_numerical
        if booster.num_feature() != n_cat + n_num:
            raise BundleError(
                f"bundle {folder}: {cls.weights_file} has {booster.num_feature()} features, "
                f"the feature spec {n_cat + n_num}"
            )
        return cls(booster, n_cat, n_num)


@dataclass
class RankingSet:
    """One split for LightGBM: features ``[N, F]``, integer levels ``[N]``, request sizes
    ``[R]``."""

    x: np.ndarray
    label: np.ndarray
    sizes: np.ndarray


def train_lambdarank(
    train: RankingSet,
    val: RankingSet | None,
    n_categorical: int,
    gains: list[float],
    cfg: LTRConfig,
    *,
    feval: Callable[[np.ndarray], float] | None = None,
) -> tuple[LambdaMART, dict]:
    """Fit LightGBM ``lambdarank`` with early stopping on ``val``.

    Args:
        train, val: :class:`RankingSet` (rows of a request contiguous, in ``sizes`` order).
        n_categorical: the first columns that are categorical features.
        gains: gain per integer level (:attr:`GradeLevels.gains`).
        cfg: :class:`LTRConfig`.
        feval: with ``cfg.early_stopping == "gmv"``: validation scores ``[N_val]`` → GMV@K
            (larger is better).

    Returns:
        (model, info): info holds ``best_iteration``, ``best_score`` and the validation
        history per round.

    Raises:
        ConfigError: ``early_stopping="gmv"`` without ``feval``, or more levels than gains.
    """
    import lightgbm as lgb

    if cfg.early_stopping == "gmv" and feval is None and val is not None:
        raise ConfigError("early stopping on GMV@K needs the validation replay (feval)")
    if int(train.label.max(initial=0)) >= len(gains):
        raise ConfigError(f"grade level {int(train.label.max())} has no gain (gains {gains})")
    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [cfg.k],
        "label_gain": gains,
        "learning_rate": cfg.learning_rate,
        "num_leaves": cfg.num_leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "lambdarank_truncation_level": max(cfg.k, 10),
        "max_cat_to_onehot": 4,
        "cat_smooth": 10.0,
        "seed": cfg.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
        **({"num_threads": cfg.threads} if cfg.threads else {}),
    }
    cat = list(range(n_categorical))
    dtrain = lgb.Dataset(
        train.x, train.label, group=train.sizes, categorical_feature=cat, free_raw_data=False
    )
    history: dict = {}
    callbacks = [lgb.record_evaluation(history)]
    valid_sets, fevals = [], None
    if val is not None and val.sizes.size:
        dval = lgb.Dataset(
            val.x,
            val.label,
            group=val.sizes,
            categorical_feature=cat,
            reference=dtrain,
            free_raw_data=False,
        )
        valid_sets = [dval]
        if cfg.early_stopping == "gmv":
            fevals = lambda preds, _data: (f"gmv@{cfg.k}", float(feval(preds)), True)
            params["metric"] = "None"
        callbacks.append(lgb.early_stopping(cfg.patience, first_metric_only=True, verbose=False))
    booster = lgb.train(
        params,
        dtrain,
        num_boost_round=cfg.n_estimators,
        valid_sets=valid_sets,
        valid_names=["val"] * len(valid_sets),
        feval=fevals,
        callbacks=callbacks,
    )
    best = booster.best_iteration or booster.current_iteration()
    if valid_sets:
        booster = lgb.Booster(
            model_str=booster.model_to_string(num_iteration=best)
        )  # keep the best rounds only
    hist = {k: [float(x) for x in v] for k, v in history.get("val", {}).items()}
    best_score = {k: v[best - 1] for k, v in hist.items() if len(v) >= best}
    return LambdaMART(booster, n_categorical, train.x.shape[1] - n_categorical), {
        "best_iteration": int(best),
        "best_score": best_score,
        "history": hist,
    }


__all__ = [
    "GradeLevels",
    "LTRConfig",
    "LambdaMART",
    "RankingSet",
    "features_matrix",
    "relevance_grades",
    "request_groups",
    "train_lambdarank",
    "trainable_requests",
]
