"""The tape's own blocks: a label, a segment header and an end block, each a zstd skippable
frame holding a tag, the BLAKE3 of its JSON, and the JSON."""

from __future__ import annotations

import json
import struct

import blake3

from ..defaults import DEFAULT_TAPE_BLOCK_SIZE
from ..errors import TapeMediaError
from ..format import skippable_frame


LABEL_MAGIC = 0x184D2A52


SEGMENT_MAGIC = 0x184D2A53


END_MAGIC = 0x184D2A54


LABEL_TAG = b"IMGRLBL2"


SEGMENT_TAG = b"IMGRSEG2"


END_TAG = b"IMGREND2"


_CHECKSUM_SIZE = 32


DEFAULT_BLOCK_SIZE = DEFAULT_TAPE_BLOCK_SIZE


# Room for the largest metadata block (a label, segment header or end block is a few KiB).
METADATA_READ_SIZE = 1 << 20


class DamagedBlock(TapeMediaError):
    """A label, segment header or end block that is not trusted; the message completes "the
    block ..." (it "is damaged (...)" or "is in another format (...)")."""


def _meta_block(magic: int, tag: bytes, meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    return skippable_frame(magic, tag + blake3.blake3(body).digest() + body)


def _parse_meta_block(block: bytes, magic: int, tag: bytes) -> dict | None:
    """The metadata of a block of this kind, None for any other block. A block is of this kind
    when its magic or its tag is there (one damaged byte cannot hide it); then its checksum must
    hold, or DamagedBlock says what is wrong."""
    head = 8 + len(tag)
    if len(block) < head:
        return None
    found_magic, size = struct.unpack_from("<II", block)
    found_tag = bytes(block[8:head])
    if found_magic != magic and found_tag != tag:
        return None
    if found_tag[:-1] == tag[:-1] and found_tag != tag:
        raise DamagedBlock(f"is in another format ({found_tag.decode('ascii', 'replace')}; "
                           f"this imager reads {tag.decode()})")
    if found_magic != magic or found_tag != tag or size != len(block) - 8 or len(block) < head + _CHECKSUM_SIZE:
        raise DamagedBlock("is damaged (its frame header does not hold)")
    body = bytes(block[head + _CHECKSUM_SIZE:])
    if blake3.blake3(body).digest() != block[head:head + _CHECKSUM_SIZE]:
        raise DamagedBlock("is damaged (its checksum does not match)")
    try:
        meta = json.loads(body)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise DamagedBlock("is damaged (its checksum holds but it holds no metadata)")
    return meta
