"""The run config (``mtrank.yaml``): one validated document that drives every verb.

Sections: ``data`` (a built-in data set or files with a schema, the split, the simulator),
``features`` (vocabularies, hashing), ``model`` (registry name, sizes, typed per-model
options), ``training`` (optimizer, budget, selection rule, seed, distributed, checkpoints),
``evaluation``, ``export`` (the bundle), ``serve`` and ``fusion``. Every key has a default, so a
config holds only what differs; unknown keys are errors. ``mtrank config init`` writes a
commented template (:func:`config_template`); ``configs/`` holds one per shipped data set.

On the command line every verb takes ``--config FILE``; a flag given on the command line
overrides its key (:meth:`RunConfig.override`). A trained bundle stores the resolved config
(``meta.config`` in its ``config.json``), so a run can be repeated from the bundle alone.

Errors are one :class:`~mtrank.errors.ConfigError` line naming the file and the key, e.g.
``config configs/x.yaml: training.epochs: Input should be greater than or equal to 1 (got 0)``
(several problems are joined by ``; ``; broken YAML names the line and column).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from mtrank.data.datasets import DATASETS
from mtrank.data.simulate import SimConfig
from mtrank.data.split import SplitConfig
from mtrank.documents import load_document, validate_document
from mtrank.errors import ConfigError
from mtrank.models import MODELS
from mtrank.models.config import ModelConfig
from mtrank.train.trainer import TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SplitSection(_Section):
    """How a single table is split (see :class:`mtrank.data.split.SplitConfig`)."""

    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of rows in the test split")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of rows for early stopping")
    by_time: bool | None = Field(
        None, description="split by the schema's time column (null: if it has one)"
    )
    seed: int | None = Field(None, description="shuffle seed (null: training.seed)")

    def split_config(self, training_seed: int) -> SplitConfig:
        """The :class:`SplitConfig` (``seed`` defaults to the training seed)."""
        return SplitConfig(
            test_fraction=self.test_fraction,
            val_fraction=self.val_fraction,
            by_time=self.by_time,
            seed=training_seed if self.seed is None else self.seed,
        )


class DataSection(_Section):
    """Where the rows come from."""

    dataset: str | None = Field(None, description=f"built-in data set: {', '.join(DATASETS)}")
    paths: list[str] = Field(
        default_factory=list, description="CSV/Parquet files, folders or globs (with schema)"
    )
    schema_: str | None = Field(
        None, alias="schema", description="schema YAML, or a built-in data set's name"
    )
    data_dir: str | None = Field(
        None, description="folder of the built-in data sets (null: $MTRANK_DATA_DIR, else ./data)"
    )
    funnel_violations: Literal["error", "drop"] | None = Field(
        None, description="conversion without click: error or drop"
    )
    split: SplitSection = Field(default_factory=SplitSection, description="how one table is split")
    simulator: SimConfig = Field(
        default_factory=SimConfig, description="the simulated mall (dataset: simulated)"
    )
    stream: bool = Field(
        False,
        description="stream paths piece by piece (flat memory); evaluate on val_paths / test_paths",
    )
    val_paths: list[str] = Field(default_factory=list, description="validation files (stream)")
    test_paths: list[str] = Field(default_factory=list, description="test files (stream)")
    shuffle_buffer: int = Field(262_144, ge=1, description="rows in the streaming shuffle buffer")
    cache_dir: str | None = Field(
        None,
        description="keep encoded training pieces here (stream; safetensors) so later epochs "
        "skip reading and encoding",
    )

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; built-in datasets: {sorted(DATASETS)}")
        return v


class FeaturesSection(_Section):
    """How the feature columns are encoded (fitted on the training split only)."""

    min_count: int = Field(1, ge=1, description="ids seen fewer times map to the OOV index")
    max_vocab: int | None = Field(None, ge=1, description="keep at most this many ids per field")
    hash_buckets: dict[str, int] = Field(
        default_factory=dict, description="column: buckets, hash (FNV-1a) instead of a vocabulary"
    )

    @field_validator("hash_buckets")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(k for k, n in v.items() if n < 1)
        if bad:
            raise ValueError(f"buckets must be ≥ 1 for {bad}")
        return v


class ModelSection(ModelConfig):
    """The model: a registry name, sizes, and the model's own typed ``options``."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; choose one of {sorted(MODELS)}")
        return v

    @field_validator("options")
    @classmethod
    def _typed_options(cls, v: dict, info: ValidationInfo) -> dict:
        """Checked against the model's typed ``Options`` (unknown keys and bad types rejected)."""
        name = info.data.get("name")
        if name not in MODELS:
            return v
        options = MODELS[name].Options
        try:
            options.model_validate(v)
        except ValidationError as exc:
            e = exc.errors()[0]
            key = ".".join(map(str, e["loc"]))
            if e["type"] == "extra_forbidden":
                msg = (
                    f"unknown option of {name!r} (its options: "
                    f"{sorted(options.model_fields) or 'none'})"
                )
            else:
                msg = e["msg"]
            raise PydanticCustomError("model_option", "{msg}", {"key": key, "msg": msg}) from None
        return v

    def to_model_config(self) -> ModelConfig:
        """The plain :class:`ModelConfig` a bundle stores."""
        return ModelConfig.model_validate(self.model_dump())


