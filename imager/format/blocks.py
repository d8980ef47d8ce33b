"""The blocks of a volume, the unit of chains: every image's trailer holds one BLAKE3 digest per
block of the whole volume, and what the filesystem used of each block; an incremental image
holds the blocks that changed since its parent, one frame each.

The block size grows with the volume: 16 KiB blocks while the digest table stays within 2^18
entries (8 MiB: 16 KiB up to 4 GiB, 32 KiB at 8 GiB), 64 KiB from 16 GiB while it stays within
2^20 (32 MiB: up to 64 GiB), then larger, up to 4 MiB from 4 TiB; always a divisor of the
default chunk. Small blocks by measurement (bench/chain.py, README): scattered 4-64 KiB writes
cost an incremental 1.1x the bytes written at 10% changed with 16 KiB blocks, 1.6x with 64 KiB,
at the same speed. The table's cap keeps it from costing more than that gains: it is in every
image (32 bytes a block) and read whole by mount, restore and the next incremental.
"""

from __future__ import annotations

from functools import lru_cache

import blake3
import numpy as np

DIGEST_SIZE = 32
MIN_BLOCK_SIZE = 16 << 10
SMALL_BLOCK_LIMIT = 64 << 10        # blocks smaller than this only while the table stays
SMALL_TABLE_BLOCKS = 1 << 18        # within this many entries
MAX_BLOCK_SIZE = 4 << 20
MAX_TABLE_BLOCKS = 1 << 20


def chain_block_size(volume_size: int) -> int:
    """The block size of a volume of this size (the same for every image of a chain)."""
    small = min(SMALL_BLOCK_LIMIT, _power_of_two_at_least(-(-volume_size // SMALL_TABLE_BLOCKS)))
    large = _power_of_two_at_least(-(-volume_size // MAX_TABLE_BLOCKS))
    return min(MAX_BLOCK_SIZE, max(MIN_BLOCK_SIZE, small, large))


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


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
