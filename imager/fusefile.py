"""A generic FUSE file server: a flat directory of files, each served by an object, through
mfusepy (libfuse 3's high-level API over ctypes). The volume daemon serves a volume and its
snapshot this way (imager.snapshot.daemon); `imager mount`, `ls` and `extract` serve an
image's volume and its partitions, read-only (imager.mount).

Every file is opened with FOPEN_DIRECT_IO: no FUSE page cache, so a write reaches the file's
object when the kernel issues it, and a file that reappears (a new snapshot) is never served
from an older one's cached pages. Entries and attributes are not cached either: files appear
and disappear. Requests come to one thread (see serve()).

The server hands the operations a memoryview of libfuse's own request buffer instead of a
bytes copy (and reads straight into the reply buffer): one to two fewer copies of every 1 MiB
request. The view is valid only during the call, which does all its I/O.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import mfusepy

from devices.errors import DeviceError

from .errors import ImagerError

log = logging.getLogger("imager.fuse")

# Largest FUSE write the kernel may send (libfuse's buffer holds 256 pages plus a header).
MAX_WRITE = 1 << 20


class Handle(Protocol):
    """One open of a served file."""

    def read_into(self, dst: memoryview, offset: int) -> int: ...
    def write_from(self, src: memoryview, offset: int) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class ServedFile:
    """A file of the directory: its attributes and how to open it. `open(writable)` returns a
    Handle or raises mfusepy.FuseOSError (EROFS, ENOENT, ...)."""

    size: int
    mode: int
    mtime_ns: int
    block_size: int
    open: Callable[[bool], Handle]


class FileServer(mfusepy.Operations):
    """The files `files()` returns right now, by name. Errors from a handle reach the caller as
    EIO, as from a disk, with the offset and the cause in the log: never a crash, never EINVAL."""

    use_ns = True

    def __init__(self, files: Callable[[], dict[str, ServedFile]]):
        self.files = files
        self.started = threading.Event()
        self.start_failure: str | None = None
        self._created_ns = time.time_ns()
        self._handles: dict[int, tuple[str, Handle, bool]] = {}    # fh -> (name, handle, writable)
        self._next_handle = 1
        self._handles_changed = threading.Condition()

    # -- lifetime ----------------------------------------------------------------------------

    def init_with_config(self, conn, config) -> None:
        if conn is not None:
            conn.max_write = MAX_WRITE
            conn.max_readahead = MAX_WRITE
        if config is not None:
            # Files appear and disappear: the kernel must ask every time, not remember.
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.attr_timeout = 0.0
        self.started.set()

    def open_handles(self, name: str) -> int:
        with self._handles_changed:
            return self._count(name)

    def wait_for_handles(self, name: str, at_most: int, timeout: float) -> bool:
        """Wait until at most `at_most` handles of file `name` are open. The kernel sends RELEASE
        asynchronously after the last close (a detached loop device included), so a caller that
        just closed a file may have to wait a moment for it."""
        with self._handles_changed:
            return self._handles_changed.wait_for(lambda: self._count(name) <= at_most, timeout)

    def _count(self, name: str) -> int:
        return sum(1 for n, _, _ in self._handles.values() if n == name)

    # -- namespace ---------------------------------------------------------------------------

    def _file(self, path: str) -> ServedFile:
        served = self.files().get(path.lstrip("/")) if path.count("/") == 1 else None
        if served is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return served

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_mtime": self._created_ns,
                    "st_ctime": self._created_ns, "st_atime": self._created_ns}
        f = self._file(path)
        return {"st_mode": stat.S_IFREG | f.mode, "st_nlink": 1, "st_size": f.size,
                "st_blocks": -(-f.size // 512), "st_blksize": f.block_size,
                "st_mtime": f.mtime_ns, "st_ctime": f.mtime_ns, "st_atime": f.mtime_ns}

    def readdir(self, path, fh):
        return [".", ".."] + sorted(self.files())

    def statfs(self, path):
        files = self.files()
        block = max((f.block_size for f in files.values()), default=4096)
        blocks = sum(f.size for f in files.values()) // block
        return {"f_bsize": block, "f_frsize": block, "f_blocks": blocks, "f_bfree": 0, "f_bavail": 0,
                "f_files": len(files), "f_ffree": 0, "f_namemax": 255}

    # -- files -------------------------------------------------------------------------------

    def open(self, path, fi):
        writable = fi.flags & os.O_ACCMODE != os.O_RDONLY
        handle = self._file(path).open(writable)
        with self._handles_changed:
            fh = self._next_handle
            self._next_handle += 1
            self._handles[fh] = (path.lstrip("/"), handle, writable)
        fi.fh = fh
        fi.direct_io = 1
        return 0

    def release(self, path, fi):
        with self._handles_changed:
            entry = self._handles.pop(fi.fh, None)
            self._handles_changed.notify_all()
        if entry is not None:
            entry[1].close()
        return 0

    def _handle(self, fi) -> tuple[str, Handle, bool]:
        entry = self._handles.get(fi.fh)
        if entry is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        return entry

    def read_into(self, path, dst: memoryview, offset: int, fi) -> int:
        name, handle, _ = self._handle(fi)
        return _as_eio(lambda: handle.read_into(dst, offset), f"read of {len(dst)} bytes at offset {offset} of {name}")

    def write_from(self, path, src: memoryview, offset: int, fi) -> int:
        name, handle, writable = self._handle(fi)
        if not writable:
            raise mfusepy.FuseOSError(errno.EBADF)
        return _as_eio(lambda: handle.write_from(src, offset), f"write of {len(src)} bytes at offset {offset} of {name}")

    # The plain mfusepy entry points, for use without the zero-copy server.
    def read(self, path, size, offset, fi):
        buf = bytearray(size)
        return bytes(buf[:self.read_into(path, memoryview(buf), offset, fi)])

    def write(self, path, data, offset, fi):
        return self.write_from(path, memoryview(data), offset, fi)

    def fsync(self, path, datasync, fi):
        name, handle, _ = self._handle(fi)
        _as_eio(handle.flush, f"flush of {name}")
        return 0

    def flush(self, path, fi):
        # close() of a writer must not return before its data is durable.
        name, handle, writable = self._handle(fi)
        if writable:
            _as_eio(handle.flush, f"flush of {name}")
        return 0

    def truncate(self, path, length, fh=None):
        if length == self._file(path).size:
            return 0  # an O_TRUNC-less "truncate to the same size" (dd conv=notrunc tools, cp) is harmless
        raise mfusepy.FuseOSError(errno.EPERM)


def _as_eio(call: Callable, what: str):
    try:
        return call()
    except mfusepy.FuseOSError:
        raise
    except (ImagerError, DeviceError, OSError) as e:
        log.error("%s failed: %s", what, e)
        raise mfusepy.FuseOSError(errno.EIO) from None


class ZeroCopyFUSE(mfusepy.FUSE):
    """mfusepy.FUSE passing FileServer views of libfuse's buffers (see the module docstring)."""

    def read(self, path, buf, size, offset, fip):
        return self.operations.read_into(_decode(path), _c_buffer(buf, size), offset, fip.contents)

    def write(self, path, buf, size, offset, fip):
        return self.operations.write_from(_decode(path), _c_buffer(buf, size), offset, fip.contents)


