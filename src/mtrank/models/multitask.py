"""Multi-task models built from one pattern: shared embedding → *body* → one tower per task.

The body decides how much the tasks share:

* :class:`SharedBottomBody` — hard parameter sharing (Caruana 1997; the "shared-bottom" baseline
  of MMoE, Ma et al. KDD 2018, §4.1): one MLP whose output feeds every tower.
* :class:`MMoEBody` — Multi-gate Mixture-of-Experts (Ma et al. KDD 2018, §4.2, eq. 5–6):
  ``E`` experts, one softmax gate per task; tower k reads ``Σ_e g_k(x)_e · f_e(x)``.
* :class:`PLEBody` — Progressive Layered Extraction (Tang et al. RecSys 2020, §4.2–4.3):
  per level, task-specific experts and shared experts; each task's gate mixes its own and the
  shared experts (CGC, §4.2), a shared gate mixes all of them for the next level (§4.3).
  One level is CGC.

How a funnel is trained is the model's ``entire_space`` flag:

* ``entire_space = False`` (``shared_bottom``, ``mmoe``, ``ple``): the conventional multi-task
  set-up, CTR over all impressions and CVR over **clicked** impressions only (the same
  sample-selection-biased CVR space as BASE, ESMM paper §2.1);
* ``entire_space = True`` (``esmm_sb``, ``esmm_mmoe``): ESMM's loss, CTR + CTCVR = pCTR × pCVR over
  all impressions (ESMM §2.2), with the body under the two towers.

On plain multi-task data (``FeatureSpec.funnel = False``, e.g. Census-Income) each task is a
binary label over all rows, with outputs ``logit_<task>`` and ``p_<task>``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss
from mtrank.models.config import FeatureSpec, ModelConfig, ModelOptions, parse_options
from mtrank.models.stages import stage_outputs, stage_tasks
from mtrank.models.layers import MLP, ExpertBank, FeatureEmbedding, Gate, head_names, task_outputs

ESMM_TASKS = [
    TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
    TaskLoss("ctcvr", label="ctcvr", outputs=("logit_ctr", "logit_cvr"), kind="logit_product"),
]
CLICKED_SPACE_TASKS = [
    TaskLoss("ctr", label="click", outputs=("logit_ctr",)),
    TaskLoss("cvr", label="conversion", outputs=("logit_cvr",), space="clicked", mask="click"),
]


def _int_option(cfg: ModelConfig, key: str, value: int, minimum: int = 1) -> int:
    """``value`` of option ``key`` checked to be an integer ≥ ``minimum`` (ConfigError if not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"model {cfg.name!r}: option {key!r} must be an integer ≥ {minimum}, got {value!r}"
        )
    return value


def _sizes_option(
    cfg: ModelConfig, key: str, value: list[int] | int | None, default: list[int]
) -> list[int]:
    """Hidden sizes of option ``key`` (``default`` when unset; one int = one layer)."""
    value = default if value is None else value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ConfigError(
            f"model {cfg.name!r}: option {key!r} must be a non-empty list of positive sizes, "
            f"got {value!r}"
        )
    return value


