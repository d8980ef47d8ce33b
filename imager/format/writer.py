"""Writing an image: the header, one frame per chunk in order, the trailer, the seek table, to
any sink with write(bytes)."""

from __future__ import annotations

from typing import Any, Protocol

import blake3

from .codec import EncodedChunk
from .meta import DIGEST_SIZE, ImageHeader, encode_header, encode_trailer
from .seektable import encode_seek_table


class ByteSink(Protocol):
    """Where an image's bytes go, in order."""

    def write(self, data: bytes) -> None: ...


class FrameLog:
    """The frames of an image in order: their seek table entries and a running BLAKE3 of their
    bytes. The writer keeps one as it writes; a reader keeps one to compare with the trailer."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int]] = []
        self.size = 0
        self._hash: blake3.blake3 | None = blake3.blake3()

    def stop_hashing(self) -> None:
        """Keep the entries only: the stream digest is not wanted (restore; see restore_feed)."""
        self._hash = None

    def add(self, frame: bytes, decompressed: int) -> None:
        if self._hash is not None:
            self._hash.update(frame)
        self.entries.append((len(frame), decompressed))
        self.size += len(frame)

    def digest(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()


class ImageWriter:
    """Writes an image to any sink with `write(bytes)`; keeps the seek table and digests."""

    def __init__(self, sink: ByteSink, header: ImageHeader):
        self.sink = sink
        self.header = header
        self.frames = FrameLog()
        self.digests = bytearray()
        self.bytes_written = 0
        self.image_digest = ""
        self._emit(encode_header(header), 0)

    def _emit(self, frame: bytes, decompressed: int) -> None:
        self.sink.write(frame)
        self.frames.add(frame, decompressed)
        self.bytes_written = self.frames.size

    def write_chunk(self, chunk: EncodedChunk) -> None:
        expected = len(self.digests) // DIGEST_SIZE
        if chunk.index != expected:
            raise RuntimeError(f"chunk {chunk.index} written out of order (expected {expected})")
        self._emit(chunk.frame, chunk.length)
        self.digests += chunk.digest

    def finish(self, totals: dict[str, Any]) -> None:
        if len(self.digests) // DIGEST_SIZE != self.header.chunk_count:
            raise RuntimeError("image finished before every chunk was written")
        self.image_digest = blake3.blake3(bytes(self.digests)).hexdigest()
        totals = dict(totals, complete=True, chunks=self.header.chunk_count, image_digest=self.image_digest,
                      header_digest=self.header.digest, stream_digest=self.frames.digest())
        self._emit(encode_trailer(totals, bytes(self.digests)), 0)
        table = encode_seek_table(self.frames.entries)
        self.sink.write(table)
        self.bytes_written += len(table)
