"""Offline tuning of a fusion's parameters by replay: grid search or optuna TPE (seeded).

The objective is GMV@K (realised, from labels) or expected GMV@K (true probabilities, simulator
only), optionally under the constraint clicks@K ≥ ``click_floor`` × clicks@K of the pCTR-only
ranking on the same requests. Requests are split (seeded) into a *tuning* half, on which the
search runs, and a *held-out* half, on which the chosen parameters and the reference rankings
are reported, so the reported lift is not the search's own optimism.

Every evaluated point is kept; its (clicks@K, GMV@K) pairs give the Pareto frontier
(:func:`pareto_frontier`): the points no other point beats on both.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from mtrank.errors import ConfigError
from mtrank.ranking.fusion import Fusion, Linear, make_fusion
from mtrank.ranking.replay import ReplayData, replay_metrics

# Search space per formula: name → (low, high). Fixed params come from ``TuneConfig.fixed``.
SPACES: dict[str, dict[str, tuple[float, float]]] = {
    "multiplicative": {"alpha": (0.0, 2.0), "beta": (0.0, 2.0), "gamma": (0.0, 2.0)},
    "offset_multiplicative": {
        "alpha": (0.0, 2.0),
        "beta": (0.0, 2.0),
        "gamma": (0.0, 2.0),
        "b2": (0.0, 0.2),
    },
    "linear": {"w1": (0.0, 1.0), "w2": (0.0, 1.0), "w3": (0.0, 1.0)},
    "expected_gmv": {},
}


@dataclass
class TuneConfig:
    """Tuning settings.

    Attributes:
        formula: a key of :data:`SPACES`. method: ``grid`` or ``optuna``.
        k: cut-off K. objective: ``gmv`` (labels) or ``exp_gmv`` (true probabilities).
        click_floor: None, or the fraction (e.g. 0.97) of the pCTR-only clicks@K that a
            feasible point must keep (``exp_clicks`` when the objective is ``exp_gmv``).
        trials: optuna trials. grid_points: values per parameter on the grid (n^d points).
        holdout: fraction of requests held out for reporting. seed: the split and TPE seed.
        fixed: parameters not searched (e.g. ``{"eps": 1.0}``).
        position_coef: see :func:`~mtrank.ranking.replay.replay_metrics`.
    """

    formula: str = "multiplicative"
    method: str = "optuna"
    k: int = 10
    objective: str = "gmv"
    click_floor: float | None = 0.97
    trials: int = 200
    grid_points: int = 9
    holdout: float = 0.5
    seed: int = 0
    fixed: dict[str, float] = field(default_factory=dict)
    position_coef: float = 0.0


@dataclass
class TuneResult:
    """best: the chosen fusion. trials: one row per evaluated point (params, tuning metrics,
    feasible). frontier: the Pareto rows. heldout: metrics per ranking on the held-out requests
    (``fused``, ``pctr``, ``pctcvr``, ``expected_gmv``, ``logged`` when positions exist).
    tuning: the same on the tuning requests. held: the held-out :class:`ReplayData`."""

    best: Fusion
    trials: pl.DataFrame
    frontier: pl.DataFrame
    heldout: dict[str, dict]
    tuning: dict[str, dict]
    config: TuneConfig
    held: ReplayData | None = None


def reference_scores(data: ReplayData) -> dict[str, np.ndarray]:
    """Reference rankings: pCTR only, pCTCVR only, expected GMV (pCTR·pCVR·price), and the
    logged order (position ascending) when positions are known."""
    refs = {
        "pctr": make_fusion("single", {"which": "ctr"}).score(data.p_ctr, data.p_cvr, data.price),
        "pctcvr": make_fusion("single", {"which": "ctcvr"}).score(
            data.p_ctr, data.p_cvr, data.price
        ),
        "expected_gmv": make_fusion("expected_gmv").score(data.p_ctr, data.p_cvr, data.price),
    }
    if data.position is not None:
        refs["logged"] = -data.position
    return refs


def split_requests(data: ReplayData, holdout: float, seed: int) -> tuple[ReplayData, ReplayData]:
    """(tuning, held-out) halves by whole requests, seeded. ``holdout`` = 0 reuses all rows."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
    if holdout == 0:
        return data, data
    held = np.random.default_rng(seed).random(data.n_requests) < holdout
    mask = held[data.group]
    return data.subset(~mask), data.subset(mask)


def _build(cfg: TuneConfig, params: dict[str, float], data: ReplayData) -> Fusion:
    params = {**cfg.fixed, **params}
    if cfg.formula == "linear":
        return Linear.fitted_scales(data.p_ctr, data.p_cvr, data.price, **params)
    return make_fusion(cfg.formula, params)


def pareto_frontier(trials: pl.DataFrame, x: str, y: str) -> pl.DataFrame:
    """Rows of ``trials`` not dominated on (``x``, ``y``), both larger-is-better; sorted by x."""
    if trials.height == 0:
        return trials
    t = trials.with_row_index("_i").sort([x, y, "_i"], descending=[True, True, False])
    best_y = t.get_column(y).cum_max().shift(1, fill_value=-np.inf)
    return t.filter(pl.col(y) > best_y).drop("_i").sort(x)


