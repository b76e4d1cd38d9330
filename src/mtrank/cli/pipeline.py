"""The pipeline commands: ``mtrank simulate``, ``train``, ``evaluate``, ``predict``, ``quickstart``.

Plain functions; :mod:`mtrank.cli` registers them on the app.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtrank.bundle import Bundle
from mtrank.cli.common import (
    SUMMARY,
    DataDirOpt,
    DatasetOpt,
    FunnelOpt,
    QuietOpt,
    SchemaOpt,
    _check_choice,
    _fmt,
    _metric_table,
    _tower,
    console,
    err,
)
from mtrank.data.datasets import DATASETS
from mtrank.data.simulate import SimConfig, write_simulated
from mtrank.data.split import SplitConfig, split_data
from mtrank.data.stream import expand_paths
from mtrank.errors import BundleError, ConfigError
from mtrank.data.io import check_output
from mtrank.io_utils import atomic_write_json, atomic_write_parquet
from mtrank.models import MODELS
from mtrank.models.config import ModelConfig
from mtrank.train.distributed import init_from_env, is_main, run_under_torchrun
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import evaluate_split, fit, fit_stream, load_data, predictions_frame, resolve_schema


def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write")] = Path("data/simulated/simulated.parquet"),
    rows: Annotated[int, typer.Option(help="impressions")] = 1_000_000,
    seed: int = 0,
    ctr: Annotated[float, typer.Option(help="target mean CTR")] = 0.04,
    cvr: Annotated[float, typer.Option(help="target mean CVR given click")] = 0.10,
    n_users: int = 20_000,
    n_items: int = 5_000,
    intent: Annotated[float, typer.Option(help="strength of the unobserved purchase intent (SSB)")] = 0.6,
    slate_size: Annotated[int, typer.Option(help="candidates shown per request (positions 1..S)")] = 10,
    part_rows: Annotated[int | None, typer.Option(help="write a directory of Parquet parts of this many rows (bounded memory)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing, non-empty --out whole")] = False,
) -> None:
    """Write a synthetic mall's impression log (known true pCTR / pCVR per row) as Parquet."""
    check_output(out, kind="dir" if part_rows else "file")
    cfg = SimConfig(rows=rows, seed=seed, ctr=ctr, cvr=cvr, n_users=n_users, n_items=n_items, intent=intent, slate_size=slate_size)
    path = write_simulated(cfg, out, part_rows=part_rows, progress=sys.stderr.isatty(), overwrite=overwrite)
    console.print(f"wrote {path} ({cfg.rows // cfg.slate_size * cfg.slate_size:,} impressions)")


def _configs(model, epochs, batch_size, lr, seed, patience, embedding_dim, tower, dropout, threads) -> tuple[ModelConfig, TrainConfig]:
    _check_choice(model, MODELS, "--model")
    return (
        ModelConfig(name=model, embedding_dim=embedding_dim, tower=_tower(tower), dropout=dropout),
        TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience, threads=threads),
    )


