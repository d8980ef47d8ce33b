"""Filesystems as the kernel serves them: mounts, which blocks are free
(GETFSMAP), where a file's blocks are (FIEMAP), whether an ext2/3/4 superblock can be
trusted, and a private read-only mount that no one else sees and that nothing can leave behind.

`private_mount(device, attempts)` mounts a filesystem image or device read-only, over a loop
device the mount sets up itself (autoclear), in a mount namespace of its own, and hands back an
open descriptor of its root. The namespace's only process exits at once; the mount lives exactly
as long as that descriptor. When the descriptor closes, or the process holding it dies, even by
SIGKILL, the kernel unmounts the filesystem and the loop device clears itself: no mount point,
no mount, no loop device is ever left for anyone to clean up.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

from .errors import DeviceError
from .ioctl import IOWR
from .libc import check, libc

Range = tuple[int, int]  # [start, end) in bytes

# Runs as the only process of a new mount namespace: mounts over a private tmpfs on /run (seen
# by no one else), sends the root's descriptor back and exits. Only the standard library: it
# starts in milliseconds.
_MOUNTER = r"""
import json, os, socket, subprocess, sys
sock = socket.socket(fileno=int(sys.argv[1]))
device, attempts = sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,size=64k", "imager-private", "/run"], check=True)
os.mkdir("/run/mnt")
errors = []
for fs_type, options in attempts:
    r = subprocess.run(["mount", "-t", fs_type, "-o", options + ",loop", device, "/run/mnt"],
                       capture_output=True, text=True, errors="replace")
    if r.returncode == 0:
        try:
            fd = os.open("/run/mnt", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            sock.send(json.dumps({"options": options, "errors": errors, "open_errno": e.errno}).encode())
            sys.exit(0)
        socket.send_fds(sock, [json.dumps({"options": options, "errors": errors}).encode()], [fd])
        sys.exit(0)
    lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip() and "dmesg(1)" not in ln]
    errors.append((lines[0] if lines else f"mount exit status {r.returncode}").removeprefix("mount: ")
                  .removeprefix("/run/mnt: "))
sock.send(json.dumps({"options": None, "errors": errors}).encode())
"""


@dataclass
class PrivateMount:
    """An open descriptor of a privately mounted filesystem's root; close() lets it go."""

    fd: int
    options: str
    refusals: list[str] = field(default_factory=list)  # why the earlier attempts did not mount

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PrivateMount":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MountUnreadable(DeviceError):
    """The filesystem mounted but its root cannot be opened (xfs shuts itself down when it finds
    damaged metadata); `errno` says how."""

    def __init__(self, device: str, error: int):
        self.errno = error
        super().__init__(f"{device}: mounted, but its root cannot be read: {os.strerror(error)}")


class MountRefused(DeviceError):
    """No attempt mounted; `refusals` says why each did not, in order."""

    def __init__(self, device: str, refusals: list[str]):
        self.refusals = refusals
        super().__init__(f"{device}: cannot mount: {'; '.join(refusals) or 'no attempt given'}")


def drop_cached(path: str) -> None:
    """Put a file's or a device's dirty pages on its disk and drop its cached pages, so that it
    is read from the disk again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def private_mount(device: str, attempts: list[tuple[str, str]]) -> PrivateMount:
    """Mount `device` read-only with the first of `attempts` ((fs type, options) pairs) that the
    kernel accepts, privately (see the module docstring). Raises MountRefused when none does."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-S", "-I", "-c", _MOUNTER,
             str(theirs.fileno()), device, json.dumps([[t, o] for t, o in attempts])],
            pass_fds=(theirs.fileno(),), capture_output=True, text=True, errors="replace")
        theirs.close()
        if result.returncode != 0:
            raise DeviceError(f"{device}: cannot make a private mount: "
                              f"{(result.stderr.strip().splitlines() or ['unshare failed'])[-1]}")
        message, fds, _, _ = socket.recv_fds(ours, 65536, 1)
    finally:
        theirs.close()
        ours.close()
    reply = json.loads(message or b"{}")
    if reply.get("open_errno"):
        raise MountUnreadable(device, reply["open_errno"])
    if not fds:
        raise MountRefused(device, reply.get("errors", []))
    return PrivateMount(fds[0], reply["options"], reply.get("errors", []))
MNT_DETACH = 2


class Busy(DeviceError):
    """A filesystem cannot be unmounted: a process has a file or its working directory there."""


