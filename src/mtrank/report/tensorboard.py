"""Training history as TensorBoard event files (``mtrank train --tensorboard DIR``).

Optional: needs the ``tensorboard`` package (``pip install mtrank[tensorboard]``). During
``mtrank train`` each epoch is written (and flushed) as soon as it ends
(:class:`EpochWriter`, the trainer's ``on_epoch`` callback), so TensorBoard shows a run while it
trains; :func:`write_history` writes a whole recorded history at once.
"""

from __future__ import annotations

from pathlib import Path

from mtrank.errors import ConfigError


def check_available() -> None:
    """Raise ConfigError early (before training) when TensorBoard logging cannot work."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or "
            "mtrank[tensorboard])"
        ) from None


class EpochWriter:
    """Writes one epoch's scalars at a time to ``log_dir`` and flushes them at once.

    Scalars (step = epoch): ``train/loss``, ``val/loss``, ``val/<metric>``,
    ``speed/samples_per_second``. Use as the trainer's ``on_epoch`` callback; :meth:`close` at
    the end (or use it as a context manager).

    Raises:
        ConfigError: tensorboard is not installed.
    """

    def __init__(self, log_dir: str | Path) -> None:
        check_available()  # fail before training, not after
        self.path = Path(log_dir)
        self._writer = None  # created with the first epoch: a failed run leaves no event file

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path))
        return self._writer

    def write(self, epoch) -> None:
        """Write one :class:`~mtrank.train.trainer.EpochLog` (or its dict) and flush."""
        from dataclasses import asdict, is_dataclass

        e = asdict(epoch) if is_dataclass(epoch) else dict(epoch)
        step = int(e["epoch"])
        writer = self._open()
        writer.add_scalar("train/loss", float(e["train_loss"]), step)
        if e.get("val_loss") is not None:
            writer.add_scalar("val/loss", float(e["val_loss"]), step)
        for k, v in (e.get("val_metrics") or {}).items():
            if isinstance(v, float) and not k.startswith("n_"):
                writer.add_scalar(f"val/{k}", v, step)
        writer.add_scalar("speed/samples_per_second", float(e["samples_per_second"]), step)
        writer.flush()

    __call__ = write

    def close(self) -> None:
        """Flush and close the event file (if an epoch was written)."""
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> EpochWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_history(history: list, log_dir: str | Path, run: str = "") -> Path:
    """Write a recorded history (:class:`~mtrank.train.trainer.EpochLog` list, or their dicts)
    with :class:`EpochWriter`.

    Returns:
        The event-file directory (``log_dir/run`` when ``run`` is given).
    """
    path = Path(log_dir) / run if run else Path(log_dir)
    with EpochWriter(path) as writer:
        for h in history:
            writer.write(h)
    return path
