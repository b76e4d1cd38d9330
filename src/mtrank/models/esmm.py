"""ESMM: Entire Space Multi-task Model (Ma et al., SIGIR 2018).

Shared embeddings feed a CTR tower and a CVR tower. pCTCVR = pCTR × pCVR, and the loss is
BCE(pCTR, click) + BCE(pCTCVR, click ∧ conversion) over all impressions (§2.2), so the CVR tower
is trained over the entire space through the product, never on clicked rows alone. This avoids
sample selection bias (SSB) and the data sparsity of clicked-only CVR training.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.losses import TaskLoss
from mtrank.models.config import (
    FeatureSpec,
    ModelConfig,
    ModelOptions,
    parse_options,
    require_funnel,
)
from mtrank.models.layers import MLP, FeatureEmbedding, funnel_outputs


class ESMM(nn.Module):
    """ESMM with shared embeddings (set ``options.shared_embedding=0`` for ESMM-NS).

    Shapes: forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``) → dict of
    ``[B]`` tensors: ``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr``, ``p_ctcvr``.

    Raises:
        ConfigError: the dataset has no click → conversion funnel.
    """

    tasks = [
        TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
        TaskLoss("ctcvr", label="ctcvr", outputs=("logit_ctr", "logit_cvr"), kind="logit_product"),
    ]
    entire_space = True  # pCVR is learnt through pCTCVR over all impressions

    class Options(ModelOptions):
        """``shared_embedding``: CTR and CVR share the embedding table (ESMM-NS: false)."""

        shared_embedding: bool = True

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        require_funnel(spec, "ESMM")
        self.options = parse_options(self.Options, cfg)
        self.shared_embedding = self.options.shared_embedding
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        self.cvr_embedding = (
            None if self.shared_embedding else FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        )
        d = self.embedding.output_dim
        self.ctr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)
        self.cvr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)

    def head_outputs(self) -> dict[str, nn.Linear]:
        """The output layer of each tower (for :func:`~mtrank.models.layers.init_output_bias`)."""
        return {"ctr": self.ctr_tower.output_layer, "cvr": self.cvr_tower.output_layer}

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr``, ``p_ctcvr`` = pCTR · pCVR ``[B]``
        (Ma et al. 2018, eq. 2)."""
        x = self.embedding(categorical, numerical, *extra)
        x_cvr = (
            x if self.cvr_embedding is None else self.cvr_embedding(categorical, numerical, *extra)
        )
        return funnel_outputs(self.ctr_tower(x).squeeze(-1), self.cvr_tower(x_cvr).squeeze(-1))


class ESMMNS(ESMM):
    """ESMM-NS (ESMM paper §3.3): ESMM without shared embeddings; each tower has its own
    embedding table, so only the CTCVR product ties the towers (``esmm_ns``)."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__(
            spec, cfg.model_copy(update={"options": {**cfg.options, "shared_embedding": 0}})
        )
