"""Calibration after sampled negatives and the learnt position effect, on the simulator.

Prints two markdown tables and writes JSON (``--out``):

1. trained on unclicked impressions kept at rate r (mtrank's own sampling of train and val,
   ``fit(..., negative_sampling_rate=r)``), the mean pCTR on the *unsampled* test rows over the
   observed CTR, corrected (what predict / evaluate / serve return) and uncorrected, per seed;
2. trained with the schema role ``position`` on a log whose CTR logit falls by
   π·log(position), the learnt effect per position next to the known −π·log(position).

Usage: ``python benchmarks/log_effects.py --seeds 3 --out benchmarks/results/log_effects.json``
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from mtrank.data.io import validate_frame
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.io_utils import atomic_write_json
from mtrank.models.calibration import without_sampling_correction
from mtrank.models.config import ModelConfig
from mtrank.train.trainer import TrainConfig, predict
from mtrank.workflow import fit


def splits_of(df, schema, train=0.6, val=0.1):
    """Validated rows, shuffled (seed 0), split train / val / test."""
    df, _ = validate_frame(df, schema, "sim")
    df = df[np.random.default_rng(0).permutation(df.height)]
    a, b = int(df.height * train), int(df.height * (train + val))
    return {"train": df.head(a), "val": df.slice(a, b - a), "test": df.slice(b)}


def sampled_negatives(seeds: int, rate: float, rows: int) -> list[dict]:
    """Mean pCTR / observed CTR on unsampled test rows, per seed."""
    schema = SIMULATED_SCHEMA.model_copy(
        update={"categorical": ["category", "brand", "user_power", "user_age"]}
    )
    splits = splits_of(
        simulate(SimConfig(rows=rows, n_users=3_000, n_items=800, ctr=0.05, seed=3)), schema
    )
    test = splits["test"]
    ctr = float(test["click"].mean())
    out = []
    for seed in range(seeds):
        for r in (None, rate):
            res = fit(
                splits,
                schema,
                ModelConfig(name="esmm", tower=[16], embedding_dim=4),
                TrainConfig(epochs=4, batch_size=2048, lr=3e-3, seed=seed, patience=0),
                quiet=True,
                negative_sampling_rate=r,
            )
            enc = res.bundle.encode(test)
            served = predict(res.bundle.model, enc)["p_ctr"].mean()
            raw = predict(without_sampling_correction(res.bundle.model), enc)["p_ctr"].mean()
            out.append(
                {
                    "seed": seed,
                    "rate": r or 1.0,
                    "observed_ctr": ctr,
                    "ratio_corrected": float(served) / ctr,
                    "ratio_uncorrected": float(raw) / ctr,
                    "auc_ctr": res.metrics["test"]["auc_ctr"],
                }
            )
    return out


def position_effects(rows: int, effect: float) -> dict:
    """Learnt vs known position effect (slate of 5)."""
    schema = SIMULATED_SCHEMA.model_copy(
        update={
            "categorical": ["category", "brand", "user_power", "user_age", "item_id"],
            "position": "position",
            "passthrough": [c for c in SIMULATED_SCHEMA.passthrough if c != "position"],
        }
    )
    sim = SimConfig(
        rows=rows,
        n_users=2_000,
        n_items=500,
        ctr=0.08,
        slate_size=5,
        position_effect=effect,
        seed=3,
    )
    res = fit(
        splits_of(simulate(sim), schema, 0.8, 0.1),
        schema,
        ModelConfig(name="esmm", tower=[16], embedding_dim=4),
        TrainConfig(epochs=3, batch_size=256, lr=3e-3, seed=0, patience=0),
        quiet=True,
    )
    learnt = res.bundle.meta["position"]["effects"]
    return {k: {"learnt": v, "known": -effect * math.log(int(k))} for k, v in learnt.items()}


def main() -> None:
    """Run both measurements, print the tables, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--position-rows", type=int, default=60_000)
    ap.add_argument("--position-effect", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/log_effects.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    ns = sampled_negatives(args.seeds, args.rate, args.rows)
    pos = position_effects(args.position_rows, args.position_effect)
    print("| seed | kept rate r | mean pCTR / CTR (served) | uncorrected | test AUC CTR |")
    print("|---|---|---|---|---|")
    for row in ns:
        print(
            f"| {row['seed']} | {row['rate']:g} | {row['ratio_corrected']:.3f} | "
            f"{row['ratio_uncorrected']:.3f} | {row['auc_ctr']:.4f} |"
        )
    print("\n| position | learnt effect | known −π·log(position) |")
    print("|---|---|---|")
    for k, v in pos.items():
        print(f"| {k} | {v['learnt']:+.3f} | {v['known']:+.3f} |")
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "sampled_negatives": ns,
            "position": pos,
            "seconds": seconds,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
