"""Tape layout: labels, one tape file per image, spanning cartridges, scanning, reading back.

    file 0      label block: skippable frame 0x184D2A52 (b"IMGRLBL2", checksum, JSON: label, set, sequence)
    file 1..    one image segment each:
                  segment header block: skippable frame 0x184D2A53 (b"IMGRSEG2", checksum, JSON)
                  the image byte stream (exactly the bytes of an image file), in blocks of block_size
                  segment end block:    skippable frame 0x184D2A54 (b"IMGREND2", checksum, JSON: lengths,
                                        whether it continues on the next cartridge, the image record)
                filemark after each file

The checksum is the BLAKE3 digest of the JSON that follows it (32 bytes). A block whose checksum
fails is reported as damaged and never trusted. The segment header is a file's first block and
the end block its last, so a data block can never be taken for either.

A tape file at the end of data that has a segment header but no end block is what an interrupted
write leaves (closed by a filemark or not, its last record possibly torn): it holds no restorable
image, `tape list` shows it INCOMPLETE, and the next image written to the cartridge replaces it,
taking its file number.

Every header block is a zstd skippable frame, so `dd if=/dev/nst0 bs=SIZE | zstd -d` (or
`imager tape read --file N | zstd -d`) restores an image that fits one cartridge with standard
tools. An image that reaches the early-warning zone ends its segment at the next zstd frame
boundary and goes on in file 1 of the next cartridge of the set, so the segments of a spanned
image concatenated are a valid zstd stream too.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import struct
import subprocess
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import blake3

from devices.errors import DeviceError
from devices.tape.drive import TapeDrive, TapeError, TapeStatus
from devices.tape.st import StTape
from devices.tape.virtual import HostFileError, VirtualTape

from . import __version__
from .errors import ImagerError, UsageError
from .guards import check_tape_path
from .stream import skippable_frame

LABEL_MAGIC = 0x184D2A52
SEGMENT_MAGIC = 0x184D2A53
END_MAGIC = 0x184D2A54
LABEL_TAG = b"IMGRLBL2"
SEGMENT_TAG = b"IMGRSEG2"
END_TAG = b"IMGREND2"
_CHECKSUM_SIZE = 32
DEFAULT_BLOCK_SIZE = 1 << 20
# Room for the largest metadata block (a label, segment header or end block is a few KiB).
METADATA_READ_SIZE = 1 << 20


class TapeMediaError(ImagerError):
    """The tape does not hold what was expected: unlabelled, another tape, damaged, cut short."""


class DamagedBlock(TapeMediaError):
    """A label, segment header or end block that is not trusted; the message completes "the
    block ..." (it "is damaged (...)" or "is in another format (...)")."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _meta_block(magic: int, tag: bytes, meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    return skippable_frame(magic, tag + blake3.blake3(body).digest() + body)


def _parse_meta_block(block: bytes, magic: int, tag: bytes) -> dict | None:
    """The metadata of a block of this kind, None for any other block. A block is of this kind
    when its magic or its tag is there (one damaged byte cannot hide it); then its checksum must
    hold, or DamagedBlock says what is wrong."""
    head = 8 + len(tag)
    if len(block) < head:
        return None
    found_magic, size = struct.unpack_from("<II", block)
    found_tag = bytes(block[8:head])
    if found_magic != magic and found_tag != tag:
        return None
    if found_tag[:-1] == tag[:-1] and found_tag != tag:
        raise DamagedBlock(f"is in another format ({found_tag.decode('ascii', 'replace')}; "
                           f"this imager reads {tag.decode()})")
    if found_magic != magic or found_tag != tag or size != len(block) - 8 or len(block) < head + _CHECKSUM_SIZE:
        raise DamagedBlock("is damaged (its frame header does not hold)")
    body = bytes(block[head + _CHECKSUM_SIZE:])
    if blake3.blake3(body).digest() != block[head:head + _CHECKSUM_SIZE]:
        raise DamagedBlock("is damaged (its checksum does not match)")
    try:
        meta = json.loads(body)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise DamagedBlock("is damaged (its checksum holds but it holds no metadata)")
    return meta


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


# --- opening drives and cartridges ---------------------------------------------------------------

@dataclass
class TapeSpec:
    """What `--tape` names: a real drive (/dev/nstN), a virtual tape file, or a set of virtual
    cartridges given as a pattern with {n} (the cartridge's sequence number, from 1)."""

    spec: str
    capacity: int | None = None
    changer: str | None = None
    prompt: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        # Decided once, before anything is opened: a path under /dev is only ever a drive.
        self._real_drive = check_tape_path(self.path_for(1))
        if self._real_drive and self.is_pattern:
            raise UsageError(f"--tape {self.spec!r}: a set of cartridges as a pattern is for virtual tapes; "
                             f"a real drive is one device (/dev/nstN) with --changer or the operator")

    @property
    def is_pattern(self) -> bool:
        return "{n" in self.spec

    @property
    def is_real_drive(self) -> bool:
        return self._real_drive

    @property
    def early_warning_zone(self) -> int | None:
        """A virtual cartridge's early-warning zone: a quarter of a small one, 32 MiB of a large
        one. The zstd frame in flight when the warning comes must still fit in it (a real
        cartridge's zone holds gigabytes)."""
        if self.capacity is None or self.is_real_drive:
            return None
        return min(32 << 20, self.capacity // 4)

    def path_for(self, sequence: int) -> str:
        if self.is_pattern:
            try:
                return self.spec.format(n=sequence)
            except (KeyError, IndexError, ValueError) as e:
                raise UsageError(f"--tape {self.spec!r}: a cartridge pattern takes {{n}}, e.g. 'tape-{{n:03}}.tap' ({e})") from None
        return self.spec

    def open(self, sequence: int = 1, *, create: bool = True) -> TapeDrive:
        path = self.path_for(sequence)
        try:
            if self.is_real_drive:
                return StTape(path)
            if os.path.isdir(path):
                raise UsageError(f"--tape {path}: is a directory; give a .tap file or /dev/nstN")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise UsageError(f"--tape {path}: no such directory {parent}")
            return VirtualTape(path, capacity=self.capacity, early_warning=self.early_warning_zone,
                               create=create)
        except DeviceError as e:
            raise TapeMediaError(str(e)) from None

    def next_cartridge(self, drive: TapeDrive, sequence: int, *, create: bool = True) -> TapeDrive:
        """Take `drive`'s cartridge out and return the drive with cartridge `sequence` in it.
        A virtual cartridge that does not exist is created only when `create` (for writing)."""
        if self.is_pattern:
            drive.close()
            if not create and not os.path.exists(self.path_for(sequence)):
                raise TapeMediaError(f"cartridge {sequence} of the set is missing: no {self.path_for(sequence)}")
            return self.open(sequence, create=create)
        if not self.is_real_drive:
            drive.close()
            raise TapeMediaError(f"{self.spec}: cartridge full, and a single virtual tape has no next "
                                 f"cartridge; give a set as a pattern, e.g. --tape 'tape-{{n:03}}.tap'")
        drive.unload()
        drive.close()
        message = f"insert cartridge {sequence} of the set into {self.spec}"
        if self.changer:
            r = subprocess.run(self.changer, shell=True, env=dict(os.environ, IMAGER_CARTRIDGE=str(sequence),
                                                                    IMAGER_DRIVE=self.spec))
            if r.returncode:
                raise TapeMediaError(f"changer command failed ({r.returncode}) loading cartridge {sequence}")
        elif self.prompt:
            self.prompt(message)
        else:
            raise TapeMediaError(f"{message}: no terminal to ask on and no --changer command")
        new = self.open(sequence, create=create)
        new.load()
        return new


def operator_prompt(message: str) -> None:
    """Ask the operator on the terminal, even when stdout is a pipe to another program."""
    try:
        with open("/dev/tty", "r+") as tty:
            tty.write(f"imager: {message}, then press Enter (Ctrl-C to stop) ")
            tty.flush()
            tty.readline()
    except OSError:
        raise TapeMediaError(f"{message}: no terminal to ask on (use --changer)") from None


# --- labels ------------------------------------------------------------------------------------

def read_label(drive: TapeDrive) -> Label | None:
    """The label at the start of the tape, or None for a blank or foreign tape; a damaged label
    raises DamagedBlock. Leaves the tape at the start of file 1 when labelled (or at the end of
    data, when an interrupted labelling left the label without its filemark)."""
    drive.rewind()
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
    label = read_label(drive)
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
            raise TapeMediaError(f"{drive.path}: tape is already labelled {existing.label!r}; "
                                 f"--force overwrites it and everything on it")
        if not _is_blank(drive):
            raise TapeMediaError(f"{drive.path}: tape holds data that is not an imager label; "
                                 f"--force overwrites it")
    label = Label(label=name, tape_set=tape_set or uuid.uuid4().hex, sequence=sequence, created=_now(),
                  block_size=block_size, tool=f"imager {__version__}")
    drive.rewind()
    try:
        drive.write_block(label.block())
        drive.write_filemarks(1)
    except TapeError as e:
        raise TapeMediaError(_tape_write_problem(e)) from None
    return label


def _is_blank(drive: TapeDrive) -> bool:
    """Whether nothing is recorded on the tape; rewinds it first."""
    drive.rewind()
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


# --- writing an image ------------------------------------------------------------------------

def position_for_append(drive: TapeDrive) -> tuple[int, str | None]:
    """Position a labelled tape where the next tape file goes; its number, and a notice when
    that replaces or closes what an interrupted write left at the end of data.

    An interrupted write leaves a segment without its end block as the last file: closed by a
    filemark (st writes one when a killed program's descriptor is closed) or not (a killed
    VirtualTape writer; a torn last record reads as the end of data). It holds no restorable
    image, so the next image overwrites it from its start and takes its number; an empty last
    file (a write that failed at once) likewise. A last file that has its end block but no
    filemark is complete: the filemark is written. Only TapeDrive operations are used, so a
    real drive and a virtual tape behave the same."""
    drive.seek_end_of_data()
    files = drive.status().file_number
    if files < 0:
        raise TapeMediaError(f"{drive.path}: the drive does not report a file number at end of data")
    try:
        drive.backward_space_records(1)
        closed = False  # a block ends the data: the last file has no filemark
    except TapeError as e:
        if e.errno != errno.EIO:
            raise TapeMediaError(str(e)) from None
        closed = True  # the filemark closing the last file stopped it
    last = files if not closed else files - 1
    if last >= 1:
        drive.skip_to_file(last)
        info = _read_file_info(drive, last)
        if info is None or info.incomplete:
            drive.skip_to_file(last)
            what = ("nothing (an empty file)" if info is None else
                    f"segment {info.segment} of image {info.image_id[:12]} without its end block")
            return last, (f"{drive.path}: tape file {last} holds {what}, left by an interrupted write; "
                          f"the new image replaces it")
    drive.seek_end_of_data()
    if closed:
        return files, None
    try:
        drive.write_filemarks(1)
    except TapeError as e:
        raise TapeMediaError(_tape_write_problem(e)) from None
    what = "the label" if last == 0 else f"tape file {last}"
    return files + 1, f"{drive.path}: {what} had no closing filemark (an interrupted write); it is written now"


class CartridgeFull(TapeMediaError):
    pass


@dataclass
class WrittenSegment:
    label: str
    tape_set: str
    sequence: int
    tape_file: int
    stream_offset: int
    stream_length: int


class TapeSink:
    """An image sink that writes the stream as one tape file per cartridge it touches.

    `write()` hands frames to a writer thread through a bounded queue, so the drive keeps
    streaming while the engine compresses in bursts. The caller commits or aborts.
    """

    def __init__(self, spec: TapeSpec, *, image_id: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 expect_label: str | None = None, drive_compression: bool = False,
                 buffer_bytes: int = 64 << 20, largest_frame: int = 0,
                 on_notice: Callable[[str], None] | None = None):
        if block_size <= 0 or block_size % 512:
            raise UsageError(f"tape block size {block_size} must be a positive multiple of 512")
        zone = spec.early_warning_zone
        # At the warning: the rest of the frame, the block it ends in, the end block, a filemark.
        if zone is not None and zone < largest_frame + block_size + (64 << 10):
            raise UsageError(f"--tape-capacity {spec.capacity} is too small: its early-warning zone of "
                             f"{zone} bytes cannot hold the rest of a {largest_frame}-byte chunk when a "
                             f"cartridge fills (use a larger capacity or a smaller --chunk-size)")
        self.spec = spec
        self.image_id = image_id
        self.block_size = block_size
        self.drive_compression = drive_compression
        self.path = spec.spec
        self.segments: list[WrittenSegment] = []
        self.labelled: list[Label] = []
        self.bytes_written = 0
        self._notice = on_notice or (lambda message: None)
        self._drive, self._label, tape_file = self._first_cartridge(expect_label)
        self._pending = bytearray()
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, buffer_bytes // block_size))
        self._error: BaseException | None = None
        self._ending = False
        try:
            self._start_segment(tape_file)
        except BaseException:
            self._drive.close()
            raise
        self._thread = threading.Thread(target=self._writer, name="imager-tape", daemon=True)
        self._thread.start()

    # -- cartridge handling (writer side) --
    def _first_cartridge(self, expect_label: str | None) -> tuple[TapeDrive, Label, int]:
        """The drive with the cartridge the image starts on, its label, and the tape file the
        image goes to, where the tape now stands."""
        sequence = 1
        if self.spec.is_pattern:
            # A set of virtual cartridges: append to the last one that exists.
            while os.path.exists(self.spec.path_for(sequence + 1)):
                sequence += 1
        path = self.spec.path_for(sequence)
        # Only the first cartridge of a virtual set is made (and labelled) by a backup; a single
        # virtual tape is made by `imager tape label`.
        creating = self.spec.is_pattern and not self.spec.is_real_drive and not os.path.exists(path)
        if not self.spec.is_real_drive and not self.spec.is_pattern and not os.path.exists(path):
            raise TapeMediaError(f"{path}: no such virtual tape; a tape is labelled before its first backup "
                                 f"(imager tape label NAME --tape {path})")
        drive = self.spec.open(sequence, create=creating)
        try:
            label = read_label(drive)
            if label is None and self.spec.is_pattern and sequence == 1 and _is_blank(drive):
                label = write_label(drive, _member_label(self.spec, 1), block_size=self.block_size)
                self.labelled.append(label)
            elif label is None:
                raise TapeMediaError(f"{drive.path}: tape is not labelled (label it with: imager tape label NAME)")
            if expect_label is not None and label.label != expect_label:
                raise TapeMediaError(f"{drive.path}: wrong tape: it is labelled {label.label!r}, expected {expect_label!r}")
            drive.set_block_size(0)
            drive.set_compression(self.drive_compression)
            tape_file = self._position_for_append(drive)
        except BaseException:
            drive.close()
            if creating:
                os.unlink(path)
            raise
        return drive, label, tape_file

    def _position_for_append(self, drive: TapeDrive) -> int:
        tape_file, notice = position_for_append(drive)
        if notice:
            self._notice(notice)
        return tape_file

    def _start_segment(self, tape_file: int) -> None:
        self._segment = WrittenSegment(self._label.label, self._label.tape_set, self._label.sequence,
                                       tape_file, self.bytes_written, 0)
        self._write_block(_meta_block(SEGMENT_MAGIC, SEGMENT_TAG, {
            "image_id": self.image_id, "label": self._label.label, "tape_set": self._label.tape_set,
            "sequence": self._label.sequence, "segment": len(self.segments), "tape_file": tape_file,
            "stream_offset": self.bytes_written, "block_size": self.block_size}))

    def _write_block(self, data) -> None:
        """One block; past the early-warning mark st fails every other write with ENOSPC, and
        the write after such a failure is allowed: retry once, then it is the physical end."""
        for attempt in (0, 1):
            try:
                self._drive.write_block(data)
                return
            except TapeError as e:
                if e.errno != errno.ENOSPC:
                    raise TapeMediaError(_tape_write_problem(e)) from None
                if attempt:
                    raise CartridgeFull(
                        f"{self._drive.path}: cartridge {self._label.label!r} reached its physical end "
                        f"before the image segment could be closed (early-warning zone too small)") from None
                self._ending = True

    def _end_segment(self, continued: bool, record: dict | None) -> None:
        seg = self._segment
        seg.stream_length = self.bytes_written - seg.stream_offset
        self._write_block(_meta_block(END_MAGIC, END_TAG, {
            "image_id": self.image_id, "segment": len(self.segments), "stream_offset": seg.stream_offset,
            "stream_length": seg.stream_length, "continued": continued, "image": record}))
        try:
            self._drive.write_filemarks(1)
        except TapeError as e:
            raise TapeMediaError(_tape_write_problem(e)) from None
        self.segments.append(seg)

    def _switch_cartridge(self) -> None:
        self._end_segment(True, None)
        sequence = self._label.sequence + 1
        drive = self.spec.next_cartridge(self._drive, sequence)
        self._drive = drive
        label = read_label(drive)
        if label is None:
            if not _is_blank(drive):
                raise TapeMediaError(f"{drive.path}: cartridge {sequence} holds data that is not imager's; "
                                     f"it is not overwritten")
            label = write_label(drive, _member_label(self.spec, sequence, self._label),
                                tape_set=self._label.tape_set, sequence=sequence, block_size=self.block_size)
            self.labelled.append(label)
        elif label.tape_set != self._label.tape_set or label.sequence != sequence:
            raise TapeMediaError(f"{drive.path}: wrong cartridge: {label.label!r} is cartridge {label.sequence} "
                                 f"of another set; expected cartridge {sequence} of set {self._label.tape_set[:12]}")
        drive.set_block_size(0)
        drive.set_compression(self.drive_compression)
        tape_file = self._position_for_append(drive)
        if tape_file != 1:
            raise TapeMediaError(f"{drive.path}: cartridge {label.label!r} already holds images; a spanned "
                                 f"image continues only on a blank cartridge")
        self._label = label
        self._ending = False
        self._start_segment(tape_file)

    # -- the stream --
    def write(self, frame: bytes) -> None:
        """Queue one whole zstd frame of the image stream (frame boundaries matter for spanning)."""
        if self._error is not None:
            raise self._error
        self._put(frame)

    def _put(self, item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._error is not None:
                    raise self._error

    def _writer(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, tuple):  # ("finish", record)
                    self._flush_pending()
                    self._end_segment(False, item[1])
                    return
                self._append_frame(item)
        except BaseException as e:
            self._error = e if isinstance(e, ImagerError) else TapeMediaError(f"tape write failed: {e}")
            # Keep the producer from blocking on a full queue.
            while True:
                try:
                    if self._queue.get_nowait() is None:
                        break
                except queue.Empty:
                    break

    def _append_frame(self, frame: bytes) -> None:
        view = memoryview(frame)
        bs = self.block_size
        if self._pending:
            take = min(bs - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == bs:
                self._write_block(self._pending)
                self._pending = bytearray()
        whole = len(view) - len(view) % bs
        for start in range(0, whole, bs):
            self._write_block(view[start:start + bs])
        self._pending += view[whole:]
        self.bytes_written += len(frame)
        if self._ending:
            self._flush_pending()
            self._switch_cartridge()

    def _flush_pending(self) -> None:
        if self._pending:
            self._write_block(self._pending)
            self._pending = bytearray()

    def commit(self, record: dict | None = None) -> None:
        """Close the image's last segment with the image record; waits for the drive."""
        if self._error is None:
            self._put(("finish", record))
        self._thread.join()
        self._drive.close()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()
        try:
            self._drive.close()
        except DeviceError:
            pass


def _member_label(spec: TapeSpec, sequence: int, first: Label | None = None) -> str:
    """The label a new cartridge of a set gets: a virtual cartridge's file name, or the first
    cartridge's label with the sequence number for a real drive."""
    if spec.is_pattern:
        return os.path.splitext(os.path.basename(spec.path_for(sequence)))[0][:64]
    return f"{first.label[:58]}+{sequence}" if first else f"imager+{sequence}"


# --- reading -----------------------------------------------------------------------------------

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
        return dict(asdict(self), incomplete=self.incomplete)


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


class TapeImageStream:
    """The image byte stream of one image, read from its tape file(s) as a file-like object,
    asking for the next cartridge where the image continues.

    A file's last block is its end block: each block is held until the next read shows whether
    a filemark (or the end of data) follows it."""

    def __init__(self, spec: TapeSpec, drive: TapeDrive, label: Label, tape_file: int, image_id: str,
                 block_size: int | None = None):
        self.spec = spec
        self.drive = drive
        self.label = label
        self.image_id = image_id
        self.read_size = block_size
        self._buffer = memoryview(b"")
        self._segment = 0
        self._stream_offset = 0
        self._done = False
        self._held: bytes | None = None
        self._at_end_of_data = False
        self.end: dict | None = None
        self._open_segment(tape_file)

    def _where(self) -> str:
        return f"{self.drive.path}: tape file {self._tape_file} of {self.label.label!r}"

    def _read_block(self, size: int) -> bytes | None:
        """The next block of the current file; None where the file ends (a filemark, or the
        end of data)."""
        try:
            return self.drive.read_block(size) or None
        except TapeError as e:
            if e.errno == errno.ENOMEM:
                raise TapeMediaError(f"{self.drive.path}: a tape block is larger than the read block size "
                                     f"{size}; the image was written with larger blocks "
                                     f"(give --block-size of at least the size it was written with)") from None
            if e.errno == errno.EIO:
                self._at_end_of_data = True
                return None
            raise TapeMediaError(str(e)) from None

    def _open_segment(self, tape_file: int) -> None:
        self._tape_file = tape_file
        self._at_end_of_data = False
        try:
            self.drive.skip_to_file(tape_file)
        except TapeError as e:
            raise TapeMediaError(f"{self._where()} cannot be reached ({e})") from None
        first = self._read_block(self.read_size or METADATA_READ_SIZE)
        try:
            header = _parse_meta_block(first, SEGMENT_MAGIC, SEGMENT_TAG) if first else None
        except DamagedBlock as e:
            raise TapeMediaError(f"{self._where()}: its segment header {e}; it is not trusted") from None
        if header is None:
            raise TapeMediaError(f"{self._where()} is not an imager image")
        if header["image_id"] != self.image_id or header["segment"] != self._segment:
            raise TapeMediaError(f"{self.drive.path}: tape file {tape_file} of {self.label.label!r} holds segment "
                                 f"{header['segment']} of image {header['image_id'][:12]}, expected segment "
                                 f"{self._segment} of image {self.image_id[:12]}")
        if header["stream_offset"] != self._stream_offset:
            raise TapeMediaError(f"{self.drive.path}: segment {self._segment} starts at stream offset "
                                 f"{header['stream_offset']}, expected {self._stream_offset}")
        if self.read_size is None:
            self.read_size = header["block_size"]
        self._held = self._read_block(self.read_size)

    def _next_block(self) -> bool:
        block = self._held
        if block is None:
            raise self._unfinished()
        self._held = self._read_block(self.read_size)
        if self._held is None:
            return self._end_segment(block)
        self._buffer = memoryview(block)
        self._stream_offset += len(block)
        return True

    def _unfinished(self) -> TapeMediaError:
        if self._at_end_of_data:
            return TapeMediaError(f"{self.drive.path}: the tape ends in the middle of image {self.image_id[:12]} "
                                  f"(cartridge {self.label.label!r}, after stream offset {self._stream_offset})")
        return TapeMediaError(f"{self._where()} ends without its end block in image {self.image_id[:12]} "
                              f"(damaged or interrupted write)")

    def _end_segment(self, block: bytes) -> bool:
        """`block` is the last of the segment's file: its end block. False when the image ends."""
        try:
            end = _parse_meta_block(block, END_MAGIC, END_TAG)
        except DamagedBlock as e:
            raise TapeMediaError(f"{self._where()} (image {self.image_id[:12]}): its end block {e}; "
                                 f"it is not trusted") from None
        if end is None:
            raise self._unfinished()
        if end["image_id"] != self.image_id or end["segment"] != self._segment:
            raise TapeMediaError(f"{self._where()}: the end block belongs to segment {end['segment']} of image "
                                 f"{end['image_id'][:12]}, not to segment {self._segment} of {self.image_id[:12]}")
        if end["stream_offset"] + end["stream_length"] != self._stream_offset:
            raise TapeMediaError(f"{self.drive.path}: segment {self._segment} of image {self.image_id[:12]} holds "
                                 f"{self._stream_offset - end['stream_offset']} bytes, its end block says "
                                 f"{end['stream_length']} (a record is missing or corrupted)")
        if not end["continued"]:
            self.end = end
            self._done = True
            return False
        self._segment += 1
        sequence = self.label.sequence + 1
        self.drive = self.spec.next_cartridge(self.drive, sequence, create=False)
        label = read_label(self.drive)
        if label is None or label.tape_set != self.label.tape_set or label.sequence != sequence:
            found = "an unlabelled tape" if label is None else f"{label.label!r} (cartridge {label.sequence})"
            raise TapeMediaError(f"{self.drive.path}: image {self.image_id[:12]} continues on cartridge {sequence} "
                                 f"of set {self.label.tape_set[:12]}, but the drive holds {found}")
        self.label = label
        self._open_segment(1)
        return True

    def read(self, n: int = -1) -> bytes:
        parts = []
        want = n if n >= 0 else 1 << 62
        while want > 0:
            if not self._buffer:
                if self._done or not self._next_block():
                    break
            piece = self._buffer[:want]
            self._buffer = self._buffer[len(piece):]
            parts.append(bytes(piece))
            want -= len(piece)
        return b"".join(parts)

    def close(self) -> None:
        self.drive.close()
