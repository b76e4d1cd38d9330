"""Tensors ready for a model: one :class:`Batch` type for training, evaluation and serving.

Batches are sliced from pre-encoded tensors by index (vectorised gather), never assembled row
by row through a ``__getitem__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import polars as pl
import torch

from mtrank.data.encoders import FeatureEncoder
from mtrank.data.funnel import derived_labels
from mtrank.data.schema import Schema


@dataclass
class Batch:
    """A batch of B impressions.

    Attributes:
        categorical: int64 ``[B, n_cat]`` encoded ids (0 = missing, 1 = OOV).
        numerical: float32 ``[B, n_num]`` standardised values.
        labels: float32 ``[B]`` per label key: ``click``, ``conversion``, ``ctcvr`` (= click ·
            conversion) for a funnel, the keys of :func:`mtrank.data.funnel.derived_labels` for
            a staged funnel, else one per task name. Empty at serving time.
        weight: optional float32 ``[B]`` sample weights.
        extra: the list/sequence feature tensors in schema order (per list feature ids int64
            ``[B, L]`` and, when weighted, weights float32 ``[B, L]``; per sequence ids ``[B,
            L]``; 0 = padding), passed to every model as ``model(categorical, numerical,
            *extra)`` (see docs/features.md).
        position: optional int64 ``[B]`` logged positions (training only: the position tower of
            :mod:`mtrank.models.position`).
    """

    categorical: torch.Tensor
    numerical: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    extra: list[torch.Tensor] = field(default_factory=list)
    position: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch (features, labels, weight), for moving or pinning."""
        return [
            self.categorical,
            self.numerical,
            *self.labels.values(),
            *([] if self.weight is None else [self.weight]),
            *self.extra,
            *([] if self.position is None else [self.position]),
        ]

    def map(self, fn) -> Batch:
        """A Batch of ``fn(tensor)`` for each tensor (labels keep their keys)."""
        return Batch(
            categorical=fn(self.categorical),
            numerical=fn(self.numerical),
            labels={k: fn(v) for k, v in self.labels.items()},
            weight=None if self.weight is None else fn(self.weight),
            extra=[fn(t) for t in self.extra],
            position=None if self.position is None else fn(self.position),
        )

    def to(self, device: torch.device, *, non_blocking: bool = False) -> Batch:
        """The batch on ``device`` (itself when already there). With ``non_blocking`` from pinned
        host memory the copy overlaps GPU work (the consumer must synchronise, see
        :mod:`mtrank.data.prefetch`)."""
        if self.categorical.device == torch.device(device):
            return self
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (needs a CUDA-enabled torch with a GPU)."""
        return self.map(lambda t: t.pin_memory())


class BatchSource(Protocol):
    """Anything the trainer can iterate per epoch (in-memory tensors now, streams later)."""

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Batches of at most ``batch_size`` rows, shuffled with ``generator`` when ``shuffle``."""

    def __len__(self) -> int: ...


