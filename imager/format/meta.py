"""An image's metadata: the header (first frame) and the trailer (before the seek table), each a
skippable frame sealed with the BLAKE3 of its contents.

    header   0x184D2A50: b"IMGRHDR1" + BLAKE3(JSON) + JSON (format version, volume geometry,
             kind full or incremental, chain (parent, method), source, snapshot, plan)
    trailer  0x184D2A51: b"IMGRTRL1" + BLAKE3(rest) + rest, where rest is u32 JSON length +
             JSON (totals, "complete", the header's checksum, the stream digest) + one 32-byte
             BLAKE3 digest per block of the volume (blocks.py) + two bitmaps of the blocks the
             filesystem used any of and all of + for an incremental the bitmap of the blocks
             it holds
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import blake3
import numpy as np

from ..defaults import DEFAULT_LEVEL
from ..errors import ChunkError, ImageFormatError, NotAnImage, UsageError
from .blocks import DIGEST_SIZE, MAX_BLOCK_SIZE, bitmap_bytes, blocks_in, chain_block_size, pack_bits
from .frames import Readable, read_exact, skippable_frame


# Version 2 added the header, trailer and stream checksums; version 3 the per-block digests and
# incremental images. Images of other versions are refused, naming their version.
FORMAT_VERSION = 3
# Version 2 (one digest per chunk, no block maps) is read; images are written as version 3.
READABLE_VERSIONS = (2, 3)
FULL = "full"
INCREMENTAL = "incremental"
HEADER_MAGIC = 0x184D2A50
TRAILER_MAGIC = 0x184D2A51
HEADER_TAG = b"IMGRHDR1"
TRAILER_TAG = b"IMGRTRL1"
# The header's JSON and the trailer's totals: a few KiB in practice; a damaged size field
# claiming more is refused before anything that large is read or allocated.
MAX_METADATA = 1 << 20
MAX_HEADER_PAYLOAD = len(HEADER_TAG) + DIGEST_SIZE + MAX_METADATA
# The seek table holds sizes as 32-bit numbers.
MAX_CHUNK_SIZE = 1 << 30


@dataclass
class ImageHeader:
    volume_size: int
    chunk_size: int
    image_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sector_size: int = 512
    level: int = DEFAULT_LEVEL
    source: dict[str, Any] = field(default_factory=dict)
    snapshot: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=lambda: {"mode": "all-blocks"})
    partitions: dict[str, Any] | None = None
    created: str = ""
    tool: str = ""
    format: int = FORMAT_VERSION
    block_size: int = 0                      # 0: the chain block size of the volume (blocks.py)
    kind: str = FULL
    # An incremental's parent {"id", "digest"} and how its changes were found {"method": tracker
    # | digest, "reason"}; for any image of a tracked volume, the tracker's {"series", "sequence"}.
    chain: dict[str, Any] = field(default_factory=dict)
    # The BLAKE3 of the header's JSON as written (set by encode_header and decode_header), which
    # the trailer repeats so that a header from another image cannot pass for this one's.
    digest: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.block_size and isinstance(self.volume_size, int) and self.volume_size > 0:
            self.block_size = min(chain_block_size(self.volume_size), self.chunk_size)

    @property
    def chunk_count(self) -> int:
        return -(-self.volume_size // self.chunk_size)

    @property
    def block_count(self) -> int:
        return blocks_in(self.volume_size, self.block_size)

    @property
    def chunk_blocks(self) -> int:
        """Blocks per chunk (1 in an incremental, whose chunks are blocks)."""
        return self.chunk_size // self.block_size

    @property
    def incremental(self) -> bool:
        return self.kind == INCREMENTAL

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.volume_size - index * self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["digest"]
        d["chunk_count"] = self.chunk_count
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageHeader":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "digest"}
        return cls(**known)


@dataclass
class ImageTrailer:
    digests: bytes                  # one per block of the volume
    totals: dict[str, Any]
    used_any: bytes                 # bitmap: blocks the filesystem used any byte of
    used_full: bytes                # bitmap: blocks the filesystem used every byte of
    held: bytes | None = None       # an incremental's bitmap of the blocks it holds
    chunk_size: int = 0
    chunk_blocks: int = 1

    @property
    def complete(self) -> bool:
        return bool(self.totals.get("complete"))

    def digest(self, index: int) -> bytes:
        """The digests of the blocks of chunk `index`, concatenated."""
        per = self.chunk_blocks * DIGEST_SIZE
        return self.digests[index * per:(index + 1) * per]

    def check_chunk_digests(self, digests: Iterable[tuple[int, bytes]]) -> None:
        """Raise ChunkError naming the first chunk whose digests, as read, are not the trailer's."""
        for index, digest in digests:
            if digest != self.digest(index):
                raise ChunkError(index, -1, index * self.chunk_size, "checksum mismatch with the image trailer")

    def check_stream_digest(self, stream_digest: str | None, name: str) -> None:
        """`stream_digest` is the BLAKE3 of the image's bytes before its trailer, as read (None:
        not computed, nothing to check)."""
        if stream_digest is not None and self.totals.get("stream_digest") != stream_digest:
            raise ImageFormatError(f"{name}: image is corrupted: its header and chunk frames differ from what was "
                                   f"written (stream checksum mismatch) although every chunk decodes")


