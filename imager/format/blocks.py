"""The blocks of a volume, the unit of chains: every image's trailer holds one BLAKE3 digest per
block of the whole volume, and what the filesystem used of each block; an incremental image
holds the blocks that changed since its parent, one frame each.

The block size grows with the volume so that a digest table never exceeds 2^20 entries (32 MiB)
and stays a divisor of the default chunk: 64 KiB up to 64 GiB, 1 MiB at 1 TiB, 4 MiB from 4 TiB.
"""

from __future__ import annotations

from functools import lru_cache

import blake3
import numpy as np

DIGEST_SIZE = 32
MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 4 << 20
MAX_TABLE_BLOCKS = 1 << 20


def chain_block_size(volume_size: int) -> int:
    """The block size of a volume of this size (the same for every image of a chain)."""
    wanted = max(1, -(-volume_size // MAX_TABLE_BLOCKS))
    return min(MAX_BLOCK_SIZE, max(MIN_BLOCK_SIZE, 1 << (wanted - 1).bit_length()))


def block_digests(data: bytes | memoryview, block_size: int) -> bytes:
    """The digests of the blocks of `data` (a chunk starting on a block boundary), concatenated."""
    view = memoryview(data)
    if len(view) <= block_size:
        return blake3.blake3(view).digest()
    return b"".join(blake3.blake3(view[i:i + block_size]).digest() for i in range(0, len(view), block_size))


@lru_cache(maxsize=16)
def zero_block_digests(length: int, block_size: int) -> bytes:
    """block_digests() of `length` zero bytes, without hashing them more than once per length."""
    whole, rest = divmod(length, block_size)
    digest = blake3.blake3(bytes(min(length, block_size))).digest()
    table = digest * whole if whole else b""
    if rest and whole:
        table += blake3.blake3(bytes(rest)).digest()
    elif rest:
        table = digest
    return table


def blocks_in(length: int, block_size: int) -> int:
    return -(-length // block_size)


def digest_of(table: bytes | memoryview, block: int) -> bytes:
    return bytes(table[block * DIGEST_SIZE:(block + 1) * DIGEST_SIZE])


def pack_bits(flags: np.ndarray) -> bytes:
    """A bitmap of booleans, bit i of byte i // 8 little-endian (as the daemon's bitmaps)."""
    return np.packbits(np.asarray(flags, dtype=bool), bitorder="little").tobytes()


def unpack_bits(bitmap: bytes | memoryview, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=count, bitorder="little").astype(bool)


def bitmap_bytes(count: int) -> int:
    return -(-count // 8)
