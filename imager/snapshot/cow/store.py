"""Point-in-time snapshots of a volume in use, by copy-on-write in user space.

`CowStore` sits in the write path of a volume. While a snapshot is active, the first write to
each COW block first copies the block's original contents into a cache region, then records
the cache slot in the index, then sets the block's bit in the bitmap, and only then lets the
write reach the device. `SnapshotView` (view.py) reads the volume as it was at the snapshot
instant: a block whose bit is set comes from the cache, any other block from the device. The
files live in a state directory (state.py).

The index is a flat array rather than a persisted dict because lookups happen on every
snapshot read under a lock (an array read is one memory access) and an mmap'd array is
persistent with no serialisation step: what the page cache holds survives a daemon restart.
Slot numbers are stored plus one so that zeros mean "no slot".

Concurrency: block locks are striped (locks.py). A write holds the stripes of every block it
touches from the copy of the originals until the device write is done; a snapshot read holds
the stripes of the blocks it reads. So a block's first-write copy and a snapshot read of that
block are serialised, while I/O to unrelated blocks runs in parallel. Starting or ending a
snapshot takes every stripe, which waits for writes in flight.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time

import numpy as np

from devices.aligned import SCRATCH_SIZE, AlignedIO, scratch
from devices.block import preallocate
from devices.errors import DeviceError
from devices.topology import device_identity

from ... import failpoints
from ...errors import SnapshotError
from ...units import check_block_size
from .locks import StripedLocks
from .tracker import ChangeTracker, Roll
from .view import SnapshotView
from .state import BITMAP_FILE, CACHE_FILE, INDEX_FILE, PersistedState, StateDir, pwrite_all

log = logging.getLogger("imager.cow")

DEFAULT_BLOCK_SIZE = 64 * 1024
CACHE_PREALLOCATION_STEP = 64 << 20

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class CowStore:
    """The copy-on-write write path and cache region of one volume.

    `device` is anything with `.path`, `.size`, `.logical_sector_size`, `read_into(buf, offset)`,
    `write_at(data, offset)` and `flush()` (a devices.block.BlockDevice, writable). Every write to
    the volume must go through `write()` for snapshots to be point-in-time.
    """

    def __init__(self, device, state_dir: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 cache_capacity: int | None = None, *, fingerprint: dict | None = None, handover: str = "",
                 snapshot_reader=None, watch=None, watch_problem: str = ""):
        """`fingerprint`: the device's write fingerprint before anything wrote to it (see
        ChangeTracker); None when it cannot be known (tracked changes then start anew);
        `handover`: the supervisor token under which a replaced worker handed the tracker over;
        `snapshot_reader`: where the snapshot's blocks that are still on the source are read (the
        device opened again with O_DIRECT, say), when not through `device`; `watch`: the
        watch.SourceWatch of writes to the device past this store (None: `watch_problem` says why
        there is none, and the tracked changes are not trusted past a roll)."""
        sector = int(device.logical_sector_size)
        problem = check_block_size(block_size, sector, "COW block size")
        if problem:
            raise SnapshotError(problem)
        if cache_capacity is not None and cache_capacity < 0:
            raise SnapshotError(f"cache capacity {cache_capacity} is negative")
        self.device = device
        self.state_dir = os.path.abspath(state_dir)
        self.block_size = block_size
        self.size = int(device.size)
        self.logical_sector_size = sector
        self.block_count = max(1, -(-self.size // block_size))
        self.cache_capacity = cache_capacity
        self._capacity_slots = None if cache_capacity is None else cache_capacity // block_size

        self._dir = StateDir(self.state_dir, device.path)
        self._locks = StripedLocks()
        # Guards slot allocation and the invalid/active state; never held across device I/O.
        self._state_lock = threading.Lock()
        self._io = AlignedIO(device)
        self._snapshot_io = AlignedIO(snapshot_reader) if snapshot_reader is not None else self._io
        self._closed = False
        self.device_identity = device_identity(device.path)
        try:
            self._state = self._dir.load(device.path, self.size, block_size, self.device_identity)
            # Single items go through memoryviews (much cheaper per access than numpy scalars);
            # bulk operations through numpy views of the same maps.
            self._bitmap_map = self._dir.mapped(BITMAP_FILE, -(-self.block_count // 8))
            self._index_map = self._dir.mapped(INDEX_FILE, self.block_count * 8)
        except BaseException:
            self._dir.close()
            raise
        self._bits = memoryview(self._bitmap_map)
        self._bitmap = np.frombuffer(self._bitmap_map, dtype=np.uint8)
        self._index = memoryview(self._index_map).cast("q")
        self._index_array = np.frombuffer(self._index_map, dtype=np.int64)
        try:
            self.tracker = ChangeTracker(self._dir, self.size, fingerprint, handover)
        except BaseException:
            self._dir.close()
            raise
        self._watch = watch
        self._watch_problem = watch_problem or "writes to the source outside the front are not watched"
        self._cache_fd = self._dir.open_file(CACHE_FILE)
        self._cache_slots_used = -(-os.fstat(self._cache_fd).st_size // block_size)
        self._cache_preallocated = 0
        self._cow_active = self._state.active
        self._marks_unsynced = False     # the lost blocks' marks failed to sync, and it was said

    def _persist(self, state: PersistedState) -> None:
        self._dir.persist(state)

    @property
    def snapshot_active(self) -> bool:
        return self._cow_active

    @property
    def snapshot_invalid(self) -> bool:
        return self._state.invalid

    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def snapshot_started_at(self) -> float | None:
        return self._state.started_at if self._cow_active else None

    def changed_blocks(self) -> int:
        """How many COW blocks were written since the snapshot started (bits set)."""
        return int(_POPCOUNT[self._bitmap].sum(dtype=np.int64))

    def cache_bytes_needed(self) -> int:
        """Cache the snapshot needs to stay valid: one block per changed block, counted also
        after an overflow (the bits keep being set), so an error can say how much was missing."""
        return self.changed_blocks() * self.block_size

    def cache_bytes_used(self) -> int:
        return self._cache_slots_used * self.block_size

    def stats(self) -> dict:
        return {
            "block_size": self.block_size,
            "blocks": self.block_count,
            "snapshot_active": self._cow_active,
            "snapshot_invalid": self._state.invalid,
            "invalid_reason": self._state.invalid_reason,
            "cache_full": self._state.cache_full,
            "generation": self._state.generation,
            "started_at": self.snapshot_started_at,
            "changed_blocks": self.changed_blocks(),
            "cache_bytes_used": self.cache_bytes_used(),
            "cache_bytes_needed": self.cache_bytes_needed(),
            "cache_capacity": self.cache_capacity,
        }

    # -- snapshot lifetime ---------------------------------------------------------------------

    def start_snapshot(self, roll: bool = False) -> Roll | None:
        """Switch COW on: from now on the volume as it is is the snapshot. Waits for writes in
        flight. With `roll` (a backup's snapshot), the change tracker starts its next interval at
        the same instant, and what it says about the last one is returned."""
        self._check_open()
        with self._locks.everything():
            if self._cow_active:
                raise SnapshotError(f"{self.device.path} already has an active snapshot")
            if roll:
                self._check_source(flush=True)
            rolled = self.tracker.roll() if roll else None
            self._bitmap[:] = 0
            self._bitmap_map.flush()
            os.ftruncate(self._cache_fd, 0)
            with self._state_lock:
                self._cache_slots_used = 0
                self._cache_preallocated = 0
                state = dataclasses.replace(self._state, active=True, invalid=False, invalid_reason="",
                                            cache_full=False, generation=self._state.generation + 1,
                                            started_at=time.time())
                try:
                    self._persist(state)
                except OSError as e:
                    raise SnapshotError(f"cannot record the snapshot in {self.state_dir}: {e.strerror}") from None
                self._state = state
            self._cow_active = True
            return rolled

    def end_snapshot(self) -> None:
        """Switch COW off and discard the cache. The bitmap is kept until the next snapshot starts:
        it records which blocks changed while this one existed. Raises SnapshotError, the
        snapshot staying but invalid, when its end cannot be recorded in the state directory."""
        self._check_open()
        with self._locks.everything():
            if not self._cow_active:
                return
            # Invalid first: from now on a write keeps no original but marks its blocks lost, so
            # that if the end below cannot be recorded, a worker that loads the snapshot still
            # active from the state file reads either originals or errors, never later data.
            self._invalidate("it is being deleted")
            with self._state_lock:
                self._cache_slots_used = 0
            # Also what frees the room to record the end on a full state filesystem.
            os.ftruncate(self._cache_fd, 0)
            self._cache_preallocated = 0
            # The cache's slots are gone: no index entry may point into it any more. Only blocks
            # whose bit is set can have an entry, so only their pages of the index are touched.
            changed = np.unpackbits(self._bitmap, bitorder="little")[:self.block_count].view(bool)
            self._index_array[changed] = 0
            self._index_map.flush()
            with self._state_lock:
                ended = dataclasses.replace(self._state, active=False, invalid=False, invalid_reason="",
                                            cache_full=False)
                try:
                    self._persist(ended)
                except OSError as e:
                    self._state.invalid_reason = f"its deletion could not be recorded: {e.strerror}"
                    raise SnapshotError(f"cannot record the end of the snapshot of {self.device.path} in "
                                        f"{self.state_dir}: {e.strerror}; it stays, no longer point-in-time, "
                                        f"until its deletion can be recorded") from None
                self._state = ended
                self._cow_active = False

    def view(self) -> "SnapshotView":
        self._check_open()
        if not self._cow_active:
            raise SnapshotError(f"{self.device.path} has no active snapshot")
        return SnapshotView(self, self._state.generation)

    # -- write path ----------------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        """Write `data` to the volume at `offset`, preserving originals first while a snapshot is active."""
        self._check_open()
        src = memoryview(data).cast("B")
        length = len(src)
        if length == 0:
            return
        if offset < 0 or offset + length > self.size:
            raise SnapshotError(f"write of {length} bytes at offset {offset} is beyond the end of "
                                f"{self.device.path} ({self.size} bytes)")
        first = offset // self.block_size
        last = (offset + length - 1) // self.block_size
        with self._locks.blocks(first, last):
            self.tracker.mark(offset, length)
            if self._cow_active:
                try:
                    self._preserve_originals(first, last)
                except Exception as e:
                    # Whatever goes wrong keeping originals costs the snapshot, never the write.
                    self._invalidate(f"keeping the originals of blocks {first}-{last} failed: {e}")
                    self._mark_lost(first, last - first + 1)
            failpoints.check("source.write", offset, length)
            self._io.write(src, offset)

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` with the volume as it is now (not the snapshot); returns the bytes read.
        Takes no block lock: like a disk, a read racing a write to the same block sees either
        side of it."""
        self._check_open()
        length = max(0, min(len(buf), self.size - offset))
        if length == 0:
            return 0
        failpoints.check("source.read", offset, length)
        return self._io.read(memoryview(buf).cast("B")[:length], offset)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        got = self.read_into(memoryview(buf), offset)
        return bytes(buf[:got])

    def flush(self) -> None:
        """Make everything written so far durable, originals before the writes that replaced them.
        Only the device's flush can fail the caller: if the originals cannot be made durable
        (a full or failing state filesystem), the snapshot is invalid instead."""
        self._check_open()
        if self._cow_active:
            # An invalid snapshot keeps no originals but marks the blocks it lost. Those marks go
            # to the disk before the writes that made them too: if the invalid flag itself could
            # not be recorded (a full state filesystem), a worker that loads the snapshot after a
            # power loss fails on those blocks instead of reading their later data.
            valid = not self._state.invalid
            try:
                if valid:
                    failpoints.check("cow.cache-sync")
                    os.fsync(self._cache_fd)
                self._index_map.flush()
                self._bitmap_map.flush()
            except OSError as e:
                if valid:
                    self._invalidate(f"the cache region could not be made durable: {e.strerror}")
                elif not self._marks_unsynced:
                    # Said once, not at every flush of every writer, and again when it is over.
                    self._marks_unsynced = True
                    log.warning("%s: the lost blocks' marks could not be made durable: %s (not said again "
                                "until they are)", self.device.path, e.strerror)
            else:
                if self._marks_unsynced:
                    self._marks_unsynced = False
                    log.warning("%s: the lost blocks' marks are durable again", self.device.path)
        failpoints.check("source.flush")
        self.device.flush()

    # -- writes past the front (watch.py) -------------------------------------------------------

    def check_source(self, flush: bool = False) -> str:
        """Whether the source was written other than through this store since the last check:
        then the tracked changes are not trusted (a new series begins) and an existing snapshot
        is no longer point-in-time. With `flush`, writes still in the page cache count too.
        Returns what was found ("" for nothing)."""
        self._check_open()
        return self._check_source(flush)

    def _check_source(self, flush: bool) -> str:
        if self.tracker.off:
            return ""
        written = False
        if self._watch is None:
            reason = self._watch_problem
        else:
            if flush:
                self.device.flush()
            reason, written = self._watch.foreign(self.tracker.first_unmarked)
            if not reason:
                return ""
        if self._cow_active and written:
            self._invalidate(reason)
        if not self.tracker.restarted:
            if self._watch is not None:
                log.warning("%s; the next incremental compares digests", reason)
            self.tracker.distrust(reason)
        return reason

    def hand_over(self, token: str) -> None:
        """A live upgrade: the tracker to the next worker, with the source's writes checked up
        to now (no write in flight, none to come from this process)."""
        with self._locks.everything():
            self._check_source(flush=True)
            self.tracker.hand_over(token)

    def _preserve_originals(self, first: int, last: int) -> None:
        max_run = max(1, SCRATCH_SIZE // self.block_size)
        block = first
        while block <= last:
            if self._bit(block):
                block += 1
                continue
            run = 1
            while block + run <= last and run < max_run and not self._bit(block + run):
                run += 1
            self._preserve_run(block, run)
            block += run

    def _preserve_run(self, block: int, count: int) -> None:
        # Order matters for a reader that finds a bit set: cache data, then index, then bit.
        copied = False
        if not self._state.invalid:
            slot = self._reserve_slots(count)
            if slot is not None:
                copied = self._copy_to_cache(block, count, slot)
        if not copied:
            self._mark_lost(block, count)
            return
        for b in range(block, block + count):
            self._bits[b >> 3] |= 1 << (b & 7)

    def _mark_lost(self, block: int, count: int) -> None:
        """Blocks about to be written whose originals were not kept: set, with no slot. A
        reader then fails on them, also when the invalid flag itself could not be recorded and a
        new worker has forgotten it; and an index entry a crash left behind, pointing into
        another snapshot's cache, is never taken for theirs."""
        self._index_array[block:block + count] = 0
        for b in range(block, block + count):
            self._bits[b >> 3] |= 1 << (b & 7)

    def _copy_to_cache(self, block: int, count: int, slot: int) -> bool:
        bounce = scratch(max(SCRATCH_SIZE, self.block_size))
        length = count * self.block_size
        try:
            failpoints.check("cow.read-original", block * self.block_size, length)
            failpoints.check("source.read", block * self.block_size, length)
            got = self._io.read(bounce.view[:length], block * self.block_size)
        except (DeviceError, OSError) as e:
            # The write may still succeed (drives remap a bad sector on write): let it, but the
            # snapshot has lost this block's original.
            self._invalidate(f"the original of block {block} could not be read: {e}")
            return False
        try:
            failpoints.check("cow.cache-write")
            pwrite_all(self._cache_fd, bounce.view[:got], slot * self.block_size)
        except OSError as e:
            reason = "the cache region's filesystem is full" if e.errno == errno.ENOSPC else \
                f"writing the cache region failed: {e.strerror}"
            self._invalidate(reason, cache_full=e.errno == errno.ENOSPC)
            return False
        self._index_array[block:block + count] = np.arange(slot + 1, slot + 1 + count, dtype=np.int64)
        return True

    def _reserve_slots(self, count: int) -> int | None:
        with self._state_lock:
            first = self._cache_slots_used
            fits = self._capacity_slots is None or first + count <= self._capacity_slots
            if fits:
                self._cache_slots_used = first + count
        if fits:
            self._grow_cache((first + count) * self.block_size)
            return first
        self._invalidate(f"the cache region is full ({self.cache_capacity} bytes)", cache_full=True)
        return None

    def _grow_cache(self, end: int) -> None:
        """Preallocate the cache region ahead of use in large steps: a first write then pays
        for copying its original, not for the filesystem allocating blocks (measured in
        bench/front.py: sequential first writes went from 4.3x to about 3x a plain write)."""
        start = self._cache_preallocated
        if end <= start:
            return
        target = -(-end // CACHE_PREALLOCATION_STEP) * CACHE_PREALLOCATION_STEP
        if self.cache_capacity is not None:
            target = max(end, min(target, self.cache_capacity))
        # Racing threads may both preallocate the same range: harmless, fallocate is idempotent.
        self._cache_preallocated = max(self._cache_preallocated, target)
        try:
            preallocate(self._cache_fd, start, target - start)
        except OSError:
            pass  # only an optimisation: writes allocate as they go

    def _invalidate(self, reason: str, cache_full: bool = False) -> None:
        with self._state_lock:
            if self._state.invalid:
                return
            self._state.invalid = True
            self._state.invalid_reason = reason
            self._state.cache_full = cache_full
            try:
                self._persist(self._state)
            except OSError:
                # The state directory's filesystem is the one that filled up: the snapshot is
                # invalid in memory all the same, and the writer's write must still go through.
                pass

    # -- locking and bits ----------------------------------------------------------------------

    def _bit(self, block: int) -> bool:
        return bool(self._bits[block >> 3] & (1 << (block & 7)))

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotError(f"the COW store of {self.device.path} is closed")

    # -- lifetime ------------------------------------------------------------------------------

    def close(self, fingerprint: dict | None = None) -> None:
        """Close the store. An active snapshot stays recorded in the state directory; the
        tracked changes are trusted next time only with the device's write `fingerprint`, taken
        after its last write was flushed (a clean stop)."""
        if self._closed:
            return
        with self._locks.everything():
            if fingerprint is not None:
                # The device was flushed and closed for the fingerprint: every write is seen.
                self._check_source(flush=False)
            self._closed = True
            self.tracker.close(fingerprint)
            self._bitmap_map.flush()
            self._index_map.flush()
            os.close(self._cache_fd)
            self._dir.close()
            self._bits.release()
            self._index.release()
            self._bitmap = self._index_array = None
            for mapped in (self._bitmap_map, self._index_map):
                try:
                    mapped.close()
                except BufferError:
                    # A numpy view is still alive somewhere; the map goes with its last reference.
                    pass

    def __enter__(self) -> "CowStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
