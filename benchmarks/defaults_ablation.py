"""Ablation of ESMM's training defaults: what closes the AUC gap to DeepCTR-Torch, at which budget
(issue #18).

One knob changes at a time against ``baseline`` (mtrank's defaults before this issue: PyTorch's
Kaiming-uniform tower init, embeddings N(0, 0.01), the exact log-space CTCVR loss, Adam 1e-3 on
every parameter, no warm-up, no dropout, no weight decay). Every cell trains the same ESMM
(embedding 18, towers 360×200×80) with a bare loop over pre-encoded tensors, on ≥ 3 seeds; each
seed draws its own data (simulator) or split (Hillstrom) and its own initialisation, shared by
all variants, so differences are paired. Two budgets per dataset:

- ``1ep``: one epoch at the throughput benchmark's batch (simulator: 4096 → 74 steps at 300k
  rows; Hillstrom: 256 → 175 steps), the last weights kept;
- ``default``: the trainer's defaults (≤ 3 epochs, batch 2048 on the simulator / 256 on
  Hillstrom as its quickstart uses, early stopping on validation loss with patience 1, best
  epoch restored).

Test AUCs: CTR, CTCVR (all impressions) and CVR on clicked rows; the validation AUCs of every
epoch are kept too (the one-epoch behaviour).

Run (2 cores; each dataset in its own process, one thread each)::

    PYTHONPATH=src python benchmarks/defaults_ablation.py --dataset sim-small \
        --out benchmarks/results/ablation
    PYTHONPATH=src python benchmarks/defaults_ablation.py --dataset hillstrom \
        --out benchmarks/results/ablation
    PYTHONPATH=src python benchmarks/defaults_ablation.py --report benchmarks/results/ablation

Writes ``<out>/<dataset>.json`` after every cell, and ``--report`` merges them into
``<out>/ablation.md`` (paired differences: mean, sd and count of seeds with a positive sign).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EMB, TOWER = 18, [360, 200, 80]
SIM_REGIMES = {
    "sim-small": {"n_users": 10_000, "n_items": 10_000, "n_brands": 400, "n_shops": 800},
    "sim-aliccp": {
        "n_users": 400_000,
        "n_items": 4_000_000,
        "n_brands": 100_000,
        "n_shops": 200_000,
    },
}
BUDGETS = {  # (batch, max epochs, early stopping)
    "sim": {"1ep": (4096, 1, False), "default": (2048, 3, True)},
    "hillstrom": {"1ep": (256, 1, False), "default": (256, 3, True)},
}
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "tower_normal_1e-4": {"tower_init": "normal", "tower_std": 1e-4},
    "emb_normal_1e-4": {"emb_std": 1e-4},
    "deepctr_init": {"tower_init": "normal", "tower_std": 1e-4, "emb_std": 1e-4},
    "tower_out_zero": {"tower_init": "out_zero"},
    "tower_xavier": {"tower_init": "xavier"},
    "out_bias_prior": {"out_bias": "prior"},
    "prob_bce": {"loss": "prob"},
    "lr_3e-3": {"lr": 3e-3},
    "emb_lr_x10": {"emb_lr_mult": 10.0},
    "warmup_10%": {"warmup": 0.1},
    "dropout_0.1": {"dropout": 0.1},
    "emb_l2_1e-5": {"emb_l2": 1e-5},
    "shared_out_bias": {"out_bias": "shared"},
    "peer_deepctr": {"peer": "deepctr"},  # DeepCTR-Torch itself on the same rows (its own venv)
    "deepctr_all": {
        "tower_init": "deepctr",
        "tower_std": 1e-4,
        "emb_std": 1e-4,
        "out_bias": "shared",
        "loss": "prob",
        "emb_l2": 1e-5,
    },
}


# --------------------------------------------------------------------------- data
def load_encoded(dataset: str, seed: int, train_rows: int, test_rows: int, val_rows: int):
    """(schema, train, val, test) EncodedData for one seed (encoders fitted on train only)."""
    from mtrank.data.batch import EncodedData
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.data.io import validate_frame

    if dataset.startswith("sim"):
        from mtrank.data.simulate import SIMULATED_SCHEMA as S
        from mtrank.data.simulate import SimConfig, simulate

        df = simulate(
            SimConfig(rows=train_rows + val_rows + test_rows, seed=seed, **SIM_REGIMES[dataset])
        )
        df, _ = validate_frame(df, S, "simulated")
        tr, va, te = (
            df.slice(0, train_rows),
            df.slice(train_rows, val_rows),
            df.slice(train_rows + val_rows, test_rows),
        )
    else:
        from mtrank.data.datasets import DATASETS, resolve_data_dir
        from mtrank.data.split import SplitConfig, split_data

        info = DATASETS[dataset]
        S = info.schema
        parts = split_data(
            info.loader(
                resolve_data_dir(os.environ.get("MTRANK_DATA_DIR", "/work/shared/data")), S
            ),
            SplitConfig(seed=seed),
        )
        tr, va, te = parts["train"], parts["val"], parts["test"]
    enc = FeatureEncoder.fit(tr, S)
    return S, enc, *(EncodedData.from_frame(x, S, enc) for x in (tr, va, te))


# --------------------------------------------------------------------------- variants
def towers(model: nn.Module) -> list[nn.Sequential]:
    return [model.ctr_tower.net, model.cvr_tower.net]


def apply_init(model: nn.Module, v: dict, train, schema) -> None:
    """Re-initialise ``model`` as variant ``v`` says (after the default construction)."""
    if "emb_std" in v:
        nn.init.normal_(model.embedding.table.weight, std=v["emb_std"])
    kind = v.get("tower_init")
    for net in towers(model):
        linears = [m for m in net if isinstance(m, nn.Linear)]
        for i, lin in enumerate(linears):
            if (
                kind == "normal" or kind == "deepctr" and i < len(linears) - 1
            ):  # DeepCTR-Torch's DNN: weights N(0, init_std), biases as torch
                nn.init.normal_(lin.weight, std=v["tower_std"])
            elif kind == "xavier":
                nn.init.xavier_normal_(lin.weight)
                nn.init.zeros_(lin.bias)
            elif kind == "out_zero" and i == len(linears) - 1:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
    if v.get("out_bias") == "prior":  # the library's default since this ablation
        from mtrank.models.layers import init_output_bias
        from mtrank.train.trainer import label_rates

        init_output_bias(model, label_rates(train, schema))
    if (
        v.get("out_bias") == "shared"
    ):  # DeepCTR-Torch's ESMM: one PredictionLayer bias for both logits
        from mtrank.models.layers import funnel_outputs

        for net in towers(model):
            out = [m for m in net if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(out.bias)
            out.bias.requires_grad_(False)
        model.shared_bias = nn.Parameter(torch.zeros(()))

        def forward(categorical, numerical):
            x = model.embedding(categorical, numerical)
            return funnel_outputs(
                model.ctr_tower(x).squeeze(-1) + model.shared_bias,
                model.cvr_tower(x).squeeze(-1) + model.shared_bias,
            )

        model.forward = forward


def loss_fn(model, out, batch, v: dict) -> torch.Tensor:
    from mtrank.losses import model_loss

    if v.get("loss") == "prob":  # DeepCTR-Torch: BCE on probabilities, pCTCVR formed as a product
        click, ctcvr = batch.labels["click"], batch.labels["ctcvr"]
        loss = F.binary_cross_entropy(out["p_ctr"], click) + F.binary_cross_entropy(
            out["p_ctcvr"], ctcvr
        )
    else:
        loss, _ = model_loss(model, out, batch)
    if v.get("emb_l2"):  # DeepCTR-Torch's l2_reg_embedding: whole table, every step, added to a
        # loss summed over the batch's rows; divided by B here because this loss is a mean
        loss = loss + v["emb_l2"] / len(batch) * model.embedding.table.weight.square().sum()
    return loss


def run_peer(data, budget: tuple, seed: int, threads: int, python: str, workdir: Path) -> dict:
    """DeepCTR-Torch's ESMM on the same encoded rows, through ``_deepctr_worker.py`` (no early
    stopping there: only the one-epoch budget is comparable)."""
    import subprocess

    from mtrank.metrics.core import auc

    S, enc, train, _val, test = data
    batch, epochs, _early = budget
    if epochs != 1:
        raise SystemExit("peer_deepctr runs the 1ep budget only")
    npz = workdir / f"peer-{S.name}-{seed}.npz"
    np.savez(
        npz,
        train_x=train.categorical.numpy(),
        test_x=test.categorical.numpy(),
        train_num=train.numerical.numpy(),
        test_num=test.numerical.numpy(),
        numerical=np.array(S.numerical),
        fields=np.array(S.categorical),
        cardinalities=np.array(enc.cardinalities),
        train_click=train.labels["click"].numpy(),
        train_conv=train.labels["conversion"].numpy(),
        test_click=test.labels["click"].numpy(),
        test_conv=test.labels["conversion"].numpy(),
    )
    out = workdir / f"peer-{S.name}-{seed}.json"
    args = {
        "threads": threads,
        "npz": str(npz),
        "emb": EMB,
        "tower": TOWER,
        "batch": batch,
        "seed": seed,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [
            python,
            str(Path(__file__).resolve().parent / "_deepctr_worker.py"),
            json.dumps(args),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"DeepCTR-Torch worker failed: {proc.stderr[-800:]}")
    r = json.loads(out.read_text())
    p = np.load(r["pred_path"])  # pCTR, pCVR, pCTCVR
    click, conv = test.labels["click"].numpy(), test.labels["conversion"].numpy()
    m = click > 0
    test_auc = {
        "auc_ctr": auc(click, p[:, 0]),
        "auc_ctcvr": auc(click * conv, p[:, 2]),
        "auc_cvr_masked": auc(conv[m], p[m, 1]),
    }
    return {
        "test": {k: _r(x) for k, x in test_auc.items()},
        "val_curve": [],
        "epochs_run": 1,
        "steps_per_epoch": math.ceil(len(train) / batch),
        "seconds": r["train_seconds"],
        "parameters": r["parameters"],
    }


def run_cell(data, v: dict, budget: tuple, seed: int, threads: int) -> dict:
    from mtrank.models import build_model
    from mtrank.models.config import ModelConfig
    from mtrank.train.trainer import validation_loss
    from mtrank.workflow import evaluate_split, feature_spec

    S, enc, train, val, test = data
    batch, epochs, early = budget
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(
        feature_spec(enc, S),
        ModelConfig(embedding_dim=EMB, tower=TOWER, dropout=v.get("dropout", 0.0)),
    )
    apply_init(model, v, train, S)
    lr = v.get("lr", 1e-3)
    emb = [model.embedding.table.weight]
    dense = [p for p in model.parameters() if p is not emb[0] and p.requires_grad]
    opt = torch.optim.Adam(
        [{"params": emb, "lr": lr * v.get("emb_lr_mult", 1.0)}, {"params": dense, "lr": lr}]
    )
    steps_per_epoch = math.ceil(len(train) / batch)
    warm = int(v.get("warmup", 0) * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad, curve = math.inf, None, 0, []
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        for b in train.batches(batch, shuffle=True, generator=gen):
            loss = loss_fn(model, model(b.categorical, b.numerical), b, v)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        vl = validation_loss(model, val)
        vm = evaluate_split(model, val, S)
        curve.append(
            {
                "epoch": ep + 1,
                "val_loss": round(vl, 5),
                **{k: _r(vm.get(k)) for k in ("auc_ctr", "auc_ctcvr", "auc_cvr_masked")},
            }
        )
        if not early:
            continue
        if vl < best - 1e-7:
            best, bad = vl, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            bad += 1
            if bad > 0:  # patience 1, as TrainConfig's default
                break
    if early and best_state is not None:
        model.load_state_dict(best_state)
    tm = evaluate_split(model, test, S)
    return {
        "test": {k: _r(tm.get(k)) for k in ("auc_ctr", "auc_ctcvr", "auc_cvr_masked")},
        "val_curve": curve,
        "epochs_run": len(curve),
        "steps_per_epoch": steps_per_epoch,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _r(x):
    return None if x is None else round(float(x), 5)


# --------------------------------------------------------------------------- report
METRICS = ("auc_ctr", "auc_ctcvr", "auc_cvr_masked")
CHOSEN = (
    "out_bias_prior"  # the variant that became mtrank's default (TrainConfig.prior_output_bias)
)


def report(out: Path) -> str:
    L = [
        "# ESMM defaults ablation (issue #18)",
        "",
        (
            "Test AUC means over the variant's seeds; Δ = paired difference variant − baseline "
            "on the same seeds (mean ± sd, then the number of seeds where the variant is "
            "higher). "
            "`baseline` = mtrank's defaults before issue #18 (no prior output bias). Produced "
            "by `benchmarks/defaults_ablation.py` (commands below)."
        ),
        "",
    ]
    merged: dict[str, dict] = {}
    for f in sorted(out.glob("*.json")):  # one dataset may come from several runs (--tag)
        part = json.loads(f.read_text())
        res = merged.setdefault(
            part["dataset"], {**part, "cells": {}, "budgets": {}, "command": []}
        )
        res["command"].append(part["command"])
        res["budgets"].update(part["budgets"])
        for bud, cells in part["cells"].items():
            for name, per_seed in cells.items():
                res["cells"].setdefault(bud, {}).setdefault(name, {}).update(per_seed)
    for res in merged.values():
        res["command"] = "`; `".join(res["command"])
        L += [
            f"## {res['dataset']}",
            "",
            f"Command: `{res['command']}`  ",
            f"Load: start {res['load_start']}, last cell {res.get('load_last')}  ",
            (
                f"Rows: train {res['rows']['train']:,}, val {res['rows']['val']:,}, test "
                f"{res['rows']['test']:,}; seeds {res['seeds']}; "
                f"budgets {json.dumps(res['budgets'])} (batch, max epochs, early stopping)"
            ),
            "",
        ]
        for bud in res["budgets"]:
            cells = res["cells"].get(bud, {})
            base = cells.get("baseline", {})
            L += [
                f"### budget `{bud}`",
                "",
                "| variant | seeds | AUC CTR | Δ CTR | AUC CTCVR | Δ CTCVR | AUC CVR (clicked) "
                "| Δ CVR | epochs run (best) |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name, per_seed in cells.items():
                seeds = [s for s in per_seed if s in base]
                row = [name]
                for m in METRICS:
                    vals = [
                        per_seed[s]["test"][m]
                        for s in per_seed
                        if per_seed[s]["test"][m] is not None
                    ]
                    row.append(f"{statistics.mean(vals):.4f}" if vals else "")
                    d = [
                        per_seed[s]["test"][m] - base[s]["test"][m]
                        for s in seeds
                        if per_seed[s]["test"][m] is not None and base[s]["test"][m] is not None
                    ]
                    if name == "baseline" or not d:
                        row.append("")
                    else:
                        sd = statistics.stdev(d) if len(d) > 1 else 0.0
                        row.append(
                            f"{statistics.mean(d):+.4f} ± {sd:.4f} "
                            f"({sum(x > 0 for x in d)}/{len(d)})"
                        )
                ep = [per_seed[s]["epochs_run"] for s in per_seed]
                best = [
                    1 + min(range(len(c)), key=lambda i, c=c: c[i]["val_loss"])
                    for c in (per_seed[s]["val_curve"] for s in per_seed)
                    if c
                ]
                row.append(
                    f"{statistics.mean(ep):.1f}"
                    + (f" ({statistics.mean(best):.1f})" if res["budgets"][bud][2] and best else "")
                )
                row.insert(1, ",".join(sorted(per_seed)))
                L.append("| " + " | ".join(row) + " |")
            L.append("")
            peer, chosen = cells.get("peer_deepctr"), cells.get(CHOSEN)
            if peer and chosen:
                seeds = [x for x in chosen if x in peer]
                parts = []
                for m in METRICS:
                    d = [chosen[x]["test"][m] - peer[x]["test"][m] for x in seeds]
                    sd = statistics.stdev(d) if len(d) > 1 else 0.0
                    parts.append(
                        f"{m} {statistics.mean(d):+.4f} ± {sd:.4f} "
                        f"({sum(x >= 0 for x in d)}/{len(d)} seeds ≥ 0)"
                    )
                L += [
                    f"Chosen default (`{CHOSEN}`) − DeepCTR-Torch, paired on seeds "
                    f"{','.join(seeds)}: " + "; ".join(parts),
                    "",
                ]
        curves = res["cells"].get("default", {}).get("baseline", {})
        if curves:
            L += [
                "Validation AUC per epoch of `baseline` at the `default` budget (the one-epoch "
                "behaviour):",
                "",
                "| seed | epoch | val loss | AUC CTR | AUC CTCVR | AUC CVR (clicked) |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for s, c in curves.items():
                L += [
                    f"| {s} | {e['epoch']} | {e['val_loss']} | {e['auc_ctr']} | "
                    f"{e['auc_ctcvr']} | {e['auc_cvr_masked']} |"
                    for e in c["val_curve"]
                ]
            L.append("")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=[*SIM_REGIMES, "hillstrom"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budgets", default="1ep,default")
    ap.add_argument("--train-rows", type=int, default=300_000)
    ap.add_argument("--val-rows", type=int, default=50_000)
    ap.add_argument("--test-rows", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--deepctr-python",
        default="/tmp/deepctr-venv/bin/python",
        help="interpreter of the DeepCTR-Torch venv (see throughput.py)",
    )
    ap.add_argument(
        "--workdir",
        default="/tmp/mtrank-ablation",
        help="scratch folder for the peer's exported data",
    )
    ap.add_argument(
        "--tag", default="", help="suffix of the result file (parallel runs of one dataset)"
    )
    ap.add_argument("--out", default="benchmarks/results/ablation")
    ap.add_argument(
        "--report", metavar="DIR", help="merge DIR/*.json into DIR/ablation.md and stop"
    )
    a = ap.parse_args()
    if a.report:
        md = report(Path(a.report))
        (Path(a.report) / "ablation.md").write_text(md)
        print(md)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    path = out / f"{a.dataset}{a.tag}.json"
    kind = "sim" if a.dataset.startswith("sim") else "hillstrom"
    budgets = {b: BUDGETS[kind][b] for b in a.budgets.split(",")}
    seeds = [int(s) for s in a.seeds.split(",")]
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update(
        {
            "dataset": a.dataset,
            "command": "PYTHONPATH=src python " + " ".join(sys.argv),
            "seeds": seeds,
            "budgets": budgets,
            "load_start": res.get("load_start") or _load(),
            "variants": {k: VARIANTS[k] for k in a.variants.split(",")},
        }
    )
    res.setdefault("cells", {})
    cache: dict[int, tuple] = {}
    for bud, spec in budgets.items():  # budget outer, so the cheaper budget completes first
        for name in a.variants.split(
            ","
        ):  # then variant, so the first variants get all seeds first
            for seed in seeds:
                if str(seed) in res["cells"].get(bud, {}).get(name, {}):
                    continue
                if seed not in cache:
                    cache[seed] = load_encoded(
                        a.dataset, seed, a.train_rows, a.test_rows, a.val_rows
                    )
                    res["rows"] = {
                        "train": len(cache[seed][2]),
                        "val": len(cache[seed][3]),
                        "test": len(cache[seed][4]),
                    }
                if VARIANTS[name].get("peer"):
                    cell = run_peer(
                        cache[seed], tuple(spec), seed, a.threads, a.deepctr_python, Path(a.workdir)
                    )
                else:
                    cell = run_cell(cache[seed], VARIANTS[name], tuple(spec), seed, a.threads)
                res["cells"].setdefault(bud, {}).setdefault(name, {})[str(seed)] = cell
                res["load_last"] = _load()
                path.write_text(json.dumps(res, indent=1))
                print(
                    f"[{time.strftime('%H:%M:%S')}] {a.dataset} seed {seed} {bud} {name}: "
                    f"{cell['test']} ({cell['epochs_run']} ep, {cell['seconds']}s)",
                    flush=True,
                )


def _load() -> str:
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, loadavg "
        f"{[round(x, 2) for x in os.getloadavg()]}"
    )


if __name__ == "__main__":
    main()
