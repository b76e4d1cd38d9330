"""Training throughput, test AUC and memory of mtrank's ESMM against a bare loop, two peer
libraries (torch-rechub, DeepCTR-Torch) and the fp32 compute roofline (issues #6, #18).

One run measures, on the same simulated data, the same ESMM (embedding 18, towers 360×200×80,
batch 4096, one epoch) and the same number of threads, at two vocabulary regimes (``small``:
~10k ids per field; ``aliccp``: 4M items, 400k users, 200k shops, 100k brands, of which the row
budget realises fewer; the realised embedding-table rows are reported):

1. ``mtrank_stream``: :func:`mtrank.workflow.fit_stream` end to end from Parquet (dense Adam,
   and ``sparse_embeddings=True``: SparseAdam on the tables), mtrank's default learning rate and
   initialisation;
2. ``bare``: a loop over pre-materialised tensors of the same model, loss and optimizers (the
   practical limit of this model in PyTorch);
3. peers, each in its own virtual environment (never an mtrank dependency) on the same encoded
   ids and standardised price, exported as ``.npz``, trained by the library's own trainer and
   data loader: ``rechub``, torch-rechub's ESMM (``_rechub_worker.py``), and ``deepctr``,
   DeepCTR-Torch's ``deepctr_torch.models.multitask.ESMM`` (``_deepctr_worker.py``, offline: its
   import-time version check is stubbed).

Every system runs ``--reps`` times, interleaved (repetition r runs each system once, with seed r),
and the report gives median samples/s, the median (range) ratio to the fastest peer, mean test
AUCs (CTR, CTCVR, CVR on clicked rows) with the paired differences to the best peer, and
parameter counts. Plus the fp32 roofline (torch.mm on the towers' shapes ÷ training FLOPs per
sample), the peak RSS of streamed training at several sizes (each in its own process,
``VmHWM``), and a py-spy / torch.profiler profile of the streamed hot path. Every measurement runs
in a fresh subprocess; a part left out with ``--skip`` is carried over from the previous
``throughput.json`` with a note.

One-time setup of the peer environments (torch pinned to the local CPU wheel)::

    python3 -m venv /tmp/rechub-venv
    /tmp/rechub-venv/bin/pip install torch==2.13.0 torch-rechub pandas scikit-learn py-spy
    python3 -m venv /tmp/deepctr-venv
    /tmp/deepctr-venv/bin/pip install torch==2.13.0 deepctr-torch==0.3.0 pandas scikit-learn

Run (about 10 minutes per repetition on 2 idle cores; ``--quick`` is a smoke test)::

    PYTHONPATH=src python benchmarks/throughput.py --train-rows 300000 --test-rows 100000
    PYTHONPATH=src python benchmarks/throughput.py --quick --out /tmp/tp

Writes ``benchmarks/results/throughput.json`` and ``throughput.md`` (unless ``--out``).

The list/sequence row (issue #13) runs on its own, ``--lists``: the same ESMM with 3 list
features (``list<int64>``, Poisson mean length 10, max 20, mean pooling, 2,000-id vocabulary) and
the user history ``hist_purchased`` (max length 50, DIN target attention over ``item_id``'s rows),
``fit_stream`` from Parquet against a bare loop of the same model over pre-encoded tensors
(``--reps`` interleaved), plus the peak RSS of streamed training at two sizes::

    PYTHONPATH=src python benchmarks/throughput.py --lists --train-rows 200000 --reps 3

writes ``throughput_lists.json`` and ``throughput_lists.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGIMES = {
    "small": {"n_users": 10_000, "n_items": 10_000, "n_brands": 400, "n_shops": 800},
    "aliccp": {"n_users": 400_000, "n_items": 4_000_000, "n_brands": 100_000, "n_shops": 200_000},
}
EMB, TOWER, BATCH = 18, [360, 200, 80], 4096
PEERS = {"rechub": "torch-rechub", "deepctr": "DeepCTR-Torch"}  # worker name → library
USER_FIELDS = ["user_id", "user_age", "user_gender", "user_power", "hour"]
ITEM_FIELDS = ["item_id", "category", "brand", "shop"]


# --------------------------------------------------------------------------- helpers
def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_load() -> dict:
    la = os.getloadavg()
    return {
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "loadavg_1_5_15": [round(x, 2) for x in la],
    }


def _train_step(model, opts, batch) -> None:
    """One optimisation step of the bare loop (the same loss and optimizers as the trainer)."""
    from mtrank.losses import model_loss  # lazy, like the other mtrank imports of the workers

    loss, _ = model_loss(model, model(batch.categorical, batch.numerical, *batch.extra), batch)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()


def _bare_epoch(model, opts, train, seed: int, max_steps: int | None = None) -> tuple[int, float]:
    """One shuffled epoch of :func:`_train_step` over pre-encoded tensors (at most ``max_steps``
    batches). Returns (rows seen, seconds)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    limit = (max_steps or 10**12) * BATCH
    model.train()
    seen = 0
    t0 = time.perf_counter()
    for batch in train.batches(BATCH, shuffle=True, generator=gen):
        _train_step(model, opts, batch)
        seen += len(batch)
        if seen >= limit:
            break
    return seen, time.perf_counter() - t0


def run_worker(
    name: str,
    args: dict,
    *,
    python: str | None = None,
    prefix: list[str] | None = None,
    timeout: float = 1800,
    script: Path | None = None,
) -> dict:
    """Run ``--worker name`` of ``script`` (default: this file) in a fresh process; returns its
    JSON result (or the error)."""
    out = Path(args["workdir"]) / f"result-{name}-{args.get('tag', '')}.json"
    out.unlink(missing_ok=True)
    cmd = [
        *(prefix or []),
        python or sys.executable,
        str(script or Path(__file__).resolve()),
        "--worker",
        name,
        "--worker-args",
        json.dumps(args),
        "--worker-out",
        str(out),
    ]
    if name in PEERS:  # a peer library's own worker, run by its own interpreter (no mtrank import)
        cmd = [
            *(prefix or []),
            python,
            str(HERE / f"_{name}_worker.py"),
            json.dumps(args),
            str(out),
        ]
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.update({"OMP_NUM_THREADS": str(args["threads"]), "MKL_NUM_THREADS": str(args["threads"])})
    t0 = time.perf_counter()
    print(
        f"[{time.strftime('%H:%M:%S', time.gmtime())}] {name} {args.get('tag', '')} ...", flush=True
    )
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    res = json.loads(out.read_text())
    res["process_seconds"] = round(time.perf_counter() - t0, 1)
    res["stderr_tail"] = proc.stderr[-600:] if name == "profile" else None
    res["finished_utc"] = time.strftime("%H:%M:%S", time.gmtime())
    res["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(
        "    -> "
        f"{json.dumps({k: v for k, v in res.items() if k in ('samples_per_second', 'test', 'peak_rss_mib', 'error')})[:300]}",  # noqa: E501
        flush=True,
    )
    return res


# --------------------------------------------------------------------------- data
def make_data(
    workdir: Path, regime: str, total_rows: int, part_rows: int, val_rows: int, test_rows: int
) -> dict:
    """Simulate ``total_rows`` + one evaluation part in parts of ``part_rows``; the last part is
    cut into the validation and test files. Reuses files made with the same config."""
    import polars as pl

    from mtrank.data.simulate import SimConfig, write_simulated

    cfg = SimConfig(rows=total_rows + part_rows, seed=0, **REGIMES[regime])
    d = workdir / f"{regime}-{cfg.rows}-{part_rows}"
    marker = d / "done.json"
    if not marker.exists():
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        write_simulated(cfg, d / "parts", part_rows=part_rows)
        parts = sorted((d / "parts").glob("part-*.parquet"))
        last = pl.read_parquet(parts[-1])
        parts[-1].rename(d / "eval.parquet")
        (d / "parts" / "_manifest.json").unlink()  # the directory no longer holds what it lists
        last.slice(0, val_rows).write_parquet(d / "val.parquet")
        last.slice(val_rows, test_rows).write_parquet(d / "test.parquet")
        marker.write_text(
            json.dumps({"config": cfg.model_dump(), "seconds": round(time.perf_counter() - t0, 1)})
        )
    parts = sorted((d / "parts").glob("part-*.parquet"))
    return {
        "dir": str(d),
        "parts": [str(p) for p in parts],
        "val": str(d / "val.parquet"),
        "test": str(d / "test.parquet"),
        "sim": json.loads(marker.read_text()),
    }


