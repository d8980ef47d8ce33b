"""Tape labels (file 0 of every cartridge): reading, requiring, writing them, and the drive
status with or without one."""

from __future__ import annotations

import errno
import os
import uuid
from dataclasses import asdict, dataclass

from devices.tape.drive import TapeDrive, TapeError, TapeStatus
from devices.tape.virtual import HostFileError, VirtualTape

from .. import __version__
from ..errors import TapeMediaError, UsageError
from ..units import now_iso
from .blocks import (DEFAULT_BLOCK_SIZE, LABEL_MAGIC, LABEL_TAG, METADATA_READ_SIZE, DamagedBlock, _meta_block,
                     _parse_meta_block)


@dataclass(frozen=True)
class Label:
    label: str
    tape_set: str
    sequence: int
    created: str
    block_size: int
    tool: str = ""

    def block(self) -> bytes:
        return _meta_block(LABEL_MAGIC, LABEL_TAG, asdict(self))

    @classmethod
    def parse(cls, block: bytes) -> "Label | None":
        """The label in `block`, None when it holds none; DamagedBlock when it is a damaged one."""
        meta = _parse_meta_block(block, LABEL_MAGIC, LABEL_TAG)
        if meta is None:
            return None
        return cls(**{k: meta[k] for k in cls.__dataclass_fields__ if k in meta})


def read_label(drive: TapeDrive) -> Label | None:
    """The label at the start of the tape, or None for a blank or foreign tape; a damaged label
    raises DamagedBlock. Leaves the tape at the start of file 1 when labelled (or at the end of
    data, when an interrupted labelling left the label without its filemark)."""
    drive.rewind()
    # imager reads and writes variable blocks: in fixed block mode (mt setblk 512, left by another
    # program) st fails the read of a label with EIO, which would pass for a blank tape.
    _variable_blocks(drive)
    try:
        first = drive.read_block(METADATA_READ_SIZE)
    except TapeError as e:
        if e.errno in (errno.EIO, errno.ENOSPC):
            return None  # blank tape: nothing recorded
        if e.errno == errno.ENOMEM:
            return None  # a block bigger than any label: not ours
        raise TapeMediaError(str(e)) from None
    try:
        label = Label.parse(first)
    except DamagedBlock as e:
        raise DamagedBlock(f"{drive.path}: the tape label {e}; it is not trusted") from None
    if label is not None:
        try:
            mark = drive.read_block(METADATA_READ_SIZE)
        except TapeError as e:
            if e.errno != errno.EIO:
                raise TapeMediaError(str(e)) from None
            mark = b""  # end of data: the next append writes the missing filemark
        if mark != b"":
            raise TapeMediaError(f"{drive.path}: the label block is not followed by a filemark (damaged tape)")
    return label


def tape_is_blank(drive: TapeDrive, *, may_move: bool) -> bool | None:
    """Whether nothing is recorded on the tape. A virtual tape's file tells without moving the
    tape; a real drive has to read from BOT, which happens only when `may_move` (else None)."""
    if isinstance(drive, VirtualTape):
        return drive.is_blank()
    return _is_blank(drive) if may_move else None


def drive_status(drive: TapeDrive, *, with_label: bool = False) -> tuple[TapeStatus, Label | None]:
    """What the drive reports (MTIOCGET), without moving the tape, as `mt status` does; the label
    only when asked for, which rewinds the tape to read it."""
    status = drive.status()
    return status, (read_label(drive) if with_label else None)


def require_label(drive: TapeDrive, expect_label: str | None = None) -> Label:
    return check_label(drive, read_label(drive), expect_label)


def check_label(drive: TapeDrive, label: Label | None, expect_label: str | None = None) -> Label:
    """`label`, the one read from `drive`, which must be there, and be `expect_label` if given."""
    if label is None:
        raise TapeMediaError(f"{drive.path}: tape is not labelled (label it with: imager tape label NAME)")
    if expect_label is not None and label.label != expect_label:
        raise TapeMediaError(f"{drive.path}: wrong tape: it is labelled {label.label!r}, expected {expect_label!r}")
    return label


def write_label(drive: TapeDrive, name: str, *, force: bool = False, tape_set: str | None = None,
                sequence: int = 1, block_size: int = DEFAULT_BLOCK_SIZE) -> Label:
    """Label the tape at its start; everything on it is gone afterwards, so refuse a tape that
    holds a label or data unless `force`."""
    if not name or len(name) > 64 or any(c in name for c in "\0\n"):
        raise UsageError(f"tape label {name!r}: give 1 to 64 printable characters")
    if not force:
        try:
            existing = read_label(drive)
        except DamagedBlock as e:
            raise DamagedBlock(f"{e}; --force relabels the tape, erasing it") from None
        if existing is not None:
            raise UsageError(f"{drive.path}: tape is already labelled {existing.label!r}; "
                             f"--force overwrites it and everything on it")
        if not _is_blank(drive):
            raise UsageError(f"{drive.path}: tape holds data that is not an imager label; "
                             f"--force overwrites it")
    label = Label(label=name, tape_set=tape_set or uuid.uuid4().hex, sequence=sequence, created=now_iso(),
                  block_size=block_size, tool=f"imager {__version__}")
    drive.rewind()
    try:
        drive.write_block(label.block())
        drive.write_filemarks(1)
    except TapeError as e:
        raise TapeMediaError(_tape_write_problem(e)) from None
    return label


def _variable_blocks(drive: TapeDrive) -> None:
    try:
        drive.set_block_size(0)
    except TapeError as e:
        raise TapeMediaError(f"{drive.path}: cannot switch the drive to variable block mode: {e}") from None


def _is_blank(drive: TapeDrive) -> bool:
    """Whether nothing is recorded on the tape; rewinds it first."""
    if isinstance(drive, VirtualTape):
        return drive.is_blank()
    drive.rewind()
    _variable_blocks(drive)
    try:
        return drive.read_block(METADATA_READ_SIZE) == b"" and drive.read_block(METADATA_READ_SIZE) == b""
    except TapeError as e:
        return e.errno in (errno.EIO, errno.ENOSPC)


def _tape_write_problem(e: TapeError) -> str:
    if isinstance(e, HostFileError):
        # Not the cartridge's end (st's ENOSPC): the host ran out of room for the file.
        if e.host_errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"{e.filename}: the filesystem holding the virtual tape is full ({os.strerror(e.host_errno)}); "
                    f"free space there and back up again (the unfinished tape file is replaced then)")
        return f"{e.filename}: the file holding the virtual tape could not be written: {os.strerror(e.host_errno)}"
    if e.errno in (errno.EACCES, errno.EROFS):
        return f"{e.filename}: tape is write-protected"
    return str(e)
