"""Decode and preprocess images on threads, batches ahead of the models.

A background thread reads samples from the shard and hands each one's decoding to
a thread pool; the consumer receives whole batches in input order. PIL releases the
GIL while decoding and resizing, so this overlaps with model compute. Each batch's
pixels are stacked on the pool too, into one uint8 tensor per model input (pinned
memory for a CUDA device, so that its copy runs asynchronously): the model thread
only copies it to the device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from capfilt.sample import Sample

_DONE = object()


@dataclass(frozen=True, slots=True)
class Row:
    """One sample's pixels for one model input: row ``index`` of its batch's stacked tensor."""

    batch: Any  # torch.Tensor
    index: int


def prefetch_batches(samples: Iterator[Sample], prepare: Callable[[Sample], Sample],
                     batch_size: int, threads: int, prefetch: int,
                     pin_memory: bool = False) -> Iterator[list[Sample]]:
    """Yield lists of up to ``batch_size`` prepared samples, in input order, their pixels
    stacked (``stack_pixels``).

    An exception raised while reading ``samples`` is re-raised here, in the consumer.
    """
    batches: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="capfilt-decode")

    def put(item) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def submit(batch: list[Future]) -> bool:
        # Queued after the batch's own samples, so it waits only on ones already running.
        return put(pool.submit(_stacked_batch, batch, pin_memory))

    def produce() -> None:
        try:
            batch: list[Future] = []
            for sample in samples:
                batch.append(pool.submit(prepare, sample))
                if len(batch) == batch_size:
                    if not submit(batch):
                        return
                    batch = []
            if batch:
                submit(batch)
            put(_DONE)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    reader = threading.Thread(target=produce, name="capfilt-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = batches.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item.result()
    finally:
        stop.set()
        reader.join(timeout=5)
        pool.shutdown(wait=True, cancel_futures=True)


def _stacked_batch(futures: list[Future], pin_memory: bool) -> list[Sample]:
    batch = [future.result() for future in futures]
    stack_pixels(batch, pin_memory)
    return batch


def stack_pixels(batch: list[Sample], pin_memory: bool = False) -> None:
    """Stack the pixels of the samples that have them into one tensor per model input, and
    point each such sample at its ``Row`` of it."""
    import torch

    ready = [s for s in batch if s.pixels is not None]
    for name in ready[0].pixels if ready else ():
        first = ready[0].pixels[name]
        dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
        stacked = torch.empty((len(ready), *first.shape), dtype=dtype, pin_memory=pin_memory)
        np.stack([s.pixels[name] for s in ready], out=stacked.numpy())
        for index, sample in enumerate(ready):
            sample.pixels[name] = Row(stacked, index)


def pixel_batch(rows: list) -> Any:
    """The tensor of ``rows`` (each a ``Row`` or an array), stacked: when they are all of one
    prefetched batch, in order, that batch's tensor itself (no copy); otherwise a new stack
    (part of a batch, judged alone after a fault; samples prepared without prefetching)."""
    import torch

    first = rows[0]
    if isinstance(first, Row) and len(first.batch) == len(rows) and all(
            isinstance(r, Row) and r.batch is first.batch and r.index == i for i, r in enumerate(rows)):
        return first.batch
    return torch.from_numpy(np.stack([r.batch[r.index].numpy() if isinstance(r, Row) else r for r in rows]))
