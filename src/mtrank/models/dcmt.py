"""DCMT: Direct entire-space Causal Multi-Task framework (Zhu et al., ICDE 2023, arXiv 2302.06141).

A CTR tower and two CVR towers over one shared embedding, all scored on every impression D:

* ô = pCTR = σ(CTR tower), the propensity;
* r̂ = pCVR = σ(l_f^w + l_f^d), the **factual** CVR tower: a wide (linear) part plus a deep (MLP)
  part (the paper's twin CVR towers, as the authors' write-up gives them: r̂ = σ(l_f^w + l_f^d);
  the section and equation numbers of the paper could not be checked [U]);
* r̂* = σ(l_cf^w + l_cf^d), the **counterfactual** CVR tower, the CVR "in the unclicked space",
  with the prior r̂ + r̂* ≈ 1.

With o = click, r = conversion (r = 0 where o = 0), BCE(p, y) = −[y log p + (1−y) log(1−p)] and
w the row weights (1 without a weight column; Σ w = |D|), the loss is

    E^CTR   = (1/|D|) Σ_D BCE(ô, o)
    E^DCMT  = (1/|D|) Σ_D [ (o / ô) · BCE(r̂, r) + ((1−o) / (1−ô)) · BCE(r̂*, 1−r) ]
              + λ₁ · (1/|D|) Σ_D |1 − (r̂ + r̂*)|                       (counterfactual prior)
    E^CTCVR = (1/|D|) Σ_D BCE(ô · r̂, o · r)
    L = E^CTR + w_cvr · E^DCMT + w_ctcvr · E^CTCVR      (+ λ₂‖θ‖² through the optimiser, if any)

E^CTR and E^CTCVR are declared :class:`~mtrank.losses.TaskLoss` terms (E^CTCVR in log space,
ESMM's loss); w_cvr · E^DCMT is the model's ``extra_loss`` (the trainer's generic hook, as for
ESCM²). Serving: pCVR = r̂ (factual tower), pCTCVR = ô · r̂; r̂* is a training aid only.

Readings of what the method note marks unverified [U] or leaves open (ours):

* weights: w_cvr = 1 and w_ctcvr = 1 (one public reimplementation; the other uses w_cvr = 0.5),
  λ₁ = 1e-3 with the L1 prior (both reimplementations); the paper's own values are unchecked;
* the IPW weights are **detached** (both reimplementations) and clipped: 1/max(ô, c) and
  1/max(1 − ô, c) with c = ``propensity_clip`` (default 0.01, so every weight ≤ 100) — an
  engineering choice, not the paper's;
* normalisation by |D| (Σ w, the whole batch), not by the clicked rows, as the paper-style form;
* the wide part is a linear map without bias of the shared embedding's output (the deep tower
  carries the bias); both CVR towers read the same embedding;
* λ₁ sits inside E^DCMT, so the prior is weighted by w_cvr · λ₁ in the total;
* λ₂‖θ‖² is not part of the model's loss (it is the optimiser's weight decay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from mtrank.models.escm2 import ipw_weights
from mtrank.models.layers import MLP, FeatureEmbedding, funnel_outputs


class WideDeepTower(nn.Module):
    """One logit = wide (linear, no bias) + deep (MLP) part over the same input (DCMT's CVR towers).

    Shapes: ``[B, in_dim]`` → ``[B]``.
    """

    def __init__(self, in_dim: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        self.wide = nn.Linear(in_dim, 1, bias=False)
        self.deep = MLP(in_dim, hidden, out=1, dropout=dropout)

    @property
    def output_layer(self) -> nn.Linear:
        """The deep part's output layer (its bias is the tower's bias)."""
        return self.deep.output_layer  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logit l^w + l^d ``[B]`` from ``[B, in_dim]``."""
        return (self.wide(x) + self.deep(x)).squeeze(-1)


