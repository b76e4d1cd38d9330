"""Three-stage funnel on the simulator: ESMM (two stages, the cart label unused) against ESM² and
the N-stage models, scored against the exact stage truths.

The simulator's preset ``cart`` (:mod:`mtrank.data.simulate`, ``stages = 3``) logs impression →
click → {cart, buy}: a buy after the click with or without a cart, as in ESM² (Wen et al.,
SIGIR 2020). Per simulator seed (a new mall and log each) the same split (by time) and the same
encoded features serve every model; each model is trained by :func:`mtrank.workflow.fit_encoded`
(as ``mtrank train`` trains) with the same budget and the same selection rule (early stopping on
validation ``auc_ctcvr``). Models:

* ``esmm_2stage``: ESMM on the two-stage schema (click → conversion; the cart column ignored);
* ``esm2``: ESM² on the three-stage schema (configs/simulated-cart.schema.yaml);
* ``esmm_3stage``, ``aitm_3stage``: the N-stage ESMM and AITM on the same schema.

Metrics on the test split. Observed labels: ``auc_ctr``, ``auc_cvr_masked`` (pCVR vs buy on
clicked rows), ``auc_ctcvr`` (pCTCVR vs buy on all rows), ``auc_cart`` (pCart vs cart on clicked
rows; three-stage models). Exact truth, over all test impressions: ``auc_cvr_truth`` and
``spearman_cvr_truth`` (pCVR vs ``true_cvr_clicked`` = P(buy | click, x); soft AUC,
:func:`mtrank.metrics.core.soft_auc`), ``auc_ctcvr_truth`` / ``spearman_ctcvr_truth`` (pCTCVR
vs ``true_ctcvr`` = P(click ∧ buy | x)), ``auc_cart_truth`` (pCart vs ``true_cart``),
``bias_cvr_clicked`` (mean pCVR − true_cvr_clicked on clicked rows) and, for ESM², the Spearman
correlation of its y₃ / y₄ heads with ``true_buy_cart`` / ``true_buy_nocart``. Every model is
compared with ``esmm_2stage`` run by run on the same test rows
(:func:`mtrank.benchmark.paired_differences`).

Usage::

    python benchmarks/funnel3.py --rows 300000 --sim-seeds 5 --out benchmarks/results/funnel3

prints the tables and writes ``results.json`` and ``results.md`` (with the command and
``uptime``) to ``--out``, atomically, after every simulator seed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from mtrank.benchmark import paired_differences, paired_table
from mtrank.data.batch import EncodedData
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.simulate import SIMULATED_SCHEMA, preset_config
from mtrank.data.split import SplitConfig, split_data
from mtrank.io_utils import atomic_write_bytes, atomic_write_json
from mtrank.metrics.core import auc, soft_auc
from mtrank.metrics.summary import fmt, summarise
from mtrank.models import MODELS
from mtrank.models.config import ModelConfig
from mtrank.train.trainer import TrainConfig, predict
from mtrank.workflow import fit_encoded, simulated_data

REFERENCE = "esmm_2stage"
# benchmark name → (registry name, three-stage schema?)
ALL_MODELS = {
    "esmm_2stage": ("esmm", False),
    "esm2": ("esm2", True),
    "esmm_3stage": ("esmm", True),
    "aitm_3stage": ("aitm", True),
}
METRICS = [
    "auc_cvr_truth",
    "spearman_cvr_truth",
    "auc_ctcvr_truth",
    "spearman_ctcvr_truth",
    "auc_cart_truth",
    "bias_cvr_clicked",
    "auc_ctr",
    "auc_cvr_masked",
    "auc_ctcvr",
    "auc_cart",
]


def run_metrics(out: dict[str, np.ndarray], test, stages3: bool) -> dict[str, float | None]:
    """The metrics of one trained model on the test frame (module docstring)."""
    col = lambda c: test.get_column(c).to_numpy()  # noqa: E731
    click, cart, buy = col("click"), col("cart"), col("conversion")
    clicked = click > 0

    def rho(a: np.ndarray, b: np.ndarray) -> float | None:
        r = float(spearmanr(a, b).statistic)
        return r if np.isfinite(r) else None  # a constant prediction has no rank correlation

    m: dict[str, float | None] = {
        "n_impressions": int(click.size),
        "n_clicks": int(click.sum()),
        "n_conversions": int(buy.sum()),
        "auc_cvr_truth": soft_auc(col("true_cvr_clicked"), out["p_cvr"]),
        "spearman_cvr_truth": rho(col("true_cvr_clicked"), out["p_cvr"]),
        "auc_ctcvr_truth": soft_auc(col("true_ctcvr"), out["p_ctcvr"]),
        "spearman_ctcvr_truth": rho(col("true_ctcvr"), out["p_ctcvr"]),
        "bias_cvr_clicked": float(
            (out["p_cvr"][clicked] - col("true_cvr_clicked")[clicked]).mean()
        ),
        "auc_ctr": auc(click, out["p_ctr"]),
        "auc_cvr_masked": auc(buy, out["p_cvr"], click),
        "auc_ctcvr": auc(buy, out["p_ctcvr"]),
    }
    if stages3:
        m["auc_cart_truth"] = soft_auc(col("true_cart"), out["p_cart"])
        m["auc_cart"] = auc(cart, out["p_cart"], click)
    if "p_buy_cart" in out:
        m["spearman_buy_cart_head"] = rho(col("true_buy_cart"), out["p_buy_cart"])
        m["spearman_buy_nocart_head"] = rho(col("true_buy_nocart"), out["p_buy_nocart"])
    return m


def summary_table(per_repeat: dict[str, list[dict]]) -> str:
    """Mean ± std over runs per model and metric, as markdown."""
    cols = METRICS + ["best_epoch", "seconds"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, runs in per_repeat.items():
        s = summarise(runs)
        cells = [
            fmt(
                s[c]["mean"],
                s[c]["std"] if s[c]["n"] > 1 else None,
                digits=2 if c in ("best_epoch", "seconds") else 4,
            )
            if c in s
            else "n/a"
            for c in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300_000, help="impressions per simulator seed")
    ap.add_argument("--sim-seeds", type=int, default=5, help="simulator seeds 0..N-1")
    ap.add_argument("--first-sim-seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(ALL_MODELS), help="comma-separated")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--embedding-dim", type=int, default=8)
    ap.add_argument("--tower", default="64,32", help="hidden sizes per tower")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed (and split seed)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/funnel3"))
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in ALL_MODELS or ALL_MODELS[m][0] not in MODELS]
    if unknown:
        print(f"error: unknown or unavailable models {unknown}; known: {list(ALL_MODELS)}")
        return 2
    torch.set_num_threads(args.threads)
    tower = [int(x) for x in args.tower.split(",")]
    command = "python benchmarks/funnel3.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    per_repeat: dict[str, list[dict]] = {m: [] for m in names}
    splits_info = []
    sims = []
    for sim_seed in range(args.first_sim_seed, args.first_sim_seed + args.sim_seeds):
        sim = preset_config("cart", rows=args.rows, seed=sim_seed)
        sims.append(sim.model_dump(mode="json"))
        loaded = simulated_data(sim)
        schema3 = loaded.schema
        splits = split_data(
            loaded, SplitConfig(test_fraction=0.5, val_fraction=0.1, seed=args.seed)
        )
        test = splits["test"]
        encoded = {}
        for stages3, schema in ((False, SIMULATED_SCHEMA), (True, schema3)):
            enc = FeatureEncoder.fit(splits["train"], schema)
            encoded[stages3] = (
                enc,
                schema,
                {k: EncodedData.from_frame(v, schema, enc) for k, v in splits.items() if v.height},
            )
        clicked = test.filter(test["click"] == 1)
        splits_info.append(
            {
                "sim_seed": sim_seed,
                "rows": {k: v.height for k, v in splits.items()},
                "clicks_test": clicked.height,
                "carts_test": int(test["cart"].sum()),
                "buys_test": int(test["conversion"].sum()),
                "buys_after_cart_test": int((clicked["cart"] * clicked["conversion"]).sum()),
            }
        )
        for name in names:
            registry, stages3 = ALL_MODELS[name]
            enc, schema, data = encoded[stages3]
            tcfg = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                patience=args.patience,
                seed=args.seed,
                monitor="auc_ctcvr",
            )
            mcfg = ModelConfig(name=registry, embedding_dim=args.embedding_dim, tower=tower)
            fitted = fit_encoded(
                {"train": data["train"], "val": data["val"]},
                enc,
                schema,
                mcfg,
                tcfg,
                quiet=True,
                evaluate=(),
            )
            out = predict(fitted.bundle.model, data["test"])
            m = run_metrics(out, test, stages3)
            m.update(
                sim_seed=sim_seed,
                seed=args.seed,
                best_epoch=fitted.result.best_epoch,
                seconds=round(fitted.seconds, 1),
            )
            per_repeat[name].append(m)
            print(
                f"sim {sim_seed}: {name} auc_cvr_truth {fmt(m['auc_cvr_truth'])} auc_ctcvr_truth "
                f"{fmt(m['auc_ctcvr_truth'])} ({m['seconds']:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
        write(args, command, uptime_start, sims, splits_info, per_repeat)
    print(write(args, command, uptime_start, sims, splits_info, per_repeat))
    return 0


def write(args, command, uptime_start, sims, splits_info, per_repeat) -> str:
    """Write results.json and results.md (atomically) and return the markdown."""
    paired = (
        paired_differences(per_repeat, REFERENCE, METRICS)
        if REFERENCE in per_repeat and all(per_repeat.values())
        else {}
    )
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {
        "command": command,
        "uptime_start": uptime_start,
        "uptime_end": uptime_end,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {
            n: {"registry": ALL_MODELS[n][0], "three_stage_schema": ALL_MODELS[n][1]}
            for n in per_repeat
        },
        "simulator": sims,
        "splits": splits_info,
        "per_repeat": per_repeat,
        "summary": {m: summarise(r) for m, r in per_repeat.items()},
        "paired": paired,
        "protocol": {"reference": REFERENCE if paired else None},
    }
    md = "\n".join(
        [
            "# Three-stage funnel (simulator preset `cart`): ESMM vs ESM² vs N-stage models",
            "",
            f"Command:\n\n```\n{command}\n```\n",
            f"Machine load: start `{uptime_start}`; end `{uptime_end}`.",
            "",
            f"{len(splits_info)} simulator seed(s) × training seed {args.seed}; "
            f"{args.rows:,} impressions per seed, split by time (test 50 %, validation 10 % of "
            f"the rest); at most {args.epochs} epochs, early stopping on validation auc_ctcvr "
            f"(patience {args.patience}); batch {args.batch_size}, Adam lr {args.lr}, embedding "
            f"{args.embedding_dim}, towers {args.tower}.",
            "",
            "Test splits: "
            + "; ".join(
                f"seed {s['sim_seed']}: {s['clicks_test']:,} clicks, {s['carts_test']:,} carts, "
                f"{s['buys_test']:,} buys ({s['buys_after_cart_test']:,} after a cart)"
                for s in splits_info
            )
            + ".",
            "",
            "Mean ± std over runs (truth metrics over all test impressions; `*_truth` = soft AUC "
            "or Spearman against the exact P(buy | click, x), P(click ∧ buy | x), "
            "P(cart | click, x)):",
            "",
            summary_table(per_repeat),
            "",
            f"Paired differences against `{REFERENCE}` (same test rows, run by run):",
            "",
            paired_table(results) or "(none yet)",
            "",
        ]
    )
    esm2 = results["summary"].get("esm2", {})
    if "spearman_buy_cart_head" in esm2:
        md += (
            "\nESM²'s heads y₃ = P(buy | cart) and y₄ = P(buy | click, no cart) against their "
            f"truths (Spearman): {fmt(esm2['spearman_buy_cart_head']['mean'])} and "
            f"{fmt(esm2['spearman_buy_nocart_head']['mean'])} (identified only through the "
            "mixture; read pCVR, not them).\n"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results, args.out / "results.json")
    atomic_write_bytes(md.encode(), args.out / "results.md")
    return md


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    sys.exit(code)