def train(
    dataset: DatasetOpt = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="CSV/Parquet file, directory or glob (with --schema); repeatable")] = None,
    schema: SchemaOpt = None,
    data_dir: DataDirOpt = None,
    model: Annotated[str, typer.Option("--model", "-m", help=f"one of {', '.join(MODELS)}")] = "esmm",
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle directory to write")] = Path("runs/model"),
    epochs: int = 3,
    batch_size: int = 2048,
    lr: float = 1e-3,
    seed: int = 0,
    patience: int = 1,
    embedding_dim: int = 18,
    tower: Annotated[str, typer.Option(help="tower hidden sizes")] = "360,200,80",
    dropout: float = 0.0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    funnel_violations: FunnelOpt = None,
    threads: int = 0,
    stream: Annotated[bool, typer.Option("--stream", help="stream --data piece by piece (flat memory); evaluate on --val-data / --test-data")] = False,
    val_data: Annotated[list[str] | None, typer.Option("--val-data", help="validation files (with --stream)")] = None,
    test_data: Annotated[list[str] | None, typer.Option("--test-data", help="test files (with --stream)")] = None,
    shuffle_buffer: Annotated[int, typer.Option(help="rows in the streaming shuffle buffer")] = 262_144,
    min_count: Annotated[int, typer.Option(help="ids seen fewer times map to the OOV index")] = 1,
    max_vocab: Annotated[int | None, typer.Option(help="keep at most this many ids per field")] = None,
    hash_buckets: Annotated[list[str] | None, typer.Option("--hash-buckets", help="COLUMN=N: hash this categorical column into N buckets (stable FNV-1a) instead of a vocabulary; repeatable")] = None,
    sparse_embeddings: Annotated[bool, typer.Option("--sparse-embeddings", help="update only touched embedding rows (SparseAdam)")] = False,
    nproc: Annotated[int, typer.Option(help="data-parallel processes (re-launches under torchrun)")] = 1,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="checkpoint directory (default: OUT.ckpt); written every epoch")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="also checkpoint every N steps (0 = epoch ends only)")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from its checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing bundle")] = False,
    weight_by_price: Annotated[bool, typer.Option("--weight-by-price", help="weight converted rows by 1 + min(log1p(price)/mean, cap) (see mtrank.data.weights)")] = False,
    price_weight_cap: Annotated[float, typer.Option(help="largest extra weight with --weight-by-price")] = 3.0,
    tensorboard: Annotated[Path | None, typer.Option("--tensorboard", help="also write the per-epoch metrics as TensorBoard event files here (needs tensorboard)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a model, early-stopped on validation; evaluate on test; write a bundle.

    Data parallel: `mtrank train --nproc K ...` or `torchrun --nproc_per_node=K -m mtrank train ...`
    (DistributedDataParallel, gloo on CPU / NCCL on GPU; only rank 0 writes).
    """
    _check_choice(funnel_violations, ("error", "drop"), "--funnel-violations")
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    check_output(out, kind="dir")
    if checkpoint_dir is not None:
        check_output(checkpoint_dir, kind="dir", option="--checkpoint-dir")
    if nproc > 1:
        sys.exit(run_under_torchrun(nproc, _args_without_nproc(sys.argv[1:])))
    model_cfg, train_cfg = _configs(model, epochs, batch_size, lr, seed, patience, embedding_dim, tower, dropout, threads)
    train_cfg = train_cfg.model_copy(update={"sparse_embeddings": sparse_embeddings})
    if tensorboard is not None:
        from mtrank.report.tensorboard import check_available, write_history

        check_available()
    buckets = _parse_buckets(hash_buckets)
    created = init_from_env()
    try:
        ckpt = checkpoint_dir or out.with_name(out.name + ".ckpt")
        run_kwargs = {"quiet": quiet or not is_main(), "checkpoint": ckpt, "checkpoint_every": checkpoint_every, "resume": resume}
        if stream:
            if not data:
                raise ConfigError("--stream needs --data (files, a directory or a glob)")
            if weight_by_price:
                raise ConfigError("--weight-by-price is not available with --stream yet")
            sch = resolve_schema(schema, dataset)
            if funnel_violations is not None:
                sch = sch.model_copy(update={"funnel_violations": funnel_violations})
            meta = {"dataset": dataset or sch.name, "sources": {"train": data, "val": val_data, "test": test_data}, "command": " ".join(sys.argv)}
            res = fit_stream(
                expand_paths(data), sch, model_cfg, train_cfg,
                val_paths=expand_paths(val_data) if val_data else None,
                test_paths=expand_paths(test_data) if test_data else None,
                meta=meta, shuffle_buffer=shuffle_buffer, min_count=min_count, max_vocab=max_vocab, hash_buckets=buckets, **run_kwargs,
            )
        else:
            if data is not None and len(data) != 1:
                raise ConfigError("without --stream, --data takes one file")
            data_path = Path(data[0]) if data else None
            sch = resolve_schema(schema, dataset) if (schema or data_path) else None
            loaded = load_data(dataset, data=data_path, schema=sch, data_dir=data_dir, funnel_violations=funnel_violations)
            if is_main():
                _report_validation(loaded)
            split_cfg = SplitConfig(test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
            splits = split_data(loaded, split_cfg)
            meta = {"dataset": dataset or loaded.schema.name, "sources": loaded.sources, "split": split_cfg.model_dump(), "command": " ".join(sys.argv)}
            res = fit(splits, loaded.schema, model_cfg, train_cfg, meta=meta, weight_by_price=weight_by_price, price_weight_cap=price_weight_cap, hash_buckets=buckets, **run_kwargs)
        if is_main():
            res.bundle.save(out, overwrite=overwrite)
            if checkpoint_dir is None and ckpt.is_dir():  # the default checkpoint has served its purpose
                shutil.rmtree(ckpt, ignore_errors=True)
            console.print(_metric_table(f"{model} on {meta['dataset']} (best epoch {res.result.best_epoch})", {f"{model} ({k})": v for k, v in res.metrics.items()}))
            console.print(f"bundle written to {out}")
            if tensorboard is not None:
                console.print(f"TensorBoard events written to {write_history(res.result.history, tensorboard)}")
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _parse_buckets(items: list[str] | None) -> dict[str, int] | None:
    """``["item_id=1000000", ...]`` → ``{"item_id": 1000000}``. Raises ConfigError when malformed."""
    if not items:
        return None
    out = {}
    for item in items:
        col, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise ConfigError(f"--hash-buckets takes COLUMN=N with N ≥ 1, got {item!r}")
        out[col.strip()] = int(n)
    return out


def _args_without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc K`` / ``--nproc=K`` (the relaunched processes run one rank each)."""
    return [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i > 0 and argv[i - 1] == "--nproc"))]


