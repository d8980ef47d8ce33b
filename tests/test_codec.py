"""The Codec seam's conformance suite: every codec the format knows turns any chunk into a frame
and back, byte for byte, checks what it gives back, and names the chunk of a damaged frame."""

from __future__ import annotations

import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from imager.errors import ChunkError
from imager.format import Codec, ImageHeader, ZstdCodec, block_digests, chain_block_size, codec_of, zero_block_digests

CODECS = [ZstdCodec(1, 64 << 10), ZstdCodec(3, 64 << 10), ZstdCodec(19, 4096), ZstdCodec(3, 1 << 20)]
LENGTHS = [512, 4096, 64 << 10, (1 << 20) + 4096]


def sample_chunks(length: int) -> dict[str, bytes]:
    rng = random.Random(length)
    text = b"".join(b"line %d of a log file, with some words\n" % i for i in range(length // 30 + 1))[:length]
    mixed = bytearray(length)
    mixed[length // 3:length // 2] = rng.randbytes(length // 2 - length // 3)
    return {"random": rng.randbytes(length), "text": text, "mixed": bytes(mixed),
            "one byte set": bytes(length - 1) + b"\x01"}


@pytest.fixture(params=["decode", "decode_into"], autouse=True)
def way(request, monkeypatch):
    """Every test runs through both ways of decoding: to new bytes, and into a given buffer."""
    monkeypatch.setattr(sys.modules[__name__], "WAY", request.param)


WAY = "decode"


def _decode(codec: Codec, frame: bytes, length: int, digest: bytes | None, index: int = 7) -> bytes | None:
    if WAY == "decode":
        return codec.decode(frame, index, length, digest, 1000, index * length)
    dst = bytearray(b"\xaa" * length)
    if not codec.decode_into(memoryview(frame), memoryview(dst), index, digest, 1000, index * length):
        assert dst == b"\xaa" * length, "a zero chunk's buffer was written"
        return None
    return bytes(dst)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.level}-{c.block_size >> 10}k")
@pytest.mark.parametrize("length", LENGTHS)
def test_every_chunk_comes_back_byte_for_byte(codec, length):
    for kind, data in sample_chunks(length).items():
        encoded = codec.encode(3, memoryview(data))
        assert (encoded.index, encoded.length, encoded.zero) == (3, length, False), kind
        assert encoded.digest == block_digests(data, codec.block_size), kind
        assert _decode(codec, encoded.frame, length, encoded.digest) == data, kind
        assert _decode(codec, encoded.frame, length, None) == data, kind


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.level}-{c.block_size >> 10}k")
@pytest.mark.parametrize("count", [0, 1, 7])
def test_blocks_encoded_together_are_the_blocks_encoded_one_by_one(codec, count):
    """An incremental encodes a region's changed blocks in one call: each comes back as its own
    frame, with its own index and digests, decoding to its own bytes."""
    rng = random.Random(count)
    blocks = []
    for n in range(count):
        data = list(sample_chunks(rng.choice(LENGTHS)).values())[n % 4]
        blocks.append((10 + 3 * n, memoryview(data), block_digests(data, codec.block_size)))
    encoded = codec.encode_blocks(blocks)
    assert len(encoded) == count
    for chunk, (index, data, digests) in zip(encoded, blocks):
        alone = codec.encode(index, data, digests)
        assert (chunk.index, chunk.length, chunk.digest, chunk.zero) == (index, len(data), digests, False)
        assert chunk.frame == alone.frame
        assert _decode(codec, chunk.frame, len(data), chunk.digest, index) == bytes(data)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.level}-{c.block_size >> 10}k")
def test_a_zero_chunk_is_one_frame_that_decodes_without_work(codec):
    for length in LENGTHS:
        read = codec.encode(0, memoryview(bytes(length)))
        unread = codec.zero_chunk(5, length)
        assert read.zero and unread.zero and read.frame == unread.frame and unread.index == 5
        assert read.digest == unread.digest == zero_block_digests(length, codec.block_size)
        assert _decode(codec, read.frame, length, read.digest) is None
        with pytest.raises(ChunkError, match="chunk 7 .*checksum mismatch"):
            _decode(codec, read.frame, length, block_digests(b"x" * length, codec.block_size))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.level}-{c.block_size >> 10}k")
