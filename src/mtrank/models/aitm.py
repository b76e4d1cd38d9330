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

On a staged funnel (``spec.stages``) the transfer chains along the funnel's tree, as AITM's
t-th task receives from task t − 1 (§3.3): stage s's tower mixes its own representation with
what its ``after`` stage transfers, its head predicts the end-to-end ``p_<s>_all`` (trained
against "reached s" over all impressions), ``p_<s>`` = clip(``p_<s>_all`` / ``p_<after>_all``,
0, 1), and the calibrator penalises α · Σ_s mean(max(``p_<s>_all`` − ``p_<after>_all``, 0)).
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
from mtrank.models.stages import funnel_aliases

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
        self.stages, self.parents = list(spec.stages), list(spec.parents)
        if not self.stages:
            require_funnel(spec, "AITM")
        self.options = parse_options(self.Options, cfg)
        self.calibrator_weight = self.options.calibrator_weight
        if self.calibrator_weight < 0:
            raise ConfigError(f"aitm: calibrator_weight must be ≥ 0, got {self.calibrator_weight}")
        if self.stages:
            self._build_stages(spec, cfg)
            return
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        d_in = self.embedding.output_dim
        self.ctr_tower = MLP(d_in, cfg.tower, out=None, dropout=cfg.dropout)
        self.cvr_tower = MLP(d_in, cfg.tower, out=None, dropout=cfg.dropout)
        d = self.ctr_tower.output_dim
        self.transfer = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.attention = AttentionTransfer(d)
        self.ctr_head = nn.Linear(d, 1)
        self.ctcvr_head = nn.Linear(d, 1)

    def _build_stages(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        """Per stage a tower and an end-to-end head; per later stage a transfer layer from its
        ``after`` stage and an attention (AITM §3.3 along the funnel's tree)."""
        self.tasks = [
            TaskLoss(f"{s}_all", label=f"{s}_all", outputs=(f"logit_{s}_all",)) for s in self.stages
        ]
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        d_in = self.embedding.output_dim
        towers = {s: MLP(d_in, cfg.tower, out=None, dropout=cfg.dropout) for s in self.stages}
        self.stage_towers = nn.ModuleDict(towers)
        d = towers[self.stages[0]].output_dim
        later = self.stages[1:]
        self.stage_transfers = nn.ModuleDict(
            {s: nn.Sequential(nn.Linear(d, d), nn.ReLU()) for s in later}
        )
        self.stage_attention = nn.ModuleDict({s: AttentionTransfer(d) for s in later})
        self.stage_heads = nn.ModuleDict({s: nn.Linear(d, 1) for s in self.stages})

    def head_outputs(self) -> dict[str, nn.Linear]:
        """On a staged funnel, the output layer of each head named by the rate it predicts over
        all impressions (``<stage>_all``), for :func:`~mtrank.models.layers.init_output_bias`;
        without it the three-stage AITM did not learn in a small budget (docs/models.md). The
        two-stage AITM keeps PyTorch's bias init: started at the base rates, its
        division-derived pCVR ranked clicked rows worse on the zoo test (AUC 0.49 vs > 0.54)."""
        if self.stages:
            return {f"{s}_all": h for s, h in self.stage_heads.items()}
        return {}

    def _forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Staged outputs ``[B]`` from the embedded input ``x`` ``[B, d_in]``."""
        out: dict[str, torch.Tensor] = {}
        reps: list[torch.Tensor] = []
        for i, s in enumerate(self.stages):
            q = self.stage_towers[s](x)
            parent = self.parents[i]
            if parent >= 0:
                q, w = self.stage_attention[s](self.stage_transfers[s](reps[parent]), q)
                out[f"transfer_weight_{s}"] = w[:, 0]
            reps.append(q)
            logit_all = self.stage_heads[s](q).squeeze(-1)
            p_all = torch.sigmoid(logit_all)
            out[f"logit_{s}_all"], out[f"p_{s}_all"] = logit_all, p_all
            if parent < 0:
                out[f"p_{s}"], out[f"logit_{s}"] = p_all, logit_all
            else:
                out[f"p_{s}"], out[f"logit_{s}"] = derived_cvr(
                    out[f"p_{self.stages[parent]}_all"], p_all
                )
        return funnel_aliases(out, self.stages, self.parents)

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named outputs ``[B]`` (see the class docstring) from ids ``[B, n_cat]`` and numbers
        ``[B, n_num]``."""
        x = self.embedding(categorical, numerical, *extra)
        if self.stages:
            return self._forward_stages(x)
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
        scalar; on a staged funnel summed over the stages after the first."""
        if self.stages:
            gaps = [
                torch.relu(outputs[f"p_{s}_all"] - outputs[f"p_{self.stages[p]}_all"]).mean()
                for s, p in zip(self.stages, self.parents, strict=True)
                if p >= 0
            ]
            return self.calibrator_weight * sum(gaps, outputs[f"p_{self.stages[0]}"].new_zeros(()))
        return self.calibrator_weight * torch.relu(outputs["p_ctcvr"] - outputs["p_ctr"]).mean()