def _report_validation(loaded) -> None:
    for rep in loaded.reports:
        if rep.dropped_rows:
            err.print(f"[yellow]dropped {len(rep.dropped_rows)} funnel-violating row(s) (conversion without click) from {rep.source}; first rows: {rep.dropped_rows[:10]}[/yellow]")


def evaluate(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="bundle directory")],
    dataset: DatasetOpt = None,
    data: Annotated[Path | None, typer.Option("--data", help="a CSV/Parquet file with the bundle's feature and label columns")] = None,
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="for a built-in dataset: the split to evaluate (test, val)")] = "test",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write metrics JSON here")] = None,
) -> None:
    """Evaluate a bundle on a file, or on a built-in dataset's split (the split it was trained with)."""
    if out is not None:
        check_output(out)
    b = Bundle.load(bundle)
    if data is not None:
        loaded = load_data(None, data=data, schema=b.schema)
        frame = loaded.splits["all"]
    else:
        name = dataset or b.meta.get("dataset")
        loaded = load_data(name, schema=b.schema, data_dir=data_dir)
        cfg = SplitConfig.model_validate(b.meta.get("split", {}))
        _check_choice(split, ("test", "val"), "--split")
        frame = split_data(loaded, cfg)[split]
    metrics = evaluate_split(b.model, b.encode(frame, with_labels=True), b.schema)
    console.print(_metric_table(f"{bundle}", {b.model_config.name: metrics}))
    if out is not None:
        atomic_write_json(metrics, out)
        console.print(f"metrics written to {out}")


def predict(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="bundle directory")],
    data: Annotated[Path, typer.Option("--data", help="CSV/Parquet file to score (labels optional)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write")] = Path("predictions.parquet"),
    fusion: Annotated[Path | None, typer.Option("--fusion", help="fusion JSON: also write the fused `score` column")] = None,
) -> None:
    """Score a file: writes its ids plus p_ctr, p_cvr, p_ctcvr (and `score` with --fusion) per row, in input order."""
    from mtrank.data.io import read_table
    from mtrank.serve.fusion import FusionSpec, fused_score_column

    check_output(out)
    spec = FusionSpec.from_file(fusion).fusion if fusion is not None else None
    b = Bundle.load(bundle)
    table = read_table(data)
    frame = predictions_frame(b, table, str(data))
    if spec is not None:
        frame = frame.with_columns(fused_score_column(spec, frame, table, b.schema.price))
        n_null = frame.get_column("score").null_count()
        if n_null:
            err.print(f"[yellow]warning: {n_null:,} row(s) have no fused score (missing, negative or non-finite price); their score is null[/yellow]")
    atomic_write_parquet(frame, out)
    console.print(f"wrote {frame.height:,} predictions to {out}")


