"""Where a restore, verify or info reads an image from: a Feed gives the header, the chunk
frames in order, the digests to check them against, and the trailer once every chunk was read.

- SeekableFeed: an image file, through its seek table; the digests are known up front.
- StreamFeed: a pipe (standard input) or a tape: frames front to back, the trailer last.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from ..errors import ChunkError, ImageFormatError
from ..format.frames import Readable
from ..format import (RUN_MAGIC, TRAILER_MAGIC, ZSTD_MAGIC, Frame, FrameError, FrameLog, FrameNames, ImageHeader,
                      ImageReader, ImageTrailer, TruncatedFrame, count_rest, decode_run, decode_trailer, garbage_after,
                      iter_frames, read_header, seek_table_mismatch, unpack_bits)


class Feed(Protocol):
    """An image read front to back. `chunks()` yields (index, frame, image offset) in order;
    `finish()` returns the trailer after the last chunk, raising if the image is incomplete or
    damaged; `skip_stream_digest()` (before chunks()) leaves the stream digest unchecked."""

    name: str
    header: ImageHeader

    def chunks(self) -> Iterator[tuple[int, bytes, int]]: ...
    def expected_digest(self, index: int) -> bytes | None: ...
    def skip_stream_digest(self) -> None: ...
    def finish(self) -> ImageTrailer: ...
    def close(self) -> None: ...


class SeekableFeed:
    """Chunks of an image file, read through its seek table; digests are known up front."""

    def __init__(self, reader: ImageReader):
        self.reader = reader
        self.header = reader.header
        self.name = self.path = reader.path
        self._log = FrameLog()

    def chunks(self) -> Iterator[tuple[int, bytes, int]]:
        self._log.add(self.reader.header_frame, 0)
        for index, frame, offset in self.reader.frames_in_order():
            if index is None:
                self._log.add(frame, 0)          # a run marker of an incremental
                continue
            self._log.add(frame, self.header.chunk_length(index))
            yield index, frame, offset

    def expected_digest(self, index: int) -> bytes | None:
        return self.reader.trailer.digest(index)

    def skip_stream_digest(self) -> None:
        self._log.stop_hashing()

    def close(self) -> None:
        pass  # the reader belongs to whoever opened it

    def finish(self) -> ImageTrailer:
        """The trailer, once every chunk was read: what was read must be what was written."""
        self.reader.trailer.check_stream_digest(self._log.digest(), self.name)
        return self.reader.trailer


class StreamFeed:
    """Chunks of an image read front to back from a pipe or tape: the trailer with the
    digests comes last, so every chunk is checked against it when the stream ends. The frames
    must come exactly as a writer emits them: header, chunks, trailer, seek table, nothing more."""

    def __init__(self, stream: Readable, name: str):
        self.name = name
        self._stream = stream
        try:
            self.header, header_frame = read_header(stream)
        except ImageFormatError as e:
            raise ImageFormatError(f"{name}: {e}") from None
        self._frames = iter_frames(stream, self.header, len(header_frame))
        self._log = FrameLog()
        self._log.add(header_frame, 0)
        self._trailer: ImageTrailer | None = None
        self._stream_digest: str | None = ""
        self._ended = False
        self._seen: list[int] = []          # the chunks read, in order
        self._run: list[int] = []           # the blocks the current run marker still announces
        self.stream_bytes = len(header_frame)

    def chunks(self) -> Iterator[tuple[int, bytes, int]]:
        try:
            for frame in self._frames:
                self.stream_bytes = frame.end
                if self._trailer is not None:
                    if frame.magic == ZSTD_MAGIC:
                        raise ImageFormatError(f"{self.name}: more chunks than the header's {self.header.chunk_count} "
                                               f"(image corrupted)")
                    self._read_seek_table(frame)
                    return
                index = self._place(frame)
                if index is not None:
                    self._log.add(frame.data, self.header.chunk_length(index))
                    self._seen.append(index)
                    yield index, frame.data, frame.offset
        except TruncatedFrame as e:
            if self._trailer is None:
                index = self._next_index()
                raise ChunkError(index, e.offset, index * self.header.chunk_size,
                                 f"image stream cut short: {e}") from None
            raise ImageFormatError(f"{self.name}: image stream cut short after its last chunk: {e}") from None
        except FrameError as e:
            if self._trailer is None:
                index = self._next_index()
                raise ChunkError(index, e.offset, index * self.header.chunk_size, str(e)) from None
            raise ImageFormatError(f"{self.name}: image stream corrupted after its last chunk: {e}") from None

    def _next_index(self) -> int:
        if self.header.incremental:
            return self._run[0] if self._run else (self._seen[-1] + 1 if self._seen else 0)
        return len(self._seen)

    def _place(self, frame: Frame) -> int | None:
        """Which chunk a frame before the trailer is (None: a run marker, or the trailer, read)."""
        n = self.header.chunk_count
        index = self._next_index()
        if frame.magic == ZSTD_MAGIC:
            if self.header.incremental and not self._run:
                raise ChunkError(index, frame.offset, index * self.header.chunk_size,
                                 "a block frame outside any run marker's range")
            if not self.header.incremental and len(self._seen) >= n:
                raise ImageFormatError(f"{self.name}: more chunks than the header's {n} (image corrupted)")
            if self._run:
                self._run.pop(0)
            return index
        if self.header.incremental and frame.magic == RUN_MAGIC:
            run = decode_run(frame.data)
            if self._run or run is None or run[0] < index or run[0] + run[1] > n:
                raise ChunkError(index, frame.offset, index * self.header.chunk_size,
                                 "a corrupted run marker")
            self._log.add(frame.data, 0)
            self._run = list(range(run[0], run[0] + run[1]))
            return None
        if self.header.incremental and not self._run and frame.magic == TRAILER_MAGIC:
            self._read_trailer(frame)
            return None
        if not self.header.incremental and len(self._seen) == n:
            self._read_trailer(frame)
            return None
        raise ChunkError(index, frame.offset, index * self.header.chunk_size,
                         f"a metadata frame (magic {frame.magic:#010x}) where the chunk belongs")

    def _read_trailer(self, frame: Frame) -> None:
        if frame.magic != TRAILER_MAGIC:
            raise ImageFormatError(f"{self.name}: image trailer missing or corrupted at image offset {frame.offset}")
        self._stream_digest = self._log.digest()
        self._log.add(frame.data, 0)
        try:
            self._trailer = decode_trailer(frame.payload, self.header)
        except ImageFormatError as e:
            raise ImageFormatError(f"{self.name}: {e} (at image offset {frame.offset})") from None

    def _read_seek_table(self, frame: Frame) -> None:
        """The seek table must list the frames that came, and the image ends with it."""
        mismatch = seek_table_mismatch(frame.data, self._log.entries, FrameNames(self.header, self._seen))
        if mismatch:
            raise ImageFormatError(f"{self.name}: the seek table at image offset {frame.offset} is corrupted "
                                   f"or the frames were moved: {mismatch}")
        extra = count_rest(self._stream)
        if extra:
            raise garbage_after(self.name, extra, frame.end)
        self._ended = True

    def expected_digest(self, index: int) -> bytes | None:
        return None

    def skip_stream_digest(self) -> None:
        self._log.stop_hashing()

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close:
            close()

    def finish(self) -> ImageTrailer:
        if not self.header.incremental and len(self._seen) < self.header.chunk_count:
            raise ImageFormatError(f"{self.name}: image stream ends after {len(self._seen)} of "
                                   f"{self.header.chunk_count} chunks")
        if self._trailer is None or not self._trailer.complete:
            raise ImageFormatError(f"{self.name}: image stream has no trailer (incomplete image)")
        if self._trailer.held is not None and not np.array_equal(
                np.flatnonzero(unpack_bits(self._trailer.held, self.header.chunk_count)), self._seen):
            raise ImageFormatError(f"{self.name}: the blocks in the stream are not those its trailer lists "
                                   f"(image corrupted)")
        if not self._ended:
            raise ImageFormatError(f"{self.name}: image stream ends without its seek table (at image offset "
                                   f"{self.stream_bytes})")
        self._trailer.check_stream_digest(self._stream_digest, self.name)
        return self._trailer
