"""Random access to a complete image through its seek table: any range of the volume, any
chunk's frame or checked contents. The image is a byte-range source (a file by default)."""

from __future__ import annotations

import itertools
import os
import struct

from ..errors import ChunkError, ImageFormatError, UsageError
from .codec import codec_of, zstd_frame_bound
from .frames import READ_PIECE, skippable_payload
from .meta import TRAILER_MAGIC, decode_trailer, read_header, trailer_frame_bound
from .seektable import (SEEK_DESCRIPTOR, SEEK_ENTRY, SEEK_FOOTER_SIZE, SEEK_TABLE_MAGIC, SEEKABLE_FOOTER_MAGIC,
                        frame_name, seek_table_size)
from .walk import FrameError, TruncatedFrame, garbage_after, iter_frames


class ImageReader:
    """Random access to a complete image file through its seek table.

    `read(offset, length)` returns any range of the volume; `frame(i)` and `chunk(i)` give
    one chunk's frame and checked contents.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such image file") from None
        except IsADirectoryError:
            raise UsageError(f"{path}: is a directory, not an image") from None
        except OSError as e:
            raise ImageFormatError(f"{path}: {e.strerror}") from None
        try:
            self._load()
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _pread(self, n: int, offset: int) -> bytes:
        # Never ask for more than the file holds: a damaged size must not become an allocation.
        return os.pread(self._f.fileno(), max(0, min(n, self.file_size - offset)), offset)

    def _load(self) -> None:
        self.file_size = os.fstat(self._f.fileno()).st_size
        try:
            self.header, self.header_frame = read_header(self._f)
        except ImageFormatError as e:
            raise ImageFormatError(f"{self.path}: {e}") from None
        n = self.header.chunk_count
        footer = self._pread(SEEK_FOOTER_SIZE, max(0, self.file_size - SEEK_FOOTER_SIZE))
        if len(footer) < SEEK_FOOTER_SIZE or struct.unpack_from("<I", footer, 5)[0] != SEEKABLE_FOOTER_MAGIC:
            raise self._damage_report("the seek table at the end is missing or damaged")
        count, descriptor = struct.unpack_from("<IB", footer)
        if count != n + 2:
            raise self._damage_report(f"the seek table lists {count} frames, expected {n + 2} for {n} chunks")
        if descriptor != SEEK_DESCRIPTOR:
            raise self._damage_report(f"the seek table's descriptor is {descriptor:#04x}, imager writes {SEEK_DESCRIPTOR}")
        table_start = self.file_size - seek_table_size(count)
        table = self._pread(seek_table_size(count), table_start) if table_start >= 0 else b""
        if skippable_payload(table, SEEK_TABLE_MAGIC) is None:
            raise self._damage_report("the seek table's frame header is not where its footer puts it")
        entries = [SEEK_ENTRY.unpack_from(table, 8 + i * SEEK_ENTRY.size) for i in range(count)]
        offsets = list(itertools.accumulate((size for size, _ in entries), initial=0))
        if offsets[-1] != table_start:
            raise self._damage_report(f"the seek table describes {offsets[-1]} bytes of frames but the image holds {table_start}")
        self._check_entries(entries)
        self.chunk_offsets = offsets[1:n + 1]
        self.chunk_frame_sizes = [size for size, _ in entries[1:n + 1]]
        trailer = skippable_payload(self._pread(entries[n + 1][0], offsets[n + 1]), TRAILER_MAGIC)
        if trailer is None:
            raise ImageFormatError(f"{self.path}: image trailer missing or corrupted at image offset {offsets[n + 1]}")
        try:
            self.trailer = decode_trailer(trailer, self.header)
        except ImageFormatError as e:
            raise ImageFormatError(f"{self.path}: {e}") from None
        if not self.trailer.complete:
            raise ImageFormatError(f"{self.path}: image is marked incomplete")

    def _check_entries(self, entries: list[tuple[int, int]]) -> None:
        """Each frame the seek table lists is what that frame must be: the header as read, a
        chunk of its length, a trailer no larger than this image's can be."""
        n = self.header.chunk_count
        for i, (size, decompressed) in enumerate(entries):
            if i == 0:
                ok = (size, decompressed) == (len(self.header_frame), 0)
            elif i == n + 1:
                ok = decompressed == 0 and size <= trailer_frame_bound(n)
            else:
                ok = (decompressed == self.header.chunk_length(i - 1)
                      and size <= zstd_frame_bound(self.header.chunk_size))
            if not ok:
                raise self._damage_report(f"the seek table's entry for {frame_name(i, n)} is wrong "
                                          f"({size} bytes, {decompressed} decompressed)")

    def _damage_report(self, problem: str) -> ImageFormatError:
        """Walk the frames from the start to say where the image stops being whole: cut short,
        followed by garbage, or whole but for its seek table (of which `problem` says what)."""
        n = self.header.chunk_count
        chunks = 0
        end = 0
        table_seen = False
        with os.fdopen(os.dup(self._f.fileno()), "rb", buffering=READ_PIECE) as f:
            f.seek(0)
            try:
                for frame in iter_frames(f, self.header):
                    end = frame.end
                    if not frame.skippable:
                        chunks += 1
                    elif chunks >= n and frame.magic != TRAILER_MAGIC:
                        table_seen = True  # what is in the seek table's place; the image ends here
                        break
            except TruncatedFrame as e:
                if chunks < n:
                    return ImageFormatError(
                        f"{self.path}: image is truncated or corrupted: {problem}; chunk "
                        f"{chunks} of {n} (volume offset {chunks * self.header.chunk_size}) is cut short: {e}")
                return ImageFormatError(f"{self.path}: image is truncated: {problem}; {e}")
            except FrameError as e:
                return ImageFormatError(f"{self.path}: image is corrupted: {problem}; {e}")
        if chunks < n:
            return ImageFormatError(
                f"{self.path}: image is truncated: {problem}; it ends after chunk "
                f"{chunks - 1} of {n} at image offset {end} (volume offset {chunks * self.header.chunk_size} "
                f"onward is missing)")
        if end < self.file_size:
            return garbage_after(self.path, self.file_size - end, end)
        if table_seen:
            return ImageFormatError(f"{self.path}: image is corrupted: {problem}")
        return ImageFormatError(f"{self.path}: image is incomplete: {problem} (all {n} "
                                f"chunks present, image ends at offset {end})")

    @property
    def chunk_count(self) -> int:
        return self.header.chunk_count

    def frame(self, index: int) -> bytes:
        size = self.chunk_frame_sizes[index]
        data = self._pread(size, self.chunk_offsets[index])
        if len(data) != size:
            raise ChunkError(index, self.chunk_offsets[index], index * self.header.chunk_size, "image truncated")
        return data

    def decode(self, index: int, frame: bytes) -> bytes | None:
        """Check and decompress chunk `index` from its frame; None for a zero chunk."""
        return codec_of(self.header).decode(frame, index, self.header.chunk_length(index), self.trailer.digest(index),
                                            self.chunk_offsets[index], index * self.header.chunk_size)

    def chunk(self, index: int) -> bytes:
        data = self.decode(index, self.frame(index))
        return bytes(self.header.chunk_length(index)) if data is None else data

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the volume, clipped to the volume's end."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        end = min(offset + length, self.header.volume_size)
        cs = self.header.chunk_size
        parts = []
        pos = offset
        while pos < end:
            i = pos // cs
            data = self.chunk(i)
            start = pos - i * cs
            piece = data[start:start + (end - pos)]
            parts.append(piece)
            pos += len(piece)
        return b"".join(parts)

