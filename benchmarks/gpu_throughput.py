"""Training throughput of mtrank's ESMM on one GPU (issue 16), against a bare loop over
pre-materialised GPU tensors, torch-rechub on the same GPU, and the GPU's matmul roofline.

Same model as ``throughput.py`` (embedding 18, towers 360×200×80, the Ali-CCP-like vocabulary:
4M items, 400k users, 200k shops, 100k brands declared), batch 16,384, Adam:

1. ``mtrank_stream``: :func:`mtrank.workflow.fit_stream` from Parquet, two epochs: epoch 1
   reads, validates and encodes every piece (``readers`` threads) into the encoded-piece cache,
   epoch 2 reads the cache; batches are pinned and copied ``non_blocking`` by the prefetch
   thread. fp32 and bf16 (autocast), dense Adam; fp32 with SparseAdam on the tables.
2. ``bare``: the same model, loss and optimizers over the training tensors already on the GPU
   (the practical limit of this model in PyTorch), fp32 and bf16.
3. ``rechub``: torch-rechub's ESMM with its own ``MTLTrainer`` and ``DataGenerator`` loader on
   the same GPU and encoded ids (``_rechub_worker.py``; its loader collates row by row on the
   CPU, so it trains on the first ``--rechub-rows`` rows only).

plus the matmul roofline (torch.mm on the towers' forward and backward shapes at batch 16,384,
fp32 and bf16) and the GPU's utilisation sampled by NVML every 100 ms while each run trains.
Every run is its own process. Writes ``gpu_throughput.json`` and ``gpu_throughput.md`` (with the
GPU's name) to ``--out``.

One command on a GPU machine (CUDA tests + this benchmark, < 8 minutes on an H200):
``bash benchmarks/gpu_check.sh`` (see there for the wheels a bare CUDA image needs).
Directly: ``PYTHONPATH=src python benchmarks/gpu_throughput.py --out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Self

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import throughput  # noqa: E402 - sibling script, after sys.path
from throughput import EMB, TOWER, _encode_in_memory, make_data, peak_rss_mib  # noqa: E402

BATCH = 16_384
MACS_PER_SAMPLE = None  # computed from the model's shapes in roofline()


# --------------------------------------------------------------------------- measurement helpers
class GpuSampler:
    """Mean and max GPU utilisation (%) and peak memory used (MiB), sampled by NVML."""

    def __init__(self, index: int = 0, period: float = 0.1) -> None:
        self.samples: list[tuple[int, int]] = []
        self.period = period
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - no NVML: utilisation is reported as unknown
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.is_set():
            u = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            m = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append((u.gpu, m.used // 2**20))
            time.sleep(self.period)

    def __enter__(self) -> Self:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None, "gpu_mem_peak_mib": None}
        util = [s[0] for s in self.samples]
        return {
            "gpu_util_mean_pct": round(sum(util) / len(util), 1),
            "gpu_util_max_pct": max(util),
            "gpu_mem_peak_mib": max(s[1] for s in self.samples),
            "gpu_samples": len(util),
        }


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {
            "name": f"no GPU (CPU smoke run, {platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "cpu_cores": os.cpu_count(),
        }
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "multiprocessors": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _quality(metrics: dict) -> dict:
    return {
        k: (None if metrics.get(k) is None else round(float(metrics[k]), 4))
        for k in ("auc_ctr", "auc_ctcvr", "auc_cvr_masked")
    }


# ------------------------------------------------------------- workers (own process each)
def worker_mtrank_stream(a: dict) -> dict:
    """fit_stream on the GPU: streaming encoder fit, 2 epochs (Parquet, then the cache), test."""
    from mtrank.data.simulate import SIMULATED_SCHEMA
    from mtrank.models.config import ModelConfig
    from mtrank.train.trainer import TrainConfig
    from mtrank.workflow import fit_stream

    mcfg = ModelConfig(name="esmm", embedding_dim=EMB, tower=TOWER)
    tcfg = TrainConfig(
        epochs=2,
        batch_size=BATCH,
        lr=a["lr"],
        device=a["device"],
        precision=a["precision"],
        sparse_embeddings=a["sparse"],
        seed=0,
    )
    t0 = time.perf_counter()
    with GpuSampler() as gpu:
        out = fit_stream(
            [Path(p) for p in a["train"]],
            SIMULATED_SCHEMA,
            mcfg,
            tcfg,
            test_paths=[Path(a["test"])],
            quiet=True,
            cache_dir=Path(a["cache"]),
            readers=a["readers"],
        )
        sync(a["device"])
    wall = time.perf_counter() - t0
    h = out.result.history
    rows = out.bundle.meta["rows"]["train"]
    return {
        "epoch1_parquet_samples_per_second": round(h[0].samples_per_second, 1),
        "epoch2_cache_samples_per_second": round(h[1].samples_per_second, 1),
        "samples_per_second": round(h[0].samples_per_second, 1),
        "rows": rows,
        "epochs": len(h),
        "end_to_end_seconds": round(wall, 2),
        "end_to_end_samples_per_second": round(rows * len(h) / wall, 1),
        "embedding_rows": sum(out.bundle.spec.cardinalities),
        "test": _quality(out.metrics["test"]),
        **gpu.summary(),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def worker_bare(a: dict) -> dict:
    """The same model, loss and optimizers over tensors already on the GPU."""
    import numpy as np
    import torch

    from mtrank.data.simulate import SIMULATED_SCHEMA as S
    from mtrank.losses import model_loss
    from mtrank.models import build_model
    from mtrank.models.config import FeatureSpec, ModelConfig
    from mtrank.train.device import autocast, resolve_precision
    from mtrank.train.trainer import TrainConfig, make_optimizers
    from mtrank.workflow import evaluate_split

    dev = torch.device(a["device"])
    enc, train, test = _encode_in_memory(a)
    if a.get("export"):  # the same encoded ids for torch-rechub
        np.savez(
            a["export"],
            train_x=train.categorical.numpy(),
            test_x=test.categorical.numpy(),
            train_click=train.labels["click"].numpy(),
            train_conv=train.labels["conversion"].numpy(),
            test_click=test.labels["click"].numpy(),
            test_conv=test.labels["conversion"].numpy(),
            cardinalities=np.array(enc.cardinalities),
            fields=np.array(S.categorical),
        )
    train = train.to(dev)
    torch.manual_seed(0)
    spec = FeatureSpec(
        cardinalities=enc.cardinalities,
        n_numerical=len(enc.numerical),
        funnel=True,
        task_names=list(S.tasks),
    )
    model = build_model(spec, ModelConfig(name="esmm", embedding_dim=EMB, tower=TOWER)).to(dev)
    opts = make_optimizers(
        model, TrainConfig(batch_size=BATCH, lr=a["lr"], sparse_embeddings=a["sparse"])
    )
    dtype = resolve_precision(a["precision"], dev)
    gen = torch.Generator().manual_seed(0)

    def step(batch) -> None:
        with autocast(dev, dtype):
            out = model(batch.categorical, batch.numerical)
        loss, _ = model_loss(model, out, batch, parts=False)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    model.train()
    for i, batch in enumerate(train.batches(BATCH, shuffle=True, generator=gen)):  # warm-up
        step(batch)
        if i == 10:
            break
    sync(dev)
    seen = 0
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        for batch in train.batches(BATCH, shuffle=True, generator=gen):
            step(batch)
            seen += len(batch)
        sync(dev)
        sec = time.perf_counter() - t0
    return {
        "samples_per_second": round(seen / sec, 1),
        "train_seconds": round(sec, 2),
        "rows": seen,
        "embedding_rows": sum(enc.cardinalities),
        "test": _quality(evaluate_split(model, test, S)),
        **gpu.summary(),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def worker_roofline(a: dict) -> dict:
    """torch.mm on the towers' training shapes at batch 16,384, fp32 and bf16: GFLOP/s and the
    samples/s ceiling it implies (towers only; embedding gather and optimizer not counted)."""
    import torch

    from mtrank.data.simulate import SIMULATED_SCHEMA as S

    dev = torch.device(a["device"])
    rows = BATCH if dev.type == "cuda" else 1024  # a CPU smoke run only checks the code path
    in_dim = EMB * len(S.categorical) + len(S.numerical)
    dims = [in_dim, *TOWER, 1]
    layers = list(itertools.pairwise(dims))
    macs = 2 * sum(i * o for i, o in layers)  # two towers
    out = {
        "in_dim": in_dim,
        "batch": rows,
        "macs_per_sample": macs,
        "train_flops_per_sample": 6 * macs,
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        shapes = []
        for i, o in layers:  # forward x·W, backward dX = dY·Wᵀ and dW = Xᵀ·dY
            shapes += [((rows, i), (i, o)), ((rows, o), (o, i)), ((i, rows), (rows, o))]
        mats = [
            (torch.randn(*p, device=dev, dtype=dtype), torch.randn(*q, device=dev, dtype=dtype))
            for p, q in shapes
        ]
        flops = sum(2 * p[0] * p[1] * q[1] for p, q in shapes) * 2  # two towers
        for _ in range(20):
            for x, y in mats:
                x @ y
        sync(dev)
        reps = 200 if dev.type == "cuda" else 2
        t0 = time.perf_counter()
        for _ in range(reps):
            for _ in range(2):
                for x, y in mats:
                    x @ y
        sync(dev)
        sec = (time.perf_counter() - t0) / reps
        n = 8192 if dev.type == "cuda" else 256
        big = torch.randn(n, n, device=dev, dtype=dtype)
        big @ big
        sync(dev)
        t1 = time.perf_counter()
        for _ in range(10):
            big @ big
        sync(dev)
        square = 2 * n**3 * 10 / (time.perf_counter() - t1)
        out[name] = {
            "tower_gflops": round(flops / sec / 1e9, 1),
            "ceiling_samples_per_second": round(rows / sec, 0),
            "square_tflops": round(square / 1e12, 1),
            "square_n": n,
        }
    return out


WORKERS = {"mtrank_stream": worker_mtrank_stream, "bare": worker_bare, "roofline": worker_roofline}


# --------------------------------------------------------------------------- driver
def run_worker(name: str, args: dict, workdir: Path, timeout: float) -> dict:
    """:func:`throughput.run_worker` on this script's workers (torch-rechub's with this
    interpreter). ``timeout`` is sized for a GPU; a CPU smoke run gets 20 times as long."""
    if args.get("device") == "cpu":
        timeout *= 20
    args = {"threads": os.cpu_count(), **args, "workdir": str(workdir)}
    return throughput.run_worker(
        name, args, python=sys.executable, timeout=timeout, script=Path(__file__).resolve()
    )


def rechub_auc(res: dict, npz: str) -> dict:
    """Test AUCs of torch-rechub's saved predictions with mtrank's exact AUC (CVR on clicked
    rows)."""
    import numpy as np

    from mtrank.metrics.core import auc

    if "pred_path" not in res:
        return {}
    p = np.load(res["pred_path"])
    z = np.load(npz)
    click, conv = z["test_click"], z["test_conv"]
    clicked = click == 1
    return {
        "auc_ctr": round(auc(click, p[:, 1]), 4),
        "auc_ctcvr": round(auc(click * conv, p[:, 2]), 4),
        "auc_cvr_masked": round(auc(conv[clicked], p[clicked, 0]), 4),
    }


def markdown(doc: dict) -> str:
    g, roof = doc["gpu"], doc["roofline"]
    rech = doc["runs"].get("rechub", {}).get("samples_per_second")
    lines = [
        f"# mtrank on one GPU: {g.get('name')}",
        "",
        (
            f"{g.get('name')} ({g.get('memory_gib')} GiB, {g.get('multiprocessors')} SMs), "
            f"torch {g.get('torch')} CUDA {g.get('cuda')}, "
            f"{g.get('cpu_cores')} CPU cores; {doc['started_utc']} UTC. ESMM, embedding {EMB}, "
            f"towers {'×'.join(map(str, TOWER))}, batch {BATCH:,}, "
            f"Adam lr {doc['lr']}; {doc['train_rows']:,} training rows (Ali-CCP-like "
            f"vocabulary), test {doc['test_rows']:,} rows."
        ),
        "",
        f"Command: `{doc['command']}`",
        "",
    ]
    if "fp32" in roof:
        lines += [
            (
                "**Roofline** (torch.mm on the towers' fwd+bwd shapes at batch "
                f"{roof.get('batch', BATCH):,}; training FLOPs/sample "
                f"{roof['train_flops_per_sample']:,}): "
                f"fp32 {roof['fp32']['tower_gflops']:,} GFLOP/s → ceiling "
                f"{roof['fp32']['ceiling_samples_per_second']:,.0f} samples/s "
                f"(square n×n matmul: {roof['fp32']['square_tflops']} TFLOP/s); bf16 "
                f"{roof['bf16']['tower_gflops']:,} GFLOP/s → "
                f"{roof['bf16']['ceiling_samples_per_second']:,.0f} samples/s (square: "
                f"{roof['bf16']['square_tflops']} TFLOP/s)."
            ),
            "",
        ]
    lines += [
        "| run | precision | optimizer | samples/s | end to end | × rechub | × bare (same "
        "prec./opt.) | % roofline | GPU util mean/max % | AUC CTR | AUC CTCVR | AUC CVR "
        "(clicked) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in doc["runs"].items():
        if "error" in r:
            lines.append(
                f"| {key} | | | error: {r['error'][:120].replace('|', '/')} | | | | | | | | |"
            )
            continue
        sps = r.get("samples_per_second")
        prec, opt = r.get("precision", "fp32"), r.get("optimizer", "Adam")
        bare = (
            doc["runs"]
            .get(f"bare_{prec}_{'sparse' if opt != 'Adam' else 'dense'}", {})
            .get("samples_per_second")
        )
        ceiling = roof.get(prec, {}).get("ceiling_samples_per_second")
        t = r.get("test", {})
        e2e = r.get("end_to_end_samples_per_second")
        cell = f"{sps:,.0f}" if sps else ""
        if "epoch2_cache_samples_per_second" in r:
            cell = (
                f"{r['epoch1_parquet_samples_per_second']:,.0f} (epoch 1, Parquet) / "
                f"{r['epoch2_cache_samples_per_second']:,.0f} (epoch 2, cache)"
            )
        lines.append(
            f"| {key} | {prec} | {opt} | {cell} | {'' if e2e is None else f'{e2e:,.0f}'} | "
            f"{ratio(sps, rech)} | "
            f"{'' if key.startswith('bare') else ratio(sps, bare)} | "
            f"{'' if not ceiling or not sps else f'{100 * sps / ceiling:.1f}%'} | "
            f"{r.get('gpu_util_mean_pct')} / {r.get('gpu_util_max_pct')} | {t.get('auc_ctr')} "
            f"| {t.get('auc_ctcvr')} | {t.get('auc_cvr_masked')} |"
        )
    lines += ["", "## Notes", "", *[f"- {n}" for n in doc["notes"]], ""]
    return "\n".join(lines)


def ratio(a, b) -> str:
    return "" if not a or not b else f"{a / b:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mtrank-gpu-bench"))
    ap.add_argument(
        "--rows", type=int, default=6_000_000, help="training rows (Parquet parts of --part-rows)"
    )
    ap.add_argument("--part-rows", type=int, default=1_000_000)
    ap.add_argument("--test-rows", type=int, default=500_000)
    ap.add_argument(
        "--rechub-rows",
        type=int,
        default=1_000_000,
        help="rows torch-rechub trains on (its loader is per-row)",
    )
    ap.add_argument(
        "--readers", type=int, default=6, help="Parquet pieces read and encoded at once"
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=2.83e-3,
        help="Adam lr (default: 1e-3 × √(16384/2048), mtrank's GPU default)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 200k rows in parts of 100k")
    ap.add_argument(
        "--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script"
    )
    ap.add_argument("--worker")
    ap.add_argument("--worker-args")
    ap.add_argument("--worker-out")
    args = ap.parse_args()
    if args.worker:
        res = WORKERS[args.worker](json.loads(args.worker_args))
        Path(args.worker_out).write_text(json.dumps(res))
        return
    if args.quick:  # a smoke run of every code path (also on a CPU: --device cpu)
        args.rows, args.part_rows, args.test_rows, args.rechub_rows = (
            200_000,
            100_000,
            20_000,
            20_000,
        )
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_throughput.py needs a CUDA GPU (torch.cuda.is_available() is False); --device "
            "cpu smoke-tests it"
        )
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    t_data = time.perf_counter()
    data = make_data(args.workdir, "aliccp", args.rows, args.part_rows, 0, args.test_rows)
    data_seconds = round(time.perf_counter() - t_data, 1)
    train = data["parts"][: max(1, args.rows // args.part_rows)]
    import polars as pl

    doc = {
        "gpu": gpu_info(),
        "started_utc": started,
        "finished_utc": None,
        "command": "python benchmarks/gpu_throughput.py " + " ".join(sys.argv[1:]),
        "lr": args.lr,
        "train_rows": sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in train),
        "test_rows": pl.scan_parquet(data["test"]).select(pl.len()).collect().item(),
        "data_seconds": data_seconds,
        "roofline": {},
        "runs": {},
        "loadavg_1_5_15": None,
        "notes": [
            (
                "samples/s of mtrank streamed: the training loop with reading, validation, "
                "encoding, shuffling, pinning and the "
                "host-to-device copies overlapped (epoch 1 from Parquet, epoch 2 from the "
                "encoded-piece cache); 'end to end' "
                "divides rows × 2 epochs by the whole fit_stream wall time, the streaming "
                "encoder fit and the test evaluation included."
            ),
            "bare: the same model, loss and optimizers over the training tensors already on "
            "the GPU (one epoch after 11 warm-up steps).",
            (
                f"torch-rechub trains its first {args.rechub_rows:,} rows only (its DataLoader "
                "collates dicts row by row on the CPU); "
                "its AUCs are therefore not comparable with the full-epoch runs. Its ESMM has "
                "per-field embeddings, "
                "BatchNorm1d in the towers and no numerical input."
            ),
            "GPU utilisation: NVML's 'GPU busy' percentage (a kernel running at any time in "
            "the sample period), sampled every 100 ms.",
        ],
    }
    runs = doc["runs"]

    def publish() -> None:  # after every run, so a cut-short session still leaves its figures
        doc["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        doc["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
        (args.out / "gpu_throughput.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "gpu_throughput.md").write_text(markdown(doc))

    base = {
        "train": train,
        "test": data["test"],
        "lr": args.lr,
        "threads": os.cpu_count(),
        "device": args.device,
    }
    doc["roofline"] = run_worker(
        "roofline", {"tag": "roof", "device": args.device}, args.workdir, 90
    )
    publish()
    npz = str(args.workdir / "encoded.npz")
    for prec in ("fp32", "bf16"):
        a = {
            **base,
            "precision": prec,
            "sparse": False,
            "tag": f"bare-{prec}",
            **({"export": npz} if prec == "fp32" else {}),
        }
        runs[f"bare_{prec}_dense"] = {
            **run_worker("bare", a, args.workdir, 150),
            "precision": prec,
            "optimizer": "Adam",
        }
        publish()
    for prec, sparse in (("fp32", False), ("bf16", False), ("fp32", True)):
        cache = args.workdir / f"cache-{prec}-{sparse}"
        a = {
            **base,
            "precision": prec,
            "sparse": sparse,
            "readers": args.readers,
            "cache": str(cache),
            "tag": f"stream-{prec}-{sparse}",
        }
        key = f"mtrank_stream_{prec}_{'sparse' if sparse else 'dense'}"
        runs[key] = {
            **run_worker("mtrank_stream", a, args.workdir, 150),
            "precision": prec,
            "optimizer": "SparseAdam+Adam" if sparse else "Adam",
        }
        publish()
    if Path(npz).exists():
        a = {
            "npz": npz,
            "emb": EMB,
            "tower": TOWER,
            "batch": BATCH,
            "threads": os.cpu_count(),
            "device": args.device,
            "max_rows": args.rechub_rows,
            "tag": "rechub",
        }
        res = run_worker("rechub", a, args.workdir, 150)
        if "error" not in res:
            res["test"] = rechub_auc(res, npz)
        runs["rechub"] = {**res, "precision": "fp32", "optimizer": "Adam (wd 0)"}
        publish()
    print(markdown(doc))


if __name__ == "__main__":
    main()
