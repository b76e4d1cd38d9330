"""BASE: independent CTR and CVR models (the ESMM paper's baseline, Ma et al. 2018, §3.1).

The CTR model is trained on all impressions; the CVR model, with its own embeddings, only on
clicked impressions (its loss is masked by ``click``), which is exactly the conventional CVR
training that suffers from sample selection bias. pCTCVR = pCTR × pCVR as in the paper.
The two networks share no parameter, so one joint step is two independent steps.
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


class SingleTaskNet(nn.Module):
    """Embedding + MLP producing one logit ``[B]``."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        self.tower = MLP(self.embedding.output_dim, cfg.tower, out=1, dropout=cfg.dropout)

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> torch.Tensor:
        """The logit ``[B]`` from ids ``[B, n_cat]`` and numbers ``[B, n_num]``."""
        return self.tower(self.embedding(categorical, numerical, *extra)).squeeze(-1)


class Base(nn.Module):
    """Independent CTR model (all impressions) + CVR model (clicked impressions only).

    Shapes: as :class:`mtrank.models.esmm.ESMM`.

    Raises:
        ConfigError: the dataset has no click → conversion funnel.
    """

    tasks = [
        TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
        TaskLoss("cvr", label="conversion", outputs=("logit_cvr",), space="clicked", mask="click"),
    ]
    entire_space = False  # pCVR is learnt on clicked impressions only
    Options = ModelOptions  # no options

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        require_funnel(spec, "BASE")
        self.options = parse_options(self.Options, cfg)
        self.ctr_model = SingleTaskNet(spec, cfg)
        self.cvr_model = SingleTaskNet(spec, cfg)

    def head_outputs(self) -> dict[str, nn.Linear]:
        """The output layer of each network (for :func:`~mtrank.models.layers.init_output_bias`)."""
        return {"ctr": self.ctr_model.tower.output_layer, "cvr": self.cvr_model.tower.output_layer}

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr``, ``p_ctcvr`` ``[B]`` from ids ``[B,
        n_cat]`` and numbers ``[B, n_num]``."""
        return funnel_outputs(
            self.ctr_model(categorical, numerical, *extra),
            self.cvr_model(categorical, numerical, *extra),
        )