def umount(path: str, *, lazy: bool = False) -> None:
    """umount2(2): unmount the filesystem mounted at `path` (lazy: detach it now, let it go when
    its last user does). Raises Busy while it is in use."""
    try:
        check(libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Busy(f"{path} is in use (a process has a file or its working directory there; "
                       f"fuser -vm {path} names it)") from None
        raise DeviceError(f"cannot unmount {path}: {e.strerror}") from None


@dataclass(frozen=True)
class Mount:
    device_number: int
    mount_point: str
    fs_type: str
    source: str
    read_only: bool
    mount_id: int = 0


def mounts() -> list[Mount]:
    """Every mount in this mount namespace, from /proc/self/mountinfo."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            major, minor = (int(x) for x in fields[2].split(":"))
            opts = fields[5].split(",")
            fs_type, source = (right.split() + ["", ""])[:2]
            point = _unescape_mountinfo(fields[4])
            result.append(Mount(os.makedev(major, minor), point, fs_type, source, "ro" in opts, int(fields[0])))
    return result


def _under(path: str, points: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in points)


def mounts_inside(points: list[str]) -> list[str]:
    """Mount points below those in `points` that are not themselves in it (a mount inside one
    of them keeps it busy)."""
    return [m.mount_point for m in mounts() if m.mount_point not in points and _under(m.mount_point, points)]


def users(points: list[str], *, ignore: frozenset[int] | set[int] = frozenset()) -> list[str]:
    """The processes that have a file open in one of the filesystems mounted at `points`, or
    their working or root directory there, as "name (pid N)": what makes unmounting them fail
    with EBUSY. Read from /proc (an open file's mount by fdinfo's mnt_id) without looking the
    files up, so that a FUSE server that no longer answers cannot hang it."""
    ids = {m.mount_id for m in mounts() if m.mount_point in points}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in ignore or int(name) == os.getpid():
            continue
        base = f"/proc/{name}"
        try:
            using = any(_under(os.readlink(f"{base}/{link}"), points) for link in ("cwd", "root"))
            if not using:
                for fd in os.listdir(f"{base}/fdinfo"):
                    with open(f"{base}/fdinfo/{fd}") as f:
                        mount_id = next((int(line.split()[1]) for line in f if line.startswith("mnt_id:")), None)
                    if mount_id in ids:
                        using = True
                        break
            if using:
                with open(f"{base}/comm") as f:
                    found.append(f"{f.read().strip()} (pid {name})")
        except (OSError, ValueError):
            continue        # gone meanwhile, or a kernel thread
    return found


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040); anything else,
    UTF-8 included, is as it is on disk."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), os.fsencode(field))
    return os.fsdecode(raw)


def mounts_of(path: str) -> list[Mount]:
    """The mounts whose filesystem lives on the block device at `path` (empty for a file)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    if not stat.S_ISBLK(st.st_mode):
        real = os.path.realpath(path)
        return [m for m in mounts() if m.source == real]
    return [m for m in mounts() if m.device_number == st.st_rdev]


# struct fsmap: __u32 fmr_device, fmr_flags; __u64 fmr_physical, fmr_owner, fmr_offset,
# fmr_length, fmr_reserved[3]
_FSMAP = struct.Struct("=IIQQQQ3Q")
_FSMAP_DTYPE = np.dtype([("device", "=u4"), ("flags", "=u4"), ("physical", "=u8"), ("owner", "=u8"),
                         ("offset", "=u8"), ("length", "=u8"), ("reserved", "=u8", 3)])


# struct fsmap_head: __u32 fmh_iflags, fmh_oflags, fmh_count, fmh_entries; __u64 fmh_reserved[6];
# struct fsmap fmh_keys[2]; struct fsmap fmh_recs[]
_FSMAP_HEAD = struct.Struct("=IIII6Q")
_FSMAP_HEAD_SIZE = _FSMAP_HEAD.size + 2 * _FSMAP.size
FS_IOC_GETFSMAP = IOWR("X", 59, _FSMAP_HEAD_SIZE)
FMH_OF_DEV_T = 0x1
FMR_OF_LAST = 0x20
FMR_OWN_FREE = (0 << 32) | 1
_FSMAP_RECORDS_PER_CALL = 4096


# errnos with which GETFSMAP says "this filesystem does not do that"
UNSUPPORTED = {errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS}


# ... and "the filesystem's metadata is damaged" (EUCLEAN is the kernel's EFSCORRUPTED,
# EBADMSG its EFSBADCRC)
DAMAGED = {errno.EUCLEAN, errno.EBADMSG, errno.EIO}


class FilesystemRefused(DeviceError):
    """The filesystem cannot say which of its blocks are free: no GETFSMAP, damaged metadata.
    The message is the reason (an image of it must read every block)."""


def _new_encode_dev(dev: int) -> int:
    """The kernel's 32-bit new_encode_dev(), which GETFSMAP puts in fmr_device with FMH_OF_DEV_T."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF




def _sync_filesystem(fd: int, mount_point: str) -> None:
    """syncfs(2): write back delayed allocations, so data written before the plan has blocks
    that GETFSMAP reports as used. Returns at once on a frozen filesystem (FIFREEZE has
    already written everything back)."""
    try:
        check(libc.syncfs(fd))
    except OSError as e:
        raise FilesystemRefused(f"cannot write back the filesystem at {mount_point} before "
                                f"planning: {e.strerror}") from None


def free_ranges_by_getfsmap(mount_point: str) -> list[Range]:
    """The free space of the filesystem mounted at `mount_point`, on its data device, as
    physical byte ranges, after a syncfs."""
    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        # xfs shuts itself down when it finds damaged metadata; its root then fails with EIO
        if e.errno in DAMAGED:
            raise FilesystemRefused(f"damaged filesystem: {e.strerror}") from None
        raise DeviceError(f"{mount_point}: {e.strerror}") from None
    try:
        return free_ranges_of(fd, mount_point)
    finally:
        os.close(fd)


def free_ranges_of(fd: int, name: str) -> list[Range]:
    """The free space of the filesystem whose root (or any directory) `fd` is open on. Loops the
    query as xfs_io's fsmap does: after each batch the last record becomes the low key, until a
    record carries FMR_OF_LAST."""
    try:
        fs_device = _new_encode_dev(os.fstat(fd).st_dev)
    except OSError as e:
        if e.errno in DAMAGED:
            raise FilesystemRefused(f"damaged filesystem: {e.strerror}") from None
        raise DeviceError(f"{name}: {e.strerror}") from None
    _sync_filesystem(fd, name)
    return _query_free_space(fd, fs_device, name)


def _query_free_space(fd: int, fs_device: int, mount_point: str) -> list[Range]:
    buf = bytearray(_FSMAP_HEAD_SIZE + _FSMAP_RECORDS_PER_CALL * _FSMAP.size)
    _FSMAP_HEAD.pack_into(buf, 0, 0, 0, _FSMAP_RECORDS_PER_CALL, 0, *[0] * 6)
    low_key_at = _FSMAP_HEAD.size
    high_key_at = low_key_at + _FSMAP.size
    _FSMAP.pack_into(buf, low_key_at, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    # The high key is "everything": all ones, as xfs_io's fsmap sets it, except the length,
    # which xfs converts to sectors before checking that it is 0 or all ones.
    all_ones = 0xFFFFFFFFFFFFFFFF
    _FSMAP.pack_into(buf, high_key_at, 0xFFFFFFFF, 0xFFFFFFFF, all_ones, all_ones, all_ones, 0,
                     0, 0, 0)
    records = np.frombuffer(buf, dtype=_FSMAP_DTYPE, offset=_FSMAP_HEAD_SIZE)
    free_starts: list[np.ndarray] = []
    free_ends: list[np.ndarray] = []
    previous_low_key = None
    while True:
        try:
            fcntl.ioctl(fd, FS_IOC_GETFSMAP, buf, True)
        except OSError as e:
            if e.errno in UNSUPPORTED:
                raise FilesystemRefused("the filesystem does not report its free space "
                                         "(no GETFSMAP)") from None
            if e.errno in DAMAGED:
                raise FilesystemRefused(f"damaged filesystem: GETFSMAP failed: {e.strerror}") from None
            raise DeviceError(f"{mount_point}: GETFSMAP failed: {e.strerror}") from None
        _, oflags, _, entries = _FSMAP_HEAD.unpack_from(buf, 0)[:4]
        if entries == 0:
            break
        batch = records[:entries]
        free = batch["owner"] == FMR_OWN_FREE
        if oflags & FMH_OF_DEV_T:
            # an external journal or realtime device reports its own records; not ours
            free &= batch["device"] == fs_device
        free_starts.append(batch["physical"][free].astype(np.int64))
        free_ends.append((batch["physical"][free] + batch["length"][free]).astype(np.int64))
        last = bytes(buf[_FSMAP_HEAD_SIZE + (entries - 1) * _FSMAP.size:
                         _FSMAP_HEAD_SIZE + entries * _FSMAP.size])
        if _FSMAP.unpack(last)[1] & FMR_OF_LAST:
            break
        if last == previous_low_key:
            raise DeviceError(f"{mount_point}: GETFSMAP does not advance (kernel bug?)")
        previous_low_key = last
        buf[low_key_at:low_key_at + _FSMAP.size] = last
    if not free_starts:
        return []
    starts = np.concatenate(free_starts)
    ends = np.concatenate(free_ends)
    return list(zip(starts.tolist(), ends.tolist()))
_EXT_SUPERBLOCK_OFFSET = 1024
_EXT_MAGIC = 0xEF53
_EXT_STATE_VALID = 0x1
_EXT_STATE_ERRORS = 0x2
_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT_INCOMPAT_RECOVER = 0x4
_EXT_INCOMPAT_JOURNAL_DEV = 0x8


def ext_state_problem(path: str) -> str | None:
    """Why the ext2/3/4 superblock of `path` says its on-disk bitmaps cannot be trusted,
    or None. A journal that needs recovery holds allocations the bitmaps do not show yet:
    restoring the image and replaying the journal would point files at blocks left out."""
    with open(path, "rb", buffering=0) as f:
        sb = os.pread(f.fileno(), 1024, _EXT_SUPERBLOCK_OFFSET)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT_MAGIC:
        return "damaged filesystem: no ext2/3/4 superblock"
    state = struct.unpack_from("<H", sb, 0x3A)[0]
    compat, incompat = struct.unpack_from("<II", sb, 0x5C)
    if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
        return "an external ext4 journal device, not a filesystem"
    if incompat & _EXT_INCOMPAT_RECOVER:
        return "journal needs recovery (not cleanly unmounted): the on-disk bitmaps are not current"
    if state & _EXT_STATE_ERRORS:
        return "damaged filesystem: the superblock records errors (run fsck)"
    if not compat & _EXT_COMPAT_HAS_JOURNAL and not state & _EXT_STATE_VALID:
        return "not cleanly unmounted and without a journal: the bitmaps may be wrong"
    return None


# struct fiemap: __u64 fm_start, fm_length; __u32 fm_flags, fm_mapped_extents,
# fm_extent_count, fm_reserved; struct fiemap_extent fm_extents[]
_FIEMAP = struct.Struct("=QQIIII")


# struct fiemap_extent: __u64 fe_logical, fe_physical, fe_length, fe_reserved64[2];
# __u32 fe_flags, fe_reserved[3]
_FIEMAP_EXTENT_DTYPE = np.dtype([("logical", "=u8"), ("physical", "=u8"), ("length", "=u8"),
                                 ("reserved64", "=u8", 2), ("flags", "=u4"), ("reserved", "=u4", 3)])
FS_IOC_FIEMAP = IOWR("f", 11, _FIEMAP.size)
FIEMAP_MAX_OFFSET = 0xFFFFFFFFFFFFFFFF
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENTS_PER_CALL = 512


# Extents with no place on the device yet (UNKNOWN, DELALLOC) or not stored byte for byte
# (ENCODED): fe_physical does not say where the bytes are.
_FIEMAP_EXTENT_NOT_LOCATED = 0x2 | 0x4 | 0x8


# Extents whose blocks are not the file's alone: NOT_ALIGNED, DATA_INLINE and DATA_TAIL live
# inside metadata blocks; SHARED (reflink) blocks belong to other files too. An exclude leaves
# them in the image.
_FIEMAP_EXTENT_NOT_EXCLUSIVE = 0x100 | 0x200 | 0x400 | 0x2000


def file_extents(path: str, *, exclusive_only: bool = True) -> list[Range]:
    """The physical byte ranges on its device holding `path`'s data (FIEMAP): by default only
    those that belong to the file alone, which an exclude may drop; with exclusive_only=False
    every extent that has a location."""
    skip = _FIEMAP_EXTENT_NOT_LOCATED | (_FIEMAP_EXTENT_NOT_EXCLUSIVE if exclusive_only else 0)
    buf = bytearray(_FIEMAP.size + _FIEMAP_EXTENTS_PER_CALL * _FIEMAP_EXTENT_DTYPE.itemsize)
    extents = np.frombuffer(buf, dtype=_FIEMAP_EXTENT_DTYPE, offset=_FIEMAP.size)
    result: list[Range] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        start = 0
        while True:
            # FIEMAP_FLAG_SYNC writes delayed allocations first, so they have a location
            _FIEMAP.pack_into(buf, 0, start, FIEMAP_MAX_OFFSET - start, FIEMAP_FLAG_SYNC, 0,
                              _FIEMAP_EXTENTS_PER_CALL, 0)
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
            except OSError as e:
                raise DeviceError(f"{path}: cannot map the file to blocks (FIEMAP): {e.strerror}") from None
            mapped = _FIEMAP.unpack_from(buf, 0)[3]
            if mapped == 0:
                break
            batch = extents[:mapped]
            usable = (batch["flags"] & skip) == 0
            result += zip(batch["physical"][usable].tolist(),
                          (batch["physical"][usable] + batch["length"][usable]).tolist())
            if batch["flags"][-1] & FIEMAP_EXTENT_LAST:
                break
            start = int(batch["logical"][-1] + batch["length"][-1])
    finally:
        os.close(fd)
    return result