class DCMT(nn.Module):
    """DCMT (see the module docstring for the loss and the readings).

    Shapes: forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``, *extra)
    → dict of ``[B]`` tensors: ``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr`` (factual r̂),
    ``p_ctcvr`` = ô · r̂, ``logit_cvr_cf`` and ``p_cvr_cf`` (counterfactual r̂*).

    Raises:
        ConfigError: no click → conversion funnel; ``propensity_clip`` outside (0, 0.5); a
            negative weight.
    """

    entire_space = True  # the CVR towers are trained on all impressions (IPW + prior + CTCVR)

    class Options(ModelOptions):
        """``cvr_weight`` w_cvr (default 1.0), ``ctcvr_weight`` w_ctcvr (1.0), ``prior_weight``
        λ₁ of the L1 counterfactual prior (1e-3), ``propensity_clip`` c: the IPW weights are
        1/max(ô, c) and 1/max(1 − ô, c) (0.01)."""

        cvr_weight: float = 1.0
        ctcvr_weight: float = 1.0
        prior_weight: float = 1e-3
        propensity_clip: float = 0.01

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        require_funnel(spec, "DCMT")
        self.options = parse_options(self.Options, cfg)
        o = self.options
        if not 0.0 < o.propensity_clip < 0.5:
            raise ConfigError(f"dcmt: propensity_clip must be in (0, 0.5), got {o.propensity_clip}")
        if min(o.cvr_weight, o.ctcvr_weight, o.prior_weight) < 0:
            raise ConfigError("dcmt: cvr_weight, ctcvr_weight and prior_weight must be ≥ 0")
        self.tasks = [
            TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
            TaskLoss(
                "ctcvr",
                label="ctcvr",
                outputs=("logit_ctr", "logit_cvr"),
                kind="logit_product",
                weight=o.ctcvr_weight,
            ),
        ]
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        d = self.embedding.output_dim
        self.ctr_tower = MLP(d, cfg.tower, out=1, dropout=cfg.dropout)
        self.cvr_tower = WideDeepTower(d, cfg.tower, cfg.dropout)
        self.cvr_cf_tower = WideDeepTower(d, cfg.tower, cfg.dropout)

    def head_outputs(self) -> dict[str, nn.Linear]:
        """The output layer of each tower (for :func:`~mtrank.models.layers.init_output_bias`;
        the counterfactual tower starts at 1 − the CVR base rate, as the prior r̂ + r̂* ≈ 1
        asks)."""
        return {
            "ctr": self.ctr_tower.output_layer,
            "cvr": self.cvr_tower.output_layer,
            "not_cvr": self.cvr_cf_tower.output_layer,
        }

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """ESMM's five outputs (pCVR = factual r̂) plus ``logit_cvr_cf``, ``p_cvr_cf`` ``[B]``."""
        x = self.embedding(categorical, numerical, *extra)
        out = funnel_outputs(self.ctr_tower(x).squeeze(-1), self.cvr_tower(x))
        out["logit_cvr_cf"] = self.cvr_cf_tower(x)
        out["p_cvr_cf"] = torch.sigmoid(out["logit_cvr_cf"])
        return out

    def dcmt_risk(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """E^DCMT (module docstring), a scalar: the IPW factual and counterfactual risks plus
        λ₁ × the L1 counterfactual prior, each averaged over all impressions (Σ w)."""
        dtype = outputs["logit_cvr"].dtype  # labels in the logits' precision (float32 or more)
        click, conversion = (batch.labels[k].to(dtype) for k in ("click", "conversion"))
        clip = self.options.propensity_clip
        w_click = ipw_weights(outputs["p_ctr"], clip)  # 1 / ô, detached
        w_unclick = ipw_weights(1.0 - outputs["p_ctr"], clip)  # 1 / (1 − ô), detached
        factual = F.binary_cross_entropy_with_logits(
            outputs["logit_cvr"], conversion, reduction="none"
        )
        counterfactual = F.binary_cross_entropy_with_logits(
            outputs["logit_cvr_cf"], 1.0 - conversion, reduction="none"
        )
        prior = (1.0 - (outputs["p_cvr"] + outputs["p_cvr_cf"])).abs()
        per_row = (
            click * w_click * factual
            + (1.0 - click) * w_unclick * counterfactual
            + self.options.prior_weight * prior
        )
        row_w = torch.ones_like(click) if batch.weight is None else batch.weight
        return (row_w * per_row).sum() / row_w.sum().clamp_min(1e-12)

    def extra_loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """w_cvr · E^DCMT, scalar (E^CTR and w_ctcvr · E^CTCVR are the declared ``tasks``)."""
        return self.options.cvr_weight * self.dcmt_risk(outputs, batch)
