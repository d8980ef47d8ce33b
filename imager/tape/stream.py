"""Reading one image back from tape: its tape file(s) as a file-like byte stream, asking for the
next cartridge where the image continues."""

from __future__ import annotations

import errno

from devices.tape.drive import TapeDrive, TapeError

from ..errors import TapeMediaError
from .blocks import END_MAGIC, END_TAG, METADATA_READ_SIZE, SEGMENT_MAGIC, SEGMENT_TAG, DamagedBlock, _parse_meta_block
from .labels import Label, read_label
from .spec import TapeSpec, _member_label


def segment_header(drive: TapeDrive, tape_file: int, read_size: int | None = None) -> dict:
    """The checked segment header of tape file `tape_file` (the tape is left after it)."""
    try:
        drive.skip_to_file(tape_file)
        first = drive.read_block(read_size or METADATA_READ_SIZE)
    except TapeError as e:
        if e.errno == errno.EIO:
            raise TapeMediaError(f"{drive.path}: there is no tape file {tape_file} (the recorded data ends "
                                 f"before it)") from None
        raise TapeMediaError(f"{drive.path}: tape file {tape_file} cannot be read ({e})") from None
    if not first:
        raise TapeMediaError(f"{drive.path}: there is no tape file {tape_file} (the recorded data ends before it)")
    try:
        header = _parse_meta_block(first, SEGMENT_MAGIC, SEGMENT_TAG)
    except DamagedBlock as e:
        raise TapeMediaError(f"{drive.path}: tape file {tape_file}: its segment header {e}; it is not trusted") \
            from None
    if header is None:
        raise TapeMediaError(f"{drive.path}: tape file {tape_file} is not an imager image")
    return header


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
        self.drive = self.spec.next_cartridge(self.drive, sequence, create=False,
                                              label=_member_label(self.spec, sequence, self.label))
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
