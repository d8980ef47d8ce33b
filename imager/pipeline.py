"""Ordered parallel stages: produce -> work on every core -> consume, in order, bounded.

A producer thread reads (so reads overlap compression), a thread pool does the work
(zstandard and blake3 release the GIL), and the caller's thread consumes results in the
order they were produced. At most `depth` items are in flight, so memory stays bounded
whatever the volume size.

The stages: read_chunks (a volume into pooled buffers, only the planned ranges), encoder
(buffers into frames), decoder (frames into checked chunks) and digester (buffers into
digests), each used by run_ordered.
"""

from __future__ import annotations

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


# --- the stages ----------------------------------------------------------------------------------

ReadChunk = tuple[int, AlignedBuffer | None, int]     # (index, buffer or None for unused, length)


def read_chunks(source: VolumeSource, chunk_size: int, pool: BufferPool, on_read: Callable[[int], None],
                plan: UsedMap | None = None, block_size: int = 0) -> Iterator[ReadChunk]:
    """Each chunk of the source in a pooled buffer; with a plan, only the used ranges are read
    (the rest of the buffer is zeros) and a chunk with nothing used comes without a buffer.
    With `block_size`, the consumer looks only at the blocks of that size the plan's ranges
    touch (an incremental's candidate blocks), and only those are sure to be zeros where unread."""
    count = -(-source.size // chunk_size)
    for index in range(count):
        offset = index * chunk_size
        length = min(chunk_size, source.size - offset)
        pieces = plan.ranges_in(offset, length) if plan is not None else [(0, length)]
        if not pieces:
            yield index, None, length
            continue
        buf = pool.acquire()
        try:
            if pieces != [(0, length)]:
                for start, end in unread_parts(pieces, length, block_size):
                    buf.array[start:end] = 0
            for start, end in pieces:
                got = source.read_into(buf.view[start:end], offset + start)
                if got != end - start:
                    raise ImagerError(f"{source.path}: short read at offset {offset + start + got} "
                                      f"(device shrank or ended early)")
                on_read(got)
        except BaseException:
            pool.release(buf)
            raise
        yield index, buf, length


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


DecodedChunk = tuple[int, "bytes | None", bytes]        # (index, data or None for zeros, digest)


def decoder(feed: Feed) -> Callable[[tuple[int, bytes, int]], DecodedChunk]:
    """A frame of `feed` as its checked contents and digest (None for an all-zero chunk)."""
    header = feed.header
    codec = codec_of(header)

    def decode(item: tuple[int, bytes, int]) -> DecodedChunk:
        index, frame, image_offset = item
        length = header.chunk_length(index)
        expected = feed.expected_digest(index)
        data = codec.decode(frame, index, length, expected, image_offset, index * header.chunk_size)
        if expected is not None:
            return index, data, expected
        if data is None:
            return index, data, zero_block_digests(length, header.block_size)
        return index, data, block_digests(data, header.block_size)
    return decode
