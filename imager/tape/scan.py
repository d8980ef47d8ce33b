"""What every tape file of a cartridge holds, read from its first and last blocks only (a real
drive spaces over the data instead of reading it)."""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass
from typing import Iterator

from devices.tape.drive import TapeDrive, TapeError

from .. import views
from ..errors import TapeMediaError
from .blocks import END_MAGIC, END_TAG, METADATA_READ_SIZE, SEGMENT_MAGIC, SEGMENT_TAG, DamagedBlock, _parse_meta_block
from .labels import require_label


@dataclass
class TapeFileInfo:
    """What one tape file holds, from its first and last blocks."""

    tape_file: int
    kind: str  # 'image', 'damaged' (a segment header that fails its checksum) or 'foreign'
    label: str | None = None
    image_id: str | None = None
    segment: int | None = None
    stream_offset: int | None = None
    stream_length: int | None = None
    continued: bool = False
    complete: bool = False
    block_size: int | None = None
    image: dict | None = None
    problem: str | None = None  # what is damaged, for 'damaged' files and images with a bad end block

    @property
    def incomplete(self) -> bool:
        """An image segment without its end block: what an interrupted write leaves."""
        return self.kind == "image" and not self.complete and self.problem is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offset"] = d.pop("stream_offset")
        d["bytes"] = d.pop("stream_length")
        d["image"] = views.image_record(self.image) if self.image else None
        return dict(d, incomplete=self.incomplete)


def scan_files(drive: TapeDrive) -> Iterator[TapeFileInfo]:
    """Every tape file after the label, read by its first and last blocks only (a real drive
    spaces over the data instead of reading it)."""
    require_label(drive)
    tape_file = 1
    while (info := _read_file_info(drive, tape_file)) is not None:
        yield info
        tape_file += 1


def _read_file_info(drive: TapeDrive, tape_file: int) -> TapeFileInfo | None:
    """What the tape file starting here holds; None at the end of data (or for an empty file,
    which reads as the end of data). Leaves the tape after the file."""
    try:
        first = drive.read_block(METADATA_READ_SIZE)
    except TapeError as e:
        if e.errno == errno.EIO:
            return None  # end of data
        if e.errno != errno.ENOMEM:
            raise TapeMediaError(str(e)) from None
        first = None  # a block bigger than any header: not ours
    if first == b"":
        return None  # a second filemark: end of data
    try:
        header = _parse_meta_block(first, SEGMENT_MAGIC, SEGMENT_TAG) if first else None
    except DamagedBlock as e:
        _space_over_file(drive)
        return TapeFileInfo(tape_file, "damaged", problem=f"its segment header {e}")
    if header is None:
        _space_over_file(drive)
        return TapeFileInfo(tape_file, "foreign")
    info = TapeFileInfo(tape_file, "image", image_id=header["image_id"], segment=header["segment"],
                        stream_offset=header["stream_offset"], block_size=header["block_size"])
    try:
        end = _last_block_of_file(drive, header["block_size"])
    except DamagedBlock as e:
        info.problem = f"its end block {e}"
        return info
    if end is not None:
        info.stream_length = end["stream_length"]
        info.continued = end["continued"]
        info.complete = True
        info.image = end.get("image")
    return info


def _space_over_file(drive: TapeDrive) -> None:
    """To the start of the next file; a file the end of data cuts short ends there."""
    try:
        drive.forward_space_files(1)
    except TapeError as e:
        if e.errno != errno.EIO:
            raise TapeMediaError(str(e)) from None


def _last_block_of_file(drive: TapeDrive, block_size: int) -> dict | None:
    """Space to the end of the current file and read its last block: the end block, or None
    when the file has none (an interrupted write). Leaves the tape after the file: at the start
    of the next one, or at the end of data when no filemark closes the file."""
    try:
        drive.forward_space_files(1)
        closed = True
    except TapeError as e:
        if e.errno != errno.EIO:
            raise TapeMediaError(str(e)) from None
        closed = False  # the end of data comes first: a write interrupted before the filemark
    try:
        if closed:
            drive.backward_space_files(1)
        drive.backward_space_records(1)
        last = drive.read_block(max(block_size, METADATA_READ_SIZE))
        after = drive.read_block(METADATA_READ_SIZE) if closed else b""
    except TapeError as e:
        raise TapeMediaError(f"{drive.path}: reading the end of a tape file: {e}") from None
    if after != b"":
        raise TapeMediaError(f"{drive.path}: lost position reading the end of a tape file")
    return _parse_meta_block(last, END_MAGIC, END_TAG)


def part_of_an_image(tape_file: int, first: bytes, last: bytes) -> str:
    """What a tape file whose first and last blocks are these holds, when it is only a part of an
    image (a segment of one that spans cartridges); "" when it is a whole image or not one of
    ours."""
    try:
        header = _parse_meta_block(first, SEGMENT_MAGIC, SEGMENT_TAG)
        end = _parse_meta_block(last, END_MAGIC, END_TAG)
    except DamagedBlock:
        return ""
    if header is None or end is None or (header["segment"] == 0 and not end["continued"]):
        return ""
    if header["segment"] > 0:
        where = "starts on an earlier cartridge" + (" and continues on the next one" if end["continued"] else "")
    else:
        where = "continues on the next cartridge"
    return (f"tape file {tape_file} holds only segment {header['segment']} of image {header['image_id'][:12]}, "
            f"which {where}: what was written is that part of it; --image-only follows the image across "
            f"cartridges")