def split_tower(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """(body hidden sizes, tower hidden sizes) from ``cfg.tower``: the first layer goes to the
    body (shared bottom, or each expert), the rest to each task tower, so every model spends the
    same MLP shape (paper default 360 → experts/bottom of 360, towers of 200 × 80). ``options``
    ``bottom`` / ``expert_hidden`` and ``tower_hidden`` override either part."""
    body = cfg.tower[:1] or [cfg.embedding_dim]
    return body, list(cfg.tower[1:])


class SharedBottomBody(nn.Module):
    """One MLP shared by all tasks. Shapes: ``[B, in_dim]`` → ``n_heads`` × ``[B, hidden[-1]]``."""

    def __init__(self, in_dim: int, n_heads: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        self.bottom = MLP(in_dim, hidden, out=None, dropout=dropout)
        self.n_heads = n_heads
        self.output_dim = self.bottom.output_dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One shared representation ``[B, d]`` per head (the same tensor)."""
        h = self.bottom(x)
        return [h] * self.n_heads


class MMoEBody(nn.Module):
    """Experts shared by all tasks, one softmax gate per task (MMoE, Ma et al. KDD 2018, eq. 5–6).

    Shapes: ``[B, in_dim]`` → ``n_heads`` × ``[B, expert_hidden[-1]]``;
    :meth:`gate_weights` → ``n_heads`` × ``[B, n_experts]``.
    """

    def __init__(
        self, in_dim: int, n_heads: int, n_experts: int, expert_hidden: list[int], dropout: float
    ) -> None:
        super().__init__()
        self.experts = ExpertBank(in_dim, n_experts, expert_hidden, dropout)
        self.gates = nn.ModuleList(Gate(in_dim, n_experts) for _ in range(n_heads))
        self.output_dim = self.experts.output_dim

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_experts, d]``."""
        return self.experts(x)

    def gate_weights(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per head, the gate weights ``[B, E]``."""
        return [g.weights(x) for g in self.gates]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per head, its gated mixture of the experts ``[B, d]`` (Ma et al. KDD 2018, eq. 5)."""
        e = self.experts(x)
        return [g(x, e)[0] for g in self.gates]


class CGCLevel(nn.Module):
    """One extraction level of PLE = a CGC layer (Tang et al. RecSys 2020, §4.2, eq. 2–4).

    Task k's gate mixes task k's own experts and the shared experts, reading task k's input;
    with ``shared_gate`` a further gate mixes *all* experts for the next level's shared input.

    Shapes: forward(per-task inputs ``n_heads`` × ``[B, in_dim]``, shared input ``[B, in_dim]``)
    → (``n_heads`` × ``[B, d]``, shared ``[B, d]`` or None, gate weights
    ``n_heads`` × ``[B, E_k]``).
    """

    def __init__(
        self,
        in_dim: int,
        n_heads: int,
        n_task_experts: int,
        n_shared_experts: int,
        hidden: list[int],
        dropout: float,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            ExpertBank(in_dim, n_task_experts, hidden, dropout) for _ in range(n_heads)
        )
        self.shared_experts = ExpertBank(in_dim, n_shared_experts, hidden, dropout)
        self.task_gates = nn.ModuleList(
            Gate(in_dim, n_task_experts + n_shared_experts) for _ in range(n_heads)
        )
        self.shared_gate = (
            Gate(in_dim, n_heads * n_task_experts + n_shared_experts) if shared_gate else None
        )
        self.output_dim = self.shared_experts.output_dim

    def all_experts(
        self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each task's own experts' outputs ``[B, E_task, d]`` (a list) and the shared experts'
        ``[B, E_shared, d]``."""
        return [
            bank(x) for bank, x in zip(self.task_experts, task_inputs, strict=True)
        ], self.shared_experts(shared_input)

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor):
        """The next level's task inputs and shared input (Tang et al. RecSys 2020, §4.3)."""
        own, shared = self.all_experts(task_inputs, shared_input)
        outs, weights = [], []
        for x, e, gate in zip(task_inputs, own, self.task_gates, strict=True):
            mix, w = gate(x, torch.cat([e, shared], dim=1))
            outs.append(mix)
            weights.append(w)
        shared_out = None
        if self.shared_gate is not None:
            shared_out, _ = self.shared_gate(shared_input, torch.cat([*own, shared], dim=1))
        return outs, shared_out, weights


class PLEBody(nn.Module):
    """``n_levels`` stacked CGC levels (PLE, Tang et al. RecSys 2020, §4.3); 1 level = CGC.

    Shapes: ``[B, in_dim]`` → ``n_heads`` × ``[B, expert_hidden[-1]]``; :meth:`gate_weights`
    returns the last level's task gates, ``n_heads`` × ``[B, n_task_experts + n_shared_experts]``.
    """

    def __init__(
        self,
        in_dim: int,
        n_heads: int,
        n_levels: int,
        n_task_experts: int,
        n_shared_experts: int,
        expert_hidden: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        levels, d = [], in_dim
        for level in range(n_levels):
            levels.append(
                CGCLevel(
                    d,
                    n_heads,
                    n_task_experts,
                    n_shared_experts,
                    expert_hidden,
                    dropout,
                    shared_gate=level < n_levels - 1,
                )
            )
            d = levels[-1].output_dim
        self.levels = nn.ModuleList(levels)
        self.n_heads = n_heads
        self.output_dim = d

    def _run(self, x: torch.Tensor):
        task_inputs, shared, weights = [x] * self.n_heads, x, []
        for level in self.levels:
            task_inputs, shared, weights = level(task_inputs, shared)
        return task_inputs, weights

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """First level's experts, all tasks' then the shared ones: ``[B, E_total, d]``."""
        own, shared = self.levels[0].all_experts([x] * self.n_heads, x)
        return torch.cat([*own, shared], dim=1)

    def gate_weights(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per head, the last level's gate weights ``[B, E]``."""
        return self._run(x)[1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per head, the last level's representation ``[B, d]``."""
        return self._run(x)[0]


class MultiTaskModel(nn.Module):
    """Shared embedding → body → one tower per task (see the module docstring).

    Shapes: forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``) → dict of
    ``[B]``: ``logit_ctr, logit_cvr, p_ctr, p_cvr, p_ctcvr`` for a funnel (pCTCVR = pCTR · pCVR),
    ``logit_<task>, p_<task>`` for plain tasks, those of
    :func:`~mtrank.models.stages.stage_outputs` on a staged funnel (one head per stage; the
    entire-space models ``esmm_sb`` / ``esmm_mmoe`` train ESMM's loss per stage, the others
    each stage on the rows that reached its ``after`` stage).

    Raises:
        ConfigError: an ``entire_space`` model on plain data, or a bad option.
    """

    entire_space = False
    plain_tasks = True  # also trains on plain multi-task data (no funnel)
    tasks = CLICKED_SPACE_TASKS

    class Options(ModelOptions):
        """``tower_hidden``: the towers' hidden sizes (default: the tower after its first layer;
        may be empty, a linear tower)."""

        tower_hidden: list[int] | None = None

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.options = parse_options(self.Options, cfg)
        self.stages, self.parents = list(spec.stages), list(spec.parents)
        if self.entire_space and not spec.funnel and not self.stages:
            raise ConfigError(
                f"{cfg.name} is trained through pCTCVR and needs a funnel dataset (click and "
                "conversion labels)"
            )
        self.funnel = spec.funnel
        self.heads = self.stages or head_names(spec.funnel, spec.task_names)
        if self.stages:  # one head per stage, conditional on its `after` stage
            self.tasks = stage_tasks(self.stages, self.parents, entire_space=self.entire_space)
        elif spec.funnel:
            self.tasks = ESMM_TASKS if self.entire_space else CLICKED_SPACE_TASKS
        else:
            self.tasks = [TaskLoss(t, label=t, outputs=(f"logit_{t}",)) for t in self.heads]
        self.embedding = FeatureEmbedding.from_spec(spec, cfg.embedding_dim)
        body_hidden, tower_hidden = split_tower(cfg)
        if self.options.tower_hidden is not None:  # may be empty: a linear tower
            tower_hidden = self.options.tower_hidden
            if not all(v > 0 for v in tower_hidden):
                raise ConfigError(
                    f"model {cfg.name!r}: option 'tower_hidden' must be a list of positive "
                    f"sizes, got {tower_hidden!r}"
                )
        self.body = self.build_body(self.embedding.output_dim, len(self.heads), body_hidden, cfg)
        self.towers = nn.ModuleDict(
            {
                h: MLP(self.body.output_dim, tower_hidden, out=1, dropout=cfg.dropout)
                for h in self.heads
            }
        )

    def build_body(
        self, in_dim: int, n_heads: int, hidden: list[int], cfg: ModelConfig
    ) -> nn.Module:
        """The shared body: one representation per head (subclasses choose it)."""
        raise NotImplementedError

    def head_outputs(self) -> dict[str, nn.Linear]:
        """The output layer of each head's tower (for
        :func:`~mtrank.models.layers.init_output_bias`)."""
        return {h: t.output_layer for h, t in self.towers.items()}

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named logits and probabilities ``[B]`` per head, from ids ``[B, n_cat]`` and numbers
        ``[B, n_num]``."""
        reps = self.body(self.embedding(categorical, numerical, *extra))
        logits = {h: self.towers[h](r).squeeze(-1) for h, r in zip(self.heads, reps, strict=True)}
        if self.stages:
            return stage_outputs([logits[h] for h in self.heads], self.stages, self.parents)
        return task_outputs(logits, self.funnel)

    # --- introspection for the benchmark (gated bodies only) ---
    def gate_weights(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per task, the (last level's) gate weights ``[B, n_experts]``. Raises ConfigError for
        a body without gates."""
        if not hasattr(self.body, "gate_weights"):
            raise ConfigError(f"{type(self).__name__} has no gates")
        return dict(
            zip(
                self.heads,
                self.body.gate_weights(self.embedding(categorical, numerical, *extra)),
                strict=True,
            )
        )

    def expert_outputs(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> torch.Tensor:
        """The (first level's) expert outputs ``[B, n_experts, d]``. Raises ConfigError without
        experts."""
        if not hasattr(self.body, "expert_outputs"):
            raise ConfigError(f"{type(self).__name__} has no experts")
        return self.body.expert_outputs(self.embedding(categorical, numerical, *extra))


class SharedBottom(MultiTaskModel):
    """Shared-bottom (hard sharing): options ``bottom`` (hidden sizes, default ``tower[:1]``)."""

    class Options(MultiTaskModel.Options):
        """Plus ``bottom``: the shared bottom's hidden sizes."""

        bottom: list[int] | int | None = None

    def build_body(self, in_dim, n_heads, hidden, cfg):
        """A shared-bottom MLP over the embeddings."""
        return SharedBottomBody(
            in_dim, n_heads, _sizes_option(cfg, "bottom", self.options.bottom, hidden), cfg.dropout
        )


class MMoE(MultiTaskModel):
    """MMoE (Ma et al. KDD 2018): options ``n_experts`` (default 4) and ``expert_hidden``
    (default ``tower[:1]``)."""

    class Options(MultiTaskModel.Options):
        """Plus ``n_experts`` and ``expert_hidden`` (each expert's hidden sizes)."""

        n_experts: int = 4
        expert_hidden: list[int] | int | None = None

    def build_body(self, in_dim, n_heads, hidden, cfg):
        """An MMoE body with ``n_experts`` experts and one gate per head."""
        o = self.options
        return MMoEBody(
            in_dim,
            n_heads,
            _int_option(cfg, "n_experts", o.n_experts),
            _sizes_option(cfg, "expert_hidden", o.expert_hidden, hidden),
            cfg.dropout,
        )


class PLE(MultiTaskModel):
    """PLE / CGC (Tang et al. RecSys 2020): options ``n_levels`` (default 1 = CGC),
    ``task_experts`` (per task, default 2), ``shared_experts`` (default 2), ``expert_hidden``."""

    class Options(MultiTaskModel.Options):
        """Plus ``n_levels``, ``task_experts`` (per task), ``shared_experts``, ``expert_hidden``."""

        n_levels: int = 1
        task_experts: int = 2
        shared_experts: int = 2
        expert_hidden: list[int] | int | None = None

    def build_body(self, in_dim, n_heads, hidden, cfg):
        """A PLE body of ``n_levels`` CGC levels."""
        o = self.options
        return PLEBody(
            in_dim,
            n_heads,
            _int_option(cfg, "n_levels", o.n_levels),
            _int_option(cfg, "task_experts", o.task_experts),
            _int_option(cfg, "shared_experts", o.shared_experts),
            _sizes_option(cfg, "expert_hidden", o.expert_hidden, hidden),
            cfg.dropout,
        )


class ESMMSharedBottom(SharedBottom):
    """ESMM's entire-space loss (CTR + CTCVR = pCTR · pCVR) over a shared-bottom body
    (``esmm_sb``)."""

    entire_space = True
    plain_tasks = False  # the entire-space loss needs a funnel
    tasks = ESMM_TASKS


class ESMMMMoE(MMoE):
    """ESMM's entire-space loss (CTR + CTCVR = pCTR · pCVR) over an MMoE body (``esmm_mmoe``)."""

    entire_space = True
    plain_tasks = False  # the entire-space loss needs a funnel
    tasks = ESMM_TASKS
