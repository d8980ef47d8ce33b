"""Random access to a complete image through its seek table: any range of the volume, any
chunk's frame or checked contents. The image is a byte-range source (a file by default)."""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import struct
import threading
from typing import Iterator

import numpy as np

from devices.libc import cached_pages

from .. import failpoints
from ..errors import ChunkError, ImageFormatError, NotAnImage, UsageError
from .blocks import unpack_bits
from .codec import codec_of, zstd_frame_bound
from .frames import READ_PIECE, RUN_FRAME_SIZE, RUN_MAGIC, decode_run, skippable_payload
from .meta import TRAILER_MAGIC, decode_trailer, read_header, trailer_frame_bound
from .seektable import (SEEK_DESCRIPTOR, SEEK_ENTRY, SEEK_FOOTER_SIZE, SEEK_TABLE_MAGIC, SEEKABLE_FOOTER_MAGIC,
                        FrameNames, seek_table_size)
from .walk import FrameError, TruncatedFrame, garbage_after, iter_frames

log = logging.getLogger("imager.format")

_frames = threading.local()
# O_DIRECT reads are aligned to this (the largest logical block size of common disks).
DIRECT_ALIGN = 4096


class ImageReader:
    """Random access to a complete image file through its seek table.

    `read(offset, length)` returns any range of the volume; `frame(i)` and `chunk(i)` give
    one chunk's frame and checked contents.
    """

    def __init__(self, path: str, *, direct_frames: bool = False):
        """`direct_frames`: read a full image's chunk frames in chunk_into with O_DIRECT, past the
        page cache (a mount: it keeps decoded chunks itself, and a second copy of the image in
        the page cache only pushes the machine's other data out, and cost it a copy per frame as
        dear as hashing it; bench/mount.py). A frame wholly in the page cache already (an image
        just written) is read from there, and where the image's filesystem refuses O_DIRECT every
        frame is."""
        self.path = path
        self.direct_reads = 0       # frames read with O_DIRECT (a rough count: threads share it)
        self._direct_fd: int | None = None      # None once refused: the frames go through the page cache
        self._direct_file: int | None = None    # closed only by close(): another thread may be reading it
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
            if direct_frames and not self.header.incremental:
                self._open_direct()
        except BaseException:
            self._f.close()
            raise

    def _open_direct(self) -> None:
        try:
            failpoints.check("image.direct-open")
            self._direct_fd = self._direct_file = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            log.info("%s: frames read through the page cache (O_DIRECT refused: %s)", self.path, e.strerror)

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._direct_fd = None
        if self._direct_file is not None:
            os.close(self._direct_file)
            self._direct_file = None
        self._f.close()

    def _pread(self, n: int, offset: int) -> bytes:
        # Never ask for more than the file holds: a damaged size must not become an allocation.
        return os.pread(self._f.fileno(), max(0, min(n, self.file_size - offset)), offset)

    def _load(self) -> None:
        self.file_size = os.fstat(self._f.fileno()).st_size
        try:
            self.header, self.header_frame = read_header(self._f)
        except ImageFormatError as e:
            kind = NotAnImage if isinstance(e, NotAnImage) else ImageFormatError
            raise kind(f"{self.path}: {e}") from None
        footer = self._pread(SEEK_FOOTER_SIZE, max(0, self.file_size - SEEK_FOOTER_SIZE))
        if len(footer) < SEEK_FOOTER_SIZE or struct.unpack_from("<I", footer, 5)[0] != SEEKABLE_FOOTER_MAGIC:
            raise self._damage_report("the seek table at the end is missing or damaged")
        count, descriptor = struct.unpack_from("<IB", footer)
        n = self.header.chunk_count
        if (count != n + 2) if not self.header.incremental else not 2 <= count <= 2 * n + 2:
            raise self._damage_report(f"the seek table lists {count} frames, which no image of {n} chunks has")
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
        last = count - 1
        if entries[last][1] != 0 or entries[last][0] > trailer_frame_bound(self.header):
            raise self._damage_report(f"the seek table's entry for the trailer is wrong ({entries[last][0]} bytes)")
        trailer = skippable_payload(memoryview(self._pread(entries[last][0], offsets[last])), TRAILER_MAGIC)
        if trailer is None:
            raise ImageFormatError(f"{self.path}: image trailer missing or corrupted at image offset {offsets[last]}")
        try:
            self.trailer = decode_trailer(trailer, self.header)
        except ImageFormatError as e:
            raise ImageFormatError(f"{self.path}: {e}") from None
        if not self.trailer.complete:
            raise ImageFormatError(f"{self.path}: image is marked incomplete")
        if self.trailer.held is not None:
            self.present = np.flatnonzero(unpack_bits(self.trailer.held, n))
        else:
            self.present = np.arange(n)
        self._map_frames(entries, offsets)

    def _map_frames(self, entries: list[tuple[int, int]], offsets: list[int]) -> None:
        """Each frame the seek table lists is what that frame must be: the header as read, a
        run marker, a chunk of its length, in the order the trailer says; chunk i of the volume
        is `present[k]`, its frame at chunk_offsets[k]."""
        names = FrameNames(self.header, self.present)
        if entries[0] != (len(self.header_frame), 0):
            raise self._damage_report(f"the seek table's entry for the header is wrong ({entries[0][0]} bytes)")
        self.chunk_offsets: list[int] = []
        self.chunk_frame_sizes: list[int] = []
        self.run_offsets: list[int] = []
        bound = zstd_frame_bound(self.header.chunk_size)
        for position in range(1, len(entries) - 1):
            size, decompressed = entries[position]
            k = len(self.chunk_offsets)
            if self.header.incremental and (size, decompressed) == (RUN_FRAME_SIZE, 0):
                self.run_offsets.append(offsets[position])
                continue
            if not (k < len(self.present) and decompressed == self.header.chunk_length(int(self.present[k]))
                    and size <= bound):
                raise self._damage_report(f"the seek table's entry for {names(position, entries)} is wrong "
                                          f"({size} bytes, {decompressed} decompressed)")
            self.chunk_offsets.append(offsets[position])
            self.chunk_frame_sizes.append(size)
        if len(self.chunk_offsets) != len(self.present):
            raise self._damage_report(f"the seek table lists {len(self.chunk_offsets)} chunk frames, the trailer "
                                      f"says the image holds {len(self.present)}")
        self._slot = np.full(self.header.chunk_count, -1, dtype=np.int64)
        self._slot[self.present] = np.arange(len(self.present))

    def _damage_report(self, problem: str) -> ImageFormatError:
        """Walk the frames from the start to say where the image stops being whole: cut short,
        followed by garbage, or whole but for its seek table (of which `problem` says what)."""
        n = self.header.chunk_count
        incremental = self.header.incremental
        chunks = 0
        end = 0
        trailer_seen = table_seen = False
        with os.fdopen(os.dup(self._f.fileno()), "rb", buffering=READ_PIECE) as f:
            f.seek(0)
            try:
                for frame in iter_frames(f, self.header):
                    end = frame.end
                    if frame.magic == TRAILER_MAGIC:
                        trailer_seen = True
                    elif not frame.skippable:
                        chunks += 1
                    elif frame.magic != RUN_MAGIC and (trailer_seen or chunks >= n):
                        table_seen = True  # what is in the seek table's place; the image ends here
                        break
            except TruncatedFrame as e:
                if not incremental and chunks < n:
                    return ImageFormatError(
                        f"{self.path}: image is truncated or corrupted: {problem}; chunk "
                        f"{chunks} of {n} (volume offset {chunks * self.header.chunk_size}) is cut short: {e}")
                return ImageFormatError(f"{self.path}: image is truncated: {problem}; {e}")
            except FrameError as e:
                return ImageFormatError(f"{self.path}: image is corrupted: {problem}; {e}")
        if incremental and not trailer_seen:
            return ImageFormatError(f"{self.path}: image is truncated: {problem}; it ends at image offset {end} "
                                    f"after {chunks} blocks, before its trailer")
        if not incremental and chunks < n:
            return ImageFormatError(
                f"{self.path}: image is truncated: {problem}; it ends after chunk "
                f"{chunks - 1} of {n} at image offset {end} (volume offset {chunks * self.header.chunk_size} "
                f"onward is missing)")
        if end < self.file_size:
            return garbage_after(self.path, self.file_size - end, end)
        if table_seen:
            return ImageFormatError(f"{self.path}: image is corrupted: {problem}")
        return ImageFormatError(f"{self.path}: image is incomplete: {problem} (all {chunks} "
                                f"chunks present, image ends at offset {end})")

    @property
    def chunk_count(self) -> int:
        return self.header.chunk_count

    def holds(self, index: int) -> bool:
        return bool(self._slot[index] >= 0)

    def _where(self, index: int) -> tuple[int, int]:
        slot = int(self._slot[index]) if 0 <= index < self.header.chunk_count else -1
        if slot < 0:
            raise ImageFormatError(f"{self.path}: chunk {index} is not in this incremental image; its chain holds it")
        return self.chunk_offsets[slot], self.chunk_frame_sizes[slot]

    def frame(self, index: int) -> bytes:
        offset, size = self._where(index)
        data = self._pread(size, offset)
        if len(data) != size:
            raise ChunkError(index, offset, index * self.header.chunk_size, "image truncated")
        return data

    def decode(self, index: int, frame: bytes) -> bytes | None:
        """Check and decompress chunk `index` from its frame; None for a zero chunk."""
        return codec_of(self.header).decode(frame, index, self.header.chunk_length(index), self.trailer.digest(index),
                                            self._where(index)[0], index * self.header.chunk_size)

    def chunk_into(self, index: int, dst: memoryview) -> bool:
        """Chunk `index`, checked, decompressed into `dst` (its length), its frame read into a
        buffer this thread reuses: False for a zero chunk, `dst` then untouched."""
        offset, size = self._where(index)
        bound = zstd_frame_bound(self.header.chunk_size)
        frame: bytes | memoryview | None = None
        if size > bound:
            frame = self.frame(index)     # damaged: decode_into names it
        elif self._direct_fd is not None:
            frame = self._read_direct(index, offset, size, bound)
        if frame is None:
            buffer = getattr(_frames, "buffer", None)
            if buffer is None or len(buffer) < size:
                buffer = _frames.buffer = bytearray(bound)
            frame = memoryview(buffer)[:size]
            if os.preadv(self._f.fileno(), [frame], offset) != size:
                raise ChunkError(index, offset, index * self.header.chunk_size, "image truncated")
        return codec_of(self.header).decode_into(frame, dst, index, self.trailer.digest(index), offset,
                                                 index * self.header.chunk_size)

    def _read_direct(self, index: int, offset: int, size: int, bound: int) -> memoryview | None:
        """The frame at [offset, offset + size), read with O_DIRECT into a page-aligned buffer
        this thread reuses; None when the page cache holds the whole frame already, or when the
        kernel refuses the read's alignment (then every frame goes through the page cache from
        here on)."""
        pages = (offset + size - 1) // mmap.PAGESIZE - offset // mmap.PAGESIZE + 1
        cached = cached_pages(self._f.fileno(), offset, size)
        if cached is not None and cached >= pages:
            return None
        start = offset - offset % DIRECT_ALIGN
        span = -(-(offset + size - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        buffer = getattr(_frames, "aligned", None)
        if buffer is None or len(buffer) < span:
            buffer = _frames.aligned = mmap.mmap(-1, -(-(bound + 2 * DIRECT_ALIGN) // mmap.PAGESIZE) * mmap.PAGESIZE)
        view = memoryview(buffer)
        fd = self._direct_fd
        try:
            if fd is None:
                return None
            failpoints.check("image.direct-read", offset, size)
            got = os.preadv(fd, [view[:span]], start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.info("%s: frames read through the page cache (an O_DIRECT read refused: %s)", self.path, e.strerror)
            self._direct_fd = None
            return None
        if got < offset - start + size:
            raise ChunkError(index, offset, index * self.header.chunk_size, "image truncated")
        self.direct_reads += 1
        return view[offset - start:offset - start + size]

    def chunk(self, index: int) -> bytes:
        data = self.decode(index, self.frame(index))
        return bytes(self.header.chunk_length(index)) if data is None else data

    def frames_in_order(self) -> Iterator[tuple[int | None, bytes, int]]:
        """Every frame between header and trailer as written: (chunk index or None for a run
        marker, frame, image offset); run markers are checked against the trailer's map."""
        runs = iter(self.run_offsets)
        next_run = next(runs, None)
        expected: list[int] = []
        for k, offset in enumerate(self.chunk_offsets):
            while next_run is not None and next_run < offset:
                marker = self._pread(RUN_FRAME_SIZE, next_run)
                run = decode_run(marker)
                if run is None or run[0] != int(self.present[k]) or not np.array_equal(
                        self.present[k:k + run[1]], np.arange(run[0], run[0] + run[1])):
                    raise ImageFormatError(f"{self.path}: the run marker at image offset {next_run} is corrupted "
                                           f"(it does not match the blocks the trailer lists)")
                expected = list(range(run[0], run[0] + run[1]))
                yield None, marker, next_run
                next_run = next(runs, None)
            index = int(self.present[k])
            if self.header.incremental:
                if not expected or expected.pop(0) != index:
                    raise ImageFormatError(f"{self.path}: block {index} at image offset {offset} is not in a run "
                                           f"marker's range (image corrupted)")
            yield index, self.frame(index), offset
        if next_run is not None:
            raise ImageFormatError(f"{self.path}: a run marker at image offset {next_run} without blocks (image corrupted)")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the volume, clipped to the volume's end."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        end = min(offset + length, self.header.volume_size)
        cs = self.header.chunk_size
        if self.header.incremental and end > offset:
            missing = [i for i in range(offset // cs, -(-end // cs)) if not self.holds(i)]
            if missing:
                raise ImageFormatError(f"{self.path}: an incremental image; blocks {missing[0]}.. of the range are "
                                       f"in its parents (read the chain)")
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

