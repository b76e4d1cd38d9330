"""The evidence runs behind docs/entire-space.md: the ``aliccp-like`` benchmark (ESMM, ESMM-NS,
BASE, ESCM²-DR; 5 training seeds × 3 simulator seeds, paired against BASE) and the regime map
(conversion density × selection strength × driver sharing), each split over a few processes
(one per simulator seed, one per conversion density) so they share 2 cores fairly, then merged.

    python benchmarks/evidence.py run     # launch everything, wait, merge (~40 min on 2 busy cores)
    python benchmarks/evidence.py late-seeds  # training seeds 3-4 in parallel processes
                                              # (when short of time)
    python benchmarks/evidence.py merge   # merge finished parts again
    python benchmarks/evidence.py add dcmt,chorus_cvr --repeats 3
        # more models on the same simulator seeds, rows and training seeds, one process per
        # simulator seed, merged into the committed aliccp_like results (paired against the
        # BASE runs already there; the merge refuses parts whose splits differ)

Writes ``benchmarks/results/aliccp_like/{benchmark.json,benchmark.md}``,
``benchmarks/results/regime_map/{sweep.json,sweep.md}`` and the heatmaps
``docs/img/regime_<metric>.png``. Each part's command line and log are kept under
``benchmarks/results/*/parts/`` (log only; the JSON parts are merged).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "results" / "aliccp_like"
SWEEP = ROOT / "benchmarks" / "results" / "regime_map"
IMG = ROOT / "docs" / "img"
WORK = Path("/tmp/mtrank-evidence")

MODELS = "esmm,esmm_ns,base,escm2_dr"
# Sized for 2 cores shared with ~6 other jobs (load 20-30 when this ran); see
# docs/entire-space.md for what that costs in sparsity and in test conversions.
BENCH_ARGS = [
    "--dataset",
    "simulated",
    "--preset",
    "aliccp-like",
    "--models",
    MODELS,
    "--rows",
    "600000",
    "--n-items",
    "50000",
    "--test-fraction",
    "0.6",
    "--repeats",
    "5",
    "--epochs",
    "2",
    "--patience",
    "0",
    "--batch-size",
    "4096",
    "--tower",
    "128,64",
    "--no-shared-ctr",
    "--fuse-k",
    "10",
    "--fuse-grid",
    "3",
    "--threads",
    "1",
]
SWEEP_ARGS = [
    "--models",
    MODELS,
    "--preset",
    "dense",
    "--rows",
    "60000",
    "--intent",
    "0,0.75,1.5",
    "--sharing",
    "0,0.6",
    "--repeats",
    "2",
    "--sim-seeds",
    "1",
    "--epochs",
    "1",
    "--batch-size",
    "2048",
    "--tower",
    "128,64",
    "--fuse-k",
    "10",
    "--fuse-grid",
    "3",
    "--threads",
    "1",
]
SIM_SEEDS = [0, 1, 2]
DENSITY = ["0.01", "0.04", "0.15"]  # CVR given click; one sweep process each
if os.environ.get("EVIDENCE_TINY"):  # a smoke test of the whole pipeline in a minute or two
    WORK, BENCH, SWEEP, IMG = (
        Path("/tmp/mtrank-evidence-tiny") / n for n in ("work", "bench", "sweep", "img")
    )
    BENCH_ARGS = [a for a in BENCH_ARGS]
    BENCH_ARGS[BENCH_ARGS.index("--rows") + 1], BENCH_ARGS[BENCH_ARGS.index("--n-items") + 1] = (
        "40000",
        "2000",
    )
    BENCH_ARGS[BENCH_ARGS.index("--repeats") + 1] = "2"
    BENCH_ARGS += ["--n-users", "3000"]
    SWEEP_ARGS = [a for a in SWEEP_ARGS]
    SWEEP_ARGS[SWEEP_ARGS.index("--rows") + 1] = "20000"
    DENSITY = ["0.04", "0.15"]
    SWEEP_ARGS += ["--n-users", "2000", "--n-items", "500"]


def _mtrank() -> list[str]:
    return [sys.executable, "-m", "mtrank"]


def launch() -> list[tuple[list[str], subprocess.Popen, Path]]:
    procs = []
    for k in SIM_SEEDS:
        out = WORK / f"bench-{k}"
        cmd = [
            *_mtrank(),
            "benchmark",
            *BENCH_ARGS,
            "--sim-seeds",
            "1",
            "--first-sim-seed",
            str(k),
            "--out",
            str(out),
        ]
        procs.append(_start(cmd, out))
    for cvr in DENSITY:
        out = WORK / f"sweep-{cvr}"
        cmd = [*_mtrank(), "sweep", *SWEEP_ARGS, "--cvr", cvr, "--out", str(out)]
        procs.append(_start(cmd, out))
    return procs


def launch_late_seeds(
    first: int = 3, count: int = 2
) -> list[tuple[list[str], subprocess.Popen, Path]]:
    """A second process per simulator seed for training seeds first … first + count − 1 (the
    split is by time, so the test rows are the same); merge() keeps each (simulator seed,
    training seed) run once. Used when the first processes run too slowly for the deadline."""
    procs = []
    for k in SIM_SEEDS:
        out = WORK / f"bench-{k}-late"
        args = [a for a in BENCH_ARGS]
        args[args.index("--repeats") + 1] = str(count)
        cmd = [
            *_mtrank(),
            "benchmark",
            *args,
            "--seed",
            str(first),
            "--sim-seeds",
            "1",
            "--first-sim-seed",
            str(k),
            "--out",
            str(out),
        ]
        procs.append(_start(cmd, out))
    return procs


def launch_added(
    models: str, first: int, count: int
) -> list[tuple[list[str], subprocess.Popen, Path]]:
    """One process per simulator seed training ``models`` only, with the benchmark's settings
    and training seeds first … first + count − 1 (see :func:`merge_added`)."""
    procs = []
    for k in SIM_SEEDS:
        out = WORK / f"add-{k}"
        cmd = [*_mtrank(), "benchmark", *_added_args(models, first, count)]
        cmd += ["--sim-seeds", "1", "--first-sim-seed", str(k), "--out", str(out)]
        procs.append(_start(cmd, out))
    return procs


def _added_args(models: str, first: int, count: int) -> list[str]:
    args = [a for a in BENCH_ARGS]
    args[args.index("--models") + 1] = models
    args[args.index("--repeats") + 1] = str(count)
    return [*args, "--seed", str(first)]


def merge_added(models: str, first: int, count: int) -> None:
    """Merge the parts of :func:`launch_added` into the committed ``benchmark.json`` (the earlier
    runs are kept as they are; :func:`mtrank.benchmark.merge_results` pairs the new models with
    the reference's runs of the same simulator and training seeds)."""
    from mtrank.benchmark import merge_results, report_markdown
    from mtrank.io_utils import atomic_write_bytes, atomic_write_json

    base = json.loads((BENCH / "benchmark.json").read_text())
    parts = []
    for k in SIM_SEEDS:
        for name in ("benchmark.json", "benchmark.partial.json"):
            if (WORK / f"add-{k}" / name).exists():
                parts.append(json.loads((WORK / f"add-{k}" / name).read_text()))
                break
    if not parts:
        print("no added part finished", file=sys.stderr)
        return
    res = merge_results([base, *parts])
    res["sources"] = base["sources"]  # the added parts' sources are the same simulator seeds
    cmd = (
        _bench_command()
        + "\nthen: python benchmarks/evidence.py add "
        + f"{models} --first {first} --repeats {count}  # = for k in 0 1 2: mtrank benchmark "
        + shlex.join(_added_args(models, first, count))
        + " --sim-seeds 1 --first-sim-seed $k, merged into the results above"
    )
    atomic_write_json(res, BENCH / "benchmark.json")
    atomic_write_bytes(report_markdown(res, cmd).encode(), BENCH / "benchmark.md")
    for k in SIM_SEEDS:
        log = WORK / f"add-{k}" / "log.txt"
        if log.exists():
            (BENCH / "parts").mkdir(parents=True, exist_ok=True)
            (BENCH / "parts" / f"add-{k}.log").write_text(log.read_text())
    print(f"merged {len(parts)} added part(s) ({models}) into {BENCH}")


def _bench_command() -> str:
    return (
        "python benchmarks/evidence.py run, then late-seeds  # = for k in 0 1 2: mtrank "
        "benchmark "
        + shlex.join(BENCH_ARGS)
        + " --sim-seeds 1 --first-sim-seed $k (training seeds 0-2 kept), and the same with "
        "--seed 3 --repeats 2"
    )


def _start(cmd: list[str], out: Path) -> tuple[list[str], subprocess.Popen, Path]:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "w")  # noqa: SIM115 (held open by the child process until it exits)
    print("started:", shlex.join(cmd[2:]), flush=True)
    return cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), out


