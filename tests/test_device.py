"""Devices, mixed precision and the GPU data path (issue 16), on CPU; CUDA-only checks are
skipped with a reason when no GPU is visible (they never count as passed here)."""

import math
import subprocess
import sys
import threading

import numpy as np
import polars as pl
import pytest
import torch

from mtrank.data.batch import EncodedData
from mtrank.data.prefetch import device_batches, prefetch
from mtrank.data.simulate import SIMULATED_SCHEMA, SimConfig, write_simulated
from mtrank.data.stream import ParquetStream, expand_paths, fit_encoder_streaming
from mtrank.errors import ConfigError
from mtrank.losses import log_sigmoid_product, total_loss
from mtrank.models import build_model
from mtrank.models.config import FeatureSpec, ModelConfig
from mtrank.train.device import large_batch_defaults, resolve_device, resolve_precision
from mtrank.train.distributed import backend_for
from mtrank.train.trainer import TrainConfig
from tests.conftest import make_batch

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible to torch here)")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the error raised when CUDA is absent")
SMALL = ModelConfig(tower=[32, 16], embedding_dim=8)


def mtrank(*args):
    return subprocess.run(
        [sys.executable, "-m", "mtrank", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# --------------------------------------------------------------------------- device resolution
def test_auto_resolves_to_cuda_only_when_available():
    assert resolve_device("auto") == (
        torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    )
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device(
        "cpu"
    )


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu:0", "cpu:1"])
def test_unknown_device_is_a_config_error_naming_the_option(bad):
    with pytest.raises(ConfigError, match=r"^--device must be auto, cpu, cuda or cuda:N, got"):
        resolve_device(bad)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_unavailable_cuda_is_a_config_error_naming_the_option(spec):
    with pytest.raises(
        ConfigError, match=rf"^--device {spec}: CUDA is not available on this machine"
    ):
        resolve_device(spec)


@no_cuda
def test_cli_unavailable_cuda_is_one_error_line_exit_2(tmp_path):
    r = mtrank("train", "--dataset", "simulated", "--device", "cuda", "--out", tmp_path / "b", "-q")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: CUDA is not available"), (
        r.stderr
    )
    r = mtrank("evaluate", "--bundle", tmp_path / "none", "--device", "cuda:1")
    assert r.returncode == 2 and r.stderr.strip().startswith(
        "error: --device cuda:1: CUDA is not available"
    ), r.stderr
    for verb in ("quickstart", "benchmark"):  # fails before any data is simulated or read
        r = mtrank(verb, "--dataset", "simulated", "--device", "cuda", "--out", tmp_path / verb)
        assert r.returncode == 2 and r.stderr.strip().startswith(
            "error: --device cuda: CUDA is not available"
        ), (verb, r.stderr)
        assert not (tmp_path / verb).exists()


def test_cli_bad_precision_is_one_error_line_exit_2(tmp_path):
    r = mtrank(
        "train",
        "--dataset",
        "simulated",
        "--device",
        "cpu",
        "--precision",
        "fp8",
        "--out",
        tmp_path / "b",
        "-q",
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip() == "error: --precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'"
    ), r.stderr


def test_precisions_map_to_autocast_dtypes():
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == [
        None,
        torch.bfloat16,
        torch.float16,
    ]


def test_large_batch_defaults_scale_the_learning_rate_by_the_square_root_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # constructing a device needs no GPU
    assert large_batch_defaults(cpu, None, None, base_lr=1e-3) == (2048, 1e-3)
    bs, lr = large_batch_defaults(gpu, None, None, base_lr=1e-3)
    assert (
        bs == 16_384
        and lr == pytest.approx(1e-3 * math.sqrt(8))
        and lr == pytest.approx(2.828e-3, rel=1e-3)
    )
    assert large_batch_defaults(gpu, 4096, None, base_lr=1e-3) == (
        4096,
        1e-3,
    )  # user's batch: lr untouched
    assert large_batch_defaults(gpu, None, 5e-4, base_lr=1e-3) == (16_384, 5e-4)  # user's lr wins


def test_ddp_backend_nccl_for_dense_gpu_gloo_otherwise():
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    assert (
        backend_for(torch.device("cuda", 0), sparse=True) == "gloo"
    )  # NCCL has no sparse all-reduce
    assert backend_for(torch.device("cpu")) == "gloo"


def test_resume_key_ignores_where_the_run_happens():
    a = TrainConfig(device="cpu", prefetch=2, threads=1)
    b = TrainConfig(device="auto", prefetch=8, threads=2)
    assert a.resume_key() == b.resume_key()
    assert a.resume_key() != TrainConfig(precision="bf16").resume_key()


# --------------------------------------------------------------------------- mixed precision
def test_loss_under_autocast_is_float32_and_exact():
    torch.manual_seed(0)
    model = build_model(
        FeatureSpec(cardinalities=[7, 7], n_numerical=1), ModelConfig(tower=[32, 16])
    )
    batch = make_batch(512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch.categorical, batch.numerical)
        loss, _ = total_loss(model.tasks, out, batch)
    assert out["logit_ctr"].dtype == torch.bfloat16  # the forward pass did run in bf16
    assert loss.dtype == torch.float32
    # the same bf16 logits, upcast and reduced outside autocast: bit-identical
    ref, _ = total_loss(model.tasks, {k: v.float() for k, v in out.items()}, batch)
    assert float(loss.detach()) == float(ref.detach())
    # and what a bf16 loss would have given instead: visibly off (so the check above can fail)
    a, b = out["logit_ctr"].detach(), out["logit_cvr"].detach()
    _, log_1mp16 = log_sigmoid_product([a, b])
    _, log_1mp32 = log_sigmoid_product([a.float(), b.float()])
    assert log_1mp16.dtype == torch.bfloat16
    assert (log_1mp16.float() - log_1mp32).abs().max() > 1e-4


@pytest.fixture(scope="module")
def splits(sim_splits):
    return sim_splits


@pytest.fixture(scope="module")
def fp32_run(splits):
    from mtrank.workflow import fit

    return fit(
        splits,
        SIMULATED_SCHEMA,
        SMALL,
        TrainConfig(epochs=2, batch_size=512, lr=3e-3, device="cpu"),
        quiet=True,
    )


def test_bf16_training_on_cpu_matches_fp32_test_aucs(splits, fp32_run):
    """bf16 autocast against fp32, paired by seed: the mean |delta AUC| over three seeds is the
    issue's goal (< 0.002). One seed alone is not: on this 28,800-row set seed 0 stops after two
    epochs at a CTR AUC of 0.69 where seeds 1 and 2 reach 0.74, and at that unconverged point
    any perturbation of the arithmetic moves the AUC by ~0.002 (0.0022 on an AVX512-BF16 CPU,
    against 0.0001-0.0002 for seeds 1 and 2), so each seed is only held to 0.005."""
    from mtrank.workflow import fit

    def run(precision: str, seed: int):
        if precision == "fp32" and seed == 0:
            return fp32_run
        return fit(
            splits,
            SIMULATED_SCHEMA,
            SMALL,
            TrainConfig(
                epochs=2, batch_size=512, lr=3e-3, device="cpu", precision=precision, seed=seed
            ),
            quiet=True,
        )

    pairs = [(run("fp32", seed), run("bf16", seed)) for seed in (0, 1, 2)]
    for k in ("auc_ctr", "auc_ctcvr"):
        got = [(a.metrics["test"][k], b.metrics["test"][k]) for a, b in pairs]
        print(k, [(round(x, 4), round(y, 4)) for x, y in got])
        assert all(x > 0.65 for x, _ in got)  # every fp32 run learned something real
        deltas = [abs(y - x) for x, y in got]
        assert max(deltas) < 0.005, (k, got)
        assert sum(deltas) / len(deltas) < 0.002, (k, got)  # the goal
    # bf16 really ran: the weights differ from the fp32 run's, and stay float32
    w32, w16 = (r.bundle.model.state_dict() for r in pairs[0])
    assert all(v.dtype == torch.float32 for v in w16.values() if v.is_floating_point())
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)


