"""The C library, loaded once, for the few calls Python's os module lacks (syncfs, fallocate
with modes, umount2, prctl, sync_file_range, cachestat)."""

from __future__ import annotations

import ctypes
import errno
import os

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str = "") -> None:
    """Raise OSError with errno if a libc call returned -1 (or any non-zero failure code)."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err) + (f" ({what})" if what else ""))


SYNC_FILE_RANGE_WRITE = 2
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the dirty pages of a file's range to its disk, without waiting for them."""
    check(libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE), "sync_file_range")


SYS_CACHESTAT = 451         # the same number on every architecture (a syscall added after 5.1)
libc.syscall.restype = ctypes.c_long


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_cachestat_missing = False


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of the file's bytes [offset, offset + length) are in the page cache
    (cachestat, Linux 6.5; it reads nothing in), None on a kernel without it."""
    global _cachestat_missing
    if _cachestat_missing:
        return None
    span = _CacheStatRange(offset, length)
    stat = _CacheStat()
    if libc.syscall(ctypes.c_long(SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(span), ctypes.byref(stat),
                    ctypes.c_uint(0)) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):      # EPERM: a seccomp filter that does not know it
            _cachestat_missing = True
            return None
        raise OSError(err, f"{os.strerror(err)} (cachestat)")
    return int(stat.nr_cache)
