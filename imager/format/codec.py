"""The chunk codec: one chunk of a volume as one frame of an image, and back (the Codec seam;
ZstdCodec is the one the format has). Each thread has its own compressor and decompressor."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import zstandard

from devices.buffers import is_all_zero

from ..defaults import DEFAULT_LEVEL
from ..errors import ChunkError
from .frames import ZSTD_MAGIC, zstd_block_header
from .blocks import MIN_BLOCK_SIZE, block_digests, zero_block_digests
from .meta import ImageHeader


def zstd_frame_bound(chunk_size: int) -> int:
    """The largest frame a chunk can compress to (incompressible data is stored raw, with a
    few bytes of framing per 128 KiB block)."""
    return chunk_size + chunk_size // (128 << 10) * 3 + 64


@lru_cache(maxsize=8)
def zero_frame(length: int, level: int = DEFAULT_LEVEL) -> bytes:
    """The one zstd frame every all-zero chunk of this length is written as."""
    return _compressor(level).compress(bytes(length))


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


@dataclass
class EncodedChunk:
    index: int
    length: int
    frame: bytes
    digest: bytes        # the digests of its blocks, concatenated
    zero: bool


class Codec(Protocol):
    """How one chunk of a volume becomes one frame of an image, and back, with the digests of
    its blocks. Thread-safe: the pipeline calls it from every worker at once."""

    name: str

    @property
    def block_size(self) -> int: ...

    def encode(self, index: int, data: memoryview, digests: bytes | None = None) -> EncodedChunk:
        """`digests`: block_digests(data) when the caller has them already."""
        ...

    def encode_blocks(self, blocks: list[tuple[int, memoryview, bytes]]) -> list[EncodedChunk]:
        """encode() of each (index, data, digests), in order; none of them is all zeros."""
        ...

    def zero_chunk(self, index: int, length: int) -> EncodedChunk: ...

    def decode(self, frame: bytes, index: int, expected_length: int, digest: bytes | None,
               image_offset: int, volume_offset: int) -> bytes | None: ...

    def decode_into(self, frame: bytes | memoryview, dst: memoryview, index: int, digest: bytes | None,
                    image_offset: int, volume_offset: int) -> bool:
        """decode() into `dst`, exactly the chunk's length, allocating nothing: False for a zero
        chunk (`dst` is then left as it was)."""
        ...


@dataclass(frozen=True)
class ZstdCodec:
    """One zstd frame per chunk, with its content size and content checksum; an all-zero chunk
    is one precomputed frame per length, which decodes to None without any work."""

    level: int = DEFAULT_LEVEL
    block_size: int = MIN_BLOCK_SIZE
    name = "zstd"

    def encode(self, index: int, data: memoryview, digests: bytes | None = None) -> EncodedChunk:
        length = len(data)
        if is_all_zero(data):
            return self.zero_chunk(index, length)
        return EncodedChunk(index, length, _compressor(self.level).compress(data),
                            block_digests(data, self.block_size) if digests is None else digests, False)

    def encode_blocks(self, blocks: list[tuple[int, memoryview, bytes]]) -> list[EncodedChunk]:
        """encode() of each (index, data, digests), none of them all zeros, in one call to zstd:
        each call lets go of the GIL and takes it back among the pipeline's threads, which for
        16 KiB blocks cost an incremental more than the compression itself (README, Chains)."""
        compressor = _compressor(self.level)
        # Only python-zstandard's C extension built with its own zstd has the batch call.
        if len(blocks) < 2 or not hasattr(compressor, "multi_compress_to_buffer"):
            return [self.encode(index, data, digests) for index, data, digests in blocks]
        frames = compressor.multi_compress_to_buffer([data for _, data, _ in blocks], threads=0)
        return [EncodedChunk(index, len(data), frames[n].tobytes(), digests, False)
                for n, (index, data, digests) in enumerate(blocks)]

    def zero_chunk(self, index: int, length: int) -> EncodedChunk:
        return EncodedChunk(index, length, zero_frame(length, self.level),
                            zero_block_digests(length, self.block_size), True)

    def decode(self, frame: bytes, index: int, expected_length: int, digest: bytes | None,
               image_offset: int, volume_offset: int) -> bytes | None:
        """The chunk's bytes, checked against `digest` when given; None for a zero chunk."""
        if self._zero(frame, index, expected_length, digest, image_offset, volume_offset):
            return None
        try:
            data = _decompressor().decompress(frame, max_output_size=expected_length)
        except zstandard.ZstdError as e:
            raise ChunkError(index, image_offset, volume_offset, f"corrupted: {e}") from None
        self._check(data, len(data), index, expected_length, digest, image_offset, volume_offset)
        return data

    def decode_into(self, frame: bytes | memoryview, dst: memoryview, index: int, digest: bytes | None,
                    image_offset: int, volume_offset: int) -> bool:
        expected_length = len(dst)
        if self._zero(frame, index, expected_length, digest, image_offset, volume_offset):
            return False
        try:
            with _decompressor().stream_reader(frame, read_size=len(frame), read_across_frames=False) as reader:
                n = reader.readinto(dst)
                # Reading on to the end of the frame is what checks its content checksum.
                if n == expected_length and reader.read(1):
                    n += 1
        except zstandard.ZstdError as e:
            raise ChunkError(index, image_offset, volume_offset, f"corrupted: {e}") from None
        self._check(dst, n, index, expected_length, digest, image_offset, volume_offset)
        return True

    def _zero(self, frame: bytes | memoryview, index: int, expected_length: int, digest: bytes | None,
              image_offset: int, volume_offset: int) -> bool:
        """Whether `frame` is the zero chunk's (checked against `digest`); raises for a frame
        this codec never writes."""
        if frame == zero_frame(expected_length, self.level):
            if digest is not None and digest != zero_block_digests(expected_length, self.block_size):
                raise ChunkError(index, image_offset, volume_offset, "checksum mismatch")
            return True
        if len(frame) < 4 or struct.unpack_from("<I", frame)[0] != ZSTD_MAGIC:
            raise ChunkError(index, image_offset, volume_offset, "not a zstd frame (image corrupted)")
        problem = _frame_header_problem(frame, expected_length)
        if problem:
            raise ChunkError(index, image_offset, volume_offset, problem)
        return False

    def _check(self, data: bytes | memoryview, n: int, index: int, expected_length: int, digest: bytes | None,
               image_offset: int, volume_offset: int) -> None:
        if n != expected_length:
            raise ChunkError(index, image_offset, volume_offset, f"holds {n} bytes, expected {expected_length}")
        if digest is not None and block_digests(data, self.block_size) != digest:
            raise ChunkError(index, image_offset, volume_offset, "checksum mismatch")


