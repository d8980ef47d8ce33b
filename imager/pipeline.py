"""Ordered parallel stages: produce -> work on every core -> consume, in order, bounded.

A producer thread reads (so reads overlap compression), a thread pool does the work
(zstandard and blake3 release the GIL), and the caller's thread consumes results in the
order they were produced. At most `depth` items are in flight, so memory stays bounded
whatever the volume size.

The stages: read_chunks (a volume into pooled buffers, only the planned ranges, several
chunks at once), encoder (buffers into frames) and digester (buffers into digests), each
used by run_ordered; decode_feed runs a feed's frames into checked chunks in pooled buffers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from devices.buffers import AlignedBuffer, BufferPool

from .ends.feeds import Feed
from .ends.sources import VolumeSource
from .errors import ImagerError, UsageError
from .format import Codec, EncodedChunk, block_digests, codec_of, zero_block_digests
from .plan.usedmap import UsedMap

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


# More threads than this only fight over the cores (and each holds buffers of a chunk).
MAX_WORKERS = 256
# Chunks a backup reads at once (read_chunks). The scattered small reads of an incremental wait
# on the disk's latency one at a time otherwise, and a disk or a snapshot view's daemon answers
# four requests in flight much faster than one: bench/chain.py.
READS_IN_FLIGHT = 4


def pool_size(workers: int, readers: int = 1) -> int:
    """Buffers a read_chunks -> run_ordered pipeline needs so that no stage waits for one: the
    workers' items in flight (two each, run_ordered's depth), one per read in flight, one with
    the consumer and one coming back to the pool."""
    return workers * 2 + readers + 2


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) or 1


def worker_count(workers: int | None) -> int:
    """`workers`, or one per core when None; refuses a count no machine can use."""
    if workers is None:
        return default_workers()
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"workers must be 1..{MAX_WORKERS}, not {workers}")
    return workers


class _ProducerFailed:
    def __init__(self, error: BaseException):
        self.error = error


def run_ordered(items: Iterable[T], work: Callable[[T], R], consume: Callable[[R], None], *,
                workers: int | None = None, depth: int | None = None) -> None:
    """Apply `work` to each item on a pool and pass results to `consume` in item order.

    `items` is iterated in its own thread; its iteration may block (on a buffer pool, on I/O).
    The first error anywhere stops the producer and is raised here. A generator of items is
    closed before this returns or raises, so that it lets go of what it holds (read buffers).
    """
    workers = workers or default_workers()
    depth = depth or workers * 2
    in_flight: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce(pool: ThreadPoolExecutor) -> None:
        try:
            for item in items:
                # Submitted even once stopped: the work gives back what the item holds (a pooled
                # buffer), and the pool's shutdown waits for it.
                if not _put_unless_stopped(in_flight, pool.submit(work, item), stop):
                    return
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
            close = getattr(items, "close", None)
            if close is not None:
                close()


def _put_unless_stopped(q: queue.Queue, value, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(value, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            entry = q.get_nowait()
        except queue.Empty:
            return
        if isinstance(entry, Future):
            # Let started work finish: it may hold a pooled buffer the producer waits for.
            entry.exception()


# --- the stages ----------------------------------------------------------------------------------

ReadChunk = tuple[int, AlignedBuffer | None, int]     # (index, buffer or None for unused, length)


def read_chunks(source: VolumeSource, chunk_size: int, pool: BufferPool, on_read: Callable[[int], None],
                plan: UsedMap | None = None, block_size: int = 0, readers: int = 1) -> Iterator[ReadChunk]:
    """Each chunk of the source in a pooled buffer; with a plan, only the used ranges are read
    (the rest of the buffer is zeros) and a chunk with nothing used comes without a buffer.
    With `block_size`, the consumer looks only at the blocks of that size the plan's ranges
    touch (an incremental's candidate blocks), and only those are sure to be zeros where unread.
    With `readers` > 1, that many chunks are read at once (in order of yield all the same): an
    incremental's scattered small reads wait on the disk's latency one by one, and a disk, or a
    snapshot view's daemon, answers several at once almost as fast as one (bench/chain.py)."""
    count = -(-source.size // chunk_size)

    def fill(buf: AlignedBuffer, offset: int, length: int, pieces: list[tuple[int, int]]) -> int:
        if pieces != [(0, length)]:
            for start, end in unread_parts(pieces, length, block_size):
                buf.array[start:end] = 0
        for start, end in pieces:
            got = source.read_into(buf.view[start:end], offset + start)
            if got != end - start:
                raise ImagerError(f"{source.path}: short read at offset {offset + start + got} "
                                  f"(device shrank or ended early)")
        return sum(end - start for start, end in pieces)

    def regions() -> Iterator[tuple[int, int, int, list[tuple[int, int]]]]:
        for index in range(count):
            offset = index * chunk_size
            length = min(chunk_size, source.size - offset)
            pieces = plan.ranges_in(offset, length) if plan is not None else [(0, length)]
            yield index, offset, length, pieces

    if readers <= 1:
        for index, offset, length, pieces in regions():
            if not pieces:
                yield index, None, length
                continue
            buf = pool.acquire()
            try:
                on_read(fill(buf, offset, length, pieces))
            except BaseException:
                pool.release(buf)
                raise
            yield index, buf, length
        return

    pending: collections.deque[tuple[int, AlignedBuffer | None, int, Future | None]] = collections.deque()
    reading = _ReadThreads(readers)
    in_flight = 0
    try:
        for index, offset, length, pieces in regions():
            # Waiting for the oldest read, rather than on the pool, when no buffer is free: the
            # consumer may hold every other one until it has the next chunk. Unused chunks wait
            # in line without counting as reads (a sparse plan still gets `readers` reads), up
            # to a bound on the line itself.
            while pending and (pending[0][3] is None or len(pending) >= readers * _LINE_PER_READER
                               or (pieces and (in_flight >= readers or not pool.available()))):
                if pending[0][3] is not None:
                    in_flight -= 1
                yield _first_read(pending, pool, on_read)
            if pieces:
                buf = pool.acquire()
                pending.append((index, buf, length, reading.submit(fill, buf, offset, length, pieces)))
                in_flight += 1
            else:
                pending.append((index, None, length, None))
        while pending:
            yield _first_read(pending, pool, on_read)
    finally:
        # Stopped early (an error, or the consumer gave up): no read may still fill a buffer
        # that goes back to the pool. A second interrupt cuts the wait short; the buffers of
        # the reads not waited for are left out of the pool.
        try:
            for _, held, _, future in pending:
                if future is not None and held is not None:
                    future.cancel()
                    with contextlib.suppress(Exception):
                        future.result()
                    pool.release(held)
        finally:
            reading.stop()


# How many chunks may wait in read_chunks' line, per read in flight, unused ones included.
_LINE_PER_READER = 64


class _ReadThreads:
    """Daemon threads that run read_chunks' reads: a read stuck on a wedged device must not
    keep the process from exiting (a ThreadPoolExecutor's threads are joined at exit)."""

    def __init__(self, count: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._count = count
        for n in range(count):
            threading.Thread(target=self._run, name=f"imager-read-{n}", daemon=True).start()

    def submit(self, fn: Callable[..., R], *args) -> "Future[R]":
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def stop(self) -> None:
        for _ in range(self._count):
            self._jobs.put(None)


def _first_read(pending: collections.deque, pool: BufferPool, on_read: Callable[[int], None]) -> ReadChunk:
    """The oldest chunk read at once, once read (its byte count goes to `on_read` from this
    thread: the callers' counters are not made for threads)."""
    index, buf, length, future = pending.popleft()
    if future is not None:
        try:
            on_read(future.result())
        except BaseException:
            pool.release(buf)
            raise
    return index, buf, length


def unread_parts(pieces: list[tuple[int, int]], length: int, block_size: int = 0) -> list[tuple[int, int]]:
    """The parts of [0, length) the sorted `pieces` leave out; with `block_size`, only those
    inside the blocks the pieces touch. Zeroing just these, rather than the whole buffer before
    reading into it, spares an incremental a 4 MiB memset for each region it reads a block of."""
    spans: list[tuple[int, int]] = []
    for start, end in pieces if block_size else [(0, length)]:
        first = start // block_size * block_size if block_size else start
        last = min(-(-end // block_size) * block_size, length) if block_size else end
        if spans and first <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], last))
        else:
            spans.append((first, last))
    parts = []
    k = 0
    for first, last in spans:
        pos = first
        while k < len(pieces) and pieces[k][0] < last:
            if pieces[k][0] > pos:
                parts.append((pos, pieces[k][0]))
            pos = max(pos, pieces[k][1])
            k += 1
        if pos < last:
            parts.append((pos, last))
    return parts


def encoder(pool: BufferPool, codec: Codec) -> Callable[[ReadChunk], EncodedChunk]:
    """A chunk read into a pooled buffer (or an unused chunk) as its frame; frees the buffer."""
    def encode(item: ReadChunk) -> EncodedChunk:
        index, buf, length = item
        if buf is None:
            return codec.zero_chunk(index, length)
        try:
            return codec.encode(index, buf.view[:length])
        finally:
            pool.release(buf)
    return encode


def digester(pool: BufferPool, block_size: int) -> Callable[[ReadChunk], tuple[int, bytes]]:
    """A chunk read into a pooled buffer as the digests of its blocks; frees the buffer."""
    def digest(item: ReadChunk) -> tuple[int, bytes]:
        index, buf, length = item
        if buf is None:
            return index, zero_block_digests(length, block_size)
        try:
            return index, block_digests(buf.view[:length], block_size)
        finally:
            pool.release(buf)
    return digest


def filled(pool: BufferPool, length: int, fill: Callable[[memoryview], bool]) -> AlignedBuffer | None:
    """A buffer of `pool` whose first `length` bytes `fill` wrote, or None (the buffer given
    back) when `fill` says they are all zeros; the buffer is given back if `fill` raises."""
    buf = pool.acquire()
    try:
        if fill(buf.view[:length]):
            return buf
    except BaseException:
        pool.release(buf)
        raise
    pool.release(buf)
    return None


def decode_feed(feed: Feed, consume: Callable[[int, "memoryview | None", bytes], None], *, workers: int) -> None:
    """Every chunk of `feed`, checked and decompressed on `workers` threads, handed in order to
    consume(index, contents or None for an all-zero chunk, digest). The contents are a view of a
    page-aligned pooled buffer (no fresh memory per chunk; a restore writes it with O_DIRECT),
    valid until `consume` returns."""
    header = feed.header
    codec = codec_of(header)
    pool = BufferPool(pool_size(workers), header.chunk_size)

    def decode(item: tuple[int, bytes, int]) -> tuple[int, AlignedBuffer | None, bytes]:
        index, frame, image_offset = item
        length = header.chunk_length(index)
        expected = feed.expected_digest(index)
        buf = filled(pool, length, lambda view: codec.decode_into(frame, view, index, expected, image_offset,
                                                                   index * header.chunk_size))
        if expected is not None:
            return index, buf, expected
        if buf is None:
            return index, None, zero_block_digests(length, header.block_size)
        return index, buf, block_digests(buf.view[:length], header.block_size)

    def hand_on(result: tuple[int, AlignedBuffer | None, bytes]) -> None:
        index, buf, digest = result
        try:
            consume(index, None if buf is None else buf.view[:header.chunk_length(index)], digest)
        finally:
            if buf is not None:
                pool.release(buf)

    try:
        run_ordered(feed.chunks(), decode, hand_on, workers=workers)
    finally:
        pool.close()
