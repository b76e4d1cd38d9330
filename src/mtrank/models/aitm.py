"""AITM-style model: Adaptive Information Transfer Multi-task (Xi et al., KDD 2021, §3).

Each step of the funnel has a tower over the shared embedding. The conversion tower receives
what the click tower transfers (AIT module, §3.3, eq. 3–6): the click tower's representation
``q_ctr`` is mapped by a transfer layer to ``p = ReLU(W q_ctr)``; the conversion tower's own
representation ``q`` and ``p`` are mixed by attention,

    w_u = softmax_u(⟨h₂(u), h₃(u)⟩ / √d),  z = Σ_{u ∈ {p, q}} w_u · h₁(u),

and ``z`` gives the conversion logit. As in AITM, the conversion head predicts the *end-to-end*
probability of the step (click ∧ conversion, i.e. pCTCVR) over all impressions, and the
behavioural expectation calibrator (§3.4, eq. 8) adds the penalty

    α · mean(max(pCTCVR − pCTR, 0))

through the trainer's generic ``extra_loss`` hook, so pCTCVR ≤ pCTR is encouraged, not forced.
pCVR is derived as ``clip(pCTCVR / pCTR, 0, 1)`` (with ``logit_cvr`` its logit).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtrank.data.batch import Batch
from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss
from mtrank.models.config import (
    FeatureSpec,
    ModelConfig,
    ModelOptions,
    parse_options,
    require_funnel,
)
from mtrank.models.layers import MLP, FeatureEmbedding

PROB_EPS = 1e-6


class AttentionTransfer(nn.Module):
    """AIT (Xi et al. 2021, eq. 3–6). Shapes: (transferred ``[B, d]``, own ``[B, d]``) →
    (``z`` ``[B, d]``, attention weights ``[B, 2]``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1, self.h2, self.h3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(
        self, transferred: torch.Tensor, own: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over (transferred, own) ``[B, d]`` each: the fused ``[B, d]`` and the weight
        on the transferred one ``[B]``."""
        u = torch.stack([transferred, own], dim=1)  # [B, 2, d]
        w = torch.softmax((self.h2(u) * self.h3(u)).sum(-1) * self.scale, dim=1)  # [B, 2]
        return (w.unsqueeze(-1) * self.h1(u)).sum(1), w


def derived_cvr(p_ctr: torch.Tensor, p_ctcvr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pCVR, logit pCVR) from pCTR and pCTCVR ``[B]``: pCVR = clip(pCTCVR / pCTR, 0, 1)
    (ESMM paper §3.1, DIVISION); the logit uses pCVR clipped to [1e-6, 1 − 1e-6]."""
    p_cvr = (p_ctcvr / p_ctr.clamp_min(PROB_EPS)).clamp(0.0, 1.0)
    return p_cvr, torch.logit(p_cvr, eps=PROB_EPS)


class AITM(nn.Module):
    """AITM-style CTR → CTCVR model with attention transfer and the behavioural calibrator.

    Args (``cfg.options``): ``calibrator_weight`` α ≥ 0 (default 0.6).

    Shapes: forward(categorical ``[B, n_cat]``, numerical ``[B, n_num]``) → dict of ``[B]``:
    ``logit_ctr, logit_ctcvr, logit_cvr, p_ctr, p_ctcvr, p_cvr, transfer_weight`` (the attention
    weight on the transferred click information).

    Raises:
        ConfigError: no funnel, or a negative ``calibrator_weight``.
    """

    tasks = [
        TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
        TaskLoss("ctcvr", label="ctcvr", outputs=("logit_ctcvr",)),
    ]
    entire_space = True  # trained through pCTCVR over all impressions

    class Options(ModelOptions):
        """``calibrator_weight``: α of the behavioural calibrator (≥ 0)."""

        calibrator_weight: float = 0.6

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        require_funnel(spec, "AITM")
        self.options = parse_options(self.Options, cfg)
        self.calibrator_weight = self.options.calibrator_weight
        if self.calibrator_weight < 0:
            raise ConfigError(f"aitm: calibrator_weight must be ≥ 0, got {self.calibrator_weight}")
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        d_in = self.embedding.output_dim
        self.ctr_tower = MLP(d_in, cfg.tower, out=None, dropout=cfg.dropout)
        self.cvr_tower = MLP(d_in, cfg.tower, out=None, dropout=cfg.dropout)
        d = self.ctr_tower.output_dim
        self.transfer = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.attention = AttentionTransfer(d)
        self.ctr_head = nn.Linear(d, 1)
        self.ctcvr_head = nn.Linear(d, 1)

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named outputs ``[B]`` (see the class docstring) from ids ``[B, n_cat]`` and numbers
        ``[B, n_num]``."""
        x = self.embedding(categorical, numerical, *extra)
        q_ctr = self.ctr_tower(x)
        z, w = self.attention(self.transfer(q_ctr), self.cvr_tower(x))
        logit_ctr = self.ctr_head(q_ctr).squeeze(-1)
        logit_ctcvr = self.ctcvr_head(z).squeeze(-1)
        p_ctr, p_ctcvr = torch.sigmoid(logit_ctr), torch.sigmoid(logit_ctcvr)
        p_cvr, logit_cvr = derived_cvr(p_ctr, p_ctcvr)
        return {
            "logit_ctr": logit_ctr,
            "logit_cvr": logit_cvr,
            "logit_ctcvr": logit_ctcvr,
            "p_ctr": p_ctr,
            "p_cvr": p_cvr,
            "p_ctcvr": p_ctcvr,
            "transfer_weight": w[:, 0],
        }

    def extra_loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Behavioural expectation calibrator (AITM eq. 8): α · mean(max(pCTCVR − pCTR, 0)),
        scalar."""
        return self.calibrator_weight * torch.relu(outputs["p_ctcvr"] - outputs["p_ctr"]).mean()
