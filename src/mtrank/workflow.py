"""High-level jobs shared by the CLI and the Python API: load → split → encode → train →
evaluate → bundle. Each step is a plain function so tests and notebooks can call them directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import torch

from mtrank.config import RunConfig, load_config
from mtrank.data.batch import EncodedData
from mtrank.data.datasets import DATASETS, LoadedData, load_table, resolve_data_dir
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.io import validate_frame
from mtrank.data.schema import Schema
from mtrank.data.simulate import (
    SimConfig,
    simulate,
    simulated_schema,
    write_simulated,
)
from mtrank.data.split import SplitConfig, split_data
from mtrank.data.weights import (
    combine,
    evaluation_weights,
    mean_log_price,
    price_weights,
    sample_negatives,
)
from mtrank.errors import ConfigError, SchemaError
from mtrank.metrics.evaluate import CALIBRATION_BINS, calibration_curves, evaluate_outputs
from mtrank.models import build_model
from mtrank.models.calibration import with_sampling_correction
from mtrank.models.config import FeatureSpec, ListInput, ModelConfig
from mtrank.models.position import PositionTower, position_tower
from mtrank.bundle import Bundle
from mtrank.train.checkpoint import run_fingerprint
from mtrank.train.device import resolve_device
from mtrank.train.trainer import EpochLog, TrainConfig, Trainer, TrainResult, predict


def resolve_schema(spec: str | Path | None, dataset: str | None = None) -> Schema:
    """A schema from a built-in dataset name, or from a YAML/JSON file."""
    if spec is None and dataset is not None:
        spec = dataset
    if spec is None:
        raise ConfigError("give --schema (a YAML file or a built-in dataset name) with --data")
    if str(spec) in DATASETS:
        return DATASETS[str(spec)].schema
    return Schema.from_file(spec)


def load_data(
    dataset: str | None = None,
    *,
    data: str | Path | None = None,
    schema: Schema | None = None,
    data_dir: str | Path | None = None,
    funnel_violations: str | None = None,
    sim: SimConfig | None = None,
) -> LoadedData:
    """Load a built-in dataset (``dataset``) or a file (``data`` with ``schema``), validated.

    For ``dataset="simulated"`` without ``data``, the simulator's Parquet file is read from
    ``<data_dir>/simulated/`` (:func:`simulated_file_name`) and generated first if absent.

    Raises:
        ConfigError: neither or an unknown dataset; DatasetNotFoundError: files absent;
        DataError: the data fails validation.
    """
    if dataset is None and data is None:
        raise ConfigError("give a built-in --dataset or a --data file")
    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; built-in datasets: {sorted(DATASETS)}")
    if schema is None:
        if dataset is None:
            raise SchemaError("a --data file needs a --schema (YAML file or built-in dataset name)")
        schema = simulated_schema(sim) if dataset == "simulated" else DATASETS[dataset].schema
    if funnel_violations is not None:
        schema = schema.model_copy(update={"funnel_violations": funnel_violations})
    root = resolve_data_dir(data_dir)
    if data is None and dataset == "simulated":
        sim = sim or SimConfig()
        data = root / "simulated" / simulated_file_name(sim)
        if not Path(data).exists():
            write_simulated(sim, data)
    if data is not None:
        df, rep = load_table(data, schema)
        return LoadedData(schema, {"all": df}, {"all": str(data)}, [rep])
    info = DATASETS[dataset]
    return info.loader(root, schema)


def simulated_file_name(sim: SimConfig) -> str:
    """``simulated-<rows>-seed<seed>.parquet`` for the default preset's settings, else the
    preset and a hash of every knob, so different mall settings never share a cached file."""
    if sim == SimConfig(rows=sim.rows, seed=sim.seed):
        return f"simulated-{sim.rows}-seed{sim.seed}.parquet"
    digest = hashlib.sha256(
        json.dumps(sim.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()[:10]
    return f"simulated-{sim.preset}-{digest}-{sim.rows}-seed{sim.seed}.parquet"


def simulated_data(sim: SimConfig) -> LoadedData:
    """Simulate in memory and validate against the simulator's schema (no file written)."""
    schema = simulated_schema(sim)
    df, rep = validate_frame(
        simulate(sim), schema, f"simulator(preset={sim.preset}, seed={sim.seed})"
    )
    return LoadedData(schema, {"all": df}, {"all": rep.source}, [rep])


