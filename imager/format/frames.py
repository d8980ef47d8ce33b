"""The frames an image is made of, at the byte level: zstd frames and skippable frames (magic
0x184D2A50..5F, a 32-bit length, a payload zstd ignores)."""

from __future__ import annotations

import struct
from typing import Protocol, overload

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MASK = 0xFFFFFFF0
SKIPPABLE_BASE = 0x184D2A50
# In an incremental image, before each run of block frames: which blocks they are, so that a
# stream (a pipe, a tape) can place each block as it comes.
RUN_MAGIC = 0x184D2A52
RUN_TAG = b"IMGRRUN1"
_RUN = struct.Struct("<QI")
RUN_FRAME_SIZE = 8 + len(RUN_TAG) + _RUN.size
# Reads of a stream go in pieces of at most this, so a cut stream never costs what a size
# field claims.
READ_PIECE = 1 << 20


def zstd_block_header(raw: bytes | memoryview, at: int = 0) -> tuple[bool, int, int, int]:
    """A zstd block's 3-byte header (RFC 8878 3.1.1.2): (last block, block type, block size, how
    many bytes of body follow: 1 for an RLE block)."""
    value = raw[at] | raw[at + 1] << 8 | raw[at + 2] << 16
    kind, size = (value >> 1) & 3, value >> 3
    return bool(value & 1), kind, size, 1 if kind == 1 else size


def skippable_frame(magic: int, payload: bytes) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


@overload
def skippable_payload(frame: bytes, magic: int) -> bytes | None: ...
@overload
def skippable_payload(frame: memoryview, magic: int) -> memoryview | None: ...


def skippable_payload(frame: bytes | memoryview, magic: int) -> bytes | memoryview | None:
    """The payload of a skippable frame of this magic whose size field matches its length (a
    view of it when `frame` is a view)."""
    if len(frame) < 8 or struct.unpack_from("<II", frame) != (magic, len(frame) - 8):
        return None
    return frame[8:]


class Readable(Protocol):
    """A byte stream read front to back: a file, a pipe, standard input, an image on tape."""

    def read(self, n: int = -1, /) -> bytes: ...


def read_exact(f: Readable, n: int) -> bytes:
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




def run_frame(first_block: int, count: int) -> bytes:
    return skippable_frame(RUN_MAGIC, RUN_TAG + _RUN.pack(first_block, count))


def decode_run(frame: bytes) -> tuple[int, int] | None:
    """(first block, count) of a run frame; None if `frame` is not a whole one."""
    payload = skippable_payload(frame, RUN_MAGIC)
    if payload is None or len(payload) != len(RUN_TAG) + _RUN.size or not payload.startswith(RUN_TAG):
        return None
    first, count = _RUN.unpack_from(payload, len(RUN_TAG))
    return (first, count) if count else None
