"""Point-in-time snapshots of a volume in use, by copy-on-write in user space.

`CowStore` sits in the write path of a volume. While a snapshot is active, the first write to
each COW block first copies the block's original contents into a cache region, then sets the
block's bit in a change-tracking bitmap, and only then lets the write reach the device.
`SnapshotView` reads the volume as it was at the snapshot instant: a block whose bit is set
comes from the cache, any other block from the device.

On disk, in the store's state directory (never on the volume itself):

    state.json   block size, volume size, whether a snapshot is active or invalid, generation
    bitmap       one bit per COW block, mmap'd: set = this block changed since the snapshot,
                 and (while the snapshot is valid) its original is in the cache
    index        one int64 per COW block, mmap'd: 1 + the cache slot holding the original;
                 a sparse file, so a huge volume with few changed blocks costs little disk
    cache        the cache region: original blocks, one slot of block_size bytes each

The index is a flat array rather than a persisted dict because lookups happen on every
snapshot read under a lock (an array read is one memory access) and an mmap'd array is
persistent with no serialisation step: what the page cache holds survives a daemon restart.
Slot numbers are stored plus one so that the zeros of a sparse file mean "no slot".

Concurrency: block locks are striped (blocks that share a bitmap byte share a stripe, so a bit
update never races with its neighbours). A write holds the stripes of every block it touches
from the copy of the originals until the device write is done; a snapshot read holds the
stripes of the blocks it reads. So a block's first-write copy and a snapshot read of that
block are serialised, while I/O to unrelated blocks runs in parallel. Starting or ending a
snapshot takes every stripe, which waits for writes in flight.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import stat
import threading
import time
import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from devices import loop
from devices.block import preallocate
from devices.buffers import AlignedBuffer
from devices.errors import DeviceError

from . import failpoints
from .errors import CacheFullError, SnapshotError
from .private import make_private_dir, open_private
from .units import human_bytes

DEFAULT_BLOCK_SIZE = 64 * 1024
LOCK_STRIPES = 1024
STATE_FORMAT = 1
LOCK_FILE = "lock"
STATE_FILE = "state.json"
BITMAP_FILE = "bitmap"
INDEX_FILE = "index"
CACHE_FILE = "cache"
# Per-thread bounce buffer for unaligned O_DIRECT I/O and for copying originals.
SCRATCH_SIZE = 1 << 20
CACHE_PREALLOCATION_STEP = 64 << 20

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass
class _PersistedState:
    format: int
    device_path: str
    device_size: int
    block_size: int
    active: bool = False
    invalid: bool = False
    invalid_reason: str = ""
    cache_full: bool = False          # invalid because the cache region ran out of room
    generation: int = 0
    started_at: float = 0.0
    device_identity: str = ""         # which device the bitmap and cache belong to


class CowStore:
    """The copy-on-write write path and cache region of one volume.

    `device` is anything with `.path`, `.size`, `.logical_sector_size`, `read_into(buf, offset)`,
    `write_at(data, offset)` and `flush()` (a devices.block.BlockDevice, writable). Every write to
    the volume must go through `write()` for snapshots to be point-in-time.
    """

    def __init__(self, device, state_dir: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 cache_capacity: int | None = None):
        sector = int(device.logical_sector_size)
        if block_size <= 0 or block_size & (block_size - 1) or block_size % sector:
            raise SnapshotError(f"COW block size {block_size} must be a power of two and a multiple "
                                f"of the sector size ({sector})")
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

        make_private_dir(self.state_dir)
        refuse_state_dir_on_volume(device.path, self.state_dir)

        self._stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]
        # Guards slot allocation and the invalid/active state; never held across device I/O.
        self._state_lock = threading.Lock()
        self._io = _AlignedDeviceIO(device)
        self._closed = False
        # One store per state directory: two would hand out the same cache slots.
        self._lock_fd = os.open(self._path(LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SnapshotError(f"the state directory {self.state_dir} is in use by another volume's "
                                f"daemon; give this volume its own") from None
        self.device_identity = device_identity(device.path)

        try:
            self._state = self._load_or_create_state()
        except BaseException:
            os.close(self._lock_fd)
            raise
        # Single items go through memoryviews (much cheaper per access than numpy scalars);
        # bulk operations through numpy views of the same maps.
        self._bitmap_map = _open_mapped(self._path(BITMAP_FILE), -(-self.block_count // 8))
        self._bits = memoryview(self._bitmap_map)
        self._bitmap = np.frombuffer(self._bitmap_map, dtype=np.uint8)
        self._index_map = _open_mapped(self._path(INDEX_FILE), self.block_count * 8)
        self._index = memoryview(self._index_map).cast("q")
        self._index_array = np.frombuffer(self._index_map, dtype=np.int64)
        self._cache_fd = os.open(self._path(CACHE_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._cache_slots_used = -(-os.fstat(self._cache_fd).st_size // block_size)
        self._cache_preallocated = 0
        self._cow_active = self._state.active

    # -- state ---------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def _load_or_create_state(self) -> _PersistedState:
        try:
            with open(self._path(STATE_FILE)) as f:
                stored = _PersistedState(**json.load(f))
        except FileNotFoundError:
            stored = None
        except (ValueError, TypeError) as e:
            raise SnapshotError(f"{self._path(STATE_FILE)}: unreadable snapshot state: {e}") from None
        same_geometry = (stored is not None and stored.device_size == self.size
                         and stored.block_size == self.block_size
                         and stored.device_identity in ("", self.device_identity))
        if stored is not None and stored.active:
            if stored.device_identity not in ("", self.device_identity):
                raise SnapshotError(
                    f"{self.state_dir} holds an active snapshot of another device ({stored.device_path}, "
                    f"{stored.device_identity}); {self.device.path} is {self.device_identity} (end that "
                    f"snapshot or use another state directory)")
            if not same_geometry:
                raise SnapshotError(
                    f"{self.state_dir} holds an active snapshot of a {stored.device_size}-byte volume "
                    f"with {stored.block_size}-byte COW blocks; this volume is {self.size} bytes with "
                    f"{self.block_size}-byte blocks (end that snapshot or use another state directory)")
            return stored
        if same_geometry:
            return stored
        generation = stored.generation if stored is not None else 0
        state = _PersistedState(STATE_FORMAT, self.device.path, self.size, self.block_size,
                                generation=generation, device_identity=self.device_identity)
        # Another geometry makes the old bitmap and index meaningless: start them anew.
        for name in (BITMAP_FILE, INDEX_FILE, CACHE_FILE):
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass
        self._persist(state)
        return state

    def _persist(self, state: _PersistedState) -> None:
        path = self._path(STATE_FILE)
        tmp = path + ".tmp"
        try:
            failpoints.check("state.persist")
            with open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "w") as f:
                json.dump(asdict(state), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

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

    def start_snapshot(self) -> None:
        """Switch COW on: from now on the volume as it is is the snapshot. Waits for writes in flight."""
        self._check_open()
        with _AllStripes(self._stripes):
            if self._cow_active:
                raise SnapshotError(f"{self.device.path} already has an active snapshot")
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

    def end_snapshot(self) -> None:
        """Switch COW off and discard the cache. The bitmap is kept until the next snapshot starts:
        it records which blocks changed while this one existed."""
        self._check_open()
        with _AllStripes(self._stripes):
            if not self._cow_active:
                return
            self._cow_active = False
            with self._state_lock:
                self._state.active = False
                self._persist(self._state)
                self._cache_slots_used = 0
            os.ftruncate(self._cache_fd, 0)
            self._cache_preallocated = 0
            # The cache's slots are gone: no index entry may point into it any more. Only blocks
            # whose bit is set can have an entry, so only their pages of the index are touched.
            changed = np.unpackbits(self._bitmap, bitorder="little")[:self.block_count].view(bool)
            self._index_array[changed] = 0
            self._index_map.flush()

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
        held = self._lock_blocks(first, last)
        try:
            if self._cow_active:
                try:
                    self._preserve_originals(first, last)
                except Exception as e:
                    # Whatever goes wrong keeping originals costs the snapshot, never the write.
                    self._invalidate(f"keeping the originals of blocks {first}-{last} failed: {e}")
            self._io.write(src, offset)
        finally:
            self._unlock(held)

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` with the volume as it is now (not the snapshot); returns the bytes read.
        Takes no block lock: like a disk, a read racing a write to the same block sees either
        side of it."""
        self._check_open()
        length = max(0, min(len(buf), self.size - offset))
        if length == 0:
            return 0
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
        if self._cow_active and not self._state.invalid:
            try:
                failpoints.check("cow.cache-sync")
                os.fsync(self._cache_fd)
                self._index_map.flush()
                self._bitmap_map.flush()
            except OSError as e:
                self._invalidate(f"the cache region could not be made durable: {e.strerror}")
        failpoints.check("source.flush")
        self.device.flush()

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
        if not self._state.invalid:
            slot = self._reserve_slots(count)
            if slot is not None:
                self._copy_to_cache(block, count, slot)
        for b in range(block, block + count):
            self._bits[b >> 3] |= 1 << (b & 7)

    def _copy_to_cache(self, block: int, count: int, slot: int) -> None:
        scratch = _scratch(max(SCRATCH_SIZE, self.block_size))
        length = count * self.block_size
        try:
            failpoints.check("cow.read-original", block * self.block_size, length)
            got = self._io.read(scratch.view[:length], block * self.block_size)
        except (DeviceError, OSError) as e:
            # The write may still succeed (drives remap a bad sector on write): let it, but the
            # snapshot has lost this block's original.
            self._invalidate(f"the original of block {block} could not be read: {e}")
            return
        try:
            failpoints.check("cow.cache-write")
            _pwrite_all(self._cache_fd, scratch.view[:got], slot * self.block_size)
        except OSError as e:
            reason = "the cache region's filesystem is full" if e.errno == errno.ENOSPC else \
                f"writing the cache region failed: {e.strerror}"
            self._invalidate(reason, cache_full=e.errno == errno.ENOSPC)
            return
        self._index_array[block:block + count] = np.arange(slot + 1, slot + 1 + count, dtype=np.int64)

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

    def _lock_blocks(self, first: int, last: int) -> list[threading.Lock]:
        """Take the stripes of blocks first..last in stripe order (so two lockers never deadlock)."""
        first_byte, last_byte = first >> 3, last >> 3
        if last_byte - first_byte + 1 >= LOCK_STRIPES:
            numbers = range(LOCK_STRIPES)
        else:
            numbers = sorted({b % LOCK_STRIPES for b in range(first_byte, last_byte + 1)})
        held = [self._stripes[n] for n in numbers]
        for lock in held:
            lock.acquire()
        return held

    @staticmethod
    def _unlock(held: list[threading.Lock]) -> None:
        for lock in reversed(held):
            lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotError(f"the COW store of {self.device.path} is closed")

    # -- snapshot reads (called by SnapshotView) -----------------------------------------------

    def _read_snapshot(self, dst: memoryview, offset: int, generation: int) -> int:
        if offset >= self.size:
            return 0
        length = min(len(dst), self.size - offset)
        if length <= 0:
            return 0
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        held = self._lock_blocks(first, last)
        try:
            self._check_readable(generation)
            pos, end = offset, offset + length
            while pos < end:
                block = pos // bs
                if self._bit(block):
                    slot = self._index[block] - 1
                    run = 1
                    while (block + run <= last and self._bit(block + run)
                           and self._index[block + run] - 1 == slot + run):
                        run += 1
                    n = min(end, (block + run) * bs) - pos
                    try:
                        failpoints.check("cow.cache-read")
                        _pread_all(self._cache_fd, dst[pos - offset:pos - offset + n], slot * bs + pos - block * bs)
                    except OSError as e:
                        raise SnapshotError(f"reading the original of block {block} from the cache region "
                                            f"failed: {e.strerror}") from None
                else:
                    run = 1
                    while block + run <= last and not self._bit(block + run):
                        run += 1
                    n = min(end, (block + run) * bs) - pos
                    got = self._io.read(dst[pos - offset:pos - offset + n], pos)
                    if got < n:
                        raise SnapshotError(f"{self.device.path}: short read at offset {pos + got}")
                pos += n
            return length
        finally:
            self._unlock(held)

    def _check_readable(self, generation: int) -> None:
        self._check_open()
        if not self._cow_active or self._state.generation != generation:
            raise SnapshotError(f"the snapshot of {self.device.path} was deleted while it was being read")
        if self._state.invalid:
            needed = self.cache_bytes_needed()
            reason = self._state.invalid_reason
            if self._state.cache_full:
                error = CacheFullError(
                    f"the snapshot of {self.device.path} is no longer point-in-time: "
                    f"{reason}; at least {needed} bytes ({human_bytes(needed)}) of "
                    f"cache would have been needed, retry with a larger cache")
                error.needed_bytes = needed
                error.capacity = self.cache_capacity
                raise error
            raise SnapshotError(f"the snapshot of {self.device.path} is no longer point-in-time: {reason}")

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the store. An active snapshot stays recorded in the state directory."""
        if self._closed:
            return
        with _AllStripes(self._stripes):
            self._closed = True
            self._bitmap_map.flush()
            self._index_map.flush()
            os.close(self._cache_fd)
            os.close(self._lock_fd)
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


class SnapshotView:
    """The volume as it was when the snapshot started: read-only, block-device-like."""

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
        return self._store._read_snapshot(memoryview(buf).cast("B"), offset, self._generation)

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


class _AllStripes:
    def __init__(self, stripes: list[threading.Lock]):
        self._stripes = stripes

    def __enter__(self) -> None:
        for lock in self._stripes:
            lock.acquire()

    def __exit__(self, *exc) -> None:
        for lock in reversed(self._stripes):
            lock.release()


class _AlignedDeviceIO:
    """Device reads and writes that honour O_DIRECT's alignment rules for any caller buffer.

    An unaligned buffer or range goes through a per-thread aligned bounce buffer; a write
    that starts or ends inside a sector reads that sector first. The caller holds the
    stripes of the blocks touched, so that read-modify-write races with no other writer.
    """

    def __init__(self, device):
        self.device = device
        self.sector = int(device.logical_sector_size)

    def _aligned(self, buf: memoryview, offset: int) -> bool:
        s = self.sector
        return offset % s == 0 and len(buf) % s == 0 and _address(buf) % s == 0

    def read(self, dst: memoryview, offset: int) -> int:
        failpoints.check("source.read", offset, len(dst))
        if not getattr(self.device, "direct", False) or self._aligned(dst, offset):
            return self.device.read_into(dst, offset)
        scratch = _scratch(SCRATCH_SIZE)
        s = self.sector
        done = 0
        while done < len(dst):
            pos = offset + done
            start = pos - pos % s
            span = min(len(scratch.view), -(-(offset + len(dst) - start) // s) * s)
            got = self.device.read_into(scratch.view[:span], start)
            useful = min(got - (pos - start), len(dst) - done)
            if useful <= 0:
                break
            dst[done:done + useful] = scratch.view[pos - start:pos - start + useful]
            done += useful
        return done

    def write(self, src: memoryview, offset: int) -> None:
        failpoints.check("source.write", offset, len(src))
        if not getattr(self.device, "direct", False) or self._aligned(src, offset):
            self.device.write_at(src, offset)
            return
        scratch = _scratch(SCRATCH_SIZE)
        s = self.sector
        done = 0
        while done < len(src):
            pos = offset + done
            start = pos - pos % s
            n = min(len(src) - done, len(scratch.view) - (pos - start))
            span = -(-(pos - start + n) // s) * s
            if pos != start:
                self.device.read_into(scratch.view[:s], start)
            if (pos - start + n) % s:
                self.device.read_into(scratch.view[span - s:span], start + span - s)
            scratch.view[pos - start:pos - start + n] = src[done:done + n]
            self.device.write_at(scratch.view[:span], start)
            done += n


_thread_scratch = threading.local()


def _scratch(size: int) -> AlignedBuffer:
    buf = getattr(_thread_scratch, "buffer", None)
    if buf is None or buf.size < size:
        buf = _thread_scratch.buffer = AlignedBuffer(size)
    return buf


def _address(buf: memoryview) -> int:
    if len(buf) == 0:
        return 0
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def _open_mapped(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        # Every page allocated now: a store into a mapped page the filesystem cannot allocate
        # (a full state filesystem) is a SIGBUS, which would kill the daemon in a writer's path.
        try:
            preallocate(fd, 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise SnapshotError(f"no room for {size} bytes of snapshot state in {os.path.dirname(path)}") from None
            _write_zeros_where_holes(fd, size)
        mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mapped


def _write_zeros_where_holes(fd: int, size: int) -> None:
    """Allocate the holes of a file by writing zeros into them (where fallocate is refused)."""
    zeros = bytes(1 << 20)
    offset = 0
    while offset < size:
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = offset
        if hole >= size:
            return
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:
            data = size
        end = min(data, size)
        while hole < end:
            hole += os.pwrite(fd, zeros[:min(len(zeros), end - hole)], hole)
        offset = end


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pread_all(fd: int, dst: memoryview, offset: int) -> None:
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n == 0:
            raise SnapshotError(f"the snapshot cache region is truncated at offset {offset + done}")
        done += n


# -- where the state directory lives ---------------------------------------------------------

def refuse_state_dir_on_volume(device_path: str, state_dir: str) -> None:
    """Raise SnapshotError when `state_dir` is stored on the volume at `device_path`: writing the
    cache there would change the volume being snapshotted (and, through a FUSE front, deadlock)."""
    if state_dir_is_on(device_path, state_dir):
        raise SnapshotError(f"the snapshot state directory {state_dir} is on {device_path}, the volume "
                            f"being snapshotted; put it on another volume")


def state_dir_is_on(device_path: str, path: str) -> bool:
    """Whether `path` is stored on the block device or image file at `device_path`, directly, on a
    partition of it, or inside a loop device whose backing file is on it."""
    try:
        target = os.stat(device_path)
    except OSError as e:
        raise SnapshotError(f"{device_path}: {e.strerror}") from None
    devices, backing_files = _storage_under(path)
    if not stat.S_ISBLK(target.st_mode):
        return (target.st_dev, target.st_ino) in backing_files
    if target.st_rdev in devices:
        return True
    # Two loop devices on one file are one volume.
    target_backing = _loop_backing_identity(target.st_rdev)
    return target_backing is not None and target_backing in backing_files


def _storage_under(path: str) -> tuple[set[int], set[tuple[int, int]]]:
    """The block devices the filesystem holding `path` is stored on: its own device, the whole
    disk of a partition and, through loop devices, whatever holds their backing files; plus the
    (st_dev, st_ino) of every loop backing file met on the way."""
    devices: set[int] = set()
    files: set[tuple[int, int]] = set()
    todo = [os.stat(path).st_dev]
    while todo:
        dev = todo.pop()
        if dev in devices:
            continue
        devices.add(dev)
        sysfs = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        if os.path.exists(os.path.join(sysfs, "partition")):
            parent = _read_dev_number(os.path.join(os.path.realpath(sysfs), "..", "dev"))
            if parent is not None:
                todo.append(parent)
        backing = _loop_backing_stat(dev)
        if backing is None:
            continue
        files.add((backing.st_dev, backing.st_ino))
        todo.append(backing.st_rdev if stat.S_ISBLK(backing.st_mode) else backing.st_dev)
    return devices, files


def _loop_backing_stat(dev: int) -> os.stat_result | None:
    path = loop.backing_file(dev)
    try:
        return os.stat(path) if path else None
    except OSError:
        return None


def device_identity(path: str) -> str:
    """What makes a device the same one across restarts: the block device number, and for a
    loop device the file behind it (/dev/loop3 can be attached to another file tomorrow)."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return f"file:{st.st_dev}:{st.st_ino}"
    backing = _loop_backing_identity(st.st_rdev)
    if backing is not None:
        return f"loop:{backing[0]}:{backing[1]}"
    return f"block:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _loop_backing_identity(dev: int) -> tuple[int, int] | None:
    backing = _loop_backing_stat(dev)
    return None if backing is None else (backing.st_dev, backing.st_ino)


def _read_dev_number(path: str) -> int | None:
    try:
        with open(path) as f:
            major, minor = f.read().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None