def test_fp16_with_grad_scaler_trains_on_cpu(splits, tmp_path):
    import json

    from mtrank.workflow import fit

    few = {k: v.head(12_000) for k, v in splits.items()}
    runs = {
        p: fit(
            few,
            SIMULATED_SCHEMA,
            SMALL,
            TrainConfig(epochs=1, batch_size=512, lr=3e-3, device="cpu", precision=p),
            quiet=True,
            checkpoint=tmp_path / p,
        )
        for p in ("fp32", "fp16")
    }
    t32, t16 = runs["fp32"].metrics["test"], runs["fp16"].metrics["test"]
    assert t32["auc_ctcvr"] > 0.58  # one epoch of 12k rows: weak, but above chance
    assert (
        abs(t16["auc_ctr"] - t32["auc_ctr"]) < 0.005
        and abs(t16["auc_ctcvr"] - t32["auc_ctcvr"]) < 0.005
    )
    assert runs["fp16"].result.history[0].train_loss == pytest.approx(
        runs["fp32"].result.history[0].train_loss, rel=1e-3
    )
    # the loss scaler ran and its state is checkpointed (for an exact resume); none in fp32
    scaler = json.loads((tmp_path / "fp16" / "trainer.json").read_text())["scaler"]
    assert (
        scaler["scale"] >= 2.0**16
        and json.loads((tmp_path / "fp32" / "trainer.json").read_text())["scaler"] is None
    )


