"""A synthetic mall whose click and conversion probabilities are known exactly.

Generative model (all draws from one seeded ``numpy.random.Generator``; vectorised):

* **Items** i: category c(i) (Zipf-like), brand b(i), shop s(i);
  price: ``log price = μ_c + 0.5·ε``;
  *appeal* ``A_i = 0.6·α_c + 0.5·α_b + 0.8·e_i`` drives CTR;
  *quality* ``Q_i = 0.3·α_b + 0.4·κ_b + 0.5·κ_s + 0.3·e_i + 0.7·ε_i`` drives CVR. Appeal and
  quality share a part (corr ≈ 0.3, as attractive brands also sell), but most of quality is
  its own, so all four CTR × CVR quadrants exist, including low-CTR/high-CVR items.
* **Users** u: age bucket, gender, purchase power ``w_u ∈ {1..5}``, activity ``a_u``, and a taste
  vector ``t_u ∈ R^4``; each category has a vector ``v_c``; affinity ``f(u,c) = t_u·v_c / 2``.
* **Requests** r: a user (activity-weighted), a day and hour, and ``slate_size`` candidate items
  (popularity-weighted). The logged ranker orders them by appeal plus noise into positions 1..S.
* **Impressions**: a latent purchase *intent* ``z ~ N(0,1)`` per impression, never observed,
  raises both clicking and buying (the source of sample selection bias):

      logit CTR = θ_ctr + A_i + 0.8·f(u,c) + a_u − 0.35·log(position) + λ·z
      logit CVR = θ_cvr + Q_i + 0.5·f(u,c) − (0.9 − 0.15·w_u)·(log price − m) + λ·z

  ``θ_ctr`` and ``θ_cvr`` are solved by bisection so that the mean CTR and the mean CVR *given
  click* match the targets (defaults 4 % and 10 %; Ali-CCP has CTR ≈ 4 %).
  click ~ Bernoulli(CTR); conversion ~ Bernoulli(CVR) if clicked, else 0.

Every row keeps ``true_ctr`` and ``true_cvr`` (the probabilities above, latent intent included)
as passthrough columns; they are never features.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mtrank.data.schema import Schema
from mtrank.errors import ConfigError
from mtrank.data.io import refuse_nonempty
from mtrank.io_utils import atomic_write_parquet, write_parts_dir


class SimConfig(BaseModel):
    """Simulator settings. ``rows`` = impressions (a multiple of ``slate_size`` is used)."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(1_000_000, ge=10)
    n_users: int = Field(20_000, ge=1)
    n_items: int = Field(5_000, ge=2)
    n_categories: int = Field(40, ge=1)
    n_brands: int = Field(400, ge=1)
    n_shops: int = Field(800, ge=1)
    slate_size: int = Field(10, ge=1)
    n_days: int = Field(14, ge=1)
    ctr: float = Field(0.04, gt=0, lt=1)
    cvr: float = Field(0.10, gt=0, lt=1)
    intent: float = Field(0.6, ge=0, description="λ, strength of the unobserved purchase intent")
    seed: int = 0


