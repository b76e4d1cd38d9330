"""The simulator: presets, exact ground truth against Monte Carlo, selection that reorders."""

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr

from mtrank.data.simulate import (
    CART_TRUTH_COLUMNS,
    HISTORY_COLUMNS,
    PRESETS,
    SIM_VERSION,
    TRUTH_COLUMNS,
    SimConfig,
    funnel3_truth_columns,
    preset_config,
    read_sim_metadata,
    simulate,
    truth_columns,
    write_simulated,
)
from mtrank.errors import ConfigError

SMALL = {"n_users": 3_000, "n_items": 2_000, "n_categories": 40, "n_brands": 200, "n_shops": 400}


def test_default_preset_reproduces_the_original_generator():
    # checksums of the generator before presets existed (git a7372d7), same config
    df = simulate(preset_config("default", rows=20_000, n_users=1000, n_items=300, seed=3))
    assert df["click"].sum() == 742 and df["conversion"].sum() == 74
    assert int((df["item_id"] * df["click"]).sum()) == 135913
    assert int((df["user_id"] * df["conversion"]).sum()) == 36177
    assert round(float(df["price"].sum()), 2) == 1719977.18
    assert set(TRUTH_COLUMNS) <= set(df.columns) and "true_cvr" not in df.columns


def test_truth_columns_match_monte_carlo_over_the_intent():
    rng = np.random.default_rng(0)
    n, draws = 2_000, 20_000
    a, b, lam = rng.normal(-3.0, 1.0, n), rng.normal(-4.0, 1.0, n), rng.uniform(0.0, 2.0, n)
    t = truth_columns(a, b, lam)
    z = rng.standard_normal((n, draws))
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    pc, pv = sig(a[:, None] + lam[:, None] * z), sig(b[:, None] + lam[:, None] * z)
    mc = {"true_ctr": pc.mean(1), "true_cvr_do": pv.mean(1), "true_ctcvr": (pc * pv).mean(1)}
    se = {"true_ctr": pc.std(1), "true_cvr_do": pv.std(1), "true_ctcvr": (pc * pv).std(1)}
    for k in mc:
        zscore = np.abs(t[k] - mc[k]) / (se[k] / np.sqrt(draws))
        assert np.quantile(zscore, 0.99) < 3.5, (
            k
        )  # 1 % of 2,000 rows may lie beyond 2.6 SE by chance
        assert np.abs(t[k] - mc[k]).max() < 6 * (se[k] / np.sqrt(draws)).max() + 1e-12, k
    np.testing.assert_allclose(t["true_cvr_clicked"], t["true_ctcvr"] / t["true_ctr"])


def test_three_stage_truth_matches_monte_carlo_over_the_intent():
    rng = np.random.default_rng(5)
    n, draws, lift = 1_000, 20_000, 2.0
    a, c, b = rng.normal(-2.0, 1.0, n), rng.normal(-1.5, 1.0, n), rng.normal(-3.0, 1.0, n)
    lam = rng.uniform(0.0, 2.0, n)
    t = funnel3_truth_columns(a, c, b, lam, lift)
    z = rng.standard_normal((n, draws))
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    pa, pc = sig(a[:, None] + lam[:, None] * z), sig(c[:, None] + lam[:, None] * z)
    p1, p0 = sig(b[:, None] + lift + lam[:, None] * z), sig(b[:, None] + lam[:, None] * z)
    # every joint expectation against its Monte Carlo estimate (the conditionals are their
    # ratios: P(buy | cart) · P(click ∧ cart) = E σ_a σ_c σ₁ …)
    joint = {
        "true_ctr": (t["true_ctr"], pa),
        "true_cart_all": (t["true_cart_all"], pa * pc),
        "true_cart": (t["true_cart"] * t["true_ctr"], pa * pc),
        "true_ctcvr": (t["true_ctcvr"], pa * (pc * p1 + (1 - pc) * p0)),
        "true_cvr_clicked": (t["true_cvr_clicked"] * t["true_ctr"], pa * (pc * p1 + (1 - pc) * p0)),
        "true_cvr_do": (t["true_cvr_do"], pc * p1 + (1 - pc) * p0),
        "true_buy_cart": (t["true_buy_cart"] * t["true_cart_all"], pa * pc * p1),
        "true_buy_nocart": (
            t["true_buy_nocart"] * (t["true_ctr"] - t["true_cart_all"]),
            pa * (1 - pc) * p0,
        ),
    }
    for k, (exact, v) in joint.items():
        zscore = np.abs(exact - v.mean(1)) / (v.std(1) / np.sqrt(draws))
        assert np.quantile(zscore, 0.99) < 3.5 and zscore.max() < 6, k
    # ESM²'s decomposition holds exactly: P(buy | click) = mixture over cart / no cart
    np.testing.assert_allclose(
        t["true_cvr_clicked"],
        t["true_cart"] * t["true_buy_cart"] + (1 - t["true_cart"]) * t["true_buy_nocart"],
        rtol=1e-12,
    )
    np.testing.assert_allclose(t["true_cart_all"], t["true_cart"] * t["true_ctr"], rtol=1e-12)
    # without intent the truths are the plain sigmoids
    flat = funnel3_truth_columns(a, c, b, 0.0, lift)
    np.testing.assert_allclose(flat["true_cart"], sig(c), rtol=1e-9)
    np.testing.assert_allclose(flat["true_buy_cart"], sig(b + lift), rtol=1e-9)
    np.testing.assert_allclose(flat["true_buy_nocart"], sig(b), rtol=1e-9)


