"""FIFREEZE and FITHAW: flush a mounted filesystem and hold its writers, then let them go.

Its own module, apart from devices.fs, because the freeze guard (a new process for every
snapshot) imports it: it must start in milliseconds, so nothing here pulls in numpy.
"""

from __future__ import annotations

import errno
import fcntl
import os

from .errors import DeviceError
from .ioctl import IOWR

FIFREEZE = IOWR("X", 119, 4)
FITHAW = IOWR("X", 120, 4)


def freeze(mount_point: str) -> None:
    """FIFREEZE: flush the filesystem and block new writes until thaw()."""
    _fs_ioctl(mount_point, FIFREEZE, "freeze")


def thawed(mount_point: str) -> bool:
    """FITHAW of a filesystem that may be frozen: whether it was (EINVAL: it was not)."""
    return _fs_ioctl(mount_point, FITHAW, "thaw", not_frozen_is_fine=True)


def thaw(mount_point: str) -> None:
    _fs_ioctl(mount_point, FITHAW, "thaw")


def _fs_ioctl(mount_point: str, request: int, what: str, *, not_frozen_is_fine: bool = False) -> bool:
    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise DeviceError(f"cannot {what} the filesystem at {mount_point}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, request, 0)
        return True
    except OSError as e:
        if request == FITHAW and e.errno == errno.EINVAL and not_frozen_is_fine:
            return False
        if request == FIFREEZE and e.errno == errno.EBUSY:
            raise DeviceError(f"the filesystem at {mount_point} is frozen already (fsfreeze, or another backup "
                              f"in its window); fsfreeze -u {mount_point} thaws it") from None
        raise DeviceError(f"cannot {what} the filesystem at {mount_point}: {e.strerror}") from None
    finally:
        os.close(fd)
