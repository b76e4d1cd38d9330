"""Position bias: a shallow position tower added to the CTR logit in training, dropped at
serving.

The logged position of an impression changes whether it is clicked, whatever the item; learnt
as an ordinary feature, the model then needs a position at serving, which the ranker does not
know yet. Instead (YouTube's shallow tower, Zhao et al., "Recommending What Video to Watch
Next: A Multitask Ranking System", RecSys 2019; PAL, Guo et al., "PAL: A Position-bias Aware
Learning Framework for CTR Prediction in Live Recommender Systems", RecSys 2019) a separate
tower sees only the position, and its output is added to the CTR logit during training:

    logit CTR(x, pos) = logit CTR(x) + b[pos] − b[ref]

``b`` is one learnt scalar per position (the shallowest tower; positions beyond the largest
seen in training share its value), and ``ref`` is the smallest training position, whose effect
is 0 by construction. PAL multiplies probabilities, p(click) = p(seen | pos) · p(click | x,
seen); the YouTube tower adds logits, as here. At serving the tower is dropped: the model
scores every candidate *as if shown at the reference position* (position-free), so the served
pCTR is the pCTR at the top of the list, and the served ranking does not depend on position.
pCTCVR moves with pCTR (:func:`mtrank.models.calibration.shift_ctr_logit`); pCVR does not.

:class:`PositionTower` wraps any model (model classes do not change); the learnt effect b[p] −
b[ref] per position is recorded in the bundle (:meth:`PositionTower.effects`).
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.calibration import ModelWrapper, shift_ctr_logit

MAX_POSITIONS = 1024  # positions above the largest one seen (or this) share its effect


class PositionTower(ModelWrapper):
    """Any funnel model plus a per-position logit added to its CTR logit (training only).

    Args:
        model: the wrapped model (``forward(categorical, numerical, *extra)``).
        reference: the position whose effect is 0 (the smallest in training), ≥ 0.
        largest: the largest position with its own effect (≥ ``reference``).

    forward(categorical, numerical, *extra, position=None): the model's outputs ``[B]``; with
    ``position`` (int64 ``[B]``) the CTR logit is shifted by the position's effect (positions
    are clamped to [reference, largest]); without it they are unchanged (position-free).

    Raises:
        ConfigError: ``reference`` < 0, ``largest`` < ``reference``, or more than
            :data:`MAX_POSITIONS` positions.
    """

    def __init__(self, model: nn.Module, reference: int, largest: int) -> None:
        super().__init__()
        if reference < 0 or largest < reference:
            raise ConfigError(f"position range [{reference}, {largest}] is not valid")
        largest = min(largest, reference + MAX_POSITIONS - 1)
        self.model = model
        self.reference = int(reference)
        self.largest = int(largest)
        self.bias = nn.Embedding(self.largest - self.reference + 1, 1)
        nn.init.zeros_(self.bias.weight)

    def position_logit(self, position: torch.Tensor) -> torch.Tensor:
        """b[pos] − b[ref], float ``[B]``, for int64 positions ``[B]``."""
        idx = position.clamp(self.reference, self.largest) - self.reference
        return (self.bias(idx) - self.bias.weight[0]).squeeze(-1)

    def forward(
        self,
        categorical: torch.Tensor,
        numerical: torch.Tensor,
        *extra: torch.Tensor,
        position: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The wrapped model's outputs ``[B]``, the CTR logit shifted by the position's effect
        when ``position`` (int64 ``[B]``) is given."""
        out = self.model(categorical, numerical, *extra)
        if position is None:
            return out
        return shift_ctr_logit(
            out, self.position_logit(position), getattr(self.model, "stages", ())
        )

    @torch.no_grad()
    def effects(self) -> dict[str, float]:
        """The learnt effect on the CTR logit per position, ``{"1": 0.0, "2": -0.21, …}``."""
        w = self.bias.weight[:, 0].detach().cpu().double()
        return {str(self.reference + i): float(w[i] - w[0]) for i in range(w.numel())}


def position_tower(model: nn.Module, positions: torch.Tensor | None) -> nn.Module:
    """``model`` in a :class:`PositionTower` spanning the training ``positions`` (int64 ``[N]``,
    reference = the smallest), or ``model`` itself when there are none."""
    if positions is None or positions.numel() == 0:
        return model
    return PositionTower(model, int(positions.min()), int(positions.max()))


def forward_kwargs(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """``{"position": batch.position}`` when ``model`` is a :class:`PositionTower` and the batch
    carries positions, else ``{}``: what the trainer passes to a forward call."""
    if isinstance(model, PositionTower) and batch.position is not None:
        return {"position": batch.position}
    return {}


__all__ = ["MAX_POSITIONS", "PositionTower", "forward_kwargs", "position_tower"]
