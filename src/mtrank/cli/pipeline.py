"""The pipeline commands: ``mtrank simulate``, ``train``, ``evaluate``, ``predict``, ``quickstart``.

Plain functions; :mod:`mtrank.cli` registers them on the app.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtrank.bundle import Bundle
from mtrank.cli.common import (
    SUMMARY,
    BundleOpt,
    ConfigOpt,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    FunnelOpt,
    OverwriteOpt,
    ParquetOutOpt,
    PrecisionOpt,
    QuietOpt,
    SchemaOpt,
    _check_choice,
    _fmt,
    _print_warnings,
    _metric_table,
    _on_command_line,
    _str,
    _tower,
    console,
    device_flags,
    err,
    phase,
    resolve_config,
)
from mtrank.config import RunConfig
from mtrank.data.datasets import DATASETS
from mtrank.data.simulate import write_simulated
from mtrank.data.split import SplitConfig, split_data
from mtrank.errors import BundleError, ConfigError
from mtrank.data.io import check_output
from mtrank.io_utils import atomic_write_json, atomic_write_parquet
from mtrank.metrics.summary import summarise
from mtrank.models import MODELS, RANKERS
from mtrank.train.device import large_batch_defaults, resolve_device, resolve_precision
from mtrank.train.distributed import init_from_env, is_main, run_under_torchrun
from mtrank.train.trainer import TrainConfig
from mtrank.workflow import (
    evaluate_split,
    load_data,
    load_run_data,
    predictions_frame,
    resolve_schema,
    run,
)


def simulate(
    ctx: typer.Context,
    config: ConfigOpt = None,
    out: ParquetOutOpt = Path("data/simulated/simulated.parquet"),
    preset: Annotated[
        str,
        typer.Option(
            help="named settings: default (the original generator), aliccp-like, dense, cart "
            "(click → cart → buy)"
        ),
    ] = "default",
    rows: Annotated[int | None, typer.Option(help="impressions (default: the preset's)")] = None,
    seed: int = 0,
    ctr: Annotated[float | None, typer.Option(help="target mean CTR")] = None,
    cvr: Annotated[float | None, typer.Option(help="target mean CVR given click")] = None,
    n_users: int | None = None,
    n_items: int | None = None,
    intent: Annotated[
        float | None, typer.Option(help="strength λ of the unobserved purchase intent (SSB)")
    ] = None,
    selection: Annotated[
        float | None,
        typer.Option(help="how much λ varies with category, price band, user segment (0 = not)"),
    ] = None,
    sharing: Annotated[
        float | None, typer.Option(help="click/conversion driver sharing ρ in [0, 1]")
    ] = None,
    item_zipf: Annotated[
        float | None, typer.Option(help="Zipf exponent of item popularity")
    ] = None,
    position_effect: Annotated[
        float | None, typer.Option(help="π in logit CTR −= π·log(position)")
    ] = None,
    history_len: Annotated[
        int | None,
        typer.Option(help="last N purchased / carted / favourited items per user (0 = none)"),
    ] = None,
    slate_size: Annotated[
        int | None, typer.Option(help="candidates shown per request (positions 1..S)")
    ] = None,
    stages: Annotated[
        int | None, typer.Option(help="2: click → buy; 3: click → cart → buy (a `cart` column)")
    ] = None,
    cart: Annotated[
        float | None, typer.Option(help="target mean P(cart | click) (3 stages)")
    ] = None,
    cart_lift: Annotated[
        float | None, typer.Option(help="log-odds lift κ of a buy after a cart (3 stages)")
    ] = None,
    part_rows: Annotated[
        int | None,
        typer.Option(help="write a directory of Parquet parts of this many rows (bounded memory)"),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a synthetic mall's impression log (exact true_ctr, true_cvr_clicked, true_cvr_do,
    true_ctcvr per row; with --stages 3 also a cart column and true_cart, true_cart_all,
    true_buy_cart, true_buy_nocart) as Parquet; the settings go into the file's metadata.

    ``--preset`` picks named settings, the other flags override them. With ``--config FILE`` the
    simulator settings are the config's ``data.simulator`` (flags on the command line override)."""
    from mtrank.data.simulate import preset_config

    knobs = {
        "rows": rows,
        "ctr": ctr,
        "cvr": cvr,
        "n_users": n_users,
        "n_items": n_items,
        "intent": intent,
        "selection": selection,
        "sharing": sharing,
        "item_zipf": item_zipf,
        "position_effect": position_effect,
        "history_len": history_len,
        "slate_size": slate_size,
        "stages": stages,
        "cart": cart,
        "cart_lift": cart_lift,
    }
    if config is None:
        cfg = preset_config(preset, seed=seed, **knobs)
    else:
        if _on_command_line(ctx, "preset"):
            raise ConfigError(
                "--preset cannot be combined with --config; write the preset's knobs into "
                "data.simulator"
            )
        run_cfg = resolve_config(
            ctx,
            config,
            {
                name: (f"data.simulator.{name}", value)
                for name, value in [("seed", seed), *knobs.items()]
            },
        )
        cfg = run_cfg.data.simulator
        preset = cfg.preset
    check_output(out, kind="dir" if part_rows else "file")
    path = write_simulated(
        cfg, out, part_rows=part_rows, progress=sys.stderr.isatty(), overwrite=overwrite
    )
    console.print(
        f"wrote {path} ({cfg.rows // cfg.slate_size * cfg.slate_size:,} impressions, preset "
        f"{preset})"
    )