# --------------------------------------------------------------------------- bundles across devices
def test_bundle_loads_on_the_cpu_with_identical_predictions(fp32_run, splits, tmp_path):
    from mtrank.bundle import Bundle

    path = fp32_run.bundle.save(tmp_path / "b")
    df = splits["test"].head(500)
    want = fp32_run.bundle.predict_arrays(fp32_run.bundle.encode(df))
    for device in ("cpu", "auto"):
        loaded = Bundle.load(path, device=device)
        got = loaded.predict_arrays(loaded.encode(df))
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5 if device != "cpu" else 0)
    with pytest.raises(ConfigError, match="--device"):
        Bundle.load(path, device="tpu")


@needs_cuda
def test_gpu_trained_bundle_exports_and_predicts_on_cpu(splits, tmp_path):
    from mtrank.bundle import Bundle
    from mtrank.serve.onnx_export import export_onnx
    from mtrank.workflow import fit

    res = fit(
        splits,
        SIMULATED_SCHEMA,
        SMALL,
        TrainConfig(epochs=1, batch_size=2048, device="cuda", precision="bf16"),
        quiet=True,
    )
    assert next(res.bundle.model.parameters()).is_cuda
    path = res.bundle.save(tmp_path / "b")
    df = splits["test"].head(2000)
    on_gpu = res.bundle.predict_arrays(res.bundle.encode(df))
    cpu = Bundle.load(path)
    assert not next(cpu.model.parameters()).is_cuda
    on_cpu = cpu.predict_arrays(cpu.encode(df))
    for k in on_gpu:
        np.testing.assert_allclose(on_cpu[k], on_gpu[k], rtol=0, atol=1e-5)
    export_onnx(path, tmp_path / "m.onnx")  # verified against torch on the CPU inside


@needs_cuda
@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_training_dense_and_sparse_matches_cpu_quality(splits, fp32_run, sparse):
    from mtrank.workflow import fit

    res = fit(
        splits,
        SIMULATED_SCHEMA,
        SMALL,
        TrainConfig(epochs=2, batch_size=512, lr=3e-3, device="cuda", sparse_embeddings=sparse),
        quiet=True,
    )
    assert abs(res.metrics["test"]["auc_ctr"] - fp32_run.metrics["test"]["auc_ctr"]) < 0.01


# --------------------------------------------------------------------------- data path
def test_encoded_data_batches_are_the_same_rows_on_any_device():
    data = EncodedData(
        torch.arange(20).reshape(10, 2), torch.zeros(10, 1), {"click": torch.arange(10).float()}
    )
    assert data.device == torch.device("cpu") and data.to("cpu") is data
    assert data.nbytes() == 10 * 2 * 8 + 10 * 4 + 10 * 4
    a = [
        b.labels["click"].tolist()
        for b in data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1))
    ]
    b = [
        b.labels["click"].tolist()
        for b in data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1))
    ]
    assert (
        a == b
        and sorted(x for part in a for x in part) == list(range(10))
        and [len(x) for x in a] == [4, 4, 2]
    )
    sub = data.subset(torch.tensor([3, 1]))
    assert sub.labels["click"].tolist() == [3.0, 1.0]


def test_prefetch_keeps_order_and_bounds_the_queue():
    made = []

    def source():
        for i in range(50):
            made.append(i)
            yield i

    out = []
    for item, tag in prefetch(source(), lambda x: (x * 10, "t"), depth=3):
        out.append(item)
        assert len(made) - len(out) <= 3 + 2  # queue depth + one in transfer + one being put
    assert out == [10 * i for i in range(50)]


def test_prefetch_raises_the_producers_error_and_stops_when_the_consumer_does():
    def bad():
        yield 1
        raise ValueError("piece 2 is broken")

    it = prefetch(bad(), lambda x: (x, None), depth=2)
    assert next(it)[0] == 1
    with pytest.raises(ValueError, match="piece 2 is broken"):
        next(it)
    before = {t.ident for t in threading.enumerate()}
    gen = prefetch(iter(range(10**6)), lambda x: (x, None), depth=2)
    assert next(gen)[0] == 0
    gen.close()  # the consumer stops early: the producer thread must end
    assert not any(
        t.name == "mtrank-prefetch" and t.is_alive() and t.ident not in before
        for t in threading.enumerate()
    )