def codec_of(header: ImageHeader) -> Codec:
    """The codec an image's chunks were written with (format version 3: zstd at the header's
    level, digests of the header's blocks)."""
    return ZstdCodec(header.level, header.block_size)


def _frame_length(frame: bytes | memoryview, has_checksum: bool) -> int:
    """Where a zstd frame ends, from its block headers (its checksum included); -1 if its
    blocks run past the bytes given."""
    try:
        pos = zstandard.frame_header_size(frame)
    except zstandard.ZstdError:
        return -1
    while pos + 3 <= len(frame):
        last, _, _, body_length = zstd_block_header(frame, pos)
        pos += 3 + body_length
        if last:
            return pos + 4 * has_checksum
    return -1


def _frame_header_problem(frame: bytes | memoryview, expected_length: int) -> str | None:
    """What is wrong with a chunk frame's header and framing, checked before decompressing it:
    zstandard allocates the content size a frame claims up front, so a damaged one could claim
    terabytes."""
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        return f"corrupted zstd frame header: {e}"
    if params.content_size != expected_length:
        claim = "no size" if params.content_size >= 1 << 63 else f"{params.content_size} bytes"
        return f"corrupted zstd frame header: it claims {claim}, the chunk holds {expected_length}"
    # imager's frames always carry the content checksum, no dictionary, and a window zstd
    # sized to the chunk (at least 1 KiB).
    if not params.has_checksum or params.dict_id or params.window_size > max(1 << 10, 2 * expected_length):
        return "corrupted zstd frame header: flags this imager never writes"
    # Decoding into a buffer stops at the end of the input without an error, and decoding to
    # bytes ignores what follows the frame: a frame cut short after its last block (its
    # checksum gone) or run on would pass unnoticed.
    if _frame_length(frame, params.has_checksum) != len(frame):
        return "corrupted: the zstd frame's blocks do not end where the frame does"
    return None
