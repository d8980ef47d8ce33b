"""Writes to one file by any process (fanotify, an inode mark): write(2) and its kin, truncate,
fallocate, and the close of any descriptor that was open for writing (which also shows a file
opened by `losetup` for a loop device of its own, or mapped shared and written).

The loop driver's own writes to its backing file make no event: they do not pass the VFS calls
that report them. So a watch on a loop device's file sees exactly what reaches the file without
passing the loop device.
"""

from __future__ import annotations

import ctypes
import os
import struct

from .libc import check, libc

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_MARK_ADD = 0x1
FAN_MODIFY = 0x2
FAN_CLOSE_WRITE = 0x8
FAN_Q_OVERFLOW = 0x4000
AT_FDCWD = -100
_METADATA = struct.Struct("IBBHQii")   # struct fanotify_event_metadata

libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


class FileWriteWatch:
    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path

    @classmethod
    def create(cls, path: str) -> "FileWriteWatch":
        """Watch `path` from now on. The descriptor is not inherited unless passed on."""
        fd = libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_LARGEFILE)
        if fd < 0:
            check(-1, "fanotify_init")
        try:
            check(libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_MODIFY | FAN_CLOSE_WRITE, AT_FDCWD, os.fsencode(path)),
                  f"fanotify_mark {path}")
        except OSError:
            os.close(fd)
            raise
        return cls(fd, path)

    def events(self) -> tuple[list[int], bool]:
        """The pids of the processes that wrote since the last call, and whether events were
        lost (the kernel's queue overflowed)."""
        pids: list[int] = []
        lost = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return pids, lost
            if not data:
                return pids, lost
            offset = 0
            while offset + _METADATA.size <= len(data):
                length, _, _, _, mask, event_fd, pid = _METADATA.unpack_from(data, offset)
                if event_fd >= 0:
                    os.close(event_fd)
                if mask & FAN_Q_OVERFLOW:
                    lost = True
                else:
                    pids.append(pid)
                offset += length or len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
