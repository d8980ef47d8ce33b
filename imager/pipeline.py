"""Ordered parallel stages: produce -> work on every core -> consume, in order, bounded.

A producer thread reads (so reads overlap compression), a thread pool does the work
(zstandard and blake3 release the GIL), and the caller's thread consumes results in the
order they were produced. At most `depth` items are in flight, so memory stays bounded
whatever the volume size.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) or 1


class _ProducerFailed:
    def __init__(self, error: BaseException):
        self.error = error


def run_ordered(items: Iterable[T], work: Callable[[T], R], consume: Callable[[R], None], *,
                workers: int | None = None, depth: int | None = None) -> None:
    """Apply `work` to each item on a pool and pass results to `consume` in item order.

    `items` is iterated in its own thread; its iteration may block (on a buffer pool, on I/O).
    The first error anywhere stops the producer and is raised here.
    """
    workers = workers or default_workers()
    depth = depth or workers * 2
    in_flight: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce(pool: ThreadPoolExecutor) -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                fut = pool.submit(work, item)
                while not stop.is_set():
                    try:
                        in_flight.put(fut, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consuming thread, which raises it
            _put_unless_stopped(in_flight, _ProducerFailed(e), stop)
            return
        _put_unless_stopped(in_flight, _DONE, stop)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imager-work") as pool:
        producer = threading.Thread(target=produce, args=(pool,), name="imager-read", daemon=True)
        producer.start()
        try:
            while True:
                entry = in_flight.get()
                if entry is _DONE:
                    break
                if isinstance(entry, _ProducerFailed):
                    raise entry.error
                consume(entry.result())
        finally:
            stop.set()
            _drain(in_flight)
            producer.join()
            _drain(in_flight)


def _put_unless_stopped(q: queue.Queue, value, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(value, timeout=0.1)
            return
        except queue.Full:
            continue


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            entry = q.get_nowait()
        except queue.Empty:
            return
        if isinstance(entry, Future):
            # Let started work finish: it may hold a pooled buffer the producer waits for.
            entry.exception()
