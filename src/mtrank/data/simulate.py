"""A synthetic mall whose click and conversion probabilities are known exactly.

Generative model (all draws from seeded ``numpy.random.Generator`` s; vectorised):

* **Items** i: category c(i) (Zipf-like), brand b(i), shop s(i);
  price: ``log price = μ_c + 0.5·ε``;
  *appeal* ``A_i = 0.6·α_c + 0.5·α_b + 0.8·e_i`` drives CTR;
  *quality* ``Q_i`` drives CVR. Preset ``default``: ``Q_i = 0.3·α_b + 0.4·κ_b + 0.5·κ_s +
  0.3·e_i + 0.7·ε_i`` (appeal and quality correlate ≈ 0.3). With ``sharing = ρ`` set:
  ``Q_i = sd(Q)·(ρ·Â_i + √(1−ρ²)·Ô_i)``, Â and Ô the standardised appeal and own quality
  (``0.4·κ_b + 0.5·κ_s + 0.7·ε_i``), so ρ is how much click and conversion drivers share.
  Item popularity (how often an item is a candidate) is Zipf with exponent ``item_zipf``: a
  long tail of items is rarely or never shown.
* **Users** u: age bucket, gender, purchase power ``w_u ∈ {1..5}``, activity ``a_u``, and a taste
  vector ``t_u ∈ R^4``; each category has a vector ``v_c``; affinity ``f(u,c) = t_u·v_c / 2``.
* **Requests** r: a user (activity-weighted), a day and hour, and ``slate_size`` candidate items
  (popularity-weighted). The logged ranker orders them by appeal plus noise into positions 1..S.
* **Impressions**: a latent purchase *intent* ``z ~ N(0,1)`` per impression, never observed,
  raises both clicking and buying (the source of sample selection bias), with a strength
  ``λ(x)`` that depends on observed features when ``selection = s > 0``:

      λ(x) = intent · 2σ(s·h(x)),   h(x) = (η_c + 0.8·p̂_i) / √2 + 0.3·ŵ_u

  (``η_c ~ N(0,1)`` per category, ``p̂_i`` the standardised log price, ``ŵ_u`` the centred
  purchase power: category, price band and user segment), and

      logit CTR = θ_ctr + A_i + 0.8·f(u,c) + a_u − π·log(position) + λ(x)·z
      logit CVR = θ_cvr + Q_i + 0.5·f(u,c) − (0.9 − 0.15·w_u)·(log price − m) + λ(x)·z

  with π = ``position_effect`` (0.35). A click selects impressions with high z, and how much
  depends on λ(x), so the CVR of clicked impressions ranks items differently from the CVR
  they would have if clicked at random (s > 0 makes selection *reorder*, not only shift).
  ``θ_ctr`` and ``θ_cvr`` are solved by bisection so that the mean CTR and the mean CVR *given
  click* match the targets (Ali-CCP has CTR ≈ 4 %, CVR given click ≈ 0.5 %).
  click ~ Bernoulli(CTR); conversion ~ Bernoulli(CVR) if clicked, else 0.

Ground truth (passthrough columns, never features), exact given the observed row x, by
Gauss–Hermite quadrature over z (:func:`truth_columns`; 48 nodes, error < 1e-6 here):

* ``true_ctr`` = p(click | x) = E_z[σ(a + λz)];
* ``true_cvr_do`` = p(conv | do(click), x) = E_z[σ(b + λz)] (the counterfactual CVR, the target of
  ESCM², Wang et al. SIGIR 2022, §3; DCMT);
* ``true_ctcvr`` = p(click ∧ conv | x) = E_z[σ(a + λz)·σ(b + λz)];
* ``true_cvr_clicked`` = p(conv | click, x) = true_ctcvr / true_ctr (what ESMM's pCVR and BASE
  estimate, Ma et al. SIGIR 2018, eq. 1).

**Three stages** (``stages = 3``): impression → click → cart/favourite → buy, the post-click
decomposition of ESM² (Wen et al., SIGIR 2020, §3.1: buy after a D-Action, the cart, or after an
O-Action, any other post-click behaviour). Given a click,

    logit P(cart | click) = θ_cart + C(x) + λ(x)·z,   C(x) = 0.5·Q_i + 0.6·f(u,c) + 0.7·k_i
                                                        + 0.3·(log price − m)
    logit P(buy | click, cart)    = θ_cvr + B(x) + κ + λ(x)·z
    logit P(buy | click, no cart) = θ_cvr + B(x) + λ(x)·z

with B(x) the CVR logit above (without θ_cvr), ``k_i ~ N(0, 1)`` an item's own cart appeal
(from its own stream), κ = ``cart_lift`` and the same intent z in every stage, so

    P(buy | click, x) = P(cart | click)·P(buy | cart) + (1 − P(cart | click))·P(buy | no cart)

as in ESM² (eq. for pCVR). θ_cart is solved so that the mean P(cart | click) is ``cart``, then
θ_cvr so that the mean P(buy | click) is ``cvr``. The click draws are those of the two-stage
log (same seed, same clicks); ``conversion`` (the buy) reuses the two-stage log's uniform draw,
and ``cart`` draws after it. Extra exact truth columns (:data:`CART_TRUTH_COLUMNS`,
:func:`funnel3_truth_columns`): ``true_cart`` = P(cart | click, x), ``true_cart_all`` =
P(click ∧ cart | x), ``true_buy_cart`` = P(buy | click ∧ cart, x), ``true_buy_nocart`` =
P(buy | click ∧ no cart, x); ``true_cvr_clicked`` and ``true_ctcvr`` keep their meaning (the buy
given click, and click ∧ buy), ``true_cvr_do`` = P(buy | do(click), x).

With ``history_len > 0`` every row also carries the user's behaviour histories
``hist_purchased``, ``hist_carted``, ``hist_favourited`` (lists of item ids, most recent first,
at most ``history_len``), drawn from the same process before the log starts (see
:func:`_histories`); they come from their own random stream, so turning them on or off leaves
every other column identical.

Presets (:data:`PRESETS`, :func:`preset_config`): ``default`` (the generator as it was, draw for
draw), ``aliccp-like`` (sparse: CTR 4 %, CVR given click 1 %, 60k items, selection that
reorders), ``dense`` and ``cart`` (three stages, click → cart → buy). The preset and
:data:`SIM_VERSION` are stored in the Parquet file's key-value metadata (``mtrank.simulator``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mtrank.data.funnel import FunnelStage
from mtrank.data.schema import Schema
from mtrank.errors import ConfigError
from mtrank.data.io import refuse_nonempty
from mtrank.io_utils import atomic_write_parquet, write_parts_dir

SIM_VERSION = 2
TRUTH_COLUMNS = ("true_ctr", "true_cvr_clicked", "true_cvr_do", "true_ctcvr")
CART_TRUTH_COLUMNS = ("true_cart", "true_cart_all", "true_buy_cart", "true_buy_nocart")
HISTORY_COLUMNS = ("hist_purchased", "hist_carted", "hist_favourited")
GH_NODES = 48


class SimConfig(BaseModel):
    """Simulator settings. ``rows`` = impressions (a multiple of ``slate_size`` is used).

    Knobs beyond the original generator (their defaults reproduce preset ``default``):
    ``selection`` (s ≥ 0: how much the intent's strength varies with category, price band and
    user segment), ``sharing`` (ρ ∈ [0, 1] or None for the default's fixed mix),
    ``item_zipf`` (popularity exponent), ``position_effect`` (π), ``history_len`` (0 = no
    history columns), ``stages`` (3 adds the cart stage), ``cart`` (mean P(cart | click)),
    ``cart_lift`` (κ). ``preset`` is recorded only (use :func:`preset_config` to apply one).
    """

    model_config = ConfigDict(extra="forbid")

    preset: str = "default"
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
    intent: float = Field(
        0.6, ge=0, le=3, description="λ, strength of the unobserved purchase intent"
    )
    selection: float = Field(
        0.0, ge=0, le=3, description="s, feature dependence of the intent's strength"
    )
    sharing: float | None = Field(
        None, ge=0, le=1, description="ρ, click/conversion driver sharing"
    )
    stages: int = Field(2, ge=2, le=3, description="2: click → buy; 3: click → cart → buy")
    cart: float = Field(0.2, gt=0, lt=1, description="target mean P(cart | click) (stages 3)")
    cart_lift: float = Field(
        2.5, ge=-5, le=5, description="κ, log-odds lift of a buy after a cart (stages 3)"
    )
    item_zipf: float = Field(0.7, ge=0, le=3)
    position_effect: float = Field(0.35, ge=0, le=5)
    history_len: int = Field(0, ge=0, le=100)
    seed: int = 0


# Named settings; every knob can still be overridden. ``default`` is the generator as it was.
PRESETS: dict[str, dict] = {
    "default": {},
    "aliccp-like": {
        "rows": 3_000_000,
        "n_users": 200_000,
        "n_items": 60_000,
        "n_categories": 100,
        "n_brands": 2_000,
        "n_shops": 4_000,
        "slate_size": 20,
        "ctr": 0.04,
        "cvr": 0.01,
        "intent": 1.0,
        "selection": 2.5,
        "sharing": 0.3,
        "item_zipf": 1.05,
        "history_len": 10,
    },
    "dense": {
        "rows": 1_000_000,
        "n_users": 20_000,
        "n_items": 5_000,
        "slate_size": 20,
        "ctr": 0.04,
        "cvr": 0.10,
        "intent": 1.0,
        "selection": 2.5,
        "sharing": 0.3,
        "history_len": 10,
    },
    # click → cart → buy (ESM²'s D-Action / O-Action): denser than aliccp-like so that a small
    # log still holds a few hundred buys per split
    "cart": {
        "rows": 300_000,
        "n_users": 20_000,
        "n_items": 10_000,
        "slate_size": 20,
        "ctr": 0.05,
        "cvr": 0.08,
        "stages": 3,
        "cart": 0.2,
        "cart_lift": 2.5,
        "intent": 1.0,
        "selection": 2.5,
        "sharing": 0.3,
    },
}


def preset_config(name: str = "default", **overrides) -> SimConfig:
    """The :class:`SimConfig` of preset ``name`` with ``overrides`` (None values ignored).

    Raises:
        ConfigError: unknown preset, or an override outside its range (names the option).
    """
    if name not in PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    values = {
        **PRESETS[name],
        **{k: v for k, v in overrides.items() if v is not None},
        "preset": name,
    }
    fields = SimConfig.model_fields
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown simulator option {key!r}")
        for meta in fields[key].metadata:
            for attr, ok in (
                ("ge", lambda v, b: v >= b),
                ("gt", lambda v, b: v > b),
                ("le", lambda v, b: v <= b),
                ("lt", lambda v, b: v < b),
            ):
                bound = getattr(meta, attr, None)
                if bound is not None and value is not None and not ok(value, bound):
                    sign = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}[attr]
                    raise ConfigError(
                        f"--{key.replace('_', '-')} must be {sign} {bound}, got {value}"
                    )
    return SimConfig(**values)


def sim_metadata(cfg: SimConfig) -> dict[str, str]:
    """The Parquet key-value metadata that records how a file was simulated."""
    return {
        "mtrank.simulator": json.dumps(
            {"version": SIM_VERSION, **cfg.model_dump(mode="json")}, sort_keys=True
        )
    }


SIMULATED_SCHEMA = Schema(
    name="simulated",
    click="click",
    conversion="conversion",
    price="price",
    user_id="user_id",
    item_id="item_id",
    request_id="request_id",
    time="day",
    categorical=[
        "user_id",
        "user_age",
        "user_gender",
        "user_power",
        "item_id",
        "category",
        "brand",
        "shop",
        "hour",
    ],
    numerical=["price"],
    passthrough=[*TRUTH_COLUMNS, "position"],
)
# The three-stage log (``stages = 3``): ESM²'s post-click branch, the buy after the click with
# or without a cart (configs/simulated-cart.schema.yaml is the same schema as a file).
SIMULATED_CART_SCHEMA = Schema(
    **{
        **SIMULATED_SCHEMA.model_dump(exclude={"click", "conversion", "funnel"}),
        "name": "simulated-cart",
        "funnel": [
            FunnelStage(stage="click", label="click"),
            FunnelStage(stage="cart", label="cart"),
            FunnelStage(stage="buy", label="conversion", after="click"),
        ],
        "passthrough": [*TRUTH_COLUMNS, *CART_TRUTH_COLUMNS, "position"],
    }
)


def simulated_schema(cfg: SimConfig | None) -> Schema:
    """The schema of a simulated log: :data:`SIMULATED_CART_SCHEMA` for three stages, else
    :data:`SIMULATED_SCHEMA`."""
    return SIMULATED_CART_SCHEMA if cfg is not None and cfg.stages == 3 else SIMULATED_SCHEMA


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _bisect(prob, target: float, weight: np.ndarray | None = None) -> float:
    """θ such that the (weighted) mean of ``prob(θ)`` ``[N]`` equals ``target`` (``prob``
    increasing in θ; 60 bisection steps on [−30, 30])."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        p = prob(mid)
        mean = p.mean() if weight is None else (p * weight).sum() / weight.sum()
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return 0.5 * (lo + hi)


def _solve_intercept(logit: np.ndarray, target: float, weight: np.ndarray | None = None) -> float:
    """θ such that the (weighted) mean of σ(logit + θ) equals ``target`` (bisection, monotone)."""
    return _bisect(lambda t: _sigmoid(logit + t), target, weight)


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


def truth_columns(
    a: np.ndarray, b: np.ndarray, lam: np.ndarray, chunk: int = 65_536, nodes: int = GH_NODES
) -> dict[str, np.ndarray]:
    """Exact p(click | x), p(conv | click, x), p(conv | do(click), x), p(click ∧ conv | x).

    Args:
        a, b: ``[N]`` CTR and CVR logits without the intent term (intercepts included).
        lam: ``[N]`` intent strength λ(x) (or a scalar).

    Returns:
        ``true_ctr``, ``true_cvr_clicked``, ``true_cvr_do``, ``true_ctcvr``, each ``[N]`` float64:
        expectations over z ~ N(0, 1) by Gauss–Hermite quadrature (``nodes`` nodes, in
        chunks of ``chunk`` rows so memory stays bounded).
    """
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / math.sqrt(2.0 * math.pi)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lam = np.broadcast_to(np.asarray(lam, np.float64), a.shape)
    out = {k: np.empty(a.size) for k in ("true_ctr", "true_cvr_do", "true_ctcvr")}
    for s in range(0, a.size, chunk):
        sl = slice(s, s + chunk)
        shift = lam[sl, None] * x[None, :]
        pc = _sigmoid(a[sl, None] + shift)
        pv = _sigmoid(b[sl, None] + shift)
        out["true_ctr"][sl] = pc @ w
        out["true_cvr_do"][sl] = pv @ w
        out["true_ctcvr"][sl] = (pc * pv) @ w
    out["true_cvr_clicked"] = out["true_ctcvr"] / np.maximum(out["true_ctr"], 1e-300)
    return {k: out[k] for k in TRUTH_COLUMNS}


def funnel3_truth_columns(
    a: np.ndarray,
    c: np.ndarray,
    b: np.ndarray,
    lam: np.ndarray,
    lift: float,
    chunk: int = 65_536,
    nodes: int = GH_NODES,
) -> dict[str, np.ndarray]:
    """Exact truths of the click → cart → buy funnel (see the module docstring), given x.

    With σ_a = σ(a + λz), σ_c = σ(c + λz), σ₁ = σ(b + κ + λz), σ₀ = σ(b + λz) and z ~ N(0, 1):
    ``true_ctr`` = E σ_a; ``true_cart_all`` = E σ_aσ_c; ``true_ctcvr`` = E σ_a(σ_cσ₁ + (1−σ_c)σ₀);
    ``true_cvr_do`` = E (σ_cσ₁ + (1−σ_c)σ₀); ``true_cart`` = true_cart_all / true_ctr;
    ``true_buy_cart`` = E σ_aσ_cσ₁ / E σ_aσ_c; ``true_buy_nocart`` = E σ_a(1−σ_c)σ₀ /
    E σ_a(1−σ_c); ``true_cvr_clicked`` = true_ctcvr / true_ctr. So true_cvr_clicked =
    true_cart·true_buy_cart + (1 − true_cart)·true_buy_nocart exactly (ESM²'s pCVR).

    Args:
        a, c, b: ``[N]`` click, cart and buy logits without the intent term (intercepts
            included; ``b`` without the lift). lam: ``[N]`` λ(x) or a scalar. lift: κ.

    Returns:
        :data:`TRUTH_COLUMNS` and :data:`CART_TRUTH_COLUMNS`, each ``[N]`` float64 (Gauss–Hermite
        quadrature with ``nodes`` nodes, in chunks of ``chunk`` rows: bounded memory).
    """
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / math.sqrt(2.0 * math.pi)
    a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
    lam = np.broadcast_to(np.asarray(lam, np.float64), a.shape)
    keys = ("ctr", "cart_all", "cart_buy", "nocart_buy", "do")
    e = {k: np.empty(a.size) for k in keys}
    for s in range(0, a.size, chunk):
        sl = slice(s, s + chunk)
        shift = lam[sl, None] * x[None, :]
        pa, pc = _sigmoid(a[sl, None] + shift), _sigmoid(c[sl, None] + shift)
        p1, p0 = _sigmoid(b[sl, None] + lift + shift), _sigmoid(b[sl, None] + shift)
        e["ctr"][sl] = pa @ w
        e["cart_all"][sl] = (pa * pc) @ w
        e["cart_buy"][sl] = (pa * pc * p1) @ w
        e["nocart_buy"][sl] = (pa * (1.0 - pc) * p0) @ w
        e["do"][sl] = (pc * p1 + (1.0 - pc) * p0) @ w
    tiny = 1e-300
    ctcvr = e["cart_buy"] + e["nocart_buy"]
    return {
        "true_ctr": e["ctr"],
        "true_cvr_clicked": ctcvr / np.maximum(e["ctr"], tiny),
        "true_cvr_do": e["do"],
        "true_ctcvr": ctcvr,
        "true_cart": e["cart_all"] / np.maximum(e["ctr"], tiny),
        "true_cart_all": e["cart_all"],
        "true_buy_cart": e["cart_buy"] / np.maximum(e["cart_all"], tiny),
        "true_buy_nocart": e["nocart_buy"] / np.maximum(e["ctr"] - e["cart_all"], tiny),
    }


def simulate(cfg: SimConfig) -> pl.DataFrame:
    """Generate the impression log. Deterministic for a given config (seed included).

    Returns:
        A DataFrame with columns ``request_id, day, hour, position, user_id, user_age,
        user_gender, user_power, item_id, category, brand, shop, price, click, conversion,
        true_ctr, true_cvr_clicked, true_cvr_do, true_ctcvr`` (ids int64; price in currency
        units, > 0; truths float64) and, with ``history_len > 0``, the three history list columns.
        With ``stages = 3`` also ``cart`` (int8, after ``click``) and :data:`CART_TRUTH_COLUMNS`.
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
    """Items and users (see the module docstring). The draws from ``rng`` are those of the
    original generator, in the same order; what was added draws from its own stream."""
    cat = rng.choice(
        cfg.n_categories, size=cfg.n_items, p=_zipf_weights(cfg.n_categories, 0.8, rng)
    )
    brand = rng.integers(0, cfg.n_brands, cfg.n_items)
    shop = rng.integers(0, cfg.n_shops, cfg.n_items)
    cat_price = rng.normal(math.log(60.0), 0.8, cfg.n_categories)
    log_price = cat_price[cat] + 0.5 * rng.standard_normal(cfg.n_items)
    price = np.round(np.exp(log_price), 2).clip(0.5, None)
    brand_appeal = rng.standard_normal(cfg.n_brands)
    item_appeal = rng.standard_normal(cfg.n_items)
    appeal = (
        0.6 * rng.standard_normal(cfg.n_categories)[cat]
        + 0.5 * brand_appeal[brand]
        + 0.8 * item_appeal
    )
    brand_q, shop_q, item_q = (
        rng.standard_normal(cfg.n_brands)[brand],
        rng.standard_normal(cfg.n_shops)[shop],
        rng.standard_normal(cfg.n_items),
    )
    quality = (
        0.3 * brand_appeal[brand] + 0.4 * brand_q + 0.5 * shop_q + 0.3 * item_appeal + 0.7 * item_q
    )
    if cfg.sharing is not None:
        rho = cfg.sharing
        std = lambda v: (v - v.mean()) / max(v.std(), 1e-12)
        own = 0.4 * brand_q + 0.5 * shop_q + 0.7 * item_q
        quality = quality.std() * (rho * std(appeal) + math.sqrt(1.0 - rho * rho) * std(own))
    item_pop = _zipf_weights(cfg.n_items, cfg.item_zipf, rng)
    w = {
        "cat": cat,
        "brand": brand,
        "shop": shop,
        "log_price": log_price,
        "price": price,
        "appeal": appeal,
        "quality": quality,
        "item_pop": item_pop,
    }
    w["age"] = rng.integers(0, 7, cfg.n_users)
    w["gender"] = rng.integers(0, 2, cfg.n_users)
    w["power"] = rng.integers(1, 6, cfg.n_users)
    w["activity"] = 0.5 * rng.standard_normal(cfg.n_users)
    w["taste"] = rng.standard_normal((cfg.n_users, 4))
    w["cat_vec"] = rng.standard_normal((cfg.n_categories, 4))
    w["user_pop"] = _zipf_weights(cfg.n_users, 0.6, rng)
    # selection: the intent's strength by category, price band and user segment (own stream)
    srng = np.random.default_rng([cfg.seed, 7919])
    eta = srng.standard_normal(cfg.n_categories)
    price_z = (log_price - log_price.mean()) / max(log_price.std(), 1e-12)
    w["sel_item"] = (eta[cat] + 0.8 * price_z) / math.sqrt(2.0)
    w["sel_user"] = 0.3 * (w["power"] - 3.0) / math.sqrt(2.0)
    if cfg.stages == 3:  # each item's own cart appeal k_i (own stream: nothing else moves)
        w["cart_item"] = np.random.default_rng([cfg.seed, 15_485_863]).standard_normal(cfg.n_items)
    return w


def _intent_strength(
    cfg: SimConfig, w: dict[str, np.ndarray], items: np.ndarray, user: np.ndarray
) -> np.ndarray | float:
    """λ(x) per impression (a scalar when ``selection`` is 0, so the default draws are
    unchanged)."""
    if cfg.selection == 0:
        return cfg.intent
    h = w["sel_item"][items] + w["sel_user"][user]
    return cfg.intent * 2.0 * _sigmoid(cfg.selection * h)


def _logits(
    cfg: SimConfig,
    w: dict[str, np.ndarray],
    items: np.ndarray,
    user: np.ndarray,
    position: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """CTR and CVR logits without intercepts and without the intent term."""
    c = w["cat"][items]
    affinity = (w["taste"][user] * w["cat_vec"][c]).sum(1) / 2.0
    ctr = (
        w["appeal"][items]
        + 0.8 * affinity
        + w["activity"][user]
        - cfg.position_effect * np.log(position)
    )
    sens = 0.9 - 0.15 * w["power"][user]
    cvr = w["quality"][items] + 0.5 * affinity - sens * (w["log_price"][items] - math.log(60.0))
    return ctr, cvr


def _cart_logit(w: dict[str, np.ndarray], items: np.ndarray, user: np.ndarray) -> np.ndarray:
    """C(x), the cart logit given click without intercept and intent (module docstring)."""
    affinity = (w["taste"][user] * w["cat_vec"][w["cat"][items]]).sum(1) / 2.0
    return (
        0.5 * w["quality"][items]
        + 0.6 * affinity
        + 0.7 * w["cart_item"][items]
        + 0.3 * (w["log_price"][items] - math.log(60.0))
    )


def _cart_and_buy(
    cfg: SimConfig,
    w: dict[str, np.ndarray],
    rng: np.random.Generator,
    items: np.ndarray,
    user: np.ndarray,
    ctr_base: np.ndarray,
    cvr_base: np.ndarray,
    lam: np.ndarray | float,
    z: np.ndarray,
    theta: tuple[float, ...] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], tuple[float, ...]]:
    """Click, cart and buy draws of the three-stage log, its truths and its intercepts
    (θ_ctr, θ_cvr, θ_cart).

    ``ctr_base``, ``cvr_base`` ``[N]``: logits without intercepts and intent; ``z`` ``[N]`` the
    intent. Draws, in this order: click, the buy's uniform, the cart's uniform (the first two
    are the draws the two-stage log makes for click and conversion)."""
    shift = lam * z
    cart_base = _cart_logit(w, items, user)
    if theta is None:
        t_ctr = _solve_intercept(ctr_base + shift, cfg.ctr)
        p_click = _sigmoid(ctr_base + shift + t_ctr)
        t_cart = _solve_intercept(cart_base + shift, cfg.cart, weight=p_click)
        pk = _sigmoid(cart_base + shift + t_cart)
        b = cvr_base + shift
        t_cvr = _bisect(
            lambda t: pk * _sigmoid(b + t + cfg.cart_lift) + (1.0 - pk) * _sigmoid(b + t),
            cfg.cvr,
            weight=p_click,
        )
        theta = (t_ctr, t_cvr, t_cart)
    t_ctr, t_cvr, t_cart = theta
    n = items.size
    click = rng.random(n) < _sigmoid(ctr_base + shift + t_ctr)
    u_buy = rng.random(n)
    cart = click & (rng.random(n) < _sigmoid(cart_base + shift + t_cart))
    buy = click & (u_buy < _sigmoid(cvr_base + shift + t_cvr + cfg.cart_lift * cart))
    labels = {
        "click": click.astype(np.int8),
        "cart": cart.astype(np.int8),
        "conversion": buy.astype(np.int8),
    }
    truth = funnel3_truth_columns(
        ctr_base + t_ctr, cart_base + t_cart, cvr_base + t_cvr, lam, cfg.cart_lift
    )
    return labels, truth, theta


def _impressions(
    cfg: SimConfig,
    w: dict[str, np.ndarray],
    rng: np.random.Generator,
    n_req: int,
    req_offset: int,
    day: np.ndarray | None,
    theta: tuple[float, ...] | None = None,
) -> tuple[pl.DataFrame, tuple[float, ...]]:
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
    z = rng.standard_normal(items.size)
    ctr_base, cvr_base = _logits(cfg, w, items, user, position)
    lam = _intent_strength(cfg, w, items, user)
    if cfg.stages == 3:
        labels, truth, theta = _cart_and_buy(
            cfg, w, rng, items, user, ctr_base, cvr_base, lam, z, theta
        )
    else:
        ctr_logit = ctr_base + lam * z
        cvr_logit = cvr_base + lam * z
        if theta is None:
            t_ctr = _solve_intercept(ctr_logit, cfg.ctr)
            t_cvr = _solve_intercept(cvr_logit, cfg.cvr, weight=_sigmoid(ctr_logit + t_ctr))
            theta = (t_ctr, t_cvr)
        click = (rng.random(items.size) < _sigmoid(ctr_logit + theta[0])).astype(np.int8)
        conversion = (
            click.astype(bool) & (rng.random(items.size) < _sigmoid(cvr_logit + theta[1]))
        ).astype(np.int8)
        truth = truth_columns(ctr_base + theta[0], cvr_base + theta[1], lam)
        labels = {"click": click, "conversion": conversion}
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
            "category": w["cat"][items].astype(np.int64),
            "brand": w["brand"][items].astype(np.int64),
            "shop": w["shop"][items].astype(np.int64),
            "price": w["price"][items],
            **labels,
            **truth,
        }
    )
    if cfg.history_len:
        df = df.join(_histories(cfg, w, theta), on="user_id", how="left", maintain_order="left")
        df = df.with_columns(
            pl.col(c).fill_null(pl.lit([], dtype=pl.List(pl.Int64))) for c in HISTORY_COLUMNS
        )
    return df, theta


HISTORY_CANDIDATES = 32


def _histories(
    cfg: SimConfig, w: dict[str, np.ndarray], theta: tuple[float, float]
) -> pl.DataFrame:
    """Each user's behaviour before the log: the last ``history_len`` purchased, carted and
    favourited item ids, most recent first (``user_id`` plus the three list columns).

    The same process as the log: every user sees ``HISTORY_CANDIDATES`` popularity-drawn items
    (at position 1), each with its p(click | x) and p(click ∧ conv | x) (to the probit
    approximation over the intent, which is plenty for sampling weights).
    Purchases are drawn without replacement with probability ∝ p(click ∧ conv), carts ∝
    p(click ∧ conv) + 0.3·p(click), favourites ∝ p(click) (Gumbel top-k, whose draw order is
    the recency); a user keeps Poisson(mean) of each, the mean growing with activity. Own seeded
    stream, processed in blocks of users (bounded memory).
    """
    hrng = np.random.default_rng([cfg.seed, 104_729])
    n, m, k = cfg.n_users, HISTORY_CANDIDATES, cfg.history_len
    users_out: dict[str, list[np.ndarray]] = {c: [] for c in HISTORY_COLUMNS}
    items_out: dict[str, list[np.ndarray]] = {c: [] for c in HISTORY_COLUMNS}
    for start in range(0, n, 16_384):
        users = np.arange(start, min(n, start + 16_384))
        items = hrng.choice(cfg.n_items, size=(users.size, m), p=w["item_pop"])
        urep = np.repeat(users, m)
        a, b = _logits(cfg, w, items.ravel(), urep, np.ones(urep.size))
        # sampling weights only: the probit approximation E_z σ(a + λz) ≈ σ(a / √(1 + πλ²/8))
        kappa = np.sqrt(
            1.0 + np.pi * np.asarray(_intent_strength(cfg, w, items.ravel(), urep)) ** 2 / 8.0
        )
        ctr = _sigmoid((a + theta[0]) / kappa).reshape(users.size, m)
        ctcvr = ctr * _sigmoid((b + theta[1]) / kappa).reshape(users.size, m)
        weights = {
            "hist_purchased": ctcvr,
            "hist_carted": ctcvr + 0.3 * ctr,
            "hist_favourited": ctr,
        }
        mean_len = k * _sigmoid(2.0 * w["activity"][users])
        for col, wt in weights.items():
            keys = np.log(np.maximum(wt, 1e-300)) + hrng.gumbel(size=wt.shape)
            top = np.argsort(-keys, axis=1, kind="stable")[:, :k]
            keep = np.arange(top.shape[1])[None, :] < np.minimum(hrng.poisson(mean_len), k)[:, None]
            users_out[col].append(np.broadcast_to(users[:, None], top.shape)[keep])
            items_out[col].append(np.take_along_axis(items, top, axis=1)[keep])
    out = pl.DataFrame({"user_id": np.arange(n, dtype=np.int64)})
    for col in HISTORY_COLUMNS:
        long = pl.DataFrame(
            {
                "user_id": np.concatenate(users_out[col]).astype(np.int64),
                col: np.concatenate(items_out[col]).astype(np.int64),
            }
        )
        out = out.join(
            long.group_by("user_id", maintain_order=True).agg(pl.col(col)),
            on="user_id",
            how="left",
            maintain_order="left",
        )
    return out


def write_simulated(
    cfg: SimConfig,
    path: str | Path,
    part_rows: int | None = None,
    *,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Simulate and write Parquet atomically (the config in the file's metadata). Returns the path.

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
    meta = sim_metadata(cfg)
    if part_rows is None or cfg.rows <= part_rows:
        if path.is_dir():
            raise ConfigError(
                f"{path} is a directory; give a .parquet file name, or --part-rows to write parts"
            )
        return atomic_write_parquet(simulate(cfg), path, metadata=meta)
    from tqdm.auto import tqdm

    parts = tqdm(
        simulate_parts(cfg, part_rows),
        total=-(-max(1, cfg.rows // cfg.slate_size) // max(1, part_rows // cfg.slate_size)),
        desc="simulating",
        unit="part",
        disable=not progress,
        leave=False,
    )
    return write_parts_dir(parts, path, row_group_size=262_144, metadata=meta)


def read_sim_metadata(path: str | Path) -> dict | None:
    """The simulator settings stored in a Parquet file by :func:`write_simulated` (None if
    absent)."""
    import pyarrow.parquet as pq

    kv = pq.ParquetFile(path).metadata.metadata or {}
    raw = kv.get(b"mtrank.simulator")
    return None if raw is None else json.loads(raw)
