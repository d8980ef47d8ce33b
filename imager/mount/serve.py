"""A CachedVolume served read-only through FUSE (devices.fuse): the file `volume`, and a file per
partition (`part1`, ...) that is a window on it, for loop devices, blkid and anyone who wants the
bytes of a filesystem the kernel cannot mount.

The same FUSE server as the volume daemon's, not libfuse (mfusepy): its READ replies go out of
page-aligned buffers, which the kernel copies several times faster than libfuse's, and READs are
handled by several threads, so a loop device's async direct reads overlap with the decoding. A
sequential read of the mounted filesystem ran at 0.25-0.4x of `zstd -d` through mfusepy
(bench/mount.py)."""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
from typing import Callable

from devices import fs, fuse
from devices.errors import DeviceError

from ..errors import ImagerError, UsageError
from .volume import CachedVolume, copy_views

log = logging.getLogger("imager.mount")

VOLUME_FILE = "volume"
START_TIMEOUT = 30.0
# Largest READ the kernel sends (the loop device asks for up to 1 MiB at a time).
MAX_READ = 1 << 20
# READs handled side by side: a reader waiting for a region's decode does not hold up a read of
# a region already decoded.
READERS = 2
FIRST_INO = 2
# How long the serving thread looks for the next request before it sleeps (devices.fuse.Server):
# a random read of a warm cache is answered in ~30 us, and waking a sleeping thread on this
# VM cost 54-116 us a round trip. Chosen by bench/mount.py's random reads; IMAGER_FUSE_SPIN
# (seconds, 0: never) overrides it.
DEFAULT_SPIN = 0.0005


def spin_seconds() -> float:
    text = os.environ.get("IMAGER_FUSE_SPIN", "")
    if not text:
        return DEFAULT_SPIN
    try:
        spin = float(text)
    except ValueError:
        spin = -1.0
    if not 0 <= spin <= 1:
        raise UsageError(f"IMAGER_FUSE_SPIN={text!r}: give seconds from 0 to 1 (0: the server sleeps at once)")
    return spin


def partition_file(number: int) -> str:
    return f"part{number}"


class _Window:
    """A served file: bytes [offset, offset + size) of the volume."""

    def __init__(self, attr: fuse.Attr, offset: int):
        self.attr = attr
        self.offset = offset


class VolumeFiles:
    """devices.fuse.Files: the volume and its partition windows, read-only. Errors other than
    EIO from a damaged region (which the volume logs itself) are logged here with the offset."""

    def __init__(self, volume: CachedVolume, mtime_ns: int):
        self.volume = volume
        self.mtime_ns = mtime_ns
        self._windows: dict[str, _Window] = {}
        self._open: dict[int, _Window] = {}
        self._lock = threading.Lock()

    def add(self, name: str, offset: int, size: int) -> None:
        attr = fuse.Attr(FIRST_INO + len(self._windows), size, stat.S_IFREG | 0o444, self.mtime_ns, MAX_READ)
        self._windows = dict(self._windows, **{name: _Window(attr, offset)})

    def listing(self) -> dict[str, fuse.Attr]:
        return {name: w.attr for name, w in self._windows.items()}

    def open(self, attr: fuse.Attr, writable: bool, fh: int) -> None:
        if writable:
            raise OSError(errno.EROFS, "read-only")
        window = next(w for w in self._windows.values() if w.attr.ino == attr.ino)
        with self._lock:
            self._open[fh] = window

    def release(self, fh: int) -> None:
        with self._lock:
            self._open.pop(fh, None)

    def read_into(self, fh: int, dst: memoryview, offset: int) -> int:
        views, release = self.read_views(fh, offset, len(dst))
        try:
            return copy_views(views, dst)
        finally:
            release()

    def read_views(self, fh: int, offset: int, size: int) -> tuple[list[memoryview], Callable[[], None]]:
        window = self._open.get(fh)
        if window is None:
            raise OSError(errno.EBADF, "not open")
        size = max(0, min(size, window.attr.size - offset))
        try:
            return self.volume.read_views(window.offset + offset, size)
        except (ImagerError, DeviceError) as e:
            log.error("read of %d bytes at offset %d failed: %s", size, offset, e)
            raise OSError(errno.EIO, str(e)) from None

    def quick_views(self, fh: int, offset: int, size: int) -> tuple[list[memoryview], Callable[[], None]] | None:
        window = self._open.get(fh)
        if window is None:
            return None
        size = min(size, window.attr.size - offset)
        return self.volume.cached_views(window.offset + offset, size) if size > 0 else None

    def write_from(self, fh: int, src: memoryview, offset: int) -> int:
        raise OSError(errno.EROFS, "read-only")

    def flush(self, fh: int) -> None:
        pass

    def fsync(self, fh: int) -> None:
        pass