def test_three_stage_log_keeps_the_clicks_and_is_calibrated_against_its_truth():
    cfg = preset_config("cart", rows=200_000, **SMALL, seed=1)
    df = simulate(cfg)
    two = simulate(cfg.model_copy(update={"stages": 2}))
    assert cfg.stages == 3 and "cart" not in two.columns
    assert set(CART_TRUTH_COLUMNS) <= set(df.columns)
    cols = df.columns
    assert cols.index("click") < cols.index("cart") < cols.index("conversion")
    # same seed: the same impressions, clicks and p(click | x) as the two-stage log
    assert df["click"].equals(two["click"]) and df["item_id"].equals(two["item_id"])
    np.testing.assert_array_equal(df["true_ctr"], two["true_ctr"])
    # a cart and a buy need a click; buys happen with and without a cart
    assert (df["cart"] <= df["click"]).all() and (df["conversion"] <= df["click"]).all()
    clicked = df.filter(pl.col("click") == 1)
    carted = clicked.filter(pl.col("cart") == 1)
    other = clicked.filter(pl.col("cart") == 0)
    assert 0.17 < clicked["cart"].mean() < 0.23  # the cart target 0.2
    assert 0.065 < clicked["conversion"].mean() < 0.095  # the CVR target 0.08
    assert carted["conversion"].mean() > 3 * other["conversion"].mean() > 0
    # every truth sums to its realised count on the rows it is conditional on (4 binomial SE)
    for frame, truth, label in (
        (df, "true_cart_all", "cart"),
        (df, "true_ctcvr", "conversion"),
        (clicked, "true_cart", "cart"),
        (clicked, "true_cvr_clicked", "conversion"),
        (carted, "true_buy_cart", "conversion"),
        (other, "true_buy_nocart", "conversion"),
    ):
        p = frame[truth].to_numpy()
        assert abs(p.sum() - frame[label].sum()) < 4 * np.sqrt((p * (1 - p)).sum()), truth


def test_three_stage_history_and_parts_run():
    cfg = preset_config("cart", rows=4_000, **SMALL, history_len=3, seed=2)
    df = simulate(cfg)
    assert set(HISTORY_COLUMNS) <= set(df.columns) and df.height == 4_000
    from mtrank.data.simulate import simulate_parts

    parts = list(simulate_parts(cfg.model_copy(update={"history_len": 0}), 2_000))
    assert len(parts) == 2 and all("cart" in p.columns for p in parts)


def test_truth_is_calibrated_against_the_simulated_clicks_and_conversions():
    df = simulate(preset_config("dense", rows=200_000, **SMALL, history_len=0, seed=1))
    clicked = df.filter(pl.col("click") == 1)
    n = df.height
    # p(click | x) and p(click ∧ conv | x) sum to the realised counts (within 4 binomial SE)
    for truth, label in (("true_ctr", "click"), ("true_ctcvr", "conversion")):
        p = df[truth].to_numpy()
        assert abs(p.sum() - df[label].sum()) < 4 * np.sqrt((p * (1 - p)).sum()), truth
    # on clicked rows, p(conv | click, x) is calibrated; p(conv | do(click), x) is lower (selection)
    p = clicked["true_cvr_clicked"].to_numpy()
    assert abs(p.sum() - clicked["conversion"].sum()) < 4 * np.sqrt((p * (1 - p)).sum())
    assert clicked["true_cvr_do"].sum() < 0.8 * clicked["conversion"].sum()
    assert n == 200_000


def test_selection_reorders_in_aliccp_like_and_not_without_intent():
    kw = {"rows": 60_000, "n_users": 20_000, "n_items": 20_000, "history_len": 0, "seed": 2}
    df = simulate(preset_config("aliccp-like", **kw))
    rho = spearmanr(df["true_cvr_clicked"], df["true_cvr_do"]).statistic
    assert rho < 0.9
    flat = simulate(preset_config("aliccp-like", intent=0.0, **kw))
    assert spearmanr(flat["true_cvr_clicked"], flat["true_cvr_do"]).statistic > 0.99
    np.testing.assert_allclose(flat["true_cvr_clicked"], flat["true_cvr_do"], rtol=1e-9)
    # sparse: CTR ≈ 4 %, CVR given click ≈ 1 %
    assert 0.035 < df["click"].mean() < 0.045
    assert 0.006 < df["conversion"].sum() / df["click"].sum() < 0.014


