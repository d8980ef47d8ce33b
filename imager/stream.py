"""The image format: a seekable zstd file with imager's metadata in skippable frames.

Layout, every piece a zstd frame so that stock `zstd -d` restores the raw volume:

    [header]   skippable frame 0x184D2A50: b"IMGRHDR1" + BLAKE3(JSON) + JSON (format version,
               volume geometry, source, snapshot)
    [chunk 0]  zstd frame with content size and content checksum, `chunk_size` bytes of volume
    ...
    [chunk N-1]
    [trailer]  skippable frame 0x184D2A51: b"IMGRTRL1" + BLAKE3(rest) + rest, where rest is
               u32 JSON length + JSON (totals, "complete", the header's checksum, the stream
               digest) + one 32-byte BLAKE3 digest per chunk
    [seek table] skippable frame 0x184D2A5E, per the zstd seekable format: one entry
               (compressed size, decompressed size) per frame above, then the footer
               (frame count, descriptor 0, magic 0x8F92EAB1). It is last, as the format requires.

The stream digest is the BLAKE3 of every byte before the trailer, so damage that still decodes
to the right bytes (a zstd header field, a block's framing) is found too; the trailer and the
seek table are covered by their own checksum and by matching what precedes them.

All-zero chunks are written as one precomputed frame per chunk length: no compression work.
"""

from __future__ import annotations

import itertools
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

# Version 2 added the header, trailer and stream checksums; version 1 images are refused.
FORMAT_VERSION = 2
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