def _sealed(tag: bytes, body: bytes) -> bytes:
    return tag + blake3.blake3(body).digest() + body


def _unsealed(payload: bytes | memoryview, tag: bytes) -> memoryview | None:
    """The body of a `_sealed` payload, or None when its checksum does not match. A view, not a
    copy: a trailer's body holds megabytes of block digests, and a chain opens one per image."""
    start = len(tag) + DIGEST_SIZE
    body = memoryview(payload)[start:]
    return body if blake3.blake3(body).digest() == bytes(payload[len(tag):start]) else None


def _unsupported(version: object) -> ImageFormatError:
    return ImageFormatError(f"image format version {version} is not supported (this imager reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")


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
        raise NotAnImage("not an imager image: the first frame is not an imager header")
    meta = _unsealed(frame_payload, HEADER_TAG)
    if meta is None:
        _refuse_version_1(frame_payload)
        raise ImageFormatError("image header is corrupted (its checksum does not match)")
    try:
        d = json.loads(bytes(meta))
    except ValueError:
        raise ImageFormatError("image header is corrupted (unreadable metadata)") from None
    if not isinstance(d, dict):
        raise ImageFormatError("image header is corrupted (metadata is not an object)")
    if d.get("format") not in READABLE_VERSIONS:
        raise _unsupported(d.get("format"))
    if d["format"] == 2 and isinstance(d.get("chunk_size"), int):
        # Version 2 kept one digest per chunk: read as blocks of a chunk each.
        d = dict(d, block_size=d["chunk_size"], kind=FULL, chain={})
    try:
        header = ImageHeader.from_dict(d)
    except TypeError as e:
        raise ImageFormatError(f"image header is corrupted ({e})") from None
    size, chunk, block = header.volume_size, header.chunk_size, header.block_size
    if not (isinstance(size, int) and isinstance(chunk, int) and size > 0 and 0 < chunk <= MAX_CHUNK_SIZE
            and chunk & (chunk - 1) == 0 and header.chunk_count + 2 < 1 << 32):
        raise ImageFormatError(f"image header is corrupted (volume size {size!r}, chunk size {chunk!r})")
    largest = chunk if header.format == 2 else min(chunk, MAX_BLOCK_SIZE)
    if not (isinstance(block, int) and 512 <= block <= largest and block & (block - 1) == 0
            and 2 * header.block_count + 2 < 1 << 32):
        raise ImageFormatError(f"image header is corrupted (block size {block!r})")
    if header.kind not in (FULL, INCREMENTAL) or not isinstance(header.chain, dict):
        raise ImageFormatError(f"image header is corrupted (kind {header.kind!r})")
    if header.incremental and (chunk != block or not isinstance(header.chain.get("parent"), dict)):
        raise ImageFormatError("image header is corrupted (an incremental image without its parent)")
    header.digest = blake3.blake3(meta).hexdigest()
    return header


