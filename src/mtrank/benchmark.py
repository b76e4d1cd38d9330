"""The model zoo side by side, with the ESMM paper's evaluation protocol (Ma et al. 2018, §3.2).

Protocol (one function, :func:`run_benchmark`; the CLI is ``mtrank benchmark``):

* **Split**: by time when the schema has a time column (first half of the impressions trains,
  second half tests), else one fixed seeded random half/half split; validation (early stopping)
  comes from the train half: by time its latest ``val_fraction`` (10 %), at random a seeded
  ``val_fraction`` of all rows (:func:`mtrank.data.split.split_data`). A dataset that ships its
  own train/test files keeps them. The same split serves every model and repeat.
* **Budget and selection**: every model gets the same embedding size, MLP sizes (paper: 18 and
  360 × 200 × 80; gated and shared-bottom bodies take the first layer, their towers the rest),
  Adam with the same learning rate and batch size, the same maximum epochs, and **one
  model-selection rule**: early stopping on the same validation metric (``select``, default
  ``auc_ctcvr``; ``loss`` = each model's own loss). Every model is trained by
  :func:`mtrank.workflow.fit_encoded`, as ``mtrank train`` trains. Each model's own knobs live
  in ``options[model]``.
* **Metrics on test**: ``auc_ctr``; ``auc_cvr_masked`` (pCVR over clicked impressions only);
  ``auc_ctcvr`` as in the paper: for models trained over the entire space
  (:data:`mtrank.models.ENTIRE_SPACE_MODELS`) their own pCTCVR, for the others pCTCVR = pCTR of
  **one shared, independently trained CTR network** × the model's pCVR (``shared_ctr``; without
  it every model's own pCTCVR); ``auc_ctcvr_own`` and ``auc_ctcvr_shared`` give both. Logloss
  per task, GAUC per task (per user). On the simulator, the truth metrics of
  :mod:`mtrank.metrics.evaluate` (``auc_cvr_clicked_all``, ``auc_cvr_do_all``, ``bias_cvr_*``)
  and, with ``fuse_k``, exact expected GMV@K after tuning a score fusion. Plain multi-task data:
  AUC, logloss per task.
* **Repeats and pairing**: N training seeds (``seed``, ``seed + 1`` …) on each of
  ``sim_seeds`` simulated malls; every model is compared with ``reference`` (BASE) run by run on
  the same test rows (:func:`paired_differences`): mean ± std of the differences, the count of
  runs each way, and standard errors. A warning is recorded when the test split holds fewer than
  1,000 conversions.
* **Gated models** (MMoE, PLE): per task, the mean gate weight per expert and the mean per-row
  gate entropy (nats) on test rows, and the expert divergence: 1 − mean pairwise cosine
  similarity of the (first level's) expert outputs, at initialisation and after training.

Nothing in the returned dict depends on wall time, so a fixed seed reproduces it exactly (with
the same torch thread count); timings are returned separately.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mtrank.data.batch import EncodedData
from mtrank.data.datasets import DATASETS
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.schema import Schema
from mtrank.data.simulate import SimConfig, preset_config
from mtrank.data.split import SplitConfig, split_data
from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss
from mtrank.metrics.core import auc, gauc, hanley_mcneil_se, logloss
from mtrank.metrics.evaluate import TRUTH_METRICS, evaluate_outputs
from mtrank.metrics.summary import fmt as _fmt
from mtrank.metrics.summary import metric_names, summarise
from mtrank.models import (
    ENTIRE_SPACE_MODELS,
    MODELS,
    PLAIN_TASK_MODELS,
    THREE_STAGE_MODELS,
    build_model,
)
from mtrank.models.base import SingleTaskNet
from mtrank.models.baselines import PROPENSITY_COLUMN
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.models.layers import funnel_outputs
from mtrank.ranking.replay import ReplayData, dense_groups, replay_metrics
from mtrank.ranking.tune import TuneConfig, tune
from mtrank.train.device import module_device
from mtrank.train.trainer import TrainConfig, Trainer, predict
from mtrank.workflow import feature_spec, fit_encoded, load_data, simulated_data, training_views

GATE_SAMPLE_ROWS = 20_000


class BenchmarkConfig(BaseModel):
    """Settings of one benchmark run (shared by all models).

    Attributes:
        dataset: built-in dataset name. models: registry names. repeats: training seeds.
        epochs, batch_size (None = the dataset's default), lr, patience: the training budget.
        select: the model-selection rule, the same for every model: a validation metric that is
            maximised (default ``auc_ctcvr``) or ``loss`` (each model's own validation loss).
        embedding_dim, tower: the paper's 18 and 360 × 200 × 80 by default.
        options: per-model knobs, ``{model: {key: value}}``.
        rows: simulated impressions (``simulated`` only). preset, sim: the simulator's preset
            and knob overrides (:func:`mtrank.data.simulate.preset_config`). sim_seeds,
            first_sim_seed: simulator seeds first … first + sim_seeds − 1 (each a new mall and
            log; ``simulated`` only; :func:`merge_results` joins runs over disjoint seeds).
        seed: first training seed; the split's seed. test_fraction, val_fraction: see the module
            docstring. threads: torch threads (0 = leave as is). device, precision: see
            :class:`~mtrank.train.trainer.TrainConfig`.
        reference: the model every other is compared with, paired on the same test rows
            (None = no paired table; the default ``base`` pairs only when BASE is benchmarked).
            shared_ctr: train the paper's shared CTR network (§3.2).
        fuse_k: with the simulator, tune a multiplicative fusion per model on the test requests
            (grid of ``fuse_grid`` points per parameter on half of up to ``fuse_requests``
            requests) and report exact expected GMV@K on the other half (None = off).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str
    models: list[str]
    repeats: int = Field(2, ge=1)
    epochs: int = Field(3, ge=1)
    batch_size: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    patience: int = Field(1, ge=0)
    select: str = "auc_ctcvr"
    embedding_dim: int = Field(18, gt=0)
    tower: list[int] = Field(default_factory=lambda: [360, 200, 80])
    options: dict[str, dict[str, float | int | str | list[int]]] = Field(default_factory=dict)
    rows: int = Field(200_000, ge=100)
    preset: str = "default"
    sim: dict[str, float | int | None] = Field(default_factory=dict)
    sim_seeds: int = Field(1, ge=1)
    first_sim_seed: int = Field(0, ge=0)
    seed: int = 0
    test_fraction: float = Field(0.5, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    threads: int = Field(0, ge=0)
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    reference: str | None = "base"
    shared_ctr: bool = True
    fuse_k: int | None = Field(None, ge=1)
    fuse_grid: int = Field(4, ge=2)
    fuse_requests: int = Field(10_000, ge=10)


class SharedCTR(nn.Module):
    """The benchmark's shared, independently trained CTR network (embedding + MLP, like BASE's
    CTR half). Its CVR outputs are a constant 0.5 placeholder, never used."""

    tasks = [TaskLoss("ctr", label="click", outputs=("logit_ctr",))]

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = SingleTaskNet(spec, cfg)

    def head_outputs(self) -> dict[str, nn.Linear]:
        """The CTR output layer, so the prior output bias starts it as BASE's CTR network."""
        return {"ctr": self.net.tower.output_layer}

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Logits of the CTR network ``[B]``; its CVR outputs are the 0.5 placeholder."""
        logit = self.net(categorical, numerical)
        return funnel_outputs(logit, torch.zeros_like(logit))


def check_models(names: list[str], schema: Schema) -> None:
    """Raise ConfigError for an unknown model, or a funnel-only model on plain multi-task data."""
    if not names:
        raise ConfigError("--models is empty; give comma-separated model names")
    for name in names:
        if name not in MODELS:
            raise ConfigError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        if name in THREE_STAGE_MODELS and len(schema.stage_names) != 3:
            raise ConfigError(
                f"model {name!r} needs a three-stage funnel (click → cart → buy); "
                f"{schema.name!r} has stages {schema.stage_names or ['click', 'conversion']} "
                "(benchmarks/funnel3.py runs it on the simulator's three-stage log)"
            )
        if not schema.is_funnel and name not in PLAIN_TASK_MODELS:
            raise ConfigError(
                f"model {name!r} needs a click → conversion funnel; on {schema.name!r} (plain "
                "tasks) "
                f"use {sorted(PLAIN_TASK_MODELS)}"
            )


def expert_divergence(experts: torch.Tensor) -> dict[str, object]:
    """How different the experts are on the same rows.

    Args:
        experts: ``[B, E, d]`` expert outputs.

    Returns:
        ``divergence`` = 1 − mean over rows and expert pairs (e ≠ e') of the cosine similarity of
        their outputs (0 = identical experts), and the ``[E, E]`` mean cosine matrix as lists.
    """
    z = torch.nn.functional.normalize(experts.double(), dim=-1)
    cos = torch.einsum("bed,bfd->ef", z, z) / experts.shape[0]  # [E, E]
    e = cos.shape[0]
    off = (cos.sum() - cos.diagonal().sum()) / max(e * (e - 1), 1)
    return {
        "divergence": round(float(1.0 - off), 6),
        "cosine": [[round(float(v), 4) for v in row] for row in cos],
    }


@torch.no_grad()
def gate_report(model: nn.Module, data: EncodedData) -> dict[str, object] | None:
    """Gate statistics of a gated model on up to 20k rows of ``data`` (None for other models):
    per task ``mean`` weight per expert ``[E]``, mean per-row ``entropy`` (nats; ln E = uniform),
    and :func:`expert_divergence`."""
    if not (
        hasattr(model, "gate_weights") and hasattr(getattr(model, "body", None), "gate_weights")
    ):
        return None
    model.eval()
    n = min(len(data), GATE_SAMPLE_ROWS)
    dev = module_device(model)
    cat, num = data.categorical[:n].to(dev), data.numerical[:n].to(dev)
    tasks = {}
    for task, w in model.gate_weights(cat, num).items():
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1)
        tasks[task] = {
            "mean": [round(float(v), 6) for v in w.mean(0)],
            "entropy": round(float(ent.mean()), 6),
            "max_entropy": round(math.log(w.shape[1]), 6),
        }
    return {"gates": tasks, "experts": expert_divergence(model.expert_outputs(cat, num))}


def _train(
    model: nn.Module, train: EncodedData, val: EncodedData | None, schema: Schema, tcfg: TrainConfig
) -> int:
    train_v, val_v = training_views(model, train, val, tcfg.seed)
    return Trainer(tcfg, schema, quiet=True).fit(model, train_v, val_v).best_epoch


def _funnel_extras(
    out: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    shared_p_ctr: np.ndarray | None,
    name: str,
    schema: Schema,
    side: dict[str, np.ndarray],
    m: dict,
) -> None:
    """Adds the paper's CTCVR protocol and per-task GAUC to the metrics ``m`` (in place);
    without a shared CTR network (``shared_p_ctr`` None) every model's own pCTCVR counts."""
    y, click, conv = labels["ctcvr"], labels["click"], labels["conversion"]
    m["auc_ctcvr_own"], m["logloss_ctcvr_own"] = m.pop("auc_ctcvr"), m.pop("logloss_ctcvr")
    own = name in ENTIRE_SPACE_MODELS or shared_p_ctr is None
    shared = out["p_ctcvr"] if shared_p_ctr is None else shared_p_ctr * out["p_cvr"]
    if shared_p_ctr is not None:
        m["auc_ctcvr_shared"], m["logloss_ctcvr_shared"] = auc(y, shared), logloss(y, shared)
    m["ctcvr_source"] = "own" if own else "shared_ctr_x_pcvr"
    m["auc_ctcvr"] = m["auc_ctcvr_own"] if own else m["auc_ctcvr_shared"]
    m["logloss_ctcvr"] = m["logloss_ctcvr_own"] if own else m["logloss_ctcvr_shared"]
    for k in [k for k in m if k.startswith("gauc_") and k not in ("gauc_ctr", "gauc_ctcvr")]:
        del m[k]
    if schema.user_id is not None and schema.user_id in side:
        users = side[schema.user_id]
        m["gauc_cvr_masked"] = gauc(conv, out["p_cvr"], users, weight=click).value
        if not own:  # evaluate_outputs scored the model's own pCTCVR
            m["gauc_ctcvr"] = gauc(y, shared, users).value


def check_config(cfg: BenchmarkConfig) -> Schema:
    """The dataset's schema, after checking that ``cfg`` fits it.

    Raises:
        ConfigError: unknown dataset or model, a funnel-only model on plain data, simulator
            settings or a truth metric (``--select``) on data without ground truth, a bad
            simulator knob, a reference model that is not benchmarked (each names the option).
    """
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; built-in datasets: {sorted(DATASETS)}")
    schema = DATASETS[cfg.dataset].schema
    check_models(cfg.models, schema)
    simulated = cfg.dataset == "simulated"
    if not simulated and (cfg.preset != "default" or cfg.sim or cfg.sim_seeds > 1):
        raise ConfigError(
            "--preset, --sim-seeds and simulator knobs apply to --dataset simulated only, not "
            f"{cfg.dataset!r}"
        )
    if not simulated and cfg.select in TRUTH_METRICS:
        raise ConfigError(
            f"--select {cfg.select}: truth metrics exist only on the simulator "
            f"(true_cvr_clicked / true_cvr_do); {cfg.dataset!r} has no ground truth"
        )
    if not simulated and cfg.fuse_k is not None:
        raise ConfigError(f"--fuse-k needs the simulator's exact truth; {cfg.dataset!r} has none")
    if cfg.reference is not None and cfg.reference not in cfg.models and cfg.reference != "base":
        raise ConfigError(f"--reference {cfg.reference!r} is not among --models {cfg.models}")
    if simulated:
        sim_config(cfg, 0)  # range-checks the knobs
    return schema


def sim_config(cfg: BenchmarkConfig, sim_seed: int) -> SimConfig:
    """The simulator settings of simulator seed ``sim_seed``."""
    return preset_config(
        cfg.preset,
        **{
            **cfg.sim,
            "rows": cfg.rows,
            "seed": sim_seed,
            "history_len": cfg.sim.get("history_len", 0),
        },
    )


def run_benchmark(
    cfg: BenchmarkConfig,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    partial: Callable[[dict], None] | None = None,
) -> tuple[dict, dict]:
    """Train and evaluate every model of ``cfg`` on one split per simulator seed, ``cfg.repeats``
    training seeds each; compare every model with ``cfg.reference`` paired on the same rows.

    Every model is trained by :func:`mtrank.workflow.fit_encoded` (the function ``mtrank
    train`` uses), with the same epochs, batch size, learning rate and selection rule
    (``cfg.select``, early stopping on the validation split).

    Args:
        cfg: :class:`BenchmarkConfig`. data_dir: the built-in datasets' folder (unused for
            ``simulated``, which is generated in memory). log: progress callback. partial:
            called with the results so far after every training seed (to save them).

    Returns:
        (results, timings): ``results`` holds the config, split sizes, per-run metrics per model
        (``per_repeat``; each run tagged with its ``sim_seed`` and ``seed``), ``summary``
        {model: {metric: {mean, std, n}}}, ``paired`` (:func:`paired_differences`), warnings,
        the shared CTR model's metrics and gate reports; ``timings`` the seconds per fit.

    Raises:
        ConfigError: see :func:`check_config`; DatasetNotFoundError: the files are absent.
    """
    log = log or (lambda _msg: None)
    schema = check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    per_repeat: dict[str, list[dict]] = {m: [] for m in cfg.models}
    gates: dict[str, list[dict]] = {}
    shared_ctr: list[dict] = []
    timings: dict[str, list[float]] = {}
    splits_info: list[dict] = []
    warnings: list[str] = []
    sources: dict = {}
    batch_size = cfg.batch_size or DATASETS[cfg.dataset].batch_size
    n_sims = cfg.sim_seeds if cfg.dataset == "simulated" else 1
    seeds = (
        range(cfg.first_sim_seed, cfg.first_sim_seed + n_sims)
        if cfg.dataset == "simulated"
        else range(1)
    )
    for sim_seed in seeds:
        if cfg.dataset == "simulated":
            sim = sim_config(cfg, sim_seed)
            start = time.perf_counter()
            loaded = simulated_data(sim)
            timings.setdefault("simulate", []).append(round(time.perf_counter() - start, 2))
        else:
            loaded = load_data(cfg.dataset, data_dir=data_dir)
        sources[str(sim_seed)] = loaded.sources
        splits = split_data(
            loaded,
            SplitConfig(
                test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed
            ),
        )
        encoder = FeatureEncoder.fit(splits["train"], schema)
        enc = {k: EncodedData.from_frame(v, schema, encoder) for k, v in splits.items() if v.height}
        train, val, test = enc["train"], enc.get("val"), enc["test"]
        spec = feature_spec(encoder, schema)
        test_labels = {k: v.numpy() for k, v in test.labels.items()}
        info = {"sim_seed": sim_seed, **_split_info(splits, schema, loaded, test_labels, train)}
        splits_info.append(info)
        if schema.is_funnel and info["conversions_test"] < 1000:
            warnings.append(
                f"simulator seed {sim_seed}: the test split has {info['conversions_test']} "
                "conversions (< 1,000): "
                "AUC differences below ~0.02 are within noise"
            )
            log("warning: " + warnings[-1])
        replay = _replay_data(splits["test"], cfg) if cfg.fuse_k is not None else None
        for r in range(cfg.repeats):
            seed = cfg.seed + r
            tcfg = TrainConfig(
                epochs=cfg.epochs,
                batch_size=batch_size,
                lr=cfg.lr,
                patience=cfg.patience,
                seed=seed,
                monitor=cfg.select,
                device=cfg.device,
                precision=cfg.precision,
            )
            train_r, shared_p = train, None
            if schema.is_funnel and cfg.shared_ctr:
                torch.manual_seed(seed)
                ctr_model = SharedCTR(
                    spec, ModelConfig(name="base", embedding_dim=cfg.embedding_dim, tower=cfg.tower)
                )
                start = time.perf_counter()
                best = _train(
                    ctr_model,
                    train,
                    val,
                    schema,
                    tcfg.model_copy(
                        update={"monitor": "auc_ctr" if cfg.select != "loss" else "loss"}
                    ),
                )
                timings.setdefault("shared_ctr", []).append(round(time.perf_counter() - start, 2))
                shared_p = predict(ctr_model, test)["p_ctr"]
                shared_ctr.append(
                    {
                        "sim_seed": sim_seed,
                        "seed": seed,
                        "auc_ctr": auc(test_labels["click"], shared_p),
                        "logloss_ctr": logloss(test_labels["click"], shared_p),
                        "best_epoch": best,
                    }
                )
                train_r = EncodedData(
                    train.categorical,
                    train.numerical,
                    train.labels,
                    train.weight,
                    {**train.side, PROPENSITY_COLUMN: predict(ctr_model, train)["p_ctr"]},
                    extra=train.extra,
                )
                log(f"sim {sim_seed} seed {seed}: shared CTR auc {shared_ctr[-1]['auc_ctr']:.4f}")
            for name in cfg.models:
                mcfg = ModelConfig(
                    name=name,
                    embedding_dim=cfg.embedding_dim,
                    tower=cfg.tower,
                    options=cfg.options.get(name, {}),
                )
                init_div = _init_divergence(spec, mcfg, test, seed)
                fitted = fit_encoded(
                    {"train": train_r, **({"val": val} if val is not None else {})},
                    encoder,
                    schema,
                    mcfg,
                    tcfg,
                    quiet=True,
                    evaluate=(),
                )
                model = fitted.bundle.model
                timings.setdefault(name, []).append(round(fitted.seconds, 2))
                out = predict(model, test)
                m = evaluate_outputs(out, test_labels, schema, test.side)
                if schema.is_funnel:
                    _funnel_extras(out, test_labels, shared_p, name, schema, test.side, m)
                if replay is not None:
                    m.update(_fusion_metrics(replay, out, cfg, sim_seed))
                m["best_epoch"] = fitted.result.best_epoch
                m["sim_seed"], m["seed"] = sim_seed, seed
                per_repeat[name].append(m)
                rep = gate_report(model, test)
                if rep is not None:
                    rep["experts"]["divergence_at_init"] = init_div
                    gates.setdefault(name, []).append(rep)
                key = "auc_ctcvr" if schema.is_funnel else f"auc_{spec.task_names[0]}"
                log(
                    f"sim {sim_seed} seed {seed}: {name} {key} {_fmt(m.get(key))} best epoch "
                    f"{m['best_epoch']} ({timings[name][-1]:.0f}s)"
                )
            if partial is not None:
                partial(
                    _results(
                        cfg,
                        seeds,
                        sources,
                        splits_info,
                        schema,
                        warnings,
                        shared_ctr,
                        per_repeat,
                        gates,
                    )
                )
    return _results(
        cfg, seeds, sources, splits_info, schema, warnings, shared_ctr, per_repeat, gates
    ), timings


def _results(
    cfg, seeds, sources, splits_info, schema, warnings, shared_ctr, per_repeat, gates
) -> dict:
    n_sims = len(seeds)
    first = splits_info[0]
    return {
        "benchmark": cfg.model_dump(mode="json"),
        "dataset": cfg.dataset,
        "sources": sources if n_sims > 1 else next(iter(sources.values())),
        "simulator": [sim_config(cfg, s).model_dump(mode="json") for s in seeds]
        if cfg.dataset == "simulated"
        else None,
        "split": {**first, "per_sim_seed": splits_info},
        "protocol": {
            "entire_space_models": sorted(ENTIRE_SPACE_MODELS & set(cfg.models)),
            "auc_ctcvr": (
                "own pCTCVR for entire-space models; shared independently trained pCTR × model "
                "pCVR otherwise (ESMM paper §3.2)"
                if cfg.shared_ctr
                else "every model's own pCTCVR (no shared CTR network)"
            ),
            "select": cfg.select,
            "reference": cfg.reference if cfg.reference in cfg.models else None,
        },
        "warnings": warnings,
        "shared_ctr": shared_ctr,
        "per_repeat": per_repeat,
        "summary": {m: summarise(runs) for m, runs in per_repeat.items()},
        "paired": paired_differences(per_repeat, cfg.reference)
        if cfg.reference in per_repeat and all(per_repeat.values())
        else {},
        "gates": gates,
    }


def merge_results(parts: list[dict]) -> dict:
    """One result from :func:`run_benchmark` results over disjoint (simulator seed, training
    seed) runs of the same config otherwise, e.g. one process per simulator seed, or a second
    process for the later training seeds, or a later run of more models on the same seeds
    (paired against the earlier runs of the reference): runs, splits and warnings joined (a run
    present twice is kept once); summary and paired differences recomputed over all runs.

    Raises:
        ConfigError: the parts differ in anything but their seeds and models, or two parts
            split a simulator seed differently (then their runs are not on the same test rows).
    """
    seeds_only = ("first_sim_seed", "sim_seeds", "seed", "repeats", "models", "options")

    def strip(b: dict) -> dict:
        # through BenchmarkConfig, so a setting added since an older part was run (absent there)
        # compares as its default
        full = BenchmarkConfig.model_validate(b).model_dump(mode="json")
        return {k: v for k, v in full.items() if k not in seeds_only}

    if any(strip(p["benchmark"]) != strip(parts[0]["benchmark"]) for p in parts):
        raise ConfigError(
            "benchmark results to merge must share every setting but their seeds and models"
        )
    _check_same_splits(parts)
    models = list(dict.fromkeys(m for p in parts for m in p["per_repeat"]))
    runs: dict[str, dict[tuple[int, int], dict]] = {m: {} for m in models}
    for p in parts:
        for m, rs in p["per_repeat"].items():
            for r in rs:
                runs[m].setdefault((r["sim_seed"], r["seed"]), r)
    per_repeat = {m: [rs[k] for k in sorted(rs)] for m, rs in runs.items()}
    splits = {}
    for p in parts:
        for s_ in p["split"]["per_sim_seed"]:
            splits.setdefault(s_.get("sim_seed", 0), s_)
    sims = {}
    for p in parts:
        for s_ in p["simulator"] or []:
            sims.setdefault(s_["seed"], s_)
    keys = sorted({k for rs in runs.values() for k in rs})
    train_seeds = sorted({k[1] for k in keys})
    out = dict(parts[0])
    out["benchmark"] = {
        **parts[0]["benchmark"],
        "models": models,
        "options": {k: v for p in parts for k, v in p["benchmark"].get("options", {}).items()},
        "sim_seeds": len(splits),
        "first_sim_seed": min(splits),
        "seed": train_seeds[0],
        "repeats": len(train_seeds),
    }
    out["simulator"] = [sims[k] for k in sorted(sims)] or None
    out["sources"] = [p["sources"] for p in parts]
    out["split"] = {**splits[min(splits)], "per_sim_seed": [splits[k] for k in sorted(splits)]}
    out["warnings"] = list(dict.fromkeys(w for p in parts for w in p["warnings"]))
    out["shared_ctr"] = [r for p in parts for r in p["shared_ctr"]]
    out["per_repeat"] = per_repeat
    out["summary"] = {m: summarise(rs) for m, rs in per_repeat.items()}
    ref = parts[0]["protocol"]["reference"]
    out["paired"] = paired_differences(per_repeat, ref) if ref in per_repeat else {}
    out["protocol"] = {
        **parts[0]["protocol"],
        "entire_space_models": sorted(
            {m for p in parts for m in p["protocol"]["entire_space_models"]}
        ),
    }
    gated = dict.fromkeys(m for p in parts for m in p["gates"])
    out["gates"] = {m: [g for p in parts for g in p["gates"].get(m, [])] for m in gated}
    return out


def _check_same_splits(parts: list[dict]) -> None:
    """Raise ConfigError when two parts report different split sizes or label counts for the
    same simulator seed (so their runs would not be paired on the same test rows)."""
    seen: dict[int, dict] = {}
    for p in parts:
        for s_ in p["split"]["per_sim_seed"]:
            key = s_.get("sim_seed", 0)
            first = seen.setdefault(key, s_)
            diff = sorted(k for k in first.keys() & s_.keys() if first[k] != s_[k])
            if diff:
                raise ConfigError(
                    f"benchmark results to merge split simulator seed {key} differently "
                    f"({', '.join(diff)}): the runs are not on the same test rows"
                )


def _split_info(
    splits, schema: Schema, loaded, test_labels: dict[str, np.ndarray], train: EncodedData
) -> dict:
    info = {
        "by_time": schema.time is not None and "train" not in loaded.splits,
        "rows": {k: v.height for k, v in splits.items()},
        "clicks_test": int(test_labels["click"].sum()) if schema.is_funnel else None,
        "conversions_test": int(test_labels["ctcvr"].sum()) if schema.is_funnel else None,
    }
    if schema.is_funnel:
        info["conversions_train"] = int(train.labels["ctcvr"].sum())
        if schema.item_id is not None:
            info["items"] = int(splits["train"].get_column(schema.item_id).n_unique())
    if "true_cvr_clicked" in splits["test"].columns:
        from scipy.stats import spearmanr

        t = splits["test"]
        info["spearman_cvr_clicked_do"] = float(
            spearmanr(t["true_cvr_clicked"].to_numpy(), t["true_cvr_do"].to_numpy()).statistic
        )
    return info


def _init_divergence(
    spec: FeatureSpec, mcfg: ModelConfig, test: EncodedData, seed: int
) -> float | None:
    """Expert divergence of a gated model at initialisation (the same init ``fit_encoded``
    makes)."""
    torch.manual_seed(seed)
    model = build_model(spec, mcfg)
    if not hasattr(getattr(model, "body", None), "expert_outputs"):
        return None
    with torch.no_grad():
        n = min(len(test), GATE_SAMPLE_ROWS)
        return expert_divergence(model.expert_outputs(test.categorical[:n], test.numerical[:n]))[
            "divergence"
        ]


def _replay_data(test, cfg: BenchmarkConfig) -> dict:
    """The test requests used for fusion tuning (up to ``fuse_requests``, whole requests)."""
    req = test.get_column("request_id").to_numpy()
    keep = dense_groups(req) < cfg.fuse_requests
    t = test.filter(pl.Series(keep))
    return {"keep": keep, "frame": t}


def _fusion_metrics(
    replay: dict, out: dict[str, np.ndarray], cfg: BenchmarkConfig, sim_seed: int
) -> dict[str, float]:
    """Exact expected GMV@K on held-out requests after tuning a multiplicative fusion
    pCTR^α·pCVR^β·price^γ on the others (:func:`mtrank.ranking.tune.tune`, objective
    ``exp_gmv``: Σ_topK true_ctr · true_cvr_clicked · price = Σ_topK p(click ∧ conv | x)·price)."""
    t, keep, k = replay["frame"], replay["keep"], cfg.fuse_k
    col = lambda c: t.get_column(c).to_numpy()
    data = ReplayData(
        col("request_id"),
        col("click"),
        col("conversion"),
        col("price"),
        col("price"),
        out["p_ctr"][keep],
        out["p_cvr"][keep],
        true_ctr=col("true_ctr"),
        true_cvr=col("true_cvr_clicked"),
    )
    res = tune(
        data,
        TuneConfig(
            formula="multiplicative",
            method="grid",
            grid_points=cfg.fuse_grid,
            k=k,
            objective="exp_gmv",
            click_floor=None,
            seed=sim_seed,
        ),
    )
    held = res.heldout
    oracle = replay_metrics(res.held, res.held.true_ctr * res.held.true_cvr * res.held.price, k)
    return {
        f"exp_gmv_fused@{k}": held["fused"][f"exp_gmv@{k}"],
        f"exp_gmv_pctcvr@{k}": held["pctcvr"][f"exp_gmv@{k}"],
        f"exp_gmv_oracle@{k}": oracle[f"exp_gmv@{k}"],
        "fusion_params": res.best.params if hasattr(res.best, "params") else None,
    }


# Metrics compared pairwise with the reference (larger is better for all but the biases).
PAIRED_METRICS = [
    "auc_ctcvr",
    "auc_cvr_masked",
    "auc_ctr",
    "auc_cvr_clicked_all",
    "auc_cvr_do_all",
    "bias_cvr_clicked_all",
    "bias_cvr_do_all",
]


def paired_differences(
    per_repeat: dict[str, list[dict]], reference: str, metrics: list[str] | None = None
) -> dict[str, dict[str, dict]]:
    """Model − reference on the same test rows, run by run (same simulator seed, same training
    seed), for ``metrics`` (default :data:`PAIRED_METRICS`), ``exp_gmv_fused@K`` and
    ``exp_gmv_pctcvr@K`` (relative, in %; the latter ranks by the model's pCTCVR alone, no
    tuning). A metric that a run or its reference run lacks is skipped for that run.

    Returns:
        ``{model: {metric: {mean, std, n, better, worse, se_seeds, se_hanley_mcneil}}}``:
        ``better`` / ``worse`` count runs where the model is above / below the reference (for
        a bias: closer to / farther from 0); ``se_seeds`` = std / √n; ``se_hanley_mcneil``
        (label AUCs only) = mean over runs of √(SE_model² + SE_ref²), each by Hanley & McNeil
        (1982) from the test split's positives and negatives (conservative: it ignores the
        positive correlation of paired AUCs).
    """
    ref_runs = {(r["sim_seed"], r["seed"]): r for r in per_repeat[reference]}
    out: dict[str, dict[str, dict]] = {}
    for name, runs in per_repeat.items():
        if name == reference:
            continue
        keys = list(PAIRED_METRICS if metrics is None else metrics) + [
            k for k in runs[0] if k.startswith(("exp_gmv_fused@", "exp_gmv_pctcvr@"))
        ]
        res: dict[str, dict] = {}
        for key in keys:
            diffs, ses = [], []
            for r in runs:
                ref = ref_runs.get((r["sim_seed"], r["seed"]))
                a, b = r.get(key), None if ref is None else ref.get(key)
                if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                    continue
                if key.startswith("bias_"):
                    diffs.append(abs(b) - abs(a))  # > 0: the model is less biased
                elif key.startswith("exp_gmv"):
                    diffs.append(100.0 * (a / b - 1.0) if b else float("nan"))
                else:
                    diffs.append(a - b)
                se = _label_auc_se(key, a, b, r)
                if se is not None:
                    ses.append(se)
            if not diffs:
                continue
            n = len(diffs)
            std = statistics.stdev(diffs) if n > 1 else 0.0
            res[key] = {
                "mean": statistics.fmean(diffs),
                "std": std,
                "n": n,
                "better": sum(d > 0 for d in diffs),
                "worse": sum(d < 0 for d in diffs),
                "se_seeds": std / math.sqrt(n) if n > 1 else None,
                "se_hanley_mcneil": statistics.fmean(ses) if ses else None,
                "kind": "relative %"
                if key.startswith("exp_gmv")
                else ("|bias| reduction" if key.startswith("bias_") else "difference"),
            }
        out[name] = res
    return out


def _label_auc_se(key: str, a: float, b: float, run: dict) -> float | None:
    """√(SE_a² + SE_b²) by Hanley–McNeil for AUCs against labels (None for other metrics)."""
    counts = {
        "auc_ctcvr": (run.get("n_conversions"), run.get("n_impressions")),
        "auc_ctr": (run.get("n_clicks"), run.get("n_impressions")),
        "auc_cvr_masked": (run.get("n_conversions"), run.get("n_clicks")),
    }.get(key)
    if counts is None or None in counts:
        return None
    pos, total = counts
    neg = total - pos
    return math.sqrt(hanley_mcneil_se(a, pos, neg) ** 2 + hanley_mcneil_se(b, pos, neg) ** 2)


FUNNEL_COLUMNS = metric_names("benchmark")


def paired_table(results: dict) -> str:
    """The paired differences against the reference as markdown (one row per model × metric)."""
    paired = results.get("paired") or {}
    if not paired:
        return ""
    ref = results["protocol"]["reference"]
    lines = [
        f"| model − {ref} | metric | mean Δ ± std | better / worse runs | SE (seeds) | SE "
        "(Hanley–McNeil) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, metrics in paired.items():
        for key, d in metrics.items():
            unit = " %" if d["kind"] == "relative %" else ""
            digits = 2 if unit else 4
            lines.append(
                f"| {name} | "
                f"{key}{' (|bias| reduction)' if d['kind'].startswith('|bias|') else ''} | "
                f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f}{unit} | "
                f"{d['better']} / {d['worse']} of {d['n']} | "
                f"{_fmt(d['se_seeds'], digits=digits)} | "
                f"{_fmt(d['se_hanley_mcneil'], digits=digits)} |"
            )
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """The summary as a markdown table (mean ± std over repeats), one row per model."""
    summary = results["summary"]
    if results["split"]["clicks_test"] is not None:
        cols = [c for c in FUNNEL_COLUMNS if any(c in s for s in summary.values())]
    else:
        tasks = list(DATASETS[results["dataset"]].schema.tasks)
        cols = [f"{p}_{t}" for t in tasks for p in ("auc", "logloss")]
    repeats = len(next(iter(results["per_repeat"].values()), []))
    lines = [
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, s in summary.items():
        cells = [
            _fmt(s[c]["mean"], s[c]["std"] if repeats > 1 else None) if c in s else "n/a"
            for c in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_table(results: dict) -> str:
    """Gate entropy and expert divergence of the gated models (first repeat), as markdown."""
    if not results["gates"]:
        return ""
    lines = [
        "| model | task | mean gate weight per expert | gate entropy (max) | expert divergence "
        "init → trained |",
        "|---|---|---|---:|---:|",
    ]
    for name, reps in results["gates"].items():
        rep = reps[0]
        div = rep["experts"]
        for task, g in rep["gates"].items():
            lines.append(
                f"| {name} | {task} | {', '.join(f'{v:.2f}' for v in g['mean'])} | "
                f"{g['entropy']:.3f} ({g['max_entropy']:.3f}) | "
                f"{_fmt(div.get('divergence_at_init'), digits=3)} → {div['divergence']:.3f} |"
            )
    return "\n".join(lines)


def report_markdown(results: dict, command: str) -> str:
    """The run's markdown report: command, settings, split, warnings, the metric table, the
    paired differences against the reference and the gate table."""
    b = results["benchmark"]
    split = results["split"]
    per_sim = split.get("per_sim_seed", [split])
    sims = results.get("simulator")
    sel = results["protocol"].get("select", "loss")
    parts = [
        f"# Benchmark: {results['dataset']}"
        + (f" (preset {b.get('preset', 'default')})" if results["dataset"] == "simulated" else ""),
        "",
        "Command:",
        "",
        f"```\n{command}\n```",
        "",
        f"Settings: {b['repeats']} training seed(s) ({b['seed']}..{b['seed'] + b['repeats'] - 1})"
        + (
            f" × {b.get('sim_seeds', 1)} simulator seed(s)"
            if results["dataset"] == "simulated"
            else ""
        )
        + f", at most {b['epochs']} epoch(s) with early stopping (patience {b['patience']}); "
        "the same selection rule for every model: "
        + ("each model's own validation loss" if sel == "loss" else f"best validation `{sel}`")
        + f"; batch {b['batch_size'] or DATASETS[results['dataset']].batch_size}, Adam lr "
        f"{b['lr']}, "
        f"embedding {b['embedding_dim']}, MLP {'×'.join(map(str, b['tower']))}"
        + (
            f", {b['rows']:,} simulated impressions per simulator seed"
            if results["dataset"] == "simulated"
            else ""
        )
        + ".",
    ]
    if sims:
        knobs = {k: v for k, v in sims[0].items() if k not in ("seed", "rows", "preset")}
        parts.append("Simulator: " + ", ".join(f"{k}={v}" for k, v in knobs.items()) + ".")
    for i, sp in enumerate(per_sim):
        parts.append(
            (f"Simulator seed {sp.get('sim_seed', i)}: " if len(per_sim) > 1 else "")
            + f"split ({'by time' if sp['by_time'] else 'fixed seeded split'}): "
            + ", ".join(f"{k} {v:,}" for k, v in sp["rows"].items())
            + (
                f"; test clicks {sp['clicks_test']:,}, test conversions {sp['conversions_test']:,}"
                if sp.get("clicks_test") is not None
                else ""
            )
            + (
                f"; training conversions {sp['conversions_train']:,}"
                if sp.get("conversions_train") is not None
                else ""
            )
            + (f" over {sp['items']:,} items seen in training" if sp.get("items") else "")
            + (
                "; Spearman(true_cvr_clicked, true_cvr_do) on test "
                f"{sp['spearman_cvr_clicked_do']:.3f}"
                if sp.get("spearman_cvr_clicked_do") is not None
                else ""
            )
            + "."
        )
    for w in results.get("warnings", []):
        parts.append(f"**Warning:** {w}.")
    parts += [
        "",
        "Test metrics"
        + (
            " (mean ± std over runs)"
            if len(next(iter(results["per_repeat"].values()), [])) > 1
            else ""
        )
        + "."
        + (
            " `auc_ctcvr`: own pCTCVR for entire-space models ("
            + ", ".join(results["protocol"]["entire_space_models"])
            + "), shared pCTR × model pCVR for the others (`auc_ctcvr_own`: every model's own "
            "pCTCVR)."
            if split["clicks_test"] is not None and b.get("shared_ctr", True)
            else ""
        ),
        "",
        markdown_table(results),
    ]
    pt = paired_table(results)
    if pt:
        parts += [
            "",
            f"Paired differences against `{results['protocol']['reference']}` (same test rows, "
            "run by run):",
            "",
            pt,
        ]
    if results["shared_ctr"]:
        aucs = [r["auc_ctr"] for r in results["shared_ctr"]]
        parts += [
            "",
            f"Shared CTR network: auc_ctr {statistics.fmean(aucs):.4f}"
            + (f" ± {statistics.stdev(aucs):.4f}" if len(aucs) > 1 else "")
            + ".",
        ]
    gt = gate_table(results)
    if gt:
        parts += ["", "Gates (first repeat, test rows):", "", gt]
    return "\n".join(parts) + "\n"


def log_to_stderr(msg: str) -> None:
    """Print one progress line to stderr (flushed at once)."""
    print(msg, file=sys.stderr, flush=True)