def serve(server: FileServer, mount_point: str, fsname: str, *, read_only: bool = False) -> None:
    """Serve until unmounted (blocks). One request at a time: with libfuse's thread pool the
    Python threads fought over the GIL, and random 4 KiB writes through the volume daemon ran
    at a third of the rate they reach from a single thread, which still gets many requests in
    flight from the kernel (async direct I/O). Measured in bench/front.py. Any failure to start
    is left in `server.start_failure`, and `server.started` is set either way. `read_only`
    mounts it read-only (the kernel refuses every write before it reaches the server)."""
    options = {"ro": True} if read_only else {}
    try:
        ZeroCopyFUSE(server, mount_point, raw_fi=True, foreground=True, nothreads=True, allow_other=True,
                     default_permissions=True, fsname=fsname, subtype="imager", **options)
    except BaseException as e:  # the thread's only job: report why FUSE stopped
        server.start_failure = str(e) or type(e).__name__
        log.error("FUSE loop ended: %s", server.start_failure)
    finally:
        server.started.set()
        log.info("FUSE loop exited")


def _c_buffer(pointer, size: int) -> memoryview:
    address = ctypes.cast(pointer, ctypes.c_void_p).value
    assert address is not None      # libfuse never hands a NULL buffer
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def _decode(path: bytes | None) -> str | None:
    return None if path is None else path.decode("utf-8", "surrogateescape")
