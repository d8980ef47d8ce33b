"""An image's metadata: the header (first frame) and the trailer (before the seek table), each a
skippable frame sealed with the BLAKE3 of its contents.

    header   0x184D2A50: b"IMGRHDR1" + BLAKE3(JSON) + JSON (format version, volume geometry,
             source, snapshot, plan)
    trailer  0x184D2A51: b"IMGRTRL1" + BLAKE3(rest) + rest, where rest is u32 JSON length +
             JSON (totals, "complete", the header's checksum, the stream digest) + one 32-byte
             BLAKE3 digest per chunk
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3

from ..errors import ChunkError, ImageFormatError, UsageError
from .frames import Readable, read_exact, skippable_frame


# Version 2 added the header, trailer and stream checksums; version 1 images are refused.
FORMAT_VERSION = 2
HEADER_MAGIC = 0x184D2A50
TRAILER_MAGIC = 0x184D2A51
HEADER_TAG = b"IMGRHDR1"
TRAILER_TAG = b"IMGRTRL1"
DIGEST_SIZE = 32
# The header's JSON and the trailer's totals: a few KiB in practice; a damaged size field
# claiming more is refused before anything that large is read or allocated.
MAX_METADATA = 1 << 20
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
    source: dict[str, Any] = field(default_factory=dict)
    snapshot: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=lambda: {"mode": "all-blocks"})
    partitions: dict[str, Any] | None = None
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
    digests: bytes
    totals: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.totals.get("complete"))

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]

    def check_chunk_digests(self, digests: bytes, chunk_size: int) -> None:
        """Raise ChunkError naming the first chunk whose digest, as read, is not the trailer's."""
        if digests == self.digests:
            return
        for i in range(len(self.digests) // DIGEST_SIZE):
            if digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] != self.digest(i):
                raise ChunkError(i, -1, i * chunk_size, "checksum mismatch with the image trailer")

    def check_stream_digest(self, stream_digest: str | None, name: str) -> None:
        """`stream_digest` is the BLAKE3 of the image's bytes before its trailer, as read (None:
        not computed, nothing to check)."""
        if stream_digest is not None and self.totals.get("stream_digest") != stream_digest:
            raise ImageFormatError(f"{name}: image is corrupted: its header and chunk frames differ from what was "
                                   f"written (stream checksum mismatch) although every chunk decodes")


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


def read_header(f: Readable) -> tuple[ImageHeader, bytes]:
    """The header at the start of an image (file or stream) and its whole frame."""
    head = read_exact(f, 8)
    if not head:
        raise ImageFormatError("the image is empty")
    if len(head) < 8 or struct.unpack_from("<I", head)[0] != HEADER_MAGIC:
        raise ImageFormatError("not an imager image (no imager header at the start)")
    (size,) = struct.unpack_from("<I", head, 4)
    if size > MAX_HEADER_PAYLOAD:
        raise ImageFormatError(f"image header is corrupted (it claims {size} bytes)")
    payload = read_exact(f, size)
    if len(payload) < size:
        raise ImageFormatError(f"image is truncated inside its header (at image offset {8 + len(payload)})")
    return decode_header(payload), head + payload


def trailer_frame_bound(chunk_count: int) -> int:
    return 8 + len(TRAILER_TAG) + DIGEST_SIZE + 4 + MAX_METADATA + chunk_count * DIGEST_SIZE


def encode_trailer(totals: dict[str, Any], digests: bytes) -> bytes:
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
