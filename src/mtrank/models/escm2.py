"""ESCM²: Entire Space Counterfactual Multi-task Model (Wang et al., SIGIR 2022, §4).

ESMM's loss (CTR + CTCVR over all impressions) plus a counterfactual CVR risk that makes the
CVR tower an unbiased estimator over the entire space, added through the trainer's generic
``extra_loss`` hook. With o = click, e = BCE(pCVR, conversion) per impression, N the batch's
impressions and the propensity p̂ = clip(pCTR, ``propensity_clip``, 1):

* **IPW** (§4.2, eq. 9): R = (1/N) Σ o · e / p̂.
* **DR** (§4.3, eq. 11–12): an imputation tower predicts ê ≈ e; R = (1/N) Σ [ê + o (e − ê) / p̂],
  and the imputation tower is trained with (1/N) Σ o (e − ê)² / p̂.

Choices (ours; the paper leaves them to the implementation):

* the propensity is **detached** (a stop-gradient): the CVR risk never pushes pCTR upwards just
  to shrink its own weights; pCTR is trained by the CTR and CTCVR losses only;
* the propensity is clipped below at ``propensity_clip`` = 0.01 by default, so a weight is at most
  100 and finite even for pCTR → 0;
* in DR, ê is detached in the CVR risk and e is detached in the imputation loss (the usual
  alternating "joint learning" split of DR estimators).

Options: ``risk_weight`` λ_c (default 1.0), ``propensity_clip`` (default 0.01),
``imputation_weight`` (DR only, default 1.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtrank.data.batch import Batch
from mtrank.errors import ConfigError
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.models.esmm import ESMM
from mtrank.models.layers import MLP


def ipw_weights(p_ctr: torch.Tensor, clip: float) -> torch.Tensor:
    """1 / clip(pCTR, clip, 1), detached, ``[B]``; finite for any pCTR in [0, 1] when clip > 0."""
    return 1.0 / p_ctr.detach().clamp(min=clip, max=1.0)


class ESCM2(ESMM):
    """ESMM + counterfactual CVR risk (``variant`` = ``ipw`` or ``dr``; see the module docstring).

    Shapes: as :class:`~mtrank.models.esmm.ESMM`; the DR variant adds ``cvr_error_imputed`` ``[B]``.

    Raises:
        ConfigError: no funnel, an unknown variant, or ``propensity_clip`` outside (0, 1].
    """

    variant = "ipw"

    class Options(ESMM.Options):
        """ESMM's options plus the counterfactual risk's weight, the pCTR clip of the inverse
        propensity and (DR) the imputation loss weight."""

        risk_weight: float = 1.0
        propensity_clip: float = 0.01
        imputation_weight: float = 1.0

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__(spec, cfg)
        if self.variant not in ("ipw", "dr"):
            raise ConfigError(f"escm2: unknown variant {self.variant!r}; choose ipw or dr")
        self.risk_weight = self.options.risk_weight
        self.propensity_clip = self.options.propensity_clip
        self.imputation_weight = self.options.imputation_weight
        if not 0.0 < self.propensity_clip <= 1.0:
            raise ConfigError(
                f"escm2: propensity_clip must be in (0, 1], got {self.propensity_clip}"
            )
        if self.risk_weight < 0 or self.imputation_weight < 0:
            raise ConfigError("escm2: risk_weight and imputation_weight must be ≥ 0")
        self.imputation_tower = (
            MLP(self.embedding.output_dim, cfg.tower, out=1, dropout=cfg.dropout)
            if self.variant == "dr"
            else None
        )

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """ESMM's outputs ``[B]``, plus ``cvr_error_imputed`` ``[B]`` for the DR variant."""
        out = super().forward(categorical, numerical, *extra)
        if self.imputation_tower is not None:
            x = self.embedding(categorical, numerical, *extra)
            out["cvr_error_imputed"] = F.softplus(self.imputation_tower(x).squeeze(-1))  # e ≥ 0
        return out

    def counterfactual_risk(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CVR risk R, DR imputation loss or None), both scalars averaged over all B
        impressions."""
        click, conversion = batch.labels["click"], batch.labels["conversion"]
        err = F.binary_cross_entropy_with_logits(outputs["logit_cvr"], conversion, reduction="none")
        w = ipw_weights(outputs["p_ctr"], self.propensity_clip)
        row_w = torch.ones_like(click) if batch.weight is None else batch.weight
        if self.variant == "ipw":
            return (row_w * click * err * w).sum() / row_w.sum().clamp_min(1e-12), None
        e_hat = outputs["cvr_error_imputed"]
        risk = row_w * (e_hat.detach() + click * (err - e_hat.detach()) * w)
        imputation = row_w * click * (err.detach() - e_hat) ** 2 * w
        n = row_w.sum().clamp_min(1e-12)
        return risk.sum() / n, imputation.sum() / n

    def extra_loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """λ_c · R (+ imputation_weight · imputation loss for DR), scalar."""
        risk, imputation = self.counterfactual_risk(outputs, batch)
        total = self.risk_weight * risk
        if imputation is not None:
            total = total + self.imputation_weight * imputation
        return total


class ESCM2IPW(ESCM2):
    """ESCM² with the inverse-propensity-weighted CVR risk (``escm2_ipw``)."""

    variant = "ipw"


class ESCM2DR(ESCM2):
    """ESCM² with the doubly robust CVR risk and an imputation tower (``escm2_dr``)."""

    variant = "dr"