def tune(data: ReplayData, cfg: TuneConfig, *, progress: bool = False) -> TuneResult:
    """Search the fusion parameters on the tuning requests; report on the held-out ones.

    ``progress``: show a progress bar over the evaluated points (stderr).

    Raises:
        ConfigError: unknown formula / method / objective, or ``exp_gmv`` without true
            probabilities.
    """
    if cfg.formula not in SPACES:
        raise ConfigError(f"cannot tune formula {cfg.formula!r}; choose one of {sorted(SPACES)}")
    if cfg.method not in ("grid", "optuna"):
        raise ConfigError(f"tuning method must be 'grid' or 'optuna', got {cfg.method!r}")
    if cfg.objective not in ("gmv", "exp_gmv"):
        raise ConfigError(f"objective must be 'gmv' or 'exp_gmv', got {cfg.objective!r}")
    if cfg.objective == "exp_gmv" and data.true_ctr is None:
        raise ConfigError("objective 'exp_gmv' needs true_ctr / true_cvr columns (the simulator's)")
    k = cfg.k
    gmv_key = f"{cfg.objective}@{k}"
    clicks_key = f"{'exp_clicks' if cfg.objective == 'exp_gmv' else 'clicks'}@{k}"
    tune_data, held = split_requests(data, cfg.holdout, cfg.seed)
    evaluate = lambda d, s: replay_metrics(d, s, k, position_coef=cfg.position_coef)
    tuning = {name: evaluate(tune_data, s) for name, s in reference_scores(tune_data).items()}
    floor = None if cfg.click_floor is None else cfg.click_floor * tuning["pctr"][clicks_key]
    rows: list[dict] = []
    space = SPACES[cfg.formula]
    n_points = (
        1 if not space else (cfg.grid_points ** len(space) if cfg.method == "grid" else cfg.trials)
    )
    bar = tqdm(
        total=n_points,
        desc=f"tuning {cfg.formula}",
        unit="point",
        disable=not progress,
        leave=False,
    )

    def run(params: dict[str, float]) -> dict:
        fusion = _build(cfg, params, tune_data)
        m = evaluate(tune_data, fusion.score(tune_data.p_ctr, tune_data.p_cvr, tune_data.price))
        feasible = floor is None or m[clicks_key] >= floor
        row = {
            **params,
            "clicks": m[clicks_key],
            "gmv": m[gmv_key],
            "ndcg": m[f"ndcg@{k}"],
            "feasible": feasible,
        }
        rows.append(row)
        bar.update(1)
        return row

    if not space:
        run({})
    elif cfg.method == "grid":
        axes = [np.linspace(lo, hi, cfg.grid_points) for lo, hi in space.values()]
        for values in itertools.product(*axes):
            run({name: float(v) for name, v in zip(space, values, strict=True)})
    else:
        try:
            import optuna
        except ImportError:
            raise ConfigError(
                "optuna is not installed: it is a dependency of mtrank; reinstall mtrank, or "
                "use --method grid"
            ) from None
        optuna.logging.set_verbosity(logging.WARNING)

        def objective(trial) -> float:
            row = run({name: trial.suggest_float(name, lo, hi) for name, (lo, hi) in space.items()})
            if (
                floor is not None
            ):  # feasible when ≤ 0 (optuna's convention); TPE favours feasible points
                trial.set_constraint(
                    "click_floor", 0.0 if row["feasible"] else floor - row["clicks"]
                )
            return row["gmv"]

        sampler = optuna.samplers.TPESampler(seed=cfg.seed)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(objective, n_trials=cfg.trials)
    bar.close()
    trials = pl.DataFrame(rows)
    feasible = trials.filter(pl.col("feasible"))
    if feasible.height == 0:
        logging.getLogger(__name__).warning(
            "no point met the click floor; choosing the best GMV point"
        )
        feasible = trials
    best_row = (
        feasible.with_row_index("_i")
        .sort(["gmv", "_i"], descending=[True, False])
        .row(0, named=True)
    )
    best_params = {name: best_row[name] for name in space}
    best = _build(cfg, best_params, tune_data)
    heldout = {name: evaluate(held, s) for name, s in reference_scores(held).items()}
    heldout["fused"] = evaluate(held, best.score(held.p_ctr, held.p_cvr, held.price))
    tuning["fused"] = evaluate(
        tune_data, best.score(tune_data.p_ctr, tune_data.p_cvr, tune_data.price)
    )
    frontier = pareto_frontier(trials, "clicks", "gmv")
    return TuneResult(best, trials, frontier, heldout, tuning, cfg, held)


__all__ = [
    "SPACES",
    "TuneConfig",
    "TuneResult",
    "pareto_frontier",
    "reference_scores",
    "split_requests",
    "tune",
]
