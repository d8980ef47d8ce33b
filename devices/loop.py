"""Attach a file as /dev/loopN and detach it, through the loop driver's ioctls.

This is what CI and the demo run on: the kernel here has loop devices but no
device-mapper and no SCSI.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .errors import DeviceError

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
# struct loop_info64 (include/uapi/linux/loop.h)
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
# struct loop_config: __u32 fd; __u32 block_size; struct loop_info64 info; __u64 __reserved[8]
_LOOP_CONFIG = struct.Struct("=II" + _LOOP_INFO64.format[1:] + "8Q")


@dataclass(frozen=True)
class LoopInfo:
    device: str
    backing_file: str
    offset: int
    size_limit: int
    read_only: bool
    autoclear: bool


def attach(path: str, *, offset: int = 0, size_limit: int = 0, read_only: bool = False,
           block_size: int = 0, autoclear: bool = False, direct_io: bool = False) -> str:
    """Attach `path` to a free loop device and return the device's path (/dev/loopN)."""
    try:
        device, fd = _attach(path, offset, size_limit, read_only, block_size, autoclear, direct_io)
    except OSError as e:
        raise DeviceError(f"cannot attach {path} to a loop device: {e.strerror}") from None
    os.close(fd)
    return device


@contextmanager
def held(path: str, *, offset: int = 0, size_limit: int = 0, read_only: bool = True,
         direct_io: bool = False) -> Iterator[str]:
    """A loop device on `path` that exists exactly as long as this process holds it: attached
    with autoclear and kept open, so that leaving the block, or dying in it even by SIGKILL,
    detaches it (once whatever else opened it meanwhile has let go: a filesystem mounted on it
    holds it until it is unmounted)."""
    try:
        device, fd = _attach(path, offset, size_limit, read_only, 0, True, direct_io)
    except OSError as e:
        raise DeviceError(f"cannot attach {path} to a loop device: {e.strerror}") from None
    try:
        yield device
    finally:
        os.close(fd)


def _attach(path: str, offset: int, size_limit: int, read_only: bool, block_size: int, autoclear: bool,
            direct_io: bool) -> tuple[str, int]:
    """The device, and a descriptor of it that the caller closes (with autoclear, the close
    that detaches it)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DeviceError(f"{path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DeviceError(f"{path}: a loop device needs a regular file or block device")
    flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    if direct_io:
        flags |= LO_FLAGS_DIRECT_IO
    backing = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(64):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                _ensure_node(device, number)
                name = os.path.abspath(path).encode()[: LO_NAME_SIZE - 1]
                config = _LOOP_CONFIG.pack(backing, block_size, 0, 0, 0, offset, size_limit, 0, 0, 0,
                                           flags, name, b"", b"", 0, 0, *([0] * 8))
                dev_fd = os.open(device, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
                    return device, dev_fd
                except OSError as e:
                    os.close(dev_fd)
                    if e.errno == errno.EBUSY:
                        continue  # another process took this device between GET_FREE and CONFIGURE
                    raise DeviceError(f"cannot attach {path} to {device}: {e.strerror}") from None
            raise DeviceError(f"cannot attach {path}: no free loop device")
        finally:
            os.close(ctl)
    finally:
        os.close(backing)


def _ensure_node(device: str, number: int) -> None:
    if not os.path.exists(device):
        try:
            os.mknod(device, 0o660 | stat.S_IFBLK, os.makedev(7, number))
        except FileExistsError:
            pass


def info(device: str) -> LoopInfo:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise DeviceError(f"{device}: not attached") from None
        raise DeviceError(f"{device}: {e.strerror}") from None
    finally:
        os.close(fd)
    fields = _LOOP_INFO64.unpack(raw)
    offset, size_limit, flags, name = fields[3], fields[4], fields[8], fields[9]
    backing = backing_file(device) or name.rstrip(b"\0").decode(errors="replace")
    return LoopInfo(device, backing, offset, size_limit, bool(flags & LO_FLAGS_READ_ONLY),
                    bool(flags & LO_FLAGS_AUTOCLEAR))


def backing_identity(device: str) -> tuple[int, int]:
    """The (st_dev, st_ino) of the file the loop device `device` serves, from the kernel's own
    reference to it (a path in sysfs may name another file by now)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError as e:
        raise DeviceError(f"{device}: {e.strerror}") from None
    finally:
        os.close(fd)
    fields = _LOOP_INFO64.unpack(raw)
    return fields[0], fields[1]


def served_file(dev: int) -> str | None:
    """The path of the file that the loop device numbered `dev` serves; None when `dev` is no
    attached loop device. Raises DeviceError when its recorded path names another file by now
    (renamed, deleted or mounted over)."""
    backing = backing_file(dev)
    if backing is None:
        return None
    node = "/dev/" + os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    served = backing_identity(node)
    try:
        st = os.stat(backing)
    except OSError as e:
        raise DeviceError(f"{node}: its backing file {backing} cannot be found: {e.strerror}") from None
    if (st.st_dev, st.st_ino) != served:
        raise DeviceError(f"{node}: {backing} is not the file it serves any more (renamed or deleted)")
    return backing


def backing_file(device: str | int) -> str | None:
    """The file behind a loop device, given as a path or a device number; None for a device
    that is not an attached loop device. Read from sysfs, which answers also when the file's
    filesystem is gone (a dead FUSE mount), where the loop ioctls fail."""
    if isinstance(device, int):
        path = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/loop/backing_file"
    else:
        path = f"/sys/block/{os.path.basename(device)}/loop/backing_file"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def detach(device: str, *, wait: float = 5.0) -> None:
    """Detach a loop device. The kernel defers the detach while the device is open
    elsewhere (a udev probe, a closing mount); wait for it to complete."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DeviceError(f"{device}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise DeviceError(f"{device}: not attached") from None
        raise DeviceError(f"cannot detach {device}: {e.strerror}") from None
    finally:
        os.close(fd)
    deadline = time.monotonic() + wait
    while backing_file(device) is not None and time.monotonic() < deadline:
        time.sleep(0.01)


def list_attached() -> list[LoopInfo]:
    result = []
    for name in sorted(os.listdir("/sys/block")):
        device = "/dev/" + name
        backing = backing_file(device) if name.startswith("loop") else None
        if backing is None:
            continue
        try:
            result.append(info(device))
        except DeviceError:
            # The ioctl fails when the backing file's filesystem is gone (a dead FUSE mount);
            # sysfs still tells what is attached, and such a device must still be listed.
            result.append(_info_from_sysfs(device, backing))
    return result


def _info_from_sysfs(device: str, backing: str) -> LoopInfo:
    base = f"/sys/block/{os.path.basename(device)}"

    def number(path: str) -> int:
        try:
            with open(path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0
    return LoopInfo(device, backing, number(f"{base}/loop/offset"), number(f"{base}/loop/sizelimit"),
                    bool(number(f"{base}/ro")), bool(number(f"{base}/loop/autoclear")))
