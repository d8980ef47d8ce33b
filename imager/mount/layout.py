"""What a served volume holds and how each part of it is shown: a filesystem is mounted
read-only over a read-only loop device on its served file; a whole disk gets one entry per
partition, `<n>-<label or fstype>`; what the kernel cannot mount (vfat on this kernel, swap,
anything unknown, a filesystem it refuses) is shown as the served file of its bytes.

The same layout serves `imager mount` (at the user's directory) and `ls`/`extract` (on a
private mount nobody else sees)."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass
from typing import Callable

from devices import discover, loop
from devices.errors import DeviceError
from devices.partitions import PartitionTableDamaged, read_partition_table

from .. import failpoints
from ..errors import ImagerError
from ..units import counted
from .serve import VOLUME_FILE, VolumeServer, partition_file

log = logging.getLogger("imager.mount")

# How each filesystem is mounted: read-only, and never writing to its journal or log (noload,
# norecovery: a journal that needs replay is left as it is; the view is what is on disk).
# nouuid: the image of a mounted xfs has its UUID, which xfs refuses to mount twice.
MOUNT_AS = {
    "ext2": ("ext4", "ro,noload"),
    "ext3": ("ext4", "ro,noload"),
    "ext4": ("ext4", "ro,noload"),
    "xfs": ("xfs", "ro,norecovery,nouuid"),
    "btrfs": ("btrfs", "ro"),
    "vfat": ("vfat", "ro"),
    "exfat": ("exfat", "ro"),
    "iso9660": ("iso9660", "ro"),
    "squashfs": ("squashfs", "ro"),
}
# An image is not trusted with device nodes or set-user-ID programs.
SAFE_OPTIONS = "nodev,nosuid"
# Larger reads through the loop device: fewer, larger FUSE requests on sequential reads.
READ_AHEAD_KB = 4096


@dataclass
class Entry:
    """One part of the view: the whole volume (name "", a filesystem mounted at the top) or a
    partition of a disk ("2-root"); `file` is its served file."""

    name: str
    number: int | None          # the partition number; None for the whole volume
    offset: int                 # where its bytes start in the volume
    size: int
    file: str                   # its served file (a path in the FUSE mount)
    fs_type: str | None         # what blkid found there
    label: str | None
    mount_type: str | None = None   # how the kernel mounts it (None: shown as a file)
    options: str | None = None
    reason: str = ""            # why it is shown as a file
    path: str = ""              # where it is shown
    device: str | None = None   # its loop device, while mounted
    how: str = ""               # "mounted" or "file"

    def to_dict(self) -> dict:
        return asdict(self)


def kernel_filesystems() -> set[str]:
    try:
        with open("/proc/filesystems") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def describe(server: VolumeServer) -> list[Entry]:
    """The entries of the volume `server` serves: a filesystem (blkid finds one; a FAT boot
    sector carries the MBR signature too, so a filesystem wins), else the partitions of a GPT or
    MBR table, each then served as a file of its own, else one unknown volume."""
    try:
        return _describe(server)
    except (OSError, DeviceError, ImagerError) as e:
        damaged = server.volume.damaged_within(0, server.volume.size)
        if not damaged:
            raise
        # A read of the volume's start (its partition table or filesystem) failed: say where the
        # damage is rather than a bare "Input/output error".
        image = server.volume.chain.images[0].path
        raise ImagerError(f"the volume cannot be read where its partition table or filesystem is: "
                          f"{_damage(damaged)}; imager verify {shlex.quote(image)} names "
                          f"{'it' if len(damaged) == 1 else 'them'} ({e})") from None


def _describe(server: VolumeServer) -> list[Entry]:
    volume_file = server.path(VOLUME_FILE)
    size = server.volume.size
    probe = _probe(server, volume_file, 0, size)
    if probe.get("TYPE"):
        return [_entry("", None, 0, size, volume_file, probe)]
    try:
        table = read_partition_table(volume_file)
    except PartitionTableDamaged as e:
        return [_entry("volume", None, 0, size, volume_file, {}, f"damaged partition table: {e}")]
    except DeviceError as e:
        raise ImagerError(f"cannot read the volume: {e}") from None
    if table is None:
        return [_with_damage(server, _entry("volume", None, 0, size, volume_file, {},
                                            "no filesystem or partition table found"))]
    entries = []
    for p in table.partitions:
        if p.is_extended or p.size_bytes <= 0 or p.start_byte >= size:
            continue
        length = min(p.size_bytes, size - p.start_byte)
        path = server.add_window(partition_file(p.number), p.start_byte, length)
        found = _probe(server, path, p.start_byte, length)
        name = f"{p.number}-{_name_part(found.get('LABEL') or found.get('TYPE') or 'unknown')}"
        entries.append(_entry(name, p.number, p.start_byte, length, path, found))
    for warning in table.warnings:
        log.warning("partition table: %s", warning)
    return [_with_damage(server, e) for e in entries]


def _with_damage(server: VolumeServer, entry: Entry) -> Entry:
    """An entry nothing was found in says so if damaged chunks lie in it: the damage, not the
    lack of a filesystem, may be why."""
    damaged = server.volume.damaged_within(entry.offset, entry.size) if not entry.fs_type else []
    if damaged:
        entry.reason += f"; {_damage(damaged)} in it"
    return entry


def _damage(damaged: list[tuple[int, int]]) -> str:
    """'2 damaged chunks (volume bytes a-b, c-d)': the regions CachedVolume.damaged_within found."""
    return (f"{counted(len(damaged), 'damaged chunk')} (volume bytes "
            f"{', '.join(f'{a}-{b}' for a, b in damaged[:3])}{', ...' if len(damaged) > 3 else ''})")


def _probe(server: VolumeServer, path: str, offset: int, length: int) -> dict[str, str]:
    """blkid's answer for the file of volume bytes [offset, offset + length). A probe that
    found nothing where a damaged chunk lies is asked again for the filesystems imager mounts
    only: other probes (RAID members, UDF) read the end of the device, and one read failing
    there hides a filesystem whose superblock is intact."""
    found = discover.probe_with_blkid(path)
    damaged = server.volume.damaged_within(offset, length)
    if found.get("TYPE") or not damaged:
        return found
    found = discover.probe_with_blkid(path, types=sorted(MOUNT_AS))
    if found.get("TYPE"):
        log.warning("%s found in %s past %s", found["TYPE"], os.path.basename(path), _damage(damaged))
    return found


def _entry(name: str, number: int | None, offset: int, size: int, path: str, probe: dict[str, str],
           reason: str = "") -> Entry:
    fs_type = probe.get("TYPE")
    entry = Entry(name, number, offset, size, path, fs_type, probe.get("LABEL"))
    how = MOUNT_AS.get(fs_type or "")
    if reason:
        entry.reason = reason
    elif how is None:
        entry.reason = f"{fs_type}: not a filesystem imager mounts" if fs_type else "no filesystem found"
    elif how[0] not in kernel_filesystems():
        entry.reason = f"{fs_type}: this kernel cannot mount it"
    else:
        entry.mount_type, entry.options = how
    if not entry.mount_type and not entry.name:
        entry.name = "volume"
    return entry


def _name_part(text: str) -> str:
    """A label as part of a file name: no '/', no control characters, at most 64 characters."""
    cleaned = re.sub(r"[/\x00-\x1f\x7f]", "_", text).strip() or "unknown"
    return cleaned[:64]


def mount_entry(entry: Entry, where: str, *, extra_options: str = SAFE_OPTIONS,
                on_device: Callable[[str], None] | None = None) -> None:
    """Mount the filesystem of `entry` read-only at the directory `where` over a read-only loop
    device on its served file. The loop device clears itself when the filesystem is unmounted,
    and if anything fails before it is mounted, or this process dies meanwhile (autoclear,
    held open until mounted). A kernel that refuses the filesystem raises MountRefused."""
    assert entry.mount_type and entry.options
    failpoints.check("mount.attach", entry.number or 0, 1)
    options = ",".join(filter(None, (entry.options, extra_options)))
    with loop.held(entry.file, read_only=True, direct_io=True) as device:
        if on_device is not None:
            on_device(device)
        _set_read_ahead(device)
        done = subprocess.run(["mount", "-t", entry.mount_type, "-o", options, device, where],
                              capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines()
                     if ln.strip() and "dmesg(1)" not in ln]
            raise MountRefused(f"{entry.fs_type or 'the filesystem'} on {entry.name or 'the volume'}: the kernel "
                               f"refuses to mount it: {(lines[0] if lines else 'mount failed').removeprefix('mount: ')}")
    entry.device, entry.path, entry.how = device, where, "mounted"
    entry.options = options


class MountRefused(ImagerError):
    """The kernel does not mount a filesystem (damaged, unsupported features): it is shown as a
    file instead."""


def _set_read_ahead(device: str) -> None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/queue/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.info("%s: read-ahead left as it is (%s)", device, e.strerror)
