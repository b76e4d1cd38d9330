"""Task losses, including ESMM's CTCVR loss computed in log space from the two logits.

ESMM (Ma et al. 2018, §2.2, eq. 3): L = Σ BCE(pCTR, click) + Σ BCE(pCTR · pCVR, click ∧ conversion),
both sums over all impressions. The product is never formed in probability space: with logits
a (CTR) and b (CVR),

    log pCTCVR       = logsigmoid(a) + logsigmoid(b)
    log (1 − pCTCVR) = logsumexp(−a, −b, −a−b) + logsigmoid(a) + logsigmoid(b)

The second line is exact (1 − σ(a)σ(b) = (e^−a + e^−b + e^−a−b) / ((1+e^−a)(1+e^−b))), so
the loss is finite, with a non-zero gradient, for every finite pair of logits, including
pCTR = pCVR = 1 in float32. It generalises to a product of k sigmoids (a logsumexp over the
2^k − 1 non-empty subsets), and equals log1p(−exp(log pCTCVR)) wherever the latter is finite.

Under mixed precision (``torch.autocast`` in bf16 / fp16, see :mod:`mtrank.train.device`) the
logits arrive in the low precision; every loss here is computed in float32 with autocast
switched off, so the log-space identities above stay exact to float32 rounding (bf16 keeps 8
significant bits: logsumexp and logsigmoid in bf16 would move the loss by ~1e-2 relative).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mtrank.data.batch import Batch


@dataclass(frozen=True)
class TaskLoss:
    """One term of a model's training loss.

    Attributes:
        name: task name (``ctr``, ``cvr``, ``ctcvr``, or a plain task's name).
        label: the batch label key it is trained on.
        outputs: the model output key(s): one logit for ``kind="logit"``; several logits whose
            sigmoids multiply for ``kind="logit_product"`` (ESMM's pCTCVR).
        kind: how the probability is formed from ``outputs``.
        space: ``all`` impressions, or only rows where the label ``mask`` is 1 (``clicked``).
        mask: the label key that selects the rows of a ``clicked`` space.
        weight: the term's weight in the total loss.
    """

    name: str
    label: str
    outputs: tuple[str, ...]
    kind: Literal["logit", "logit_product"] = "logit"
    space: Literal["all", "clicked"] = "all"
    mask: str | None = None
    weight: float = 1.0


def log_sigmoid_product(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and log(1 − p) of p = Π σ(logit_i), exactly and stably.

    Args:
        logits: k tensors of the same shape ``[B]`` (k ≥ 1; ESMM uses k = 2).

    Returns:
        (log_p, log_1mp), each ``[B]``, finite for finite inputs.
    """
    log_p = sum(F.logsigmoid(a) for a in logits)
    subsets = []
    for r in range(1, len(logits) + 1):
        for combo in itertools.combinations(logits, r):
            subsets.append(-sum(combo))
    log_1mp = torch.logsumexp(torch.stack(subsets, dim=0), dim=0) + log_p
    return log_p, log_1mp


def full_precision(like: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``like``'s device type (losses run in float32 there)."""
    if not torch.is_autocast_enabled(like.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=like.device.type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a lower precision (float64 stays float64)."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def binary_cross_entropy(
    task: TaskLoss, outputs: dict[str, torch.Tensor], label: torch.Tensor
) -> torch.Tensor:
    """Per-row BCE ``[B]`` of one task, from logits (never from clipped probabilities), in at
    least float32 whatever the logits' dtype or an enclosing autocast."""
    logits = [outputs[k] for k in task.outputs]
    with full_precision(logits[0]):
        logits = [at_least_fp32(x) for x in logits]
        label = label.to(logits[0].dtype)
        if task.kind == "logit":
            return F.binary_cross_entropy_with_logits(logits[0], label, reduction="none")
        log_p, log_1mp = log_sigmoid_product(logits)
        return -(label * log_p + (1.0 - label) * log_1mp)


def task_loss_sum(
    task: TaskLoss, outputs: dict[str, torch.Tensor], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted per-row losses over the task's space, sum of weights in that space).

    Summing numerator and denominator separately makes a validation loss over many batches exact.
    """
    per_row = binary_cross_entropy(task, outputs, batch.labels[task.label])
    w = torch.ones_like(per_row) if batch.weight is None else batch.weight
    if task.mask is not None:
        w = w * batch.labels[task.mask]
    return (per_row * w).sum(), w.sum()


def total_loss(
    tasks: list[TaskLoss], outputs: dict[str, torch.Tensor], batch: Batch, *, parts: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ_task weight · mean loss over the task's space. Returns (float32 loss scalar, per-task
    floats; empty with ``parts=False``, which spares a GPU a device-to-host sync per task)."""
    total = outputs[tasks[0].outputs[0]].new_zeros((), dtype=torch.float32)
    floats: dict[str, float] = {}
    for task in tasks:
        num, den = task_loss_sum(task, outputs, batch)
        mean = num / den.clamp_min(1.0) if task.mask is not None else num / den.clamp_min(1e-12)
        total = total + task.weight * mean
        if parts:
            floats[task.name] = float(mean.detach())
    return total, floats


def model_loss(
    model: torch.nn.Module, outputs: dict[str, torch.Tensor], batch: Batch, *, parts: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of any model: :func:`total_loss` of its declared ``tasks``, plus, when
    the model defines it, ``model.extra_loss(outputs, batch) -> scalar Tensor``.

    ``extra_loss`` is the generic hook for terms that are not a BCE over a label space: AITM's
    behavioural calibrator, ESCM²'s counterfactual CVR risk. It is added with weight 1 (the
    model weights it itself) and reported as ``parts["extra"]``. The validation objective used
    for early stopping (:func:`mtrank.train.trainer.validation_loss`) is the declared tasks only,
    so it is comparable across models. Computed in float32 under any autocast.
    """
    total, floats = total_loss(model.tasks, outputs, batch, parts=parts)
    extra = getattr(model, "extra_loss", None)
    if extra is not None:
        with full_precision(total):
            term = at_least_fp32(extra({k: at_least_fp32(v) for k, v in outputs.items()}, batch))
        total = total + term
        if parts:
            floats["extra"] = float(term.detach())
    return total, floats
