"""Building blocks shared by every model: the feature embedding and the MLP."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mtrank.errors import ConfigError


class FeatureEmbedding(nn.Module):
    """Embeds categorical ids, pools list and sequence features, and appends numerical values.

    All categorical fields share one embedding table with per-field row offsets, so a batch is
    one gather, not one lookup per field. A list feature has its own rows in the same table; a
    sequence feature reuses the rows of the categorical field it shares (``hist_purchased``
    looks up ``item_id``'s rows). Each list/sequence is pooled into one ``dim`` vector:

    * ``sum`` / ``mean``: masked (and, when weighted, weighted) sum or mean of the element
      embeddings, padding and missing elements (id 0) masked out — the ``nn.EmbeddingBag``
      computation as one gather plus a masked reduction (which also exports to ONNX);
    * ``attention`` (sequences): DIN target attention, :class:`TargetAttention`.

    Args:
        cardinalities: rows per categorical field (vocabulary + 2 reserved indices).
        n_numerical: number of numerical features.
        dim: embedding size (ESMM paper: 18).
        lists: the list/sequence features (:class:`~mtrank.models.config.ListInput`), in the
            order of their tensors in ``extra``.

    Shapes:
        forward(categorical int64 ``[B, n_cat]``, numerical float32 ``[B, n_num]``, *extra)
        → float32 ``[B, (n_cat + n_lists) · dim + n_num]``; ``extra`` holds per list feature its
        ids int64 ``[B, L]`` (0 = padding / missing, 1 = OOV) and, when weighted, its weights
        float32 ``[B, L]``; per sequence its ids ``[B, L]``. ``L`` may differ per feature and
        per batch.

    Raises:
        ConfigError: no feature at all, a non-positive dimension, a sequence sharing a field that
            does not exist, or attention pooling of a list.
    """

    def __init__(
        self, cardinalities: Sequence[int], n_numerical: int, dim: int, lists: Sequence = ()
    ) -> None:
        super().__init__()
        if not cardinalities and n_numerical == 0 and not lists:
            raise ConfigError("a model needs at least one categorical or numerical feature")
        if dim <= 0:
            raise ConfigError(f"embedding_dim must be positive, got {dim}")
        self.n_categorical = len(cardinalities)
        self.n_numerical = n_numerical
        self.dim = dim
        offsets = (
            torch.tensor([0, *list(cardinalities)[:-1]], dtype=torch.int64).cumsum(0)
            if cardinalities
            else torch.zeros(0, dtype=torch.int64)
        )
        self.register_buffer("offsets", offsets, persistent=False)
        rows = int(sum(cardinalities))
        # per list feature: (row offset, weighted, pooling, shared categorical field or -1)
        self.list_layout: list[tuple[int, bool, str, int]] = []
        attention: dict[str, nn.Module] = {}
        for i, f in enumerate(lists):
            if f.kind == "sequence":
                if f.shares is None or f.shares >= self.n_categorical:
                    raise ConfigError(f"sequence {f.column!r} shares no existing categorical field")
                offset, shares = int(offsets[f.shares]), int(f.shares)
            else:
                if f.pooling == "attention":
                    raise ConfigError(f"list {f.column!r}: attention pooling needs a sequence")
                offset, shares, rows = rows, -1, rows + int(f.cardinality)
            if f.pooling == "attention":
                attention[str(i)] = TargetAttention(dim)
            self.list_layout.append((offset, bool(f.weighted), f.pooling, shares))
        self.attention = nn.ModuleDict(attention)
        self.n_extra = sum(2 if w else 1 for _, w, _, _ in self.list_layout)
        self.table = nn.Embedding(max(1, rows), dim)
        nn.init.normal_(self.table.weight, std=0.01)

    @classmethod
    def from_spec(cls, spec, dim: int) -> FeatureEmbedding:
        """The embedding of a :class:`~mtrank.models.config.FeatureSpec` (scalar, list and
        sequence features)."""
        return cls(spec.cardinalities, spec.n_numerical, dim, spec.lists)

    @property
    def output_dim(self) -> int:
        """Width of the concatenated embeddings and numbers: ``(n_cat + n_lists) · dim +
        n_num``."""
        return (self.n_categorical + len(self.list_layout)) * self.dim + self.n_numerical

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> torch.Tensor:
        """``[B, output_dim]`` from ids ``[B, n_cat]``, numbers ``[B, n_num]`` and the list /
        sequence tensors ``extra`` (see the class docstring).

        ``extra`` is the slot every model passes through unchanged, so new feature kinds need no
        model change.

        Raises:
            ConfigError: ``extra`` holds a different number of tensors than the declared list and
                sequence features need.
        """
        if len(extra) != self.n_extra:
            raise ConfigError(
                f"{len(extra)} extra feature tensor(s) given, but this embedding's list and "
                f"sequence features need {self.n_extra}"
            )
        parts = []
        emb = None
        if self.n_categorical:
            emb = self.table(categorical + self.offsets)  # [B, n_cat, dim]
            parts.append(emb.flatten(1))
        k = 0
        for i, (offset, weighted, pooling, shares) in enumerate(self.list_layout):
            ids = extra[k]
            weights = extra[k + 1] if weighted else None
            k += 2 if weighted else 1
            elements = self.table(ids + offset)  # [B, L, dim]
            mask = ids > 0  # [B, L]: padding and missing elements are 0
            if pooling == "attention":
                parts.append(self.attention[str(i)](emb[:, shares], elements, mask))
                continue
            w = mask.to(elements.dtype)
            if weights is not None:
                w = w * weights
            pooled = (elements * w.unsqueeze(-1)).sum(1)  # [B, dim]
            if pooling == "mean":
                pooled = pooled / w.sum(1, keepdim=True).clamp_min(1e-12 if weighted else 1.0)
            parts.append(pooled)
        if self.n_numerical:
            parts.append(numerical)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class TargetAttention(nn.Module):
    """DIN's local activation unit: the candidate item attends over a behaviour sequence.

    Each history element ``e_j`` gets the weight ``a(e_j, v_A)``, a feed-forward net of
    ``[e_j, v_A, e_j − v_A, e_j ⊙ v_A]`` (ReLU hidden layer of 36), and the pooled interest is
    ``Σ_j a(e_j, v_A) · e_j`` over the non-padding elements. As in the paper the weights are not
    normalised by a softmax, so the pooled vector keeps the intensity of the user's interest
    (Zhou et al., *Deep Interest Network for Click-Through Rate Prediction*, KDD 2018, §4.3,
    eq. 3; the paper's Dice/PReLU activation is replaced by ReLU).

    Shapes: forward(query ``[B, d]`` (the candidate's embedding), keys ``[B, L, d]``, mask bool
    ``[B, L]``, True where an element is present) → ``[B, d]`` (zeros for an empty history).
    """

    def __init__(self, dim: int, hidden: int = 36) -> None:
        super().__init__()
        self.unit = MLP(4 * dim, [hidden], out=1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled history ``[B, d]``; see the class docstring."""
        q = query.unsqueeze(1).expand_as(keys)
        score = self.unit(torch.cat([keys, q, keys - q, keys * q], dim=-1)).squeeze(-1)
        score = score * mask.to(score.dtype)  # [B, L]
        return (score.unsqueeze(-1) * keys).sum(1)


class MLP(nn.Module):
    """Linear → ReLU (→ dropout) per hidden layer, then an optional linear output of size ``out``
    (``output_layer``, whose bias :func:`init_output_bias` may set to a base rate's log-odds).

    Shapes: ``[B, in_dim]`` → ``[B, out]`` (or ``[B, hidden[-1]]`` when ``out`` is None).
    """

    def __init__(
        self, in_dim: int, hidden: Sequence[int], out: int | None = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out is not None:
            layers.append(nn.Linear(d, out))
            d = out
        self.net = nn.Sequential(*layers)
        self.output_dim = d
        self.has_output_layer = out is not None

    @property
    def output_layer(self) -> nn.Linear | None:
        """The final linear layer of size ``out`` (None without one); not a separate submodule,
        so state dicts are unchanged."""
        return self.net[-1] if self.has_output_layer else None  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, out]`` from ``[B, in_dim]``."""
        return self.net(x)


def prior_logit(rate: float, eps: float = 1e-6) -> float:
    """log(r / (1 − r)) of a base rate ``r`` clipped to [eps, 1 − eps]: the logit whose sigmoid is
    the rate."""
    r = min(max(float(rate), eps), 1.0 - eps)
    return math.log(r / (1.0 - r))


def init_output_bias(model: nn.Module, rates: dict[str, float]) -> dict[str, float]:
    """Start every head at its base rate: set the output bias of each head the model declares
    (``model.head_outputs()``, head name → final ``nn.Linear`` with one output, or a tuple of
    them that start at the same rate) to :func:`prior_logit` of ``rates[head]``, so the first
    steps do not have to move σ(logit) from 0.5 to the click or conversion rate ("init well",
    Karpathy 2019, *A Recipe for Training Neural Networks*; the bias is then trained as
    usual). Heads without a rate and models without ``head_outputs`` are left as they are.

    A head named ``not_<head>`` predicts the complement of ``<head>``'s label (ChorusCVR's
    unCVR tower, DCMT's counterfactual CVR tower) and starts at 1 − ``rates[<head>]``.

    Returns the logits set, by head name. See docs/models.md (“Defaults”) for the ablation that
    chose this default.
    """
    heads = model.head_outputs() if hasattr(model, "head_outputs") else {}
    done: dict[str, float] = {}
    with torch.no_grad():
        for name, layers in heads.items():
            rate = rates.get(name)
            if rate is None and name.startswith("not_") and name[4:] in rates:
                rate = 1.0 - rates[name[4:]]
            for layer in layers if isinstance(layers, tuple) else (layers,):
                if rate is not None and layer.bias is not None:
                    done[name] = prior_logit(rate)
                    layer.bias.fill_(done[name])
    return done


def funnel_outputs(logit_ctr: torch.Tensor, logit_cvr: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named outputs of a funnel model from its two logits (each ``[B]``).

    Returns ``logit_ctr``, ``logit_cvr``, ``p_ctr``, ``p_cvr`` and ``p_ctcvr = p_ctr · p_cvr``
    (ESMM eq. 2), all ``[B]``; pCTCVR ≤ pCTR holds by construction.
    """
    p_ctr = torch.sigmoid(logit_ctr)
    p_cvr = torch.sigmoid(logit_cvr)
    return {
        "logit_ctr": logit_ctr,
        "logit_cvr": logit_cvr,
        "p_ctr": p_ctr,
        "p_cvr": p_cvr,
        "p_ctcvr": p_ctr * p_cvr,
    }


def head_names(funnel: bool, task_names: Sequence[str]) -> list[str]:
    """The per-task heads of a multi-task model: ``["ctr", "cvr"]`` for a funnel, else the plain
    task names (in schema order). Raises ConfigError when a plain dataset declares no task."""
    if funnel:
        return ["ctr", "cvr"]
    if not task_names:
        raise ConfigError("a plain multi-task dataset needs task_names (FeatureSpec.task_names)")
    return list(task_names)


def task_outputs(logits: dict[str, torch.Tensor], funnel: bool) -> dict[str, torch.Tensor]:
    """Named outputs from per-head logits ``{head: [B]}``: :func:`funnel_outputs` for a funnel,
    else ``logit_<task>`` and ``p_<task> = σ(logit_<task>)`` per plain task."""
    if funnel:
        return funnel_outputs(logits["ctr"], logits["cvr"])
    out: dict[str, torch.Tensor] = {}
    for name, logit in logits.items():
        out[f"logit_{name}"] = logit
        out[f"p_{name}"] = torch.sigmoid(logit)
    return out


class ExpertBank(nn.Module):
    """``n`` independent MLP experts over the same input (MMoE, Ma et al. KDD 2018, §4.2).

    Each expert is its own ``MLP`` with PyTorch's default (random, Kaiming-uniform)
    initialisation, drawn independently, so experts differ from the first step. (A widely copied
    public implementation initialised every expert with the same constant, which makes them
    identical forever: their gradients are identical too.)

    Args:
        in_dim: input size. n_experts: number of experts (≥ 1). hidden: each expert's hidden
            sizes (the last is the expert output size). dropout: as in :class:`MLP`.

    Shapes: ``[B, in_dim]`` → ``[B, n_experts, hidden[-1]]``.

    Raises:
        ConfigError: ``n_experts < 1`` or empty ``hidden``.
    """

    def __init__(
        self, in_dim: int, n_experts: int, hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ConfigError(f"an expert bank needs at least one expert, got {n_experts}")
        if not hidden:
            raise ConfigError("experts need at least one hidden layer size")
        self.experts = nn.ModuleList(
            MLP(in_dim, hidden, out=None, dropout=dropout) for _ in range(n_experts)
        )
        self.output_dim = int(hidden[-1])
        self.n_experts = n_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output ``[B, E, d]`` from ``[B, in_dim]``."""
        return torch.stack([e(x) for e in self.experts], dim=1)


class Gate(nn.Module):
    """A softmax gate: a linear map of the input to weights over ``n_experts`` experts.

    Randomly initialised (PyTorch's default for ``nn.Linear``), never constant.

    Shapes: forward(x ``[B, in_dim]``, experts ``[B, E, d]``) → (mixture ``[B, d]``,
    weights ``[B, E]``, each row summing to 1).
    """

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax gate weights ``[B, E]`` from ``[B, in_dim]``."""
        return torch.softmax(self.linear(x), dim=-1)

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated mixture ``[B, d]`` of experts ``[B, E, d]``, and the weights ``[B, E]``."""
        w = self.weights(x)
        return torch.einsum("be,bed->bd", w, experts), w