def test_driver_sharing_sets_the_correlation_of_appeal_and_quality():
    from mtrank.data.simulate import _world

    for rho in (0.0, 0.6):
        w = _world(SimConfig(n_items=20_000, sharing=rho), np.random.default_rng(0))
        assert abs(np.corrcoef(w["appeal"], w["quality"])[0, 1] - rho) < 0.03


def test_zipf_popularity_leaves_a_long_tail_unshown():
    df = simulate(
        preset_config("aliccp-like", rows=100_000, n_users=5_000, n_items=50_000, history_len=0)
    )
    shown = df["item_id"].n_unique()
    assert shown < 0.6 * 50_000  # many items never shown
    top = df.group_by("item_id").len().sort("len", descending=True)["len"]
    assert top[:500].sum() > 0.3 * df.height  # 1 % of items take > 30 % of impressions


def test_histories_are_lists_of_known_items_most_recent_first_and_change_nothing_else():
    cfg = preset_config("dense", rows=20_000, n_users=2_000, n_items=1_000, history_len=5, seed=4)
    df = simulate(cfg)
    for col in HISTORY_COLUMNS:
        assert df.schema[col] == pl.List(pl.Int64)
        lens = df[col].list.len()
        assert lens.max() <= 5 and lens.mean() > 1.0
        ids = df[col].explode().drop_nulls()
        assert ids.min() >= 0 and ids.max() < 1_000
    # every row of a user carries the same history
    per_user = df.group_by("user_id").agg(pl.col("hist_purchased").n_unique())
    assert per_user["hist_purchased"].max() == 1
    # purchases follow the process: bought items have above-average true CVR in the log
    item_cvr = df.group_by("item_id").agg(pl.col("true_cvr_do").mean())
    bought = (
        df.select(pl.col("hist_purchased").explode().alias("item_id"))
        .drop_nulls()
        .join(item_cvr, on="item_id")
    )
    assert bought["true_cvr_do"].mean() > item_cvr["true_cvr_do"].mean()
    plain = simulate(cfg.model_copy(update={"history_len": 0}))
    assert plain.equals(df.drop(list(HISTORY_COLUMNS)))


def test_metadata_records_preset_and_version(tmp_path):
    cfg = preset_config("dense", rows=2_000, **SMALL, history_len=2)
    meta = read_sim_metadata(write_simulated(cfg, tmp_path / "d.parquet"))
    assert (
        meta["version"] == SIM_VERSION
        and meta["preset"] == "dense"
        and meta["selection"] == PRESETS["dense"]["selection"]
    )


def test_unknown_preset_and_bad_knobs_name_the_option():
    with pytest.raises(ConfigError, match="--preset must be one of"):
        preset_config("aliexpress-like")
    with pytest.raises(ConfigError, match="--sharing must be ≤ 1"):
        preset_config("dense", sharing=1.5)
    with pytest.raises(ConfigError, match="--cvr must be < 1"):
        preset_config("aliccp-like", cvr=1.0)
    with pytest.raises(ConfigError, match="--stages must be ≤ 3"):
        preset_config("default", stages=4)
    with pytest.raises(ConfigError, match="--selection must be ≥ 0"):
        preset_config("default", selection=-1.0)


def test_simulate_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    for args, needle in (
        (["--preset", "nope"], "--preset must be one of"),
        (["--preset", "dense", "--intent", "9"], "--intent must be ≤ 3"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "mtrank",
                "simulate",
                *args,
                "--rows",
                "100",
                "--out",
                str(tmp_path / "x.parquet"),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
        assert not (tmp_path / "x.parquet").exists()


def test_three_stage_schema_file_and_loading():
    from pathlib import Path

    from mtrank.data.schema import Schema
    from mtrank.data.simulate import SIMULATED_CART_SCHEMA, SIMULATED_SCHEMA, simulated_schema
    from mtrank.workflow import simulated_data

    repo = Path(__file__).resolve().parents[1]
    on_file = Schema.from_file(repo / "configs" / "simulated-cart.schema.yaml")
    assert on_file == SIMULATED_CART_SCHEMA
    assert SIMULATED_CART_SCHEMA.stage_names == ["click", "cart", "buy"]
    assert SIMULATED_CART_SCHEMA.stage_parents == [-1, 0, 0]
    cfg = preset_config("cart", rows=2_000, **SMALL)
    assert simulated_schema(cfg) is SIMULATED_CART_SCHEMA
    assert simulated_schema(cfg.model_copy(update={"stages": 2})) is SIMULATED_SCHEMA
    loaded = simulated_data(cfg)
    assert loaded.schema is SIMULATED_CART_SCHEMA and loaded.splits["all"].height == 2_000


def test_shipped_cart_config_is_the_cart_preset():
    from pathlib import Path

    from mtrank.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "simulated-cart.yaml")
    assert cfg.data.simulator == preset_config("cart")
    assert cfg.model.name == "esm2"
