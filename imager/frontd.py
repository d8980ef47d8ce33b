"""The managed-volume daemon: one process per volume, started by imager.front.attach().

It owns the source device (opened O_EXCL, so nothing else mounts or claims it), serves it as the
FUSE file `volume` whose every write goes through a CowStore, attaches the front loop device on
that file, and while a snapshot exists serves the read-only file `snapshot` beside it. It answers
the JSON-lines control protocol described in imager.front on a Unix socket.

FUSE through mfusepy (libfuse3's high-level API over ctypes) with its multi-threaded loop: the
CowStore's striped locks let writes to different blocks proceed in parallel, and libfuse's
threads release the GIL while they wait on /dev/fuse. Both files are opened with FOPEN_DIRECT_IO:
no FUSE page cache, so a write reaches the CowStore when the front issues it (nothing to flush
at freeze time) and a new snapshot can never be served from an older one's cached pages.

    python -m imager.frontd --name N --device DEV --state-dir DIR --run-dir DIR [--ready-fd FD]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import signal
import socketserver
import stat
import sys
import threading
import time

import mfusepy

from devices import loop
from devices.block import BlockDevice, mounts_of
from devices.errors import DeviceError

from . import failpoints, front
from .errors import ImagerError, SnapshotError
from .private import open_private
from .snapshot import DEFAULT_BLOCK_SIZE, CowStore, SnapshotView

log = logging.getLogger("imager.frontd")

# Largest FUSE write the kernel may send (libfuse's buffer holds 256 pages plus a header).
MAX_WRITE = 1 << 20
PR_SET_IO_FLUSHER = 57
MNT_DETACH = 2
# The kernel sends RELEASE a moment after the last close (or loop detach): how long to wait for it.
HANDLE_RELEASE_TIMEOUT = 3.0
FUSE_START_TIMEOUT = 30.0

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class VolumeFilesystem(mfusepy.Operations):
    """The FUSE side: `/volume` (read-write, through the CowStore) and, while a snapshot exists,
    `/snapshot` (read-only, through a SnapshotView per open)."""

    use_ns = True

    def __init__(self, store: CowStore):
        self.store = store
        self.started = threading.Event()
        self.start_failure: str | None = None
        self._created_ns = time.time_ns()
        self._handles: dict[int, SnapshotView | None] = {}   # None: a handle of `volume`
        self._writers: set[int] = set()
        self._next_handle = 1
        self._handles_changed = threading.Condition()
        self._reported_unreadable_generation = -1

    # -- lifetime ----------------------------------------------------------------------------

    def init_with_config(self, conn, config) -> None:
        if conn is not None:
            conn.max_write = MAX_WRITE
            conn.max_readahead = MAX_WRITE
        if config is not None:
            # `snapshot` appears and disappears: the kernel must ask every time, not remember.
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.attr_timeout = 0.0
        self.started.set()

    def open_handles(self, kind: str) -> int:
        with self._handles_changed:
            return self._count(kind)

    def wait_for_handles(self, kind: str, at_most: int, timeout: float) -> bool:
        """Wait until at most `at_most` handles of `kind` are open. The kernel sends RELEASE
        asynchronously after the last close (a detached loop device included), so a caller that
        just closed a file may have to wait a moment for it."""
        with self._handles_changed:
            return self._handles_changed.wait_for(lambda: self._count(kind) <= at_most, timeout)

    def _count(self, kind: str) -> int:
        return sum(1 for view in self._handles.values() if (view is None) == (kind == front.VOLUME_FILE))

    # -- namespace ---------------------------------------------------------------------------

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_mtime": self._created_ns,
                    "st_ctime": self._created_ns, "st_atime": self._created_ns}
        if path == "/" + front.VOLUME_FILE:
            return self._file_attrs(0o600, self._created_ns)
        if path == "/" + front.SNAPSHOT_FILE:
            started = self.store.snapshot_started_at
            if started is not None:
                return self._file_attrs(0o400, int(started * 1e9))
        raise mfusepy.FuseOSError(errno.ENOENT)

    def _file_attrs(self, mode: int, time_ns: int) -> dict:
        size = self.store.size
        return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": size,
                "st_blocks": -(-size // 512), "st_blksize": self.store.block_size,
                "st_mtime": time_ns, "st_ctime": time_ns, "st_atime": time_ns}

    def readdir(self, path, fh):
        names = [".", "..", front.VOLUME_FILE]
        if self.store.snapshot_active:
            names.append(front.SNAPSHOT_FILE)
        return names

    # -- files -------------------------------------------------------------------------------

    def open(self, path, fi):
        if path == "/" + front.VOLUME_FILE:
            view = None
        elif path == "/" + front.SNAPSHOT_FILE:
            if fi.flags & os.O_ACCMODE != os.O_RDONLY:
                raise mfusepy.FuseOSError(errno.EROFS)
            try:
                view = self.store.view()
            except SnapshotError:
                raise mfusepy.FuseOSError(errno.ENOENT) from None
        else:
            raise mfusepy.FuseOSError(errno.ENOENT)
        with self._handles_changed:
            handle = self._next_handle
            self._next_handle += 1
            self._handles[handle] = view
            if view is None and fi.flags & os.O_ACCMODE != os.O_RDONLY:
                self._writers.add(handle)
        fi.fh = handle
        fi.direct_io = 1
        return 0

    def release(self, path, fi):
        with self._handles_changed:
            view = self._handles.pop(fi.fh, None)
            self._writers.discard(fi.fh)
            self._handles_changed.notify_all()
        if view is not None:
            view.close()
        return 0

    def read_into(self, path, dst: memoryview, offset: int, fi) -> int:
        view = self._handles.get(fi.fh)
        try:
            if view is None:
                return self.store.read_into(dst, offset)
            return view.read_into(dst, offset)
        except SnapshotError as e:
            # Say why once per snapshot, not once per request.
            if self.store.generation != self._reported_unreadable_generation:
                self._reported_unreadable_generation = self.store.generation
                log.error("%s", e)
            raise mfusepy.FuseOSError(errno.EIO) from None
        except (ImagerError, DeviceError, OSError) as e:
            # The reader gets EIO, as from a disk; the offset and the cause go to the log.
            log.error("read of %d bytes at offset %d of %s failed: %s", len(dst), offset,
                      "the snapshot" if view is not None else "the volume", e)
            raise mfusepy.FuseOSError(errno.EIO) from None

    def write_from(self, path, src: memoryview, offset: int, fi) -> int:
        if self._handles.get(fi.fh) is not None:
            raise mfusepy.FuseOSError(errno.EBADF)
        if offset >= self.store.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        src = src[:self.store.size - offset]
        try:
            self.store.write(offset, src)
        except (ImagerError, DeviceError, OSError) as e:
            log.error("write of %d bytes at offset %d failed: %s", len(src), offset, e)
            raise mfusepy.FuseOSError(errno.EIO) from None
        return len(src)

    # The plain mfusepy entry points, for use without _ZeroCopyFUSE.
    def read(self, path, size, offset, fi):
        buf = bytearray(size)
        return bytes(buf[:self.read_into(path, memoryview(buf), offset, fi)])

    def write(self, path, data, offset, fi):
        return self.write_from(path, memoryview(data), offset, fi)

    def fsync(self, path, datasync, fi):
        self._flush_store()
        return 0

    def flush(self, path, fi):
        # close() of a writer must not return before its data is on the device.
        if fi.fh in self._writers:
            self._flush_store()
        return 0

    def _flush_store(self) -> None:
        try:
            self.store.flush()
        except (ImagerError, DeviceError, OSError) as e:
            log.error("flush failed: %s", e)
            raise mfusepy.FuseOSError(errno.EIO) from None

    def truncate(self, path, length, fh=None):
        if path == "/" + front.VOLUME_FILE and length == self.store.size:
            return 0  # an O_TRUNC-less "truncate to the same size" (dd conv=notrunc tools, cp) is harmless
        raise mfusepy.FuseOSError(errno.EPERM)

    def statfs(self, path):
        blocks = self.store.size // self.store.block_size
        return {"f_bsize": self.store.block_size, "f_frsize": self.store.block_size,
                "f_blocks": blocks, "f_bfree": 0, "f_bavail": 0, "f_files": 2, "f_ffree": 0,
                "f_namemax": 255}


class _ZeroCopyFUSE(mfusepy.FUSE):
    """mfusepy.FUSE handing the operations a memoryview of libfuse's own request buffer instead
    of a bytes copy (and reading straight into the reply buffer): one to two fewer copies of
    every 1 MiB request. The view is valid only during the call, which does all its I/O."""

    def read(self, path, buf, size, offset, fip):
        dst = _c_buffer(buf, size)
        return self.operations.read_into(_decode(path), dst, offset, fip.contents)

    def write(self, path, buf, size, offset, fip):
        src = _c_buffer(buf, size)
        return self.operations.write_from(_decode(path), src, offset, fip.contents)


def _c_buffer(pointer, size: int) -> memoryview:
    address = ctypes.cast(pointer, ctypes.c_void_p).value
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def _decode(path: bytes | None) -> str | None:
    return None if path is None else path.decode("utf-8", "surrogateescape")


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
        self.mount_point = os.path.join(run_dir, front.MOUNT_DIR_NAME)
        self.fuse_file = os.path.join(self.mount_point, front.VOLUME_FILE)
        self.socket_path = os.path.join(run_dir, front.SOCKET_NAME)
        self.device: BlockDevice | None = None
        self.store: CowStore | None = None
        self.fs: VolumeFilesystem | None = None
        self.front: str | None = None
        self.server: socketserver.ThreadingUnixStreamServer | None = None
        self._fuse_thread: threading.Thread | None = None
        self._mounted = False
        # Serialises snapshot create/delete and detach against each other.
        self._control_lock = threading.Lock()

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        # Buffered, like a disk with a write cache: FUSE hands writes over at unaligned addresses
        # (O_DIRECT would cost a copy each), and fsync/flush on the front reach the device
        # through store.flush() before they return. Measured in bench/front.py.
        self.device = BlockDevice(self.device_path, writable=True, exclusive=True, direct=False,
                                  on_notice=lambda msg: log.info("%s", msg))
        self.store = CowStore(self.device, self.state_dir, self.block_size, self.cache_size)
        if self.store.snapshot_active:
            log.info("resuming snapshot generation %d from %s", self.store.generation, self.state_dir)
        os.makedirs(self.mount_point, mode=0o700, exist_ok=True)
        self.fs = VolumeFilesystem(self.store)
        self._fuse_thread = threading.Thread(target=self._serve_fuse, name="fuse", daemon=True)
        self._fuse_thread.start()
        if not self.fs.started.wait(FUSE_START_TIMEOUT):
            raise front.VolumeError(f"FUSE did not start in {FUSE_START_TIMEOUT:.0f} s")
        if self.fs.start_failure is not None:
            raise front.VolumeError(f"cannot serve {self.device_path} through FUSE: {self.fs.start_failure}")
        self._mounted = True
        # loop direct I/O: the front's requests go straight to FUSE (no second page cache of
        # the same data) and aio lets the loop driver keep several requests in flight.
        self.front = loop.attach(self.fuse_file, direct_io=True,
                                 block_size=self.device.logical_sector_size)
        log.info("serving %s (%d bytes) as %s, front %s", self.device_path, self.store.size,
                 self.fuse_file, self.front)
        self.server = _ControlServer(self.socket_path, self)

    def _serve_fuse(self) -> None:
        # One request at a time: with libfuse's thread pool the Python threads fought over the
        # GIL, and random 4 KiB writes through the front ran at a third of the rate they reach
        # from a single thread, which still gets many requests in flight from the kernel
        # (async direct I/O). Measured in bench/front.py.
        try:
            _ZeroCopyFUSE(self.fs, self.mount_point, raw_fi=True, foreground=True, nothreads=True,
                          allow_other=True, default_permissions=True, fsname=f"imager:{self.name}",
                          subtype="imager")
        except BaseException as e:  # the thread's only job: report why FUSE stopped
            self.fs.start_failure = str(e) or type(e).__name__
            log.error("FUSE loop ended: %s", self.fs.start_failure)
        finally:
            self.fs.started.set()
            log.info("FUSE loop exited")

    # -- control -----------------------------------------------------------------------------

    def describe(self) -> dict:
        store = self.store
        snapshot = None
        if store.snapshot_active:
            stats = store.stats()
            snapshot = {
                "name": self.name,
                "path": os.path.join(self.mount_point, front.SNAPSHOT_FILE),
                "created_at": stats["started_at"],
                "generation": stats["generation"],
                "block_size": stats["block_size"],
                "changed_blocks": stats["changed_blocks"],
                "cache_bytes_used": stats["cache_bytes_used"],
                "cache_bytes_needed": stats["cache_bytes_needed"],
                "cache_capacity": stats["cache_capacity"],
                "invalid": stats["snapshot_invalid"],
                "invalid_reason": stats["invalid_reason"],
            }
        return {"name": self.name, "device": self.device_path, "size": store.size, "front": self.front,
                "fuse_file": self.fuse_file, "state_dir": self.state_dir, "run_dir": self.run_dir,
                "pid": os.getpid(), "log_path": os.path.join(self.state_dir, front.LOG_NAME),
                "snapshot": snapshot}

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
                self.store.start_snapshot()
                log.info("snapshot generation %d created", self.store.generation)
                return {"ok": True, "volume": self.describe()}
            if op == "snapshot-delete":
                self._delete_snapshot(bool(request.get("force")))
                return {"ok": True, "volume": self.describe()}
            if op == "detach":
                self.detach()
                return {"ok": True, "stopping": True}
        raise front.VolumeError(f"unknown request {op!r}")

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
        path = os.path.join(self.run_dir, front.RECORD_NAME)
        with open_private(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def _delete_snapshot(self, force: bool) -> None:
        if not self.store.snapshot_active:
            raise SnapshotError(f"{self.name} has no snapshot")
        if not self.fs.wait_for_handles(front.SNAPSHOT_FILE, 0, 0 if force else HANDLE_RELEASE_TIMEOUT):
            if not force:
                raise SnapshotError(
                    f"the snapshot of {self.name} is still open ({self.fs.open_handles(front.SNAPSHOT_FILE)} "
                    f"handles); detach its loop devices and close it first")
            log.warning("deleting the snapshot of %s while it is open", self.name)
        generation = self.store.generation
        self.store.end_snapshot()
        log.info("snapshot generation %d deleted", generation)

    def detach(self) -> None:
        """Refuse while in use; otherwise undo start() in reverse. Each step can be retried."""
        if self.store.snapshot_active:
            raise SnapshotError(f"{self.name} has a snapshot; delete it before detaching")
        if self.front is not None:
            mounted = mounts_of(self.front)
            if mounted:
                raise front.VolumeError(f"the front device {self.front} of {self.name} is mounted at "
                                        f"{', '.join(m.mount_point for m in mounted)}; unmount it first")
            _check_not_claimed(self.front)
            if not self.fs.wait_for_handles(front.SNAPSHOT_FILE, 0, HANDLE_RELEASE_TIMEOUT):
                raise front.VolumeError(f"the deleted snapshot file of {self.name} is still open; close it first")
            # The loop device holds one handle of `volume`; any other is a process using the file.
            if not self.fs.wait_for_handles(front.VOLUME_FILE, 1, HANDLE_RELEASE_TIMEOUT):
                raise front.VolumeError(f"{self.fuse_file} is open by another process; close it first")
            loop.detach(self.front)
            log.info("front %s detached", self.front)
            self.front = None
        if self._mounted:
            if not self.fs.wait_for_handles(front.VOLUME_FILE, 0, HANDLE_RELEASE_TIMEOUT):
                raise front.VolumeError(f"{self.fuse_file} is still open; close it first")
            _umount(self.mount_point)
            self._mounted = False
            self._fuse_thread.join(FUSE_START_TIMEOUT)
        self.close()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.device is not None:
            # Writes went through the source's page cache: put them on the device before letting go.
            try:
                self.device.flush()
            except DeviceError as e:
                log.error("%s", e)
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
                except front.VolumeError:
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


class _ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, daemon: VolumeDaemon):
        self.daemon = daemon
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            super().__init__(path, _ControlHandler)
        finally:
            os.umask(old_umask)


class _ControlHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        daemon: VolumeDaemon = self.server.daemon
        # The snapshot generation this connection holds (a backup's): when the connection drops
        # before the backup deletes it, the backup died, and the snapshot goes with it.
        held: int | None = None
        try:
            for line in self.rfile:
                try:
                    request = json.loads(line)
                    reply = daemon.handle(request)
                    if request.get("op") == "snapshot-create" and request.get("hold"):
                        held = daemon.store.generation
                    elif request.get("op") == "snapshot-delete":
                        held = None
                except (ImagerError, DeviceError) as e:
                    reply = {"ok": False, "error": str(e), "kind": type(e).__name__}
                except Exception as e:
                    log.exception("request %r failed", line)
                    reply = {"ok": False, "error": f"internal error in the volume daemon: {e}", "kind": "VolumeError"}
                stopping = reply.pop("stopping", False)
                self.wfile.write(json.dumps(reply).encode() + b"\n")
                self.wfile.flush()
                if stopping:
                    # The client learns that the daemon is gone when this connection closes at exit.
                    self.server.shutdown()
                    return
        except OSError:
            pass    # the client went away mid-request: handled below like any other drop
        finally:
            if held is not None:
                daemon.drop_abandoned_snapshot(held)


def _check_not_claimed(device: str) -> None:
    """O_EXCL on a block device fails while anything mounts or holds it exclusively, in any mount
    namespace: a stricter test than this namespace's mount table."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise front.VolumeError(f"the front device {device} is in use (mounted or claimed); "
                                    f"release it first") from None
        raise front.VolumeError(f"{device}: {e.strerror}") from None
    os.close(fd)


