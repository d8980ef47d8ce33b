"""Where a restore, verify or info reads an image from: a Feed gives the header, the chunk
frames in order, the digests to check them against, and the trailer once every chunk was read.

- SeekableFeed: an image file, through its seek table; the digests are known up front.
- StreamFeed: a pipe (standard input) or a tape: frames front to back, the trailer last.
"""

from __future__ import annotations

from typing import Iterator, Protocol

from ..errors import ChunkError, ImageFormatError
from ..format.frames import Readable
from ..format import (TRAILER_MAGIC, ZSTD_MAGIC, Frame, FrameError, FrameLog, ImageHeader, ImageReader, ImageTrailer,
                      TruncatedFrame, count_rest, decode_trailer, garbage_after, iter_frames, read_header,
                      seek_table_mismatch)


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
        for i in range(self.reader.chunk_count):
            frame = self.reader.frame(i)
            self._log.add(frame, self.header.chunk_length(i))
            yield i, frame, self.reader.chunk_offsets[i]

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
        self._count = 0
        self.stream_bytes = len(header_frame)

    def chunks(self) -> Iterator[tuple[int, bytes, int]]:
        n = self.header.chunk_count
        try:
            for frame in self._frames:
                self.stream_bytes = frame.end
                if frame.magic == ZSTD_MAGIC and (self._trailer is not None or self._count >= n):
                    raise ImageFormatError(f"{self.name}: more chunks than the header's {n} (image corrupted)")
                if self._count < n:
                    if frame.magic != ZSTD_MAGIC:
                        raise ChunkError(self._count, frame.offset, self._count * self.header.chunk_size,
                                         f"a metadata frame (magic {frame.magic:#010x}) where the chunk belongs")
                    self._log.add(frame.data, self.header.chunk_length(self._count))
                    yield self._count, frame.data, frame.offset
                    self._count += 1
                elif self._trailer is None:
                    self._read_trailer(frame)
                else:
                    self._read_seek_table(frame)
                    return
        except TruncatedFrame as e:
            if self._count < n:
                raise ChunkError(self._count, e.offset, self._count * self.header.chunk_size,
                                 f"image stream cut short: {e}") from None
            raise ImageFormatError(f"{self.name}: image stream cut short after its last chunk: {e}") from None
        except FrameError as e:
            if self._count < n:
                raise ChunkError(self._count, e.offset, self._count * self.header.chunk_size, str(e)) from None
            raise ImageFormatError(f"{self.name}: image stream corrupted after its last chunk: {e}") from None

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
        mismatch = seek_table_mismatch(frame.data, self._log.entries, self.header.chunk_count)
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
        if self._count < self.header.chunk_count:
            raise ImageFormatError(f"{self.name}: image stream ends after {self._count} of "
                                   f"{self.header.chunk_count} chunks")
        if self._trailer is None or not self._trailer.complete:
            raise ImageFormatError(f"{self.name}: image stream has no trailer (incomplete image)")
        if not self._ended:
            raise ImageFormatError(f"{self.name}: image stream ends without its seek table (at image offset "
                                   f"{self.stream_bytes})")
        self._trailer.check_stream_digest(self._stream_digest, self.name)
        return self._trailer
