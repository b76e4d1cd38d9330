"""Outputs and loss terms of models on a staged funnel (names: :mod:`mtrank.data.funnel`).

A staged model has one conditional logit per stage, ``logit_s`` for P(s | its ``after`` stage);
the entire-space probability of a stage is the product of the conditionals along its path
(ESMM, Ma et al. 2018, eq. 2, extended along the funnel as in ESM², Wen et al. 2020, eq. 6–8),
and the loss is ESMM's over all impressions: one BCE per stage of that product against "reached
the stage" (the first stage's term is the CTR loss), computed in log space
(:func:`mtrank.losses.log_sigmoid_product`).
"""

from __future__ import annotations

import torch

from mtrank.data.funnel import stage_paths
from mtrank.losses import TaskLoss


def stage_tasks(
    stages: list[str], parents: list[int], *, entire_space: bool = True
) -> list[TaskLoss]:
    """The loss terms of a staged model.

    ``entire_space``: per stage, BCE(Π σ(logit) along the path, ``<s>_all``) over all
    impressions (ESMM's loss). Otherwise per stage BCE(σ(logit_s), s) on the rows that reached
    the ``after`` stage (the conventional, selection-biased training of the MTL baselines).
    """
    paths = stage_paths(parents)
    tasks = []
    for i, s in enumerate(stages):
        if entire_space or parents[i] < 0:
            outs = tuple(f"logit_{stages[j]}" for j in paths[i])
            kind = "logit_product" if len(outs) > 1 else "logit"
            name = s if parents[i] < 0 else f"{s}_all"
            tasks.append(TaskLoss(name, label=f"{s}_all", outputs=outs, kind=kind))
        else:
            mask = f"{stages[parents[i]]}_all"
            tasks.append(TaskLoss(s, label=s, outputs=(f"logit_{s}",), space="clicked", mask=mask))
    return tasks


def funnel_aliases(
    out: dict[str, torch.Tensor], stages: list[str], parents: list[int]
) -> dict[str, torch.Tensor]:
    """``out`` (holding ``p_<s>`` and ``p_<s>_all`` per stage) plus the two-stage names: ``p_ctr``
    = the first stage; with ≥ 2 stages ``p_cvr`` = Π ``p_`` after the first stage along the last
    stage's path (P(last | first)) and ``p_ctcvr`` = ``p_<last>_all``. Each ``[B]``."""
    out["p_ctr"] = out[f"p_{stages[0]}"]
    if len(stages) > 1:
        path = stage_paths(parents)[-1]
        p_cvr = out[f"p_{stages[path[1]]}"]
        for j in path[2:]:
            p_cvr = p_cvr * out[f"p_{stages[j]}"]
        out["p_cvr"] = p_cvr
        out["p_ctcvr"] = out[f"p_{stages[-1]}_all"]
    return out


def stage_outputs(
    logits: list[torch.Tensor], stages: list[str], parents: list[int]
) -> dict[str, torch.Tensor]:
    """Named outputs from one conditional logit ``[B]`` per stage (in ``stages`` order):
    ``logit_<s>``, ``p_<s>`` = σ(logit_<s>), ``p_<s>_all`` = ``p_<after>_all`` · ``p_<s>``, and
    the aliases of :func:`funnel_aliases`. Each ``[B]``; ``p_<s>_all`` ≤ ``p_<after>_all``."""
    out: dict[str, torch.Tensor] = {}
    for i, (s, logit) in enumerate(zip(stages, logits, strict=True)):
        p = torch.sigmoid(logit)
        out[f"logit_{s}"] = logit
        out[f"p_{s}"] = p
        out[f"p_{s}_all"] = p if parents[i] < 0 else out[f"p_{stages[parents[i]]}_all"] * p
    return funnel_aliases(out, stages, parents)
