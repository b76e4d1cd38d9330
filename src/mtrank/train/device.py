"""Where and in which precision a model runs: ``--device`` and ``--precision`` resolved once.

* :func:`resolve_device`: ``auto`` → ``cuda`` when a CUDA device is visible, else ``cpu``;
  ``cuda`` under torchrun → ``cuda:$LOCAL_RANK`` (one GPU per process); ``cuda:N`` checked
  against the visible devices. Anything unavailable is a :class:`~mtrank.errors.ConfigError`
  naming the option, never a CUDA traceback later.
* :func:`autocast`: mixed precision (``torch.autocast``) for the forward pass; ``bf16`` works
  on CPU and GPU, ``fp16`` is meant for GPUs (with :func:`grad_scaler`; loss scaling as in
  Micikevicius et al., "Mixed Precision Training", ICLR 2018, §3.2). Parameters, embeddings and
  optimizer state stay float32; the loss is computed in float32 (see :mod:`mtrank.losses`).
* :func:`large_batch_defaults`: the batch size and learning rate used when none is given:
  2,048 and the default learning rate on CPU; 16,384 on a GPU with the learning rate scaled by
  √(16384 / 2048) ≈ 2.83
  (the square-root rule for Adam: Hoffer et al., NeurIPS 2017, §4; Malladi et al., "On the SDEs
  and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022, §3).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Literal

import torch

from mtrank.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
CPU_BATCH, GPU_BATCH = 2048, 16_384


def resolve_device(
    spec: str | torch.device | None = "auto", *, option: str = "--device"
) -> torch.device:
    """The ``torch.device`` a ``--device`` value names.

    Args:
        spec: ``auto`` (default; ``None`` means the same), ``cpu``, ``cuda`` or ``cuda:N``.
        option: the option's name, for the error message.

    Returns:
        ``cpu``, or ``cuda:N`` with an explicit index (``cuda`` → the current device, or
        ``$LOCAL_RANK`` under torchrun).

    Raises:
        ConfigError: an unknown value, or CUDA (or device N) not available on this machine.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    kind, sep, index = text.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        raise ConfigError(f"{option} must be {DEVICE_CHOICES}, got {spec!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{option} {spec}: CUDA is not available on this machine (torch {torch.__version__} "
            f"{'without CUDA support' if torch.version.cuda is None else 'sees no GPU'}); use "
            f"{option} cpu or auto"
        )
    n = torch.cuda.device_count()
    i = int(index) if sep else int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    if i >= n:
        raise ConfigError(f"{option} {spec}: this machine has {n} CUDA device(s) (0..{n - 1})")
    return torch.device("cuda", i)


def resolve_precision(
    precision: str, device: torch.device, *, option: str = "--precision"
) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None for fp32).

    fp16 also runs on CPU (with the same loss scaler, which is how its path is tested), but
    slowly: bf16 is the CPU choice.

    Raises:
        ConfigError: an unknown value; ``bf16`` on a GPU without bfloat16 support.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{option} must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{option} bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use fp16"
        )
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``, or a no-op for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (its gradients underflow without one); None otherwise."""
    if dtype is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def large_batch_defaults(
    device: torch.device, batch_size: int | None, lr: float | None, *, base_lr: float
) -> tuple[int, float]:
    """(batch size, learning rate) for a run, filling what the user left out (None).

    On CPU: 2,048 and ``base_lr`` (the CLI passes :class:`~mtrank.train.trainer.TrainConfig`'s
    default learning rate). On a GPU the default batch is 16,384 (a GPU step costs about
    the same at 2k and 16k rows for this model size), and when the batch is that default and
    no learning rate is given, the learning rate is ``base_lr · √(16384 / 2048)``. A batch size
    given by the user keeps ``base_lr`` unless a learning rate is given too.
    """
    if batch_size is None:
        batch_size = GPU_BATCH if device.type == "cuda" else CPU_BATCH
        if lr is None and device.type == "cuda":
            lr = base_lr * math.sqrt(GPU_BATCH / CPU_BATCH)
    return batch_size, base_lr if lr is None else lr


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (cpu for a module without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


__all__ = [
    "CPU_BATCH",
    "GPU_BATCH",
    "PRECISIONS",
    "Precision",
    "autocast",
    "grad_scaler",
    "large_batch_defaults",
    "module_device",
    "resolve_device",
    "resolve_precision",
]