def test_damage_is_refused_and_names_the_chunk(codec):
    data = sample_chunks(64 << 10)["text"]
    encoded = codec.encode(0, memoryview(data))
    cases = {
        "cut short": encoded.frame[:len(encoded.frame) // 2],
        "not a frame": b"\x00" * 64,
        "another chunk's length": codec.encode(0, memoryview(data[:4096])).frame,
    }
    for offset in range(4, len(encoded.frame), max(1, len(encoded.frame) // 40)):
        flipped = bytearray(encoded.frame)
        flipped[offset] ^= 0x55
        cases[f"flip at {offset}"] = bytes(flipped)
    for what, frame in cases.items():
        try:
            got = _decode(codec, frame, len(data), encoded.digest)
        except ChunkError as e:
            assert e.index == 7 and "chunk 7" in str(e), what
        else:
            assert got == data, f"{what}: decoded to other bytes without an error"


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.level}-{c.block_size >> 10}k")
def test_a_frame_cut_at_its_end_is_refused_even_without_digests(codec):
    """A frame missing its checksum (or more) is damage, not data, also where no digest is
    there to catch it."""
    for kind, data in sample_chunks(64 << 10).items():
        frame = codec.encode(0, memoryview(data)).frame
        for cut in (1, 4, 5):
            with pytest.raises(ChunkError, match="chunk 7"):
                _decode(codec, frame[:-cut], len(data), None)
        with pytest.raises(ChunkError, match="chunk 7"):
            _decode(codec, frame + b"\0" * 4, len(data), None)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.level}-{c.block_size >> 10}k")
def test_a_wrong_digest_is_a_checksum_mismatch(codec):
    data = os.urandom(8192)
    encoded = codec.encode(0, memoryview(data))
    with pytest.raises(ChunkError, match="checksum mismatch"):
        _decode(codec, encoded.frame, len(data), block_digests(data[::-1], codec.block_size))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.level}-{c.block_size >> 10}k")
def test_a_codec_is_safe_from_every_worker_at_once(codec):
    chunks = [random.Random(i).randbytes(32 << 10) + bytes(32 << 10) for i in range(64)]

    def round_trip(i: int) -> bool:
        encoded = codec.encode(i, memoryview(chunks[i]))
        return _decode(codec, encoded.frame, len(chunks[i]), encoded.digest, i) == chunks[i]
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(len(chunks))))


def test_an_image_names_its_codec():
    assert codec_of(ImageHeader(volume_size=1 << 30, chunk_size=4 << 20, level=9)) == ZstdCodec(9, 16 << 10)
    assert codec_of(ImageHeader(volume_size=1 << 40, chunk_size=4 << 20, level=3)) == ZstdCodec(3, 1 << 20)


@pytest.mark.parametrize("gib, block_kib", [(1, 16), (4, 16), (5, 32), (16, 64), (64, 64), (100, 128), (1024, 1024),
                                            (8192, 4096)])
def test_small_volumes_get_small_blocks_and_no_table_outgrows_its_cap(gib, block_kib):
    """Blocks of 16 KiB while the digest table stays within 8 MiB, 64 KiB while it stays within
    32 MiB, then larger; never past 4 MiB."""
    size = gib << 30
    assert chain_block_size(size) == block_kib << 10
    table = -(-size // chain_block_size(size)) * 32
    assert table <= (8 << 20 if block_kib < 64 else 32 << 20) or block_kib == 4096


def test_a_digest_per_block_names_where_the_chunk_differs():
    codec = ZstdCodec(3, 4096)
    data = bytearray(sample_chunks(64 << 10)["random"])
    digests = codec.encode(0, memoryview(bytes(data))).digest
    assert len(digests) == 16 * 32
    data[5 * 4096 + 17] ^= 1
    changed = block_digests(bytes(data), 4096)
    differ = [i for i in range(16) if changed[i * 32:(i + 1) * 32] != digests[i * 32:(i + 1) * 32]]
    assert differ == [5]
