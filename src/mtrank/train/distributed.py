"""Data parallelism on PyTorch's distributed engine (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node=K -m mtrank train ...`` (or ``mtrank train --nproc K``) starts K
processes; each initialises the default process group from the environment torchrun sets
(gloo on CPU, NCCL on GPU: one GPU per process, ``cuda:$LOCAL_RANK``), trains on its own shard
of the data under DDP, and joins the others to gather validation predictions, so global metrics
are computed on all rows exactly as in a single process. Only rank 0 writes checkpoints and the
bundle.

NCCL has no all-reduce of sparse tensors, so GPU training with sparse embedding gradients
(``--sparse-embeddings``) runs its process group on gloo, which reduces CUDA tensors through
host memory (slower, but correct); dense training on GPUs uses NCCL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist


def backend_for(device: torch.device, *, sparse: bool = False) -> str:
    """``nccl`` for dense training on CUDA devices, else ``gloo`` (see the module docstring)."""
    return "nccl" if device.type == "cuda" and not sparse else "gloo"


def init_from_env(device: str = "auto", *, sparse: bool = False) -> bool:
    """Initialise the process group if launched by torchrun with WORLD_SIZE > 1.

    Args:
        device: the ``--device`` value; on CUDA each process takes ``cuda:$LOCAL_RANK``.
        sparse: the embeddings get sparse gradients (forces gloo, see the module docstring).

    Returns True when this call created the group (the caller then destroys it).

    Raises:
        ConfigError: ``device`` is not available here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    die_with_parent()  # a rank never outlives its launcher (torchrun)
    from mtrank.train.device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend_for(dev, sparse=sparse))
    return True


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the host."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True in the process that writes outputs (rank 0, or the only process)."""
    return rank_world()[0] == 0


def gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """Reassemble a tensor sharded as rows ``rank::world`` into all ``n_total`` rows, on every rank.

    Args:
        local: ``[n_local, ...]`` rows held by this rank.
        n_total: rows over all ranks.
    """
    _, world = rank_world()
    if world == 1:
        return local
    home = local.device
    local = local.to(comm_device())
    size = (n_total + world - 1) // world
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = local.new_empty((n_total, *local.shape[1:]))
    for r, part in enumerate(parts):
        n_r = len(range(r, n_total, world))
        out[r::world] = part[:n_r]
    return out.to(home)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (float64)."""
    if rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (``PR_SET_PDEATHSIG``);
    a no-op elsewhere. If the parent is already gone (re-parented to init), exit now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)


def run_under_torchrun(nproc: int, args: list[str]) -> int:
    """Run ``python -m mtrank <args>`` under torchrun with ``nproc`` processes and return its
    exit code. The children die with this process: torchrun gets SIGTERM if this process is
    killed, even by SIGKILL (``PR_SET_PDEATHSIG``), and stops its ranks, which also watch their
    own parent; SIGINT, SIGTERM and SIGHUP sent to this process are forwarded to torchrun."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mtrank",
        *args,
    ]
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)  # noqa: PLW1509 - only prctl, async-signal-safe enough

    def forward(signum, frame):
        proc.send_signal(signum)

    previous = {
        s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
