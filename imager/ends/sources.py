"""What a backup reads: a VolumeSource (a block device, an image file standing in for one, a
snapshot view), opened, probed and refused when it is itself a backup."""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Protocol

from devices import discover
from devices.block import BlockDevice
from devices.errors import DeviceError

from ..errors import UsageError
from ..format import HEADER_TAG, ZSTD_MAGIC
from ..format.frames import SKIPPABLE_BASE, SKIPPABLE_MASK

log = logging.getLogger("imager.sources")


class VolumeSource(Protocol):
    """What the backup reads from: a block device, a file, a snapshot view. `read_into` fills
    the buffer from `offset` and returns the bytes read, short only at the end of the volume."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def logical_sector_size(self) -> int: ...

    def read_into(self, buf: memoryview, offset: int) -> int: ...


def probe_filesystem(path: str) -> dict[str, str]:
    """Filesystem type, label and UUID of a device or image file, by blkid's low-level probe."""
    values = discover.probe_with_blkid(path)
    return {k: values[v] for k, v in (("fs_type", "TYPE"), ("label", "LABEL"), ("uuid", "UUID")) if v in values}


# Enough of a source's start to recognise an image, a zstd file or a virtual tape's first record.
SOURCE_SNIFF_BYTES = 64 << 10


def open_source(path: str, *, backups_as_sources: bool = False) -> BlockDevice:
    """Open a volume to image. A source that is itself a backup (an imager image, a zstd file,
    a virtual tape) is refused unless `backups_as_sources`: imaging it again is a mistake."""
    try:
        # Falling back to buffered reads is a detail for -v, not a notice.
        dev = BlockDevice(path, direct=True, on_notice=log.info)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    try:
        if dev.size == 0:
            raise UsageError(f"{path}: is empty (size 0)")
        kind = None if backups_as_sources else backup_artifact_kind(dev.pread(SOURCE_SNIFF_BYTES, 0))
        if kind:
            raise UsageError(f"{path} is {kind}, not a volume: to write it back use imager restore "
                             f"(--force images it anyway)")
    except BaseException:
        dev.close()
        raise
    return dev


@dataclass
class VolumePrefix:
    """The first `size` bytes of a device: a restore target may be larger than the volume."""

    device: BlockDevice
    size: int

    @property
    def path(self) -> str:
        return self.device.path

    @property
    def logical_sector_size(self) -> int:
        return int(self.device.logical_sector_size)

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Like any source, short at its end and never past it, whatever the device holds after."""
        length = max(0, min(len(buf), self.size - offset))
        return self.device.read_into(buf[:length], offset) if length else 0


_LARGEST_TAPE_RECORD = 1 << 24


def backup_artifact_kind(head: bytes) -> str | None:
    """What a source that starts with `head` is when it is itself a backup: 'an imager image',
    'a zstd file' or 'a virtual tape (SIMH .tap)'; None for anything else (a volume)."""
    if len(head) < 8:
        return None
    (magic,) = struct.unpack_from("<I", head)
    if magic & SKIPPABLE_MASK == SKIPPABLE_BASE:
        return "an imager image" if head[8:8 + len(HEADER_TAG)] == HEADER_TAG else "a zstd file"
    if magic == ZSTD_MAGIC:
        return "a zstd file"
    # A SIMH tape starts with a record: its length, the data (padded to even), the length again.
    if 0 < magic < _LARGEST_TAPE_RECORD:
        end = 4 + magic + (magic & 1)
        if end + 4 <= len(head) and struct.unpack_from("<I", head, end)[0] == magic:
            return "a virtual tape (SIMH .tap)"
    return None
