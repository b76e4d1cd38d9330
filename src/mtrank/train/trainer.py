"""The trainer: Adam, shuffled tensor batches, exact validation each epoch, early stopping on the
validation split (never on test), and the best epoch's weights restored at the end.

The trainer knows nothing of particular models: it sums the loss terms each model declares in
its ``tasks`` attribute (:class:`mtrank.losses.TaskLoss`), plus the model's optional
``extra_loss(outputs, batch)`` (see :func:`mtrank.losses.model_loss`).

Device and precision (``TrainConfig.device`` / ``precision``, resolved by
:mod:`mtrank.train.device`): the model, its optimizer state and an in-memory training table
that fits go to the device once; a streamed source is copied there batch by batch through
:func:`mtrank.data.prefetch.device_batches` (pinned memory, ``non_blocking``, a prefetch
thread). The forward pass runs under autocast, the loss in float32, and fp16 steps through a
gradient scaler. Evaluation always runs in float32.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtrank.data.batch import BatchSource, EncodedData
from mtrank.data.prefetch import device_batches
from mtrank.data.schema import Schema
from mtrank.errors import ConfigError
from mtrank.io_utils import recover_replaced_dir
from mtrank.losses import TaskLoss, model_loss, task_loss_sum
from mtrank.metrics.evaluate import evaluate_outputs
from mtrank.models.layers import init_output_bias
from mtrank.models.position import forward_kwargs
from mtrank.train.checkpoint import check_fingerprint, load_checkpoint, save_checkpoint
from mtrank.train.device import (
    autocast,
    grad_scaler,
    module_device,
    resolve_device,
    resolve_precision,
)
from mtrank.train.distributed import all_reduce_sum, gather_rows, rank_world
from mtrank.train.progress import EpochProgress


class TrainConfig(BaseModel):
    """Training hyperparameters.

    Attributes:
        epochs: maximum epochs. batch_size: rows per step. lr: Adam learning rate.
        weight_decay: L2 on all parameters. patience: epochs without validation improvement
        before stopping. monitor: ``loss`` (the model's own validation objective, lower is
        better) or a metric name such as ``auc_ctcvr`` (higher is better).
        seed: seeds initialisation and shuffling. threads: torch intra-op threads (0 = default).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast of the forward pass (loss, weights
            and optimizer state stay float32; fp16 uses a gradient scaler).
        prefetch: batches prepared ahead on a CUDA device by a background thread (0 = none).
        prior_output_bias: before the first step, set each head's output bias to the log-odds of
        its base rate (:func:`label_rates`, :func:`mtrank.models.layers.init_output_bias`).
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(2048, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(1, ge=0)
    monitor: str = "loss"
    seed: int = 0
    threads: int = Field(0, ge=0)
    sparse_embeddings: bool = Field(
        False,
        description="update only the embedding rows a batch touches (SparseAdam for embedding "
        "tables, Adam for the rest); for large vocabularies",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (see mtrank.train.device)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="forward-pass autocast dtype"
    )
    prefetch: int = Field(
        4, ge=0, description="batches copied ahead to a GPU (0 = in the training thread)"
    )

    def resume_key(self) -> dict:
        """The settings a checkpoint must match to be resumed: all but where it runs."""
        return self.model_dump(mode="json", exclude={"device", "prefetch", "threads"})

    prior_output_bias: bool = Field(
        True,
        description="start each head's output bias at the log-odds of its base rate in the "
        "training data (click rate, conversion rate among clicks, plain task rates); chosen by "
        "the ablation in docs/models.md",
    )


@dataclass
class EpochLog:
    """One epoch's record: mean train loss, validation loss and metrics, seconds, rows per
    second."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_metrics: dict[str, float | int | None]
    seconds: float
    samples_per_second: float


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: the best epoch (1-based), its score, the history."""

    best_epoch: int
    best_score: float | None
    history: list[EpochLog] = field(default_factory=list)
    stopped_early: bool = False


@torch.no_grad()
def predict(model: nn.Module, data: EncodedData, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Run a model over a split in eval mode; returns each ``[N]`` output as a numpy array.

    Runs on the model's device in float32; the model's previous train/eval mode is restored
    afterwards.
    """
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in device_batches(data, batch_size, shuffle=False, device=module_device(model)):
            out = model(
                batch.categorical, batch.numerical, *batch.extra, **forward_kwargs(model, batch)
            )
            for k, v in out.items():
                chunks.setdefault(k, []).append(v.detach())
    finally:
        model.train(was_training)
    if not chunks:
        return {}
    return {k: torch.cat(v).float().cpu().numpy() for k, v in chunks.items()}


@torch.no_grad()
def validation_loss(model: nn.Module, data: EncodedData, batch_size: int = 8192) -> float:
    """The model's own objective on a split, exact over all rows (Σ numerators / Σ weights).

    Under data parallelism ``data`` is this rank's shard and the sums are reduced over ranks.
    """
    tasks: list[TaskLoss] = model.tasks
    was_training = model.training
    model.eval()
    sums = {t.name: [0.0, 0.0] for t in tasks}
    try:
        for batch in device_batches(data, batch_size, shuffle=False, device=module_device(model)):
            out = model(
                batch.categorical, batch.numerical, *batch.extra, **forward_kwargs(model, batch)
            )
            for t in tasks:
                n, d = task_loss_sum(t, out, batch)
                sums[t.name][0] += n.double()
                sums[t.name][1] += d.double()
    finally:
        model.train(was_training)
    names = [t.name for t in tasks]
    num, den = {k: float(v[0]) for k, v in sums.items()}, {k: float(v[1]) for k, v in sums.items()}
    reduced = all_reduce_sum([num[n] for n in names] + [den[n] for n in names])
    num, den = (
        dict(zip(names, reduced[: len(names)], strict=True)),
        dict(zip(names, reduced[len(names) :], strict=True)),
    )
    return float(sum(t.weight * num[t.name] / max(den[t.name], 1e-12) for t in tasks))


def validate(model: nn.Module, data: EncodedData, schema: Schema) -> tuple[float, dict]:
    """Validation loss and metrics over all rows of ``data``; under data parallelism each rank
    predicts its shard and the predictions are gathered, so metrics equal a single process's."""
    rank, world = rank_world()
    local = data.shard(rank, world)
    loss = validation_loss(model, local)
    out = predict(model, local)
    if world > 1:
        out = {k: gather_rows(torch.from_numpy(v), len(data)).numpy() for k, v in out.items()}
    return loss, evaluate_outputs(
        out, {k: v.cpu().numpy() for k, v in data.labels.items()}, schema, data.side
    )


RATE_ROWS = 262_144  # rows read for the base rates: one stream piece, ~10k clicks at a 4% CTR


def label_rates(train: BatchSource, schema: Schema, rows: int = RATE_ROWS) -> dict[str, float]:
    """Base rates of each head from the first ``rows`` training rows in file order (all of them
    when fewer; sample weights respected): ``ctr`` = clicks / impressions and ``cvr`` =
    conversions / clicks for a funnel, else the positive rate per plain task. A rate with no
    denominator (no clicks) is left out.

    Returns: head name → rate in [0, 1].
    """
    batch = next(iter(train.batches(max(1, min(rows, len(train))), shuffle=False)), None)
    if batch is None:
        return {}
    w = torch.ones_like(next(iter(batch.labels.values()))) if batch.weight is None else batch.weight
    rates: dict[str, float] = {}

    def put(name: str, num: torch.Tensor, den: torch.Tensor) -> None:
        if float(den) > 0:
            rates[name] = float(num) / float(den)

    if schema.is_staged:  # each stage's rate among the rows that reached its `after` stage
        for s, parent in zip(schema.stage_names, schema.stage_parents, strict=True):
            reach = w if parent < 0 else w * batch.labels[f"{schema.stage_names[parent]}_all"]
            put(s, (reach * batch.labels[s]).sum(), reach.sum())
            put(f"{s}_all", (w * batch.labels[f"{s}_all"]).sum(), w.sum())  # entire-space heads
    elif schema.is_funnel:
        click = batch.labels["click"]
        put("ctr", (w * click).sum(), w.sum())
        put("cvr", (w * click * batch.labels["conversion"]).sum(), (w * click).sum())
    else:
        for t in schema.tasks:
            put(t, (w * batch.labels[t]).sum(), w.sum())
    return rates


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam over all parameters; with ``sparse_embeddings``, SparseAdam for the embedding tables
    (made sparse here) and Adam for the rest.

    Raises:
        ConfigError: sparse embeddings with weight decay (SparseAdam has none).
    """
    if not cfg.sparse_embeddings:
        return [torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if cfg.weight_decay:
        raise ConfigError("sparse_embeddings cannot be combined with weight_decay")
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for m in tables:
        m.sparse = True
    sparse_ids = {id(m.weight) for m in tables}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SparseAdam([m.weight for m in tables], lr=cfg.lr)
    ]
    if dense:
        opts.append(torch.optim.Adam(dense, lr=cfg.lr))
    return opts


def place(data, device: torch.device):
    """An in-memory table moved whole to a CUDA device when it takes under half of the free
    memory there (batches are then gathered on the device, no copies per step); any other
    source as it is (streams are copied batch by batch, see :mod:`mtrank.data.prefetch`)."""
    if device.type != "cuda" or not isinstance(data, EncodedData) or data.device == device:
        return data
    free, _ = torch.cuda.mem_get_info(device)
    return data.to(device) if data.nbytes() < 0.5 * free else data


def check_finite(total: torch.Tensor, loss: torch.Tensor, epoch: int) -> None:
    """Raise FloatingPointError when the running loss sum is NaN or infinite."""
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"training loss became {float(loss)} at epoch {epoch}; "
            "lower the learning rate or check the numerical features"
        )


def _epoch_summary(log: EpochLog) -> str:
    """``train loss …, val loss …, auc_… …`` for an epoch's progress line."""
    parts = [f"train loss {log.train_loss:.4f}"]
    if log.val_loss is not None:
        parts.append(f"val loss {log.val_loss:.4f}")
    parts += [
        f"{k} {v:.4f}"
        for k, v in log.val_metrics.items()
        if k.startswith("auc_") and isinstance(v, float)
    ]
    return ", ".join(parts)


class Trainer:
    """Trains any registered model on a :class:`BatchSource`.

    Args:
        config: :class:`TrainConfig`.
        schema: the dataset schema (for validation metrics).
        quiet: no progress output. Otherwise a bar on a terminal, and plain lines when
            stderr is a file or a pipe (:class:`mtrank.train.progress.EpochProgress`).
        on_epoch: called with each epoch's :class:`EpochLog` as soon as it is known (e.g. to
            write TensorBoard events while training).
    """

    def __init__(
        self,
        config: TrainConfig,
        schema: Schema,
        quiet: bool = False,
        on_epoch: Callable[[EpochLog], None] | None = None,
    ) -> None:
        self.config = config
        self.schema = schema
        self.quiet = quiet
        self.on_epoch = on_epoch

    def _score(self, val_loss: float | None, metrics: dict) -> float | None:
        """Higher is better."""
        if self.config.monitor == "loss":
            return None if val_loss is None else -val_loss
        if self.config.monitor not in metrics:
            raise ConfigError(
                f"monitor {self.config.monitor!r} is not a validation metric; "
                "choose 'loss' or one of "
                f"{sorted(k for k in metrics if k.startswith(('auc', 'gauc')))}"
            )
        value = metrics[self.config.monitor]
        return None if value is None else float(value)

    def fit(
        self,
        model: nn.Module,
        train: BatchSource,
        val: EncodedData | None = None,
        *,
        checkpoint: Path | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        fingerprint: dict[str, str] | None = None,
    ) -> TrainResult:
        """Train ``model`` in place and leave it holding the best validation epoch's weights.

        Without a validation split every epoch runs and the last one is kept.

        Args:
            checkpoint: directory for checkpoints (written at each epoch end, and every
                ``checkpoint_every`` steps when > 0), see :mod:`mtrank.train.checkpoint`.
            resume: continue from ``checkpoint`` (same data, model and config) exactly where it
                stopped: weights, Adam moments, RNG states and the position inside the epoch
                are restored, so the result equals an uninterrupted run.
            fingerprint: digests of what the run is made of (data, schema, encoders, model; see
                :func:`mtrank.train.checkpoint.run_fingerprint`), saved in the checkpoint and
                compared on ``resume``.

        Raises:
            ConfigError: ``resume`` without a usable checkpoint, or one made with another config,
                other data, schema, encoders or model (the fingerprint differs); an unavailable
                ``device`` or an unknown ``precision``.
            FloatingPointError: the training loss became NaN or infinite.
        """
        cfg = self.config
        device = resolve_device(cfg.device, option="device")
        amp_dtype = resolve_precision(cfg.precision, device, option="precision")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        rank, world = rank_world()
        model.to(device)
        optimizers = make_optimizers(model, cfg)
        scaler = grad_scaler(device, amp_dtype)
        if hasattr(train, "shard"):
            train = train.shard(rank, world)
        if cfg.prior_output_bias and not resume:  # before DDP, which broadcasts rank 0's weights
            init_output_bias(model, label_rates(train, self.schema))
        train = place(train, device)
        if world > 1:
            net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            net = model
        # A NaN check is a device-to-host sync: every step on CPU (free), every 32 on a GPU.
        check_every = 1 if device.type == "cpu" else 32
        result = TrainResult(best_epoch=0, best_score=None)
        best_state = None
        bad_epochs = 0
        start_epoch, skip, running, seen = 1, 0, 0.0, 0
        if resume:
            if checkpoint is not None:
                recover_replaced_dir(Path(checkpoint))
            if checkpoint is None or not Path(checkpoint).exists():
                raise ConfigError(f"--resume: no checkpoint found at {checkpoint}")
            ck = load_checkpoint(Path(checkpoint))
            check_fingerprint(ck.meta.get("fingerprint"), fingerprint, checkpoint)
            if ck.meta.get("config") != cfg.resume_key():
                raise ConfigError(
                    f"--resume: the checkpoint at {checkpoint} was made with another training "
                    f"config {ck.meta.get('config')}; use the same options"
                )
            model.load_state_dict(ck.model)
            if len(ck.optimizers) != len(optimizers):
                raise ConfigError(
                    f"--resume: the checkpoint at {checkpoint} has {len(ck.optimizers)} "
                    f"optimizer(s), this run {len(optimizers)}"
                )
            for opt, state in zip(optimizers, ck.optimizers, strict=True):
                opt.load_state_dict(state)
            best_state = None if ck.best is None else {k: v.to(device) for k, v in ck.best.items()}
            if scaler is not None and ck.meta.get("scaler"):
                scaler.load_state_dict(ck.meta["scaler"])
            torch.set_rng_state(ck.rng["torch"])
            if device.type == "cuda" and "cuda" in ck.rng:
                torch.cuda.set_rng_state(ck.rng["cuda"], device)
            gen.set_state(ck.rng["epoch_start"])
            start_epoch, skip = ck.meta["epoch"], ck.meta["batches_done"]
            running, seen = ck.meta["running"], ck.meta["seen"]
            result = TrainResult(
                best_epoch=ck.meta["best_epoch"],
                best_score=ck.meta["best_score"],
                history=[EpochLog(**h) for h in ck.meta["history"]],
            )
            bad_epochs = ck.meta["bad_epochs"]
            if ck.meta.get("stopped"):
                start_epoch = cfg.epochs + 1

        def save(epoch: int, done: int, epoch_start: torch.Tensor, stopped: bool = False) -> None:
            if checkpoint is None or rank != 0:
                return
            rng = {"torch": torch.get_rng_state(), "epoch_start": epoch_start}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(
                Path(checkpoint),
                model,
                optimizers,
                best_state,
                rng,
                {
                    "epoch": epoch,
                    "batches_done": done,
                    "running": running,
                    "seen": seen,
                    "best_epoch": result.best_epoch,
                    "best_score": result.best_score,
                    "bad_epochs": bad_epochs,
                    "stopped": stopped,
                    "history": [asdict(h) for h in result.history],
                    "config": cfg.resume_key(),
                    "scaler": None if scaler is None else scaler.state_dict(),
                    **({"fingerprint": fingerprint} if fingerprint else {}),
                },
            )

        n_batches = (len(train) + cfg.batch_size - 1) // cfg.batch_size
        for epoch in range(start_epoch, cfg.epochs + 1):
            model.train()
            epoch_start = gen.get_state()
            start = time.perf_counter()
            if skip == 0:
                running, seen = 0.0, 0
            bar = EpochProgress(
                f"epoch {epoch}/{cfg.epochs}",
                n_batches,
                initial=skip,
                batch_size=cfg.batch_size,
                quiet=self.quiet,
            )
            # the loss sum stays on the device (float64): no device-to-host sync per step
            total = torch.zeros((), dtype=torch.float64, device=device)
            # DDP's join() lets ranks with fewer batches (uneven shards) finish the epoch
            with net.join() if world > 1 else contextlib.nullcontext():
                batches = device_batches(
                    train,
                    cfg.batch_size,
                    shuffle=True,
                    generator=gen,
                    device=device,
                    depth=cfg.prefetch,
                )
                for i, batch in enumerate(batches):
                    if i < skip:
                        continue
                    with autocast(device, amp_dtype):
                        out = net(
                            batch.categorical,
                            batch.numerical,
                            *batch.extra,
                            **forward_kwargs(model, batch),
                        )
                    loss, _ = model_loss(model, out, batch, parts=False)  # float32, autocast off
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    if scaler is None:
                        loss.backward()
                        for opt in optimizers:
                            opt.step()
                    else:
                        scaler.scale(loss).backward()
                        for opt in optimizers:
                            scaler.step(opt)
                        scaler.update()
                    total += loss.detach().double() * len(batch)
                    seen += len(batch)
                    if (i + 1) % check_every == 0 or i + 1 == n_batches:
                        check_finite(total, loss, epoch)
                    # the running mean for the progress line, read back every 20 steps
                    bar.update((running + float(total)) / seen if (i + 1) % 20 == 0 else None)
                    if checkpoint_every and (i + 1) % checkpoint_every == 0 and i + 1 < n_batches:
                        running, total = running + float(total), total.zero_()
                        save(epoch, i + 1, epoch_start)
            check_finite(total, total, epoch)
            running += float(total)
            skip = 0
            bar.close()
            seconds = time.perf_counter() - start
            val_loss, metrics = None, {}
            if val is not None and len(val):
                val_loss, metrics = validate(model, val, self.schema)
            result.history.append(
                EpochLog(
                    epoch,
                    running / max(seen, 1),
                    val_loss,
                    metrics,
                    seconds,
                    seen / max(seconds, 1e-9),
                )
            )
            bar.report(_epoch_summary(result.history[-1]))
            if self.on_epoch is not None:
                self.on_epoch(result.history[-1])
            score = self._score(val_loss, metrics)
            stop = False
            if val is None or (
                score is not None and (result.best_score is None or score > result.best_score)
            ):
                result.best_epoch, result.best_score = epoch, score
                best_state = copy.deepcopy(model.state_dict())
                bad_epochs = 0
            else:
                bad_epochs += 1
                stop = bad_epochs > cfg.patience
            running, seen = 0.0, 0
            save(epoch + 1, 0, gen.get_state(), stopped=stop)
            if stop:
                result.stopped_early = True
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        elif result.history:
            result.best_epoch = result.history[
                -1
            ].epoch  # no usable validation score: keep the last
        if result.best_score is not None and not math.isfinite(result.best_score):
            result.best_score = None
        model.eval()
        return result