def test_device_batches_on_cpu_are_the_source_batches():
    data = EncodedData(
        torch.arange(40).reshape(20, 2), torch.ones(20, 1), {"click": torch.zeros(20)}
    )
    got = list(device_batches(data, 8, shuffle=False, device=torch.device("cpu")))
    assert [b.categorical[0, 0].item() for b in got] == [0, 16, 32]


@pytest.mark.skipif(
    not CUDA,
    reason="torch cannot pin host memory without a CUDA device ('Cannot access accelerator "
    "device when none is available')",
)
def test_pinned_non_blocking_path():
    b = make_batch(64)
    pinned = b.pin_memory()
    assert all(t.is_pinned() for t in pinned.tensors())
    dev = torch.device("cuda", torch.cuda.current_device())
    data = EncodedData(b.categorical, b.numerical, b.labels)
    got = list(device_batches(data, 16, shuffle=False, device=dev, depth=2))
    assert all(x.categorical.is_cuda for x in got)
    assert torch.equal(torch.cat([x.categorical.cpu() for x in got]), b.categorical)


def test_batch_to_the_same_device_is_free():
    b = make_batch(8)
    assert b.to(torch.device("cpu")) is b
    assert len(b.tensors()) == 2 + 3


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("parts") / "sim"
    write_simulated(
        SimConfig(rows=30_000, n_items=300, n_users=1000, cvr=0.2, seed=3), out, part_rows=10_000
    )
    return expand_paths(out)


def _epoch(stream, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (b.categorical.clone(), b.labels["ctcvr"].clone())
        for b in stream.batches(1000, shuffle=True, generator=g)
    ]


def test_encoded_piece_cache_gives_the_same_batches_without_reading(parts, tmp_path, monkeypatch):
    import mtrank.data.stream as stream_mod

    enc = fit_encoder_streaming(parts, SIMULATED_SCHEMA)
    enc_other = fit_encoder_streaming(parts, SIMULATED_SCHEMA, min_count=50)
    plain = ParquetStream(parts, SIMULATED_SCHEMA, enc, shuffle_buffer=12_000)
    cached = ParquetStream(
        parts, SIMULATED_SCHEMA, enc, shuffle_buffer=12_000, cache_dir=tmp_path / "c"
    )
    want = _epoch(plain, 5)
    first = _epoch(cached, 5)
    files = sorted((tmp_path / "c").glob("piece-*.safetensors"))
    assert len(files) == len(cached.pieces) == 3 and not list((tmp_path / "c").glob(".*tmp"))

    def no_reading(*a, **k):
        raise AssertionError("a cached piece was read from Parquet again")

    monkeypatch.setattr(stream_mod, "read_piece", no_reading)
    second = _epoch(cached, 5)
    for (c1, y1), (c2, y2), (c3, y3) in zip(want, first, second, strict=True):
        assert torch.equal(c1, c2) and torch.equal(c1, c3) and torch.equal(y1, y3)
    # other encoders (e.g. another min_count) never read these entries
    other = ParquetStream(parts, SIMULATED_SCHEMA, enc_other, cache_dir=tmp_path / "c")
    assert all(other.cache_path(p) != cached.cache_path(p) for p in cached.pieces)


def test_several_readers_keep_the_piece_order(parts):
    enc = fit_encoder_streaming(parts, SIMULATED_SCHEMA)
    one = ParquetStream(parts, SIMULATED_SCHEMA, enc, readers=1)
    three = ParquetStream(parts, SIMULATED_SCHEMA, enc, readers=3)
    order = [2, 0, 1]
    a = [p.categorical for p in one.encoded_pieces(order)]
    b = [p.categorical for p in three.encoded_pieces(order)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert [len(x) for x in b] == [10_000] * 3 and torch.equal(
        b[1], one.load_all().categorical[:10_000]
    )


def test_streamed_training_with_cache_and_bf16_via_cli(parts, tmp_path):
    test = tmp_path / "test.parquet"
    pl.read_parquet(parts[2]).write_parquet(test)
    r = mtrank(
        "train",
        "--stream",
        "--data",
        parts[0],
        "--data",
        parts[1],
        "--test-data",
        test,
        "--schema",
        "simulated",
        "--epochs",
        2,
        "--batch-size",
        512,
        "--lr",
        0.01,
        "--tower",
        "16",
        "--embedding-dim",
        4,
        "--device",
        "auto",
        "--precision",
        "bf16",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "b",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "cache").glob("piece-*.safetensors"))) == 2
    import json

    meta = json.loads((tmp_path / "b" / "config.json").read_text())["meta"]
    assert meta["train"]["precision"] == "bf16" and meta["train"]["device"] == "auto"
    assert meta["metrics"]["test"]["auc_ctr"] > 0.6
