"""Data parallelism on PyTorch's distributed engine (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node=K -m mtrank train ...`` (or ``mtrank train --nproc K``) starts K
processes; each initialises the default process group from the environment torchrun sets
(gloo on CPU, NCCL on GPU), trains on its own shard of the data under DDP, and joins the others
to gather validation predictions, so global metrics are computed on all rows exactly as in a
single process. Only rank 0 writes checkpoints and the bundle.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Initialise the process group if launched by torchrun with WORLD_SIZE > 1.

    Returns True when this call created the group (the caller then destroys it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


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
    rank, world = rank_world()
    if world == 1:
        return local
    size = (n_total + world - 1) // world
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = local.new_empty((n_total, *local.shape[1:]))
    for r, part in enumerate(parts):
        n_r = len(range(r, n_total, world))
        out[r::world] = part[:n_r]
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (float64)."""
    if rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