def feature_spec(encoder: FeatureEncoder, schema: Schema) -> FeatureSpec:
    """What a model is built from: the fitted encoders' sizes and the schema's tasks."""
    return FeatureSpec(
        cardinalities=encoder.cardinalities,
        n_numerical=len(encoder.numerical),
        funnel=schema.is_funnel and not schema.is_staged,
        task_names=list(schema.tasks),
        lists=[ListInput(**e.input_fields(schema.categorical)) for e in encoder.lists],
        stages=schema.stage_names,
        parents=schema.stage_parents,
    )


@dataclass
class FitOutput:
    """What :func:`fit` and :func:`run` return: the bundle (not saved), the training result,
    metrics per held-out split (``val``, ``test``) and the seconds taken."""

    bundle: Bundle
    result: TrainResult
    metrics: dict[str, dict]
    seconds: float


def fit(
    splits: dict[str, pl.DataFrame],
    schema: Schema,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    quiet: bool = False,
    meta: dict | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    weight_by_price: bool = False,
    price_weight_cap: float = 3.0,
    hash_buckets: dict[str, int] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    min_count: int = 1,
    max_vocab: int | None = None,
    negative_sampling_rate: float | None = None,
) -> FitOutput:
    """Fit encoders on train only, train the model with early stopping on val, and evaluate on
    val and test. Returns the bundle (not yet saved) and metrics per split.

    With ``negative_sampling_rate`` r, the unclicked rows of train and val are kept with
    probability r (:func:`mtrank.data.weights.sample_negatives`, seeded by the training seed)
    before the encoders are fitted; test stays unsampled, and the model's pCTR / pCTCVR are
    corrected for r (:mod:`mtrank.models.calibration`).

    ``checkpoint``, ``checkpoint_every`` and ``resume`` are passed to :meth:`Trainer.fit`;
    ``on_epoch`` (called with each epoch's log as it ends) to :class:`Trainer`.

    With ``weight_by_price`` the train and val rows get the sample weights of
    :func:`mtrank.data.weights.price_weights` from the schema's price column (normaliser from
    the train split), so the loss and the early-stopping objective lean toward valuable
    conversions; the reported metrics stay unweighted.

    Raises:
        SchemaError: ``weight_by_price`` with a schema without a price column or funnel.
    """
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    if negative_sampling_rate is not None:
        if not schema.is_funnel:
            raise SchemaError("negative sampling needs a funnel schema (click/conversion)")
        splits = {
            k: sample_negatives(v, schema.click, negative_sampling_rate, train_cfg.seed)
            if k in ("train", "val")
            else v
            for k, v in splits.items()
        }
    encoder = FeatureEncoder.fit(
        splits["train"], schema, min_count=min_count, max_size=max_vocab, hash_buckets=hash_buckets
    )
    encoded = {k: EncodedData.from_frame(v, schema, encoder) for k, v in splits.items() if v.height}
    weighting = None
    if weight_by_price:
        weighting = _add_price_weights(splits, encoded, schema, price_weight_cap)
    meta = {
        **(meta or {}),
        "rows": {k: v.height for k, v in splits.items()},
        **({"weighting": weighting} if weighting else {}),
    }
    return fit_encoded(
        encoded,
        encoder,
        schema,
        model_cfg,
        train_cfg,
        quiet=quiet,
        meta=meta,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        start=start,
        on_epoch=on_epoch,
        sampled_rate=negative_sampling_rate,
    )