class TrainingSection(TrainConfig):
    """The training budget and rules (:class:`~mtrank.train.trainer.TrainConfig`) plus how the
    job runs: processes, checkpoints, price weighting."""

    model_config = ConfigDict(extra="forbid")

    weight_by_price: bool = Field(
        False, description="weight converted rows by 1 + min(log1p(price)/mean, cap)"
    )
    price_weight_cap: float = Field(
        3.0, gt=0, description="largest extra weight with weight_by_price"
    )
    negative_sampling_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="keep each unclicked training (and validation) impression with this "
        "probability; the bundle stores the rate and corrects pCTR / pCTCVR "
        "(mtrank.models.calibration); test rows stay unsampled",
    )
    nproc: int = Field(1, ge=1, description="data-parallel processes (re-launches under torchrun)")
    checkpoint_dir: str | None = Field(
        None, description="checkpoint folder (null: <export.out>.ckpt)"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="also checkpoint every N steps (0: epoch ends only)"
    )
    resume: bool = Field(False, description="continue an interrupted run from its checkpoint")

    def train_config(self) -> TrainConfig:
        """The plain :class:`TrainConfig` the trainer and the bundle use."""
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))


class EvaluationSection(_Section):
    """What ``mtrank evaluate`` scores, and where metrics go."""

    split: Literal["test", "val"] = Field(
        "test", description="built-in data set: the split to evaluate"
    )
    out: str | None = Field(None, description="write the metrics JSON here")
    tensorboard: str | None = Field(
        None, description="write per-epoch metrics as TensorBoard events here, while training"
    )


class ExportSection(_Section):
    """The bundle ``mtrank train`` writes, and its ONNX export."""

    out: str = Field("runs/model", description="bundle folder")
    overwrite: bool = Field(False, description="replace an existing bundle")
    onnx: str | None = Field(None, description="ONNX file (null: <bundle>/model.onnx)")


class ServeSection(_Section):
    """The HTTP ranking service (``mtrank serve``)."""

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    engine: Literal["onnx", "torch"] = Field("onnx", description="inference engine")
    threads: int = Field(1, ge=0, description="engine intra-op threads (0: library default)")
    workers: int = Field(1, ge=1, description="worker processes (one per core with threads 1)")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="larger request bodies get 413 before they are parsed"
    )
    log_level: str = Field("warning", description="uvicorn log level")


class FusionSection(_Section):
    """The ranking-score fusion used by ``predict`` and ``serve``."""

    file: str | None = Field(
        None, description="fusion JSON written by mtrank fuse (null: score = pCTCVR)"
    )


class RunConfig(_Section):
    """One run, every verb: see the module docstring. All sections have defaults."""

    data: DataSection = Field(default_factory=DataSection)
    features: FeaturesSection = Field(default_factory=FeaturesSection)
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    export: ExportSection = Field(default_factory=ExportSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    fusion: FusionSection = Field(default_factory=FusionSection)

    def to_dict(self) -> dict:
        """The config as plain JSON-able data, keys as written in YAML."""
        return self.model_dump(mode="json", by_alias=True)

    def override(self, updates: dict[str, Any], origin: str = "command line") -> RunConfig:
        """A copy with dotted keys (``training.epochs``) set to new values, validated again.

        Raises:
            ConfigError: an unknown key or a bad value, naming ``origin`` and the key.
        """
        doc = self.to_dict()
        for key, value in updates.items():
            node = doc
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"{origin}: {key}: unknown key")
                node = node[p]
            node[leaf] = value
        return parse_config(doc, origin)


