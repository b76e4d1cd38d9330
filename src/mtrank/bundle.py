"""The model bundle: everything predict and serve need, nothing pickled.

A bundle is a directory::

    config.json       format version, schema, model config, feature spec, training config,
                      metrics, library versions, the weights file's name
    encoders.json     vocabularies and numerical statistics (see mtrank.data.encoders)
    model.safetensors the weights of a neural model (safetensors), or
    model.txt         a LambdaMART ranker (LightGBM's text format; mtrank.models.ltr)

How a model's weights are written, read and scored is its *codec*: :class:`TorchCodec` for the
``nn.Module`` zoo, the ranker class itself for :data:`mtrank.models.RANKERS`. A bundle exposes
one :class:`Scorer` (:attr:`Bundle.scorer`) that predict and serve call, whatever the model.

It is written to a temporary sibling directory and renamed into place, so an interrupted save
leaves the previous bundle intact; an existing bundle is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtrank.data.batch import EncodedData
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.funnel import stage_output_names
from mtrank.data.io import validate_frame
from mtrank.data.schema import Schema
from mtrank.errors import BundleError, MtrankError
from mtrank.io_utils import atomic_replace_dir, atomic_write_json, recover_replaced_dir
from mtrank.models import RANKERS, build_model
from mtrank.models.calibration import with_sampling_correction, without_sampling_correction
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.train.device import resolve_device
from mtrank.train.trainer import predict
from mtrank.version import __version__

FORMAT = "mtrank.bundle/1"
FILES = ("config.json", "encoders.json", "model.safetensors")
PROBS = ("p_ctr", "p_cvr", "p_ctcvr")


def probability_outputs(spec: FeatureSpec) -> tuple[str, ...]:
    """The probability outputs a neural model of ``spec`` is scored, exported and served with:
    :func:`mtrank.data.funnel.stage_output_names` on a staged funnel, ``p_ctr``, ``p_cvr``,
    ``p_ctcvr`` on a click → conversion funnel, else ``p_<task>`` per plain task."""
    if spec.stages:
        return tuple(stage_output_names(spec.stages))
    return PROBS if spec.funnel else tuple(f"p_{t}" for t in spec.task_names)


class Scorer(Protocol):
    """What predict and serve call: ``scorer(categorical int64 [N, n_cat], numerical float32
    [N, n_num], *extra) -> {name: float [N]}`` (``extra``: the list/sequence arrays ``[N, L]``,
    see :class:`~mtrank.data.batch.Batch`) with the names in :attr:`outputs` (``p_ctr``,
    ``p_cvr``, ``p_ctcvr`` / ``p_<task>`` for a neural model; ``score`` for a ranker that has
    its own ranking score and no probabilities)."""

    outputs: tuple[str, ...]

    def __call__(
        self, categorical: np.ndarray, numerical: np.ndarray, *extra: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Scores ``[N]`` per output name for encoded rows (see the class docstring)."""
        ...


