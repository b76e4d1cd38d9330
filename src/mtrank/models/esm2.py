"""ESM²: Entire Space Multi-task Model via post-click behaviour decomposition (Wen et al.,
SIGIR 2020, arXiv 1910.07099).

The behaviour graph is impression → click → {D-Action, O-Action} → buy (§3.1): a D-Action is a
purchase-related action after the click (add to cart, add to wish list/favourite), an O-Action
any other post-click behaviour (clicked and no D-Action). The model has three modules (§3.2):

* **SEM**, shared embeddings (one :class:`~mtrank.models.layers.FeatureEmbedding`);
* **DPM**, four towers over it, all scored on every impression:
  y₁ = P(click | x), y₂ = P(D | click, x), y₃ = P(buy | D, x), y₄ = P(buy | O, x);
* **SCM**, the sequential composition:

      pCTR = y₁,   pCTAVR = y₁·y₂,
      pCVR = y₂·y₃ + (1 − y₂)·y₄,   pCTCVR = y₁·pCVR.

Losses, all over the entire impression space D (§3.3, eq. 9–12), with labels o (click), a (the
D-Action, ≤ o) and r (the buy, ≤ o):

    L = w_ctr·BCE(y₁, o) + w_ctavr·BCE(y₁y₂, o·a) + w_ctcvr·BCE(y₁·pCVR, o·r).

y₃ and y₄ get no loss of their own: they are learnt through the mixture inside the CTCVR term,
as ESMM learns pCVR through pCTCVR. [U] The weights w are 1 by default: the equations' structure
is the paper's, the weight values are our reading (methods note ``post-click-cvr-models.md``,
§3, tagged [U]); the paper's embedding and MLP sizes and optimiser were not checked either [U].

Numerics: the products are never formed in probability space. pCVR is carried as its exact
logit, ``logit_<buy>`` = log pCVR − log(1 − pCVR) with

    log pCVR       = logaddexp(logσ(a₂) + logσ(a₃), logσ(−a₂) + logσ(a₄))
    log (1 − pCVR) = logaddexp(logσ(a₂) + logσ(−a₃), logσ(−a₂) + logσ(−a₄))

(aₖ the towers' logits; 1 − pCVR = y₂(1 − y₃) + (1 − y₂)(1 − y₄)), so σ(logit_<buy>) = pCVR and
the CTAVR and CTCVR terms are the generic two-logit product losses of :mod:`mtrank.losses`
(``kind="logit_product"``), exact in log space: no clamping of y₁y₂y₃ is needed. (A public
TF "ESM2" multiplies logits before the sigmoid; that is not the paper's SCM.)

Data: a three-stage funnel declared in the schema (:mod:`mtrank.data.funnel`) in ESM²'s
branch form, the third stage after the first:

    funnel:
      - {stage: click, label: is_click}
      - {stage: cart,  label: is_cart}               # the D-Action, after click
      - {stage: buy,   label: is_buy, after: click}  # with or without a cart

Outputs are named by the stages (here ``click``, ``cart``, ``buy``): ``p_click``,
``p_cart`` = y₂, ``p_buy`` = pCVR (conditional on its ``after`` stage, the click), and the
entire-space products ``p_click_all`` = y₁, ``p_cart_all`` = y₁y₂, ``p_buy_all`` = pCTCVR; the
two-stage aliases ``p_ctr``, ``p_cvr`` = pCVR, ``p_ctcvr``; and the decomposition's heads
``p_buy_cart`` = y₃ and ``p_buy_nocart`` = y₄ (only partly identified: read pCVR, not them, as
calibrated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss
from mtrank.models.config import FeatureSpec, ModelConfig, ModelOptions, parse_options
from mtrank.models.layers import MLP, FeatureEmbedding


def mixture_logit(a2: torch.Tensor, a3: torch.Tensor, a4: torch.Tensor) -> torch.Tensor:
    """The exact logit of pCVR = σ(a₂)σ(a₃) + σ(−a₂)σ(a₄) (ESM² SCM), in log space.

    Args:
        a2, a3, a4: ``[B]`` logits of y₂ = P(D | click), y₃ = P(buy | D), y₄ = P(buy | O).

    Returns:
        ``[B]`` log pCVR − log(1 − pCVR), finite for finite inputs.
    """
    ls = F.logsigmoid
    # logsumexp over a stacked pair = logaddexp, which ONNX (opset 18) has no operator for
    log_p = torch.logsumexp(torch.stack([ls(a2) + ls(a3), ls(-a2) + ls(a4)]), dim=0)
    log_1mp = torch.logsumexp(torch.stack([ls(a2) + ls(-a3), ls(-a2) + ls(-a4)]), dim=0)
    return log_p - log_1mp


def esm2_stages(spec: FeatureSpec) -> tuple[str, str, str]:
    """The (click, D-Action, buy) stage names of a schema's funnel.

    Raises:
        ConfigError: the funnel is not three stages with the third after the first (ESM²'s
            post-click branch: buy reachable with or without the D-Action).
    """
    stages, parents = list(spec.stages), list(spec.parents)
    if len(stages) != 3 or parents != [-1, 0, 0]:
        got = (
            "the two-stage click/conversion funnel"
            if not stages
            else " → ".join(
                f"{s} (after {stages[p] if p >= 0 else 'impression'})"
                for s, p in zip(stages, parents)
            )
        )
        raise ConfigError(
            "esm2 needs a three-stage funnel click → {D-Action, buy}: stages [click, cart, buy] "
            f"with `after: <first stage>` on the third (a buy with or without a cart); got {got}"
        )
    return stages[0], stages[1], stages[2]


class ESM2(nn.Module):
    """ESM² (Wen et al. 2020): shared embedding, four towers (CTR, D-Action given click, buy
    given D-Action, buy given O-Action), composed and trained over the entire space.

    Args (``cfg.options``): ``w_ctr``, ``w_ctavr``, ``w_ctcvr`` (≥ 0, default 1 each: the loss
    weights of eq. 12; [U] the paper's values were not checked).

    Shapes: forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``,
    ``*extra`` passed to the embedding) → dict of ``[B]`` tensors (stage names s₁, s₂, s₃ from
    the schema, e.g. click, cart, buy): ``logit_<s>``, ``p_<s>``, ``p_<s>_all`` for each stage,
    ``p_<s₃>_<s₂>`` = y₃, ``p_<s₃>_no<s₂>`` = y₄, and ``logit_ctr``, ``logit_cvr``, ``p_ctr``,
    ``p_cvr``, ``p_ctcvr``. ``logit_<s₃>`` is the exact logit of pCVR (:func:`mixture_logit`).

    Raises:
        ConfigError: the funnel is not ESM²'s three-stage branch (:func:`esm2_stages`), or a
            negative loss weight.
    """

    entire_space = True  # every term is over all impressions
    stages_required = 3  # ESM²'s click → {D-Action, buy} (mtrank.models.THREE_STAGE_MODELS)

    class Options(ModelOptions):
        """Loss weights of ESM² eq. 12 (CTR, CTAVR, CTCVR); 1 each ([U])."""

        w_ctr: float = 1.0
        w_ctavr: float = 1.0
        w_ctcvr: float = 1.0

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.options = parse_options(self.Options, cfg)
        for key, value in self.options.model_dump().items():
            if value < 0:
                raise ConfigError(f"esm2: {key} must be ≥ 0, got {value}")
        self.stages = esm2_stages(spec)
        click, act, buy = self.stages
        o = self.options
        # entire-space labels `<stage>_all` (click, click ∧ D-Action, click ∧ buy), eq. 9–11;
        # the CTAVR and CTCVR terms are products with pCTR (logit_<buy> is pCVR's exact logit)
        self.tasks = [
            TaskLoss(click, label=f"{click}_all", outputs=(f"logit_{click}",), weight=o.w_ctr)
        ] + [
            TaskLoss(
                f"{s}_all",
                label=f"{s}_all",
                outputs=(f"logit_{click}", f"logit_{s}"),
                kind="logit_product",
                weight=w,
            )
            for s, w in ((act, o.w_ctavr), (buy, o.w_ctcvr))
        ]
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        d = self.embedding.output_dim
        self.towers = nn.ModuleDict(
            {
                name: MLP(d, cfg.tower, out=1, dropout=cfg.dropout)
                for name in ("ctr", "act", "buy_act", "buy_other")
            }
        )

    def head_outputs(self) -> dict[str, nn.Linear | tuple[nn.Linear, ...]]:
        """The output layers by stage name (for :func:`~mtrank.models.layers.init_output_bias`):
        the click and D-Action towers at their stages' rates, and both buy towers (y₃, y₄) at
        the buy's rate given click, so that pCVR starts at that rate."""
        click, act, buy = self.stages
        return {
            click: self.towers["ctr"].output_layer,
            act: self.towers["act"].output_layer,
            buy: (self.towers["buy_act"].output_layer, self.towers["buy_other"].output_layer),
        }

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named outputs ``[B]`` (class docstring) from ids ``[B, n_cat]`` and numbers
        ``[B, n_num]`` (ESM² §3.2, SCM)."""
        x = self.embedding(categorical, numerical, *extra)
        a1, a2, a3, a4 = (self.towers[k](x).squeeze(-1) for k in self.towers)
        click, act, buy = self.stages
        logit_cvr = mixture_logit(a2, a3, a4)
        y1, y2, p_cvr = torch.sigmoid(a1), torch.sigmoid(a2), torch.sigmoid(logit_cvr)
        p_ctcvr = y1 * p_cvr
        return {
            f"logit_{click}": a1,
            f"logit_{act}": a2,
            f"logit_{buy}": logit_cvr,
            f"p_{click}": y1,
            f"p_{click}_all": y1,
            f"p_{act}": y2,
            f"p_{act}_all": y1 * y2,
            f"p_{buy}": p_cvr,
            f"p_{buy}_all": p_ctcvr,
            f"p_{buy}_{act}": torch.sigmoid(a3),
            f"p_{buy}_no{act}": torch.sigmoid(a4),
            "logit_ctr": a1,
            "logit_cvr": logit_cvr,
            "p_ctr": y1,
            "p_cvr": p_cvr,
            "p_ctcvr": p_ctcvr,
        }
