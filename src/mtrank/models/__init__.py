"""The model zoo. Every model is an ``nn.Module`` whose forward returns a dict of named ``[B]``
tensors and whose class attribute ``tasks`` lists its loss terms (:class:`mtrank.losses.TaskLoss`),
so one trainer serves every model without special cases."""

from __future__ import annotations

from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.aitm import AITM
from mtrank.models.base import Base
from mtrank.models.baselines import AMAN, Division, Oversampling, Unbias
from mtrank.models.chorus import ChorusCVR
from mtrank.models.config import FeatureSpec, ModelConfig, parse_options
from mtrank.models.dcmt import DCMT
from mtrank.models.escm2 import ESCM2DR, ESCM2IPW
from mtrank.models.esm2 import ESM2
from mtrank.models.esmm import ESMM, ESMMNS
from mtrank.models.ltr import LambdaMART
from mtrank.models.multitask import PLE, ESMMMMoE, ESMMSharedBottom, MMoE, SharedBottom

MODELS: dict[str, type[nn.Module]] = {
    "esmm": ESMM,
    "base": Base,
    "esmm_ns": ESMMNS,
    "esmm_sb": ESMMSharedBottom,
    "esmm_mmoe": ESMMMMoE,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "aitm": AITM,
    "escm2_ipw": ESCM2IPW,
    "escm2_dr": ESCM2DR,
    "esm2": ESM2,
    "dcmt": DCMT,
    "chorus_cvr": ChorusCVR,
    "aman": AMAN,
    "oversampling": Oversampling,
    "unbias": Unbias,
    "division": Division,
}

# Rankers that are not neural networks: trained by their own fit (not the trainer), stored
# by their own codec (a class with weights_file, save_weights, load_weights, scorer; see
# mtrank.bundle), scored with one ranking score ``score`` and no probabilities.
RANKERS: dict[str, type] = {"ltr": LambdaMART}

# The traits are declared on the model classes (``entire_space``, ``plain_tasks``); these sets
# are read from them.
# Models whose CVR estimate is trained over the entire space (through pCTCVR, or a
# counterfactual risk): the ESMM paper reports their own pCTCVR. The others' pCTCVR is
# formed, in the benchmark, as a shared independently trained pCTR × their pCVR (§3.2).
ENTIRE_SPACE_MODELS = frozenset(n for n, c in MODELS.items() if getattr(c, "entire_space", False))
# Models that need a three-stage funnel (ESM²'s click → {D-Action, buy}); the two-stage data
# of the other models is an error for them.
THREE_STAGE_MODELS = frozenset(
    n for n, c in MODELS.items() if getattr(c, "stages_required", None) == 3
)
# Models that also train on plain multi-task data (FeatureSpec.funnel = False).
PLAIN_TASK_MODELS = frozenset(n for n, c in MODELS.items() if getattr(c, "plain_tasks", False))


def check_options(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` unchanged when its model name is known and its options fit that model's typed
    ``Options``.

    Raises:
        ConfigError: an unknown model name, an unknown option or a value of the wrong type.
    """
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}") from None
    parse_options(cls.Options, cfg)
    return cfg


def build_model(spec: FeatureSpec, cfg: ModelConfig) -> nn.Module:
    """Instantiate the model ``cfg.name``. Raises ConfigError for an unknown name."""
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}") from None
    return cls(spec, cfg)


__all__ = [
    "AITM",
    "AMAN",
    "DCMT",
    "ChorusCVR",
    "ENTIRE_SPACE_MODELS",
    "ESCM2DR",
    "ESCM2IPW",
    "ESM2",
    "ESMM",
    "ESMMNS",
    "MODELS",
    "PLAIN_TASK_MODELS",
    "PLE",
    "RANKERS",
    "Base",
    "Division",
    "ESMMMMoE",
    "ESMMSharedBottom",
    "FeatureSpec",
    "LambdaMART",
    "MMoE",
    "ModelConfig",
    "Oversampling",
    "SharedBottom",
    "THREE_STAGE_MODELS",
    "Unbias",
    "build_model",
    "check_options",
]
