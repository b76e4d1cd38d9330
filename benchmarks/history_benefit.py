"""Does a behaviour history help? ESMM with and without ``hist_purchased`` (DIN target attention),
paired over seeds, on the simulator where histories carry signal (issue #13, "Done when").

Per seed: one simulated mall (``history_len`` > 0: every row carries the user's last purchases,
drawn from the same click/conversion process as the log, so they reveal the user's category
taste, which drives clicks through ``0.8·f(u, c)``), split by time; ESMM trained twice with the
same training seed, on the same rows: the simulator's scalar features only, and the same plus
the sequence ``hist_purchased`` sharing ``item_id``'s embedding rows with target attention.
Test ``auc_ctr`` (and CTCVR AUC, GAUC) of both and their paired difference.

Run (2 shared cores; ~3 min per seed on an idle machine)::

    PYTHONPATH=src python benchmarks/history_benefit.py --seeds 0 1 2 \
        --out benchmarks/results/history_benefit.json

Writes the JSON (settings, per-seed metrics, paired differences, command, ``uptime``) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mtrank.data.datasets import LoadedData
from mtrank.data.io import validate_frame
from mtrank.data.schema import Schema
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, simulate
from mtrank.data.split import SplitConfig, split_data
from mtrank.models.config import ModelConfig
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import fit

METRICS = ("auc_ctr", "auc_ctcvr", "gauc_ctr", "logloss_ctr")


def with_history(schema: Schema, pooling: str) -> Schema:
    """The simulator's schema plus ``hist_purchased`` as a sequence sharing ``item_id``."""
    doc = schema.model_dump(mode="json")
    doc["sequences"] = [
        {"column": "hist_purchased", "shares": "item_id", "max_len": 50, "pooling": pooling}
    ]
    return Schema.model_validate(doc)


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    sim = SimConfig(
        rows=args.rows,
        n_users=args.users,
        n_items=args.items,
        history_len=args.history_len,
        seed=seed,
    )
    df = simulate(sim)
    out: dict = {"seed": seed}
    for name, schema in (
        ("without", SIMULATED_SCHEMA),
        ("with", with_history(SIMULATED_SCHEMA, args.pooling)),
    ):
        clean, _ = validate_frame(df, schema, f"simulator(seed={seed})")
        splits = split_data(LoadedData(schema, {"all": clean}, {"all": "sim"}), SplitConfig())
        t0 = time.perf_counter()
        res = fit(
            splits,
            schema,
            ModelConfig(name="esmm", embedding_dim=args.dim, tower=args.tower),
            TrainConfig(epochs=args.epochs, batch_size=args.batch, seed=seed),
            quiet=True,
        )
        test = res.metrics["test"]
        out[name] = {m: test.get(m) for m in METRICS} | {"seconds": time.perf_counter() - t0}
        print(f"seed {seed} {name:8s} " + json.dumps(out[name]), file=sys.stderr, flush=True)
    return out


def paired(runs: list[dict]) -> dict:
    res = {}
    for m in METRICS:
        d = [r["with"][m] - r["without"][m] for r in runs if r["with"][m] is not None]
        res[m] = {
            "mean": statistics.fmean(d),
            "sd": statistics.stdev(d) if len(d) > 1 else 0.0,
            "positive": sum(x > 0 for x in d),
            "n": len(d),
        }
    return res


def table(runs: list[dict], diff: dict) -> str:
    lines = [
        "| seed | auc_ctr without | auc_ctr with | Δ auc_ctr | Δ auc_ctcvr | Δ gauc_ctr |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        a, b = r["without"], r["with"]
        lines.append(
            f"| {r['seed']} | {a['auc_ctr']:.4f} | {b['auc_ctr']:.4f} | "
            f"{b['auc_ctr'] - a['auc_ctr']:+.4f} | {b['auc_ctcvr'] - a['auc_ctcvr']:+.4f} | "
            f"{b['gauc_ctr'] - a['gauc_ctr']:+.4f} |"
        )
    lines.append(
        "| mean ± sd (seeds with Δ > 0) | | | "
        + " | ".join(
            f"{diff[m]['mean']:+.4f} ± {diff[m]['sd']:.4f} ({diff[m]['positive']}/{diff[m]['n']})"
            for m in ("auc_ctr", "auc_ctcvr", "gauc_ctr")
        )
        + " |"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--history-len", type=int, default=20)
    p.add_argument("--pooling", default="attention", choices=["attention", "mean", "sum"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--tower", type=int, nargs="+", default=[64, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/history_benefit.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args))
        diff = paired(runs)
        doc = {
            "command": "PYTHONPATH=src python " + " ".join(sys.argv),
            "uptime_start": uptime_start,
            "uptime_now": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "cpu_count": os.cpu_count(),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "runs": runs,
            "paired_with_minus_without": diff,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, default=str))
    print(table(runs, paired(runs)))
    args.out.with_suffix(".md").write_text(
        f"Command: `{doc['command']}`\n\nMachine load (uptime) at start: `{uptime_start}`; at "
        f"the end: `{doc['uptime_now']}`.\n\n{table(runs, paired(runs))}\n"
    )


if __name__ == "__main__":
    main()
