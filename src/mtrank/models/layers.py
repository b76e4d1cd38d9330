"""Building blocks shared by every model: the feature embedding and the MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtrank.errors import ConfigError


class FeatureEmbedding(nn.Module):
    """Embeds categorical ids and appends numerical values.

    All categorical fields share one embedding table with per-field row offsets, so a batch is
    one gather, not one lookup per field.

    Args:
        cardinalities: rows per categorical field (vocabulary + 2 reserved indices).
        n_numerical: number of numerical features.
        dim: embedding size (ESMM paper: 18).

    Shapes:
        forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``)
        → float32 ``[B, n_cat · dim + n_num]``.

    Raises:
        ConfigError: no feature at all, or a non-positive dimension.
    """

    def __init__(self, cardinalities: Sequence[int], n_numerical: int, dim: int) -> None:
        super().__init__()
        if not cardinalities and n_numerical == 0:
            raise ConfigError("a model needs at least one categorical or numerical feature")
        if dim <= 0:
            raise ConfigError(f"embedding_dim must be positive, got {dim}")
        self.n_categorical = len(cardinalities)
        self.n_numerical = n_numerical
        self.dim = dim
        offsets = torch.tensor([0, *list(cardinalities)[:-1]], dtype=torch.int64).cumsum(0) if cardinalities else torch.zeros(0, dtype=torch.int64)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(max(1, int(sum(cardinalities))), dim)
        nn.init.normal_(self.table.weight, std=0.01)

    @property
    def output_dim(self) -> int:
        return self.n_categorical * self.dim + self.n_numerical

    def forward(self, categorical: torch.Tensor, numerical: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.n_categorical:
            emb = self.table(categorical + self.offsets)  # [B, n_cat, dim]
            parts.append(emb.flatten(1))
        if self.n_numerical:
            parts.append(numerical)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class MLP(nn.Module):
    """Linear → ReLU (→ dropout) per hidden layer, then an optional linear output of size ``out``.

    Shapes: ``[B, in_dim]`` → ``[B, out]`` (or ``[B, hidden[-1]]`` when ``out`` is None).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out: int | None = 1, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out is not None:
            layers.append(nn.Linear(d, out))
            d = out
        self.net = nn.Sequential(*layers)
        self.output_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def funnel_outputs(logit_ctr: torch.Tensor, logit_cvr: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named outputs of a funnel model from its two logits (each ``[B]``).

    Returns ``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr`` and ``p_ctcvr = p_ctr · p_cvr``
    (ESMM eq. 2), all ``[B]``; pCTCVR ≤ pCTR holds by construction.
    """
    p_ctr = torch.sigmoid(logit_ctr)
    p_cvr = torch.sigmoid(logit_cvr)
    return {
        "logit_ctr": logit_ctr,
        "logit_cvr": logit_cvr,
        "p_ctr": p_ctr,
        "p_cvr": p_cvr,
        "p_ctcvr": p_ctr * p_cvr,
    }