SIMULATED_SCHEMA = Schema(
    name="simulated",
    click="click",
    conversion="conversion",
    price="price",
    user_id="user_id",
    item_id="item_id",
    request_id="request_id",
    time="day",
    categorical=["user_id", "user_age", "user_gender", "user_power", "item_id", "category", "brand", "shop", "hour"],
    numerical=["price"],
    passthrough=["true_ctr", "true_cvr", "position"],
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _solve_intercept(logit: np.ndarray, target: float, weight: np.ndarray | None = None) -> float:
    """θ such that the (weighted) mean of σ(logit + θ) equals ``target`` (bisection, monotone)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        p = _sigmoid(logit + mid)
        mean = p.mean() if weight is None else (p * weight).sum() / weight.sum()
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return 0.5 * (lo + hi)


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


def simulate(cfg: SimConfig) -> pl.DataFrame:
    """Generate the impression log. Deterministic for a given config (seed included).

    Returns:
        A DataFrame with columns ``request_id, day, hour, position, user_id, user_age,
        user_gender, user_power, item_id, category, brand, shop, price, click, conversion,
        true_ctr, true_cvr`` (ids are int64; price in currency units, > 0).
    """
    rng = np.random.default_rng(cfg.seed)
    world = _world(cfg, rng)
    n_req = max(1, cfg.rows // cfg.slate_size)
    df, _ = _impressions(cfg, world, rng, n_req, 0, day=None)
    return df


def simulate_parts(cfg: SimConfig, part_rows: int) -> Iterator[pl.DataFrame]:
    """The same mall in parts of about ``part_rows`` impressions each, in bounded memory.

    Items and users are drawn once; part k's requests come from ``default_rng([seed, k + 1])``
    and cover its own slice of the days, so parts are in time order. The intercepts θ are solved
    on the first part and kept. (A multi-part log is a different sample than ``simulate``'s.)
    """
    rng = np.random.default_rng(cfg.seed)
    world = _world(cfg, rng)
    total_req = max(1, cfg.rows // cfg.slate_size)
    per_part = max(1, part_rows // cfg.slate_size)
    n_parts = (total_req + per_part - 1) // per_part
    theta = None
    for k in range(n_parts):
        n_req = min(per_part, total_req - k * per_part)
        prng = np.random.default_rng([cfg.seed, k + 1])
        lo, hi = k * cfg.n_days / n_parts, (k + 1) * cfg.n_days / n_parts
        day = np.sort(np.floor(prng.uniform(lo, hi, n_req))).astype(np.int64)
        df, theta = _impressions(cfg, world, prng, n_req, k * per_part, day, theta)
        yield df


def _world(cfg: SimConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Items and users (see the module docstring)."""
    cat = rng.choice(cfg.n_categories, size=cfg.n_items, p=_zipf_weights(cfg.n_categories, 0.8, rng))
    brand = rng.integers(0, cfg.n_brands, cfg.n_items)
    shop = rng.integers(0, cfg.n_shops, cfg.n_items)
    cat_price = rng.normal(math.log(60.0), 0.8, cfg.n_categories)
    log_price = cat_price[cat] + 0.5 * rng.standard_normal(cfg.n_items)
    price = np.round(np.exp(log_price), 2).clip(0.5, None)
    brand_appeal = rng.standard_normal(cfg.n_brands)
    item_appeal = rng.standard_normal(cfg.n_items)
    appeal = 0.6 * rng.standard_normal(cfg.n_categories)[cat] + 0.5 * brand_appeal[brand] + 0.8 * item_appeal
    quality = (
        0.3 * brand_appeal[brand]
        + 0.4 * rng.standard_normal(cfg.n_brands)[brand]
        + 0.5 * rng.standard_normal(cfg.n_shops)[shop]
        + 0.3 * item_appeal
        + 0.7 * rng.standard_normal(cfg.n_items)
    )
    item_pop = _zipf_weights(cfg.n_items, 0.7, rng)
    return {
        "cat": cat, "brand": brand, "shop": shop, "log_price": log_price, "price": price,
        "appeal": appeal, "quality": quality, "item_pop": item_pop,
        "age": rng.integers(0, 7, cfg.n_users), "gender": rng.integers(0, 2, cfg.n_users),
        "power": rng.integers(1, 6, cfg.n_users), "activity": 0.5 * rng.standard_normal(cfg.n_users),
        "taste": rng.standard_normal((cfg.n_users, 4)), "cat_vec": rng.standard_normal((cfg.n_categories, 4)),
        "user_pop": _zipf_weights(cfg.n_users, 0.6, rng),
    }


def _impressions(
    cfg: SimConfig, w: dict[str, np.ndarray], rng: np.random.Generator, n_req: int, req_offset: int,
    day: np.ndarray | None, theta: tuple[float, float] | None = None,
) -> tuple[pl.DataFrame, tuple[float, float]]:
    """Requests, slates, and click / conversion draws. Returns the table and the intercepts.

    ``day=None`` draws each request's day uniformly over ``n_days`` (sorted, in time order)."""
    s = cfg.slate_size
    req_user = rng.choice(cfg.n_users, size=n_req, p=w["user_pop"])
    if day is None:
        day = np.sort(rng.integers(0, cfg.n_days, n_req))
    hour = rng.integers(0, 24, n_req)
    items = rng.choice(cfg.n_items, size=(n_req, s), p=w["item_pop"])
    logged_score = w["appeal"][items] + 0.7 * rng.standard_normal((n_req, s))
    order = np.argsort(-logged_score, axis=1, kind="stable")
    items = np.take_along_axis(items, order, axis=1).ravel()
    position = np.tile(np.arange(1, s + 1), n_req)
    user = np.repeat(req_user, s)
    c = w["cat"][items]
    affinity = (w["taste"][user] * w["cat_vec"][c]).sum(1) / 2.0
    z = rng.standard_normal(items.size)
    ctr_logit = w["appeal"][items] + 0.8 * affinity + w["activity"][user] - 0.35 * np.log(position) + cfg.intent * z
    sens = 0.9 - 0.15 * w["power"][user]
    cvr_logit = w["quality"][items] + 0.5 * affinity - sens * (w["log_price"][items] - math.log(60.0)) + cfg.intent * z
    if theta is None:
        t_ctr = _solve_intercept(ctr_logit, cfg.ctr)
        t_cvr = _solve_intercept(cvr_logit, cfg.cvr, weight=_sigmoid(ctr_logit + t_ctr))
        theta = (t_ctr, t_cvr)
    true_ctr = _sigmoid(ctr_logit + theta[0])
    true_cvr = _sigmoid(cvr_logit + theta[1])
    click = (rng.random(items.size) < true_ctr).astype(np.int8)
    conversion = (click.astype(bool) & (rng.random(items.size) < true_cvr)).astype(np.int8)
    df = pl.DataFrame(
        {
            "request_id": np.repeat(np.arange(req_offset, req_offset + n_req, dtype=np.int64), s),
            "day": np.repeat(day, s).astype(np.int64),
            "hour": np.repeat(hour, s).astype(np.int64),
            "position": position.astype(np.int64),
            "user_id": user.astype(np.int64),
            "user_age": w["age"][user].astype(np.int64),
            "user_gender": w["gender"][user].astype(np.int64),
            "user_power": w["power"][user].astype(np.int64),
            "item_id": items.astype(np.int64),
            "category": c.astype(np.int64),
            "brand": w["brand"][items].astype(np.int64),
            "shop": w["shop"][items].astype(np.int64),
            "price": w["price"][items],
            "click": click,
            "conversion": conversion,
            "true_ctr": true_ctr.astype(np.float32),
            "true_cvr": true_cvr.astype(np.float32),
        }
    )
    return df, theta


def write_simulated(cfg: SimConfig, path: str | Path, part_rows: int | None = None, *, progress: bool = False, overwrite: bool = False) -> Path:
    """Simulate and write Parquet atomically. Returns the path.

    With ``part_rows`` (and more rows than that), ``path`` is a directory of
    ``part-00000.parquet`` … files from :func:`simulate_parts`, written one at a time, each with
    row groups of 256k rows, so memory stays bounded by one part; ``progress`` shows a bar over
    the parts (stderr). The parts go to a staging directory renamed into place at the end
    (:func:`mtrank.io_utils.write_parts_dir`), so an interrupted run leaves no partial data set.

    Raises:
        ConfigError: ``path`` exists and is not empty, unless ``overwrite`` (replaced whole).
    """
    path = Path(path)
    refuse_nonempty(path, overwrite)
    if part_rows is None or cfg.rows <= part_rows:
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; give a .parquet file name, or --part-rows to write parts")
        return atomic_write_parquet(simulate(cfg), path)
    from tqdm.auto import tqdm

    parts = tqdm(simulate_parts(cfg, part_rows), total=-(-max(1, cfg.rows // cfg.slate_size) // max(1, part_rows // cfg.slate_size)), desc="simulating", unit="part", disable=not progress, leave=False)
    return write_parts_dir(parts, path, row_group_size=262_144)
