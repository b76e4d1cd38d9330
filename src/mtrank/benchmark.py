"""The model zoo side by side, with the ESMM paper's evaluation protocol (Ma et al. 2018, §3.2).

Protocol (one function, :func:`run_benchmark`; the CLI is ``mtrank benchmark``):

* **Split**: by time when the schema has a time column (first half of the impressions trains,
  second half tests), else one fixed seeded random half/half split; validation (early stopping)
  comes from the train half: by time its latest ``val_fraction`` (10 %), at random a seeded
  ``val_fraction`` of all rows (:func:`mtrank.data.split.split_data`). A dataset that ships its
  own train/test files keeps them. The same split serves every model and repeat.
* **Budget**: every model gets the same embedding size, MLP sizes (paper: 18 and 360 × 200 × 80;
  gated and shared-bottom bodies take the first layer, their towers the rest), Adam with the
  same learning rate and batch size, and the same maximum epochs with early stopping on the
  validation loss. Each model's own knobs live in ``options[model]``.
* **Metrics on test**: ``auc_ctr``; ``auc_cvr_masked`` (pCVR over clicked impressions only);
  ``auc_ctcvr`` as in the paper: for models trained over the entire space
  (:data:`mtrank.models.ENTIRE_SPACE_MODELS`) their own pCTCVR, for the others pCTCVR = pCTR of
  **one shared, independently trained CTR network** × the model's pCVR; ``auc_ctcvr_own`` and
  ``auc_ctcvr_shared`` give both for every model. Logloss per task, GAUC per task (per user, when
  the schema has a user id), and on the simulator the entire-space pCVR quality against the true
  CVR (``auc_cvr_entire_truth``, ``cvr_bias_entire``). Plain multi-task data: AUC, logloss per task.
* **Repeats**: N training seeds (``seed``, ``seed + 1`` …); mean ± sample std over repeats.
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

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mtrank.data.batch import EncodedData
from mtrank.data.datasets import DATASETS
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.schema import Schema
from mtrank.data.simulate import SimConfig
from mtrank.data.split import SplitConfig, split_data
from mtrank.errors import ConfigError
from mtrank.losses import TaskLoss
from mtrank.metrics.core import auc, gauc, logloss
from mtrank.metrics.evaluate import evaluate_outputs
from mtrank.metrics.summary import fmt as _fmt
from mtrank.metrics.summary import metric_names, summarise
from mtrank.models import ENTIRE_SPACE_MODELS, MODELS, PLAIN_TASK_MODELS, build_model
from mtrank.models.base import SingleTaskNet
from mtrank.models.baselines import PROPENSITY_COLUMN
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.models.layers import funnel_outputs
from mtrank.train.trainer import TrainConfig, Trainer, predict
from mtrank.workflow import feature_spec, load_data, training_views

GATE_SAMPLE_ROWS = 20_000


class BenchmarkConfig(BaseModel):
    """Settings of one benchmark run (shared by all models).

    Attributes:
        dataset: built-in dataset name. models: registry names. repeats: training seeds.
        epochs, batch_size (None = the dataset's default), lr, patience: the training budget.
        embedding_dim, tower: the paper's 18 and 360 × 200 × 80 by default.
        options: per-model knobs, ``{model: {key: value}}``.
        rows: simulated impressions (``simulated`` only). seed: first training seed; the split's
        seed. test_fraction, val_fraction: see the module docstring. threads: torch threads
        (0 = leave as is).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str
    models: list[str]
    repeats: int = Field(2, ge=1)
    epochs: int = Field(3, ge=1)
    batch_size: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    patience: int = Field(1, ge=0)
    embedding_dim: int = Field(18, gt=0)
    tower: list[int] = Field(default_factory=lambda: [360, 200, 80])
    options: dict[str, dict[str, float | int | str | list[int]]] = Field(default_factory=dict)
    rows: int = Field(200_000, ge=100)
    seed: int = 0
    test_fraction: float = Field(0.5, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    threads: int = Field(0, ge=0)


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

    def forward(self, categorical: torch.Tensor, numerical: torch.Tensor) -> dict[str, torch.Tensor]:
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
        if not schema.is_funnel and name not in PLAIN_TASK_MODELS:
            raise ConfigError(
                f"model {name!r} needs a click → conversion funnel; on {schema.name!r} (plain tasks) "
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
    return {"divergence": round(float(1.0 - off), 6), "cosine": [[round(float(v), 4) for v in row] for row in cos]}


@torch.no_grad()
def gate_report(model: nn.Module, data: EncodedData) -> dict[str, object] | None:
    """Gate statistics of a gated model on up to 20k rows of ``data`` (None for other models):
    per task ``mean`` weight per expert ``[E]``, mean per-row ``entropy`` (nats; ln E = uniform),
    and :func:`expert_divergence`."""
    if not (hasattr(model, "gate_weights") and hasattr(getattr(model, "body", None), "gate_weights")):
        return None
    model.eval()
    n = min(len(data), GATE_SAMPLE_ROWS)
    cat, num = data.categorical[:n], data.numerical[:n]
    tasks = {}
    for task, w in model.gate_weights(cat, num).items():
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1)
        tasks[task] = {
            "mean": [round(float(v), 6) for v in w.mean(0)],
            "entropy": round(float(ent.mean()), 6),
            "max_entropy": round(math.log(w.shape[1]), 6),
        }
    return {"gates": tasks, "experts": expert_divergence(model.expert_outputs(cat, num))}


def _train(model: nn.Module, train: EncodedData, val: EncodedData | None, schema: Schema, tcfg: TrainConfig) -> int:
    train_v, val_v = training_views(model, train, val, tcfg.seed)
    return Trainer(tcfg, schema, quiet=True).fit(model, train_v, val_v).best_epoch


def _funnel_extras(out: dict[str, np.ndarray], labels: dict[str, np.ndarray], shared_p_ctr: np.ndarray, name: str, schema: Schema, side: dict[str, np.ndarray], m: dict) -> None:
    """Adds the paper's CTCVR protocol and per-task GAUC to the metrics ``m`` (in place)."""
    y, click, conv = labels["ctcvr"], labels["click"], labels["conversion"]
    shared = shared_p_ctr * out["p_cvr"]
    m["auc_ctcvr_own"], m["logloss_ctcvr_own"] = m.pop("auc_ctcvr"), m.pop("logloss_ctcvr")
    m["auc_ctcvr_shared"], m["logloss_ctcvr_shared"] = auc(y, shared), logloss(y, shared)
    own = name in ENTIRE_SPACE_MODELS
    m["ctcvr_source"] = "own" if own else "shared_ctr_x_pcvr"
    m["auc_ctcvr"] = m["auc_ctcvr_own"] if own else m["auc_ctcvr_shared"]
    m["logloss_ctcvr"] = m["logloss_ctcvr_own"] if own else m["logloss_ctcvr_shared"]
    for k in [k for k in m if k.startswith("gauc_")]:
        del m[k]
    if schema.user_id is not None and schema.user_id in side:
        users = side[schema.user_id]
        p_ctcvr = out["p_ctcvr"] if own else shared
        m["gauc_ctr"] = gauc(click, out["p_ctr"], users).value
        m["gauc_cvr_masked"] = gauc(conv, out["p_cvr"], users, weight=click).value
        m["gauc_ctcvr"] = gauc(y, p_ctcvr, users).value


def run_benchmark(cfg: BenchmarkConfig, data_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Train and evaluate every model of ``cfg`` on one split, ``cfg.repeats`` times.

    Args:
        cfg: :class:`BenchmarkConfig`. data_dir: the built-in datasets' folder (for ``simulated``,
            where the simulated file is cached). log: progress callback (one line per fit).

    Returns:
        (results, timings): ``results`` holds the config, split sizes, per-repeat metrics per
        model, ``summary`` {model: {metric: {mean, std}}}, the shared CTR model's metrics and
        gate reports; ``timings`` the seconds per fit.

    Raises:
        ConfigError: unknown dataset or model, or a funnel-only model on plain data;
        DatasetNotFoundError: the dataset's files are absent.
    """
    log = log or (lambda _msg: None)
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; built-in datasets: {sorted(DATASETS)}")
    schema = DATASETS[cfg.dataset].schema
    check_models(cfg.models, schema)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_data(cfg.dataset, data_dir=data_dir, sim=SimConfig(rows=cfg.rows, seed=0) if cfg.dataset == "simulated" else None)
    splits = split_data(loaded, SplitConfig(test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed))
    encoder = FeatureEncoder.fit(splits["train"], schema)
    enc = {k: EncodedData.from_frame(v, schema, encoder) for k, v in splits.items() if v.height}
    train, val, test = enc["train"], enc.get("val"), enc["test"]
    spec = feature_spec(encoder, schema)
    test_labels = {k: v.numpy() for k, v in test.labels.items()}
    batch_size = cfg.batch_size or DATASETS[cfg.dataset].batch_size
    per_repeat: dict[str, list[dict]] = {m: [] for m in cfg.models}
    gates: dict[str, list[dict]] = {}
    shared_ctr: list[dict] = []
    timings: dict[str, list[float]] = {}
    for r in range(cfg.repeats):
        seed = cfg.seed + r
        tcfg = TrainConfig(epochs=cfg.epochs, batch_size=batch_size, lr=cfg.lr, patience=cfg.patience, seed=seed)
        train_r = train
        shared_p = None
        if schema.is_funnel:
            torch.manual_seed(seed)
            ctr_model = SharedCTR(spec, ModelConfig(name="base", embedding_dim=cfg.embedding_dim, tower=cfg.tower))
            start = time.perf_counter()
            best = _train(ctr_model, train, val, schema, tcfg)
            timings.setdefault("shared_ctr", []).append(round(time.perf_counter() - start, 2))
            shared_p = predict(ctr_model, test)["p_ctr"]
            shared_ctr.append({"auc_ctr": auc(test_labels["click"], shared_p), "logloss_ctr": logloss(test_labels["click"], shared_p), "best_epoch": best})
            train_r = EncodedData(train.categorical, train.numerical, train.labels, train.weight, {**train.side, PROPENSITY_COLUMN: predict(ctr_model, train)["p_ctr"]})
            log(f"repeat {r} seed {seed}: shared CTR auc {shared_ctr[-1]['auc_ctr']:.4f}")
        for name in cfg.models:
            torch.manual_seed(seed)
            mcfg = ModelConfig(name=name, embedding_dim=cfg.embedding_dim, tower=cfg.tower, options=cfg.options.get(name, {}))
            model = build_model(spec, mcfg)
            init_div = None
            if hasattr(getattr(model, "body", None), "expert_outputs"):
                with torch.no_grad():
                    n = min(len(test), GATE_SAMPLE_ROWS)
                    init_div = expert_divergence(model.expert_outputs(test.categorical[:n], test.numerical[:n]))["divergence"]
            start = time.perf_counter()
            best = _train(model, train_r, val, schema, tcfg)
            timings.setdefault(name, []).append(round(time.perf_counter() - start, 2))
            out = predict(model, test)
            m = evaluate_outputs(out, test_labels, schema, test.side)
            if schema.is_funnel:
                _funnel_extras(out, test_labels, shared_p, name, schema, test.side, m)
            m["best_epoch"] = best
            per_repeat[name].append(m)
            rep = gate_report(model, test)
            if rep is not None:
                rep["experts"]["divergence_at_init"] = init_div
                gates.setdefault(name, []).append(rep)
            key = "auc_cvr_masked" if schema.is_funnel else f"auc_{spec.task_names[0]}"
            log(f"repeat {r} seed {seed}: {name} {key} {_fmt(m.get(key))} ({timings[name][-1]:.0f}s)")
    results = {
        "benchmark": cfg.model_dump(mode="json"),
        "dataset": cfg.dataset,
        "sources": loaded.sources,
        "split": {
            "by_time": schema.time is not None and "train" not in loaded.splits,
            "rows": {k: v.height for k, v in splits.items()},
            "clicks_test": int(test_labels["click"].sum()) if schema.is_funnel else None,
            "conversions_test": int(test_labels["ctcvr"].sum()) if schema.is_funnel else None,
        },
        "protocol": {
            "entire_space_models": sorted(ENTIRE_SPACE_MODELS & set(cfg.models)),
            "auc_ctcvr": "own pCTCVR for entire-space models; shared independently trained pCTR × model pCVR otherwise (ESMM paper §3.2)",
        },
        "shared_ctr": shared_ctr,
        "per_repeat": per_repeat,
        "summary": {m: summarise(runs) for m, runs in per_repeat.items()},
        "gates": gates,
    }
    return results, timings


FUNNEL_COLUMNS = metric_names("benchmark")


def markdown_table(results: dict) -> str:
    """The summary as a markdown table (mean ± std over repeats), one row per model."""
    summary = results["summary"]
    if results["split"]["clicks_test"] is not None:
        cols = [c for c in FUNNEL_COLUMNS if any(c in s for s in summary.values())]
    else:
        tasks = list(DATASETS[results["dataset"]].schema.tasks)
        cols = [f"{p}_{t}" for t in tasks for p in ("auc", "logloss")]
    repeats = results["benchmark"]["repeats"]
    lines = [
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, s in summary.items():
        cells = [_fmt(s[c]["mean"], s[c]["std"] if repeats > 1 else None) if c in s else "n/a" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_table(results: dict) -> str:
    """Gate entropy and expert divergence of the gated models (first repeat), as markdown."""
    if not results["gates"]:
        return ""
    lines = ["| model | task | mean gate weight per expert | gate entropy (max) | expert divergence init → trained |", "|---|---|---|---:|---:|"]
    for name, reps in results["gates"].items():
        rep = reps[0]
        div = rep["experts"]
        for task, g in rep["gates"].items():
            lines.append(
                f"| {name} | {task} | {', '.join(f'{v:.2f}' for v in g['mean'])} | {g['entropy']:.3f} ({g['max_entropy']:.3f}) | "
                f"{_fmt(div.get('divergence_at_init'), digits=3)} → {div['divergence']:.3f} |"
            )
    return "\n".join(lines)


def report_markdown(results: dict, command: str) -> str:
    """The run's markdown report: command, settings, split, the metric table and gate table."""
    b = results["benchmark"]
    split = results["split"]
    parts = [
        f"# Benchmark: {results['dataset']}",
        "",
        "Command:",
        "",
        f"```\n{command}\n```",
        "",
        f"Settings: {b['repeats']} repeat(s) (seeds {b['seed']}..{b['seed'] + b['repeats'] - 1}), at most {b['epochs']} epoch(s) with early stopping "
        f"(patience {b['patience']}) on validation loss, batch {b['batch_size'] or DATASETS[results['dataset']].batch_size}, Adam lr {b['lr']}, "
        f"embedding {b['embedding_dim']}, MLP {'×'.join(map(str, b['tower']))}"
        + (f", {b['rows']:,} simulated impressions" if results["dataset"] == "simulated" else "") + ".",
        f"Split ({'by time, first half trains' if split['by_time'] else 'fixed seeded split'}): "
        + ", ".join(f"{k} {v:,}" for k, v in split["rows"].items())
        + (f"; test clicks {split['clicks_test']:,}, test conversions {split['conversions_test']:,}" if split["clicks_test"] is not None else "")
        + ".",
        "",
        "Test metrics" + (" (mean ± std over repeats)" if b["repeats"] > 1 else "") + "."
        + (
            " `auc_ctcvr`: own pCTCVR for entire-space models (" + ", ".join(results["protocol"]["entire_space_models"])
            + "), shared pCTR × model pCVR for the others (`auc_ctcvr_own`: every model's own pCTCVR)."
            if split["clicks_test"] is not None else ""
        ),
        "",
        markdown_table(results),
    ]
    if results["shared_ctr"]:
        aucs = [r["auc_ctr"] for r in results["shared_ctr"]]
        parts += ["", f"Shared CTR network: auc_ctr {statistics.fmean(aucs):.4f}" + (f" ± {statistics.stdev(aucs):.4f}" if len(aucs) > 1 else "") + "."]
    gt = gate_table(results)
    if gt:
        parts += ["", "Gates (first repeat, test rows):", "", gt]
    return "\n".join(parts) + "\n"


def log_to_stderr(msg: str) -> None:
    """Print one progress line to stderr (flushed at once)."""
    print(msg, file=sys.stderr, flush=True)