class TorchScorer:
    """:class:`Scorer` of an ``nn.Module`` of the zoo: its ``p_*`` outputs, no_grad, eval mode,
    in chunks of ``batch_size`` rows (same values as :func:`mtrank.train.trainer.predict`)."""

    def __init__(self, model: nn.Module, spec: FeatureSpec, batch_size: int = 8192) -> None:
        self.model = model
        self.batch_size = batch_size
        self.outputs = probability_outputs(spec)

    def __call__(
        self, categorical: np.ndarray, numerical: np.ndarray, *extra: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``p_*`` float32 ``[N]`` for encoded rows (int64 ``[N, n_cat]``, float32 ``[N,
        n_num]``, list/sequence arrays ``[N, L]``)."""
        data = EncodedData(
            torch.from_numpy(np.ascontiguousarray(categorical)),
            torch.from_numpy(np.ascontiguousarray(numerical)),
            {},
            extra=[torch.from_numpy(np.ascontiguousarray(t)) for t in extra],
        )
        out = predict(self.model, data, self.batch_size)
        return {k: v for k, v in out.items() if k.startswith("p_")}


class TorchCodec:
    """Weights of an ``nn.Module`` of the zoo: ``model.safetensors`` (no pickle)."""

    weights_file = "model.safetensors"

    @staticmethod
    def save_weights(model: nn.Module, folder: Path) -> None:
        """Write the state dict to ``folder/model.safetensors``."""
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(folder / TorchCodec.weights_file), metadata={"format": FORMAT})

    @staticmethod
    def load_weights(folder: Path, spec: FeatureSpec, cfg: ModelConfig) -> nn.Module:
        """Raises BundleError: unreadable, non-finite or ill-fitting weights."""
        try:
            state = load_file(str(folder / TorchCodec.weights_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"bundle {folder}: cannot read model.safetensors ({exc})") from None
        bad = sorted(
            k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
        )
        if bad:
            raise BundleError(
                f"bundle {folder}: model.safetensors holds non-finite weights in {bad[:5]}"
            )
        model = build_model(spec, cfg)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BundleError(
                f"bundle {folder}: weights do not fit the model ({first} …)"
            ) from None
        return model.eval()

    @staticmethod
    def scorer(model: nn.Module, spec: FeatureSpec) -> Scorer:
        """The model as a :class:`Scorer` (:class:`TorchScorer`)."""
        return TorchScorer(model, spec)


def sampling_rate(meta: dict, path: Path) -> float | None:
    """The negative-sampling rate r a bundle's model was trained at (``meta.negative_sampling
    .rate``), or None: its pCTR / pCTCVR are served corrected for it
    (:mod:`mtrank.models.calibration`).

    Raises:
        BundleError: a recorded rate that is not a number in (0, 1].
    """
    ns = meta.get("negative_sampling") if isinstance(meta, dict) else None
    if ns is None:
        return None
    rate = ns.get("rate") if isinstance(ns, dict) else ns
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        raise BundleError(
            f"bundle {path}: config.json meta.negative_sampling.rate must be a sampling rate "
            f"in (0, 1], got {rate!r}"
        )
    return float(rate)


def codec(cfg: ModelConfig):
    """The weights codec of a model config: the ranker class for :data:`RANKERS`, else
    :class:`TorchCodec`."""
    return RANKERS.get(cfg.name, TorchCodec)


def _files(weights_file: str) -> tuple[str, ...]:
    return ("config.json", "encoders.json", weights_file)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_bundle_dir(path: Path) -> bool:
    """True for a directory that holds an mtrank bundle's config.json (what --overwrite may
    replace)."""
    cfg = Path(path) / "config.json"
    if not (Path(path).is_dir() and cfg.is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return True  # a damaged bundle may be replaced by a good one


@dataclass
class Bundle:
    """A trained model with its encoders and schema.

    Attributes:
        model: the ``nn.Module`` (eval mode), or a ranker of :data:`mtrank.models.RANKERS`.
        encoder: fitted :class:`FeatureEncoder`.
        schema: dataset :class:`Schema`. model_config: :class:`ModelConfig`.
        spec: :class:`FeatureSpec`. meta: training config, metrics, versions (JSON-able).
    """

    model: nn.Module
    encoder: FeatureEncoder
    schema: Schema
    model_config: ModelConfig
    spec: FeatureSpec
    meta: dict = field(default_factory=dict)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the bundle atomically.

        Raises:
            BundleError: ``path`` exists (and is not replaced) unless ``overwrite`` is True.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise BundleError(
                f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
            )
        if path.exists() and not is_bundle_dir(path):
            raise BundleError(
                f"{path} exists and is not an mtrank bundle (a directory with {list(FILES)}); "
                "refusing to replace it, even with --overwrite: choose another --out"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            config = {
                "format": FORMAT,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "versions": {
                    "mtrank": __version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
                "schema": self.schema.model_dump(mode="json"),
                "model": self.model_config.model_dump(mode="json"),
                "features": self.spec.model_dump(mode="json"),
                "meta": self.meta,
            }
            weights = codec(self.model_config)
            config["weights"] = weights.weights_file
            atomic_write_json(self.encoder.to_json(), staging / "encoders.json")
            weights.save_weights(without_sampling_correction(self.model), staging)
            config["sha256"] = {
                name: _sha256(staging / name) for name in ("encoders.json", weights.weights_file)
            }
            atomic_write_json(config, staging / "config.json")
            atomic_replace_dir(staging, path)
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, device: str | torch.device = "cpu", allow_unverified: bool = False
    ) -> Bundle:
        """Load a bundle (no pickle: JSON + safetensors, or a ranker's text model, only).

        Args:
            path: the bundle directory (an interrupted replace of it is repaired first, see
                :func:`~mtrank.io_utils.recover_replaced_dir`).
            device: where the model runs. The weights are always read into host memory first (a
                bundle written on a GPU machine loads on a CPU-only one; :meth:`save` stores CPU
                tensors), then moved to ``device`` (``cpu`` by default; ``auto``, ``cuda``,
                ``cuda:N``: see :func:`mtrank.train.device.resolve_device`).
            allow_unverified: load even when config.json records no sha256 of the other files
                (otherwise such a bundle is refused: its weights cannot be verified).

        Raises:
            ConfigError: ``device`` is not available here.
            BundleError: a file is missing, unreadable, tampered with (bad JSON, truncated
                weights, wrong tensor shapes or names, checksums removed) or of an unknown format.
        """
        target = resolve_device(device)  # an unavailable device fails before any reading
        path = Path(path)
        recover_replaced_dir(path)
        if not path.is_dir():
            raise BundleError(f"no bundle at {path} (expected a directory holding {list(FILES)})")
        missing = [f for f in FILES[:2] if not (path / f).is_file()]
        if missing:
            raise BundleError(f"bundle {path} is incomplete: missing {missing}")
        try:
            config = json.loads((path / "config.json").read_text())
            enc_doc = json.loads((path / "encoders.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"bundle {path}: unreadable JSON ({exc})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise BundleError(
                f"bundle {path}: unknown format "
                f"{config.get('format') if isinstance(config, dict) else None!r}, expected "
                f"{FORMAT!r}"
            )
        try:
            schema = Schema.model_validate(config["schema"])
            model_cfg = ModelConfig.model_validate(config["model"])
            spec = FeatureSpec.model_validate(config["features"])
        except (KeyError, ValidationError, MtrankError) as exc:
            raise BundleError(f"bundle {path}: invalid config.json ({exc})") from None
        weights = codec(model_cfg)
        files = _files(weights.weights_file)
        if not (path / weights.weights_file).is_file():
            raise BundleError(f"bundle {path} is incomplete: missing {[weights.weights_file]}")
        sums = config.get("sha256")
        unrecorded = [
            f for f in files[1:] if not (isinstance(sums, dict) and isinstance(sums.get(f), str))
        ]
        if unrecorded and not allow_unverified:
            raise BundleError(
                f"bundle {path}: config.json records no sha256 for {unrecorded}, so the files "
                "cannot be "
                "verified; refusing to load it (save the bundle again with mtrank, or load "
                "with allow_unverified=True)"
            )
        for name, expected in (sums if isinstance(sums, dict) else {}).items():
            if name in files and _sha256(path / name) != expected:
                raise BundleError(
                    f"bundle {path}: {name} does not match the sha256 recorded in config.json "
                    "(the file was modified or corrupted after the bundle was written)"
                )
        encoder = FeatureEncoder.from_json(enc_doc)
        if (
            encoder.cardinalities != spec.cardinalities
            or len(encoder.numerical) != spec.n_numerical
            or [e.cardinality for e in encoder.lists] != [f.cardinality for f in spec.lists]
        ):
            raise BundleError(
                f"bundle {path}: encoders.json does not match the feature spec in config.json"
            )
        model = weights.load_weights(path, spec, model_cfg)  # read into host memory first
        meta = config.get("meta", {})
        model = with_sampling_correction(model, sampling_rate(meta, path))
        if isinstance(model, nn.Module):
            model.to(target)
        return cls(model, encoder, schema, model_cfg, spec, meta)

    @staticmethod
    def digest(path: str | Path) -> str:
        """sha256 over the bundle's three files (identifies a bundle in logs and /metadata)."""
        h = hashlib.sha256()
        try:
            weights_file = json.loads((Path(path) / "config.json").read_text()).get(
                "weights", FILES[2]
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            weights_file = FILES[2]
        for name in _files(weights_file):
            h.update((Path(path) / name).read_bytes())
        return h.hexdigest()

    # -- inference ----------------------------------------------------------------------------
    def encode(
        self, df: pl.DataFrame, source: str = "<table>", *, with_labels: bool = False
    ) -> EncodedData:
        """Validate and encode a table by column name (order-independent)."""
        clean, _ = validate_frame(df, self.schema, source, require_labels=with_labels)
        return EncodedData.from_frame(clean, self.schema, self.encoder, with_labels=with_labels)

    @property
    def scorer(self) -> Scorer:
        """The model as a :class:`Scorer` (what predict and serve call)."""
        cached = self.__dict__.get("_scorer")
        if cached is None or cached[0] is not self.model:
            weights = codec(self.model_config)
            cached = (self.model, weights.scorer(self.model, self.spec))
            self.__dict__["_scorer"] = cached
        return cached[1]

    def predict_arrays(self, data: EncodedData, batch_size: int = 8192) -> dict[str, np.ndarray]:
        """The scorer's outputs ``[N]`` for encoded data: probabilities ``p_*`` of a neural
        model, or ``score`` of a ranker (:attr:`Scorer.outputs`)."""
        return self.scorer(
            data.categorical.numpy(), data.numerical.numpy(), *(t.numpy() for t in data.extra)
        )

    def predict(self, frame, source: str = "<table>") -> pl.DataFrame:
        """Score a table, row for row in input order.

        Args:
            frame: a polars or pandas DataFrame holding the schema's feature columns (by name,
                any order; labels optional).
            source: named in error messages (e.g. the file the rows came from).

        Returns:
            polars DataFrame: the table's id, price and passthrough columns that are present,
            then ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (or ``p_<task>``; a ranker's ``score``),
            float64 ``[N]``.

        Raises:
            DataError: a missing column or a bad value (naming the column and row).
        """
        df = frame if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)
        probs = self.predict_arrays(self.encode(df, source))
        s = self.schema
        keep = [
            c
            for c in dict.fromkeys([s.request_id, s.user_id, s.item_id, s.price, *s.passthrough])
            if c and c in df.columns
        ]
        scores = [pl.Series(k, v.astype(np.float64)) for k, v in probs.items()]
        return df.select(keep).with_columns(scores) if keep else pl.DataFrame(scores)