def fit_encoded(
    encoded: dict[str, EncodedData],
    encoder: FeatureEncoder,
    schema: Schema,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    quiet: bool = False,
    meta: dict | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    evaluate: tuple[str, ...] | None = None,
    start: float | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    sampled_rate: float | None = None,
) -> FitOutput:
    """The training step of :func:`fit` on already encoded splits (``train``, optional ``val``,
    ``test`` …): build the model, train it with early stopping on ``val`` (the rule in
    ``train_cfg.monitor``), evaluate the splits named in ``evaluate`` (default: every split but
    ``train``). :func:`fit` and the benchmark (:mod:`mtrank.benchmark`) both train through here.

    A schema ``position`` trains a :class:`~mtrank.models.position.PositionTower` around the
    model, dropped afterwards (the bundle's model is position-free; the learnt effects go to
    ``meta["position"]``). Negatives sampled at rate r (the schema's ``negative_sampling``
    times ``sampled_rate``, mtrank's own sampling in :func:`fit`) wrap the trained model in the
    correction of :mod:`mtrank.models.calibration` before it is evaluated and bundled.
    """
    start = time.perf_counter() if start is None else start
    torch.manual_seed(train_cfg.seed)
    spec = feature_spec(encoder, schema)
    model = position_tower(build_model(spec, model_cfg), encoded["train"].position)
    train, val = training_views(model, encoded["train"], encoded.get("val"), train_cfg.seed)
    trainer = Trainer(train_cfg, schema, quiet=quiet, on_epoch=on_epoch)
    fingerprint = None
    if checkpoint is not None:
        t = encoded["train"]
        fingerprint = run_fingerprint(
            data=[t.categorical, t.numerical, *(t.labels[k] for k in sorted(t.labels)), *t.extra],
            schema=schema.model_dump(mode="json"),
            encoders=encoder.to_json(),
            model=[model_cfg.model_dump(mode="json"), spec.model_dump(mode="json")],
        )
    result = trainer.fit(
        model,
        train,
        val,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        fingerprint=fingerprint,
    )
    model, log_meta = serving_model(model, schema, sampled_rate)
    names = [k for k in encoded if k != "train"] if evaluate is None else list(evaluate)
    metrics, curves = _evaluate(model, {k: encoded[k] for k in names if k in encoded}, schema)
    seconds = time.perf_counter() - start
    bundle_meta = {
        "rows": {k: len(v) for k, v in encoded.items()},
        **(meta or {}),
        "train": train_cfg.model_dump(mode="json"),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "history": [asdict(h) for h in result.history],
        "metrics": metrics,
        "seconds": seconds,
        **log_meta,
        **_calibration_meta(curves, schema),
    }
    bundle = Bundle(model, encoder, schema, model_cfg, spec, bundle_meta)
    return FitOutput(bundle, result, metrics, seconds)


