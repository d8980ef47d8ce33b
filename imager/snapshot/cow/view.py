"""The volume as it was when a snapshot started, read through its COW store: a block whose bit
is set comes from the cache region, any other block from the device. Part of the store (it
reads the store's bitmap, index and cache under the store's block locks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import failpoints
from ...errors import CacheFullError, SnapshotError
from .state import pread_all

if TYPE_CHECKING:
    from .store import CowStore


class SnapshotView:
    """The snapshot `generation` of `store`: read-only, block-device-like. It fails, never
    returns later data, once the snapshot is deleted or stops being point-in-time."""

    def __init__(self, store: CowStore, generation: int):
        self._store = store
        self._generation = generation
        self.size = store.size
        self.logical_sector_size = store.logical_sector_size
        self.path = f"snapshot of {store.device.path} (generation {generation})"
        self.closed = False

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` from `offset`; returns the bytes read (short only at the end of the volume)."""
        if self.closed:
            raise SnapshotError(f"{self.path}: view is closed")
        return read_snapshot(self._store, memoryview(buf).cast("B"), offset, self._generation)

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        n = self.read_into(memoryview(buf), offset) if buf else 0
        return bytes(buf[:n])

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "SnapshotView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_snapshot(store: CowStore, dst: memoryview, offset: int, generation: int) -> int:
    """Fill `dst` from `offset` of snapshot `generation`, under the blocks' stripes: a first
    write racing the read waits until it is done, or has already preserved the original."""
    if offset >= store.size:
        return 0
    length = min(len(dst), store.size - offset)
    if length <= 0:
        return 0
    bs = store.block_size
    first, last = offset // bs, (offset + length - 1) // bs
    with store._locks.blocks(first, last):
        check_readable(store, generation)
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            if store._bit(block):
                slot = store._index[block] - 1
                if slot < 0:
                    raise SnapshotError(f"the snapshot of {store.device.path} is no longer point-in-time: the "
                                        f"original of block {block} was not kept")
                run = 1
                while (block + run <= last and store._bit(block + run)
                       and store._index[block + run] - 1 == slot + run):
                    run += 1
                n = min(end, (block + run) * bs) - pos
                try:
                    failpoints.check("cow.cache-read")
                    pread_all(store._cache_fd, dst[pos - offset:pos - offset + n], slot * bs + pos - block * bs)
                except OSError as e:
                    raise SnapshotError(f"reading the original of block {block} from the cache region "
                                        f"failed: {e.strerror}") from None
            else:
                run = 1
                while block + run <= last and not store._bit(block + run):
                    run += 1
                n = min(end, (block + run) * bs) - pos
                failpoints.check("source.read", pos, n)
                # The original, as long as the stripes are held: a first write to these blocks
                # waits for them, and keeps the original before it writes.
                got = store._snapshot_io.read(dst[pos - offset:pos - offset + n], pos)
                if got < n:
                    raise SnapshotError(f"{store.device.path}: short read at offset {pos + got}")
            pos += n
        return length


def check_readable(store: CowStore, generation: int) -> None:
    """Raise why snapshot `generation` can no longer be read: deleted, or not point-in-time."""
    store._check_open()
    state = store._state
    if not store.snapshot_active or state.generation != generation:
        raise SnapshotError(f"the snapshot of {store.device.path} was deleted while it was being read")
    if state.invalid:
        if state.cache_full:
            raise CacheFullError(store.device.path, state.invalid_reason, store.cache_bytes_needed(),
                                 store.cache_capacity)
        raise SnapshotError(f"the snapshot of {store.device.path} is no longer point-in-time: {state.invalid_reason}")
