"""The seek table of the zstd seekable format: the last frame, one (compressed size,
decompressed size) entry per frame before it, then a footer (frame count, descriptor, magic)."""

from __future__ import annotations

import struct

import numpy as np
from typing import Sequence

from .frames import skippable_frame
from .meta import ImageHeader


SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_FOOTER_MAGIC = 0x8F92EAB1
SEEK_FOOTER_SIZE = 9
SEEK_ENTRY = struct.Struct("<II")
SEEK_DESCRIPTOR = 0  # no per-frame checksums; imager writes no other value


def encode_seek_table(entries: list[tuple[int, int]]) -> bytes:
    body = b"".join(SEEK_ENTRY.pack(c, d) for c, d in entries)
    footer = struct.pack("<IBI", len(entries), SEEK_DESCRIPTOR, SEEKABLE_FOOTER_MAGIC)
    return skippable_frame(SEEK_TABLE_MAGIC, body + footer)


def seek_table_size(frame_count: int) -> int:
    return 8 + frame_count * SEEK_ENTRY.size + SEEK_FOOTER_SIZE


class FrameNames:
    """What the frame at a position of an image is, for messages about its seek table entry."""

    def __init__(self, header: ImageHeader, present: Sequence[int] | np.ndarray | None = None):
        self.header = header
        self.present = present

    def __call__(self, position: int, entries: Sequence[tuple[int, int]]) -> str:
        if position == 0:
            return "the header"
        if position == len(entries) - 1:
            return "the trailer"
        if not self.header.incremental:
            return f"chunk {position - 1}"
        chunks_before = sum(1 for _, d in entries[1:position] if d)
        if entries[position][1] == 0:
            return "a run marker"
        if self.present is not None and chunks_before < len(self.present):
            return f"block {int(self.present[chunks_before])}"
        return f"block frame {chunks_before}"


def seek_table_mismatch(table: bytes, entries: list[tuple[int, int]], names: FrameNames) -> str | None:
    """How a seek table frame differs from the one listing `entries`; None if it does not."""
    expected = encode_seek_table(entries)
    if table == expected:
        return None
    at = next((i for i, (a, b) in enumerate(zip(table, expected)) if a != b), min(len(table), len(expected)))
    position = (at - 8) // SEEK_ENTRY.size
    if 0 <= position < len(entries):
        return f"its entry for {names(position, entries)} does not match that frame"
    return "its frame header or footer is corrupted"
