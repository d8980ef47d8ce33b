"""Find the block devices and tape drives on this machine and describe them.

Enumeration goes through pyudev. pyudev (libudev) lists devices from sysfs by itself, but the
properties udev's rules add (ID_FS_TYPE, ID_FS_LABEL, ID_PART_ENTRY_TYPE, ...) come from the udev
database in /run/udev/data, which is absent where no udevd runs (containers, minimal VMs). So
every device is described in three layers:

  1. sysfs, always: size, sector sizes, read-only flag, partition/parent, loop backing file.
  2. udev properties, when the database holds a record for the device.
  3. `blkid -p` (a low-level probe of the device itself), once per device and only when udev
     has no record for it or its record carries neither a filesystem nor a partition entry.

Where pyudev itself cannot be loaded (no libudev), the same records are read from /sys/class
(device_records.py enumerates the devices either way; this module describes them).
Nothing here imports the imager engine.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .device_records import DeviceRecord, sysfs_record, sysfs_records, udev_record_by_number, udev_records
from .errors import DeviceError
from .fs import Mount, mounts
from .partitions import ESP_GPT_TYPE, ESP_MBR_TYPE

SYSFS_ROOT = "/sys"


# sysfs gives sizes in 512-byte units whatever the device's logical sector size.
_SYSFS_SECTOR = 512

# RAM-backed disks hold nothing worth imaging; they are listed only with include_empty=True.
_RAM_DISK_NAME = re.compile(r"(z?ram)\d+$")

# A tape drive is the kernel's stN; nstN is its non-rewinding node. The other nodes of the same
# drive (st0l, st0m, st0a, nst0a, ...) are alternative modes of it, not further drives.
_NON_REWINDING_TAPE_NAME = re.compile(r"nst(\d+)$")

_BLKID_TIMEOUT_SECONDS = 10


@dataclass
class BlockDeviceInfo:
    name: str                       # kernel name: vda, vda1, loop0, loop0p1
    path: str                       # device node: /dev/vda1
    device_number: str              # "major:minor", as in /proc/self/mountinfo
    size: int                       # bytes
    logical_sector_size: int
    physical_sector_size: int
    kind: str                       # 'disk', 'partition' or 'loop'
    parent: str | None = None       # the disk's name, for a partition
    fs_type: str | None = None      # ext4, xfs, vfat, swap, ...
    label: str | None = None
    uuid: str | None = None
    mount_points: list[str] = field(default_factory=list)
    partition_type: str | None = None    # lower-case GUID (GPT) or "0xNN" (MBR), for a partition
    partition_scheme: str | None = None  # 'gpt' or 'dos': the table a partition is an entry of
    partition_table: str | None = None   # 'gpt' or 'dos': the table a disk holds
    is_esp: bool = False
    read_only: bool = False
    backing_file: str | None = None      # for a loop device

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TapeDriveInfo:
    name: str                       # the kernel's name of the drive: st0
    path: str                       # its non-rewinding node: /dev/nst0
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Block devices


def list_block_devices(*, include_empty: bool = False, use_udev: bool = True) -> list[BlockDeviceInfo]:
    """Every block device: disks, their partitions and attached loop devices, sorted by name.

    Devices of size 0 (loop devices with nothing attached, drives without a medium) and RAM
    disks (ram*, zram*) are left out unless `include_empty` is set. `use_udev=False` reads
    sysfs alone (plus blkid), as happens anyway where pyudev cannot load libudev.
    """
    records = udev_records("block") if use_udev else None
    if records is None:
        records = sysfs_records(SYSFS_ROOT, "block")
    all_mounts = mounts()
    devices = []
    for record in records:
        if not include_empty and _RAM_DISK_NAME.match(record.name):
            continue
        try:
            if not include_empty and _read_size(record.sys_path) == 0:
                continue
            devices.append(_describe_record(record, all_mounts))
        except OSError:
            continue  # removed while we were looking (a loop detached, a partition deleted)
    return sorted(devices, key=lambda d: _natural_key(d.name))


def describe(path: str) -> BlockDeviceInfo:
    """Describe the block device at `path` (/dev/vda1, /dev/disk/by-uuid/..., /dev/loop3).

    The result names the device by its kernel node (`path` is canonical, /dev/NAME), and is
    given for an empty device too (size 0).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise DeviceError(f"{path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path}: not a block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    record = udev_record_by_number(st.st_rdev)
    if record is None:
        record = sysfs_record(os.path.join(SYSFS_ROOT, "dev", "block", f"{major}:{minor}"))
    if record is None:
        raise DeviceError(f"{path}: block device {major}:{minor} is not known to the kernel")
    try:
        return _describe_record(record, mounts())
    except OSError as e:
        raise DeviceError(f"{path}: cannot read its sysfs attributes: {e.strerror}") from None


def is_partition(path: str) -> bool:
    """Whether the block device at `path` is a partition of a disk (False for anything else),
    from sysfs alone: cheaper than describe(), whose first udev lookup loads libudev."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISBLK(st.st_mode):
        return False
    return os.path.exists(os.path.join(SYSFS_ROOT, "dev", "block", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}",
                                       "partition"))


def _describe_record(record: DeviceRecord, all_mounts: list[Mount]) -> BlockDeviceInfo:
    sys_path = record.sys_path
    props = record.properties
    device_number = _read_text(os.path.join(sys_path, "dev"))
    major, minor = (int(n) for n in device_number.split(":"))

    is_partition = os.path.exists(os.path.join(sys_path, "partition"))
    # A partition has no request queue of its own: its sector sizes are its disk's.
    disk_sys_path = os.path.dirname(sys_path) if is_partition else sys_path
    backing_file = _read_optional_text(os.path.join(sys_path, "loop", "backing_file"))
    if is_partition:
        kind = "partition"
    elif major == 7 or os.path.isdir(os.path.join(sys_path, "loop")):
        kind = "loop"
    else:
        kind = "disk"

    probed = _probe_if_udev_lacks_data(record)
    device_mounts = [m for m in all_mounts if m.device_number == os.makedev(major, minor)]
    # Where neither udev nor blkid can tell (a device this process may not open), a mounted
    # device's filesystem type is still known: the kernel's, from mountinfo.
    fs_type = (props.get("ID_FS_TYPE") or probed.get("TYPE")
               or next((m.fs_type for m in device_mounts), None))
    partition_type = _normalise_partition_type(props.get("ID_PART_ENTRY_TYPE")
                                               or probed.get("PART_ENTRY_TYPE"))
    # A partition is an entry of a table (its scheme); a disk may hold a table of its own.
    partition_table = None if is_partition else (props.get("ID_PART_TABLE_TYPE")
                                                 or probed.get("PTTYPE"))
    return BlockDeviceInfo(
        name=record.name,
        path=_device_node(record),
        device_number=device_number,
        size=_read_size(sys_path),
        logical_sector_size=_read_int(os.path.join(disk_sys_path, "queue", "logical_block_size")),
        physical_sector_size=_read_int(os.path.join(disk_sys_path, "queue", "physical_block_size")),
        kind=kind,
        parent=os.path.basename(disk_sys_path) if is_partition else None,
        fs_type=fs_type,
        label=_udev_label(props) or probed.get("LABEL"),
        uuid=props.get("ID_FS_UUID") or probed.get("UUID"),
        mount_points=[m.mount_point for m in device_mounts],
        partition_type=partition_type,
        partition_scheme=props.get("ID_PART_ENTRY_SCHEME") or probed.get("PART_ENTRY_SCHEME"),
        partition_table=partition_table,
        is_esp=partition_type in (ESP_GPT_TYPE, f"{ESP_MBR_TYPE:#04x}"),
        read_only=_read_int(os.path.join(sys_path, "ro")) != 0,
        backing_file=backing_file,
    )


def _probe_if_udev_lacks_data(record: DeviceRecord) -> dict[str, str]:
    """blkid's view of the device, or {} where udev has already probed it.

    udev's blkid builtin sets ID_FS_TYPE for a filesystem, ID_PART_TABLE_TYPE for a disk with
    a partition table and ID_PART_ENTRY_TYPE for a partition. A record with none of them is
    either not probed by udev's rules or holds nothing recognisable: probe it ourselves.
    """
    props = record.properties
    udev_has_probed = record.in_udev_database and any(
        key in props for key in ("ID_FS_TYPE", "ID_PART_TABLE_TYPE", "ID_PART_ENTRY_TYPE"))
    if udev_has_probed:
        return {}
    return probe_with_blkid(_device_node(record))


def probe_with_blkid(device_path: str, *, types: list[str] | None = None) -> dict[str, str]:
    """`blkid -p -o export DEV`: TYPE, LABEL, UUID, PTTYPE, PART_ENTRY_TYPE, ... ({} if nothing).

    -p reads the device itself rather than blkid's cache, so the answer is current. blkid exits
    2 when it finds nothing and 8 when signatures contradict each other; both give {} here.
    `types` runs only the probes of those types (blkid -n ext4,xfs,...).
    """
    blkid = shutil.which("blkid")
    if blkid is None:
        return {}
    try:
        result = subprocess.run([blkid, "-p", *(["-n", ",".join(types)] if types else []), "-o", "export", device_path],
                                capture_output=True,
                                text=True, errors="surrogateescape",
                                timeout=_BLKID_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if result.returncode != 0:
        return {}
    return parse_blkid_export(result.stdout)


def parse_blkid_export(text: str) -> dict[str, str]:
    """Parse blkid's `-o export` lines. blkid puts a backslash before each character a shell
    would treat specially (space, quotes, $, `, <, >, backslash); undo that."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = re.sub(r"\\(.)", r"\1", value)
    return values


def _udev_label(props: Mapping[str, str]) -> str | None:
    # ID_FS_LABEL has unsafe characters replaced by '_'; ID_FS_LABEL_ENC keeps every byte,
    # escaping the unsafe ones as \xNN.
    encoded = props.get("ID_FS_LABEL_ENC")
    if encoded:
        return _decode_udev_escapes(encoded)
    return props.get("ID_FS_LABEL") or None


def _decode_udev_escapes(value: str) -> str:
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 value.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


def _normalise_partition_type(value: str | None) -> str | None:
    """GPT type GUIDs in lower case; MBR ids as "0xNN" (udev and blkid both say "0xef")."""
    if not value:
        return None
    value = value.strip().lower()
    if re.fullmatch(r"(0x)?[0-9a-f]{1,2}", value):
        return f"0x{int(value, 16):02x}"
    return value


def _device_node(record: DeviceRecord) -> str:
    # DEVNAME is absolute from libudev and relative in a uevent file; sysfs names with '!'
    # (cciss!c0d0) stand for a '/' in the node path.
    devname = record.properties.get("DEVNAME") or record.name.replace("!", "/")
    return devname if devname.startswith("/") else "/dev/" + devname


def _read_size(sys_path: str) -> int:
    return _read_int(os.path.join(sys_path, "size")) * _SYSFS_SECTOR


# ---------------------------------------------------------------------------------------------
# Tape drives


def list_tape_drives(*, use_udev: bool = True) -> list[TapeDriveInfo]:
    """The SCSI tape drives (the st driver), one entry per drive, sorted by number."""
    records = udev_records("scsi_tape") if use_udev else None
    if records is None:
        return tape_drives_from_sysfs(SYSFS_ROOT)
    return _tape_drives_from_records(records)


def tape_drives_from_sysfs(sysfs_root: str, dev_root: str = "/dev") -> list[TapeDriveInfo]:
    """The tape drives described by the sysfs tree under `sysfs_root` (class/scsi_tape/*)."""
    return _tape_drives_from_records(sysfs_records(sysfs_root, "scsi_tape"), dev_root)


def _tape_drives_from_records(records: Iterable[DeviceRecord],
                              dev_root: str = "/dev") -> list[TapeDriveInfo]:
    drives = []
    for record in records:
        match = _NON_REWINDING_TAPE_NAME.match(record.name)
        if not match:
            continue
        props = record.properties
        # The class device's `device` link leads to the SCSI device: INQUIRY strings and VPD.
        scsi_device = os.path.join(record.sys_path, "device")
        devname = props.get("DEVNAME") or record.name
        drives.append(TapeDriveInfo(
            name=f"st{match.group(1)}",
            path=devname if devname.startswith("/") else os.path.join(dev_root, devname),
            vendor=_udev_inquiry_string(props, "ID_VENDOR")
            or _read_optional_text(os.path.join(scsi_device, "vendor")),
            model=_udev_inquiry_string(props, "ID_MODEL")
            or _read_optional_text(os.path.join(scsi_device, "model")),
            serial=props.get("ID_SCSI_SERIAL") or props.get("ID_SERIAL_SHORT")
            or _unit_serial_number(os.path.join(scsi_device, "vpd_pg80")),
        ))
    return sorted(drives, key=lambda d: _natural_key(d.name))


def _udev_inquiry_string(props: Mapping[str, str], key: str) -> str | None:
    # ID_VENDOR / ID_MODEL have spaces replaced by '_'; the _ENC forms are the INQUIRY bytes.
    encoded = props.get(key + "_ENC")
    if encoded:
        return _decode_udev_escapes(encoded).strip() or None
    return props.get(key) or None


def _unit_serial_number(vpd_page_path: str) -> str | None:
    """The serial from a raw VPD page 0x80 (SPC: 4-byte header, byte 3 = length, ASCII)."""
    try:
        with open(vpd_page_path, "rb") as f:
            page = f.read()
    except OSError:
        return None
    if len(page) < 4 or page[1] != 0x80:
        return None
    serial = page[4:4 + page[3]].decode("ascii", "replace").strip(" \0")
    return serial or None


# ---------------------------------------------------------------------------------------------
# Small readers


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _read_optional_text(path: str) -> str | None:
    try:
        return _read_text(path) or None
    except OSError:
        return None


def _read_int(path: str) -> int:
    return int(_read_text(path))


def _natural_key(name: str) -> list:
    """Sort loop2 before loop10 and vda before vda1."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