def merge() -> None:
    from mtrank.benchmark import merge_results, report_markdown
    from mtrank.io_utils import atomic_write_bytes, atomic_write_json
    from mtrank.report.plots import regime_heatmap
    from mtrank.sweep import merge_sweeps, sweep_markdown

    parts = []
    for d in [WORK / f"bench-{k}{late}" for k in SIM_SEEDS for late in ("", "-late")]:
        for name in (
            "benchmark.json",
            "benchmark.partial.json",
        ):  # a stopped part gives the seeds it finished
            if (d / name).exists():
                parts.append(json.loads((d / name).read_text()))
                break
    if parts:
        res = merge_results(parts)
        cmd = _bench_command()
        atomic_write_json(res, BENCH / "benchmark.json")
        atomic_write_bytes(report_markdown(res, cmd).encode(), BENCH / "benchmark.md")
        print(f"merged {len(parts)} benchmark part(s) into {BENCH}")
    docs = [
        json.loads((WORK / f"sweep-{c}" / "sweep.json").read_text())
        for c in DENSITY
        if (WORK / f"sweep-{c}" / "sweep.json").exists()
    ]
    if docs:
        doc = merge_sweeps(docs)
        cmd = (
            "python benchmarks/evidence.py run  # = for cvr in "
            + " ".join(DENSITY)
            + ": mtrank sweep "
            + shlex.join(SWEEP_ARGS)
            + " --cvr $cvr"
        )
        doc["command"] = cmd
        atomic_write_json(doc, SWEEP / "sweep.json")
        atomic_write_bytes(sweep_markdown(doc, cmd).encode(), SWEEP / "sweep.md")
        IMG.mkdir(parents=True, exist_ok=True)
        for metric in doc["metrics"]:
            atomic_write_bytes(
                regime_heatmap(doc, metric, dpi=110),
                IMG / f"regime_{metric.replace('@', '_at_')}.png",
            )
        print(f"merged {len(doc['cells'])} cell(s) into {SWEEP}; heatmaps in {IMG}")
    for d in [WORK / f"bench-{k}{late}" for k in SIM_SEEDS for late in ("", "-late")] + [
        WORK / f"sweep-{c}" for c in DENSITY
    ]:
        if (d / "log.txt").exists():
            dest = (BENCH if d.name.startswith("bench") else SWEEP) / "parts" / f"{d.name}.log"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text((d / "log.txt").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", choices=["run", "late-seeds", "merge", "add", "merge-added"])
    ap.add_argument("models", nargs="?", help="add / merge-added: comma-separated model names")
    ap.add_argument("--first", type=int, default=0, help="add: first training seed")
    ap.add_argument("--repeats", type=int, default=5, help="add: training seeds")
    args = ap.parse_args()
    if args.what in ("add", "merge-added"):
        if not args.models:
            ap.error(f"{args.what} needs the model names")
        if args.what == "add":
            start = time.time()
            for _cmd, p, out in launch_added(args.models, args.first, args.repeats):
                rc = p.wait()
                print(f"finished rc={rc} after {time.time() - start:.0f}s: {out}", flush=True)
        merge_added(args.models, args.first, args.repeats)
        return
    if args.what in ("run", "late-seeds"):
        start = time.time()
        procs = launch() if args.what == "run" else launch_late_seeds()
        for cmd, p, out in procs:
            rc = p.wait()
            print(f"finished rc={rc} after {time.time() - start:.0f}s: {out}", flush=True)
    merge()


if __name__ == "__main__":
    main()
