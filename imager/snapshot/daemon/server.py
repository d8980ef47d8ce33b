"""The managed-volume daemon: one process per volume, started by launch.attach().

It owns the source device (opened O_EXCL, so nothing else mounts or claims it), serves it as the
FUSE file `volume` whose every write goes through a CowStore (fusefile.FileServer), attaches
the front loop device on that file, and while a snapshot exists serves the read-only file
`snapshot` beside it. It answers the control protocol (protocol.py) on a Unix socket
(control.py) and writes its record to the run directory.

"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import threading
import time

import mfusepy

from devices import loop
from devices.block import BlockDevice
from devices.errors import DeviceError
from devices.fs import mounts_of
from devices.libc import check, libc
from devices.topology import write_fingerprint

from ... import failpoints
from ...errors import ImagerError, SnapshotError, VolumeError
from ...ends.atomic import write_atomically
from ..cow import CowStore, SnapshotView
from ..cow.tracker import Roll
from .control import ControlServer
from ...fusefile import FileServer, ServedFile, serve
from .protocol import LOG_NAME, MOUNT_DIR_NAME, RECORD_NAME, SNAPSHOT_FILE, SOCKET_NAME, VOLUME_FILE

log = logging.getLogger("imager.daemon")

MNT_DETACH = 2
# The kernel sends RELEASE a moment after the last close (or loop detach): how long to wait for it.
HANDLE_RELEASE_TIMEOUT = 3.0
FUSE_START_TIMEOUT = 30.0


class _VolumeHandle:
    """An open of `volume`: every write through the COW store."""

    def __init__(self, store: CowStore):
        self.store = store

    def read_into(self, dst: memoryview, offset: int) -> int:
        return self.store.read_into(dst, offset)

    def write_from(self, src: memoryview, offset: int) -> int:
        if offset >= self.store.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        src = src[:self.store.size - offset]
        self.store.write(offset, src)
        return len(src)

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        pass


class _SnapshotHandle:
    """An open of `snapshot`: a read-only view of one generation."""

    def __init__(self, view: SnapshotView, on_unreadable):
        self.view = view
        self._on_unreadable = on_unreadable

    def read_into(self, dst: memoryview, offset: int) -> int:
        try:
            return self.view.read_into(dst, offset)
        except SnapshotError as e:
            self._on_unreadable(e)
            raise mfusepy.FuseOSError(errno.EIO) from None

    def write_from(self, src: memoryview, offset: int) -> int:
        raise mfusepy.FuseOSError(errno.EBADF)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.view.close()


class VolumeDaemon:
    """Owns the device, the CowStore, the FUSE mount and the front loop device of one volume."""

    def __init__(self, name: str, device_path: str, state_dir: str, run_dir: str,
                 cache_size: int | None, block_size: int):
        self.name = name
        self.device_path = device_path
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.cache_size = cache_size
        self.block_size = block_size
        self.mount_point = os.path.join(run_dir, MOUNT_DIR_NAME)
        self.fuse_file = os.path.join(self.mount_point, VOLUME_FILE)
        self.socket_path = os.path.join(run_dir, SOCKET_NAME)
        self.device: BlockDevice | None = None
        self.store: CowStore | None = None
        self.fs: FileServer | None = None
        self.front: str | None = None
        self.server: ControlServer | None = None
        self._fuse_thread: threading.Thread | None = None
        self._mounted = False
        # Serialises snapshot create/delete and detach against each other.
        self._control_lock = threading.Lock()
        self.fs_created_ns = time.time_ns()
        self._reported_unreadable_generation = -1
        self._roll: Roll | None = None        # what the tracker said when the backup's snapshot was taken

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        # Buffered, like a disk with a write cache: FUSE hands writes over at unaligned addresses
        # (O_DIRECT would cost a copy each), and fsync/flush on the front reach the device
        # through store.flush() before they return. Measured in bench/front.py.
        fingerprint = _write_fingerprint(self.device_path)     # before anything of ours writes
        self.device = BlockDevice(self.device_path, writable=True, exclusive=True, direct=False,
                                  on_notice=lambda msg: log.info("%s", msg))
        self.store = CowStore(self.device, self.state_dir, self.block_size, self.cache_size, fingerprint=fingerprint)
        if self.store.tracker.restarted:
            log.info("tracking changes anew (series %s): %s", self.store.tracker.state.series,
                     self.store.tracker.restarted)
        if self.store.snapshot_active:
            log.info("resuming snapshot generation %d from %s", self.store.generation, self.state_dir)
        os.makedirs(self.mount_point, mode=0o700, exist_ok=True)
        self.fs = FileServer(self._files)
        self._fuse_thread = threading.Thread(target=serve, args=(self.fs, self.mount_point, f"imager:{self.name}"),
                                             name="fuse", daemon=True)
        self._fuse_thread.start()
        if not self.fs.started.wait(FUSE_START_TIMEOUT):
            raise VolumeError(f"FUSE did not start in {FUSE_START_TIMEOUT:.0f} s")
        if self.fs.start_failure is not None:
            raise VolumeError(f"cannot serve {self.device_path} through FUSE: {self.fs.start_failure}")
        self._mounted = True
        # loop direct I/O: the front's requests go straight to FUSE (no second page cache of
        # the same data) and aio lets the loop driver keep several requests in flight.
        self.front = loop.attach(self.fuse_file, direct_io=True,
                                 block_size=self.device.logical_sector_size)
        log.info("serving %s (%d bytes) as %s, front %s", self.device_path, self.store.size,
                 self.fuse_file, self.front)
        self.server = ControlServer(self.socket_path, self)

    def _files(self) -> dict[str, ServedFile]:
        store = self.store
        files = {VOLUME_FILE: ServedFile(store.size, 0o600, self.fs_created_ns, store.block_size, self._open_volume)}
        started = store.snapshot_started_at
        if started is not None:
            files[SNAPSHOT_FILE] = ServedFile(store.size, 0o400, int(started * 1e9), store.block_size,
                                              self._open_snapshot)
        return files

    def _open_volume(self, writable: bool) -> _VolumeHandle:
        return _VolumeHandle(self.store)

    def _open_snapshot(self, writable: bool) -> _SnapshotHandle:
        if writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        try:
            return _SnapshotHandle(self.store.view(), self._report_unreadable)
        except SnapshotError:
            raise mfusepy.FuseOSError(errno.ENOENT) from None

    def _report_unreadable(self, error: SnapshotError) -> None:
        # Say why once per snapshot, not once per request.
        if self.store.generation != self._reported_unreadable_generation:
            self._reported_unreadable_generation = self.store.generation
            log.error("%s", error)

    # -- control -----------------------------------------------------------------------------

    def describe(self) -> dict:
        store = self.store
        snapshot = None
        if store.snapshot_active:
            stats = store.stats()
            snapshot = {
                "name": self.name,
                "path": os.path.join(self.mount_point, SNAPSHOT_FILE),
                "created_at": stats["started_at"],
                "generation": stats["generation"],
                "block_size": stats["block_size"],
                "changed_blocks": stats["changed_blocks"],
                "cache_bytes_used": stats["cache_bytes_used"],
                "cache_bytes_needed": stats["cache_bytes_needed"],
                "cache_capacity": stats["cache_capacity"],
                "invalid": stats["snapshot_invalid"],
                "invalid_reason": stats["invalid_reason"],
                "cache_full": stats["cache_full"],
                "tracker": self._roll.to_dict() if self._roll else None,
            }
        return {"name": self.name, "device": self.device_path, "size": store.size, "front": self.front,
                "fuse_file": self.fuse_file, "state_dir": self.state_dir, "run_dir": self.run_dir,
                "pid": os.getpid(), "log_path": os.path.join(self.state_dir, LOG_NAME),
                "snapshot": snapshot, "tracker": store.tracker.describe()}

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "status":
            return {"ok": True, "volume": self.describe()}
        if op == "failpoints" and failpoints.ENABLED:
            failpoints.configure(str(request.get("set", "")))
            log.warning("failpoints armed: %r", request.get("set"))
            return {"ok": True}
        with self._control_lock:
            if op == "snapshot-create":
                self._roll = self.store.start_snapshot(roll=bool(request.get("hold")))
                log.info("snapshot generation %d created%s", self.store.generation,
                         f" (tracker sequence {self._roll.sequence})" if self._roll else "")
                return {"ok": True, "volume": self.describe()}
            if op == "tracker-changes":
                return self._tracker_changes(request.get("sequence"))
            if op == "snapshot-delete":
                self._delete_snapshot(bool(request.get("force")), commit=request.get("tracker") == "commit")
                return {"ok": True, "volume": self.describe()}
            if op == "detach":
                self.detach()
                return {"ok": True, "stopping": True}
        raise VolumeError(f"unknown request {op!r}")

    def _tracker_changes(self, sequence: object) -> dict:
        """The blocks written since the base of the snapshot's roll `sequence`, as a bitmap."""
        bits = self.store.tracker.changes(sequence) if isinstance(sequence, int) else None
        if bits is None:
            raise SnapshotError(f"{self.name}: no tracked changes pending for sequence {sequence!r}")
        return {"ok": True, "bits": base64.b64encode(bits).decode(), "block_size": self.store.tracker.block_size}

    def drop_abandoned_snapshot(self, generation: int) -> None:
        """The backup that held snapshot `generation` is gone without deleting it: delete it."""
        with self._control_lock:
            if not self.store.snapshot_active or self.store.generation != generation:
                return
            log.warning("the backup holding snapshot generation %d went away: deleting the snapshot", generation)
            try:
                self._delete_snapshot(force=True)
            except (ImagerError, DeviceError) as e:
                log.error("could not delete the abandoned snapshot: %s", e)

    def write_record(self) -> None:
        """Say who we are in the run directory, for clients that must not wait on a daemon that
        may be stuck (and to tell what a dead daemon left behind)."""
        record = dict(self.describe(), snapshot=None, cache_size=self.cache_size, block_size=self.block_size)
        write_atomically(os.path.join(self.run_dir, RECORD_NAME), json.dumps(record).encode())

    def _delete_snapshot(self, force: bool, commit: bool = False) -> None:
        """End the snapshot. With `commit`, its backup is stored: the tracker's next interval
        starts from it; otherwise what the tracker rolled out goes back to be found next time."""
        if not self.store.snapshot_active:
            raise SnapshotError(f"{self.name} has no snapshot")
        if not self.fs.wait_for_handles(SNAPSHOT_FILE, 0, 0 if force else HANDLE_RELEASE_TIMEOUT):
            if not force:
                raise SnapshotError(
                    f"the snapshot of {self.name} is still open ({self.fs.open_handles(SNAPSHOT_FILE)} "
                    f"handles); detach its loop devices and close it first")
            log.warning("deleting the snapshot of %s while it is open", self.name)
        generation = self.store.generation
        if self._roll is not None:
            if commit and self.store.tracker.commit(self._roll.sequence):
                log.info("tracker sequence %d committed: the next incremental starts from it", self._roll.sequence)
            else:
                self.store.tracker.give_up(self._roll.sequence)
            self._roll = None
        self.store.end_snapshot()
        log.info("snapshot generation %d deleted", generation)

    def detach(self) -> None:
        """Refuse while in use; otherwise undo start() in reverse. Each step can be retried."""
        if self.store.snapshot_active:
            raise SnapshotError(f"{self.name} has a snapshot; delete it before detaching")
        if self.front is not None:
            mounted = mounts_of(self.front)
            if mounted:
                raise VolumeError(f"the front device {self.front} of {self.name} is mounted at "
                                        f"{', '.join(m.mount_point for m in mounted)}; unmount it first")
            _check_not_claimed(self.front)
            if not self.fs.wait_for_handles(SNAPSHOT_FILE, 0, HANDLE_RELEASE_TIMEOUT):
                raise VolumeError(f"the deleted snapshot file of {self.name} is still open; close it first")
            # The loop device holds one handle of `volume`; any other is a process using the file.
            if not self.fs.wait_for_handles(VOLUME_FILE, 1, HANDLE_RELEASE_TIMEOUT):
                raise VolumeError(f"{self.fuse_file} is open by another process; close it first")
            loop.detach(self.front)
            log.info("front %s detached", self.front)
            self.front = None
        if self._mounted:
            if not self.fs.wait_for_handles(VOLUME_FILE, 0, HANDLE_RELEASE_TIMEOUT):
                raise VolumeError(f"{self.fuse_file} is still open; close it first")
            _umount(self.mount_point)
            self._mounted = False
            self._fuse_thread.join(FUSE_START_TIMEOUT)
        self.close(clean=True)

    def close(self, clean: bool = False) -> None:
        """Let go of the store and the device. A clean stop records the device's write fingerprint
        once every write is on it, so that the tracked changes are trusted at the next attach."""
        flushed = False
        if self.device is not None:
            # Writes went through the source's page cache: put them on the device before letting go.
            try:
                self.device.flush()
                flushed = True
            except DeviceError as e:
                log.error("%s", e)
        if self.store is not None:
            fingerprint = _write_fingerprint(self.device_path) if clean and flushed else None
            self.store.close(fingerprint)
        if self.device is not None:
            self.device.close()
        try:
            os.rmdir(self.mount_point)
        except OSError:
            pass

    def abandon(self) -> None:
        """Best-effort cleanup after a failed start, so that nothing half-made stays attached."""
        try:
            if self.front is not None:
                loop.detach(self.front)
                self.front = None
            if self._mounted or (self._fuse_thread is not None and self._fuse_thread.is_alive()):
                try:
                    _umount(self.mount_point)
                except VolumeError:
                    _umount(self.mount_point, MNT_DETACH)
                self._mounted = False
        except Exception as e:
            log.error("cleanup after failed start: %s", e)
        finally:
            self.close()
            try:
                os.rmdir(self.run_dir)
            except OSError:
                pass


def _write_fingerprint(device: str) -> dict | None:
    try:
        return write_fingerprint(device)
    except (OSError, DeviceError) as e:
        log.info("cannot fingerprint the writes of %s (%s): tracked changes are not kept across restarts",
                 device, e)
        return None


def _check_not_claimed(device: str) -> None:
    """O_EXCL on a block device fails while anything mounts or holds it exclusively, in any mount
    namespace: a stricter test than this namespace's mount table."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VolumeError(f"the front device {device} is in use (mounted or claimed); "
                                    f"release it first") from None
        raise VolumeError(f"{device}: {e.strerror}") from None
    os.close(fd)


def _umount(path: str, flags: int = 0) -> None:
    try:
        check(libc.umount2(os.fsencode(path), flags))
    except OSError as e:
        raise VolumeError(f"cannot unmount {path}: {e.strerror}") from None
