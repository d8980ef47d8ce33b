"""Page-aligned, mmap-backed buffers for O_DIRECT I/O, and a bounded pool of them.

O_DIRECT needs the user buffer aligned to the logical block size; an anonymous mmap is
page-aligned, and numpy views of it cost nothing.
"""

from __future__ import annotations

import mmap
import queue

import numpy as np


class AlignedBuffer:
    """A fixed-size page-aligned buffer, usable as a memoryview and as a numpy uint8 array."""

    __slots__ = ("size", "_map", "view", "array")

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError("buffer size must be positive")
        rounded = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.size = size
        self._map = mmap.mmap(-1, rounded, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)[:size]
        self.array = np.frombuffer(self._map, dtype=np.uint8, count=size)

    def close(self) -> None:
        self.view.release()
        self.array = None
        try:
            self._map.close()
        except BufferError:
            # A numpy view still references the map; it is freed with the last reference.
            pass


def is_all_zero(data: memoryview | bytes | np.ndarray) -> bool:
    """True when every byte is zero; compares 8 bytes at a time where the length allows."""
    arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    n = arr.size
    head = n - n % 8
    if head and arr[:head].view(np.uint64).any():
        return False
    return not arr[head:].any()


class BufferPool:
    """A bounded set of equal-sized AlignedBuffers: acquire() blocks while all are in use,
    which is what keeps a pipeline's memory bounded whatever the volume size."""

    def __init__(self, count: int, size: int):
        self.size = size
        self._all = [AlignedBuffer(size) for _ in range(count)]
        self._free: queue.Queue[AlignedBuffer] = queue.Queue()
        for buf in self._all:
            self._free.put(buf)

    def acquire(self, timeout: float | None = None) -> AlignedBuffer:
        return self._free.get(timeout=timeout)

    def release(self, buf: AlignedBuffer) -> None:
        self._free.put(buf)

    def available(self) -> int:
        """Buffers not acquired now."""
        return self._free.qsize()

    def close(self) -> None:
        for buf in self._all:
            buf.close()
        self._all.clear()
