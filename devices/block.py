"""Block devices (and regular files standing in for them): geometry, aligned reads, writes.

Reads use O_DIRECT into page-aligned buffers so that imaging a volume neither pollutes nor
is served stale data from the page cache; where the kernel refuses O_DIRECT (some
filesystems, odd lengths) the device falls back to buffered reads and says so through
`on_notice`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from typing import Callable

from .errors import DeviceError
from .ioctl import IO, IOR
from .libc import check, libc

BLKROGET = IO(0x12, 94)
BLKFLSBUF = IO(0x12, 97)
BLKSSZGET = IO(0x12, 104)
BLKGETSIZE64 = IOR(0x12, 114, 8)
BLKPBSZGET = IO(0x12, 123)
BLKZEROOUT = IO(0x12, 127)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def stat_volume(path: str) -> os.stat_result:
    """stat() a path that must be a block device or a regular file (an image), with the error a
    user should see when it is neither."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path}: no such device or file") from None
    except OSError as e:
        raise DeviceError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DeviceError(f"{path}: is a directory, not a block device or image file")
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise DeviceError(f"{path}: not a block device or regular file")
    return st


class BlockDevice:
    """An open block device or regular file with its geometry.

    `read_into(buf, offset)` fills a caller-provided buffer (aligned for O_DIRECT);
    `write_at`, `zero_range` and `flush` serve restore.
    """

    def __init__(self, path: str, *, writable: bool = False, direct: bool = True,
                 exclusive: bool = False, on_notice: Callable[[str], None] | None = None, name: str | None = None):
        """`name`: what errors call it, when `path` is not what the user knows it by (an
        unnamed file's /proc/self/fd path)."""
        self.path = path
        self.name = name or path
        self.writable = writable
        self._notice = on_notice or (lambda msg: None)
        st = stat_volume(path)
        self.is_block = stat.S_ISBLK(st.st_mode)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if exclusive and self.is_block:
            # O_EXCL on a block device fails with EBUSY while it is mounted or otherwise claimed.
            flags |= os.O_EXCL
        self._flags = flags
        self._fall_back = threading.Lock()
        self._claim = -1            # the first descriptor, after a fall back: it holds the O_EXCL claim
        self.direct = False
        self.fd = -1
        try:
            if direct:
                try:
                    self.fd = os.open(path, flags | os.O_DIRECT)
                    self.direct = True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._notice(f"{path}: O_DIRECT refused, using buffered I/O")
            if self.fd < 0:
                self.fd = os.open(path, flags)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceError(f"{path}: device is busy (mounted or in use)") from None
            raise DeviceError(f"{path}: cannot open: {e.strerror}") from None
        if self.is_block:
            self.size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0]
            self.logical_sector_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, bytes(4)))[0]
            self.physical_sector_size = struct.unpack("I", fcntl.ioctl(self.fd, BLKPBSZGET, bytes(4)))[0]
            self.read_only = bool(struct.unpack("i", fcntl.ioctl(self.fd, BLKROGET, bytes(4)))[0])
        else:
            self.size = st.st_size
            self.logical_sector_size = 512
            self.physical_sector_size = 512
            self.read_only = not os.access(path, os.W_OK)

    def __enter__(self) -> "BlockDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._claim >= 0:
            os.close(self._claim)
            self._claim = -1

    def _fall_back_to_buffered(self, why: str) -> None:
        # The descriptor keeps its number (dup2): other threads reading at the same time go on
        # with it, and only one of them says so.
        with self._fall_back:
            if not self.direct:
                return
            self._notice(f"{self.name}: {why}; using buffered I/O")
            fd = os.open(self.path, self._flags & ~os.O_EXCL)
            self._claim = os.dup(self.fd)
            os.dup2(fd, self.fd)
            os.close(fd)
            self.direct = False

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` from `offset`; returns the bytes read (short only at the end of the device)."""
        length = len(buf)
        done = 0
        while done < length:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct:
                    self._fall_back_to_buffered("O_DIRECT read refused")
                    continue
                raise DeviceError(f"{self.name}: read error at offset {offset + done}: {e.strerror}") from None
            if n == 0:
                break
            done += n
        return done

    def pread(self, length: int, offset: int) -> bytes:
        """A read into fresh memory, for small unaligned reads (buffered if O_DIRECT is on)."""
        if self.direct:
            with open(self.path, "rb", buffering=0) as f:
                return os.pread(f.fileno(), length, offset)
        return os.pread(self.fd, length, offset)

    def write_at(self, data, offset: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct:
                    self._fall_back_to_buffered("O_DIRECT write refused")
                    continue
                if e.errno == errno.ENOSPC:
                    raise DeviceError(f"{self.name}: no space left writing at offset {offset + done}") from None
                raise DeviceError(f"{self.name}: write error at offset {offset + done}: {e.strerror}") from None

    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros without sending the zeros down."""
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            else:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError:
            pass
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.write_at(zeros[:n], offset)
            offset += n

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DeviceError(f"{self.name}: flush failed: {e.strerror}") from None

    def drop_cache(self) -> None:
        """Drop the device's page cache so a re-read comes from the medium."""
        if self.is_block:
            try:
                fcntl.ioctl(self.fd, BLKFLSBUF, 0)
            except OSError:
                pass
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def size_of(path: str) -> int:
    """The size in bytes of the block device or file at `path` (DeviceError if it is neither)."""
    with BlockDevice(path, direct=False) as dev:
        return dev.size


def preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve disk blocks for [offset, offset+length) of a file without changing its size, so
    later writes there skip the filesystem's block allocation. Raises OSError where the
    filesystem cannot (tmpfs before 2.6.x, some FUSE filesystems)."""
    _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    check(libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)))