@dataclass
class EncodedData:
    """A whole split encoded into tensors, plus the side columns metrics and outputs need.

    Attributes:
        categorical: int64 ``[N, n_cat]``; numerical: float32 ``[N, n_num]``.
        labels: float32 ``[N]`` per label key (see :class:`Batch`).
        weight: optional float32 ``[N]`` (the schema's weight column; price weights).
        position: optional int64 ``[N]`` (the schema's position column).
        side: numpy columns kept for evaluation and output (user id, request id, price,
            passthrough columns such as the simulator's ``true_cvr``), by schema column name.
        n_missing, n_oov: per-column counts of missing and out-of-vocabulary values (elements,
            for list and sequence features).
        extra: list/sequence feature tensors ``[N, L]`` (see :class:`Batch`).
        n_truncated: per list/sequence column, rows cut to the declared ``max_len``.
    """

    categorical: torch.Tensor
    numerical: torch.Tensor
    labels: dict[str, torch.Tensor]
    weight: torch.Tensor | None = None
    side: dict[str, np.ndarray] = field(default_factory=dict)
    position: torch.Tensor | None = None
    n_missing: dict[str, int] = field(default_factory=dict)
    n_oov: dict[str, int] = field(default_factory=dict)
    extra: list[torch.Tensor] = field(default_factory=list)
    n_truncated: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the tensors are (the side columns are always on the host)."""
        return self.categorical.device

    @classmethod
    def from_frame(
        cls, df: pl.DataFrame, schema: Schema, encoder: FeatureEncoder, *, with_labels: bool = True
    ) -> EncodedData:
        """Encode a validated table (see :func:`mtrank.data.io.validate_frame`)."""
        feats = encoder.transform(df)
        labels: dict[str, torch.Tensor] = {}
        if with_labels:
            for key, col in zip(schema.label_names, schema.label_columns, strict=True):
                labels[key] = torch.from_numpy(
                    df.get_column(col).cast(pl.Float32).to_numpy().copy()
                )
            if schema.is_staged:
                labels.update(derived_labels(labels, schema.stage_names, schema.stage_parents))
            elif schema.is_funnel:
                labels["ctcvr"] = labels["click"] * labels["conversion"]
        side: dict[str, np.ndarray] = {}
        for col in [
            schema.user_id,
            schema.item_id,
            schema.request_id,
            schema.price,
            *schema.passthrough,
        ]:
            if col is not None and col in df.columns and col not in side:
                side[col] = df.get_column(col).to_numpy()
        weight = position = None
        if with_labels and schema.weight is not None and schema.weight in df.columns:
            weight = torch.from_numpy(df.get_column(schema.weight).to_numpy().astype(np.float32))
        if with_labels and schema.position is not None and schema.position in df.columns:
            position = torch.from_numpy(df.get_column(schema.position).to_numpy().astype(np.int64))
        return cls(
            categorical=torch.from_numpy(feats.categorical),
            numerical=torch.from_numpy(feats.numerical),
            labels=labels,
            weight=weight,
            position=position,
            side=side,
            n_missing=feats.n_missing,
            n_oov=feats.n_oov,
            extra=[torch.from_numpy(t) for t in feats.extra],
            n_truncated=feats.n_truncated,
        )

    def take(self, index: torch.Tensor) -> Batch:
        """Gather rows ``index`` (int64 ``[B]``) into a Batch."""
        return Batch(
            categorical=self.categorical.index_select(0, index),
            numerical=self.numerical.index_select(0, index),
            labels={k: v.index_select(0, index) for k, v in self.labels.items()},
            weight=None if self.weight is None else self.weight.index_select(0, index),
            extra=[t.index_select(0, index) for t in self.extra],
            position=None if self.position is None else self.position.index_select(0, index),
        )

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Yield batches of ``batch_size`` rows (the last may be smaller); shuffled per call.

        The permutation is drawn on the CPU ``generator`` and then moved to the tensors' device,
        so the batches are the same rows on every device."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.categorical.device)
            for start in range(0, n, batch_size):
                yield self.take(order[start : start + batch_size])
        else:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                yield Batch(
                    categorical=self.categorical[start:stop],
                    numerical=self.numerical[start:stop],
                    labels={k: v[start:stop] for k, v in self.labels.items()},
                    weight=None if self.weight is None else self.weight[start:stop],
                    extra=[t[start:stop] for t in self.extra],
                    position=None if self.position is None else self.position[start:stop],
                )

    def to(self, device: torch.device) -> EncodedData:
        """The tensors on ``device`` (side columns stay numpy on the host); itself when already
        there."""
        if self.categorical.device == torch.device(device):
            return self
        return EncodedData(
            categorical=self.categorical.to(device),
            numerical=self.numerical.to(device),
            labels={k: v.to(device) for k, v in self.labels.items()},
            weight=None if self.weight is None else self.weight.to(device),
            position=None if self.position is None else self.position.to(device),
            side=self.side,
            n_missing=self.n_missing,
            n_oov=self.n_oov,
            extra=[t.to(device) for t in self.extra],
            n_truncated=self.n_truncated,
        )

    def nbytes(self) -> int:
        """Bytes held by the tensors (features, labels, weight)."""
        ts = [
            self.categorical,
            self.numerical,
            *self.labels.values(),
            *([] if self.weight is None else [self.weight]),
            *self.extra,
            *([] if self.position is None else [self.position]),
        ]
        return sum(t.element_size() * t.numel() for t in ts)

    def subset(self, index: torch.Tensor) -> EncodedData:
        """Rows ``index`` (int64 ``[M]``) as a new EncodedData, side columns included."""
        idx = index.cpu().numpy()
        index = index.to(self.device)
        return EncodedData(
            categorical=self.categorical.index_select(0, index),
            numerical=self.numerical.index_select(0, index),
            labels={k: v.index_select(0, index) for k, v in self.labels.items()},
            weight=None if self.weight is None else self.weight.index_select(0, index),
            position=None if self.position is None else self.position.index_select(0, index),
            side={k: v[idx] for k, v in self.side.items()},
            extra=[t.index_select(0, index) for t in self.extra],
        )

    def shard(self, rank: int, world_size: int) -> EncodedData:
        """Rows ``rank, rank + world_size, …``: this process's share under data parallelism."""
        if world_size == 1:
            return self
        return self.subset(torch.arange(rank, len(self), world_size))

    @classmethod
    def concat(cls, parts: list[EncodedData]) -> EncodedData:
        """Stack encoded chunks row-wise (OOV / missing counts are summed)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return cls(
            categorical=torch.cat([p.categorical for p in parts]),
            numerical=torch.cat([p.numerical for p in parts]),
            labels={k: torch.cat([p.labels[k] for p in parts]) for k in first.labels},
            weight=None if first.weight is None else torch.cat([p.weight for p in parts]),
            position=None if first.position is None else torch.cat([p.position for p in parts]),
            side={k: np.concatenate([p.side[k] for p in parts]) for k in first.side},
            n_missing={k: sum(p.n_missing.get(k, 0) for p in parts) for k in first.n_missing},
            n_oov={k: sum(p.n_oov.get(k, 0) for p in parts) for k in first.n_oov},
            extra=[cat_padded([p.extra[i] for p in parts]) for i in range(len(first.extra))],
            n_truncated={k: sum(p.n_truncated.get(k, 0) for p in parts) for k in first.n_truncated},
        )


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise concatenation of ``[N_i, L_i]`` list tensors, right-padded with 0 to the widest."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat(
        [
            t if t.shape[1] == width else torch.nn.functional.pad(t, (0, width - t.shape[1]))
            for t in tensors
        ]
    )
