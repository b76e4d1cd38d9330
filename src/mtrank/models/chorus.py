"""ChorusCVR: chorus supervision for entire-space post-click CVR (Cheng et al., Kuaishou, 2025,
arXiv 2502.08277 v2).

Three towers over one shared embedding, all scored on every impression D: pCTR = ô, pCVR and
pUnCVR = P(no conversion | click), the Negative-sample Discrimination Module (NDM; section
numbers unverified [U]). With
o = click, r = conversion (r = 0 where o = 0), BCE(p, y) = −[y log p + (1−y) log(1−p)], sg the
stop-gradient and w the row weights (1 without a weight column; Σ w = |D|), the loss is the sum
of five terms (all weights 1 in the paper's total; equation numbers as the public
reimplementation maps them):

    (3)  L_ctcvr      = (1/|D|) Σ_D BCE(ô · pCVR, o · r)
    (4)  L_cvr^IPW    = (1/|D|) Σ_D o · BCE(pCVR, r) / ô
    (7)  L_ctuncvr    = (1/|D|) Σ_D BCE(ô · pUnCVR, o · (1 − r))
    (9)  L_uncvr^IPW  = (1/|D|) Σ_D o · BCE(pUnCVR, 1 − r) / ô
    (10) L_align^IPW  = (1/|D|) Σ_D [o / ô + (1 − o) / (1 − ô)]
                          · [BCE(pCVR, sg(1 − pUnCVR)) + BCE(pUnCVR, sg(1 − pCVR))]

L_align is the Soft Alignment Module (SAM): the two towers give each other soft labels on every
impression, so unclicked rows get a CVR target that is not flatly 0. The CTunCVR label o·(1 − r)
is positive exactly on the "clicked but not converted" rows (factual negatives); unclicked rows
are its negatives. There is no standalone CTR loss: pCTR is supervised through the two products,
since o·r + o·(1 − r) = o. Serving: pCVR from the CVR tower, pCTCVR = ô · pCVR; pUnCVR only
provides soft labels. L_ctcvr is the declared :class:`~mtrank.losses.TaskLoss`; the other four
terms are the model's ``extra_loss`` (the trainer's generic hook, as for ESCM² and DCMT).

Readings of what the method note marks unverified [U] or leaves open (ours):

* whether the paper adds an explicit L_ctr is unverified: ``ctr_weight`` (default 0, i.e. none,
  as in the total the reimplementation reports) adds BCE(ô, o) as a declared task when > 0;
* the IPW terms (4), (9) are averaged over **all** impressions (1/|D|, the unbiased IPW estimate
  of the entire-space risk, as ESCM² and DCMT here); the reimplementation averages over clicked
  rows, which is larger by 1 / (batch CTR);
* the IPW weights are detached and clipped, 1/max(ô, c) and 1/max(1 − ô, c) with
  c = ``propensity_clip`` (default 0.01, the reimplementation's clip);
* the soft targets are detached (without it both towers can collapse to 0.5);
* ``align_weight`` (default 1, the paper's total) scales (10): the note reports that at small
  scale a weight of 0 did better in one reproduction, and that (10) can dominate at low CTR;
* the "shared bottom" is the shared embedding (the reimplementation adds a shared MLP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.data.batch import Batch
from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss, binary_cross_entropy
from mtrank.models.config import (
    FeatureSpec,
    ModelConfig,
    ModelOptions,
    parse_options,
    require_funnel,
)
from mtrank.models.escm2 import ipw_weights
from mtrank.models.layers import MLP, FeatureEmbedding, funnel_outputs

# Eq. 7: BCE(pCTR · pUnCVR, o · (1 − r)) in log space, as ESMM's CTCVR term (the label is formed
# from click and conversion in extra_loss: it is not a batch label).
CTUNCVR = TaskLoss(
    "ctuncvr", label="ctuncvr", outputs=("logit_ctr", "logit_uncvr"), kind="logit_product"
)


class ChorusCVR(nn.Module):
    """ChorusCVR (see the module docstring for the loss and the readings).

    Shapes: forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``, *extra)
    → dict of ``[B]`` tensors: ``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr``,
    ``p_ctcvr`` = pCTR · pCVR, ``logit_uncvr``, ``p_uncvr`` and ``p_ctuncvr`` = pCTR · pUnCVR.

    Raises:
        ConfigError: no click → conversion funnel; ``propensity_clip`` outside (0, 0.5); a
            negative weight.
    """

    entire_space = True  # every term but (4) and (9) covers all impressions

    class Options(ModelOptions):
        """``align_weight`` of the soft alignment (10) (default 1.0), ``propensity_clip`` c of
        the IPW weights 1/max(ô, c), 1/max(1 − ô, c) (0.01), ``ctr_weight`` of an optional
        BCE(pCTR, click) task (0.0: none)."""

        align_weight: float = 1.0
        propensity_clip: float = 0.01
        ctr_weight: float = 0.0

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        require_funnel(spec, "ChorusCVR")
        self.options = parse_options(self.Options, cfg)
        o = self.options
        if not 0.0 < o.propensity_clip < 0.5:
            raise ConfigError(
                f"chorus_cvr: propensity_clip must be in (0, 0.5), got {o.propensity_clip}"
            )
        if min(o.align_weight, o.ctr_weight) < 0:
            raise ConfigError("chorus_cvr: align_weight and ctr_weight must be ≥ 0")
        self.tasks = [
            TaskLoss(
                "ctcvr", label="ctcvr", outputs=("logit_ctr", "logit_cvr"), kind="logit_product"
            )
        ]
        if o.ctr_weight > 0:
            self.tasks.append(
                TaskLoss("ctr", label="click", outputs=("logit_ctr",), weight=o.ctr_weight)
            )
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        d = self.embedding.output_dim
        self.ctr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)
        self.cvr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)
        self.uncvr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)

    def head_outputs(self) -> dict[str, nn.Linear]:
        """The output layer of each tower (for :func:`~mtrank.models.layers.init_output_bias`;
        the unCVR tower starts at 1 − the CVR base rate: started at 0.5 instead, its soft label
        1 − pUnCVR pulls pCVR towards 0.5 on every impression in the first steps)."""
        return {
            "ctr": self.ctr_tower.output_layer,
            "cvr": self.cvr_tower.output_layer,
            "not_cvr": self.uncvr_tower.output_layer,
        }

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """ESMM's five outputs plus ``logit_uncvr``, ``p_uncvr``, ``p_ctuncvr`` ``[B]``."""
        x = self.embedding(categorical, numerical, *extra)
        out = funnel_outputs(self.ctr_tower(x).squeeze(-1), self.cvr_tower(x).squeeze(-1))
        out["logit_uncvr"] = self.uncvr_tower(x).squeeze(-1)
        out["p_uncvr"] = torch.sigmoid(out["logit_uncvr"])
        out["p_ctuncvr"] = out["p_ctr"] * out["p_uncvr"]
        return out

    def chorus_terms(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """The four terms of ``extra_loss`` as scalars averaged over all impressions (Σ w):
        ``ctuncvr`` (eq. 7), ``cvr_ipw`` (4), ``uncvr_ipw`` (9), ``align`` (10, unweighted)."""
        dtype = outputs["logit_cvr"].dtype  # labels in the logits' precision (float32 or more)
        click, conversion = (batch.labels[k].to(dtype) for k in ("click", "conversion"))
        clip = self.options.propensity_clip
        w_click = click * ipw_weights(outputs["p_ctr"], clip)  # o / ô, detached
        w_unclick = (1.0 - click) * ipw_weights(1.0 - outputs["p_ctr"], clip)  # (1−o)/(1−ô)
        bce = F.binary_cross_entropy_with_logits
        logit_cvr, logit_uncvr = outputs["logit_cvr"], outputs["logit_uncvr"]
        per_row = {
            "ctuncvr": binary_cross_entropy(CTUNCVR, outputs, click * (1.0 - conversion)),
            "cvr_ipw": w_click * bce(logit_cvr, conversion, reduction="none"),
            "uncvr_ipw": w_click * bce(logit_uncvr, 1.0 - conversion, reduction="none"),
            "align": (w_click + w_unclick)
            * (
                bce(logit_cvr, 1.0 - outputs["p_uncvr"].detach(), reduction="none")
                + bce(logit_uncvr, 1.0 - outputs["p_cvr"].detach(), reduction="none")
            ),
        }
        row_w = torch.ones_like(click) if batch.weight is None else batch.weight
        n = row_w.sum().clamp_min(1e-12)
        return {k: (row_w * v).sum() / n for k, v in per_row.items()}

    def extra_loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """L_ctuncvr + L_cvr^IPW + L_uncvr^IPW + align_weight · L_align^IPW, scalar (L_ctcvr
        and the optional L_ctr are the declared ``tasks``)."""
        t = self.chorus_terms(outputs, batch)
        return t["ctuncvr"] + t["cvr_ipw"] + t["uncvr_ipw"] + self.options.align_weight * t["align"]