def fit_stream(
    train_paths: list[Path],
    schema: Schema,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    val_paths: list[Path] | None = None,
    test_paths: list[Path] | None = None,
    quiet: bool = False,
    meta: dict | None = None,
    shuffle_buffer: int = 262_144,
    min_count: int = 1,
    max_vocab: int | None = None,
    hash_buckets: dict[str, int] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    on_epoch: Callable[[EpochLog], None] | None = None,
    cache_dir: Path | None = None,
    readers: int | None = None,
) -> FitOutput:
    """Like :func:`fit`, but the training files are streamed piece by piece (flat memory):
    encoders are fitted in one streaming pass, batches come from a shuffle buffer. Validation
    and test files are encoded piece by piece and evaluated exactly over all their rows.

    ``cache_dir`` keeps the encoded training pieces for later epochs; ``readers`` is the number
    of pieces read and encoded at once (default: 1 on CPU, where the cores belong to the
    matmuls; up to 4 feeding a GPU). See :class:`mtrank.data.stream.ParquetStream`."""
    from mtrank.data.stream import ParquetStream, fit_encoder_streaming

    if schema.position is not None:
        raise ConfigError(
            f"schema position {schema.position!r} (the position tower) is not available with "
            "--stream yet; train in memory"
        )
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    encoder = fit_encoder_streaming(
        train_paths, schema, min_count=min_count, max_size=max_vocab, hash_buckets=hash_buckets
    )
    if readers is None:
        on_gpu = resolve_device(train_cfg.device).type == "cuda"
        readers = max(1, min(4, (os.cpu_count() or 2) // 2)) if on_gpu else 1
    train = ParquetStream(
        train_paths,
        schema,
        encoder,
        shuffle_buffer=shuffle_buffer,
        readers=readers,
        cache_dir=cache_dir,
    )
    val = ParquetStream(val_paths, schema, encoder).load_all() if val_paths else None
    spec = feature_spec(encoder, schema)
    model = build_model(spec, model_cfg)
    fingerprint = (
        None
        if checkpoint is None
        else run_fingerprint(
            data=[Path(p) for p in train_paths],
            schema=schema.model_dump(mode="json"),
            encoders=encoder.to_json(),
            model=[model_cfg.model_dump(mode="json"), spec.model_dump(mode="json")],
        )
    )
    result = Trainer(train_cfg, schema, quiet=quiet, on_epoch=on_epoch).fit(
        model,
        train,
        val,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        fingerprint=fingerprint,
    )
    held = {"val": val} if val is not None else {}
    if test_paths:
        held["test"] = ParquetStream(test_paths, schema, encoder).load_all()
    model, log_meta = serving_model(model, schema, None)
    metrics, curves = _evaluate(model, held, schema)
    seconds = time.perf_counter() - start
    bundle_meta = {
        **(meta or {}),
        "train": train_cfg.model_dump(mode="json"),
        "rows": {"train": len(train)},
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "history": [asdict(h) for h in result.history],
        "metrics": metrics,
        "seconds": seconds,
        **log_meta,
        **_calibration_meta(curves, schema),
    }
    return FitOutput(
        Bundle(model, encoder, schema, model_cfg, spec, bundle_meta), result, metrics, seconds
    )


def load_run_data(config: RunConfig) -> LoadedData:
    """The validated rows a config names: its built-in ``data.dataset`` (the simulator's file is
    generated if absent), or its one file ``data.paths[0]`` with ``data.schema``.

    Raises:
        ConfigError: more than one path without ``data.stream``, or no data named;
        DatasetNotFoundError, DataError: see :func:`load_data`.
    """
    d = config.data
    if len(d.paths) > 1:
        raise ConfigError("without data.stream (--stream), data.paths (--data) takes one file")
    path = Path(d.paths[0]) if d.paths else None
    schema = resolve_schema(d.schema_, d.dataset) if (d.schema_ or path) else None
    sim = d.simulator if d.dataset == "simulated" else None
    return load_data(
        d.dataset,
        data=path,
        schema=schema,
        data_dir=d.data_dir,
        funnel_violations=d.funnel_violations,
        sim=sim,
    )


def run(
    config: RunConfig | str | Path,
    *,
    quiet: bool = False,
    on_epoch: Callable[[EpochLog], None] | None = None,
    loaded: LoadedData | None = None,
    checkpoint: Path | None = None,
    meta: dict | None = None,
) -> FitOutput:
    """Train and evaluate as a run config says: the one training path of ``mtrank train``,
    ``mtrank quickstart`` and the Python API (``mtrank.run``).

    Args:
        config: a :class:`~mtrank.config.RunConfig`, or the path of its YAML file.
        quiet: no progress output. on_epoch: called with each epoch's log as it ends.
        loaded: the rows, when already loaded (else :func:`load_run_data`); ignored with
            ``data.stream``.
        checkpoint: checkpoint folder (default: ``training.checkpoint_dir``, else none).
        meta: extra JSON-able facts to record in the bundle (e.g. the command line).

    Returns:
        :class:`FitOutput`: the bundle (not saved; ``.bundle.save(path)``) with the resolved
        config in ``bundle.meta["config"]``, the training result, metrics per split
        (``val``, ``test``), seconds.

    Raises:
        ConfigError: a bad config or combination; DataError, DatasetNotFoundError: the data.
    """
    if not isinstance(config, RunConfig):
        config = load_config(config)
    d, t, f = config.data, config.training, config.features
    model_cfg, train_cfg = config.model.to_model_config(), t.train_config()
    if checkpoint is None and t.checkpoint_dir:
        checkpoint = Path(t.checkpoint_dir)
    common = {
        "quiet": quiet,
        "checkpoint": checkpoint,
        "checkpoint_every": t.checkpoint_every,
        "resume": t.resume,
        "hash_buckets": f.hash_buckets or None,
        "on_epoch": on_epoch,
        "min_count": f.min_count,
        "max_vocab": f.max_vocab,
    }
    if d.stream:
        from mtrank.data.stream import expand_paths

        if not d.paths:
            raise ConfigError(
                "data.stream (--stream) needs data.paths (--data: files, a directory or a glob)"
            )
        if t.weight_by_price:
            raise ConfigError(
                "training.weight_by_price (--weight-by-price) is not available with --stream yet"
            )
        if t.negative_sampling_rate is not None:
            raise ConfigError(
                "training.negative_sampling_rate (--negative-sampling-rate) is not available "
                "with --stream yet; sample the files and declare negative_sampling in the schema"
            )
        schema = resolve_schema(d.schema_, d.dataset)
        if d.funnel_violations is not None:
            schema = schema.model_copy(update={"funnel_violations": d.funnel_violations})
        sources = {"train": d.paths, "val": d.val_paths or None, "test": d.test_paths or None}
        res = fit_stream(
            expand_paths(d.paths),
            schema,
            model_cfg,
            train_cfg,
            val_paths=expand_paths(d.val_paths) if d.val_paths else None,
            test_paths=expand_paths(d.test_paths) if d.test_paths else None,
            meta={"dataset": d.dataset or schema.name, "sources": sources, **(meta or {})},
            shuffle_buffer=d.shuffle_buffer,
            cache_dir=Path(d.cache_dir) if d.cache_dir else None,
            **common,
        )
    else:
        loaded = loaded if loaded is not None else load_run_data(config)
        split_cfg = d.split.split_config(t.seed)
        splits = split_data(loaded, split_cfg)
        run_meta = {
            "dataset": d.dataset or loaded.schema.name,
            "sources": loaded.sources,
            "split": split_cfg.model_dump(),
            **(meta or {}),
        }
        res = fit(
            splits,
            loaded.schema,
            model_cfg,
            train_cfg,
            meta=run_meta,
            weight_by_price=t.weight_by_price,
            price_weight_cap=t.price_weight_cap,
            negative_sampling_rate=t.negative_sampling_rate,
            **common,
        )
    res.bundle.meta["config"] = config.to_dict()
    return res


def _add_price_weights(
    splits: dict[str, pl.DataFrame], encoded: dict[str, EncodedData], schema: Schema, cap: float
) -> dict:
    if schema.price is None or not schema.is_funnel:
        raise SchemaError(
            "--weight-by-price needs a funnel schema with a price column; schema "
            f"{schema.name!r} has none"
        )
    train = splits["train"]
    mean_log = mean_log_price(
        train.get_column(schema.price).to_numpy(), train.get_column(schema.conversion).to_numpy()
    )
    for name in ("train", "val"):
        if name in encoded:
            df = splits[name]
            w = price_weights(
                df.get_column(schema.price).to_numpy(),
                df.get_column(schema.conversion).to_numpy(),
                cap=cap,
                mean_log=mean_log,
            )
            encoded[name].weight = torch.from_numpy(combine(encoded[name].weight, w))
    return {
        "kind": "price",
        "formula": "1 + min(log1p(price) / mean_log1p_price_converted, cap) on converted rows, "
        "else 1",
        "mean_log1p_price_converted": mean_log,
        "cap": cap,
    }


def training_views(
    model: torch.nn.Module, train: EncodedData, val: EncodedData | None, seed: int
) -> tuple[EncodedData, EncodedData | None]:
    """The train and validation tables the trainer sees. A model may define
    ``prepare_split(data, role, seed) -> EncodedData`` (role ``train`` or ``val``) to transform
    them, e.g. the ESMM paper's sampling baselines resample the CVR training rows
    (:mod:`mtrank.models.baselines`); other models get the splits unchanged. Test data is never
    transformed."""
    prepare = getattr(model, "prepare_split", None)
    if prepare is None:
        return train, val
    return prepare(train, "train", seed), (None if val is None else prepare(val, "val", seed))


def evaluate_split(model: torch.nn.Module, data: EncodedData, schema: Schema) -> dict:
    """All named metrics of ``model`` on one encoded split (``*_weighted`` ones too when the
    split has sample weights or sampled negatives, :func:`split_weights`)."""
    out = predict(model, data)
    labels = {k: v.cpu().numpy() for k, v in data.labels.items()}
    return evaluate_outputs(out, labels, schema, data.side, split_weights(data, schema))


def split_weights(data: EncodedData, schema: Schema):
    """Evaluation weights ``[N]`` of a split: its weight column, times 1/r on unclicked rows
    when the schema declares negatives kept at rate r (:func:`evaluation_weights`); or None."""
    weight = None if data.weight is None else data.weight.cpu().numpy()
    click = data.labels["click"].cpu().numpy() if "click" in data.labels else None
    if click is None:
        return weight
    return evaluation_weights(schema, click, weight)


def serving_model(
    model: torch.nn.Module, schema: Schema, sampled_rate: float | None
) -> tuple[torch.nn.Module, dict]:
    """The trained model as it is evaluated and bundled, and what the bundle records of it:
    a position tower is dropped (its learnt effects go to ``position``), and negatives sampled
    at rate r (declared by the schema, times mtrank's own ``sampled_rate``) wrap the model in
    the pCTR / pCTCVR correction (``negative_sampling``)."""
    meta: dict = {}
    if isinstance(model, PositionTower):
        meta["position"] = {
            "column": schema.position,
            "reference": model.reference,
            "effects": model.effects(),
            "meaning": "learnt shift of the CTR logit at each position against the reference "
            "position; the bundle scores as if at the reference position",
        }
        model = model.model
    declared = None if schema.negative_sampling is None else schema.negative_sampling.rate
    if declared is not None or sampled_rate is not None:
        rate = (declared or 1.0) * (sampled_rate or 1.0)
        meta["negative_sampling"] = {
            "rate": rate,
            "declared": declared,
            "sampled_by_mtrank": sampled_rate,
            "correction": "p = q·r / (q·r + 1 − q) on pCTR, pCTCVR scaled alike "
            "(He et al., ADKDD 2014, §6.3)",
            "evaluated_on": _evaluated_rows(schema),
        }
        model = with_sampling_correction(model, rate)
    return model, meta


def _evaluated_rows(schema: Schema) -> str:
    """Which rows the val/test metrics of a run come from (they share the train file's
    sampling when the schema declares one)."""
    ns = schema.negative_sampling
    if ns is None or ns.rate >= 1.0:
        return "unsampled rows"
    return (
        f"rows whose negatives were kept at rate {ns.rate:g} (declared by the schema): the "
        "plain metrics are on the sampled rows; the *_weighted ones weight unclicked rows by "
        f"1/{ns.rate:g} to estimate the unsampled log"
    )


def _evaluate(
    model: torch.nn.Module, splits: dict[str, EncodedData], schema: Schema
) -> tuple[dict, dict]:
    """Metrics per held-out split, and the test split's calibration curves (one prediction pass
    per split)."""
    metrics, curves = {}, {}
    for name, data in splits.items():
        out = predict(model, data)
        labels = {k: v.cpu().numpy() for k, v in data.labels.items()}
        metrics[name] = evaluate_outputs(
            out, labels, schema, data.side, split_weights(data, schema)
        )
        if name == "test":
            curves = calibration_curves(out, labels, schema)
    return metrics, curves


def _calibration_meta(curves: dict, schema: Schema) -> dict:
    """The bundle's record of the test split's calibration, which the report draws, and which
    rows it comes from."""
    return (
        {
            "calibration": {
                "split": "test",
                "rows": _evaluated_rows(schema),
                "bins": CALIBRATION_BINS,
                "tasks": curves,
            }
        }
        if curves
        else {}
    )


def predictions_frame(bundle: Bundle, df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Score a table with a bundle: :meth:`mtrank.bundle.Bundle.predict`."""
    return bundle.predict(df, source)


__all__ = [
    "FitOutput",
    "SplitConfig",
    "evaluate_split",
    "fit",
    "fit_encoded",
    "load_data",
    "load_run_data",
    "predictions_frame",
    "resolve_schema",
    "run",
    "split_data",
    "training_views",
]
