"""Decode and preprocess images on threads, batches ahead of the models.

A background thread reads samples from the shard and hands each one's decoding to
a thread pool; the consumer receives whole batches in input order. PIL releases the
GIL while decoding and resizing, so this overlaps with model compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from capfilt.sample import Sample

_DONE = object()


def prefetch_batches(samples: Iterator[Sample], prepare: Callable[[Sample], Sample],
                     batch_size: int, threads: int, prefetch: int) -> Iterator[list[Sample]]:
    """Yield lists of up to ``batch_size`` prepared samples, in input order.

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

    def produce() -> None:
        try:
            batch: list[Future] = []
            for sample in samples:
                batch.append(pool.submit(prepare, sample))
                if len(batch) == batch_size:
                    if not put(batch):
                        return
                    batch = []
            if batch:
                put(batch)
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
            yield [future.result() for future in item]
    finally:
        stop.set()
        reader.join(timeout=5)
        pool.shutdown(wait=True, cancel_futures=True)
