"""Writing an image: the header, the chunk frames (every chunk of a full in order; an
incremental's changed blocks in runs), the trailer, the seek table, to any sink with write(bytes)."""

from __future__ import annotations

from typing import Any, Protocol

import blake3
import numpy as np

from .blocks import DIGEST_SIZE, pack_bits
from .codec import EncodedChunk
from .frames import run_frame
from .meta import ImageHeader, encode_header, encode_trailer
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
        self.add_joined(frame, [(len(frame), decompressed)])

    def add_joined(self, data: bytes, entries: list[tuple[int, int]]) -> None:
        """Frames written as one piece of bytes, `entries` their (length, decompressed) in order."""
        if self._hash is not None:
            self._hash.update(data)
        self.entries.extend(entries)
        self.size += len(data)

    def digest(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()


class ImageWriter:
    """Writes an image to any sink with `write(bytes)`; keeps the seek table and the block
    digests. A full image gets every chunk in order (write_chunk); an incremental, started from
    its parent's block digests, the blocks that changed in ascending order (write_blocks)."""

    def __init__(self, sink: ByteSink, header: ImageHeader, base_digests: bytes | None = None,
                 max_write: int = 0):
        """`max_write`: the most bytes of frames an incremental's blocks are joined into for one
        write (whole frames: a tape sink spans cartridges between writes, and its early-warning
        zone holds one write of at most that); 0 for a write per frame."""
        self.sink = sink
        self.max_write = max_write
        self.header = header
        self.frames = FrameLog()
        self.bytes_written = 0
        self.image_digest = ""
        self.chunks_written = 0
        self.tables: tuple[bytes, bytes, bytes] | None = None    # digests, used_any, used_full, once finished
        if header.incremental:
            if base_digests is None or len(base_digests) != header.block_count * DIGEST_SIZE:
                raise ValueError("an incremental image starts from its parent's digest of every block")
            self.digests = bytearray(base_digests)
            self.held: np.ndarray | None = np.zeros(header.block_count, dtype=bool)
        else:
            self.digests = bytearray()
            self.held = None
        self._next = 0
        self._emit(encode_header(header), 0)

    def _emit(self, frame: bytes, decompressed: int) -> None:
        self._emit_joined(frame, [(len(frame), decompressed)])

    def write_chunk(self, chunk: EncodedChunk) -> None:
        if self.held is not None:
            raise RuntimeError("an incremental image is written by write_blocks")
        if chunk.index != self._next:
            raise RuntimeError(f"chunk {chunk.index} written out of order (expected {self._next})")
        self._emit(chunk.frame, chunk.length)
        self.digests += chunk.digest
        self._next += 1
        self.chunks_written += 1

    def write_blocks(self, blocks: list[EncodedChunk]) -> None:
        """Blocks of an incremental, ascending; each run of consecutive ones after a run frame.
        The frames are written and hashed in pieces of up to `max_write` bytes: a write and a
        hash per 16 KiB frame each let go of the GIL and wait behind the busy pipeline threads
        to take it back, which cost a 10% incremental more time than its reads (bench/chain.py)."""
        if self.held is None:
            raise RuntimeError("a full image is written by write_chunk")
        piece: list[bytes] = []
        entries: list[tuple[int, int]] = []
        size = 0

        def add(frame: bytes, decompressed: int) -> None:
            nonlocal size
            if piece and size + len(frame) > self.max_write:
                self._emit_joined(b"".join(piece), entries)
                piece.clear()
                entries.clear()
                size = 0
            piece.append(frame)
            entries.append((len(frame), decompressed))
            size += len(frame)

        start = 0
        while start < len(blocks):
            end = start + 1
            while end < len(blocks) and blocks[end].index == blocks[end - 1].index + 1:
                end += 1
            first = blocks[start].index
            if first < self._next:
                raise RuntimeError(f"block {first} written out of order (expected {self._next} or later)")
            add(run_frame(first, end - start), 0)
            for block in blocks[start:end]:
                add(block.frame, block.length)
                self.digests[block.index * DIGEST_SIZE:(block.index + 1) * DIGEST_SIZE] = block.digest
                self.held[block.index] = True
            self._next = blocks[end - 1].index + 1
            self.chunks_written += end - start
            start = end
        if piece:
            self._emit_joined(b"".join(piece), entries)

    def _emit_joined(self, data: bytes, entries: list[tuple[int, int]]) -> None:
        """Frames as one piece of bytes, `entries` their (length, decompressed) in order."""
        self.sink.write(data)
        self.frames.add_joined(data, entries)
        self.bytes_written = self.frames.size

    def finish(self, totals: dict[str, Any], used_any: bytes, used_full: bytes) -> None:
        """The trailer (with the filesystem's use of each block, as bitmaps) and the seek table."""
        n = self.header.block_count
        if len(self.digests) != n * DIGEST_SIZE:
            raise RuntimeError("image finished before every chunk was written")
        self.image_digest = blake3.blake3(bytes(self.digests)).hexdigest()
        totals = dict(totals, complete=True, chunks=self.chunks_written, blocks=n, image_digest=self.image_digest,
                      header_digest=self.header.digest, stream_digest=self.frames.digest())
        held = None
        if self.held is not None:
            held = pack_bits(self.held)
            totals["held_blocks"] = self.chunks_written
        self.tables = (bytes(self.digests), used_any, used_full)
        self._emit(encode_trailer(totals, self.tables[0], used_any, used_full, held), 0)
        table = encode_seek_table(self.frames.entries)
        self.sink.write(table)
        self.bytes_written += len(table)
