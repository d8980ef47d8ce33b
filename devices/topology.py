"""Which device is which: a device's identity across restarts, and whether a path is stored on
a given device (directly, on a partition of it, or inside a loop device whose backing file is
on it)."""

from __future__ import annotations

import errno
import os
import stat

from . import loop
from .fs import mounts_of
from .errors import DeviceError

def path_is_on(device_path: str, path: str) -> bool:
    """Whether `path` is stored on the block device or image file at `device_path`, directly, on a
    partition of it, or inside a loop device whose backing file is on it."""
    try:
        target = os.stat(device_path)
    except OSError as e:
        raise DeviceError(f"{device_path}: {e.strerror}") from None
    devices, backing_files = _storage_under(path)
    if not stat.S_ISBLK(target.st_mode):
        return (target.st_dev, target.st_ino) in backing_files
    if target.st_rdev in devices:
        return True
    # Two loop devices on one file are one volume.
    target_backing = _loop_backing_identity(target.st_rdev)
    return target_backing is not None and target_backing in backing_files


def _storage_under(path: str) -> tuple[set[int], set[tuple[int, int]]]:
    """The block devices the filesystem holding `path` is stored on: its own device, the whole
    disk of a partition and, through loop devices, whatever holds their backing files; plus the
    (st_dev, st_ino) of every loop backing file met on the way."""
    devices: set[int] = set()
    files: set[tuple[int, int]] = set()
    todo = [os.stat(path).st_dev]
    while todo:
        dev = todo.pop()
        if dev in devices:
            continue
        devices.add(dev)
        sysfs = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        if os.path.exists(os.path.join(sysfs, "partition")):
            parent = _read_dev_number(os.path.join(os.path.realpath(sysfs), "..", "dev"))
            if parent is not None:
                todo.append(parent)
        backing = _loop_backing_stat(dev)
        if backing is None:
            continue
        files.add((backing.st_dev, backing.st_ino))
        todo.append(backing.st_rdev if stat.S_ISBLK(backing.st_mode) else backing.st_dev)
    return devices, files


def _loop_backing_stat(dev: int) -> os.stat_result | None:
    path = loop.backing_file(dev)
    try:
        return os.stat(path) if path else None
    except OSError:
        return None


def device_identity(path: str) -> str:
    """What makes a device the same one across restarts: the block device number, and for a
    loop device the file behind it (/dev/loop3 can be attached to another file tomorrow)."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return f"file:{st.st_dev}:{st.st_ino}"
    backing = _loop_backing_identity(st.st_rdev)
    if backing is not None:
        return f"loop:{backing[0]}:{backing[1]}"
    return f"block:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _loop_backing_identity(dev: int) -> tuple[int, int] | None:
    backing = _loop_backing_stat(dev)
    return None if backing is None else (backing.st_dev, backing.st_ino)


def _read_dev_number(path: str) -> int | None:
    try:
        with open(path) as f:
            major, minor = f.read().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file, or the same block device (two nodes of one device
    number count as one)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def writes_to(target: str, path: str, _depth: int = 0) -> bool:
    """Whether writing `target` writes the file `path`: the same file, or a loop device (or a
    partition of one) whose backing file is it, through loop devices on loop devices."""
    if same_file(target, path):
        return True
    try:
        st = os.stat(target)
    except OSError:
        return False
    if not stat.S_ISBLK(st.st_mode) or _depth > 8:
        return False
    device = st.st_rdev
    sysfs = os.path.realpath(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    if os.path.exists(os.path.join(sysfs, "partition")):
        try:
            with open(os.path.join(os.path.dirname(sysfs), "dev")) as f:
                major, minor = (int(x) for x in f.read().split(":"))
        except (OSError, ValueError):
            return False
        device = os.makedev(major, minor)
    backing = loop.backing_file(device)
    if not backing:
        return False
    return writes_to(backing.removesuffix(" (deleted)"), path, _depth + 1)


def stacked_on(path: str) -> list[str]:
    """The block devices whose data lies on the block device or file at `path`: its partitions,
    the devices holding it (/sys holders: md, dm), loop devices whose backing file is it or one
    of those, and so on up (as /dev paths). Writing `path` writes under all of them."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    loops: dict[tuple, list[int]] = {}        # what a loop device is on: the loop devices on it
    for name in _listdir("/sys/block"):
        number = _read_dev_number(f"/sys/block/{name}/dev") if name.startswith("loop") else None
        backing = _loop_backing_stat(number) if number is not None else None
        if backing is not None:
            loops.setdefault(_what(backing), []).append(number)
    found: list[int] = []
    todo: list[int] = []
    if stat.S_ISBLK(st.st_mode):
        todo.append(st.st_rdev)
    elif stat.S_ISREG(st.st_mode):
        found += loops.get(_what(st), [])
        todo += found
    while todo:
        dev = todo.pop()
        sysfs = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        above = [n for n in (_read_dev_number(os.path.join(sysfs, e, "dev")) for e in _listdir(sysfs)
                             if os.path.exists(os.path.join(sysfs, e, "partition"))) if n is not None]
        above += [n for n in (_read_dev_number(f"/sys/class/block/{h}/dev")
                              for h in _listdir(os.path.join(sysfs, "holders"))) if n is not None]
        above += loops.get(("block", dev), [])
        for number in above:
            if number not in found and not (stat.S_ISBLK(st.st_mode) and number == st.st_rdev):
                found.append(number)
                todo.append(number)
    return [_node_of(n) for n in found]


def in_use_above(path: str) -> tuple[str, str | None] | None:
    """A device stacked on `path` (see stacked_on) that is in use: (its /dev path, where it is
    mounted), or (its path, None) when something holds it open exclusively (a managed volume,
    swap, md); None when none is. Its own exclusive open does not see a loop device on it."""
    for above in stacked_on(path):
        mounted = mounts_of(above)
        if mounted:
            return above, mounted[0].mount_point
        try:
            os.close(os.open(above, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as e:
            if e.errno == errno.EBUSY:
                return above, None
    return None


def _what(st: os.stat_result) -> tuple:
    return ("block", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev, st.st_ino)


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _node_of(dev: int) -> str:
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    return f"/dev/{name}"


def write_fingerprint(path: str) -> dict:
    """What changes whenever anything writes to the block device at `path`: the kernel's count of
    sectors written to it (and to its whole disk, for a partition: writes through the disk's
    node reach the partition uncounted), in this boot; for a loop device, the backing file's
    modification and change times too (the file can be written without the device). Two equal
    fingerprints mean nothing was written in between."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path}: not a block device")
    with open("/proc/sys/kernel/random/boot_id") as f:
        marks = {"boot": f.read().strip(), "device": f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"}
    sysfs = os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    marks["written"] = _sectors_written(sysfs)
    if os.path.exists(os.path.join(sysfs, "partition")):
        marks["disk_written"] = _sectors_written(os.path.dirname(sysfs))
    backing = _loop_backing_stat(st.st_rdev)
    if backing is not None:
        marks["backing"] = [backing.st_dev, backing.st_ino, backing.st_size, backing.st_mtime_ns,
                             backing.st_ctime_ns]
    return marks


def _sectors_written(sysfs_dir: str) -> list[int]:
    """Sectors written and discarded (Documentation/block/stat.rst: fields 7 and 14)."""
    with open(os.path.join(sysfs_dir, "stat")) as f:
        fields = [int(x) for x in f.read().split()]
    return [fields[6], fields[13] if len(fields) > 13 else 0]
