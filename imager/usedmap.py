"""Which byte ranges of a volume its filesystem uses: the backup reads those and writes every
other byte as zeros, so free space costs neither reading nor compression.

A plan is a `UsedMap`. It is made one of three ways:

- `plan_mounted(device, mount_point)`: ask the mounted filesystem with FS_IOC_GETFSMAP. Every
  byte the filesystem does not report as free space is used (metadata, journal, file data, and
  anything past the end of the filesystem). Works on a frozen filesystem, so a snapshot job
  calls it inside the FIFREEZE window: the plan then describes exactly the snapshot instant.
  Blocks allocated or freed after the thaw do not change it, and need not: the snapshot holds
  the instant's contents, and the plan is the instant's allocation.
- `plan_device(path)`: an unmounted filesystem or a snapshot view file. The filesystem is
  mounted read-only in a mount namespace of its own over an autoclear loop device and asked
  the same way (see `plan_device` for why this rather than parsing bitmaps); a job killed in
  the middle leaves neither mount nor loop device behind.
- `UsedMap.all_blocks(size, reason)`: an unknown, unsupported or damaged filesystem, or one
  that must be imaged whole (an EFI system partition); the reason goes into the image header.

`plan_excludes` maps files given with --exclude to their data extents (FIEMAP) so that
`UsedMap.minus` takes them out.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from typing import Iterable, Sequence

import numpy as np

from devices import block, discover
from devices.block import BlockDevice
from devices.errors import DeviceError
from devices.fs import MountRefused, MountUnreadable, private_mount
from devices.ioctl import IOWR

from .errors import ImagerError, UsageError

USED_BLOCKS = "used-blocks"
ALL_BLOCKS = "all-blocks"

Range = tuple[int, int]  # [start, end) in bytes


def _normalised(starts: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip ranges to [0, size), drop empty ones, sort, and merge overlapping or touching ones."""
    starts = np.clip(np.asarray(starts, dtype=np.int64), 0, size)
    ends = np.clip(np.asarray(ends, dtype=np.int64), 0, size)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    # A range opens a new merged run when it starts beyond everything before it reaches.
    opens = np.empty(starts.size, dtype=bool)
    opens[0] = True
    opens[1:] = starts[1:] > reach[:-1]
    closes = np.empty(starts.size, dtype=bool)
    closes[-1] = True
    closes[:-1] = opens[1:]
    return starts[opens], reach[closes]


