"""The trainer: Adam, shuffled tensor batches, exact validation each epoch, early stopping on the
validation split (never on test), and the best epoch's weights restored at the end.

The trainer knows nothing of particular models: it sums the loss terms each model declares in
its ``tasks`` attribute (:class:`mtrank.losses.TaskLoss`), plus the model's optional
``extra_loss(outputs, batch)`` (see :func:`mtrank.losses.model_loss`).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from mtrank.data.batch import BatchSource, EncodedData
from mtrank.data.schema import Schema
from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss, model_loss, task_loss_sum
from mtrank.metrics.evaluate import evaluate_outputs


class TrainConfig(BaseModel):
    """Training hyperparameters.

    Attributes:
        epochs: maximum epochs. batch_size: rows per step. lr: Adam learning rate.
        weight_decay: L2 on all parameters. patience: epochs without validation improvement
        before stopping. monitor: ``loss`` (the model's own validation objective, lower is
        better) or a metric name such as ``auc_ctcvr`` (higher is better).
        seed: seeds initialisation and shuffling. threads: torch intra-op threads (0 = default).
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


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float | None
    val_metrics: dict[str, float | int | None]
    seconds: float
    samples_per_second: float


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float | None
    history: list[EpochLog] = field(default_factory=list)
    stopped_early: bool = False


@torch.no_grad()
def predict(model: nn.Module, data: EncodedData, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Run a model over a split in eval mode; returns each ``[N]`` output as a numpy array.

    The model's previous train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in data.batches(batch_size, shuffle=False):
            out = model(batch.categorical, batch.numerical)
            for k, v in out.items():
                chunks.setdefault(k, []).append(v.detach())
    finally:
        model.train(was_training)
    if not chunks:
        return {}
    return {k: torch.cat(v).float().numpy() for k, v in chunks.items()}


@torch.no_grad()
def validation_loss(model: nn.Module, data: EncodedData, batch_size: int = 8192) -> float:
    """The model's own objective on a split, exact over all rows (Σ numerators / Σ weights)."""
    tasks: list[TaskLoss] = model.tasks
    num = dict.fromkeys((t.name for t in tasks), 0.0)
    den = dict.fromkeys((t.name for t in tasks), 0.0)
    was_training = model.training
    model.eval()
    try:
        for batch in data.batches(batch_size, shuffle=False):
            out = model(batch.categorical, batch.numerical)
            for t in tasks:
                n, d = task_loss_sum(t, out, batch)
                num[t.name] += float(n)
                den[t.name] += float(d)
    finally:
        model.train(was_training)
    return float(sum(t.weight * num[t.name] / max(den[t.name], 1e-12) for t in tasks))


class Trainer:
    """Trains any registered model on a :class:`BatchSource`.

    Args:
        config: :class:`TrainConfig`.
        schema: the dataset schema (for validation metrics).
        quiet: hide the progress bar (it is also hidden when stderr is not a terminal).
    """

    def __init__(self, config: TrainConfig, schema: Schema, quiet: bool = False) -> None:
        self.config = config
        self.schema = schema
        self.quiet = quiet or not sys.stderr.isatty()

    def _score(self, val_loss: float | None, metrics: dict) -> float | None:
        """Higher is better."""
        if self.config.monitor == "loss":
            return None if val_loss is None else -val_loss
        if self.config.monitor not in metrics:
            raise ConfigError(
                f"monitor {self.config.monitor!r} is not a validation metric; "
                f"choose 'loss' or one of {sorted(k for k in metrics if k.startswith(('auc', 'gauc')))}"
            )
        value = metrics[self.config.monitor]
        return None if value is None else float(value)

    def fit(self, model: nn.Module, train: BatchSource, val: EncodedData | None = None) -> TrainResult:
        """Train ``model`` in place and leave it holding the best validation epoch's weights.

        Without a validation split every epoch runs and the last one is kept.
        """
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        result = TrainResult(best_epoch=0, best_score=None)
        best_state = None
        bad_epochs = 0
        n_batches = (len(train) + cfg.batch_size - 1) // cfg.batch_size
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            start = time.perf_counter()
            running, seen = 0.0, 0
            bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=self.quiet, leave=False)
            for batch in train.batches(cfg.batch_size, shuffle=True, generator=gen):
                out = model(batch.categorical, batch.numerical)
                loss, _ = model_loss(model, out, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {float(loss)} at epoch {epoch}; "
                        "lower the learning rate or check the numerical features"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * len(batch)
                seen += len(batch)
                bar.update(1)
                if bar.n % 20 == 0:
                    bar.set_postfix(loss=f"{running / seen:.4f}")
            bar.close()
            seconds = time.perf_counter() - start
            val_loss, metrics = None, {}
            if val is not None and len(val):
                val_loss = validation_loss(model, val)
                metrics = evaluate_outputs(predict(model, val), {k: v.numpy() for k, v in val.labels.items()}, self.schema, val.side)
            result.history.append(
                EpochLog(epoch, running / max(seen, 1), val_loss, metrics, seconds, seen / max(seconds, 1e-9))
            )
            score = self._score(val_loss, metrics)
            if val is None or (score is not None and (result.best_score is None or score > result.best_score)):
                result.best_epoch, result.best_score = epoch, score
                best_state = copy.deepcopy(model.state_dict())
                bad_epochs = 0
            else:
                bad_epochs += 1
                if bad_epochs > cfg.patience:
                    result.stopped_early = True
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        if result.best_score is not None and not math.isfinite(result.best_score):
            result.best_score = None
        model.eval()
        return result
