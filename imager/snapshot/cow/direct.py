"""A snapshot read by another process (a backup) straight from the volume's device and its
store's files, without a request to the volume's daemon for each read.

Why it is point-in-time without the store's block locks: the store keeps a block's original in
the cache region, then records its slot in the index, then sets its bit, and only then lets the
first write after the snapshot reach the device (store.py). So a reader that reads the device
first and looks at the bits only once that read is done sees, for every block:

- bit clear: no write to the block had started when the read ended, so the read saw the original;
- bit set: the original is in the cache region, at the slot the index gives, whatever the device
  read saw.

Reads go to the device with O_DIRECT, as the daemon's own snapshot reads do: such a read writes
back the dirty pages it covers first, so it also sees what the daemon wrote before the snapshot
and has not flushed yet.

What this reader cannot see is the store's state: a snapshot deleted, or no longer valid, while it
is read. A bit set with no slot (the cache was full, or its original could not be kept) sends the
read to the daemon's view instead, which answers with the error that says why; for the rest the
caller asks the daemon once all reads are done (`PlannedVolume.check_reads`), because every
such change is final: a deleted snapshot never comes back under its generation and start time,
and an invalid one never becomes valid again. (A worker that took over without learning that
the snapshot was invalid, its state file being full, still has every block whose original was
not kept marked so: reads of those fail.)
"""

from __future__ import annotations

import logging
import mmap
import os
import threading

import numpy as np

from devices.aligned import AlignedIO
from devices.block import BlockDevice
from devices.errors import DeviceError
from devices.topology import device_identity

from ...errors import SnapshotError
from .state import BITMAP_FILE, CACHE_FILE, INDEX_FILE, STATE_FILE, pread_all, read_state

log = logging.getLogger(__name__)


class DirectSnapshotReader:
    """Snapshot `generation` (started at `started_at`) of the volume on `device_path`, whose store
    keeps its files in `state_dir`. `view` is the same snapshot served by the daemon (its snapshot
    file, opened): what is read when the store's files do not say where a block's original is.

    Raises SnapshotError when the files are not those of that snapshot of that device."""

    def __init__(self, device_path: str, state_dir: str, *, generation: int, started_at: float, view):
        self._view = view
        self._view_io = AlignedIO(view)
        self.path = view.path
        self.size = int(view.size)
        self.logical_sector_size = int(view.logical_sector_size)
        self.device_path = device_path
        self.fallbacks = 0
        self._fallback_lock = threading.Lock()
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._device = BlockDevice(device_path, direct=True, on_notice=log.info)
        try:
            self._open(state_dir, generation, started_at)
        except BaseException:
            self.close()
            raise

    def _open(self, state_dir: str, generation: int, started_at: float) -> None:
        where = f"{state_dir} ({self.device_path})"
        try:
            state = read_state(os.path.join(state_dir, STATE_FILE))
        except OSError as e:
            raise SnapshotError(f"{where}: {e.strerror}") from None
        if state is None or state.device_identity != device_identity(self.device_path):
            raise SnapshotError(f"{where}: the snapshot state belongs to another device")
        if not state.active or state.generation != generation or state.started_at != started_at:
            raise SnapshotError(f"{where}: snapshot generation {generation} is not the active one")
        if state.invalid:
            raise SnapshotError(f"{where}: the snapshot is no longer point-in-time: {state.invalid_reason}")
        if self._device.size != self.size or state.device_size != self.size:
            raise SnapshotError(f"{where}: the device is {self._device.size} bytes, its snapshot {self.size}")
        self.block_size = state.block_size
        blocks = max(1, -(-self.size // self.block_size))
        bitmap = self._map(os.path.join(state_dir, BITMAP_FILE), -(-blocks // 8))
        index = self._map(os.path.join(state_dir, INDEX_FILE), blocks * 8)
        self._bits = memoryview(bitmap)
        self._bitmap = np.frombuffer(bitmap, dtype=np.uint8)
        self._index = np.frombuffer(index, dtype=np.int64)
        self._cache_fd = self._open_file(os.path.join(state_dir, CACHE_FILE))
        self._io = AlignedIO(self._device)

    def _open_file(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise SnapshotError(f"{path}: {e.strerror}") from None
        self._fds.append(fd)
        return fd

    def _map(self, path: str, size: int) -> mmap.mmap:
        fd = self._open_file(path)
        if os.fstat(fd).st_size != size:
            raise SnapshotError(f"{path}: {os.fstat(fd).st_size} bytes, where the snapshot needs {size}")
        mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._maps.append(mapped)
        return mapped

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` from `offset` of the snapshot; returns the bytes read (short only at its end)."""
        if offset >= self.size:
            return 0
        length = min(len(buf), self.size - offset)
        if length <= 0:
            return 0
        dst = memoryview(buf).cast("B")[:length]
        got = self._io.read(dst, offset)
        if got < length:
            raise DeviceError(f"{self.device_path}: short read at offset {offset + got}")
        # Only now, with the device read done, are the bits looked at (see the module's docstring).
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        if first == last:
            if not self._bits[first >> 3] & (1 << (first & 7)):
                return length
            changed = np.array([first])
        else:
            span = self._bitmap[first >> 3:(last >> 3) + 1]
            if not span.any():
                return length
            bits = np.unpackbits(span, bitorder="little")[first & 7:(first & 7) + last - first + 1]
            changed = np.flatnonzero(bits) + first
        slots = self._index[changed] - 1
        if (slots < 0).any():
            return self._from_view(dst, offset, changed[slots < 0][0])
        end = offset + length
        run = 0
        while run < len(changed):
            # Neighbouring blocks whose originals sit in neighbouring slots: one read.
            count = 1
            while (run + count < len(changed) and changed[run + count] == changed[run] + count
                   and slots[run + count] == slots[run] + count):
                count += 1
            block, slot = int(changed[run]), int(slots[run])
            start = max(offset, block * bs)
            stop = min(end, (block + count) * bs)
            if not self._read_cache(dst[start - offset:stop - offset], slot * bs + start - block * bs):
                return self._from_view(dst, offset, block)
            run += count
        return length

    def _read_cache(self, dst: memoryview, position: int) -> bool:
        try:
            pread_all(self._cache_fd, dst, position)
        except (OSError, SnapshotError):     # the latter: truncated, the snapshot ended
            return False
        return True

    def _from_view(self, dst: memoryview, offset: int, block: int) -> int:
        """The daemon's answer for this range: the original of `block` is not where the store's
        files say (the snapshot stopped being valid, or ended)."""
        with self._fallback_lock:
            self.fallbacks += 1
            first = self.fallbacks == 1
        if first:
            log.info("%s: block %d of the snapshot has no original in the cache region; asking the "
                     "volume's daemon", self.device_path, block)
        got = self._view_io.read(dst, offset)
        if got < len(dst):
            raise DeviceError(f"{self.path}: short read at offset {offset + got}")
        return got

    def close(self) -> None:
        bits = getattr(self, "_bits", None)
        if bits is not None:
            bits.release()
        self._bitmap = self._index = None      # type: ignore[assignment]
        for mapped in self._maps:
            try:
                mapped.close()
            except BufferError:
                pass        # a numpy view still refers to it: it goes with its last reference
        self._maps = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._device.close()

    def __enter__(self) -> "DirectSnapshotReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