def quickstart(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=f"one of {', '.join(DATASETS)}")] = "simulated",
    data_dir: DataDirOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory, rewritten on each run (default: runs/quickstart, runs/quickstart-<dataset> for the others)")] = None,
    models: Annotated[str, typer.Option(help="comma-separated models")] = "esmm,base",
    seeds: Annotated[int, typer.Option(help="repeat with seeds 0..N-1 and report mean ± std")] = 1,
    epochs: int = 3,
    batch_size: Annotated[int | None, typer.Option(help="rows per step (default: the dataset's, see mtrank.data.datasets)")] = None,
    rows: Annotated[int, typer.Option(help="simulated impressions (simulated dataset only)")] = 1_000_000,
    quiet: QuietOpt = False,
) -> None:
    """Simulate if needed → train ESMM and BASE → evaluate on held-out test → table + metrics.json + report.html."""
    _check_choice(dataset, DATASETS, "--dataset")
    out = out or Path("runs/quickstart" if dataset == "simulated" else f"runs/quickstart-{dataset}")
    names = [m.strip() for m in models.split(",") if m.strip()]
    for m in names:
        _check_choice(m, MODELS, "--models")
    loaded = load_data(dataset, data_dir=data_dir if dataset != "simulated" else (data_dir or out / "data"), sim=SimConfig(rows=rows))
    _report_validation(loaded)
    runs: dict[str, list[dict]] = {m: [] for m in names}
    for seed in range(seeds):
        split_cfg = SplitConfig(seed=seed)
        splits = split_data(loaded, split_cfg)
        if seed == 0:
            console.print(f"{dataset}: " + ", ".join(f"{k} {v.height:,} rows" for k, v in splits.items()))
        for m in names:
            model_cfg, train_cfg = _configs(m, epochs, batch_size or DATASETS[dataset].batch_size, 1e-3, seed, 1, 18, "360,200,80", 0.0, 0)
            meta = {"dataset": dataset, "sources": loaded.sources, "split": split_cfg.model_dump(), "command": " ".join(sys.argv)}
            res = fit(splits, loaded.schema, model_cfg, train_cfg, quiet=quiet, meta=meta)
            res.bundle.save(out / f"{m}-seed{seed}", overwrite=True)
            test = dict(res.metrics["test"], seconds=res.seconds, best_epoch=res.result.best_epoch)
            runs[m].append(test)
            if not quiet:
                err.print(f"seed {seed} {m}: auc_ctr {_fmt(test['auc_ctr'])} auc_cvr_masked {_fmt(test['auc_cvr_masked'])} auc_ctcvr {_fmt(test['auc_ctcvr'])} ({res.seconds:.0f}s)")
    summary = {m: _mean_std(r) for m, r in runs.items()}
    keys = [k for k in SUMMARY if any(k in r[0] for r in runs.values())]
    table = Table(title=f"{dataset}: test metrics, {seeds} seed(s)" + (" (mean ± std)" if seeds > 1 else ""))
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for m, s in summary.items():
        table.add_row(m, *[s[k]["text"] for k in keys])
    console.print(table)
    atomic_write_json({"dataset": dataset, "sources": loaded.sources, "seeds": seeds, "epochs": epochs, "runs": runs, "summary": summary}, out / "metrics.json")
    console.print(f"metrics written to {out / 'metrics.json'}; bundles under {out}/")
    from mtrank.report.build import write_report  # lazy: keeps jinja2 off the start-up path

    console.print(f"report written to {write_report([out], out / 'report.html')}")


def _mean_std(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        if not vals:
            out[k] = {"mean": None, "std": None, "text": "n/a"}
            continue
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[k] = {"mean": mean, "std": std, "text": f"{mean:.4f} ± {std:.4f}" if len(vals) > 1 else f"{mean:.4f}"}
    return out
