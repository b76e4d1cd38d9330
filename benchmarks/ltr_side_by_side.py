"""Fusion vs learning to rank vs multi-task learning for GMV, on the same test requests (issue #17).

Runs :func:`mtrank.ranking.strategies.compare_strategies` (protocol in its docstring) on

* ``simulated``: the simulator (``--preset`` when the simulator has presets; slates of
  ``--slate-size`` candidates so that K = 10 is a real choice; time split);
* ``hillstrom``: the real Hillstrom e-mail test (no requests: per split, pseudo-requests of 50
  customers; GMV = ``spend``, the fusion's price factor = ``history``; random split).

Prints a markdown table per dataset and writes ``<out>/ltr_side_by_side.json`` and ``.md`` with
the command and the machine load (``uptime``) at the start and the end.

Run (about 10 minutes on 2 busy cores)::

    PYTHONPATH=src python benchmarks/ltr_side_by_side.py --data-dir /work/shared/data
    PYTHONPATH=src python benchmarks/ltr_side_by_side.py --quick --out /tmp/ltr   # smoke test
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from mtrank.data.simulate import SimConfig
from mtrank.data.split import SplitConfig, split_data
from mtrank.io_utils import atomic_write_json
from mtrank.models.config import ModelConfig
from mtrank.models.ltr import LTRConfig
from mtrank.ranking.replay import replay_defaults
from mtrank.ranking.strategies import compare_strategies, report_markdown, with_pseudo_requests
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import load_data


def uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "n/a"


def run_dataset(name: str, args: argparse.Namespace, log) -> tuple[dict, str]:
    if name == "simulated":
        sim_kw = {"rows": args.rows, "slate_size": args.slate_size, "seed": args.seed}
        if args.preset:
            sim_kw["preset"] = args.preset
        sim = SimConfig(**sim_kw)
        loaded = load_data("simulated", data_dir=args.work / "data", sim=sim)
        splits = split_data(loaded, SplitConfig(seed=args.seed))
        schema = loaded.schema
        title = (
            f"simulated{' ' + args.preset if args.preset else ''} ({sim.rows:,} "
            f"impressions, slates of {sim.slate_size}, time split)"
        )
        batch = 2048
    else:
        loaded = load_data(name, data_dir=args.data_dir)
        splits = split_data(loaded, SplitConfig(seed=args.seed))
        splits, schema = with_pseudo_requests(
            splits, loaded.schema, replay_defaults(loaded.schema)["pseudo_size"], args.seed
        )
        title = (
            f"{name} (64,000 customers, random split, pseudo-requests of "
            f"{replay_defaults(loaded.schema)['pseudo_size']})"
        )
        batch = 256
    res = compare_strategies(
        splits,
        schema,
        models=tuple(args.models.split(",")),
        k=args.k,
        train_cfg=TrainConfig(
            epochs=args.epochs, batch_size=batch, seed=args.seed, patience=1, threads=args.threads
        ),
        model_cfg=ModelConfig(),
        ltr_cfg=LTRConfig(
            k=args.k, seed=args.seed, threads=args.threads, early_stopping=args.ltr_early_stopping
        ),
        trials=args.trials,
        seed=args.seed,
        log=log,
    )
    return res, report_markdown(res, title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="simulated,hillstrom")
    ap.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    ap.add_argument(
        "--models", default="esmm", help="multi-task models next to BASE, comma-separated"
    )
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--slate-size", type=int, default=30)
    ap.add_argument(
        "--preset",
        default=None,
        help="simulator preset (e.g. aliccp-like), when the simulator has presets",
    )
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--ltr-early-stopping", default="ndcg", choices=["ndcg", "gmv"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ltr"))
    ap.add_argument("--work", type=Path, default=Path("runs/ltr_side_by_side"))
    args = ap.parse_args()
    if args.quick:
        args.rows, args.epochs, args.trials = 30_000, 1, 20
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    command = "PYTHONPATH=src python benchmarks/ltr_side_by_side.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    doc = {"command": command, "uptime_start": uptime(), "datasets": {}}
    md = [f"Command: `{command}`", "", f"Load at start: `{doc['uptime_start']}`", ""]
    start = time.perf_counter()
    for name in args.datasets.split(","):
        res, table = run_dataset(name, args, log)
        doc["datasets"][name] = res
        md.append(table)
        print(table, flush=True)
    doc["uptime_end"] = uptime()
    doc["seconds"] = time.perf_counter() - start
    md.append(f"Load at end: `{doc['uptime_end']}`; {doc['seconds'] / 60:.1f} minutes.")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        json.loads(json.dumps(doc, default=float)), args.out / "ltr_side_by_side.json"
    )
    (args.out / "ltr_side_by_side.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'ltr_side_by_side.json'} and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
