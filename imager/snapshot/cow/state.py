"""A COW store's state directory, never on the volume itself:

    lock         flock'd by the one store that uses the directory
    state.json   block size, volume size, whether a snapshot is active or invalid, generation,
                 which device the files belong to
    bitmap       one bit per COW block, mmap'd: set = this block changed since the snapshot,
                 and (while the snapshot is valid) its original is in the cache
    index        one int64 per COW block, mmap'd: 1 + the cache slot holding the original
    cache        the cache region: original blocks, one slot of block_size bytes each

The mapped files are allocated in full when created: a store into a mapped page the
filesystem cannot allocate (a full state filesystem) is a SIGBUS, which would kill the daemon
in a writer's path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
from dataclasses import asdict, dataclass

from devices.block import preallocate
from devices.topology import path_is_on

from ... import failpoints
from ...errors import SnapshotError
from ...ends.atomic import write_atomically
from ...private import make_private_dir

STATE_FORMAT = 1
LOCK_FILE = "lock"
STATE_FILE = "state.json"
BITMAP_FILE = "bitmap"
INDEX_FILE = "index"
CACHE_FILE = "cache"


@dataclass
class PersistedState:
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


class StateDir:
    """The files of one store, held exclusively: two stores on one directory would hand out the
    same cache slots."""

    def __init__(self, path: str, device_path: str):
        self.path = os.path.abspath(path)
        make_private_dir(self.path)
        refuse_state_dir_on_volume(device_path, self.path)
        self._lock_fd = self.open_file(LOCK_FILE)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SnapshotError(f"the state directory {self.path} is in use by another volume's "
                                f"daemon; give this volume its own") from None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open_file(self, name: str) -> int:
        return os.open(self.file(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def load(self, device_path: str, size: int, block_size: int, identity: str) -> PersistedState:
        """The stored state when it belongs to this device and geometry; a new one otherwise,
        with the old bitmap, index and cache discarded. Refuses to drop an active snapshot
        of another device or geometry."""
        stored = read_state(self.file(STATE_FILE))
        same_geometry = (stored is not None and stored.device_size == size and stored.block_size == block_size
                         and stored.device_identity in ("", identity))
        if stored is not None and stored.active:
            if stored.device_identity not in ("", identity):
                raise SnapshotError(
                    f"{self.path} holds an active snapshot of another device ({stored.device_path}, "
                    f"{stored.device_identity}); {device_path} is {identity} (end that snapshot or use "
                    f"another state directory)")
            if not same_geometry:
                raise SnapshotError(
                    f"{self.path} holds an active snapshot of a {stored.device_size}-byte volume with "
                    f"{stored.block_size}-byte COW blocks; this volume is {size} bytes with {block_size}-byte "
                    f"blocks (end that snapshot or use another state directory)")
            return stored
        if same_geometry and stored is not None:
            return stored
        state = PersistedState(STATE_FORMAT, device_path, size, block_size,
                               generation=stored.generation if stored is not None else 0, device_identity=identity)
        # Another geometry makes the old bitmap and index meaningless: start them anew.
        for name in (BITMAP_FILE, INDEX_FILE, CACHE_FILE):
            try:
                os.unlink(self.file(name))
            except FileNotFoundError:
                pass
        self.persist(state)
        return state

    def persist(self, state: PersistedState) -> None:
        """Write state.json durably, all or nothing."""
        failpoints.check("state.persist")
        write_atomically(self.file(STATE_FILE), json.dumps(asdict(state)).encode())

    def mapped(self, name: str, size: int) -> mmap.mmap:
        """The file `name`, `size` bytes, mapped shared and allocated in full."""
        fd = self.open_file(name)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            try:
                preallocate(fd, 0, size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise SnapshotError(f"no room for {size} bytes of snapshot state in {self.path}") from None
                _write_zeros_where_holes(fd, size)
            return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def read_state(path: str) -> PersistedState | None:
    """The state file at `path`; None when there is none."""
    try:
        with open(path) as f:
            return PersistedState(**json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise SnapshotError(f"{path}: unreadable snapshot state: {e}") from None


def refuse_state_dir_on_volume(device_path: str, state_dir: str) -> None:
    """A state directory stored on the volume being snapshotted would change that volume (and,
    through a FUSE front, deadlock)."""
    try:
        on_volume = path_is_on(device_path, state_dir)
    except OSError as e:
        raise SnapshotError(f"{device_path}: {e.strerror}") from None
    if on_volume:
        raise SnapshotError(f"the snapshot state directory {state_dir} is on {device_path}, the volume "
                            f"being snapshotted; put it on another volume")


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


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def pread_all(fd: int, dst: memoryview, offset: int) -> None:
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n == 0:
            raise SnapshotError(f"the snapshot cache region is truncated at offset {offset + done}")
        done += n
