"""The C library, loaded once, for the few calls Python's os module lacks (syncfs, fallocate
with modes, umount2, prctl, sync_file_range)."""

from __future__ import annotations

import ctypes
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
