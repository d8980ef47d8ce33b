"""The files a volume's worker serves on the FUSE connection its supervisor holds (devices.fuse):
`volume`, every write through the CowStore, and while a snapshot exists the read-only
`snapshot` of that generation.

A worker can die at any moment and its successor must go on serving the handles the kernel
holds (the front loop device keeps `volume` open for as long as it exists). So a handle is
described by what it opens, written to the run directory before its OPEN is answered, and a
worker rebuilds any handle it finds there on first use. The list also answers "is anything
still open?" for detach and snapshot delete, across workers.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from typing import Callable

from devices.errors import DeviceError
from devices.fuse import Attr

from ...ends.atomic import write_atomically
from ...errors import ImagerError, SnapshotError
from ..cow import CowStore
from .protocol import SNAPSHOT_FILE, VOLUME_FILE

log = logging.getLogger("imager.daemon")

HANDLES_NAME = "handles.json"
VOLUME_INO = 2
# A new snapshot is a new file to the kernel (another node id), never the old one reappearing.
SNAPSHOT_INO_BASE = 1 << 32


class VolumeFiles:
    """devices.fuse.Files over a CowStore. Errors from the store reach the caller as EIO, as from
    a disk, with the offset and the cause in the log."""

    def __init__(self, store: CowStore, created_ns: int, run_dir: str,
                 on_unreadable: Callable[[SnapshotError], None]):
        self.store = store
        self.created_ns = created_ns
        self._path = os.path.join(run_dir, HANDLES_NAME)
        self._on_unreadable = on_unreadable
        self._changed = threading.Condition()
        self._described: dict[int, dict] = self._load()      # fh -> {"name", "writable", "generation"}
        self._open: dict[int, object] = {}                     # fh -> a SnapshotView, for snapshot handles

    # -- the directory ---------------------------------------------------------------------------

    def listing(self) -> dict[str, Attr]:
        store = self.store
        files = {VOLUME_FILE: Attr(VOLUME_INO, store.size, stat.S_IFREG | 0o600, self.created_ns, store.block_size)}
        started = store.snapshot_started_at
        if started is not None:
            files[SNAPSHOT_FILE] = Attr(SNAPSHOT_INO_BASE + store.generation, store.size, stat.S_IFREG | 0o400,
                                        int(started * 1e9), store.block_size)
        return files

    def open(self, attr: Attr, writable: bool, fh: int) -> None:
        if attr.ino == VOLUME_INO:
            entry = {"name": VOLUME_FILE, "writable": writable}
        else:
            if writable:
                raise OSError(errno.EROFS, "the snapshot is read-only")
            entry = {"name": SNAPSHOT_FILE, "writable": False, "generation": attr.ino - SNAPSHOT_INO_BASE}
            self._view(fh, entry)
        with self._changed:
            self._described[fh] = entry
            self._save()

    def release(self, fh: int) -> None:
        with self._changed:
            self._described.pop(fh, None)
            view = self._open.pop(fh, None)
            self._save()
            self._changed.notify_all()
        if view is not None:
            view.close()

    # -- I/O -------------------------------------------------------------------------------------

    def read_into(self, fh: int, dst: memoryview, offset: int) -> int:
        entry = self._entry(fh)
        if entry["name"] == VOLUME_FILE:
            return _as_eio(lambda: self.store.read_into(dst, offset), f"read of {len(dst)} bytes at {offset} of volume")
        view = self._open.get(fh) or self._view(fh, entry)
        try:
            return view.read_into(dst, offset)
        except SnapshotError as e:
            self._on_unreadable(e)
            raise OSError(errno.EIO, str(e)) from None

    def write_from(self, fh: int, src: memoryview, offset: int) -> int:
        entry = self._entry(fh)
        if not entry["writable"]:
            raise OSError(errno.EBADF, "opened read-only")
        store = self.store
        if offset >= store.size:
            raise OSError(errno.ENOSPC, "beyond the end of the volume")
        src = src[:store.size - offset]
        _as_eio(lambda: store.write(offset, src), f"write of {len(src)} bytes at {offset} of volume")
        return len(src)

    def flush(self, fh: int) -> None:
        # close() of a writer must not return before its data is durable.
        if self._entry(fh)["writable"]:
            _as_eio(self.store.flush, "flush of volume")

    def fsync(self, fh: int) -> None:
        if self._entry(fh)["name"] == VOLUME_FILE:
            _as_eio(self.store.flush, "flush of volume")

    # -- what is open ----------------------------------------------------------------------------

    def open_handles(self, name: str) -> int:
        with self._changed:
            return self._count(name)

    def wait_for_handles(self, name: str, at_most: int, timeout: float) -> bool:
        """Wait until at most `at_most` handles of file `name` are open. The kernel sends RELEASE
        asynchronously after the last close (a detached loop device included)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count(name) <= at_most, timeout)

    def _count(self, name: str) -> int:
        return sum(1 for e in self._described.values() if e["name"] == name)

    def _entry(self, fh: int) -> dict:
        entry = self._described.get(fh)
        if entry is None:
            log.error("request on unknown file handle %d", fh)
            raise OSError(errno.EBADF, "unknown handle")
        return entry

    def _view(self, fh: int, entry: dict):
        """The snapshot view of handle `fh`; a handle of a snapshot that is gone reads as EIO, as
        one that was open when its snapshot was deleted does."""
        store = self.store
        if not store.snapshot_active or store.generation != entry["generation"]:
            if fh in self._described:
                raise OSError(errno.EIO, "its snapshot was deleted")
            raise OSError(errno.ENOENT, "no such snapshot")
        try:
            view = store.view()
        except SnapshotError:
            raise OSError(errno.ENOENT, "no snapshot") from None
        with self._changed:
            kept = self._open.setdefault(fh, view)    # another thread may have made one meanwhile
        if kept is not view:
            view.close()
        return kept

    def _load(self) -> dict[int, dict]:
        try:
            with open(self._path) as f:
                return {int(fh): entry for fh, entry in json.load(f).items()}
        except FileNotFoundError:
            return {}
        except ValueError as e:
            log.error("%s is unreadable (%s): handles opened by an earlier worker will fail", self._path, e)
            return {}

    def _save(self) -> None:
        write_atomically(self._path, json.dumps({str(fh): e for fh, e in self._described.items()}).encode())


def _as_eio(call: Callable, what: str):
    try:
        return call()
    except (ImagerError, DeviceError, OSError) as e:
        log.error("%s failed: %s", what, e)
        raise OSError(errno.EIO, str(e)) from None
