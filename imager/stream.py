"""The image format: a seekable zstd file with imager's metadata in skippable frames.

Layout, every piece a zstd frame so that stock `zstd -d` restores the raw volume:

    [header]   skippable frame 0x184D2A50: b"IMGRHDR1" + JSON (volume geometry, source, snapshot)
    [chunk 0]  zstd frame with content size and content checksum, `chunk_size` bytes of volume
    ...
    [chunk N-1]
    [trailer]  skippable frame 0x184D2A51: b"IMGRTRL1" + u32 JSON length + JSON (totals,
               "complete") + one 32-byte BLAKE3 digest per chunk
    [seek table] skippable frame 0x184D2A5E, per the zstd seekable format: one entry
               (compressed size, decompressed size) per frame above, then the footer
               (frame count, descriptor, magic 0x8F92EAB1). It is last, as the format requires.

All-zero chunks are written as one precomputed frame per chunk length: no compression work.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import BinaryIO, Iterator

import blake3
import zstandard

from devices.buffers import is_all_zero

from .errors import ChunkError, ImageFormatError, UsageError

FORMAT_VERSION = 1
ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MASK = 0xFFFFFFF0
SKIPPABLE_BASE = 0x184D2A50
HEADER_MAGIC = 0x184D2A50
TRAILER_MAGIC = 0x184D2A51
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_FOOTER_MAGIC = 0x8F92EAB1
HEADER_TAG = b"IMGRHDR1"
TRAILER_TAG = b"IMGRTRL1"
DIGEST_SIZE = 32
SEEK_FOOTER_SIZE = 9
SEEK_ENTRY = struct.Struct("<II")

DEFAULT_CHUNK_SIZE = 4 << 20
# The seek table holds sizes as 32-bit numbers.
MAX_CHUNK_SIZE = 1 << 30
DEFAULT_LEVEL = 3


@dataclass
class ImageHeader:
    volume_size: int
    chunk_size: int
    image_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sector_size: int = 512
    level: int = DEFAULT_LEVEL
    source: dict = field(default_factory=dict)
    snapshot: dict = field(default_factory=dict)
    plan: dict = field(default_factory=lambda: {"mode": "all-blocks"})
    partitions: dict | None = None
    created: str = ""
    tool: str = ""
    format: int = FORMAT_VERSION

    @property
    def chunk_count(self) -> int:
        return -(-self.volume_size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.volume_size - index * self.chunk_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chunk_count"] = self.chunk_count
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageHeader":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class ImageTrailer:
    digests: bytes
    totals: dict

    @property
    def complete(self) -> bool:
        return bool(self.totals.get("complete"))

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]


def skippable_frame(magic: int, payload: bytes) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


def encode_header(header: ImageHeader) -> bytes:
    return skippable_frame(HEADER_MAGIC, HEADER_TAG + json.dumps(header.to_dict(), sort_keys=True).encode())


def decode_header(frame_payload: bytes) -> ImageHeader:
    if not frame_payload.startswith(HEADER_TAG):
        raise ImageFormatError("not an imager image: the first frame is not an imager header")
    try:
        d = json.loads(frame_payload[len(HEADER_TAG):])
    except ValueError:
        raise ImageFormatError("image header is corrupted (unreadable metadata)") from None
    if not isinstance(d, dict):
        raise ImageFormatError("image header is corrupted (metadata is not an object)")
    if d.get("format") != FORMAT_VERSION:
        raise ImageFormatError(f"image format version {d.get('format')} is not supported (this imager reads {FORMAT_VERSION})")
    try:
        header = ImageHeader.from_dict(d)
    except TypeError as e:
        raise ImageFormatError(f"image header is corrupted ({e})") from None
    size, chunk = header.volume_size, header.chunk_size
    if not (isinstance(size, int) and isinstance(chunk, int) and size > 0 and 0 < chunk <= MAX_CHUNK_SIZE
            and chunk & (chunk - 1) == 0):
        raise ImageFormatError(f"image header is corrupted (volume size {size!r}, chunk size {chunk!r})")
    return header


def encode_trailer(totals: dict, digests: bytes) -> bytes:
    meta = json.dumps(totals, sort_keys=True).encode()
    return skippable_frame(TRAILER_MAGIC, TRAILER_TAG + struct.pack("<I", len(meta)) + meta + digests)


def decode_trailer(frame_payload: bytes, chunk_count: int) -> ImageTrailer:
    if not frame_payload.startswith(TRAILER_TAG):
        raise ImageFormatError("image trailer is missing or corrupted")
    try:
        (meta_len,) = struct.unpack_from("<I", frame_payload, len(TRAILER_TAG))
        start = len(TRAILER_TAG) + 4
        totals = json.loads(frame_payload[start:start + meta_len])
    except (struct.error, ValueError):
        raise ImageFormatError("image trailer is corrupted (unreadable totals)") from None
    digests = frame_payload[start + meta_len:]
    if len(digests) != chunk_count * DIGEST_SIZE:
        raise ImageFormatError(f"image trailer holds {len(digests) // DIGEST_SIZE} chunk checksums, the header says {chunk_count} chunks")
    if not isinstance(totals, dict) or totals.get("image_digest") != blake3.blake3(digests).hexdigest():
        raise ImageFormatError("image trailer is corrupted (its chunk checksums do not match the image digest)")
    return ImageTrailer(digests, totals)


def encode_seek_table(entries: list[tuple[int, int]]) -> bytes:
    body = b"".join(SEEK_ENTRY.pack(c, d) for c, d in entries)
    footer = struct.pack("<IBI", len(entries), 0, SEEKABLE_FOOTER_MAGIC)
    return skippable_frame(SEEK_TABLE_MAGIC, body + footer)


def zstd_frame_bound(chunk_size: int) -> int:
    """The largest frame a chunk can compress to (incompressible data is stored raw, with a
    few bytes of framing per 128 KiB block)."""
    return chunk_size + chunk_size // (128 << 10) * 3 + 64


@lru_cache(maxsize=8)
def zero_frame(length: int, level: int = DEFAULT_LEVEL) -> bytes:
    """The one zstd frame every all-zero chunk of this length is written as."""
    return _compressor(level).compress(bytes(length))


@lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    return blake3.blake3(bytes(length)).digest()


def chunk_digest(data) -> bytes:
    return blake3.blake3(data).digest()


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
    digest: bytes
    zero: bool


def encode_chunk(index: int, data: memoryview, level: int) -> EncodedChunk:
    """Compress one chunk (thread-safe: each thread has its own compressor)."""
    length = len(data)
    if is_all_zero(data):
        return EncodedChunk(index, length, zero_frame(length, level), zero_digest(length), True)
    return EncodedChunk(index, length, _compressor(level).compress(data), chunk_digest(data), False)


def decode_chunk(frame: bytes, index: int, expected_length: int, digest: bytes | None,
                 image_offset: int, volume_offset: int, level: int) -> bytes | None:
    """Decompress and check one chunk frame. Returns None for a zero chunk (no work done)."""
    if frame == zero_frame(expected_length, level):
        if digest is not None and digest != zero_digest(expected_length):
            raise ChunkError(index, image_offset, volume_offset, "checksum mismatch")
        return None
    if len(frame) < 4 or struct.unpack_from("<I", frame)[0] != ZSTD_MAGIC:
        raise ChunkError(index, image_offset, volume_offset, "not a zstd frame (image corrupted)")
    try:
        data = _decompressor().decompress(frame, max_output_size=expected_length)
    except zstandard.ZstdError as e:
        raise ChunkError(index, image_offset, volume_offset, f"corrupted: {e}") from None
    if len(data) != expected_length:
        raise ChunkError(index, image_offset, volume_offset,
                         f"holds {len(data)} bytes, expected {expected_length}")
    if digest is not None and chunk_digest(data) != digest:
        raise ChunkError(index, image_offset, volume_offset, "checksum mismatch")
    return data


class ImageWriter:
    """Writes an image to any sink with `write(bytes)`; keeps the seek table and digests."""

    def __init__(self, sink, header: ImageHeader):
        self.sink = sink
        self.header = header
        self.entries: list[tuple[int, int]] = []
        self.digests = bytearray()
        self.bytes_written = 0
        self.image_digest = ""
        self._emit(encode_header(header), 0)

    def _emit(self, frame: bytes, decompressed: int) -> None:
        self.sink.write(frame)
        self.entries.append((len(frame), decompressed))
        self.bytes_written += len(frame)

    def write_chunk(self, chunk: EncodedChunk) -> None:
        expected = len(self.digests) // DIGEST_SIZE
        if chunk.index != expected:
            raise RuntimeError(f"chunk {chunk.index} written out of order (expected {expected})")
        self._emit(chunk.frame, chunk.length)
        self.digests += chunk.digest

    def finish(self, totals: dict) -> None:
        if len(self.digests) // DIGEST_SIZE != self.header.chunk_count:
            raise RuntimeError("image finished before every chunk was written")
        self.image_digest = blake3.blake3(bytes(self.digests)).hexdigest()
        totals = dict(totals, complete=True, chunks=self.header.chunk_count, image_digest=self.image_digest)
        self._emit(encode_trailer(totals, bytes(self.digests)), 0)
        table = encode_seek_table(self.entries)
        self.sink.write(table)
        self.bytes_written += len(table)


# --- reading ----------------------------------------------------------------------------------

def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if data is None:
        data = b""
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


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


class TruncatedFrame(ImageFormatError):
    def __init__(self, offset: int, what: str):
        self.offset = offset
        super().__init__(f"{what} at image offset {offset}")


def iter_frames(f: BinaryIO, start_offset: int = 0) -> Iterator[Frame]:
    """Walk the frames of a zstd stream one after another without a seek table
    (for pipes and tape, and to locate damage when the seek table is gone)."""
    offset = start_offset
    while True:
        head = _read_exact(f, 4)
        if not head:
            return
        if len(head) < 4:
            raise TruncatedFrame(offset, "stream ends inside a frame header")
        (magic,) = struct.unpack("<I", head)
        if magic & SKIPPABLE_MASK == SKIPPABLE_BASE:
            size_raw = _read_exact(f, 4)
            if len(size_raw) < 4:
                raise TruncatedFrame(offset, "stream ends inside a skippable frame header")
            (size,) = struct.unpack("<I", size_raw)
            payload = _read_exact(f, size)
            if len(payload) < size:
                raise TruncatedFrame(offset, "stream ends inside a metadata frame")
            data = head + size_raw + payload
        elif magic == ZSTD_MAGIC:
            data = head + _read_zstd_frame_body(f, offset)
        else:
            raise TruncatedFrame(offset, f"not a zstd frame (magic {magic:#010x})")
        yield Frame(offset, magic, data)
        offset += len(data)


def _read_zstd_frame_body(f: BinaryIO, offset: int) -> bytes:
    parts = []
    fhd_raw = _read_exact(f, 1)
    if not fhd_raw:
        raise TruncatedFrame(offset, "stream ends inside a zstd frame header")
    fhd = fhd_raw[0]
    fcs_flag, single_segment, checksum_flag, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    rest = (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag] + fcs_size
    hdr = _read_exact(f, rest)
    if len(hdr) < rest:
        raise TruncatedFrame(offset, "stream ends inside a zstd frame header")
    parts += [fhd_raw, hdr]
    while True:
        bh = _read_exact(f, 3)
        if len(bh) < 3:
            raise TruncatedFrame(offset, "stream ends inside a chunk (zstd frame cut short)")
        value = bh[0] | bh[1] << 8 | bh[2] << 16
        last, block_type, size = value & 1, (value >> 1) & 3, value >> 3
        if block_type == 3:
            raise TruncatedFrame(offset, "corrupted zstd frame (reserved block type)")
        body_len = 1 if block_type == 1 else size
        body = _read_exact(f, body_len)
        if len(body) < body_len:
            raise TruncatedFrame(offset, "stream ends inside a chunk (zstd frame cut short)")
        parts += [bh, body]
        if last:
            break
    if checksum_flag:
        cs = _read_exact(f, 4)
        if len(cs) < 4:
            raise TruncatedFrame(offset, "stream ends inside a chunk checksum")
        parts.append(cs)
    return b"".join(parts)


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

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._f.fileno(), n, offset)

    def _load(self) -> None:
        fd = self._f.fileno()
        self.file_size = os.fstat(fd).st_size
        head = self._pread(8, 0)
        if len(head) < 8 or struct.unpack_from("<I", head)[0] != HEADER_MAGIC:
            raise ImageFormatError(f"{self.path}: not an imager image (no imager header at the start)")
        (hsize,) = struct.unpack_from("<I", head, 4)
        self.header = decode_header(self._pread(hsize, 8))
        footer = self._pread(SEEK_FOOTER_SIZE, max(0, self.file_size - SEEK_FOOTER_SIZE))
        if len(footer) < SEEK_FOOTER_SIZE or struct.unpack_from("<I", footer, 5)[0] != SEEKABLE_FOOTER_MAGIC:
            raise self._damage_report("the seek table at the end is missing")
        count, descriptor = struct.unpack_from("<IB", footer)
        entry_size = 12 if descriptor & 0x80 else 8
        table_size = 8 + count * entry_size + SEEK_FOOTER_SIZE
        table_start = self.file_size - table_size
        if table_start < 0:
            raise self._damage_report("the seek table is corrupted")
        table = self._pread(table_size, table_start)
        magic, size = struct.unpack_from("<II", table)
        if magic != SEEK_TABLE_MAGIC or size != table_size - 8:
            raise self._damage_report("the seek table is corrupted")
        offsets, sizes, dsizes = [], [], []
        pos = 0
        for i in range(count):
            c, d = struct.unpack_from("<II", table, 8 + i * entry_size)
            offsets.append(pos)
            sizes.append(c)
            dsizes.append(d)
            pos += c
        if pos != table_start:
            raise self._damage_report(f"the seek table describes {pos} bytes of frames but the image holds {table_start}")
        n = self.header.chunk_count
        if count != n + 2:
            raise ImageFormatError(f"{self.path}: seek table lists {count} frames, expected {n + 2} for {n} chunks")
        # frame 0 is the header, frames 1..n the chunks, frame n+1 the trailer
        self.chunk_offsets = offsets[1:n + 1]
        self.chunk_frame_sizes = sizes[1:n + 1]
        for i in range(n):
            if dsizes[i + 1] != self.header.chunk_length(i):
                raise ChunkError(i, offsets[i + 1], i * self.header.chunk_size,
                                 f"seek table says {dsizes[i + 1]} bytes, expected {self.header.chunk_length(i)}")
        trailer_frame = self._pread(sizes[n + 1], offsets[n + 1])
        if len(trailer_frame) < 8 or struct.unpack_from("<I", trailer_frame)[0] != TRAILER_MAGIC:
            raise ImageFormatError(f"{self.path}: image trailer missing at image offset {offsets[n + 1]}")
        self.trailer = decode_trailer(trailer_frame[8:], n)
        if not self.trailer.complete:
            raise ImageFormatError(f"{self.path}: image is marked incomplete")

    def _damage_report(self, problem: str) -> ImageFormatError:
        """Walk the frames from the start to say where the image stops being whole."""
        self._f.seek(0)
        chunks = 0
        end = 0
        n = self.header.chunk_count
        try:
            for frame in iter_frames(io.BufferedReader(self._f, 1 << 20)):
                if not frame.skippable:
                    chunks += 1
                end = frame.offset + len(frame.data)
        except TruncatedFrame as e:
            if chunks < n:
                return ImageFormatError(
                    f"{self.path}: image is truncated or corrupted: {problem}; chunk {chunks} of {n} "
                    f"(volume offset {chunks * self.header.chunk_size}) is cut short: {e}")
            return ImageFormatError(f"{self.path}: image is truncated: {problem}; {e}")
        if chunks < n:
            return ImageFormatError(
                f"{self.path}: image is truncated: {problem}; it ends after chunk {chunks - 1} of {n} "
                f"at image offset {end} (volume offset {chunks * self.header.chunk_size} onward is missing)")
        return ImageFormatError(f"{self.path}: image is incomplete: {problem} (all {n} chunks present, "
                                f"image ends at offset {end})")

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
        return decode_chunk(frame, index, self.header.chunk_length(index), self.trailer.digest(index),
                            self.chunk_offsets[index], index * self.header.chunk_size, self.header.level)

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


def read_stream_header(frames: Iterator[Frame]) -> ImageHeader:
    first = next(frames, None)
    if first is None:
        raise ImageFormatError("image stream is empty")
    if first.magic != HEADER_MAGIC:
        raise ImageFormatError("not an imager image (no imager header at the start)")
    return decode_header(first.payload)
