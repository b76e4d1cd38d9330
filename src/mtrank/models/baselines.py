"""The ESMM paper's competitors (Ma et al., SIGIR 2018, §3.1), besides BASE (``base.py``).

* **AMAN** — all-missing-as-negative (Pan et al. 2008): the CVR model is trained on clicked
  impressions plus unclicked impressions taken as negatives, each kept with probability
  ``negative_rate`` (option, default 0.1; the paper searched 10 %–100 %).
* **OVERSAMPLING** (Weiss 2004): the CVR model is trained on clicked impressions with every
  clicked-and-converted impression present ``oversample_rate`` times (option ``k``, default 5; the
  paper searched 2–10) against the sparsity of positives.
* **UNBIAS** (Zhang et al. 2016, as used by the ESMM paper): rejection sampling of the clicked
  impressions with pCTR, to fit the entire-space distribution: clicked row i is kept with
  probability ``min(1, q / pCTR_i)`` where q is the ``unbias_quantile`` (option, default 0.05)
  quantile of pCTR over clicked rows; rows clicked although unlikely to be are kept, the
  others thinned, so the kept rows follow the impression distribution more closely. pCTR comes
  from a separately trained CTR model, given to :meth:`ResampledCVR.prepare_split` as the
  side column ``propensity_ctr`` (``mtrank benchmark`` supplies its shared CTR model's).
* **DIVISION**: separately trained CTR and CTCVR models; pCVR = pCTCVR / pCTR clipped to [0, 1].

The three sampling baselines are BASE (independent CTR and CVR networks) whose *training split*
is resampled once, vectorised and seeded, by :meth:`ResampledCVR.prepare_split`, a generic hook
the workflow calls for any model that defines it. The returned table stacks the CTR rows (the
original split) and the CVR rows (the resample) and flags them with the label masks
``ctr_space`` and ``cvr_space``; each network's loss covers its own rows only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mtrank.data.batch import EncodedData, cat_padded
from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss
from mtrank.models.aitm import derived_cvr
from mtrank.models.base import Base, SingleTaskNet
from mtrank.models.config import (
    FeatureSpec,
    ModelConfig,
    ModelOptions,
    parse_options,
    require_funnel,
)

PROPENSITY_COLUMN = "propensity_ctr"


# --- vectorised resampling (pure functions, so tests can count) -------------------------------


def aman_indices(
    click: torch.Tensor, negative_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Rows of the AMAN CVR training set: every clicked row, and each unclicked row with
    probability ``negative_rate``. ``click`` ``[N]`` 0/1 → sorted int64 indices.

    Raises: ConfigError for a rate outside (0, 1].
    """
    if not 0.0 < negative_rate <= 1.0:
        raise ConfigError(f"aman: negative_rate must be in (0, 1], got {negative_rate}")
    keep = (click > 0) | (torch.rand(click.shape, generator=generator) < negative_rate)
    return keep.nonzero().squeeze(1)


