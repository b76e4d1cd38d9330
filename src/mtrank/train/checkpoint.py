"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds ``state.safetensors`` (model weights ``model.*``, the best epoch's
weights ``best.*``, Adam moments ``optim.<optimizer>.<param index>.<name>``, RNG states
``rng.*``) and ``trainer.json`` (epoch, batches done in that epoch, running loss, history,
early-stopping state, optimizer hyperparameters, the training config). It is written to a
staging directory and renamed into place, so a kill at any moment leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrank.errors import ConfigError
from mtrank.io_utils import atomic_replace_dir, atomic_write_json, recover_replaced_dir

STATE = "state.safetensors"
META = "trainer.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``meta`` (JSON) and the tensors, split by prefix."""

    meta: dict
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizers: list[dict]
    rng: dict[str, torch.Tensor]


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    best_state: dict[str, torch.Tensor] | None,
    rng: dict[str, torch.Tensor],
    meta: dict,
) -> None:
    """Atomically write a checkpoint directory at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
    groups = []
    for j, optimizer in enumerate(optimizers):
        opt = optimizer.state_dict()
        groups.append(opt["param_groups"])
        for idx, state in opt["state"].items():
            for name, value in state.items():
                tensors[f"optim.{j}.{idx}.{name}"] = (
                    value if torch.is_tensor(value) else torch.tensor(value)
                )
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    save_file(tensors, str(staging / STATE))
    atomic_write_json({**meta, "param_groups": groups}, staging / META)
    atomic_replace_dir(staging, path)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory. Raises ConfigError if it is missing or unreadable."""
    path = Path(path)
    recover_replaced_dir(path)
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / STATE))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ConfigError(f"cannot resume: no readable checkpoint at {path} ({exc})") from None
    model, best, rng, optim_state = {}, {}, {}, {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "model":
            model[rest] = value
        elif kind == "best":
            best[rest] = value
        elif kind == "rng":
            rng[rest] = value
        elif kind == "optim":
            j, idx, name = rest.split(".", 2)
            optim_state.setdefault(int(j), {}).setdefault(int(idx), {})[name] = value
    groups = meta.pop("param_groups")
    optimizers = [
        {"state": optim_state.get(j, {}), "param_groups": g} for j, g in enumerate(groups)
    ]
    return Checkpoint(meta, model, best or None, optimizers, rng)


def run_fingerprint(**parts: Any) -> dict[str, str]:
    """A short blake2b digest per part of a training run: tensors and arrays by their bytes
    (``data``: the encoded training split), paths by name, size and modification time (streamed
    files), anything else by its canonical JSON (schema, encoders, model config)."""
    out = {}
    for name, value in parts.items():
        h = hashlib.blake2b(digest_size=16)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if torch.is_tensor(item):
                h.update(str((item.dtype, tuple(item.shape))).encode())
                h.update(item.detach().contiguous().cpu().numpy().tobytes())
            elif isinstance(item, Path):
                st = item.stat()
                h.update(f"{item.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
            else:
                h.update(json.dumps(item, sort_keys=True, default=str).encode())
        out[name] = h.hexdigest()
    return out


def check_fingerprint(
    saved: dict[str, str] | None, current: dict[str, str] | None, path: Path
) -> None:
    """Raise ConfigError when a checkpoint's fingerprint differs from this run's (both given)."""
    if not saved or not current:
        return
    differ = [k for k in current if saved.get(k) != current[k]]
    if differ:
        raise ConfigError(
            f"--resume: the checkpoint at {path} was made with other {', '.join(differ)} than "
            "this run; "
            "resume with the same data, schema, encoder and model options, or start afresh "
            "without --resume"
        )
