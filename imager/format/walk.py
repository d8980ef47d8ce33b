"""Walking an image's frames front to back without its seek table: for pipes and tape, and to
say where a damaged file stops being whole. Every size a frame claims is bounded by what this
image can need before anything that large is read."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from ..errors import ImageFormatError
from .codec import zstd_frame_bound
from .frames import READ_PIECE, SKIPPABLE_BASE, SKIPPABLE_MASK, ZSTD_MAGIC, Readable, read_exact, zstd_block_header
from .meta import MAX_HEADER_PAYLOAD, ImageHeader, trailer_frame_bound


def count_rest(f: Readable) -> int:
    """How many bytes are left in a stream (read and dropped)."""
    total = 0
    while piece := f.read(READ_PIECE):
        total += len(piece)
    return total


def garbage_after(name: str, count: int, offset: int) -> ImageFormatError:
    return ImageFormatError(f"{name}: {count} bytes of garbage after the end of the image (offset {offset})")


@dataclass
class Frame:
    offset: int
    magic: int
    data: bytes  # the whole frame, header included

    @property
    def skippable(self) -> bool:
        return self.magic & SKIPPABLE_MASK == SKIPPABLE_BASE

    @property
    def payload(self) -> bytes:
        return self.data[8:] if self.skippable else self.data

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


class FrameError(ImageFormatError):
    """A frame of a stream is damaged where it starts at `offset`."""

    def __init__(self, offset: int, what: str):
        self.offset = offset
        super().__init__(f"{what} at image offset {offset}")


class TruncatedFrame(FrameError):
    """The stream ends inside the frame that starts at `offset`."""


# The largest block a zstd frame may hold (Block_Maximum_Size in RFC 8878).
ZSTD_MAX_BLOCK = 128 << 10


def iter_frames(f: Readable, header: ImageHeader, start_offset: int = 0) -> Iterator[Frame]:
    """Walk the frames of an image's stream one after another without a seek table (for pipes
    and tape, and to locate damage when the seek table is gone). No frame is read beyond the
    largest an image of this header can hold."""
    largest_metadata = max(8 + MAX_HEADER_PAYLOAD, trailer_frame_bound(header))
    largest_chunk = zstd_frame_bound(header.chunk_size)
    offset = start_offset
    while True:
        head = read_exact(f, 4)
        if not head:
            return
        if len(head) < 4:
            raise TruncatedFrame(offset, "stream ends inside a frame header")
        (magic,) = struct.unpack("<I", head)
        if magic & SKIPPABLE_MASK == SKIPPABLE_BASE:
            size_raw = read_exact(f, 4)
            if len(size_raw) < 4:
                raise TruncatedFrame(offset, "stream ends inside a skippable frame header")
            (size,) = struct.unpack("<I", size_raw)
            if 8 + size > largest_metadata:
                raise FrameError(offset, f"corrupted metadata frame (it claims {size} bytes)")
            payload = read_exact(f, size)
            if len(payload) < size:
                raise TruncatedFrame(offset, "stream ends inside a metadata frame")
            data = head + size_raw + payload
        elif magic == ZSTD_MAGIC:
            data = head + _read_zstd_frame_body(f, offset, largest_chunk - 4)
        else:
            raise FrameError(offset, f"not a zstd frame (magic {magic:#010x})")
        yield Frame(offset, magic, data)
        offset += len(data)


def _read_zstd_frame_body(f: Readable, offset: int, limit: int) -> bytes:
    parts = []
    fhd_raw = read_exact(f, 1)
    if not fhd_raw:
        raise TruncatedFrame(offset, "stream ends inside a zstd frame header")
    fhd = fhd_raw[0]
    fcs_flag, single_segment, checksum_flag, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    rest = (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag] + fcs_size
    hdr = read_exact(f, rest)
    if len(hdr) < rest:
        raise TruncatedFrame(offset, "stream ends inside a zstd frame header")
    parts += [fhd_raw, hdr]
    length = 1 + rest
    while True:
        bh = read_exact(f, 3)
        if len(bh) < 3:
            raise TruncatedFrame(offset, "stream ends inside a chunk (zstd frame cut short)")
        last, block_type, size, body_len = zstd_block_header(bh)
        if block_type == 3:
            raise FrameError(offset, "corrupted zstd frame (reserved block type)")
        length += 3 + body_len
        if size > ZSTD_MAX_BLOCK or length > limit:
            raise FrameError(offset, "corrupted zstd frame (longer than any chunk frame)")
        body = read_exact(f, body_len)
        if len(body) < body_len:
            raise TruncatedFrame(offset, "stream ends inside a chunk (zstd frame cut short)")
        parts += [bh, body]
        if last:
            break
    if checksum_flag:
        cs = read_exact(f, 4)
        if len(cs) < 4:
            raise TruncatedFrame(offset, "stream ends inside a chunk checksum")
        parts.append(cs)
    return b"".join(parts)
