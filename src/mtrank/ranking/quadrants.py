"""Four-quadrant analysis: entities (items, shops, segments …) placed by CTR × CVR.

Per entity (one or several grouping columns combined): impressions, clicks, conversions, GMV
(Σ value of converted rows), empirical CTR = clicks / impressions and CVR = conversions / clicks,
both smoothed with a Beta prior so that an entity with 3 impressions is not an outlier
(:class:`BetaPrior`), and the mean predicted pCTR / pCVR when predictions are given.

Each axis is split at a threshold (by default the exposure-weighted mean of the smoothed rate:
impressions weight CTR, clicks weight CVR; or the median over entities); an entity strictly
above it is "high" (so entities with no evidence, smoothed to exactly the prior mean, are not
called "high" when the prior is degenerate):

* I   high CTR, high CVR (stars)          * II  low CTR, high CVR (under-valued: under-exposed)
* III low CTR, low CVR                    * IV  high CTR, low CVR (click bait)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mtrank.errors import ConfigError, DataError

QUADRANTS = ("I", "II", "III", "IV")
QUADRANT_NAMES = {
    "I": "high CTR / high CVR",
    "II": "low CTR / high CVR (under-valued)",
    "III": "low CTR / low CVR",
    "IV": "high CTR / low CVR",
}
COLOURS = {"I": "tab:green", "II": "tab:blue", "III": "tab:grey", "IV": "tab:orange"}


@dataclass(frozen=True)
class BetaPrior:
    """Beta(α, β) prior of a rate, fitted by the method of moments (:meth:`fit`).

    The smoothed rate of an entity with s successes in n trials is the posterior mean
    ``(s + α) / (n + α + β)``: it shrinks small entities to the prior mean ``α / (α + β)``
    and leaves large ones near ``s / n``.
    """

    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        """The prior mean rate α / (α + β)."""
        return self.alpha / (self.alpha + self.beta)

    @classmethod
    def fit(cls, successes, trials, *, max_strength: float = 1e6) -> BetaPrior:
        """Method-of-moments fit over entities with trials > 0.

        With raw rates r_i = s_i / n_i over E entities (trial-weighted moments, so that
        entities with one or two trials do not dominate the spread):

        * m  = Σ s_i / Σ n_i (pooled mean),
        * s² = Σ n_i (r_i − m)² / Σ n_i  (trial-weighted spread of the raw rates),
        * v  = s² − m(1 − m)·E / Σ n_i  (minus the binomial sampling part: under a common rate
          m each term n_i (r_i − m)² has expectation m(1 − m)); v estimates the variance of the
          *true* rates (Wang et al. 2011, "Click-through rate estimation for rare events in
          online advertising", §3; and Kleinman 1973, JASA 68:46, for the weighted moments),
        * κ = α + β = m(1 − m)/v − 1 (from Var Beta = m(1 − m)/(κ + 1)), α = κ·m, β = κ·(1 − m).

        When v ≤ 0 (no spread beyond sampling noise) κ = ``max_strength``: every entity gets
        the pooled mean. κ is clipped to [1e-3, max_strength].

        Args:
            successes, trials: ``[E]`` counts per entity (successes ≤ trials).

        Raises:
            DataError: no entity has a trial, or a count is negative or successes > trials.
        """
        s = np.asarray(successes, dtype=np.float64).ravel()
        n = np.asarray(trials, dtype=np.float64).ravel()
        if (s < 0).any() or (n < 0).any() or (s > n).any():
            raise DataError("Beta prior: counts must satisfy 0 ≤ successes ≤ trials")
        keep = n > 0
        if not keep.any():
            raise DataError("Beta prior: no entity has any trial (impression or click)")
        s, n = s[keep], n[keep]
        m = s.sum() / n.sum()
        if m <= 0 or m >= 1:
            # All failures or all successes: a weak prior at the pooled mean, nudged inside (0, 1).
            m = min(max(m, 1e-6), 1 - 1e-6)
            return cls(m * 1.0, (1 - m) * 1.0)
        spread = float((n * (s / n - m) ** 2).sum() / n.sum())
        noise = m * (1 - m) * s.size / n.sum()
        v = spread - noise
        kappa = (
            max_strength if v <= 0 else float(np.clip(m * (1 - m) / v - 1.0, 1e-3, max_strength))
        )
        return cls(kappa * m, kappa * (1 - m))

    def smooth(self, successes, trials) -> np.ndarray:
        """Posterior-mean rates ``[E]``."""
        s = np.asarray(successes, dtype=np.float64)
        n = np.asarray(trials, dtype=np.float64)
        return (s + self.alpha) / (n + self.alpha + self.beta)


def entity_stats(
    df: pl.DataFrame,
    by: list[str],
    *,
    click: str,
    conversion: str,
    value: str | None = None,
    price: str | None = None,
    mean_of: list[str] | None = None,
    p_ctr: str | None = None,
    p_cvr: str | None = None,
) -> tuple[pl.DataFrame, dict[str, BetaPrior]]:
    """One row per entity (the distinct values of the ``by`` columns combined).

    Args:
        df: impression-level table with 0/1 ``click`` and ``conversion`` columns.
        by: grouping column(s). value: GMV of a converted row (price/amount), or None (GMV n/a).
        price: column whose impression mean is ``mean_price`` (None: n/a).
        mean_of: further numeric columns to average per entity (``mean_<col>``).
        p_ctr, p_cvr: prediction columns to average per entity.

    Returns:
        (stats, priors): stats has ``by…, impressions, clicks, conversions, gmv, ctr_raw,
        cvr_raw, ctr, cvr`` (smoothed), ``mean_price``, ``mean_<col>``, ``p_ctr``, ``p_cvr``;
        sorted by impressions descending then by the ``by`` columns; priors maps ``ctr`` /
        ``cvr`` to the fitted :class:`BetaPrior`.

    Raises:
        DataError: a named column is missing or not numeric.
    """
    if not by:
        raise ConfigError("give at least one entity column (--by)")
    mean_of = list(mean_of or [])
    needed = [*by, click, conversion, *(c for c in (value, price, p_ctr, p_cvr) if c), *mean_of]
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; the table has {df.columns}")
    for c in [c for c in (value, price, *mean_of) if c]:
        if not df.schema[c].is_numeric():
            raise DataError(f"column must be numeric, has type {df.schema[c]}", column=c)
    conv = pl.col(conversion).cast(pl.Float64)
    aggs = [
        pl.len().alias("impressions"),
        pl.col(click).cast(pl.Int64).sum().alias("clicks"),
        pl.col(conversion).cast(pl.Int64).sum().alias("conversions"),
        (conv * pl.col(value).cast(pl.Float64).fill_nan(None)).sum().alias("gmv")
        if value
        else pl.lit(None, pl.Float64).alias("gmv"),
        pl.col(price).cast(pl.Float64).fill_nan(None).mean().alias("mean_price")
        if price
        else pl.lit(None, pl.Float64).alias("mean_price"),
        *(pl.col(c).cast(pl.Float64).fill_nan(None).mean().alias(f"mean_{c}") for c in mean_of),
        *(pl.col(c).mean().alias(c) for c in (p_ctr, p_cvr) if c),
    ]
    stats = (
        df.group_by(by).agg(aggs).sort(["impressions", *by], descending=[True] + [False] * len(by))
    )
    imp, clk, cnv = (
        stats.get_column(c).to_numpy() for c in ("impressions", "clicks", "conversions")
    )
    priors = {"ctr": BetaPrior.fit(clk, imp), "cvr": BetaPrior.fit(cnv, clk)}
    with np.errstate(divide="ignore", invalid="ignore"):
        raw_cvr = np.where(clk > 0, cnv / np.maximum(clk, 1), np.nan)
    stats = stats.with_columns(
        pl.Series("ctr_raw", clk / imp),
        pl.Series("cvr_raw", raw_cvr).fill_nan(None),
        pl.Series("ctr", priors["ctr"].smooth(clk, imp)),
        pl.Series("cvr", priors["cvr"].smooth(cnv, clk)),
    )
    if p_ctr and p_ctr != "p_ctr":
        stats = stats.rename({p_ctr: "p_ctr"})
    if p_cvr and p_cvr != "p_cvr":
        stats = stats.rename({p_cvr: "p_cvr"})
    return stats, priors


def thresholds(stats: pl.DataFrame, method: str = "mean") -> dict[str, float]:
    """Axis thresholds ``{"ctr": t, "cvr": t}``.

    ``mean``: the exposure-weighted mean of the smoothed rate, each rate weighted by its own
    denominator: impressions for CTR, clicks for CVR (an entity never clicked carries no CVR
    evidence, so it does not pull the CVR line). ``median``: the median over entities.
    """
    if method == "mean":
        out = {}
        for rate, weight in (("ctr", "impressions"), ("cvr", "clicks")):
            w = stats.get_column(weight).to_numpy().astype(np.float64)
            w = w if w.sum() > 0 else np.ones_like(w)
            out[rate] = float(np.average(stats.get_column(rate).to_numpy(), weights=w))
        return out
    if method == "median":
        return {a: float(stats.get_column(a).median()) for a in ("ctr", "cvr")}
    raise ConfigError(f"threshold must be 'mean' or 'median', got {method!r}")


def assign_quadrants(stats: pl.DataFrame, cut: dict[str, float]) -> pl.DataFrame:
    """Add a ``quadrant`` column (I, II, III, IV); "high" means strictly above the threshold."""
    hi_ctr = pl.col("ctr") > cut["ctr"]
    hi_cvr = pl.col("cvr") > cut["cvr"]
    q = (
        pl.when(hi_ctr & hi_cvr)
        .then(pl.lit("I"))
        .when(~hi_ctr & hi_cvr)
        .then(pl.lit("II"))
        .when(~hi_ctr & ~hi_cvr)
        .then(pl.lit("III"))
        .otherwise(pl.lit("IV"))
    )
    return stats.with_columns(q.alias("quadrant"))


def quadrant_table(stats: pl.DataFrame, mean_of: list[str] | None = None) -> pl.DataFrame:
    """One row per quadrant (all four, empty ones with zeros): entities, impression / click /
    conversion / GMV shares, pooled CTR and CVR, impression-weighted mean price and
    ``mean_<col>``, mean pCTR / pCVR when present. GMV share is null when GMV is n/a."""
    mean_of = [f"mean_{c}" for c in (mean_of or [])]
    w = pl.col("impressions").cast(pl.Float64)
    tot = stats.select(pl.col("impressions", "clicks", "conversions", "gmv").sum()).row(
        0, named=True
    )
    has_gmv = stats.get_column("gmv").null_count() < stats.height
    wmean = lambda c: ((pl.col(c) * w).sum() / w.filter(pl.col(c).is_not_null()).sum()).alias(c)
    aggs = [
        pl.len().alias("entities"),
        pl.col("impressions").sum(),
        pl.col("clicks").sum(),
        pl.col("conversions").sum(),
        pl.col("gmv").sum() if has_gmv else pl.lit(None, pl.Float64).alias("gmv"),
        *(wmean(c) for c in ["mean_price", *mean_of, "p_ctr", "p_cvr"] if c in stats.columns),
    ]
    g = stats.group_by("quadrant").agg(aggs)
    base = pl.DataFrame(
        {"quadrant": list(QUADRANTS), "description": [QUADRANT_NAMES[q] for q in QUADRANTS]}
    )
    t = base.join(g, on="quadrant", how="left").with_columns(
        pl.col("entities", "impressions", "clicks", "conversions").fill_null(0)
    )
    share = lambda c: (pl.col(c) / tot[c] if tot[c] else pl.lit(None, pl.Float64)).alias(
        f"{c}_share"
    )
    t = t.with_columns(
        share("impressions"),
        share("clicks"),
        share("conversions"),
        (pl.col("gmv") / tot["gmv"]).alias("gmv_share")
        if has_gmv and tot["gmv"]
        else pl.lit(None, pl.Float64).alias("gmv_share"),
        pl.when(pl.col("impressions") > 0)
        .then(pl.col("clicks") / pl.col("impressions"))
        .alias("ctr"),
        pl.when(pl.col("clicks") > 0).then(pl.col("conversions") / pl.col("clicks")).alias("cvr"),
    )
    first = [
        "quadrant",
        "description",
        "entities",
        "impressions_share",
        "clicks_share",
        "conversions_share",
        "gmv_share",
        "ctr",
        "cvr",
    ]
    return t.select(first + [c for c in t.columns if c not in first])


def plot_quadrants(
    stats: pl.DataFrame, cut: dict[str, float], path: str | Path, title: str = ""
) -> Path:
    """Scatter of smoothed CTR (x) against smoothed CVR (y), log axes, the two threshold lines,
    point area ∝ impressions, colour by quadrant. Writes a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imp = stats.get_column("impressions").to_numpy().astype(float)
    size = 5 + 300 * imp / max(imp.max(), 1)
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=110)
    for q in QUADRANTS:
        sel = (stats.get_column("quadrant") == q).to_numpy()
        if sel.any():
            ax.scatter(
                stats.get_column("ctr").to_numpy()[sel],
                stats.get_column("cvr").to_numpy()[sel],
                s=size[sel],
                c=COLOURS[q],
                alpha=0.55,
                edgecolors="none",
                label=f"{q}: {QUADRANT_NAMES[q]} ({sel.sum()})",
            )
    ax.axvline(cut["ctr"], color="k", lw=0.8, ls="--")
    ax.axhline(cut["cvr"], color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("CTR (Beta-smoothed)")
    ax.set_ylabel("CVR given click (Beta-smoothed)")
    ax.set_title(title or "four-quadrant analysis (point size ∝ impressions)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "QUADRANTS",
    "BetaPrior",
    "assign_quadrants",
    "entity_stats",
    "plot_quadrants",
    "quadrant_table",
    "thresholds",
]


def near_constant_axes(stats: pl.DataFrame, *, rel: float = 0.01) -> list[str]:
    """A warning per axis (``ctr`` weighted by impressions, ``cvr`` by clicks, when present)
    whose raw rate hardly varies over the entities: its exposure-weighted standard
    deviation is below ``rel`` × min(mean, 1 − mean) (e.g. every row clicked: CTR = 1
    everywhere). Splitting such an axis into high and low says nothing."""
    out = []
    for rate, weight in (("ctr", "impressions"), ("cvr", "clicks")):
        if f"{rate}_raw" not in stats.columns or stats.height == 0:
            continue
        r = stats.get_column(f"{rate}_raw").cast(pl.Float64).fill_null(np.nan).to_numpy()
        w = stats.get_column(weight).to_numpy().astype(np.float64)
        keep = np.isfinite(r) & (w > 0)
        if not keep.any():
            continue
        r, w = r[keep], w[keep]
        mean = float(np.average(r, weights=w))
        sd = float(np.sqrt(np.average((r - mean) ** 2, weights=w)))
        room = min(mean, 1.0 - mean)
        if room <= 1e-6 or sd < rel * room:
            out.append(
                f"the {rate.upper()} axis is near-constant over the {stats.height:,} entities "
                f"(mean {mean:.4f}, sd {sd:.2e}): its high/low split says nothing"
            )
    return out


def ctr_axis_stats(
    df: pl.DataFrame, by: list[str], *, click: str, p_ctr: str | None = None
) -> tuple[pl.DataFrame, BetaPrior]:
    """CTR-only data (a one-stage funnel): per entity ``impressions, clicks, ctr_raw, ctr``
    (Beta-smoothed, as :func:`entity_stats`) and the mean ``p_ctr`` when given, and the prior.
    The CVR axis is absent: it needs a conversion stage.

    Raises:
        ConfigError: no entity column. DataError: a named column is missing.
    """
    if not by:
        raise ConfigError("give at least one entity column (--by)")
    missing = [c for c in dict.fromkeys([*by, click, *([p_ctr] if p_ctr else [])]) if c not in df]
    if missing:
        raise DataError(f"missing column(s) {missing}; the table has {df.columns}")
    aggs = [pl.len().alias("impressions"), pl.col(click).cast(pl.Int64).sum().alias("clicks")]
    if p_ctr:
        aggs.append(pl.col(p_ctr).mean().alias("p_ctr"))
    stats = (
        df.group_by(by).agg(aggs).sort(["impressions", *by], descending=[True] + [False] * len(by))
    )
    imp, clk = (stats.get_column(c).to_numpy() for c in ("impressions", "clicks"))
    prior = BetaPrior.fit(clk, imp)
    return stats.with_columns(
        pl.Series("ctr_raw", clk / imp), pl.Series("ctr", prior.smooth(clk, imp))
    ), prior