def oversampling_indices(click: torch.Tensor, conversion: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the OVERSAMPLING CVR training set: clicked rows, clicked-converted rows ``k`` times
    each. ``click``, ``conversion`` ``[N]`` → int64 indices of length n_click + (k − 1) · n_conv.

    Raises: ConfigError for k < 1.
    """
    if int(k) != k or k < 1:
        raise ConfigError(f"oversampling: oversample_rate must be an integer ≥ 1, got {k}")
    clicked = (click > 0).nonzero().squeeze(1)
    positives = ((click > 0) & (conversion > 0)).nonzero().squeeze(1)
    return torch.cat([clicked, positives.repeat(int(k) - 1)])


def unbias_indices(
    click: torch.Tensor, p_ctr: torch.Tensor, quantile: float, generator: torch.Generator
) -> torch.Tensor:
    """Rows of the UNBIAS CVR training set: clicked row i kept with probability
    min(1, q / pCTR_i), q = the ``quantile`` of pCTR over clicked rows. ``[N]`` → sorted indices.

    Raises: ConfigError for a quantile outside (0, 1] or pCTR outside [0, 1].
    """
    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"unbias: unbias_quantile must be in (0, 1], got {quantile}")
    if p_ctr.shape != click.shape or bool(((p_ctr < 0) | (p_ctr > 1) | p_ctr.isnan()).any()):
        raise ConfigError("unbias: propensities must be pCTR values in [0, 1], one per row")
    clicked = click > 0
    if not bool(clicked.any()):
        return clicked.nonzero().squeeze(1)
    q = torch.quantile(p_ctr[clicked].double(), quantile).float()
    accept = (q / p_ctr.clamp_min(1e-12)).clamp(max=1.0)
    keep = clicked & (torch.rand(click.shape, generator=generator) < accept)
    return keep.nonzero().squeeze(1)


def take_rows(
    data: EncodedData, index: torch.Tensor, extra_labels: dict[str, float]
) -> EncodedData:
    """Rows ``index`` of ``data`` (a copy) with constant label columns ``extra_labels`` added."""
    idx_np = index.numpy()
    labels = {k: v.index_select(0, index) for k, v in data.labels.items()}
    for k, value in extra_labels.items():
        labels[k] = torch.full((index.numel(),), float(value))
    return EncodedData(
        categorical=data.categorical.index_select(0, index),
        numerical=data.numerical.index_select(0, index),
        labels=labels,
        weight=None if data.weight is None else data.weight.index_select(0, index),
        position=None if data.position is None else data.position.index_select(0, index),
        side={k: v[idx_np] for k, v in data.side.items()},
        extra=[t.index_select(0, index) for t in data.extra],
    )


def stack(parts: list[EncodedData]) -> EncodedData:
    """Concatenate encoded tables row-wise (same columns)."""
    return EncodedData(
        categorical=torch.cat([p.categorical for p in parts]),
        numerical=torch.cat([p.numerical for p in parts]),
        labels={k: torch.cat([p.labels[k] for p in parts]) for k in parts[0].labels},
        weight=None if parts[0].weight is None else torch.cat([p.weight for p in parts]),
        position=None if parts[0].position is None else torch.cat([p.position for p in parts]),
        side={},
        extra=[cat_padded([p.extra[i] for p in parts]) for i in range(len(parts[0].extra))],
    )


class ResampledCVR(Base):
    """BASE whose CVR network is trained on a resampled CVR training set (see module docstring).

    Shapes: as :class:`~mtrank.models.base.Base`.

    Raises:
        ConfigError: no funnel, bad option, or (UNBIAS) no ``propensity_ctr`` side column.
    """

    sampler: str = ""
    tasks = [
        TaskLoss("ctr", label="click", outputs=("logit_ctr",), mask="ctr_space"),
        TaskLoss(
            "cvr", label="conversion", outputs=("logit_cvr",), space="clicked", mask="cvr_space"
        ),
    ]

    def cvr_indices(self, data: EncodedData, generator: torch.Generator) -> torch.Tensor:
        """Row indices ``[M]`` of the CVR training resample (the sampler's rule)."""
        raise NotImplementedError

    def prepare_split(
        self, data: EncodedData, role: Literal["train", "val"], seed: int
    ) -> EncodedData:
        """The table the trainer sees. ``train``: the split (``ctr_space`` = 1, ``cvr_space`` = 0)
        stacked with the CVR resample (``ctr_space`` = 0, ``cvr_space`` = 1); ``val``: the split
        with ``ctr_space`` = 1 and ``cvr_space`` = click, i.e. BASE's ordinary spaces."""
        if role == "val":
            labels = dict(
                data.labels,
                ctr_space=torch.ones_like(data.labels["click"]),
                cvr_space=data.labels["click"].clone(),
            )
            return EncodedData(
                data.categorical,
                data.numerical,
                labels,
                data.weight,
                data.side,
                position=data.position,
                extra=data.extra,
            )
        everything = torch.arange(len(data))
        ctr_rows = take_rows(data, everything, {"ctr_space": 1.0, "cvr_space": 0.0})
        index = self.cvr_indices(data, torch.Generator().manual_seed(seed))
        cvr_rows = take_rows(data, index, {"ctr_space": 0.0, "cvr_space": 1.0})
        return stack([ctr_rows, cvr_rows])


class AMAN(ResampledCVR):
    """AMAN: unclicked rows as CVR negatives at ``negative_rate`` (default 0.1)."""

    sampler = "aman"

    class Options(ModelOptions):
        """``negative_rate``: share of unclicked rows kept as CVR negatives."""

        negative_rate: float = 0.1

    def cvr_indices(self, data, generator):
        """All clicked rows plus unclicked rows at ``negative_rate`` as CVR negatives."""
        return aman_indices(data.labels["click"], self.options.negative_rate, generator)


class Oversampling(ResampledCVR):
    """OVERSAMPLING: clicked-converted rows ``oversample_rate`` times (default 5)."""

    sampler = "oversampling"

    class Options(ModelOptions):
        """``oversample_rate``: copies of each clicked-converted row (integer ≥ 1)."""

        oversample_rate: int = 5

    def cvr_indices(self, data, generator):
        """Clicked rows, clicked-converted ones ``oversample_rate`` times."""
        return oversampling_indices(
            data.labels["click"], data.labels["conversion"], self.options.oversample_rate
        )


class Unbias(ResampledCVR):
    """UNBIAS: rejection sampling of clicked rows with pCTR (side column ``propensity_ctr``)."""

    sampler = "unbias"

    class Options(ModelOptions):
        """``unbias_quantile``: pCTR quantile that bounds the rejection sampling's weights."""

        unbias_quantile: float = 0.05

    def cvr_indices(self, data, generator):
        """Clicked rows kept by rejection sampling on the shared pCTR (side column
        ``propensity_ctr``)."""
        if PROPENSITY_COLUMN not in data.side:
            raise ConfigError(
                "unbias needs pCTR propensities of the training rows (side column "
                f"{PROPENSITY_COLUMN!r}) from a separately trained CTR model; `mtrank benchmark` "
                "provides them"
            )
        p = torch.as_tensor(data.side[PROPENSITY_COLUMN], dtype=torch.float32)
        return unbias_indices(data.labels["click"], p, self.options.unbias_quantile, generator)


class Division(nn.Module):
    """DIVISION: independent CTR and CTCVR networks (each embedding + MLP), both over all
    impressions; pCVR = clip(pCTCVR / pCTR, 0, 1) (ESMM paper §3.1).

    Shapes: forward → dict of ``[B]``: ``logit_ctr, logit_ctcvr, logit_cvr, p_ctr, p_ctcvr, p_cvr``;
    ``p_ctcvr`` is the CTCVR network's own (it can exceed ``p_ctr``: nothing ties them).

    Raises:
        ConfigError: no funnel.
    """

    tasks = [
        TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
        TaskLoss("ctcvr", label="ctcvr", outputs=("logit_ctcvr",)),
    ]
    entire_space = False  # pCVR = pCTCVR / pCTR, not a CVR network trained over all rows
    Options = ModelOptions  # no options

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        require_funnel(spec, "DIVISION")
        self.options = parse_options(self.Options, cfg)
        self.ctr_model = SingleTaskNet(spec, cfg)
        self.ctcvr_model = SingleTaskNet(spec, cfg)

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``logit_ctr``, ``logit_cvr``, ``logit_ctcvr``, ``p_*`` ``[B]``; pCVR = pCTCVR / pCTR,
        clipped."""
        logit_ctr = self.ctr_model(categorical, numerical, *extra)
        logit_ctcvr = self.ctcvr_model(categorical, numerical, *extra)
        p_ctr, p_ctcvr = torch.sigmoid(logit_ctr), torch.sigmoid(logit_ctcvr)
        p_cvr, logit_cvr = derived_cvr(p_ctr, p_ctcvr)
        return {
            "logit_ctr": logit_ctr,
            "logit_cvr": logit_cvr,
            "logit_ctcvr": logit_ctcvr,
            "p_ctr": p_ctr,
            "p_cvr": p_cvr,
            "p_ctcvr": p_ctcvr,
        }
