"""The C library, loaded once, for the few calls Python's os module lacks (syncfs, fallocate
with modes, umount2, prctl)."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str = "") -> None:
    """Raise OSError with errno if a libc call returned -1 (or any non-zero failure code)."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err) + (f" ({what})" if what else ""))
