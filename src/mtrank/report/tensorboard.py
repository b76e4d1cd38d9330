"""Training history as TensorBoard event files (``mtrank train --tensorboard DIR``).

Optional: needs the ``tensorboard`` package (``pip install mtrank[tensorboard]``). The epochs
are written when training ends, from the history the bundle also records.
"""

from __future__ import annotations

from pathlib import Path

from mtrank.errors import ConfigError


def check_available() -> None:
    """Raise ConfigError early (before training) when TensorBoard logging cannot work."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard (or mtrank[tensorboard])") from None


def write_history(history: list, log_dir: str | Path, run: str = "") -> Path:
    """Write per-epoch ``train/loss``, ``val/loss``, ``val/<metric>``, ``speed/samples_per_second``
    scalars (step = epoch) of a :class:`~mtrank.train.trainer.EpochLog` list (or their dicts).

    Returns:
        The event-file directory (``log_dir/run`` when ``run`` is given).
    """
    from dataclasses import asdict, is_dataclass

    check_available()
    from torch.utils.tensorboard import SummaryWriter

    path = Path(log_dir) / run if run else Path(log_dir)
    with SummaryWriter(log_dir=str(path)) as writer:
        for h in history:
            e = asdict(h) if is_dataclass(h) else dict(h)
            step = int(e["epoch"])
            writer.add_scalar("train/loss", float(e["train_loss"]), step)
            if e.get("val_loss") is not None:
                writer.add_scalar("val/loss", float(e["val_loss"]), step)
            for k, v in (e.get("val_metrics") or {}).items():
                if isinstance(v, float) and not k.startswith("n_"):
                    writer.add_scalar(f"val/{k}", v, step)
            writer.add_scalar("speed/samples_per_second", float(e["samples_per_second"]), step)
    return path
