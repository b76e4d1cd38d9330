"""High-level jobs shared by the CLI and the Python API: load → split → encode → train →
evaluate → bundle. Each step is a plain function so tests and notebooks can call them directly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mtrank.data.batch import EncodedData
from mtrank.data.datasets import DATASETS, LoadedData, load_table, resolve_data_dir
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.schema import Schema
from mtrank.data.simulate import SimConfig, write_simulated
from mtrank.data.split import SplitConfig, split_data
from mtrank.data.weights import mean_log_price, price_weights
from mtrank.errors import ConfigError, SchemaError
from mtrank.metrics.evaluate import evaluate_outputs
from mtrank.models import build_model
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.bundle import Bundle
from mtrank.train.checkpoint import run_fingerprint
from mtrank.train.trainer import TrainConfig, Trainer, TrainResult, predict


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
    ``<data_dir>/simulated/simulated-<rows>-seed<seed>.parquet`` and generated first if absent.

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
        schema = DATASETS[dataset].schema
    if funnel_violations is not None:
        schema = schema.model_copy(update={"funnel_violations": funnel_violations})
    root = resolve_data_dir(data_dir)
    if data is None and dataset == "simulated":
        sim = sim or SimConfig()
        data = root / "simulated" / f"simulated-{sim.rows}-seed{sim.seed}.parquet"
        if not Path(data).exists():
            write_simulated(sim, data)
    if data is not None:
        df, rep = load_table(data, schema)
        return LoadedData(schema, {"all": df}, {"all": str(data)}, [rep])
    info = DATASETS[dataset]
    return info.loader(root, schema)


def feature_spec(encoder: FeatureEncoder, schema: Schema) -> FeatureSpec:
    """What a model is built from: the fitted encoders' sizes and the schema's tasks."""
    return FeatureSpec(
        cardinalities=encoder.cardinalities,
        n_numerical=len(encoder.numerical),
        funnel=schema.is_funnel,
        task_names=list(schema.tasks),
    )


@dataclass
class FitOutput:
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
) -> FitOutput:
    """Fit encoders on train only, train the model with early stopping on val, and evaluate on
    val and test. Returns the bundle (not yet saved) and metrics per split.

    ``checkpoint``, ``checkpoint_every`` and ``resume`` are passed to :meth:`Trainer.fit`.

    With ``weight_by_price`` the train and val rows get the sample weights of
    :func:`mtrank.data.weights.price_weights` from the schema's price column (normaliser from
    the train split), so the loss and the early-stopping objective lean toward valuable
    conversions; the reported metrics stay unweighted.

    Raises:
        SchemaError: ``weight_by_price`` with a schema without a price column or funnel.
    """
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    encoder = FeatureEncoder.fit(splits["train"], schema, hash_buckets=hash_buckets)
    encoded = {k: EncodedData.from_frame(v, schema, encoder) for k, v in splits.items() if v.height}
    weighting = None
    if weight_by_price:
        weighting = _add_price_weights(splits, encoded, schema, price_weight_cap)
    spec = feature_spec(encoder, schema)
    model = build_model(spec, model_cfg)
    train, val = training_views(model, encoded["train"], encoded.get("val"), train_cfg.seed)
    trainer = Trainer(train_cfg, schema, quiet=quiet)
    fingerprint = None
    if checkpoint is not None:
        t = encoded["train"]
        fingerprint = run_fingerprint(
            data=[t.categorical, t.numerical, *(t.labels[k] for k in sorted(t.labels))],
            schema=schema.model_dump(mode="json"), encoders=encoder.to_json(),
            model=[model_cfg.model_dump(mode="json"), spec.model_dump(mode="json")],
        )
    result = trainer.fit(
        model, train, val,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, fingerprint=fingerprint,
    )
    metrics = {name: evaluate_split(model, data, schema) for name, data in encoded.items() if name != "train"}
    seconds = time.perf_counter() - start
    bundle_meta = {
        **(meta or {}),
        "train": train_cfg.model_dump(mode="json"),
        "rows": {k: v.height for k, v in splits.items()},
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "history": [asdict(h) for h in result.history],
        "metrics": metrics,
        "seconds": seconds,
        **({"weighting": weighting} if weighting else {}),
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
) -> FitOutput:
    """Like :func:`fit`, but the training files are streamed piece by piece (flat memory):
    encoders are fitted in one streaming pass, batches come from a shuffle buffer. Validation
    and test files are encoded piece by piece and evaluated exactly over all their rows."""
    from mtrank.data.stream import ParquetStream, fit_encoder_streaming

    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    encoder = fit_encoder_streaming(train_paths, schema, min_count=min_count, max_size=max_vocab, hash_buckets=hash_buckets)
    train = ParquetStream(train_paths, schema, encoder, shuffle_buffer=shuffle_buffer)
    val = ParquetStream(val_paths, schema, encoder).load_all() if val_paths else None
    spec = feature_spec(encoder, schema)
    model = build_model(spec, model_cfg)
    fingerprint = None if checkpoint is None else run_fingerprint(
        data=[Path(p) for p in train_paths], schema=schema.model_dump(mode="json"), encoders=encoder.to_json(),
        model=[model_cfg.model_dump(mode="json"), spec.model_dump(mode="json")],
    )
    result = Trainer(train_cfg, schema, quiet=quiet).fit(model, train, val, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, fingerprint=fingerprint)
    metrics = {}
    if val is not None:
        metrics["val"] = evaluate_split(model, val, schema)
    if test_paths:
        metrics["test"] = evaluate_split(model, ParquetStream(test_paths, schema, encoder).load_all(), schema)
    seconds = time.perf_counter() - start
    bundle_meta = {
        **(meta or {}), "train": train_cfg.model_dump(mode="json"), "rows": {"train": len(train)},
        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "history": [asdict(h) for h in result.history], "metrics": metrics, "seconds": seconds,
    }
    return FitOutput(Bundle(model, encoder, schema, model_cfg, spec, bundle_meta), result, metrics, seconds)

def _add_price_weights(splits: dict[str, pl.DataFrame], encoded: dict[str, EncodedData], schema: Schema, cap: float) -> dict:
    if schema.price is None or not schema.is_funnel:
        raise SchemaError(f"--weight-by-price needs a funnel schema with a price column; schema {schema.name!r} has none")
    train = splits["train"]
    mean_log = mean_log_price(train.get_column(schema.price).to_numpy(), train.get_column(schema.conversion).to_numpy())
    for name in ("train", "val"):
        if name in encoded:
            df = splits[name]
            w = price_weights(df.get_column(schema.price).to_numpy(), df.get_column(schema.conversion).to_numpy(), cap=cap, mean_log=mean_log)
            encoded[name].weight = torch.from_numpy(w)
    return {"kind": "price", "formula": "1 + min(log1p(price) / mean_log1p_price_converted, cap) on converted rows, else 1", "mean_log1p_price_converted": mean_log, "cap": cap}


def training_views(model: torch.nn.Module, train: EncodedData, val: EncodedData | None, seed: int) -> tuple[EncodedData, EncodedData | None]:
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
    """All named metrics of ``model`` on one encoded split."""
    out = predict(model, data)
    labels = {k: v.numpy() for k, v in data.labels.items()}
    return evaluate_outputs(out, labels, schema, data.side)


def predictions_frame(bundle: Bundle, df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Score a table: its id / price / passthrough columns plus ``p_ctr``, ``p_cvr``, ``p_ctcvr``
    (or ``p_<task>``), row for row in input order."""
    data = bundle.encode(df, source)
    probs = bundle.predict_arrays(data)
    keep = [c for c in dict.fromkeys([bundle.schema.request_id, bundle.schema.user_id, bundle.schema.item_id, bundle.schema.price, *bundle.schema.passthrough]) if c and c in df.columns]
    out = df.select(keep) if keep else pl.DataFrame()
    return out.with_columns(pl.Series(k, v.astype(np.float64)) for k, v in probs.items()) if keep else pl.DataFrame({k: v.astype(np.float64) for k, v in probs.items()})


__all__ = ["FitOutput", "SplitConfig", "evaluate_split", "fit", "load_data", "predictions_frame", "resolve_schema", "split_data", "training_views"]