def _refuse_version_1(frame_payload: bytes) -> None:
    """Version 1 headers held their JSON right after the tag, with no checksum: name the
    version rather than calling such an image corrupted."""
    try:
        d = json.loads(frame_payload[len(HEADER_TAG):])
    except ValueError:
        return
    if isinstance(d, dict) and d.get("format") not in READABLE_VERSIONS:
        raise _unsupported(d.get("format"))


def read_header(f: Readable) -> tuple[ImageHeader, bytes]:
    """The header at the start of an image (file or stream) and its whole frame."""
    head = read_exact(f, 8)
    if not head:
        raise NotAnImage("the image is empty")
    if len(head) < 8 or struct.unpack_from("<I", head)[0] != HEADER_MAGIC:
        raise NotAnImage("not an imager image (no imager header at the start)")
    (size,) = struct.unpack_from("<I", head, 4)
    if size > MAX_HEADER_PAYLOAD:
        raise ImageFormatError(f"image header is corrupted (it claims {size} bytes)")
    payload = read_exact(f, size)
    if len(payload) < size:
        raise ImageFormatError(f"image is truncated inside its header (at image offset {8 + len(payload)})")
    return decode_header(payload), head + payload


def trailer_frame_bound(header: ImageHeader) -> int:
    return (8 + len(TRAILER_TAG) + DIGEST_SIZE + 4 + MAX_METADATA + header.block_count * DIGEST_SIZE
            + 3 * bitmap_bytes(header.block_count))


def encode_trailer(totals: dict[str, Any], digests: bytes, used_any: bytes, used_full: bytes,
                   held: bytes | None = None) -> bytes:
    meta = json.dumps(totals, sort_keys=True).encode()
    if len(meta) > MAX_METADATA:
        raise RuntimeError(f"image trailer totals of {len(meta)} bytes exceed {MAX_METADATA}")
    body = struct.pack("<I", len(meta)) + meta + digests + used_any + used_full + (held or b"")
    return skippable_frame(TRAILER_MAGIC, _sealed(TRAILER_TAG, body))


def decode_trailer(frame_payload: bytes | memoryview, header: ImageHeader) -> ImageTrailer:
    if bytes(frame_payload[:len(TRAILER_TAG)]) != TRAILER_TAG:
        raise ImageFormatError("image trailer is missing or corrupted")
    body = _unsealed(frame_payload, TRAILER_TAG)
    if body is None:
        raise ImageFormatError("image trailer is corrupted (its checksum does not match)")
    try:
        (meta_len,) = struct.unpack_from("<I", body)
        totals = json.loads(bytes(body[4:4 + meta_len]))
    except (struct.error, ValueError):
        raise ImageFormatError("image trailer is corrupted (unreadable totals)") from None
    n = header.block_count
    table, bitmap = n * DIGEST_SIZE, bitmap_bytes(n)
    rest = body[4 + meta_len:]
    maps = 0 if header.format == 2 else 3 if header.incremental else 2
    expected = table + maps * bitmap
    if len(rest) != expected:
        raise ImageFormatError(f"image trailer holds {len(rest)} bytes of block checksums and maps, the header's "
                               f"{n} blocks need {expected}")
    digests = bytes(rest[:table])
    if not isinstance(totals, dict) or totals.get("image_digest") != blake3.blake3(digests).hexdigest():
        raise ImageFormatError("image trailer is corrupted (its block checksums do not match the image digest)")
    if totals.get("header_digest") != header.digest:
        raise ImageFormatError("image header does not belong to this image (its checksum differs from the "
                               "one in the trailer)")
    if header.format == 2:
        # No record of the filesystem's use of each block: every block counts as used.
        every = pack_bits(np.ones(n, dtype=bool))
        return ImageTrailer(digests, totals, every, every, None, header.chunk_size, header.chunk_blocks)
    held = bytes(rest[table + 2 * bitmap:]) if header.incremental else None
    return ImageTrailer(digests, totals, bytes(rest[table:table + bitmap]), bytes(rest[table + bitmap:table + 2 * bitmap]),
                        held, header.chunk_size, header.chunk_blocks)