def _complement(starts: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The gaps of normalised ranges within [0, size)."""
    gap_starts = np.concatenate(([0], ends)).astype(np.int64)
    gap_ends = np.concatenate((starts, [size])).astype(np.int64)
    keep = gap_ends > gap_starts
    return gap_starts[keep], gap_ends[keep]


def _as_arrays(ranges: Iterable[Range]) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.asarray(list(ranges), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


class UsedMap:
    """The used byte ranges of a volume of `size` bytes: sorted, merged, half-open [start, end).

    `mode` says how the map was made: 'used-blocks' (the filesystem told us) or 'all-blocks'
    (every byte is used; `reason` says why). `parts` describes the pieces of a composed map
    (one per partition of a disk), for the image header.
    """

    __slots__ = ("size", "starts", "ends", "used_bytes", "mode", "fs_type", "reason", "excluded_bytes",
                 "parts")

    def __init__(self, size: int, starts: np.ndarray, ends: np.ndarray, *, mode: str = USED_BLOCKS,
                 fs_type: str | None = None, reason: str | None = None, excluded_bytes: int = 0,
                 parts: Sequence[dict] = ()):
        if mode not in (USED_BLOCKS, ALL_BLOCKS):
            raise ValueError(f"unknown plan mode {mode!r}")
        self.size = int(size)
        self.starts, self.ends = _normalised(starts, ends, self.size)
        self.used_bytes = int((self.ends - self.starts).sum())
        self.mode = mode
        self.fs_type = fs_type
        self.reason = reason
        self.excluded_bytes = int(excluded_bytes)
        self.parts = tuple(parts)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_ranges(cls, size: int, ranges: Iterable[Range], **kw) -> "UsedMap":
        starts, ends = _as_arrays(ranges)
        return cls(size, starts, ends, **kw)

    @classmethod
    def all_blocks(cls, size: int, reason: str, *, fs_type: str | None = None) -> "UsedMap":
        return cls(size, np.array([0]), np.array([size]), mode=ALL_BLOCKS, fs_type=fs_type,
                   reason=reason)

    @classmethod
    def compose(cls, size: int, regions: Iterable[tuple[int, "UsedMap"]], *,
                fs_type: str | None = None, parts: Sequence[dict] = ()) -> "UsedMap":
        """A map of a `size`-byte volume from regions planned on their own, each UsedMap placed
        at its byte offset. Every byte outside the regions counts as used: on a disk that is
        the partition table, the GPT headers at both ends, and the gaps between partitions,
        which boot loaders and other tools use without telling anyone."""
        regions = list(regions)
        region_starts = np.array([offset for offset, _ in regions], dtype=np.int64)
        region_ends = np.array([offset + m.size for offset, m in regions], dtype=np.int64)
        outside_starts, outside_ends = _complement(*_normalised(region_starts, region_ends, size), size)
        all_starts, all_ends = [outside_starts], [outside_ends]
        for offset, m in regions:
            all_starts.append(m.starts + offset)
            all_ends.append(m.ends + offset)
        any_planned = any(m.mode == USED_BLOCKS for _, m in regions)
        return cls(size, np.concatenate(all_starts), np.concatenate(all_ends),
                   mode=USED_BLOCKS if any_planned else ALL_BLOCKS, fs_type=fs_type,
                   reason=None if any_planned else "no partition holds a filesystem that reports its free space",
                   excluded_bytes=sum(m.excluded_bytes for _, m in regions), parts=parts)

    def _derived(self, starts: np.ndarray, ends: np.ndarray, size: int | None = None,
                 **changes) -> "UsedMap":
        fields = dict(mode=self.mode, fs_type=self.fs_type, reason=self.reason,
                      excluded_bytes=self.excluded_bytes, parts=self.parts)
        fields.update(changes)
        return UsedMap(self.size if size is None else size, starts, ends, **fields)

    # --- queries --------------------------------------------------------------------------

    @property
    def ranges(self) -> list[Range]:
        return list(zip(self.starts.tolist(), self.ends.tolist()))

    def ranges_in(self, offset: int, length: int) -> list[Range]:
        """The used parts of [offset, offset+length), RELATIVE to `offset`: (start, end) pairs
        with 0 <= start < end <= length, sorted. [] means nothing there is used; [(0, length)]
        means all of it is. Two binary searches, so it is cheap enough per chunk of a
        multi-terabyte volume."""
        if length <= 0:
            return []
        end = offset + length
        first = int(np.searchsorted(self.ends, offset, side="right"))
        last = int(np.searchsorted(self.starts, end, side="left"))
        if first >= last:
            return []
        starts = self.starts[first:last].tolist()
        ends = self.ends[first:last].tolist()
        return [(max(s, offset) - offset, min(e, end) - offset) for s, e in zip(starts, ends)]

    def covers(self, start: int, end: int) -> bool:
        """True when all of [start, end) is used."""
        if end <= start:
            return True
        i = int(np.searchsorted(self.ends, start, side="right"))
        return bool(i < self.starts.size and self.starts[i] <= start and self.ends[i] >= end)

    def overlaps(self, start: int, end: int) -> bool:
        """True when any byte of [start, end) is used."""
        return bool(self.ranges_in(start, end - start)) if end > start else False

    # --- composition ----------------------------------------------------------------------

    def shifted(self, offset: int, size: int | None = None) -> "UsedMap":
        """The same ranges `offset` bytes further on, in a volume of `size` bytes (default: just
        large enough): a partition's map placed on its disk."""
        return self._derived(self.starts + offset, self.ends + offset,
                             self.size + offset if size is None else size)

    def union(self, other: "UsedMap") -> "UsedMap":
        """Bytes used in either map (the larger size)."""
        return self._derived(np.concatenate((self.starts, other.starts)),
                             np.concatenate((self.ends, other.ends)), max(self.size, other.size))

    def minus(self, ranges: Iterable[Range]) -> "UsedMap":
        """This map without `ranges` (absolute byte ranges, e.g. from plan_excludes)."""
        ex_starts, ex_ends = _normalised(*_as_arrays(ranges), self.size)
        # A minus B is everything outside (outside A, or inside B).
        outside = _complement(self.starts, self.ends, self.size)
        gone = _normalised(np.concatenate((outside[0], ex_starts)),
                           np.concatenate((outside[1], ex_ends)), self.size)
        starts, ends = _complement(*gone, self.size)
        removed = self.used_bytes - int((ends - starts).sum())
        return self._derived(starts, ends, excluded_bytes=self.excluded_bytes + removed)

    def aligned(self, granularity: int) -> "UsedMap":
        """Every range widened outward to multiples of `granularity` (a sector size for
        O_DIRECT reads). Widening only ever adds used bytes, so it stays safe."""
        if granularity <= 1:
            return self
        starts = self.starts // granularity * granularity
        ends = -(-self.ends // granularity) * granularity
        return self._derived(starts, ends)

    def to_dict(self) -> dict:
        """A summary for the image header (the ranges themselves are not needed to restore:
        unused bytes are zeros in the image)."""
        d = {"mode": self.mode, "fs_type": self.fs_type, "volume_size": self.size,
             "used_bytes": self.used_bytes, "ranges": int(self.starts.size)}
        if self.reason:
            d["reason"] = self.reason
        if self.excluded_bytes:
            d["excluded_bytes"] = self.excluded_bytes
        if self.parts:
            d["parts"] = list(self.parts)
        return d

    def __repr__(self) -> str:
        why = f", reason={self.reason!r}" if self.reason else ""
        return (f"UsedMap(size={self.size}, mode={self.mode!r}, fs_type={self.fs_type!r}, "
                f"used_bytes={self.used_bytes}, ranges={self.starts.size}{why})")


# --- FS_IOC_GETFSMAP (include/uapi/linux/fsmap.h) ------------------------------------------

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

assert _FSMAP.size == 64 and _FSMAP_HEAD_SIZE == 192 and _FSMAP_DTYPE.itemsize == 64

# errnos with which GETFSMAP says "this filesystem does not do that"
_UNSUPPORTED = {errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS}
# ... and "the filesystem's metadata is damaged" (EUCLEAN is the kernel's EFSCORRUPTED,
# EBADMSG its EFSBADCRC)
_DAMAGED = {errno.EUCLEAN, errno.EBADMSG, errno.EIO}


class _FilesystemRefused(Exception):
    """GETFSMAP failed in a way that means 'image this volume whole'; carries the reason."""


def _new_encode_dev(dev: int) -> int:
    """The kernel's 32-bit new_encode_dev(), which GETFSMAP puts in fmr_device with FMH_OF_DEV_T."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


_libc = ctypes.CDLL(None, use_errno=True)


def _sync_filesystem(fd: int, mount_point: str) -> None:
    """syncfs(2): write back delayed allocations, so data written before the plan has blocks
    that GETFSMAP reports as used. Returns at once on a frozen filesystem (FIFREEZE has
    already written everything back)."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise _FilesystemRefused(f"cannot write back the filesystem at {mount_point} before "
                                 f"planning: {os.strerror(err)}")


def free_ranges_by_getfsmap(mount_point: str) -> list[Range]:
    """The free space of the filesystem mounted at `mount_point`, on its data device, as
    physical byte ranges, after a syncfs."""
    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        # xfs shuts itself down when it finds damaged metadata; its root then fails with EIO
        if e.errno in _DAMAGED:
            raise _FilesystemRefused(f"damaged filesystem: {e.strerror}") from None
        raise ImagerError(f"{mount_point}: {e.strerror}") from None
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
        if e.errno in _DAMAGED:
            raise _FilesystemRefused(f"damaged filesystem: {e.strerror}") from None
        raise ImagerError(f"{name}: {e.strerror}") from None
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
            if e.errno in _UNSUPPORTED:
                raise _FilesystemRefused("the filesystem does not report its free space "
                                         "(no GETFSMAP)") from None
            if e.errno in _DAMAGED:
                raise _FilesystemRefused(f"damaged filesystem: GETFSMAP failed: {e.strerror}") from None
            raise ImagerError(f"{mount_point}: GETFSMAP failed: {e.strerror}") from None
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
            raise ImagerError(f"{mount_point}: GETFSMAP does not advance (kernel bug?)")
        previous_low_key = last
        buf[low_key_at:low_key_at + _FSMAP.size] = last
    if not free_starts:
        return []
    starts = np.concatenate(free_starts)
    ends = np.concatenate(free_ends)
    return list(zip(starts.tolist(), ends.tolist()))


def _device_size(path: str) -> int:
    try:
        with BlockDevice(path, direct=False) as dev:
            return dev.size
    except DeviceError as e:
        raise ImagerError(str(e)) from None


def _mount_of(device_path: str, mount_point: str) -> block.Mount:
    """The mount of the filesystem on `device_path` that `mount_point` lies in; an ImagerError
    when there is none."""
    try:
        device_st = os.stat(device_path)
    except FileNotFoundError:
        raise ImagerError(f"{device_path}: no such device") from None
    try:
        point_dev = os.stat(mount_point).st_dev
    except FileNotFoundError:
        raise ImagerError(f"{mount_point}: no such directory") from None
    if not stat.S_ISBLK(device_st.st_mode):
        raise ImagerError(f"{device_path}: not a block device, so no filesystem is mounted from it")
    real_device = os.path.realpath(device_path)
    for m in block.mounts():
        # btrfs gives its mounts an anonymous device number: match the source as well
        if m.device_number != device_st.st_rdev and m.source != real_device:
            continue
        try:
            if os.stat(m.mount_point).st_dev == point_dev:
                return m
        except OSError:
            continue
    raise ImagerError(f"{device_path} is not mounted at {mount_point}: no mounted filesystem "
                      f"to ask which blocks are in use")


def plan_mounted(device_path: str, mount_point: str) -> UsedMap:
    """The used ranges of the filesystem on `device_path`, mounted at `mount_point`, by
    GETFSMAP: every byte not reported as free space is used, including anything past the end
    of the filesystem. Callable while the filesystem is frozen (FIFREEZE); that is where a
    snapshot job calls it. A filesystem without GETFSMAP, or one whose metadata reads as
    damaged, gives an all-blocks map with the reason."""
    mount = _mount_of(device_path, mount_point)
    size = _device_size(device_path)
    try:
        free = free_ranges_by_getfsmap(mount_point)
    except _FilesystemRefused as refused:
        return UsedMap.all_blocks(size, f"{mount.fs_type}: {refused}", fs_type=mount.fs_type)
    return _used_outside_free(free, size, mount.fs_type)


def _used_outside_free(free: list[Range], size: int, fs_type: str) -> UsedMap:
    """Everything but the free space is used: metadata, journal, data, whatever GETFSMAP
    reports with an unknown owner, and any bytes past the end of the filesystem."""
    free_starts, free_ends = _normalised(*_as_arrays(free), size)
    starts, ends = _complement(free_starts, free_ends, size)
    return UsedMap(size, starts, ends, mode=USED_BLOCKS, fs_type=fs_type)


# --- unmounted filesystems and snapshot views ---------------------------------------------

EXT_FAMILY = ("ext2", "ext3", "ext4")
IMAGED_WHOLE = {"vfat": "FAT filesystem: imaged whole", "msdos": "FAT filesystem: imaged whole",
                "exfat": "exFAT filesystem: imaged whole"}

_EXT_SUPERBLOCK_OFFSET = 1024
_EXT_MAGIC = 0xEF53
_EXT_STATE_VALID = 0x1
_EXT_STATE_ERRORS = 0x2
_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT_INCOMPAT_RECOVER = 0x4
_EXT_INCOMPAT_JOURNAL_DEV = 0x8


def _ext_state_problem(path: str) -> str | None:
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


def _free_ranges_unmounted(device_path: str, fs_type: str) -> list[Range]:
    """The free space of the unmounted filesystem on `device_path`, from a private read-only
    mount that nothing can leave behind (devices.fs.private_mount): its descriptor is all there
    is of it, and closing it, or this process dying, unmounts it and clears its loop device.
    Raises _FilesystemRefused with the reason when the filesystem cannot be planned."""
    if fs_type in EXT_FAMILY:
        # _ext_state_problem has made sure the journal has nothing to replay; noload keeps
        # the kernel from even opening it. The ext4 driver mounts ext2 and ext3 too.
        attempts = [("ext4", "ro,noload")]
    else:
        # xfs. Plain ro first: on a read-only device the kernel refuses an xfs whose log needs
        # recovery, which is exactly the test wanted; norecovery then tells a log to replay
        # from damage. nouuid: a snapshot of a mounted xfs has the original's UUID, and xfs
        # refuses to mount a UUID twice.
        attempts = [("xfs", "ro,nouuid"), ("xfs", "ro,norecovery,nouuid")]
    try:
        mounted = private_mount(device_path, attempts)
    except MountRefused as e:
        raise _FilesystemRefused(f"damaged filesystem: the kernel refuses to mount it ({e.refusals[0]})") from None
    except MountUnreadable as e:
        if e.errno in _DAMAGED:
            raise _FilesystemRefused(f"damaged filesystem: {os.strerror(e.errno)}") from None
        raise ImagerError(f"cannot plan {device_path}: {e}") from None
    except DeviceError as e:
        raise ImagerError(f"cannot plan {device_path}: {e}") from None
    with mounted:
        if mounted.options != attempts[0][1]:
            raise _FilesystemRefused("xfs log needs recovery (not cleanly unmounted, or a copy taken while "
                                     "frozen): the on-disk free space btrees may not be current")
        return free_ranges_of(mounted.fd, device_path)


def plan_device(device_path: str) -> UsedMap:
    """The used ranges of the filesystem on an unmounted block device, image file or snapshot
    view file.

    How: blkid -p names the type. ext2/3/4 and xfs are mounted read-only, without journal
    replay, privately (devices.fs.private_mount) and asked by GETFSMAP; the mount and its loop
    device go away when its descriptor closes, also when the job is killed. This rather than parsing dumpe2fs or
    xfs_db output: the kernel's own allocator code answers, the same code that answers for
    mounted volumes; it understands every feature (flex_bg, uninitialised groups, bigalloc,
    xfs AGs with or without rmapbt) and reports in bytes, where the debug tools' text is not
    a stable interface. A journal or log that needs recovery makes the plan all-blocks: its
    pending allocations are not in the on-disk bitmaps, and a restore would replay them.

    A mounted block device is planned by plan_mounted on its mount. vfat is imaged whole;
    anything unknown, unsupported or damaged is all-blocks with the reason.
    """
    size = _device_size(device_path)
    if stat.S_ISBLK(os.stat(device_path).st_mode):
        mounted = block.mounts_of(device_path)
        if mounted:
            return plan_mounted(device_path, mounted[0].mount_point)
    probe = discover.probe_with_blkid(device_path)
    fs_type = probe.get("TYPE")
    if not fs_type:
        if probe.get("PTTYPE"):
            return UsedMap.all_blocks(size, f"a {probe['PTTYPE']} partition table, not a filesystem "
                                            f"(plan it with partitions.plan_disk)")
        return UsedMap.all_blocks(size, "unknown filesystem (no signature found)")
    if fs_type in IMAGED_WHOLE:
        return UsedMap.all_blocks(size, IMAGED_WHOLE[fs_type], fs_type=fs_type)
    if fs_type not in EXT_FAMILY and fs_type != "xfs":
        return UsedMap.all_blocks(size, f"unsupported filesystem {fs_type}: imaged whole", fs_type=fs_type)
    problem = _ext_state_problem(device_path) if fs_type in EXT_FAMILY else None
    if problem:
        return UsedMap.all_blocks(size, problem, fs_type=fs_type)
    try:
        free = _free_ranges_unmounted(device_path, fs_type)
    except _FilesystemRefused as refused:
        return UsedMap.all_blocks(size, str(refused), fs_type=fs_type)
    return _used_outside_free(free, size, fs_type)


# --- --exclude PATH: FS_IOC_FIEMAP (include/uapi/linux/fiemap.h) ----------------------------

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
EXCLUDABLE = ("ext2", "ext3", "ext4", "xfs")

assert _FIEMAP.size == 32 and _FIEMAP_EXTENT_DTYPE.itemsize == 56

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
                raise ImagerError(f"--exclude {path}: cannot map the file to blocks (FIEMAP): "
                                  f"{e.strerror}") from None
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


def _files_under(path: str, fs_device: int) -> Iterable[str]:
    """Regular files at or under `path` on the filesystem `fs_device`, not following symlinks
    and not descending into other mounts."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        yield path
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(root, d)).st_dev == fs_device]
        for name in files:
            full = os.path.join(root, name)
            file_st = os.lstat(full)
            if stat.S_ISREG(file_st.st_mode) and file_st.st_dev == fs_device:
                yield full


def plan_excludes(mount_point: str, paths: Iterable[str], device: str) -> list[Range]:
    """The physical byte ranges on `device` holding the data of `paths` (files, or directories
    whose files are all excluded), for UsedMap.minus. The files stay in the filesystem's
    metadata: after a restore they exist with their original size and zeros for contents.

    Relative paths are taken from `mount_point`. An ImagerError names a path that does not
    exist or is not on that filesystem, or says no filesystem from `device` is mounted there.
    Call it in the same FIFREEZE window as plan_mounted so both describe the same instant.
    """
    mount = _mount_of(device, mount_point)
    if mount.fs_type not in EXCLUDABLE:
        # elsewhere FIEMAP's physical offsets need not be offsets on the device (btrfs)
        raise UsageError(f"--exclude works on {', '.join(EXCLUDABLE)} only; {mount_point} is {mount.fs_type}")
    fs_device = os.stat(mount_point).st_dev
    ranges: list[Range] = []
    for given in paths:
        path = given if os.path.isabs(given) else os.path.join(mount_point, given)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UsageError(f"--exclude {given}: no such file or directory") from None
        except OSError as e:
            raise UsageError(f"--exclude {given}: {e.strerror}") from None
        if st.st_dev != fs_device:
            raise UsageError(f"--exclude {given}: not on the filesystem of {device} "
                              f"(mounted at {mount_point})")
        for file_path in _files_under(os.path.realpath(path), fs_device):
            ranges += file_extents(file_path)
    return ranges