def files_for(parts: list[str], rows: int, part_rows: int) -> list[str]:
    n = max(1, rows // part_rows)
    if n > len(parts):
        raise SystemExit(f"need {n} parts of {part_rows} rows, have {len(parts)}")
    return parts[:n]


# --------------------------------------------------------------------------- workers
def _configs(a: dict, sparse: bool):
    from mtrank.models.config import ModelConfig
    from mtrank.train.trainer import TrainConfig

    # the budget is fixed (1 epoch, batch, threads); learning rate and initialisation are mtrank's
    # defaults
    return ModelConfig(name="esmm", embedding_dim=EMB, tower=TOWER), TrainConfig(
        epochs=1,
        batch_size=BATCH,
        threads=a["threads"],
        sparse_embeddings=sparse,
        seed=a.get("seed", 0),
    )


def n_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _quality(metrics: dict) -> dict:
    return {
        k: (None if metrics.get(k) is None else round(float(metrics[k]), 4))
        for k in ("auc_ctr", "auc_ctcvr", "auc_cvr_masked")
    }


def worker_mtrank_stream(a: dict) -> dict:
    """fit_stream end to end: streaming encoder fit, streamed training, val and test."""
    import torch

    from mtrank.data.simulate import SIMULATED_SCHEMA
    from mtrank.workflow import fit_stream

    torch.set_num_threads(a["threads"])
    mcfg, tcfg = _configs(a, a["sparse"])
    t0 = time.perf_counter()
    out = fit_stream(
        [Path(p) for p in a["train"]],
        SIMULATED_SCHEMA,
        mcfg,
        tcfg,
        val_paths=[Path(a["val"])],
        test_paths=[Path(a["test"])],
        quiet=True,
    )
    wall = time.perf_counter() - t0
    h = out.result.history[0]
    vocab = sum(out.bundle.spec.cardinalities)
    return {
        "samples_per_second": round(h.samples_per_second, 1),
        "train_seconds": round(h.seconds, 2),
        "rows": out.bundle.meta["rows"]["train"],
        "end_to_end_seconds": round(wall, 2),
        "end_to_end_samples_per_second": round(out.bundle.meta["rows"]["train"] / wall, 1),
        "embedding_rows": vocab,
        "cardinalities": dict(
            zip(SIMULATED_SCHEMA.categorical, out.bundle.spec.cardinalities, strict=True)
        ),
        "test": _quality(out.metrics["test"]),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters": n_parameters(out.bundle.model),
    }


def _encode_in_memory(a: dict):
    import polars as pl

    from mtrank.data.batch import EncodedData
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.data.io import validate_frame
    from mtrank.data.simulate import SIMULATED_SCHEMA as S

    train_df = pl.concat([pl.read_parquet(p) for p in a["train"]])
    train_df, _ = validate_frame(train_df, S, "train")
    enc = FeatureEncoder.fit(train_df, S)
    test_df, _ = validate_frame(pl.read_parquet(a["test"]), S, "test")
    return enc, EncodedData.from_frame(train_df, S, enc), EncodedData.from_frame(test_df, S, enc)


def worker_bare(a: dict) -> dict:
    """The same model, loss and optimizers over pre-materialised tensors: the practical limit."""
    import torch

    from mtrank.data.simulate import SIMULATED_SCHEMA as S
    from mtrank.models import build_model
    from mtrank.models.config import FeatureSpec
    from mtrank.models.layers import init_output_bias
    from mtrank.train.trainer import label_rates, make_optimizers
    from mtrank.workflow import evaluate_split

    torch.set_num_threads(a["threads"])
    enc, train, test = _encode_in_memory(a)
    mcfg, tcfg = _configs(a, a["sparse"])
    torch.manual_seed(a.get("seed", 0))
    # ``pad``: allocate a field's whole declared catalogue (as a full-size log would realise it)
    card = [
        max(c, a.get("pad", {}).get(f, 0))
        for f, c in zip(S.categorical, enc.cardinalities, strict=True)
    ]
    model = build_model(
        FeatureSpec(
            cardinalities=card,
            n_numerical=len(enc.numerical),
            funnel=True,
            task_names=list(S.tasks),
        ),
        mcfg,
    )
    if tcfg.prior_output_bias:  # as Trainer.fit does before its first step
        init_output_bias(model, label_rates(train, S))
    opts = make_optimizers(model, tcfg)
    seen, sec = _bare_epoch(model, opts, train, a.get("seed", 0), a.get("max_steps"))
    return {
        "samples_per_second": round(seen / sec, 1),
        "train_seconds": round(sec, 2),
        "rows": seen,
        "embedding_rows": sum(card),
        "test": _quality(evaluate_split(model, test, S)),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters": n_parameters(model),
    }


def worker_stream_only(a: dict) -> dict:
    """The streamed data path alone (read, validate, encode, shuffle, batch): its capacity."""
    import torch

    from mtrank.data.simulate import SIMULATED_SCHEMA as S
    from mtrank.data.stream import ParquetStream, fit_encoder_streaming

    torch.set_num_threads(a["threads"])
    paths = [Path(p) for p in a["train"]]
    t0 = time.perf_counter()
    enc = fit_encoder_streaming(paths, S)
    fit_s = time.perf_counter() - t0
    stream = ParquetStream(paths, S, enc)
    t0 = time.perf_counter()
    seen = sum(
        len(b)
        for b in stream.batches(BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    )
    sec = time.perf_counter() - t0
    return {
        "samples_per_second": round(seen / sec, 1),
        "encoder_fit_seconds": round(fit_s, 2),
        "encoder_fit_rows_per_second": round(seen / fit_s, 1),
        "rows": seen,
    }


def worker_rss(a: dict) -> dict:
    """Streamed training (fit_stream's steps) over many files; with ``fraction`` < 1 every piece
    is read and encoded in full but only its first ``fraction`` of rows is trained on."""
    import torch

    from mtrank.data.simulate import SIMULATED_SCHEMA as S
    from mtrank.data.stream import ParquetStream, fit_encoder_streaming
    from mtrank.models import build_model
    from mtrank.models.config import FeatureSpec
    from mtrank.train.trainer import Trainer

    torch.set_num_threads(a["threads"])
    frac = a["fraction"]

    class SubsampledStream(ParquetStream):
        def encoded_pieces(self, order=None, **kw):
            for part in super().encoded_pieces(order, **kw):
                yield part if frac >= 1 else part.subset(torch.arange(int(len(part) * frac)))

    paths = [Path(p) for p in a["train"]]
    mcfg, tcfg = _configs(a, a["sparse"])
    t0 = time.perf_counter()
    enc = fit_encoder_streaming(paths, S)
    stream = SubsampledStream(paths, S, enc)
    model = build_model(
        FeatureSpec(
            cardinalities=enc.cardinalities,
            n_numerical=len(enc.numerical),
            funnel=True,
            task_names=list(S.tasks),
        ),
        mcfg,
    )
    res = Trainer(tcfg, S, quiet=True).fit(model, stream, None)
    h = res.history[0]
    return {
        "rows_read": len(stream),
        "rows_trained": int(h.samples_per_second * h.seconds + 0.5),
        "fraction": frac,
        "samples_per_second": round(h.samples_per_second, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def worker_mtrank_stream_padded(a: dict) -> dict:
    """fit_stream's steps (streaming encoder fit, streamed training of one epoch, test) with the
    embedding tables padded to ``pad`` rows per field (fit_stream sizes them by the realised
    vocabulary, so this is the only step done by hand)."""
    import torch

    from mtrank.data.simulate import SIMULATED_SCHEMA as S
    from mtrank.data.stream import ParquetStream, fit_encoder_streaming
    from mtrank.models import build_model
    from mtrank.models.config import FeatureSpec
    from mtrank.train.trainer import Trainer
    from mtrank.workflow import evaluate_split

    torch.set_num_threads(a["threads"])
    paths = [Path(p) for p in a["train"]]
    mcfg, tcfg = _configs(a, a["sparse"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    enc = fit_encoder_streaming(paths, S)
    card = [
        max(c, a["pad"].get(f, 0)) for f, c in zip(S.categorical, enc.cardinalities, strict=True)
    ]
    model = build_model(
        FeatureSpec(
            cardinalities=card,
            n_numerical=len(enc.numerical),
            funnel=True,
            task_names=list(S.tasks),
        ),
        mcfg,
    )
    stream = ParquetStream(paths, S, enc)
    h = Trainer(tcfg, S, quiet=True).fit(model, stream, None).history[0]
    wall = time.perf_counter() - t0
    test = evaluate_split(model, ParquetStream([Path(a["test"])], S, enc).load_all(), S)
    return {
        "samples_per_second": round(h.samples_per_second, 1),
        "train_seconds": round(h.seconds, 2),
        "rows": len(stream),
        "embedding_rows": sum(card),
        "end_to_end_samples_per_second": round(len(stream) / wall, 1),
        "test": _quality(test),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def worker_torch_profile(a: dict) -> dict:
    """torch.profiler over ``steps`` streamed training steps: where the step's CPU time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mtrank.data.simulate import SIMULATED_SCHEMA as S
    from mtrank.data.stream import ParquetStream, fit_encoder_streaming
    from mtrank.models import build_model
    from mtrank.models.config import FeatureSpec
    from mtrank.train.trainer import make_optimizers

    torch.set_num_threads(a["threads"])
    paths = [Path(p) for p in a["train"]]
    enc = fit_encoder_streaming(paths, S)
    mcfg, tcfg = _configs(a, a["sparse"])
    model = build_model(
        FeatureSpec(
            cardinalities=enc.cardinalities,
            n_numerical=len(enc.numerical),
            funnel=True,
            task_names=list(S.tasks),
        ),
        mcfg,
    )
    opts = make_optimizers(model, tcfg)
    it = ParquetStream(paths, S, enc).batches(
        BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(5):  # warm up
        next(it)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a["steps"]):
            with torch.profiler.record_function("next_batch"):
                b = next(it)
            with torch.profiler.record_function("train_step"):
                _train_step(model, opts, b)
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        rows.append(
            {
                "op": e.key,
                "self_ms_per_step": round(e.self_cpu_time_total / 1000 / a["steps"], 2),
                "calls_per_step": round(e.count / a["steps"], 1),
            }
        )
    tops = {
        e.key: round(e.cpu_time_total / 1000 / a["steps"], 2)
        for e in prof.key_averages()
        if e.key in ("next_batch", "train_step")
    }
    return {"steps": a["steps"], "ms_per_step": tops, "top_self_ops": rows}


def worker_export(a: dict) -> dict:
    """Encode train and test with mtrank's encoders and save them for the peers (``.npz``)."""
    import numpy as np

    from mtrank.data.simulate import SIMULATED_SCHEMA as S

    enc, train, test = _encode_in_memory(a)
    np.savez(
        a["export"],
        train_x=train.categorical.numpy(),
        test_x=test.categorical.numpy(),
        train_num=train.numerical.numpy(),
        test_num=test.numerical.numpy(),
        numerical=np.array(S.numerical),
        train_click=train.labels["click"].numpy(),
        train_conv=train.labels["conversion"].numpy(),
        test_click=test.labels["click"].numpy(),
        test_conv=test.labels["conversion"].numpy(),
        cardinalities=np.array(enc.cardinalities),
        fields=np.array(S.categorical),
    )
    return {
        "rows": {"train": len(train), "test": len(test)},
        "embedding_rows": int(sum(enc.cardinalities)),
    }


# --------------------------------------------------------------------------- lists (issue #13)
LIST_FEATURES = ("tags_a", "tags_b", "tags_c")


def lists_schema():
    """The simulator's schema plus 3 list features and the purchase history (target attention)."""
    from mtrank.data.schema import Schema
    from mtrank.data.simulate import SIMULATED_SCHEMA

    doc = SIMULATED_SCHEMA.model_dump(mode="json")
    doc["lists"] = [{"column": c, "max_len": 20, "pooling": "mean"} for c in LIST_FEATURES]
    doc["sequences"] = [
        {"column": "hist_purchased", "shares": "item_id", "max_len": 50, "pooling": "attention"}
    ]
    return Schema.model_validate(doc)


def make_lists_data(workdir: Path, rows: int, part_rows: int, test_rows: int) -> dict:
    """Simulated parts (small regime, ``history_len`` 50) with 3 list columns added: per row
    Poisson(10) ids (at most 20) from a Zipf(1.1) vocabulary of 2,000. The last part is cut into
    validation and test (``test_rows``) files. Reused when present."""
    import numpy as np
    import polars as pl

    from mtrank.data.simulate import SimConfig, simulate_parts

    cfg = SimConfig(rows=rows + part_rows, seed=0, history_len=50, **REGIMES["small"])
    d = workdir / f"lists-{cfg.rows}-{part_rows}"
    marker = d / "done.json"
    if not marker.exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        g = np.random.default_rng(1)
        p = 1.0 / np.arange(1, 2001) ** 1.1
        p /= p.sum()
        frames = []
        for k, part in enumerate(simulate_parts(cfg, part_rows)):
            n = part.height
            for c in LIST_FEATURES:
                lengths = np.minimum(g.poisson(10.0, n), 20)
                ids = g.choice(2000, size=int(lengths.sum()), p=p).astype(np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                import pyarrow as pa

                arr = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids))
                part = part.with_columns(pl.Series(c, arr))
            frames.append(part)
            part.write_parquet(d / f"part-{k:05d}.parquet")
        last = sorted(d.glob("part-*.parquet"))[-1]
        tail = pl.read_parquet(last)
        last.unlink()
        tail.tail(test_rows).write_parquet(d / "test.parquet")
        tail.head(tail.height - test_rows).write_parquet(d / "val.parquet")
        marker.write_text(json.dumps({"config": cfg.model_dump()}))
    return {
        "parts": [str(p) for p in sorted(d.glob("part-*.parquet"))],
        "val": str(d / "val.parquet"),
        "test": str(d / "test.parquet"),
    }


def worker_lists_stream(a: dict) -> dict:
    """fit_stream with the list/sequence schema (one epoch): the trainer's own samples/s."""
    import torch

    from mtrank.workflow import fit_stream

    torch.set_num_threads(a["threads"])
    mcfg, tcfg = _configs(a, False)
    out = fit_stream(
        [Path(p) for p in a["train"]],
        lists_schema(),
        mcfg,
        tcfg,
        val_paths=[Path(a["val"])],
        test_paths=[Path(a["test"])] if a.get("test") else None,
        quiet=True,
    )
    h = out.result.history[0]
    return {
        "samples_per_second": round(h.samples_per_second, 1),
        "train_seconds": round(h.seconds, 2),
        "rows": out.bundle.meta["rows"]["train"],
        "test": _quality(out.metrics.get("test", {})),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters": n_parameters(out.bundle.model),
    }


def worker_lists_bare(a: dict) -> dict:
    """The same list/sequence model, loss and optimizer over pre-encoded tensors."""
    import polars as pl
    import torch

    from mtrank.data.batch import EncodedData
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.data.io import validate_frame
    from mtrank.models import build_model
    from mtrank.models.layers import init_output_bias
    from mtrank.train.trainer import label_rates, make_optimizers
    from mtrank.workflow import feature_spec

    torch.set_num_threads(a["threads"])
    schema = lists_schema()
    df, _ = validate_frame(pl.concat([pl.read_parquet(p) for p in a["train"]]), schema, "train")
    enc = FeatureEncoder.fit(df, schema)
    train = EncodedData.from_frame(df, schema, enc)
    mcfg, tcfg = _configs(a, False)
    torch.manual_seed(a.get("seed", 0))
    model = build_model(feature_spec(enc, schema), mcfg)
    if tcfg.prior_output_bias:
        init_output_bias(model, label_rates(train, schema))
    opts = make_optimizers(model, tcfg)
    seen, sec = _bare_epoch(model, opts, train, a.get("seed", 0))
    lengths = {
        c: round(float((t > 0).sum(1).float().mean()), 2)
        for c, t in zip(enc.extra_names, train.extra, strict=True)
    }
    widths = {c: int(t.shape[1]) for c, t in zip(enc.extra_names, train.extra, strict=True)}
    return {
        "samples_per_second": round(seen / sec, 1),
        "train_seconds": round(sec, 2),
        "rows": seen,
        "mean_elements": lengths,
        "padded_width": widths,
        "parameters": n_parameters(model),
    }


def lists_row(args, work: Path) -> None:
    """The ``--lists`` run: interleaved bare / fit_stream repetitions, then streamed peak RSS at
    1× and 3× the rows; writes throughput_lists.json / .md."""
    import statistics

    part = args.part_rows
    total = 3 * args.train_rows
    data = make_lists_data(work, total, part, args.test_rows)
    n_train = max(1, args.train_rows // part)
    base = {
        "threads": args.threads,
        "workdir": str(work),
        "train": data["parts"][:n_train],
        "val": data["val"],
        "test": data["test"],
    }
    res: dict = {
        "command": " ".join(["PYTHONPATH=src python", *sys.argv]),
        "load_before": machine_load(),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "runs": {"bare": [], "stream": []},
        "rss": [],
    }
    for r in range(args.reps):
        for name in ("bare", "stream"):
            res["runs"][name].append(
                run_worker(f"lists_{name}", {**base, "seed": r, "tag": f"{name}-{r}"})
            )
    for k in (1, 3):
        res["rss"].append(
            {
                "train_rows": k * n_train * part,
                **run_worker(
                    "lists_stream",
                    {**base, "train": data["parts"][: k * n_train], "test": None, "tag": f"rss{k}"},
                ),
            }
        )
    res["load_after"] = machine_load()
    res["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    sps = {
        n: [x["samples_per_second"] for x in runs if "samples_per_second" in x]
        for n, runs in res["runs"].items()
    }
    ratios = [s / b for s, b in zip(sps["stream"], sps["bare"], strict=False)]
    res["median_samples_per_second"] = {n: statistics.median(v) for n, v in sps.items() if v}
    res["ratio_stream_to_bare"] = {
        "median": statistics.median(ratios) if ratios else None,
        "per_rep": [round(x, 3) for x in ratios],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput_lists.json").write_text(json.dumps(res, indent=1))
    bare0 = next((x for x in res["runs"]["bare"] if "mean_elements" in x), {})
    lines = [
        "# Training throughput with list and sequence features (issue #13)",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine load: before `{res['uptime_before']}`; after `{res['uptime_after']}` (a shared "
        f"2-core machine with other jobs running: absolute samples/s are not idle-machine "
        f"figures; the ratio is from interleaved runs under the same load).",
        "",
        f"ESMM (embedding {EMB}, towers {'×'.join(map(str, TOWER))}, batch {BATCH}, one epoch, "
        f"{args.threads} threads), 3 list features (mean pooling) and `hist_purchased` (target "
        f"attention). Mean elements per row: {bare0.get('mean_elements')}; padded widths: "
        f"{bare0.get('padded_width')}.",
        "",
        "| system | samples/s per rep | median |",
        "|---|---|---:|",
    ]
    for n, label in (("bare", "bare loop, pre-encoded tensors"), ("stream", "mtrank fit_stream")):
        lines.append(
            f"| {label} | {', '.join(f'{x:,.0f}' for x in sps[n])} | "
            f"{res['median_samples_per_second'].get(n, 0):,.0f} |"
        )
    med = res["ratio_stream_to_bare"]["median"]
    lines += [
        "",
        f"fit_stream ÷ bare loop, per repetition: {res['ratio_stream_to_bare']['per_rep']}; "
        f"median **{med:.2f}×** (goal ≥ 0.8×)."
        if med
        else "no ratio (a run failed)",
        "",
        "Peak RSS of streamed training (fresh process each):",
        "",
        "| train rows | peak RSS MiB |",
        "|---:|---:|",
        *[f"| {x['train_rows']:,} | {x.get('peak_rss_mib', x.get('error'))} |" for x in res["rss"]],
        "",
    ]
    (out / "throughput_lists.md").write_text("\n".join(lines))
    print("\n".join(lines))


WORKERS = {
    "lists_stream": worker_lists_stream,
    "lists_bare": worker_lists_bare,
    "export": worker_export,
    "mtrank_stream": worker_mtrank_stream,
    "mtrank_stream_padded": worker_mtrank_stream_padded,
    "bare": worker_bare,
    "stream_only": worker_stream_only,
    "rss": worker_rss,
    "torch_profile": worker_torch_profile,
}


# --------------------------------------------------------------------------- roofline
def roofline(threads: int, in_dim: int, reps: int) -> dict:
    """fp32 matmul GFLOP/s on the towers' fwd + bwd shapes at batch 4096, and the FLOPs per
    training sample (both towers: forward MACs × 2 FLOPs × 3 for forward + backward)."""
    import torch

    torch.set_num_threads(threads)
    dims = [in_dim, *TOWER, 1]
    macs = 2 * sum(a * b for a, b in itertools.pairwise(dims))  # two towers
    flops_per_sample = 3 * 2 * macs
    shapes = []  # (m, k, n) of forward, grad-input and grad-weight products of each layer
    for k, n in itertools.pairwise(dims):
        shapes += [(BATCH, k, n), (BATCH, n, k), (k, BATCH, n)]
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    for x, y in mats:
        torch.mm(x, y)
    t0 = time.perf_counter()
    for _ in range(reps):
        for _ in range(2):  # two towers
            for x, y in mats:
                torch.mm(x, y)
    sec = time.perf_counter() - t0
    tower_gflops = reps * 2 * sum(2 * m * k * n for m, k, n in shapes) / sec / 1e9
    big = torch.randn(2048, 2048)
    torch.mm(big, big)
    t0 = time.perf_counter()
    for _ in range(5):
        torch.mm(big, big)
    peak = 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    return {
        "threads": threads,
        "tower_input_dim": in_dim,
        "macs_forward_per_sample": macs,
        "train_flops_per_sample": flops_per_sample,
        "tower_shapes_gflops": round(tower_gflops, 1),
        "square_2048_gflops": round(peak, 1),
        "ceiling_samples_per_second": round(tower_gflops * 1e9 / flops_per_sample, 0),
    }


# --------------------------------------------------------------------------- py-spy
def pyspy_profile(a: dict, pyspy: str, seconds: int) -> dict:
    """Sample the streamed training process (all threads) with py-spy; self and inclusive time
    per function, and the share spent in the data path (stream / encoders / polars / pyarrow)."""
    raw = Path(a["workdir"]) / "pyspy.txt"
    cmd = [
        pyspy,
        "record",
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "--rate",
        "50",
        "--duration",
        str(seconds),
        "-o",
        str(raw),
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "mtrank_stream",
        "--worker-args",
        json.dumps(a),
        "--worker-out",
        str(Path(a["workdir"]) / "pyspy-run.json"),
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=seconds + 600, check=False
    )
    if not raw.exists():
        return {"error": f"py-spy exit {proc.returncode}: {proc.stderr[-800:]}"}
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        # keep the training loop and the prefetch thread; imports and set-up are not the hot path
        if not frames or not (
            any("Trainer.fit" in f for f in frames) or "ThreadPoolExecutor" in frames[0]
        ):
            continue
        total += n
        threads[frames[0]] = threads.get(frames[0], 0) + n
        names = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
            if " (" in f
            else f
            for f in frames[1:]
        ]
        if names:
            self_t[names[-1]] = self_t.get(names[-1], 0) + n
        for nm in set(names):
            incl[nm] = incl.get(nm, 0) + n
    pct = lambda d, k=12: [
        {"function": f, "pct": round(100 * v / total, 1)}
        for f, v in sorted(d.items(), key=lambda x: -x[1])[:k]
    ]
    return {
        "samples": total,
        "threads": pct(threads, 4),
        "top_self": pct(self_t, 15),
        "top_inclusive": pct(incl, 25),
    }


# --------------------------------------------------------------------------- report
def ratio(a, b):
    return None if not a or not b else round(a / b, 2)


def markdown(res: dict) -> str:
    L = [
        "# Training throughput and test AUC: mtrank vs bare loop vs torch-rechub vs "
        "DeepCTR-Torch (issues #6, #18)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}  ",
        f"Load before: {res['load_before']}; after: {res['load_after']}  ",
        (
            f"ESMM, embedding {EMB}, towers {'×'.join(map(str, TOWER))}, batch {BATCH}, "
            f"{res['threads']} threads, 1 epoch over {res['train_rows']:,} train rows, "
            f"test {res['test_rows']:,} rows. Samples/s are of the training loop (mtrank "
            "streamed: from the first batch read to the last step, "
            "reading and encoding overlapped); `end to end` = train rows ÷ the whole "
            "`fit_stream` wall time (streamed encoder fit, "
            f"training, validation and the {res['test_rows']:,}-row test evaluation)."
        ),
        "",
    ]
    rf = res["roofline"]
    L += [
        (
            "**Roofline**: torch.mm on the towers' fwd+bwd shapes = "
            f"{rf['tower_shapes_gflops']} GFLOP/s "
            f"(2048² square: {rf['square_2048_gflops']}); training FLOPs/sample = 3 × 2 × "
            f"{rf['macs_forward_per_sample']:,} MACs = "
            f"{rf['train_flops_per_sample'] / 1e6:.2f} MFLOP → ceiling "
            f"**{rf['ceiling_samples_per_second']:,.0f} samples/s** "
            "(towers only; embedding gather/scatter and optimizer not counted)."
        ),
        "",
    ]
    nrep = max(
        (len(v) for r in res["regimes"].values() for v in r.get("runs", {}).values()), default=1
    )
    L += [
        (
            f"Every system ran {nrep} times, interleaved (repetition r: every system once with "
            "seed r, the order rotated); samples/s is the median, "
            "`× fastest peer` the median (range) over repetitions of the ratio to the fastest "
            "peer of the same repetition; AUCs are means over repetitions."
        ),
        "",
        "| regime | emb. rows | run | optimizer | parameters | samples/s | × fastest peer "
        "(range) | × bare (same opt.) | % roofline | AUC CTR | AUC CTCVR | AUC CVR (clicked) | "
        "peak RSS MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for regime, r in res["regimes"].items():
        vs = r.get("vs_peers", {})
        for key, run, opt in [
            ("mtrank_dense", "mtrank streamed", "Adam"),
            ("mtrank_sparse", "mtrank streamed", "SparseAdam+Adam"),
            ("bare_dense", "bare tensors", "Adam"),
            ("bare_sparse", "bare tensors", "SparseAdam+Adam"),
            ("rechub", "torch-rechub", "Adam (wd 0)"),
            ("deepctr", "DeepCTR-Torch", "Adam (its defaults)"),
        ]:
            x = r.get(key)
            if not x:
                continue
            if "error" in x:
                L.append(
                    f"| {regime} | | {run} | {opt} | | error: "
                    f"{x['error'][:200].replace('|', '/')} | | | | | | | |"
                )
                continue
            sps = x["samples_per_second"]
            bare = (
                r.get("bare_" + key.split("_")[1], {}).get("samples_per_second")
                if key.startswith("mtrank")
                else None
            )
            t = x.get("test", {})
            e2e = (
                f" (end to end {x['end_to_end_samples_per_second']:,.0f})"
                if "end_to_end_samples_per_second" in x
                else ""
            )
            sr = (vs.get(key) or {}).get("speed_ratio_to_fastest_peer")
            srs = f"{sr['median']} ({sr['min']}–{sr['max']})" if sr else ""
            L.append(
                f"| {regime} | {x.get('embedding_rows', ''):,} | {run} | {opt} | "
                f"{x.get('parameters', 0):,} | {sps:,.0f}{e2e} | {srs} | "
                f"{ratio(sps, bare) or ''} | "
                f"{100 * sps / rf['ceiling_samples_per_second']:.0f}% | {t.get('auc_ctr')} | "
                f"{t.get('auc_ctcvr')} | {t.get('auc_cvr_masked')} | "
                f"{x.get('peak_rss_mib', '')} |"
            )
    L += [
        "",
        "Paired test-AUC differences, mtrank − best peer on that metric (mean ± sd over seeds; "
        "seeds where mtrank ≥ peer):",
        "",
        "| regime | run | Δ AUC CTR | Δ AUC CTCVR | Δ AUC CVR (clicked) |",
        "|---|---|---:|---:|---:|",
    ]
    for regime, r in res["regimes"].items():
        for key, v in r.get("vs_peers", {}).items():
            cells = []
            for m in METRICS:
                d = v["auc_minus_best_peer"][m]
                cells.append(
                    ""
                    if d["mean"] is None
                    else f"{d['mean']:+.4f} ± {d['sd'] or 0:.4f} vs {PEERS[d['best_peer']]} "
                    f"({d['n_not_negative']}/{d['n']})"
                )
            L.append(f"| {regime} | {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
    L += [
        "",
        "Data path alone (streamed read → validate → encode → shuffle → batch, no model): "
        + "; ".join(
            f"{k}: {v.get('samples_per_second', 0):,.0f} rows/s"
            if "error" not in v
            else f"{k}: {v['error'][:100]}"
            for k, v in (
                (k, r.get("stream_only", {"error": "n/a"})) for k, r in res["regimes"].items()
            )
        ),
        "",
    ]
    L += [
        "## Peak RSS of streamed training (own process each, VmHWM)",
        "",
        "| train files (rows) | rows trained | samples/s | peak RSS MiB | vs smallest |",
        "|---:|---:|---:|---:|---:|",
    ]
    base = None
    for x in res["rss"]:
        if "error" in x:
            L.append(f"| {x.get('size')} | error: {x['error'][:200]} | | | |")
            continue
        base = base or x["peak_rss_mib"]
        L.append(
            f"| {x['rows_read']:,} | {x['rows_trained']:,} ({x['fraction']:.0%} of each piece) "
            f"| {x['samples_per_second']:,.0f} | {x['peak_rss_mib']:,.0f} | "
            f"{x['peak_rss_mib'] / base:.2f}× |"
        )
    pdd = res.get("padded")
    if pdd:
        rows = pdd.get("bare_dense", {}).get("embedding_rows", 0)
        L += [
            "",
            f"## Ali-CCP-like, every declared id allocated ({rows:,} embedding rows, "
            f"{pdd['steps']} steps of {BATCH})",
            "",
            (
                "The row budget realises only part of the declared catalogue; a full Ali-CCP "
                "log realises it all, and dense optimizers pay per "
                "table row every step. Same rows and model, tables padded to the declared "
                f"sizes {pdd['pad']}:"
            ),
            "",
            "| run | optimizer | samples/s | × rechub |",
            "|---|---|---:|---:|",
        ]
        rech = pdd.get("rechub", {}).get("samples_per_second")
        for key, run, opt in [
            ("mtrank_sparse", "mtrank streamed (whole epoch)", "SparseAdam+Adam"),
            ("bare_dense", "mtrank model, bare loop", "Adam"),
            ("bare_sparse", "mtrank model, bare loop", "SparseAdam+Adam"),
            ("rechub", "torch-rechub", "Adam (wd 0)"),
        ]:
            x = pdd.get(key, {})
            L.append(
                f"| {run} | {opt} | {x.get('samples_per_second', x.get('error', '')):,.0f} | "
                f"{ratio(x.get('samples_per_second'), rech) or ''} |"
            )
    L += ["", "## Goals", ""] + [
        f"- {'✅' if g['met'] else ('❌' if g['met'] is False else '–')} {g['goal']}: {g['value']}"
        for g in res["goals"]
    ]
    prof = res.get("profile", {})
    if prof:
        L += ["", "## Profile of the streamed hot path", ""]
        tp = prof.get("torch")
        if tp and "error" not in tp:
            L += [
                f"torch.profiler, {tp['steps']} steps ({res['profile_regime']}, dense Adam): "
                f"ms per step {tp['ms_per_step']}",
                "",
                "| op | self ms/step | calls/step |",
                "|---|---:|---:|",
            ] + [
                f"| `{o['op']}` | {o['self_ms_per_step']} | {o['calls_per_step']} |"
                for o in tp["top_self_ops"]
            ]
        ps = prof.get("pyspy")
        if ps and "error" not in ps:
            L += [
                "",
                f"py-spy ({ps['samples']} samples of the training loop and the prefetch "
                f"thread; % of those): threads {ps['threads']}",
                "",
                "| function (inclusive) | % |",
                "|---|---:|",
            ]
            L += [f"| `{f['function']}` | {f['pct']} |" for f in ps["top_inclusive"]]
            L += ["", "| function (self) | % |", "|---|---:|"] + [
                f"| `{f['function']}` | {f['pct']} |" for f in ps["top_self"]
            ]
        elif ps:
            L += ["", f"py-spy: {ps['error'][:400]}"]
    if res.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


def goals(res: dict) -> list[dict]:
    g = []
    rf = res["roofline"]["ceiling_samples_per_second"]
    R = res["regimes"]

    def sps(reg, key):
        return R.get(reg, {}).get(key, {}).get("samples_per_second")

    best = lambda reg: (
        max([x for x in (sps(reg, "mtrank_dense"), sps(reg, "mtrank_sparse")) if x] or [0]) or None
    )
    r = ratio(best("aliccp"), sps("aliccp", "rechub"))
    g.append(
        {
            "goal": "Ali-CCP-like vocab as realised by 500k rows: mtrank ≥ 5× torch-rechub "
            "samples/s (best optimizer)",
            "value": f"{r}×",
            "met": None if r is None else r >= 5,
        }
    )
    pdd = res.get("padded") or {}
    r = ratio(
        pdd.get("mtrank_sparse", {}).get("samples_per_second"),
        pdd.get("rechub", {}).get("samples_per_second"),
    )
    g.append(
        {
            "goal": "… with every declared Ali-CCP-like id allocated (4.7M embedding rows): "
            "mtrank streamed ≥ 5× torch-rechub",
            "value": f"{r}×",
            "met": None if r is None else r >= 5,
        }
    )
    r = ratio(best("small"), sps("small", "rechub"))
    g.append(
        {
            "goal": "small vocab: mtrank ≥ 1.5× rechub",
            "value": f"{r}×",
            "met": None if r is None else r >= 1.5,
        }
    )
    p = None if not best("small") else best("small") / rf
    g.append(
        {
            "goal": "small vocab: mtrank ≥ 50% of the fp32 roofline",
            "value": None if p is None else f"{100 * p:.0f}%",
            "met": None if p is None else p >= 0.5,
        }
    )
    for reg in R:
        for opt in ("dense", "sparse"):
            r = ratio(sps(reg, f"mtrank_{opt}"), sps(reg, f"bare_{opt}"))
            g.append(
                {
                    "goal": f"{reg}, {opt}: mtrank end to end ≥ 0.7× bare loop",
                    "value": f"{r}×",
                    "met": None if r is None else r >= 0.7,
                }
            )
    for reg, rr in R.items():
        vs = rr.get("vs_peers", {})
        for key in ("mtrank_dense", "mtrank_sparse"):
            v = vs.get(key)
            if not v:
                continue
            sr = v["speed_ratio_to_fastest_peer"]
            g.append(
                {
                    "goal": f"{reg}, mtrank streamed {key.split('_')[1]}: samples/s ≥ 1.5× the "
                    "fastest peer (median over repetitions)",
                    "value": f"{sr['median']}× (range {sr['min']}–{sr['max']})" if sr else None,
                    "met": None if not sr else sr["median"] >= 1.5,
                }
            )
            for m in METRICS:
                d = v["auc_minus_best_peer"][m]
                if d["mean"] is None:
                    continue
                g.append(
                    {
                        "goal": f"{reg}, mtrank streamed {key.split('_')[1]}: test {m} ≥ best "
                        f"peer ({PEERS[d['best_peer']]}), paired over {d['n']} seeds",
                        "value": f"{d['mean']:+.4f} ± {d['sd'] or 0:.4f} "
                        f"({d['n_not_negative']}/{d['n']} seeds ≥)",
                        "met": d["mean"] >= 0,
                    }
                )
    ok = [x for x in res["rss"] if "error" not in x]
    if ok:
        big, small = ok[-1]["peak_rss_mib"], ok[0]["peak_rss_mib"]
        g.append(
            {
                "goal": f"peak RSS at {ok[-1]['rows_read']:,} streamed rows < 2 GiB",
                "value": f"{big:.0f} MiB",
                "met": big < 2048,
            }
        )
        g.append(
            {
                "goal": f"… and within 20% of {ok[0]['rows_read']:,} rows",
                "value": f"{big / small:.2f}×",
                "met": big <= 1.2 * small,
            }
        )
    return g


SYSTEMS = [  # (key, worker, sparse embedding updates)
    ("mtrank_dense", "mtrank_stream", False),
    ("mtrank_sparse", "mtrank_stream", True),
    ("bare_dense", "bare", False),
    ("bare_sparse", "bare", True),
    ("rechub", "rechub", None),
    ("deepctr", "deepctr", None),
]
PEER_COLUMNS = {
    "rechub": ("ctr", 1, "cvr", 0, "ctcvr", 2),
    "deepctr": ("ctr", 0, "cvr", 1, "ctcvr", 2),
}  # prediction file columns


def peer_quality(export: str, pred_path: str, peer: str) -> dict:
    """Test AUCs of a peer's saved predictions with mtrank's exact AUC (CVR on clicked rows
    only)."""
    import numpy as np

    from mtrank.metrics.core import auc

    z = np.load(export)
    p = np.load(pred_path)
    col = dict(zip(PEER_COLUMNS[peer][::2], PEER_COLUMNS[peer][1::2], strict=True))
    click, conv = z["test_click"], z["test_conv"]
    m = click > 0
    return {
        "auc_ctr": round(auc(click, p[:, col["ctr"]]), 4),
        "auc_ctcvr": round(auc(click * conv, p[:, col["ctcvr"]]), 4),
        "auc_cvr_masked": round(auc(conv[m], p[m, col["cvr"]]), 4),
    }


def interleaved_runs(
    args, regime: str, base: dict, export: str, skip: set, peers: dict
) -> dict[str, list[dict]]:
    """``args.reps`` repetitions of every system, interleaved (repetition r runs each system once,
    the starting system rotated by r, all with seed r), so machine-load drift hits all alike."""
    systems = [
        s
        for s in SYSTEMS
        if not (s[1] == "bare" and "bare" in skip)
        and (s[1] not in PEERS or s[1] in peers)
        and f"{regime}:{s[0]}" not in skip
    ]
    runs: dict[str, list[dict]] = {k: [] for k, _, _ in systems}
    for rep in range(args.reps):
        for key, worker, sparse in systems[rep % len(systems) :] + systems[: rep % len(systems)]:
            a = {**base, "seed": rep, "tag": f"{regime}-{key}-{rep}"}
            if worker in PEERS:
                x = run_worker(
                    worker,
                    {**a, "npz": export, "emb": EMB, "tower": TOWER, "batch": BATCH},
                    python=peers[worker],
                )
                if "error" not in x:
                    x["test"] = peer_quality(export, x.pop("pred_path"), worker)
            else:
                x = run_worker(worker, {**a, "sparse": sparse})
            x["seed"] = rep
            runs[key].append(x)
    return runs


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per system: median samples/s, mean test AUCs, and (as ``<key>`` entries the report reads)
    a representative result; plus ``vs_peers``: per mtrank system and repetition, the ratio of
    samples/s to the fastest peer of that repetition and the paired AUC differences to the best
    peer (the peer with the highest mean AUC on that metric)."""
    import statistics as st

    out: dict = {}
    ok = {k: [x for x in v if "error" not in x] for k, v in runs.items()}
    for k, xs in ok.items():
        if not xs:
            out[k] = runs[k][0] if runs[k] else {}
            continue
        med = sorted(xs, key=lambda x: x["samples_per_second"])[len(xs) // 2]
        out[k] = {
            **med,
            "samples_per_second": st.median(x["samples_per_second"] for x in xs),
            "reps": len(xs),
            "samples_per_second_all": [x["samples_per_second"] for x in xs],
            "test": {m: round(st.mean(x["test"][m] for x in xs), 4) for m in METRICS},
            "test_sd": {
                m: round(st.stdev([x["test"][m] for x in xs]), 4) if len(xs) > 1 else 0.0
                for m in METRICS
            },
        }
        if "end_to_end_samples_per_second" in med:
            out[k]["end_to_end_samples_per_second"] = st.median(
                x["end_to_end_samples_per_second"] for x in xs
            )
    peer_keys = [k for k in PEERS if ok.get(k)]
    vs: dict = {}
    for k in ("mtrank_dense", "mtrank_sparse", "bare_dense", "bare_sparse"):
        if not ok.get(k) or not peer_keys:
            continue
        by_seed = {x["seed"]: x for x in ok[k]}
        ratios = []
        for seed, x in by_seed.items():
            fastest = max(
                (y["samples_per_second"] for p in peer_keys for y in ok[p] if y["seed"] == seed),
                default=None,
            )
            if fastest:
                ratios.append(x["samples_per_second"] / fastest)
        auc_diff = {}
        for m in METRICS:
            best = max(peer_keys, key=lambda p: out[p]["test"][m])
            peer_by_seed = {y["seed"]: y["test"][m] for y in ok[best]}
            d = [by_seed[s]["test"][m] - peer_by_seed[s] for s in by_seed if s in peer_by_seed]
            auc_diff[m] = {
                "best_peer": best,
                "mean": round(st.mean(d), 4) if d else None,
                "sd": round(st.stdev(d), 4) if len(d) > 1 else None,
                "n_positive": sum(v > 0 for v in d),
                "n_not_negative": sum(v >= 0 for v in d),
                "n": len(d),
            }
        vs[k] = {
            "speed_ratio_to_fastest_peer": {
                "median": round(st.median(ratios), 2),
                "min": round(min(ratios), 2),
                "max": round(max(ratios), 2),
            }
            if ratios
            else None,
            "auc_minus_best_peer": auc_diff,
        }
    out["vs_peers"] = vs
    return out


METRICS = ("auc_ctr", "auc_ctcvr", "auc_cvr_masked")


def padded_runs(args, base: dict, export: str, with_rechub: bool) -> dict:
    """Ali-CCP-like regime with every declared id allocated (4M items, 400k users, 200k shops,
    100k brands): the table size a full Ali-CCP log realises, which the row budget does not.
    Bare loop (dense and sparse) and torch-rechub on the same rows, ``args.padded_steps`` steps."""
    reg = REGIMES["aliccp"]
    pad = {
        "user_id": reg["n_users"] + 2,
        "item_id": reg["n_items"] + 2,
        "brand": reg["n_brands"] + 2,
        "shop": reg["n_shops"] + 2,
    }
    steps = args.padded_steps
    out = {"pad": pad, "steps": steps}
    out["mtrank_sparse"] = run_worker(
        "mtrank_stream_padded", {**base, "sparse": True, "tag": "padded-sparse", "pad": pad}
    )
    for opt in ("dense", "sparse"):
        out[f"bare_{opt}"] = run_worker(
            "bare",
            {
                **base,
                "sparse": opt == "sparse",
                "tag": f"padded-{opt}",
                "pad": pad,
                "max_steps": steps,
            },
        )
    if with_rechub:
        x = run_worker(
            "rechub",
            {
                **base,
                "tag": "padded",
                "npz": export,
                "emb": EMB,
                "tower": TOWER,
                "batch": BATCH,
                "pad": pad,
                "max_rows": steps * BATCH,
            },
            python=args.rechub_python,
        )
        x.pop("pred_path", None)
        out["rechub"] = x
    return out


def collect_runs(args, work: Path, regimes: list[str]) -> dict:
    """Rebuild a result from the worker files a run left in ``work`` (``result-<worker>-<regime>-
    <system>-<rep>.json`` and the peers' predictions), for a run stopped before its last
    repetition: only completed worker runs are used, and the report says so."""
    import re

    res: dict = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "threads": args.threads,
        "train_rows": args.train_rows,
        "test_rows": args.test_rows,
        "load_before": machine_load(),
        "load_after": machine_load(),
        "regimes": {},
        "rss": [],
        "notes": [
            f"collected with --collect from the worker files in {work} of a run stopped before "
            "all repetitions finished"
        ],
    }
    pat = re.compile(r"result-(mtrank_stream|bare|rechub|deepctr)-(\w+)-(\w+)-(\d+)\.json$")
    for regime in regimes:
        export = str(work / f"{regime}-encoded.npz")
        runs: dict[str, list[dict]] = {}
        for f in sorted(work.glob(f"result-*-{regime}-*.json")):
            m = pat.search(f.name)
            if not m:
                continue
            worker, _reg, key, rep_ = m.groups()
            x = json.loads(f.read_text())
            if worker in PEERS:
                pred = f.with_suffix(".pred.npy")
                if not pred.exists():
                    continue
                x.pop("pred_path", None)
                x["test"] = peer_quality(export, str(pred), worker)
            x["seed"] = int(rep_)
            runs.setdefault(key, []).append(x)
        r = {"runs": runs}
        r.update(summarise(runs))
        res["regimes"][regime] = r
    return res


def merge_runs(dirs: list[Path], out: Path, notes: list[str] | None = None) -> None:
    """One report from runs of the same script over different regimes (run side by side): their
    regimes, commands, loads and notes together; the other parts from the first run that has them,
    else from ``out``'s previous ``throughput.json``."""
    parts = [json.loads((d / "throughput.json").read_text()) for d in dirs]
    res = {
        **parts[0],
        "regimes": {},
        "notes": [],
        "command": "; ".join(p["command"] for p in parts),
        "load_before": [p["load_before"] for p in parts],
        "load_after": [p["load_after"] for p in parts],
    }
    for p in parts:
        res["regimes"].update(p["regimes"])
        res["notes"] += [n for n in p["notes"] if n not in res["notes"]]
    res["notes"].append(
        f"merged from {len(parts)} runs started side by side "
        f"({', '.join(str(d) for d in dirs)}) with `--merge`"
    )
    res["notes"] += notes or []
    prev_path = out / "throughput.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    for key in ("rss", "profile", "profile_regime", "padded"):
        if not res.get(key):
            have = next((p[key] for p in parts if p.get(key)), None)
            if have is None and prev.get(key):
                have = prev[key]
                if key != "profile_regime":
                    res["notes"].append(
                        f"`{key}` section carried over from the previous run of this script "
                        f"(started {prev['load_before']['utc']} UTC), not rerun this time"
                    )
            if have:
                res[key] = have
    res["goals"] = goals(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(res, indent=1))
    (out / "throughput.md").write_text(markdown(res))
    print(markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument(
        "--train-rows", type=int, default=500_000, help="throughput: rows in the one training epoch"
    )
    ap.add_argument("--test-rows", type=int, default=200_000)
    ap.add_argument("--val-rows", type=int, default=50_000)
    ap.add_argument(
        "--rss-sizes",
        default="1000000,5000000,20000000",
        help="comma-separated streamed train sizes for peak RSS",
    )
    ap.add_argument(
        "--rss-train-rows",
        type=int,
        default=1_000_000,
        help="train on at most this many rows per RSS run (the rest of each piece is read and "
        "encoded only)",
    )
    ap.add_argument("--regimes", default="small,aliccp")
    ap.add_argument(
        "--padded-steps",
        type=int,
        default=40,
        help="steps of the declared-vocabulary (padded) runs",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rechub-python", default="/tmp/rechub-venv/bin/python")
    ap.add_argument("--deepctr-python", default="/tmp/deepctr-venv/bin/python")
    ap.add_argument(
        "--reps",
        type=int,
        default=3,
        help="interleaved repetitions; repetition r trains every system with seed r",
    )
    ap.add_argument("--pyspy", default="/tmp/rechub-venv/bin/py-spy")
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: "
        "rechub,deepctr,rss,profile,padded,bare,stream_only, or REGIME:SYSTEM (e.g. "
        "aliccp:mtrank_dense)",
    )
    ap.add_argument(
        "--collect",
        action="store_true",
        help="rebuild the report from the worker files in --workdir (a run stopped early) and stop",
    )
    ap.add_argument(
        "--note",
        action="append",
        default=[],
        help="a note for the report (with --collect or --merge; repeatable)",
    )
    ap.add_argument(
        "--merge",
        help="comma-separated result folders of runs over different regimes: write their union "
        "to --out and stop",
    )
    ap.add_argument("--workdir", default="/tmp/mtrank-throughput")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument(
        "--only-data", action="store_true", help="generate (or reuse) the simulated files and stop"
    )
    ap.add_argument("--lists", action="store_true", help="the list/sequence row only")
    ap.add_argument("--part-rows", type=int, default=50_000, help="--lists: rows per Parquet part")
    ap.add_argument("--worker")
    ap.add_argument("--worker-args")
    ap.add_argument("--worker-out")
    args = ap.parse_args()
    if args.worker:
        res = WORKERS[args.worker](json.loads(args.worker_args))
        Path(args.worker_out).write_text(json.dumps(res))
        return
    if args.collect:
        d = Path(args.workdir) / "collected"
        d.mkdir(parents=True, exist_ok=True)
        res = collect_runs(args, Path(args.workdir), args.regimes.split(","))
        res["notes"] += [n for n in args.note]
        from mtrank.data.simulate import SIMULATED_SCHEMA as S

        res["roofline"] = roofline(
            args.threads, len(S.categorical) * EMB + len(S.numerical), reps=3
        )
        (d / "throughput.json").write_text(json.dumps(res, indent=1))
        merge_runs([d], Path(args.out))
        return
    if args.merge:
        merge_runs([Path(d) for d in args.merge.split(",")], Path(args.out), args.note)
        return
    if args.lists:
        lists_row(args, Path(args.workdir))
        return
    if args.quick:
        args.train_rows, args.test_rows, args.val_rows, args.rss_sizes, args.rss_train_rows = (
            40_000,
            20_000,
            10_000,
            "40000,80000",
            40_000,
        )
        args.workdir += "-quick"
        args.padded_steps = 3
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    part = args.train_rows
    rss_sizes = [int(x) for x in args.rss_sizes.split(",") if x]
    res: dict = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "threads": args.threads,
        "train_rows": args.train_rows,
        "test_rows": args.test_rows,
        "load_before": machine_load(),
        "regimes": {},
        "rss": [],
        "notes": [],
    }
    import torch

    res["machine"] += f", torch {torch.__version__}"
    from mtrank.data.simulate import SIMULATED_SCHEMA

    in_dim = len(SIMULATED_SCHEMA.categorical) * EMB + len(SIMULATED_SCHEMA.numerical)
    data = {}
    for regime in args.regimes.split(","):
        total = max(
            [args.train_rows] + (rss_sizes if regime == "small" and "rss" not in skip else [])
        )
        t0 = time.perf_counter()
        data[regime] = make_data(work, regime, total, part, args.val_rows, args.test_rows)
        print(
            f"data {regime}: {len(data[regime]['parts'])} parts ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    if args.only_data:
        return
    res["roofline"] = roofline(args.threads, in_dim, reps=3 if args.quick else 20)
    print("roofline", res["roofline"], flush=True)
    peers = {}  # peer worker → its interpreter
    for name, python in (("rechub", args.rechub_python), ("deepctr", args.deepctr_python)):
        if name in skip:
            continue
        if Path(python).exists():
            peers[name] = python
        else:
            res["notes"].append(
                f"{PEERS[name]} not run: {python} does not exist (see the setup commands in "
                "the docstring)"
            )
    have_rechub = "rechub" in peers
    for regime, d in data.items():
        base = {
            "workdir": str(work),
            "threads": args.threads,
            "train": d["parts"][:1],
            "val": d["val"],
            "test": d["test"],
        }
        r: dict = {"sim": d["sim"]["config"]}
        export = str(work / f"{regime}-encoded.npz")
        r["export"] = run_worker("export", {**base, "tag": regime, "export": export})
        if "stream_only" not in skip:
            r["stream_only"] = run_worker("stream_only", {**base, "tag": regime})
        r["runs"] = interleaved_runs(args, regime, base, export, skip, peers)
        r.update(summarise(r["runs"]))
        res["regimes"][regime] = r
        if regime == "aliccp" and "padded" not in skip:
            res["padded"] = padded_runs(args, base, export, have_rechub and "rechub" not in skip)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "throughput.partial.json").write_text(json.dumps(res, indent=1))
    if "rss" not in skip:
        for size in rss_sizes:
            frac = min(1.0, args.rss_train_rows / size)
            x = run_worker(
                "rss",
                {
                    "workdir": str(work),
                    "threads": args.threads,
                    "sparse": False,
                    "fraction": frac,
                    "tag": str(size),
                    "train": files_for(data["small"]["parts"], size, part),
                },
            )
            x["size"] = size
            res["rss"].append(x)
    if "profile" not in skip:
        preg = "aliccp" if "aliccp" in data else next(iter(data))
        res["profile_regime"] = preg
        pa = {
            "workdir": str(work),
            "threads": args.threads,
            "train": data[preg]["parts"][:1],
            "val": data[preg]["val"],
            "test": data[preg]["test"],
            "sparse": False,
            "tag": "profile",
        }
        res["profile"] = {
            "torch": run_worker("torch_profile", {**pa, "steps": 3 if args.quick else 40})
        }
        if Path(args.pyspy).exists():
            res["profile"]["pyspy"] = pyspy_profile(pa, args.pyspy, 20 if args.quick else 60)
        else:
            res["profile"]["pyspy"] = {"error": f"{args.pyspy} not found"}
    res["load_after"] = machine_load()
    out = Path(args.out)
    prev_path = out / "throughput.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    for part, keys in (
        ("rss", ["rss"]),
        ("profile", ["profile", "profile_regime"]),
        ("padded", ["padded"]),
    ):
        if part in skip and prev.get(keys[0]) and not res.get(keys[0]):
            res.update({k: prev[k] for k in keys if k in prev})
            res["notes"].append(
                f"`{part}` section carried over from the previous run of this script (started "
                f"{prev['load_before']['utc']} UTC), not rerun this time"
            )
    res["goals"] = goals(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "throughput.md").write_text(md)
    (out / "throughput.partial.json").unlink(missing_ok=True)
    print(md)


if __name__ == "__main__":
    main()
