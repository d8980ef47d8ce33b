"""A CachedVolume served read-only through FUSE (imager.fusefile): the file `volume`, and a file
per partition (`part1`, ...) that is a window on it, for loop devices, blkid and anyone who
wants the bytes of a filesystem the kernel cannot mount."""

from __future__ import annotations

import errno
import logging
import os
import re
import threading

import mfusepy

from devices import fs
from devices.errors import DeviceError

from ..errors import ImagerError
from ..fusefile import MAX_WRITE, FileServer, ServedFile, serve
from .volume import CachedVolume

log = logging.getLogger("imager.mount")

VOLUME_FILE = "volume"
START_TIMEOUT = 30.0


def partition_file(number: int) -> str:
    return f"part{number}"


class _Window:
    """An open of a served file: bytes [offset, offset + size) of the volume, read-only."""

    def __init__(self, volume: CachedVolume, offset: int, size: int):
        self.volume = volume
        self.offset = offset
        self.size = size

    def read_into(self, dst: memoryview, offset: int) -> int:
        if offset >= self.size:
            return 0
        return self.volume.read_into(dst[:self.size - offset], self.offset + offset)

    def write_from(self, src: memoryview, offset: int) -> int:
        raise mfusepy.FuseOSError(errno.EROFS)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class VolumeServer:
    """Serves `volume` (and partition windows added with add_window) at `mount_point` from a
    thread of this process, until stop()."""

    def __init__(self, volume: CachedVolume, mount_point: str, fsname: str, mtime_ns: int):
        self.volume = volume
        self.mount_point = mount_point
        # It goes into FUSE's option string: no commas, no spaces.
        self.fsname = re.sub(r"[^A-Za-z0-9._:+-]", "_", fsname)
        self.mtime_ns = mtime_ns
        self._files: dict[str, ServedFile] = {}
        self.add_window(VOLUME_FILE, 0, volume.size)
        self.server = FileServer(lambda: self._files)
        self._thread: threading.Thread | None = None

    def add_window(self, name: str, offset: int, size: int) -> str:
        """Serve bytes [offset, offset + size) of the volume as the file `name`; its path."""
        def open_window(writable: bool) -> _Window:
            if writable:
                raise mfusepy.FuseOSError(errno.EROFS)
            return _Window(self.volume, offset, size)
        self._files = dict(self._files, **{name: ServedFile(size, 0o444, self.mtime_ns, MAX_WRITE, open_window)})
        return self.path(name)

    def path(self, name: str) -> str:
        return os.path.join(self.mount_point, name)

    def start(self) -> None:
        os.makedirs(self.mount_point, mode=0o700, exist_ok=True)
        self._thread = threading.Thread(target=serve, args=(self.server, self.mount_point, self.fsname),
                                        kwargs={"read_only": True}, name="fuse", daemon=True)
        self._thread.start()
        if not self.server.started.wait(START_TIMEOUT):
            raise ImagerError(f"FUSE did not start in {START_TIMEOUT:.0f} s")
        if self.server.start_failure is not None:
            raise ImagerError(f"cannot serve the volume through FUSE at {self.mount_point}: "
                              f"{self.server.start_failure}")

    def stop(self) -> None:
        """Unmount the FUSE filesystem (lazily when something still holds it) and let the
        serving thread end."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            try:
                fs.umount(self.mount_point)
            except fs.Busy:
                log.warning("%s is still in use: detached lazily", self.mount_point)
                fs.umount(self.mount_point, lazy=True)
            except DeviceError as e:
                log.error("%s", e)
            self._thread.join(START_TIMEOUT)
        self._thread = None