def train(
    ctx: typer.Context,
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data", help="CSV/Parquet file, directory or glob (with --schema); repeatable"
        ),
    ] = None,
    schema: SchemaOpt = None,
    data_dir: DataDirOpt = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help=f"one of {', '.join([*MODELS, *RANKERS])}")
    ] = "esmm",
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle directory to write")] = Path(
        "runs/model"
    ),
    epochs: int = 3,
    batch_size: Annotated[
        int | None, typer.Option(help="rows per step (default: 2048 on CPU, 16384 on a GPU)")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Adam learning rate (default: 1e-3; × √8 with the GPU default batch)"),
    ] = None,
    seed: int = 0,
    patience: int = 1,
    embedding_dim: int = 18,
    tower: Annotated[str, typer.Option(help="tower hidden sizes")] = "360,200,80",
    dropout: float = 0.0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    funnel_violations: FunnelOpt = None,
    threads: int = 0,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="stream --data piece by piece (flat memory); evaluate on --val-data / --test-data",
        ),
    ] = False,
    val_data: Annotated[
        list[str] | None, typer.Option("--val-data", help="validation files (with --stream)")
    ] = None,
    test_data: Annotated[
        list[str] | None, typer.Option("--test-data", help="test files (with --stream)")
    ] = None,
    shuffle_buffer: Annotated[
        int, typer.Option(help="rows in the streaming shuffle buffer")
    ] = 262_144,
    min_count: Annotated[int, typer.Option(help="ids seen fewer times map to the OOV index")] = 1,
    max_vocab: Annotated[
        int | None, typer.Option(help="keep at most this many ids per field")
    ] = None,
    hash_buckets: Annotated[
        list[str] | None,
        typer.Option(
            "--hash-buckets",
            help="COLUMN=N: hash this categorical column into N buckets (stable FNV-1a) "
            "instead of a vocabulary; repeatable",
        ),
    ] = None,
    sparse_embeddings: Annotated[
        bool,
        typer.Option("--sparse-embeddings", help="update only touched embedding rows (SparseAdam)"),
    ] = False,
    nproc: Annotated[
        int, typer.Option(help="data-parallel processes (re-launches under torchrun)")
    ] = 1,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(help="checkpoint directory (default: OUT.ckpt); written every epoch"),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(help="also checkpoint every N steps (0 = epoch ends only)")
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an interrupted run from its checkpoint")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an existing bundle")
    ] = False,
    weight_by_price: Annotated[
        bool,
        typer.Option(
            "--weight-by-price",
            help="weight converted rows by 1 + min(log1p(price)/mean, cap) (see "
            "mtrank.data.weights)",
        ),
    ] = False,
    price_weight_cap: Annotated[
        float, typer.Option(help="largest extra weight with --weight-by-price")
    ] = 3.0,
    negative_sampling_rate: Annotated[
        float | None,
        typer.Option(
            "--negative-sampling-rate",
            help="keep each unclicked train/val impression with this probability, in (0, 1]; "
            "predictions are corrected for it (see docs/features.md)",
        ),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            "--tensorboard",
            help="also write the per-epoch metrics as TensorBoard event files here (needs "
            "tensorboard)",
        ),
    ] = None,
    ltr_option: Annotated[
        list[str] | None,
        typer.Option(
            "--ltr-option",
            help="with --model ltr: key=value of mtrank.models.ltr.LTRConfig (k, "
            "early_stopping, n_estimators, value_coef …); repeatable",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="with --stream: keep encoded pieces here (safetensors) so later epochs skip "
            "reading and encoding",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a model, early-stopped on validation; evaluate on test; write a bundle.

    `--model ltr`: LambdaMART (LightGBM lambdarank) on graded relevance, early-stopped on
    validation NDCG@K, evaluated with ranking metrics (see docs/ltr.md).

    With ``--config FILE`` the run config gives every setting and the flags given on the
    command line override its keys; the bundle records the resolved config.

    Data parallel: `mtrank train --nproc K ...` or `torchrun --nproc_per_node=K -m mtrank train ...`
    (DistributedDataParallel, gloo on CPU / NCCL on GPU; only rank 0 writes).
    """
    _check_choice(funnel_violations, ("error", "drop"), "--funnel-violations")
    if model in RANKERS:
        if config is not None:
            raise ConfigError(
                "--model ltr takes its settings from the flags and --ltr-option; --config is "
                "not supported for it yet"
            )
        return _train_ranker(
            dataset,
            data,
            schema,
            data_dir,
            out,
            overwrite,
            seed,
            threads,
            test_fraction,
            val_fraction,
            funnel_violations,
            ltr_option,
            quiet,
        )
    _check_choice(model, MODELS, "--model")
    if config is None:  # without a config file: the device's batch size and learning rate
        batch_size, lr = _device_defaults(device, precision, batch_size, lr)
    cfg = resolve_config(
        ctx,
        config,
        {
            "dataset": ("data.dataset", dataset),
            "data": ("data.paths", lambda: data or []),
            "schema": ("data.schema", schema),
            "data_dir": ("data.data_dir", lambda: _str(data_dir)),
            "funnel_violations": ("data.funnel_violations", funnel_violations),
            "test_fraction": ("data.split.test_fraction", test_fraction),
            "val_fraction": ("data.split.val_fraction", val_fraction),
            "stream": ("data.stream", stream),
            "val_data": ("data.val_paths", lambda: val_data or []),
            "test_data": ("data.test_paths", lambda: test_data or []),
            "shuffle_buffer": ("data.shuffle_buffer", shuffle_buffer),
            "cache_dir": ("data.cache_dir", lambda: _str(cache_dir)),
            "min_count": ("features.min_count", min_count),
            "max_vocab": ("features.max_vocab", max_vocab),
            "hash_buckets": ("features.hash_buckets", lambda: _parse_buckets(hash_buckets) or {}),
            "model": ("model.name", model),
            "embedding_dim": ("model.embedding_dim", embedding_dim),
            "tower": ("model.tower", lambda: _tower(tower)),
            "dropout": ("model.dropout", dropout),
            "epochs": ("training.epochs", epochs),
            "batch_size": ("training.batch_size", batch_size),
            "lr": ("training.lr", lr),
            "seed": ("training.seed", seed),
            "patience": ("training.patience", patience),
            "threads": ("training.threads", threads),
            "device": ("training.device", device),
            "precision": ("training.precision", precision),
            "sparse_embeddings": ("training.sparse_embeddings", sparse_embeddings),
            "nproc": ("training.nproc", nproc),
            "checkpoint_dir": ("training.checkpoint_dir", lambda: _str(checkpoint_dir)),
            "checkpoint_every": ("training.checkpoint_every", checkpoint_every),
            "resume": ("training.resume", resume),
            "weight_by_price": ("training.weight_by_price", weight_by_price),
            "price_weight_cap": ("training.price_weight_cap", price_weight_cap),
            "negative_sampling_rate": (
                "training.negative_sampling_rate",
                negative_sampling_rate,
            ),
            "tensorboard": ("evaluation.tensorboard", lambda: _str(tensorboard)),
            "out": ("export.out", lambda: str(out)),
            "overwrite": ("export.overwrite", overwrite),
        },
    )
    if cfg.data.cache_dir and not cfg.data.stream:
        raise ConfigError(
            "--cache-dir (data.cache_dir) works with --stream (in-memory data is encoded once "
            "anyway)"
        )
    train_from_config(cfg, quiet=quiet)


def _device_defaults(
    device: str, precision: str, batch_size: int | None, lr: float | None
) -> tuple[int, float]:
    """Check ``--device`` / ``--precision`` here (one ``error:`` line) and fill the batch size
    and learning rate left unset (see :func:`mtrank.train.device.large_batch_defaults`)."""
    dev = resolve_device(device)
    resolve_precision(precision, dev)
    return large_batch_defaults(dev, batch_size, lr, base_lr=TrainConfig.model_fields["lr"].default)


def train_from_config(cfg: RunConfig, *, quiet: bool = False) -> None:
    """``mtrank train`` once its settings are resolved: train, print the metrics, write the
    bundle."""
    t = cfg.training
    out = Path(cfg.export.out)
    if out.exists() and not cfg.export.overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    check_output(out, kind="dir")
    if t.checkpoint_dir:
        check_output(t.checkpoint_dir, kind="dir", option="--checkpoint-dir")
    if t.nproc > 1 and "LOCAL_RANK" not in os.environ:
        sys.exit(run_under_torchrun(t.nproc, _args_without_nproc(sys.argv[1:])))
    writer = None
    if cfg.evaluation.tensorboard is not None and is_main():
        from mtrank.report.tensorboard import EpochWriter

        writer = EpochWriter(cfg.evaluation.tensorboard)  # each epoch is written as soon as it ends
    created = init_from_env(t.device, sparse=t.sparse_embeddings)
    try:
        ckpt = Path(t.checkpoint_dir) if t.checkpoint_dir else out.with_name(out.name + ".ckpt")
        loaded = None
        if not cfg.data.stream:
            phase("loading data", quiet or not is_main())
            loaded = load_run_data(cfg)
            if is_main():
                _report_validation(loaded)
        phase(f"training {cfg.model.name}", quiet or not is_main())
        res = run(
            cfg,
            quiet=quiet or not is_main(),
            on_epoch=writer,
            loaded=loaded,
            checkpoint=ckpt,
            meta={"command": " ".join(sys.argv)},
        )
        if is_main():
            res.bundle.save(out, overwrite=cfg.export.overwrite)
            if (
                not t.checkpoint_dir and ckpt.is_dir()
            ):  # the default checkpoint has served its purpose
                shutil.rmtree(ckpt, ignore_errors=True)
            name, dataset = cfg.model.name, res.bundle.meta["dataset"]
            console.print(
                _metric_table(
                    f"{name} on {dataset} (best epoch {res.result.best_epoch})",
                    {f"{name} ({k})": v for k, v in res.metrics.items()},
                    stages=res.bundle.schema.stage_names,
                )
            )
            _print_warnings(res.metrics)
            console.print(f"bundle written to {out}")
            if writer is not None:
                console.print(f"TensorBoard events written to {writer.path}")
    finally:
        if writer is not None:
            writer.close()
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_ranker(
    dataset,
    data,
    schema,
    data_dir,
    out,
    overwrite,
    seed,
    threads,
    test_fraction,
    val_fraction,
    funnel_violations,
    options,
    quiet,
) -> None:
    """`mtrank train --model ltr`: :func:`mtrank.ranking.ltr.train_ltr_run`, save, print metrics."""
    from mtrank.ranking.ltr import log_to_stderr, ltr_options, train_ltr_run

    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    if data is not None and len(data) != 1:
        raise ConfigError("--model ltr takes one --data file")
    cfg = ltr_options(options, seed=seed, threads=threads)
    data_path = Path(data[0]) if data else None
    sch = resolve_schema(schema, dataset) if (schema or data_path) else None
    split_cfg = SplitConfig(test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    res = train_ltr_run(
        dataset,
        data_path,
        sch,
        data_dir,
        split_cfg,
        cfg,
        funnel_violations=funnel_violations,
        meta={"command": " ".join(sys.argv)},
        log=None if quiet else log_to_stderr,
    )
    res.bundle.save(out, overwrite=overwrite)
    keys = [k for k in next(iter(res.metrics.values()), {}) if "@" in k]
    console.print(
        _metric_table(
            f"ltr on {res.bundle.meta['dataset']} (best iteration {res.info['best_iteration']})",
            {f"ltr ({k})": v for k, v in res.metrics.items()},
            keys,
        )
    )
    console.print(
        f"bundle written to {out} (LightGBM model.txt; scores are ranking scores, no pCTR/pCVR)"
    )


def _parse_buckets(items: list[str] | None) -> dict[str, int] | None:
    """``["item_id=1000000", ...]`` → ``{"item_id": 1000000}``. Raises ConfigError when
    malformed."""
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
    return [
        a
        for i, a in enumerate(argv)
        if not (a.startswith("--nproc") or (i > 0 and argv[i - 1] == "--nproc"))
    ]


def _report_validation(loaded) -> None:
    for rep in loaded.reports:
        if rep.dropped_rows:
            err.print(
                f"[yellow]dropped {len(rep.dropped_rows)} funnel-violating row(s) (a stage "
                f"without its `after` stage, e.g. conversion without click) from {rep.source}; "
                "first rows: "
                f"{rep.dropped_rows[:10]}[/yellow]"
            )


def evaluate(
    ctx: typer.Context,
    config: ConfigOpt = None,
    bundle: BundleOpt = None,
    dataset: DatasetOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="a CSV/Parquet file with the bundle's feature and label columns"
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    split: Annotated[
        str, typer.Option(help="for a built-in dataset: the split to evaluate (test, val)")
    ] = "test",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write metrics JSON here")] = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a bundle on a file, or on a built-in dataset's split (the split it was trained
    with)."""
    _check_choice(split, ("test", "val"), "--split")
    cfg = resolve_config(
        ctx,
        config,
        {
            "bundle": ("export.out", lambda: _str(bundle)),
            "dataset": ("data.dataset", dataset),
            "data": ("data.paths", lambda: [str(data)] if data else None),
            "data_dir": ("data.data_dir", lambda: _str(data_dir)),
            "split": ("evaluation.split", split),
            "out": ("evaluation.out", lambda: _str(out)),
        },
    )
    bundle, dataset, data_dir = Path(cfg.export.out), cfg.data.dataset, cfg.data.data_dir
    data = Path(cfg.data.paths[0]) if cfg.data.paths else None
    split, out = cfg.evaluation.split, (Path(cfg.evaluation.out) if cfg.evaluation.out else None)
    if out is not None:
        check_output(out)
    b = Bundle.load(bundle, device=device)
    if data is not None:
        phase(f"loading {data}", quiet)
        loaded = load_data(None, data=data, schema=b.schema)
        frame = loaded.splits["all"]
    else:
        name = dataset or b.meta.get("dataset")
        if dataset is None and name not in DATASETS:  # own data: meta holds the schema's name
            raise ConfigError(
                f"bundle {bundle} was trained on your own data (schema {b.schema.name!r}), not a "
                "built-in dataset: pass --data FILE"
            )
        phase(f"loading {name} ({split} split)", quiet)
        loaded = load_data(name, schema=b.schema, data_dir=data_dir)
        frame = split_data(loaded, SplitConfig.model_validate(b.meta.get("split", {})))[split]
    phase(f"scoring {frame.height:,} rows with {b.model_config.name}", quiet)
    if b.model_config.name in RANKERS:
        from mtrank.ranking.ltr import evaluate_ranker

        metrics = evaluate_ranker(b, frame, source=str(data or split))
        table = _metric_table(
            f"{bundle}", {b.model_config.name: metrics}, [k for k in metrics if "@" in k]
        )
    else:
        metrics = evaluate_split(b.model, b.encode(frame, with_labels=True), b.schema)
        table = _metric_table(
            f"{bundle}", {b.model_config.name: metrics}, stages=b.schema.stage_names
        )
    console.print(table)
    _print_log_notes(b)
    _print_warnings({str(data) if data is not None else split: metrics})
    if out is not None:
        atomic_write_json(metrics, out)
        console.print(f"metrics written to {out}")


def predict(
    ctx: typer.Context,
    config: ConfigOpt = None,
    bundle: BundleOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="CSV/Parquet file to score (labels optional; default: the config's data.paths)",
        ),
    ] = None,
    out: ParquetOutOpt = Path("predictions.parquet"),
    fusion: Annotated[
        Path | None,
        typer.Option("--fusion", help="fusion JSON: also write the fused `score` column"),
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Score a file: writes its ids plus p_ctr, p_cvr, p_ctcvr (and `score` with --fusion) per row,
    in input order; an LTR bundle writes its ranking `score`."""
    cfg = resolve_config(
        ctx,
        config,
        {
            "bundle": ("export.out", lambda: _str(bundle)),
            "data": ("data.paths", lambda: [str(data)] if data else None),
            "fusion": ("fusion.file", lambda: _str(fusion)),
        },
    )
    if len(cfg.data.paths) != 1:
        raise ConfigError("give the file to score: --data (or one data.paths entry in --config)")
    bundle, data = Path(cfg.export.out), Path(cfg.data.paths[0])
    fusion = Path(cfg.fusion.file) if cfg.fusion.file else None
    from mtrank.data.io import read_table
    from mtrank.serve.fusion import FusionSpec, fused_score_column

    check_output(out)
    spec = FusionSpec.from_file(fusion).fusion if fusion is not None else None
    b = Bundle.load(bundle, device=device)
    table = read_table(data)
    frame = predictions_frame(b, table, str(data))
    _warn_out_of_range(b, table, data)
    if spec is not None and "p_ctr" not in frame.columns:
        raise ConfigError(
            f"--fusion needs pCTR and pCVR; model {b.model_config.name!r} writes its own "
            "ranking score `score` (no probabilities), so drop --fusion"
        )
    if spec is not None:
        frame = frame.with_columns(fused_score_column(spec, frame, table, b.schema.price))
        n_null = frame.get_column("score").null_count()
        if n_null:
            err.print(
                f"[yellow]warning: {n_null:,} row(s) have no fused score (missing, negative or "
                "non-finite price); their score is null[/yellow]"
            )
    atomic_write_parquet(frame, out)
    console.print(f"wrote {frame.height:,} predictions to {out}")


def _print_log_notes(b: Bundle) -> None:
    """What evaluate adds for a model trained on sampled negatives or with a position tower:
    which rows the metrics are on, and the learnt position effects."""
    ns = b.meta.get("negative_sampling")
    if ns:
        console.print(
            f"negatives sampled at rate {ns['rate']:g} in training: pCTR and pCTCVR are "
            f"corrected for it; metrics are on {ns.get('evaluated_on', 'unsampled rows')}"
        )
    pos = b.meta.get("position")
    if pos:
        table = Table(title=f"learnt position effect on the CTR logit ({pos['column']!r})")
        table.add_column("position", justify="right")
        table.add_column("effect", justify="right")
        for k, v in pos["effects"].items():
            table.add_row(k, f"{v:+.4f}")
        console.print(table)
        console.print(
            f"scored position-free: as if at position {pos['reference']} (effect 0); serving "
            "needs no position"
        )


def _warn_out_of_range(b: Bundle, table, source: Path) -> None:
    """One warning per numerical column with values far outside the training range."""
    for col, n in b.encoder.out_of_range_counts(table).items():
        if not n:
            continue
        enc = next(e for e in b.encoder.numerical if e.column == col)
        unit = (
            f"; the model was trained with {col} in {b.schema.price_unit}"
            if col == b.schema.price and b.schema.price_unit
            else ""
        )
        err.print(
            f"[yellow]warning: {source}: column {col!r}: {n:,} value(s) far outside the training "
            f"range [{enc.low:.6g}, {enc.high:.6g}] (a unit mix-up?){unit}; they are scored as "
            "given[/yellow]"
        )


def quickstart(
    ctx: typer.Context,
    config: ConfigOpt = None,
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help=f"one of {', '.join(DATASETS)}")
    ] = "simulated",
    data_dir: DataDirOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="run directory, rewritten on each run (default: runs/quickstart, "
            "runs/quickstart-<dataset> for the others)",
        ),
    ] = None,
    models: Annotated[str, typer.Option(help="comma-separated models")] = "esmm,base",
    seeds: Annotated[int, typer.Option(help="repeat with seeds 0..N-1 and report mean ± std")] = 1,
    epochs: int = 3,
    batch_size: Annotated[
        int | None,
        typer.Option(help="rows per step (default: the dataset's, see mtrank.data.datasets)"),
    ] = None,
    rows: Annotated[
        int, typer.Option(help="simulated impressions (simulated dataset only)")
    ] = 1_000_000,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    quiet: QuietOpt = False,
) -> None:
    """Simulate if needed → train ESMM and BASE → evaluate on held-out test → table +
    metrics.json + report.html.

    With ``--config FILE`` the data, model sizes and training budget come from the run config
    (flags given on the command line override them); each model of ``--models`` and each seed
    is one run of that config.
    """
    _check_choice(dataset, DATASETS, "--dataset")
    cfg = resolve_config(
        ctx,
        config,
        {
            **device_flags(device, precision),
            "dataset": ("data.dataset", dataset),
            "data_dir": ("data.data_dir", lambda: _str(data_dir)),
            "rows": ("data.simulator.rows", rows),
            "epochs": ("training.epochs", epochs),
            "batch_size": (
                "training.batch_size",
                lambda: batch_size or DATASETS[dataset].batch_size,
            ),
        },
    )
    dataset = cfg.data.dataset
    if dataset is None:
        raise ConfigError("quickstart needs a built-in data.dataset (--dataset)")
    out = out or Path("runs/quickstart" if dataset == "simulated" else f"runs/quickstart-{dataset}")
    if dataset == "simulated" and cfg.data.data_dir is None:
        cfg = cfg.override({"data.data_dir": str(out / "data")})
    names = [m.strip() for m in models.split(",") if m.strip()]
    for m in names:
        _check_choice(m, MODELS, "--models")
    phase(f"loading {dataset}", quiet)
    loaded = load_run_data(cfg)
    _report_validation(loaded)
    runs: dict[str, list[dict]] = {m: [] for m in names}
    for seed in range(seeds):
        if seed == 0:
            splits = split_data(loaded, cfg.data.split.split_config(seed))
            console.print(
                f"{dataset}: " + ", ".join(f"{k} {v.height:,} rows" for k, v in splits.items())
            )
        for m in names:
            phase(f"seed {seed}: training {m}", quiet)
            run_cfg = cfg.override({"model.name": m, "training.seed": seed})
            res = run(run_cfg, quiet=quiet, loaded=loaded, meta={"command": " ".join(sys.argv)})
            res.bundle.save(out / f"{m}-seed{seed}", overwrite=True)
            test = dict(res.metrics["test"], seconds=res.seconds, best_epoch=res.result.best_epoch)
            runs[m].append(test)
            if not quiet:
                shown = [k for k in SUMMARY if k in test][:3]
                err.print(
                    f"seed {seed} {m}: "
                    + " ".join(f"{k} {_fmt(test[k])}" for k in shown)
                    + f" ({res.seconds:.0f}s)"
                )
    summary = {m: summarise(r) for m, r in runs.items()}
    keys = [k for k in SUMMARY if any(k in r[0] for r in runs.values())]
    table = Table(
        title=f"{dataset}: test metrics, {seeds} seed(s)" + (" (mean ± std)" if seeds > 1 else "")
    )
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for m, s in summary.items():
        table.add_row(
            m,
            *[
                _fmt(s[k]["mean"], s[k]["std"] if s[k]["n"] > 1 else None) if k in s else "n/a"
                for k in keys
            ],
        )
    console.print(table)
    doc = {
        "dataset": dataset,
        "sources": loaded.sources,
        "seeds": seeds,
        "epochs": cfg.training.epochs,
        "runs": runs,
        "summary": summary,
    }
    atomic_write_json(doc, out / "metrics.json")
    console.print(f"metrics written to {out / 'metrics.json'}; bundles under {out}/")
    from mtrank.report.build import write_report  # lazy: keeps jinja2 off the start-up path

    phase("writing the report", quiet)
    console.print(f"report written to {write_report([out], out / 'report.html')}")
