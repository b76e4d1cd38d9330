"""Keeping an accelerator fed: batches assembled, pinned and copied to the GPU ahead of use.

:func:`device_batches` is how the trainer and :func:`mtrank.train.trainer.predict` iterate a
:class:`~mtrank.data.batch.BatchSource` on a device:

* data already on the device (an :class:`~mtrank.data.batch.EncodedData` moved there whole):
  its batches are gathered on the device, nothing is copied;
* on the CPU: the source's batches as they are (no extra thread competing for the cores);
* otherwise (host data, CUDA device): a background thread draws the source's batches (for a
  :class:`~mtrank.data.stream.ParquetStream`: reading, validating, encoding, shuffling), pins
  each one in page-locked memory and issues a ``non_blocking`` copy on a side CUDA stream;
  up to ``depth`` batches wait in a bounded queue. The consumer's stream waits on each copy's
  event before use, so transfers overlap the previous steps' kernels.

Memory is bounded by ``depth`` batches in flight. An error in the producer is raised in the
consumer; a consumer that stops early stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch

from mtrank.data.batch import Batch, BatchSource

_DONE = object()


def source_device(source: BatchSource) -> torch.device:
    """Where a source's batches are produced: an in-memory table's device, else the host."""
    return getattr(source, "device", torch.device("cpu"))


def prefetch(
    batches: Iterator[Batch], transfer: Callable[[Batch], tuple[Batch, object]], *, depth: int
) -> Iterator[tuple[Batch, object]]:
    """Run ``transfer`` over ``batches`` in a background thread, at most ``depth`` ahead.

    Yields ``transfer``'s results in order. Raises what the producer raised.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for b in batches:
                if not put(transfer(b)):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=produce, name="mtrank-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def cuda_transfer(
    device: torch.device, *, pin: bool = True
) -> Callable[[Batch], tuple[Batch, object]]:
    """A ``transfer`` for :func:`prefetch`: pin, copy ``non_blocking`` on a side stream, and
    return the device batch with the event that marks the copy's end."""
    stream = torch.cuda.Stream(device)

    def transfer(b: Batch) -> tuple[Batch, object]:
        if pin:
            b = b.pin_memory()
        with torch.cuda.stream(stream):
            out = b.to(device, non_blocking=pin)
            event = torch.cuda.Event()
            event.record(stream)
        return out, event

    return transfer


def device_batches(
    source: BatchSource,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    depth: int = 4,
    pin: bool = True,
) -> Iterator[Batch]:
    """The batches of ``source`` on ``device`` (see the module docstring).

    Args:
        source: any :class:`BatchSource`. batch_size, shuffle, generator: as for its ``batches``.
        device: where the batches are needed (default: the CPU).
        depth: batches prepared ahead on a CUDA device (0: copy in the consumer's thread).
        pin: copy from page-locked memory, ``non_blocking`` (CUDA only).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    batches = source.batches(batch_size, shuffle=shuffle, generator=generator)
    if source_device(source) == device:
        yield from batches
        return
    if device.type != "cuda" or depth <= 0:
        for b in batches:
            yield b.to(device)
        return
    current = torch.cuda.current_stream(device)
    for b, event in prefetch(batches, cuda_transfer(device, pin=pin), depth=depth):
        current.wait_event(event)
        for t in b.tensors():  # the allocator must not reuse these before this stream is done
            t.record_stream(current)
        yield b


__all__ = ["cuda_transfer", "device_batches", "prefetch", "source_device"]