class VolumeServer:
    """Serves `volume` (and partition windows added with add_window) at `mount_point` from a
    thread of this process, until stop()."""

    def __init__(self, volume: CachedVolume, mount_point: str, fsname: str, mtime_ns: int):
        self.volume = volume
        self.mount_point = mount_point
        # It goes into the mount's source field: no commas, no spaces.
        self.fsname = re.sub(r"[^A-Za-z0-9._:+-]", "_", fsname)
        self.files = VolumeFiles(volume, mtime_ns)
        self.files.add(VOLUME_FILE, 0, volume.size)
        self._fd: int | None = None
        self._thread: threading.Thread | None = None

    def add_window(self, name: str, offset: int, size: int) -> str:
        """Serve bytes [offset, offset + size) of the volume as the file `name`; its path."""
        self.files.add(name, offset, size)
        return self.path(name)

    def path(self, name: str) -> str:
        return os.path.join(self.mount_point, name)

    def start(self) -> None:
        spin = spin_seconds()
        os.makedirs(self.mount_point, mode=0o700, exist_ok=True)
        try:
            fd = fuse.mount(self.mount_point, self.fsname, "imager", read_only=True)
        except OSError as e:
            raise ImagerError(f"cannot serve the volume through FUSE at {self.mount_point}: {e}") from None
        self._fd = fd
        try:
            session = fuse.negotiate(fd, MAX_READ, need_resend=False)
        except OSError as e:
            self.stop()
            raise ImagerError(f"cannot serve the volume through FUSE at {self.mount_point}: {e}") from None
        server = fuse.Server(fd, session, self.files, readers=READERS, on_error=self._failed, on_fatal=self._fatal,
                             spin=spin, quiet=lambda: not self.files.volume.decoding())
        self._thread = threading.Thread(target=self._serve, args=(server,), name="fuse", daemon=True)
        self._thread.start()

    def _serve(self, server: fuse.Server) -> None:
        try:
            server.serve()
        except BaseException as e:
            log.error("FUSE server stopped: %s", e)
        finally:
            log.info("FUSE server exited")

    def _failed(self, opcode: int, e: Exception) -> None:
        log.error("FUSE request %d failed: %s: %s", opcode, type(e).__name__, e)

    def _fatal(self, e: BaseException) -> None:
        # A reader thread that cannot go on would leave READs unanswered for good: the reads of
        # the mount would hang. Unmounting lazily makes them fail instead.
        log.error("a FUSE reader thread failed (%s: %s): unmounting %s", type(e).__name__, e, self.mount_point)
        try:
            fs.umount(self.mount_point, lazy=True)
        except DeviceError as err:
            log.error("%s", err)

    def stop(self) -> None:
        """Unmount the FUSE filesystem (lazily when something still holds it) and let the
        serving thread end."""
        if self._fd is None:
            return
        try:
            fs.umount(self.mount_point)
        except fs.Busy:
            log.warning("%s is still in use: detached lazily", self.mount_point)
            fs.umount(self.mount_point, lazy=True)
        except DeviceError as e:
            if os.path.ismount(self.mount_point):
                log.error("%s", e)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT)
            self._thread = None
        os.close(self._fd)
        self._fd = None
