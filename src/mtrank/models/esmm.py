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
from mtrank.models.stages import stage_outputs, stage_tasks


class ESMM(nn.Module):
    """ESMM with shared embeddings (set ``options.shared_embedding=0`` for ESMM-NS).

    Shapes: forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``) → dict of
    ``[B]`` tensors: ``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr``, ``p_ctcvr``.

    On a staged funnel (``spec.stages``, any length ≥ 1) there is one tower per stage giving
    its conditional logit, the outputs are those of :func:`~mtrank.models.stages.stage_outputs`
    and the loss is ESMM's entire-space loss per stage (:func:`~mtrank.models.stages.stage_tasks`).

    Raises:
        ConfigError: the dataset has no click → conversion funnel and no staged funnel.
    """

    tasks = [
        TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
        TaskLoss("ctcvr", label="ctcvr", outputs=("logit_ctr", "logit_cvr"), kind="logit_product"),
    ]
    entire_space = True  # pCVR is learnt through pCTCVR over all impressions
    n_stages = True  # works on a staged funnel of any length (not inherited: see __init__)

    class Options(ModelOptions):
        """``shared_embedding``: CTR and CVR share the embedding table (ESMM-NS: false)."""

        shared_embedding: bool = True

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.options = parse_options(self.Options, cfg)
        self.shared_embedding = self.options.shared_embedding
        self.stages, self.parents = list(spec.stages), list(spec.parents)
        # N stages only for classes that declare it themselves: a subclass (ESCM², …) with a
        # two-stage loss must not inherit the staged path silently
        if self.stages and vars(type(self)).get("n_stages", False):
            self._build_stages(spec, cfg)
            return
        require_funnel(spec, type(self).__name__.upper())
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        self.cvr_embedding = (
            None if self.shared_embedding else FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        )
        d = self.embedding.output_dim
        self.ctr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)
        self.cvr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)

    def _build_stages(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        """One tower per stage over the shared embedding (one embedding per stage for
        ESMM-NS); the loss terms of :func:`~mtrank.models.stages.stage_tasks`."""
        self.tasks = stage_tasks(self.stages, self.parents)
        n_tables = 1 if self.shared_embedding else len(self.stages)
        self.stage_embeddings = nn.ModuleList(
            FeatureEmbedding.from_spec(spec, cfg.embedding_dim) for _ in range(n_tables)
        )
        d = self.stage_embeddings[0].output_dim
        self.stage_towers = nn.ModuleDict(
            {s: MLP(d, cfg.tower, out=1, dropout=cfg.dropout) for s in self.stages}
        )

    def head_outputs(self) -> dict[str, nn.Linear]:
        """The output layer of each tower (for :func:`~mtrank.models.layers.init_output_bias`)."""
        if self.stages:
            return {s: t.output_layer for s, t in self.stage_towers.items()}
        return {"ctr": self.ctr_tower.output_layer, "cvr": self.cvr_tower.output_layer}

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr``, ``p_ctcvr`` = pCTR · pCVR ``[B]``
        (Ma et al. 2018, eq. 2); on a staged funnel the outputs of
        :func:`~mtrank.models.stages.stage_outputs`."""
        if self.stages:
            xs = [e(categorical, numerical, *extra) for e in self.stage_embeddings]
            logits = [
                self.stage_towers[s](xs[min(i, len(xs) - 1)]).squeeze(-1)
                for i, s in enumerate(self.stages)
            ]
            return stage_outputs(logits, self.stages, self.parents)
        x = self.embedding(categorical, numerical, *extra)
        x_cvr = (
            x if self.cvr_embedding is None else self.cvr_embedding(categorical, numerical, *extra)
        )
        return funnel_outputs(self.ctr_tower(x).squeeze(-1), self.cvr_tower(x_cvr).squeeze(-1))


class ESMMNS(ESMM):
    """ESMM-NS (ESMM paper §3.3): ESMM without shared embeddings; each tower has its own
    embedding table, so only the CTCVR product ties the towers (``esmm_ns``)."""

    n_stages = True

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__(
            spec, cfg.model_copy(update={"options": {**cfg.options, "shared_embedding": 0}})
        )
