"""The one planner: which bytes of a volume a backup reads. Used blocks (GETFSMAP on the mounted
or privately mounted filesystem, per partition for a whole disk) x excludes (FIEMAP) x the
all-blocks rule; whatever cannot be planned is imaged whole, with the reason in the plan.

- `plan_mounted(device, mount_point)`: ask the mounted filesystem with FS_IOC_GETFSMAP. Every
  byte the filesystem does not report as free space is used (metadata, journal, file data, and
  anything past the end of the filesystem). Works on a frozen filesystem, so a snapshot job
  calls it inside the FIFREEZE window: the plan then describes exactly the snapshot instant.
- `plan_device(path)`: an unmounted filesystem or a snapshot view file, mounted read-only in a
  mount namespace of its own (devices.fs.private_mount) and asked the same way; a job killed in
  the middle leaves neither mount nor loop device behind.
- `plan_disk(path)`: a whole disk, partition by partition; gaps, both GPT copies and the ESP
  are kept whole.
- `plan_excludes`: files given with --exclude mapped to their data extents (FIEMAP).
"""

from __future__ import annotations

import glob
import os
import stat
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from devices import discover, fs, loop
from devices.block import size_of
from devices.errors import DeviceError
from devices.fs import FilesystemRefused, MountRefused, MountUnreadable, ext_state_problem, file_extents, private_mount
from devices.partitions import PartitionTable, PartitionTableDamaged, read_partition_table

from ..errors import ImagerError, UsageError
from .usedmap import ALL_BLOCKS, Range, UsedMap

EXT_FAMILY = ("ext2", "ext3", "ext4")
IMAGED_WHOLE = {"vfat": "FAT filesystem: imaged whole", "msdos": "FAT filesystem: imaged whole",
                "exfat": "exFAT filesystem: imaged whole"}
# Elsewhere FIEMAP's physical offsets need not be offsets on the device (btrfs).
EXCLUDABLE = ("ext2", "ext3", "ext4", "xfs")


def _device_size(path: str) -> int:
    try:
        return size_of(path)
    except DeviceError as e:
        raise ImagerError(str(e)) from None


def _mount_of(device_path: str, mount_point: str) -> fs.Mount:
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
    for m in fs.mounts():
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
        free = fs.free_ranges_by_getfsmap(mount_point)
    except FilesystemRefused as refused:
        return UsedMap.all_blocks(size, f"{mount.fs_type}: {refused}", fs_type=mount.fs_type)
    return UsedMap.outside_free(free, size, mount.fs_type)


def _free_ranges_unmounted(device_path: str, fs_type: str) -> list[Range]:
    """The free space of the unmounted filesystem on `device_path`, from a private read-only
    mount that nothing can leave behind (devices.fs.private_mount): its descriptor is all there
    is of it, and closing it, or this process dying, unmounts it and clears its loop device.
    Raises FilesystemRefused with the reason when the filesystem cannot be planned."""
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
        raise FilesystemRefused(f"damaged filesystem: the kernel refuses to mount it ({e.refusals[0]})") from None
    except MountUnreadable as e:
        if e.errno in fs.DAMAGED:
            raise FilesystemRefused(f"damaged filesystem: {os.strerror(e.errno)}") from None
        raise ImagerError(f"cannot plan {device_path}: {e}") from None
    except DeviceError as e:
        raise ImagerError(f"cannot plan {device_path}: {e}") from None
    with mounted:
        if mounted.options != attempts[0][1]:
            raise FilesystemRefused("xfs log needs recovery (not cleanly unmounted, or a copy taken while "
                                     "frozen): the on-disk free space btrees may not be current")
        return fs.free_ranges_of(mounted.fd, device_path)


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
        mounted = fs.mounts_of(device_path)
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
    problem = ext_state_problem(device_path) if fs_type in EXT_FAMILY else None
    if problem:
        return UsedMap.all_blocks(size, problem, fs_type=fs_type)
    try:
        free = _free_ranges_unmounted(device_path, fs_type)
    except FilesystemRefused as refused:
        return UsedMap.all_blocks(size, str(refused), fs_type=fs_type)
    return UsedMap.outside_free(free, size, fs_type)


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


def plan_disk(path: str, *, table: PartitionTable | None = None,
              partition_plans: dict[int, UsedMap] | None = None) -> UsedMap:
    """The used ranges of a whole partitioned disk: every byte outside the partitions is used
    (MBR, both GPT headers and entry arrays, EBRs, gaps, space after the last partition), an
    EFI system partition is used whole, and every other partition is planned by its own
    filesystem through a read-only loop device over its byte range (plan_device), then shifted
    into place. An MBR extended partition is not planned itself: its logical partitions are.

    `partition_plans` gives the plan of a partition by number where the caller has a better
    one, e.g. plan_mounted taken in the freeze window of a mounted partition: a read-only view
    of a mounted filesystem shows only what it has written back so far.
    """
    if table is None:
        table = _read_table(path)
        if table is None:
            raise ImagerError(f"{path}: no partition table")
    partition_plans = partition_plans or {}
    regions: list[tuple[int, UsedMap]] = []
    parts: list[dict[str, Any]] = []
    for p in table.partitions:
        if p.is_extended:
            continue
        size = min(p.size_bytes, table.disk_size - p.start_byte)
        description = {"number": p.number, "start_byte": p.start_byte, "size_bytes": p.size_bytes,
                       "type_name": p.type_name}
        if size <= 0:
            parts.append(dict(description, mode="absent", reason="starts past the end of the disk"))
            continue
        if p.number in partition_plans:
            plan = partition_plans[p.number]
        else:
            plan = _plan_partition(path, p.start_byte, size, p.is_esp)
        regions.append((p.start_byte, plan))
        parts.append(dict(description, **{k: v for k, v in plan.to_dict().items()
                                          if k in ("mode", "fs_type", "reason", "used_bytes")}))
    return UsedMap.compose(table.disk_size, regions, parts=parts)


