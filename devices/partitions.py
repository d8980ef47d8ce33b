"""Partition tables read with plain reads (the kernel here parses none itself).

GPT (UEFI spec, chapter 5): a protective MBR in LBA 0, the primary header in LBA 1 with its entry
array after it, and a backup header in the last LBA with its entry array before it. Both headers
and both arrays carry CRC32s; a damaged primary is replaced by the backup, and the table says so
in `warnings`. MBR: four primary entries at byte 446; an extended entry points to a chain of
extended boot records (EBRs), each holding one logical partition (numbered from 5, as Linux
does) and a link to the next.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import uuid
import zlib
from dataclasses import asdict, dataclass, field

from .block import BlockDevice
from .errors import DeviceError
from .ioctl import IO

class PartitionTableDamaged(DeviceError):
    """A partition table is there but cannot be read (both GPT copies damaged)."""


# The EFI system partition's type: a GUID in a GPT, a one-byte id in an MBR.
ESP_GPT_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"

ESP_MBR_TYPE = 0xEF
PROTECTIVE_MBR_TYPE = 0xEE
MBR_EXTENDED_TYPES = {0x05, 0x0F, 0x85}

GPT_TYPE_NAMES = {
    ESP_GPT_TYPE: "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "44479540-f297-41b2-9af7-d131d5f0458a": "Linux root (x86)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "Linux LUKS",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery environment",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS/HFS+",
    "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple APFS",
}

MBR_TYPE_NAMES = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)",
    0x82: "Linux swap / Solaris", 0x83: "Linux", 0x85: "Linux extended", 0x8E: "Linux LVM",
    0xA5: "FreeBSD", 0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)", 0xFD: "Linux raid autodetect",
}

_MBR_SIGNATURE = b"\x55\xaa"
_MBR_ENTRIES_AT = 446
_MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, first LBA, sectors
_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = struct.Struct("<8sIIII QQQQ16s QIII")
_GPT_MIN_HEADER_SIZE = 92
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")  # type, unique, first LBA, last LBA, attributes, name
_GPT_MAX_ENTRY_ARRAY = 4 << 20  # a sane bound for a damaged header's entry count
_MAX_LOGICAL_PARTITIONS = 256


@dataclass(frozen=True)
class Partition:
    number: int
    start_byte: int
    size_bytes: int
    type_id: str            # GPT: type GUID, lowercase; MBR: "0x83"
    type_name: str
    name: str | None        # GPT partition name; MBR has none
    uuid: str | None        # GPT unique partition GUID; MBR: the kernel's PARTUUID, "<disk id>-<nn>"
    is_esp: bool
    is_extended: bool = False  # an MBR extended partition: only a container of logical ones

    @property
    def end_byte(self) -> int:
        return self.start_byte + self.size_bytes


@dataclass
class PartitionTable:
    scheme: str             # "gpt" or "mbr"
    sector_size: int
    disk_size: int
    partitions: list[Partition] = field(default_factory=list)
    disk_id: str | None = None      # GPT disk GUID, or the MBR disk signature "0x1234abcd"
    warnings: list[str] = field(default_factory=list)  # damage found and worked around

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "sector_size": self.sector_size, "disk_size": self.disk_size,
                "disk_id": self.disk_id, "partitions": [asdict(p) for p in self.partitions],
                "warnings": list(self.warnings)}

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        raise KeyError(number)


class _Disk:
    """Plain buffered reads from a device or image file, short only at its end."""

    def __init__(self, dev: BlockDevice, sector_size: int):
        self.dev = dev
        self.size = dev.size
        self.sector_size = sector_size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset >= self.size:
            return b""
        return self.dev.pread(min(length, self.size - offset), offset)

    def sector(self, lba: int) -> bytes:
        return self.read(lba * self.sector_size, self.sector_size)

    @property
    def last_lba(self) -> int:
        return self.size // self.sector_size - 1


def read_partition_table(path: str) -> PartitionTable | None:
    """The GPT or MBR partition table of the device or image file at `path`, None if it holds
    none. Raises PartitionTableDamaged when a GPT is there but both copies are damaged."""
    with BlockDevice(path, direct=False) as dev:
        sector_size = dev.logical_sector_size
        if not dev.is_block and dev.pread(8, 512) != _GPT_SIGNATURE and dev.pread(8, 4096) == _GPT_SIGNATURE:
            # an image file of a 4Kn disk: a file has no sector size of its own to tell us
            sector_size = 4096
        disk = _Disk(dev, sector_size)
        mbr = disk.read(0, 512)
        has_mbr = len(mbr) == 512 and mbr[510:512] == _MBR_SIGNATURE
        entries = [_MBR_ENTRY.unpack_from(mbr, _MBR_ENTRIES_AT + 16 * i) for i in range(4)] if has_mbr else []
        if any(e[2] == PROTECTIVE_MBR_TYPE for e in entries):
            return _read_gpt(disk, warnings=[])
        if disk.sector(1)[:8] == _GPT_SIGNATURE:
            return _read_gpt(disk, warnings=["the protective MBR is missing; the GPT is read anyway"])
        if has_mbr:
            return _read_mbr(disk, mbr, entries)
        return None


# --- GPT --------------------------------------------------------------------------------------

@dataclass
class _GptHeader:
    lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: str
    entries_lba: int
    entry_count: int
    entry_size: int
    entries: bytes


def _gpt_header_at(disk: _Disk, lba: int) -> tuple[_GptHeader | None, str]:
    """The GPT header in `lba` with its entry array, checked; or None and what is wrong."""
    raw = disk.sector(lba)
    if len(raw) < _GPT_MIN_HEADER_SIZE or raw[:8] != _GPT_SIGNATURE:
        return None, "no GPT signature"
    (_, _, header_size, header_crc, _, current_lba, alternate_lba, first_usable, last_usable,
     disk_guid, entries_lba, entry_count, entry_size, entries_crc) = _GPT_HEADER.unpack_from(raw)
    if not _GPT_MIN_HEADER_SIZE <= header_size <= len(raw):
        return None, f"header size {header_size} is invalid"
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:header_size]) != header_crc:
        return None, "header CRC mismatch"
    if current_lba != lba:
        return None, f"header says it lives in LBA {current_lba}"
    if entry_size < _GPT_ENTRY.size or entry_size % 8 or entry_count * entry_size > _GPT_MAX_ENTRY_ARRAY:
        return None, f"entry array of {entry_count} x {entry_size} bytes is invalid"
    entries = disk.read(entries_lba * disk.sector_size, entry_count * entry_size)
    if len(entries) != entry_count * entry_size:
        return None, "the partition entry array lies past the end of the disk"
    if zlib.crc32(entries) != entries_crc:
        return None, "partition entry array CRC mismatch"
    return _GptHeader(lba, alternate_lba, first_usable, last_usable,
                      str(uuid.UUID(bytes_le=disk_guid)), entries_lba, entry_count, entry_size,
                      entries), ""


def _read_gpt(disk: _Disk, warnings: list[str]) -> PartitionTable:
    primary, primary_problem = _gpt_header_at(disk, 1)
    backup_lba = primary.alternate_lba if primary else disk.last_lba
    backup, backup_problem = _gpt_header_at(disk, backup_lba)
    if primary is None and backup is None:
        raise PartitionTableDamaged(f"{disk.dev.path}: the GPT is damaged: primary header: {primary_problem}; "
                          f"backup header in LBA {backup_lba}: {backup_problem}")
    if primary is None:
        warnings.append(f"the primary GPT is damaged ({primary_problem}); using the backup GPT "
                        f"in LBA {backup_lba}")
        header = backup
    else:
        header = primary
        if backup is None:
            warnings.append(f"the backup GPT in LBA {backup_lba} is damaged ({backup_problem}); "
                            f"using the primary GPT")
    table = PartitionTable("gpt", disk.sector_size, disk.size, disk_id=header.disk_guid, warnings=warnings)
    ss = disk.sector_size
    for index in range(header.entry_count):
        raw = header.entries[index * header.entry_size:index * header.entry_size + _GPT_ENTRY.size]
        type_guid, unique_guid, first_lba, last_lba, _attributes, name = _GPT_ENTRY.unpack(raw)
        if type_guid == bytes(16):
            continue  # an unused entry
        number = index + 1  # the kernel and sfdisk number GPT partitions by entry slot
        if last_lba < first_lba:
            warnings.append(f"GPT entry {number} ends (LBA {last_lba}) before it starts (LBA {first_lba}); ignored")
            continue
        type_id = str(uuid.UUID(bytes_le=type_guid))
        table.partitions.append(Partition(
            number=number, start_byte=first_lba * ss, size_bytes=(last_lba - first_lba + 1) * ss,
            type_id=type_id, type_name=GPT_TYPE_NAMES.get(type_id, "unknown"),
            name=name.decode("utf-16-le", errors="replace").split("\0", 1)[0],
            uuid=str(uuid.UUID(bytes_le=unique_guid)), is_esp=type_id == ESP_GPT_TYPE))
    _check_bounds(table)
    return table


# --- MBR --------------------------------------------------------------------------------------

def _read_mbr(disk: _Disk, mbr: bytes, entries: list[tuple]) -> PartitionTable | None:
    if any(status not in (0x00, 0x80) for status, *_ in entries):
        # boot code or a FAT/NTFS boot sector where a table would be, not a partition table
        return None
    if all(kind == 0 or sectors == 0 for _, _, kind, _, _, sectors in entries):
        return None
    (signature,) = struct.unpack_from("<I", mbr, 440)
    table = PartitionTable("mbr", disk.sector_size, disk.size, disk_id=f"0x{signature:08x}")
    ss = disk.sector_size

    def add(number: int, start_lba: int, sectors: int, kind: int, extended: bool = False) -> None:
        table.partitions.append(Partition(
            number=number, start_byte=start_lba * ss, size_bytes=sectors * ss, type_id=f"0x{kind:02x}",
            type_name=MBR_TYPE_NAMES.get(kind, "unknown"), name=None, uuid=f"{signature:08x}-{number:02x}",
            is_esp=kind == ESP_MBR_TYPE, is_extended=extended))

    extended_start = None
    for index, (_, _, kind, _, first_lba, sectors) in enumerate(entries):
        if kind == 0 or sectors == 0:
            continue
        is_extended = kind in MBR_EXTENDED_TYPES
        add(index + 1, first_lba, sectors, kind, is_extended)
        if is_extended and extended_start is None:
            extended_start = first_lba
    if extended_start is not None:
        _read_logical_partitions(disk, extended_start, table, add)
    _check_bounds(table)
    return table


def _read_logical_partitions(disk: _Disk, extended_start: int, table: PartitionTable, add) -> None:
    """Follow the EBR chain. Each EBR's first entry is a logical partition relative to that EBR;
    its second links to the next EBR, relative to the start of the extended partition."""
    number = 5
    ebr_lba = extended_start
    visited: set[int] = set()
    while True:
        if ebr_lba in visited or len(visited) >= _MAX_LOGICAL_PARTITIONS:
            table.warnings.append(f"the chain of extended boot records loops at LBA {ebr_lba}; stopped there")
            return
        visited.add(ebr_lba)
        ebr = disk.read(ebr_lba * disk.sector_size, 512)
        if len(ebr) < 512 or ebr[510:512] != _MBR_SIGNATURE:
            table.warnings.append(f"the extended boot record in LBA {ebr_lba} is damaged (no signature); "
                                  f"logical partitions after it are not listed")
            return
        logical = _MBR_ENTRY.unpack_from(ebr, _MBR_ENTRIES_AT)
        link = _MBR_ENTRY.unpack_from(ebr, _MBR_ENTRIES_AT + 16)
        _, _, kind, _, relative_lba, sectors = logical
        if kind != 0 and sectors != 0:
            add(number, ebr_lba + relative_lba, sectors, kind)
            number += 1
        _, _, link_kind, _, link_lba, link_sectors = link
        if link_kind not in MBR_EXTENDED_TYPES or link_sectors == 0:
            return
        ebr_lba = extended_start + link_lba


def _check_bounds(table: PartitionTable) -> None:
    for p in table.partitions:
        if p.end_byte > table.disk_size:
            table.warnings.append(f"partition {p.number} ends at byte {p.end_byte}, past the end of the "
                                  f"disk ({table.disk_size} bytes)")


BLKRRPART = IO(0x12, 95)


def partition_devices(device: str) -> list[str]:
    """The partition devices the kernel has for the whole disk at `device` (/dev paths)."""
    name = os.path.basename(os.path.realpath(device))
    base = f"/sys/class/block/{name}"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    return [f"/dev/{e}" for e in entries if os.path.exists(os.path.join(base, e, "partition"))]


def reread_partitions(device: str) -> str:
    """Have the kernel take up the partition table now written on the whole disk `device`, as
    sfdisk does after writing one: "reread" (it scanned it), "updated" (it does not scan this
    device, and its partition devices, added by hand, were made again from the table by partx),
    "none" (it does not scan it and there were no partition devices to update) or "stale" (a
    partition is in use: the kernel still has the partitions of before)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKRRPART)
        return "reread"
    except OSError as e:
        if e.errno == errno.EBUSY:
            return "stale"
    finally:
        os.close(fd)
    if not partition_devices(device):
        return "none"
    # partx -u cannot move a partition over an old one it overlaps: all go, then the new ones come.
    removed = subprocess.run(["partx", "-d", device], capture_output=True)
    if removed.returncode != 0 and partition_devices(device):
        return "stale"
    added = subprocess.run(["partx", "-a", device], capture_output=True)
    return "updated" if added.returncode == 0 or not _has_table(device) else "stale"


def _has_table(device: str) -> bool:
    try:
        return read_partition_table(device) is not None
    except DeviceError:
        return False
