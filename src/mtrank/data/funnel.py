"""Funnels declared as stages: the stage tree, and the names of its labels, outputs and metrics.

A funnel is a tree of stages rooted at the impression: ``click`` on the impression, then each
later stage conditional on its ``after`` stage (default: the stage declared before it), e.g.
click → cart → buy, or a post-click branch click → {cart, buy} as in ESM² (Wen et al., SIGIR
2020, §3: D-Action / O-Action). For every stage ``s``:

* label keys ``s`` (the stage's 0/1 column) and ``s_all`` (the product of the labels along the
  path from the impression: "reached ``s``"; equal to ``s`` on a valid funnel);
* model outputs ``logit_s``, ``p_s`` = P(s | after stage, x) and ``p_s_all`` = Π p along the
  path = P(s | impression, x), the entire-space product of ESMM (Ma et al. 2018, eq. 2);
* metrics ``auc_s`` … on the rows whose ``after`` stage is 1 (all rows for the first stage) and
  ``auc_s_all`` … on all impressions.

So that fusion, quadrants and serving need nothing new, a funnel also exposes the two-stage names:
``p_ctr`` = the first stage, and with ≥ 2 stages ``p_cvr`` = P(last stage | first stage) (the
product of the conditionals after the first stage along the last declared stage's path) and
``p_ctcvr`` = ``p_<last>_all``; the label keys ``click`` (first stage) and, with ≥ 2 stages,
``conversion`` (last stage) and ``ctcvr`` (last stage's ``_all``). Everything in this module
is about names and paths; the data checks live in :mod:`mtrank.data.io`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

# stage names that would collide with the two-stage names every funnel also exposes
RESERVED_STAGES = frozenset({"ctr", "cvr", "ctcvr"})
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class FunnelStage(BaseModel):
    """One declared stage: its name, its 0/1 label column and the stage it follows.

    Attributes:
        stage: a lower-case identifier (``click``, ``cart``, ``buy``); names outputs and metrics.
        label: the label column (0/1) in the data.
        after: the stage this one is conditional on; None = the previously declared stage (the
            impression for the first stage).
    """

    model_config = ConfigDict(extra="forbid")

    stage: str
    label: str
    after: str | None = None


def check_stages(stages: list[FunnelStage]) -> list[str]:
    """Problems of a declared funnel (empty when valid): names, duplicates, ``after`` links.

    Each problem starts with its key in the schema, e.g. ``funnel.1.after: unknown stage
    'cartt' (stages: click, cart, buy)``.
    """
    problems: list[str] = []
    names = [s.stage for s in stages]
    labels = [s.label for s in stages]
    listed = ", ".join(names)
    for i, s in enumerate(stages):
        at = f"funnel.{i}"
        if not _NAME.match(s.stage):
            problems.append(
                f"{at}.stage: stage name {s.stage!r} must be lower-case letters, digits and _"
            )
        elif s.stage in RESERVED_STAGES or s.stage.endswith("_all"):
            problems.append(
                f"{at}.stage: stage name {s.stage!r} is reserved (ctr, cvr, ctcvr and names "
                "ending in _all are the funnel's output names)"
            )
        elif s.stage == "click" and i != 0:
            problems.append(f"{at}.stage: a stage named 'click' must be the first stage")
        elif s.stage == "conversion" and i != len(stages) - 1:
            problems.append(f"{at}.stage: a stage named 'conversion' must be the last stage")
        if s.stage in names[:i]:
            problems.append(
                f"{at}.stage: stage {s.stage!r} is declared twice (also funnel."
                f"{names.index(s.stage)})"
            )
        if s.label in labels[:i]:
            j = labels.index(s.label)
            problems.append(
                f"{at}.label: label column {s.label!r} is used by two stages "
                f"({names[j]!r} at funnel.{j} and {s.stage!r})"
            )
        if s.after is None:
            continue
        if i == 0:
            problems.append(
                f"{at}.after: the first stage {s.stage!r} follows the impression: it takes no "
                "`after`"
            )
        elif s.after not in names:
            problems.append(f"{at}.after: unknown stage {s.after!r} (stages: {listed})")
        elif s.after == s.stage:
            problems.append(f"{at}.after: stage {s.stage!r} cannot follow itself")
        elif s.after not in names[:i]:
            problems.append(
                f"{at}.after: stage {s.after!r} is declared after {s.stage!r}; `after` must "
                f"name an earlier stage ({', '.join(names[:i])}), so the funnel has no cycle"
            )
    return problems


def stage_parents(stages: list[FunnelStage]) -> list[int]:
    """Index of each stage's ``after`` stage, -1 for the first (the impression)."""
    names = [s.stage for s in stages]
    out = []
    for i, s in enumerate(stages):
        out.append(-1 if i == 0 else names.index(s.after) if s.after is not None else i - 1)
    return out


def stage_paths(parents: list[int]) -> list[list[int]]:
    """For each stage, the stage indices from the first stage down to it (inclusive)."""
    paths: list[list[int]] = []
    for i, p in enumerate(parents):
        paths.append([i] if p < 0 else [*paths[p], i])
    return paths


def stage_output_names(stages: list[str]) -> list[str]:
    """The probability outputs of a staged model, in order: ``p_<s>`` and ``p_<s>_all`` per
    stage, then ``p_ctr`` and, with ≥ 2 stages, ``p_cvr`` and ``p_ctcvr``."""
    names = [n for s in stages for n in (f"p_{s}", f"p_{s}_all")]
    return [*names, "p_ctr", *(["p_cvr", "p_ctcvr"] if len(stages) > 1 else [])]


def derived_labels(labels: dict, stages: list[str], parents: list[int]) -> dict:
    """The label keys a staged funnel adds to its per-stage labels (tensors or arrays ``[N]``
    0/1, keyed by stage): ``<s>_all`` (the product along the path: reached ``s``), ``click`` (the
    first stage) and, with ≥ 2 stages, ``conversion`` (the last) and ``ctcvr`` (``<last>_all``)."""
    out = {}
    for i, s in enumerate(stages):
        out[f"{s}_all"] = (
            labels[s] if parents[i] < 0 else out[f"{stages[parents[i]]}_all"] * labels[s]
        )
    out["click"] = labels[stages[0]]
    if len(stages) > 1:
        out["conversion"] = labels[stages[-1]]
        out["ctcvr"] = out[f"{stages[-1]}_all"]
    return out
