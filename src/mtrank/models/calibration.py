"""Calibration for sampled negatives: a wrapper that corrects a funnel model's pCTR (and pCTCVR)
for unclicked impressions kept at rate r in its training data.

Trained on rows where every click is kept and each unclicked impression with probability r, a
model learns q = P_s(click | x) = p / (p + r·(1 − p)) instead of the true p. Inverting it is the
re-calibration of He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook"
(ADKDD 2014, §6.3, negative down-sampling):

    p = q·r / (q·r + 1 − q)        i.e.   logit p = logit q + log r

Clicks (and so conversions) are all kept, so pCVR = P(conv | click, x) is unbiased as it is, and
pCTCVR = P(click ∧ conv | x) is off by the same factor as pCTR: p'CTCVR = pCTCVR · p / q,
which for a product model (ESMM) is exactly p'CTR · pCVR. :func:`shift_ctr_logit` applies such a
CTR-logit shift to a model's named outputs; the position tower (:mod:`mtrank.models.position`)
uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.data.schema import check_sampling_rate


def _shift_log_prob(logit: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """The logit of σ(``logit``) · exp(``log_ratio``) (a probability scaled by a ratio ≤ 1/σ)."""
    log_p = (F.logsigmoid(logit) + log_ratio).clamp(max=-1e-7)
    return log_p - torch.log(-torch.expm1(log_p))


def shift_ctr_logit(
    out: dict[str, torch.Tensor], shift: torch.Tensor | float, stages: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """A funnel model's outputs with ``shift`` (``[B]`` or a scalar) added to the CTR logit.

    ``logit_ctr`` and ``p_ctr`` move; ``p_ctcvr`` is multiplied by p'CTR / pCTR =
    exp(logsigmoid(a + shift) − logsigmoid(a)) (pCTCVR = pCTR · P(conv | click, x), and the
    latter does not depend on what moved the click); ``logit_ctcvr`` (models with their own
    CTCVR head: AITM, the CTCVR baselines) follows ``p_ctcvr``; ``p_cvr`` and every other
    conditional output are unchanged.

    On a staged funnel (``stages``, the model's stage names, first = the click stage; see
    :mod:`mtrank.data.funnel`) the first stage's ``logit_<s>``/``p_<s>`` move the same way and
    every entire-space ``p_<s>_all``/``logit_<s>_all`` is scaled by the same ratio (each is a
    product through the first stage). Outputs of plain multi-task models are returned as they
    are.
    """
    first = stages[0] if stages else "ctr"
    if f"logit_{first}" not in out:
        return out
    out = dict(out)
    if isinstance(shift, torch.Tensor):
        shift = shift.to(out[f"logit_{first}"].dtype)
    moved = out[f"logit_{first}"] + shift
    log_ratio = F.logsigmoid(moved) - F.logsigmoid(out[f"logit_{first}"])
    for name in {first, f"{first}_all", "ctr"}:  # the first stage itself
        if f"logit_{name}" in out:
            out[f"logit_{name}"] = moved
        if f"p_{name}" in out:
            out[f"p_{name}"] = torch.sigmoid(moved)
    for name in [f"{s}_all" for s in stages[1:]] + ["ctcvr"]:  # products through it
        if f"p_{name}" in out:
            out[f"p_{name}"] = out[f"p_{name}"] * torch.exp(log_ratio)
        if f"logit_{name}" in out:
            out[f"logit_{name}"] = _shift_log_prob(out[f"logit_{name}"], log_ratio)
    return out


class ModelWrapper(nn.Module):
    """Base of a module that wraps a model (``self.model``) and changes its outputs: attributes
    it does not have itself (``stages``, ``head_outputs``, ``tasks`` …) are the wrapped
    model's."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


class SampledNegativeCorrection(ModelWrapper):
    """A funnel model whose pCTR and pCTCVR are corrected for negatives kept at ``rate``.

    forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``, *extra) → the
    wrapped model's outputs ``[B]`` with ``logit_ctr`` shifted by log r (see the module
    docstring). The weights are the wrapped model's (:attr:`model`); a bundle stores those and
    the rate, and wraps again on load (:func:`with_sampling_correction`).

    Raises:
        SchemaError: ``rate`` outside (0, 1].
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        super().__init__()
        self.model = model
        self.rate = check_sampling_rate(rate, "negative sampling rate")
        self.log_rate = math.log(self.rate)

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The wrapped model's outputs ``[B]`` with the CTR logit shifted by log r."""
        return shift_ctr_logit(
            self.model(categorical, numerical, *extra),
            self.log_rate,
            getattr(self.model, "stages", ()),
        )


def with_sampling_correction(model: nn.Module, rate: float | None) -> nn.Module:
    """``model`` wrapped in :class:`SampledNegativeCorrection` when ``rate`` < 1, else as it is
    (a model already wrapped is re-wrapped around its inner model)."""
    model = without_sampling_correction(model)
    if rate is None or rate >= 1.0 or not isinstance(model, nn.Module):
        return model
    return SampledNegativeCorrection(model, rate)


def without_sampling_correction(model):
    """The model under a :class:`SampledNegativeCorrection` (itself otherwise)."""
    return model.model if isinstance(model, SampledNegativeCorrection) else model


__all__ = [
    "SampledNegativeCorrection",
    "ModelWrapper",
    "shift_ctr_logit",
    "with_sampling_correction",
    "without_sampling_correction",
]