def parse_config(doc: Any, origin: str) -> RunConfig:
    """Validate a parsed document. ``origin`` (``config <file>``, or ``command line``) prefixes
    errors; an empty document (None) is the defaults.

    Raises:
        ConfigError: every problem on one line, as ``<origin>: <key>: <message>``
            (:func:`mtrank.documents.validate_document`).
    """
    return validate_document(RunConfig, doc, origin, ConfigError)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config YAML file.

    Raises:
        ConfigError: the file is missing or not YAML (naming the line and column), or a key is
            unknown or its value bad (naming the key); one line starting ``config <path>:``.
    """
    return load_document(path, RunConfig, "config", ConfigError)


def dataset_config(dataset: str | None = None) -> RunConfig:
    """The ready config of a built-in data set (its batch size; MMoE on data without a
    funnel), or the defaults."""
    if dataset is None:
        return RunConfig()
    updates = {"data.dataset": dataset, "training.batch_size": DATASETS[dataset].batch_size}
    if not DATASETS[dataset].schema.is_funnel:
        updates["model.name"] = "mmoe"
    return RunConfig().override(updates, origin="--dataset")


_HEADER = """\
# mtrank run config. Every verb takes --config FILE; a flag on the command line overrides its
# key. Every key has a default: keep only what you change. Written by `mtrank config init`.
"""


_SECTIONS = {
    "data": "Where the rows come from: a built-in data set, or files with a schema.",
    "features": "How the feature columns are encoded (fitted on the training split only).",
    "model": "The model: a registry name, sizes, and its own typed options.",
    "training": "Optimizer, budget, selection rule, seed; processes and checkpoints.",
    "evaluation": "What `mtrank evaluate` scores; where metrics go.",
    "export": "The bundle `mtrank train` writes, and its ONNX export.",
    "serve": "The HTTP ranking service (`mtrank serve`).",
    "fusion": "The ranking-score fusion used by `mtrank predict` and `mtrank serve`.",
}


def _yaml_value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)  # JSON scalars, lists and maps are YAML


def _lines(model: BaseModel, data: dict, path: str) -> list[str]:
    out = []
    pad = "  " * (path.count(".") + 1) if path else ""
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        qualified = f"{path}.{key}" if path else key
        value = data[key]
        sub = getattr(model, name)
        comment = _COMMENTS.get(qualified) or _SECTIONS.get(qualified) or field.description
        if isinstance(sub, BaseModel):
            if comment:
                out.append(f"{pad}# {comment}")
            out.append(f"{pad}{key}:")
            out += _lines(sub, value, qualified)
            if not path:
                out.append("")
            continue
        out.append(f"{pad}{key}: {_yaml_value(value)}" + (f"  # {comment}" if comment else ""))
    return out


# Comments for keys whose classes live below this layer (TrainConfig, ModelConfig, SimConfig).
_COMMENTS = {
    "training.epochs": "maximum epochs (early stopping on validation)",
    "training.batch_size": "rows per step",
    "training.lr": "Adam learning rate",
    "training.weight_decay": "L2 on all parameters",
    "training.patience": "epochs without validation improvement before stopping",
    "training.monitor": "selection rule: loss (validation objective), or a metric such as "
    "auc_ctcvr",
    "training.seed": "seeds initialisation, shuffling and (by default) the split",
    "training.threads": "torch intra-op threads (0: default)",
    "training.sparse_embeddings": "update only the embedding rows a batch touches (SparseAdam)",
    "training.device": "auto (CUDA when available), cpu, cuda or cuda:N (docs/gpu.md)",
    "training.precision": "forward-pass autocast: fp32, bf16 or fp16 (loss, weights and "
    "optimizer state stay fp32)",
    "training.prefetch": "batches copied ahead to a GPU by a background thread (0: none)",
    "model.name": "registry name: esmm, base, esmm_ns, mmoe, ple, aitm, escm2_ipw …",
    "model.embedding_dim": "embedding size per categorical field (ESMM paper: 18)",
    "model.tower": "hidden sizes of each task tower (ESMM paper: 360, 200, 80)",
    "model.dropout": "dropout after each hidden layer",
    "model.options": "the model's own options (e.g. mmoe: {n_experts: 8}); unknown keys are errors",
    "data.simulator.rows": "impressions",
    "data.simulator.ctr": "target mean CTR",
    "data.simulator.cvr": "target mean CVR given click",
    "data.simulator.intent": "strength of the unobserved purchase intent (SSB)",
    "data.simulator.slate_size": "candidates per request (positions 1..S)",
    "data.simulator.n_days": "days covered (the time column)",
    "data.simulator.stages": "2: click → buy; 3: click → cart → buy (ESM²'s D-/O-Action)",
    "data.simulator.seed": "the simulator's seed",
}


def config_template(config: RunConfig | None = None) -> str:
    """A commented YAML document of ``config`` (default: the defaults); it loads back equal."""
    config = config or RunConfig()
    return _HEADER + "\n" + "\n".join(_lines(config, config.to_dict(), "")).rstrip() + "\n"


__all__ = [
    "DataSection",
    "EvaluationSection",
    "ExportSection",
    "FeaturesSection",
    "FusionSection",
    "ModelSection",
    "RunConfig",
    "ServeSection",
    "SplitSection",
    "TrainingSection",
    "config_template",
    "dataset_config",
    "load_config",
    "parse_config",
]
