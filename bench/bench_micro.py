"""Micro benchmarks of the backup hot path (pytest-benchmark): `make bench` runs them."""

from __future__ import annotations

import os

import numpy as np
import pytest

from devices.buffers import AlignedBuffer, is_all_zero
from imager.format import ZstdCodec, chunk_digest

CHUNK = 4 << 20


def _text_like() -> bytes:
    """Compressible data of the kind a volume holds: library and document bytes."""
    parts, size = [], 0
    for root in ("/usr/lib/python3.11", "/usr/share/doc"):
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        data = f.read(1 << 20)
                    parts.append(data)
                    size += len(data)
                if size >= CHUNK:
                    return b"".join(parts)[:CHUNK]
    return (b"".join(parts) * (CHUNK // max(size, 1) + 1))[:CHUNK]


@pytest.fixture(scope="module")
def zero_buffer():
    buf = AlignedBuffer(CHUNK)
    yield buf
    buf.close()


@pytest.fixture(scope="module")
def text_chunk():
    return _text_like()


def test_zero_detection_of_a_zero_chunk(benchmark, zero_buffer):
    assert benchmark(is_all_zero, zero_buffer.view)


def test_zero_detection_numpy_any_baseline(benchmark, zero_buffer):
    assert not benchmark(lambda: bool(zero_buffer.array.any()))


def test_blake3_digest_of_a_chunk(benchmark, text_chunk):
    assert len(benchmark(chunk_digest, text_chunk)) == 32


@pytest.mark.parametrize("level", [1, 3])
def test_encode_text_chunk(benchmark, text_chunk, level):
    chunk = benchmark(ZstdCodec(level).encode, 0, memoryview(text_chunk))
    assert not chunk.zero and len(chunk.frame) < CHUNK


def test_encode_random_chunk(benchmark):
    data = memoryview(np.random.default_rng(1).integers(0, 256, CHUNK, dtype=np.uint8).tobytes())
    assert not benchmark(ZstdCodec(3).encode, 0, data).zero


def test_encode_zero_chunk_costs_no_compression(benchmark, zero_buffer):
    assert benchmark(ZstdCodec(3).encode, 0, zero_buffer.view).zero


@pytest.fixture(scope="module")
def fragmented_plan():
    """A used-block plan of a 16 TiB volume with a million used extents."""
    from imager.plan.usedmap import UsedMap

    rng = np.random.default_rng(7)
    size = 16 << 40
    starts = np.sort(rng.choice(size // 65536, 1_000_000, replace=False)) * 65536
    return UsedMap(size, starts, starts + 32768)


def test_plan_query_per_chunk(benchmark, fragmented_plan):
    offsets = np.random.default_rng(3).integers(0, fragmented_plan.size // CHUNK, 1000) * CHUNK

    def query():
        return sum(len(fragmented_plan.ranges_in(int(o), CHUNK)) for o in offsets)

    assert benchmark(query) > 0


def test_change_bitmap_count_for_1tib_volume(benchmark):
    """The change-tracking bitmap of a 1 TiB volume in 64 KiB blocks (2 MiB), a quarter set."""
    bits = np.zeros((1 << 40) // 65536 // 8, dtype=np.uint8)
    bits[::4] = 0xFF
    assert benchmark(lambda: int(np.unpackbits(bits).sum())) == bits.size // 4 * 8