def _umount(path: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(path), flags) != 0:
        err = ctypes.get_errno()
        raise front.VolumeError(f"cannot unmount {path}: {os.strerror(err)}")


def _become_daemon() -> None:
    # attach() started us with setsid(); fork once more so the daemon is no session leader (it
    # can never get a controlling terminal again) and the starter exits at once.
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _mark_io_flusher() -> None:
    # This process sits in the write-back path of the front device: memory reclaim must not make
    # it wait for its own writes (PR_SET_IO_FLUSHER, Linux 5.6, as loop and NBD servers do).
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.info("PR_SET_IO_FLUSHER refused (%s): reclaim may wait on this daemon", os.strerror(ctypes.get_errno()))


def _send_ready(fd: int | None, reply: dict) -> None:
    if fd is None:
        return
    try:
        os.write(fd, json.dumps(reply).encode() + b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imager.frontd", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--cache-size", type=int)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--ready-fd", type=int, help="write one JSON line here when ready or failed")
    parser.add_argument("--foreground", action="store_true", help="do not fork (for debugging)")
    args = parser.parse_args(argv)

    if not args.foreground:
        _become_daemon()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s frontd[{os.getpid()}] {args.name}: %(levelname)s %(message)s")
    _mark_io_flusher()

    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)
    daemon = VolumeDaemon(args.name, args.device, args.state_dir, args.run_dir, args.cache_size,
                          args.block_size)

    def on_terminate(signum, frame):
        # Stop as `detach` would, refusing the same way while the volume is in use. Installed
        # before FUSE starts so that libfuse does not install its own (which would unmount
        # under a mounted front).
        def stop():
            if daemon.server is None:
                return
            try:
                with daemon._control_lock:
                    daemon.detach()
            except (ImagerError, DeviceError) as e:
                log.error("not stopping on signal %d: %s", signum, e)
                return
            daemon.server.shutdown()
        threading.Thread(target=stop, name="stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_terminate)
    signal.signal(signal.SIGINT, on_terminate)
    try:
        daemon.start()
    except Exception as e:
        if isinstance(e, (ImagerError, DeviceError)):
            log.error("%s", e)
            failure = {"ok": False, "error": str(e), "kind": type(e).__name__}
        else:
            log.exception("start failed")
            failure = {"ok": False, "error": f"volume daemon failed to start: {e}", "kind": "VolumeError"}
        daemon.abandon()
        _send_ready(args.ready_fd, failure)
        return 1

    daemon.write_record()
    _send_ready(args.ready_fd, {"ok": True, "volume": daemon.describe()})
    try:
        # The poll interval bounds how long detach waits for the server loop to notice shutdown().
        daemon.server.serve_forever(poll_interval=0.05)
    finally:
        daemon.server.server_close()
        for path in (daemon.socket_path, os.path.join(daemon.run_dir, front.RECORD_NAME)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(daemon.run_dir)
        except OSError:
            pass  # not empty: something else lives there, leave it
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