# The header's JSON and the trailer's totals: a few KiB in practice; a damaged size field
# claiming more is refused before anything that large is read or allocated.
MAX_METADATA = 1 << 20
# Reads of a stream go in pieces of at most this, so a cut stream never costs what a size
# field claims.
READ_PIECE = 1 << 20
MAX_HEADER_PAYLOAD = len(HEADER_TAG) + DIGEST_SIZE + MAX_METADATA

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
    # The BLAKE3 of the header's JSON as written (set by encode_header and decode_header), which
    # the trailer repeats so that a header from another image cannot pass for this one's.
    digest: str = field(default="", repr=False, compare=False)

    @property
    def chunk_count(self) -> int:
        return -(-self.volume_size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.volume_size - index * self.chunk_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["digest"]
        d["chunk_count"] = self.chunk_count
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageHeader":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "digest"}
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

    def check_stream_digest(self, stream_digest: str | None, name: str) -> None:
        """`stream_digest` is the BLAKE3 of the image's bytes before its trailer, as read (None:
        not computed, nothing to check)."""
        if stream_digest is not None and self.totals.get("stream_digest") != stream_digest:
            raise ImageFormatError(f"{name}: image is corrupted: its header and chunk frames differ from what was "
                                   f"written (stream checksum mismatch) although every chunk decodes")


def skippable_frame(magic: int, payload: bytes) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


def skippable_payload(frame: bytes, magic: int) -> bytes | None:
    """The payload of a skippable frame of this magic whose size field matches its length."""
    if len(frame) < 8 or struct.unpack_from("<II", frame) != (magic, len(frame) - 8):
        return None
    return frame[8:]


def _sealed(tag: bytes, body: bytes) -> bytes:
    return tag + blake3.blake3(body).digest() + body


def _unsealed(payload: bytes, tag: bytes) -> bytes | None:
    """The body of a `_sealed` payload, or None when its checksum does not match."""
    start = len(tag) + DIGEST_SIZE
    body = payload[start:]
    return body if blake3.blake3(body).digest() == payload[len(tag):start] else None


def _unsupported(version: object) -> ImageFormatError:
    return ImageFormatError(f"image format version {version} is not supported (this imager reads {FORMAT_VERSION})")


def encode_header(header: ImageHeader) -> bytes:
    """The header frame; records the checksum of its JSON in `header.digest`."""
    meta = json.dumps(header.to_dict(), sort_keys=True).encode()
    if len(meta) > MAX_METADATA:
        raise UsageError(f"the image header would be {len(meta)} bytes, more than the {MAX_METADATA} an image "
                         f"can hold (fewer --exclude paths?)")
    header.digest = blake3.blake3(meta).hexdigest()
    return skippable_frame(HEADER_MAGIC, _sealed(HEADER_TAG, meta))


def decode_header(frame_payload: bytes) -> ImageHeader:
    if not frame_payload.startswith(HEADER_TAG):
        raise ImageFormatError("not an imager image: the first frame is not an imager header")
    meta = _unsealed(frame_payload, HEADER_TAG)
    if meta is None:
        _refuse_version_1(frame_payload)
        raise ImageFormatError("image header is corrupted (its checksum does not match)")
    try:
        d = json.loads(meta)
    except ValueError:
        raise ImageFormatError("image header is corrupted (unreadable metadata)") from None
    if not isinstance(d, dict):
        raise ImageFormatError("image header is corrupted (metadata is not an object)")
    if d.get("format") != FORMAT_VERSION:
        raise _unsupported(d.get("format"))
    try:
        header = ImageHeader.from_dict(d)
    except TypeError as e:
        raise ImageFormatError(f"image header is corrupted ({e})") from None
    size, chunk = header.volume_size, header.chunk_size
    if not (isinstance(size, int) and isinstance(chunk, int) and size > 0 and 0 < chunk <= MAX_CHUNK_SIZE
            and chunk & (chunk - 1) == 0 and header.chunk_count + 2 < 1 << 32):
        raise ImageFormatError(f"image header is corrupted (volume size {size!r}, chunk size {chunk!r})")
    header.digest = blake3.blake3(meta).hexdigest()
    return header


def _refuse_version_1(frame_payload: bytes) -> None:
    """Version 1 headers held their JSON right after the tag, with no checksum: name the
    version rather than calling such an image corrupted."""
    try:
        d = json.loads(frame_payload[len(HEADER_TAG):])
    except ValueError:
        return
    if isinstance(d, dict) and d.get("format") != FORMAT_VERSION:
        raise _unsupported(d.get("format"))


def read_header(f: BinaryIO) -> tuple[ImageHeader, bytes]:
    """The header at the start of an image (file or stream) and its whole frame."""
    head = _read_exact(f, 8)
    if not head:
        raise ImageFormatError("the image is empty")
    if len(head) < 8 or struct.unpack_from("<I", head)[0] != HEADER_MAGIC:
        raise ImageFormatError("not an imager image (no imager header at the start)")
    (size,) = struct.unpack_from("<I", head, 4)
    if size > MAX_HEADER_PAYLOAD:
        raise ImageFormatError(f"image header is corrupted (it claims {size} bytes)")
    payload = _read_exact(f, size)
    if len(payload) < size:
        raise ImageFormatError(f"image is truncated inside its header (at image offset {8 + len(payload)})")
    return decode_header(payload), head + payload


def trailer_frame_bound(chunk_count: int) -> int:
    return 8 + len(TRAILER_TAG) + DIGEST_SIZE + 4 + MAX_METADATA + chunk_count * DIGEST_SIZE


def encode_trailer(totals: dict, digests: bytes) -> bytes:
    meta = json.dumps(totals, sort_keys=True).encode()
    if len(meta) > MAX_METADATA:
        raise RuntimeError(f"image trailer totals of {len(meta)} bytes exceed {MAX_METADATA}")
    return skippable_frame(TRAILER_MAGIC, _sealed(TRAILER_TAG, struct.pack("<I", len(meta)) + meta + digests))


def decode_trailer(frame_payload: bytes, header: ImageHeader) -> ImageTrailer:
    if not frame_payload.startswith(TRAILER_TAG):
        raise ImageFormatError("image trailer is missing or corrupted")
    body = _unsealed(frame_payload, TRAILER_TAG)
    if body is None:
        raise ImageFormatError("image trailer is corrupted (its checksum does not match)")
    try:
        (meta_len,) = struct.unpack_from("<I", body)
        totals = json.loads(body[4:4 + meta_len])
    except (struct.error, ValueError):
        raise ImageFormatError("image trailer is corrupted (unreadable totals)") from None
    digests = body[4 + meta_len:]
    n = header.chunk_count
    if len(digests) != n * DIGEST_SIZE:
        raise ImageFormatError(f"image trailer holds {len(digests) // DIGEST_SIZE} chunk checksums, the header says {n} chunks")
    if not isinstance(totals, dict) or totals.get("image_digest") != blake3.blake3(digests).hexdigest():
        raise ImageFormatError("image trailer is corrupted (its chunk checksums do not match the image digest)")
    if totals.get("header_digest") != header.digest:
        raise ImageFormatError("image header does not belong to this image (its checksum differs from the "
                               "one in the trailer)")
    return ImageTrailer(digests, totals)


SEEK_DESCRIPTOR = 0  # no per-frame checksums; imager writes no other value


def encode_seek_table(entries: list[tuple[int, int]]) -> bytes:
    body = b"".join(SEEK_ENTRY.pack(c, d) for c, d in entries)
    footer = struct.pack("<IBI", len(entries), SEEK_DESCRIPTOR, SEEKABLE_FOOTER_MAGIC)
    return skippable_frame(SEEK_TABLE_MAGIC, body + footer)


def seek_table_size(frame_count: int) -> int:
    return 8 + frame_count * SEEK_ENTRY.size + SEEK_FOOTER_SIZE


def frame_name(position: int, chunk_count: int) -> str:
    """What the frame at this position of an image is (its entry in the seek table)."""
    if position == 0:
        return "the header"
    return f"chunk {position - 1}" if position <= chunk_count else "the trailer"


def seek_table_mismatch(table: bytes, entries: list[tuple[int, int]], chunk_count: int) -> str | None:
    """How a seek table frame differs from the one listing `entries`; None if it does not."""
    expected = encode_seek_table(entries)
    if table == expected:
        return None
    at = next((i for i, (a, b) in enumerate(zip(table, expected)) if a != b), min(len(table), len(expected)))
    position = (at - 8) // SEEK_ENTRY.size
    if 0 <= position < len(entries):
        return f"its entry for {frame_name(position, chunk_count)} does not match that frame"
    return "its frame header or footer is corrupted"


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
    problem = _frame_header_problem(frame, expected_length)
    if problem:
        raise ChunkError(index, image_offset, volume_offset, problem)
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


def _frame_header_problem(frame: bytes, expected_length: int) -> str | None:
    """What is wrong with a chunk frame's header, checked before decompressing it: zstandard
    allocates the content size a frame claims up front, so a damaged one could claim terabytes."""
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
    return None


class ImageWriter:
    """Writes an image to any sink with `write(bytes)`; keeps the seek table and digests."""

    def __init__(self, sink, header: ImageHeader):
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

    def finish(self, totals: dict) -> None:
        if len(self.digests) // DIGEST_SIZE != self.header.chunk_count:
            raise RuntimeError("image finished before every chunk was written")
        self.image_digest = blake3.blake3(bytes(self.digests)).hexdigest()
        totals = dict(totals, complete=True, chunks=self.header.chunk_count, image_digest=self.image_digest,
                      header_digest=self.header.digest, stream_digest=self.frames.digest())
        self._emit(encode_trailer(totals, bytes(self.digests)), 0)
        table = encode_seek_table(self.frames.entries)
        self.sink.write(table)
        self.bytes_written += len(table)


# --- reading ----------------------------------------------------------------------------------

def _read_exact(f: BinaryIO, n: int) -> bytes:
    """`n` bytes, or fewer where the stream ends; read in bounded pieces, so a size field
    that claims more than the stream holds costs no more memory than the stream has."""
    parts = []
    got = 0
    while got < n:
        piece = f.read(min(n - got, READ_PIECE))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def count_rest(f: BinaryIO) -> int:
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


def iter_frames(f: BinaryIO, header: ImageHeader, start_offset: int = 0) -> Iterator[Frame]:
    """Walk the frames of an image's stream one after another without a seek table (for pipes
    and tape, and to locate damage when the seek table is gone). No frame is read beyond the
    largest an image of this header can hold."""
    largest_metadata = max(8 + MAX_HEADER_PAYLOAD, trailer_frame_bound(header.chunk_count))
    largest_chunk = zstd_frame_bound(header.chunk_size)
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
            if 8 + size > largest_metadata:
                raise FrameError(offset, f"corrupted metadata frame (it claims {size} bytes)")
            payload = _read_exact(f, size)
            if len(payload) < size:
                raise TruncatedFrame(offset, "stream ends inside a metadata frame")
            data = head + size_raw + payload
        elif magic == ZSTD_MAGIC:
            data = head + _read_zstd_frame_body(f, offset, largest_chunk - 4)
        else:
            raise FrameError(offset, f"not a zstd frame (magic {magic:#010x})")
        yield Frame(offset, magic, data)
        offset += len(data)


def _read_zstd_frame_body(f: BinaryIO, offset: int, limit: int) -> bytes:
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
    length = 1 + rest
    while True:
        bh = _read_exact(f, 3)
        if len(bh) < 3:
            raise TruncatedFrame(offset, "stream ends inside a chunk (zstd frame cut short)")
        value = bh[0] | bh[1] << 8 | bh[2] << 16
        last, block_type, size = value & 1, (value >> 1) & 3, value >> 3
        if block_type == 3:
            raise FrameError(offset, "corrupted zstd frame (reserved block type)")
        body_len = 1 if block_type == 1 else size
        length += 3 + body_len
        if size > ZSTD_MAX_BLOCK or length > limit:
            raise FrameError(offset, "corrupted zstd frame (longer than any chunk frame)")
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