def _plan_partition(path: str, start_byte: int, size: int, is_esp: bool) -> UsedMap:
    """Plan one partition through a read-only loop device over its byte range (held: it goes
    away with this process, however it ends). An EFI system
    partition is used whole whatever it holds (firmware reads it raw); it is only probed to
    name its filesystem."""
    try:
        with loop.held(path, offset=start_byte, size_limit=size) as view:
            if is_esp:
                fs_type = discover.probe_with_blkid(view).get("TYPE")
                return UsedMap.all_blocks(size, "EFI system partition: imaged whole", fs_type=fs_type)
            return plan_device(view)
    except DeviceError as e:
        raise ImagerError(f"cannot plan the partition at byte {start_byte} of {path}: {e}") from None


def partition_table_of(path: str, fs_meta: dict[str, Any]) -> dict[str, Any] | None:
    """The partition table of a whole disk, for the image header; None for a filesystem (which
    `fs_meta`, the source's probe, tells by its type), a disk without one, or a damaged one
    (plan_volume gives the reason as the plan's)."""
    if fs_meta.get("fs_type"):
        return None
    try:
        table = read_partition_table(path)
    except DeviceError:
        return None
    return table.to_dict() if table else None


def _read_table(path: str) -> PartitionTable | None:
    try:
        return read_partition_table(path)
    except DeviceError as e:
        raise ImagerError(str(e)) from None


def plan_volume(path: str) -> UsedMap:
    """The plan for whatever `path` holds: a filesystem (plan_device) or a partitioned disk
    (plan_disk). A filesystem signature wins over a partition table, as with blkid: a FAT boot
    sector carries the MBR signature too."""
    if discover.probe_with_blkid(path).get("TYPE"):
        return plan_device(path)
    try:
        table = read_partition_table(path)
    except PartitionTableDamaged as e:
        return UsedMap.all_blocks(_device_size(path), f"damaged partition table: {e}")
    if table is not None:
        return plan_disk(path, table=table)
    return plan_device(path)


def remove_stale_planning_mounts(on_notice: Callable[[str], None] | None = None) -> None:
    """Earlier versions planned unmounted volumes on mounts under /run/imager-plan-*, which a
    killed job left behind; plans are made in private mount namespaces now, which nothing can
    leave behind. Remove what an old one left, and say so."""
    for point in sorted(glob.glob("/run/imager-plan-*")):
        if os.path.ismount(point):
            subprocess.run(["umount", "-l", point], capture_output=True)
        try:
            os.rmdir(point)
        except OSError:
            continue
        if on_notice:
            on_notice(f"removed {point}, a planning mount left by a killed imager")


@dataclass(frozen=True)
class PlanRules:
    """What the user asked of a plan: every block (--all-blocks), or the used blocks minus the
    data of some files (--exclude, absolute paths or relative to the mount point)."""

    all_blocks: bool = False
    excludes: tuple[str, ...] = ()

    def check(self) -> None:
        if self.excludes and self.all_blocks:
            raise UsageError("--exclude leaves blocks out of the used-block plan; it cannot go with --all-blocks")


def plan_for_backup(device: str, size: int, rules: PlanRules, *, mount_point: str | None = None,
                    on_notice: Callable[[str], None] | None = None) -> UsedMap:
    """The one planner every backup uses: which bytes of the volume on `device` to read.

    `mount_point` is where its filesystem is mounted (frozen, for a snapshot: the plan is then
    the snapshot instant's allocation); without one the device is planned as it is (an
    unmounted filesystem on a private mount, a disk partition by partition, a snapshot view
    file). --all-blocks reads everything; --exclude needs the mount to find the files' blocks."""
    rules.check()
    if rules.excludes and mount_point is None:
        raise UsageError(f"--exclude needs the filesystem on {device} mounted, to find the files' blocks")
    if rules.all_blocks:
        return UsedMap.all_blocks(size, "--all-blocks")
    plan = plan_mounted(device, mount_point) if mount_point else plan_volume(device)
    if plan.mode == ALL_BLOCKS and on_notice:
        on_notice(f"{device}: {plan.reason}; imaging all blocks")
    if rules.excludes:
        assert mount_point is not None  # checked above
        plan = plan.minus(plan_excludes(mount_point, rules.excludes, device))
    return plan
