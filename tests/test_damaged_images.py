"""Damaged images: every damage is reported, in one line, by verify (file and stream) and by
restore, which never leaves wrong bytes behind; nothing a damaged frame claims is allocated."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import uuid
import random
import resource
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from imager import jobs
from imager.ends.feeds import StreamFeed
from imager.errors import ImageFormatError, ImagerError
from imager.format import HEADER_MAGIC, HEADER_TAG, ImageReader, decode_header, encode_header, skippable_frame, zero_frame

from conftest import LoopFactory, imager, run, sweep_size

CHUNK = 256 << 10
SEED = 0x1DA9


@dataclass
class Pristine:
    """A whole image of a small ext4 volume, the volume's bytes, and where its frames lie."""

    data: bytes
    volume: bytes
    regions: dict[str, list[tuple[int, int]]]  # kind of frame -> [(start, end)] in the image
    chunk_frames: list[tuple[int, int]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    work = tmp_path_factory.mktemp("pristine")
    loops = LoopFactory(work)
    try:
        dev = loops.create(16 << 20, fs="ext4")
        point = loops.mount(dev)
        run("cp", "-r", "/usr/share/doc/apt", str(point))
        (point / "random.bin").write_bytes(random.Random(SEED).randbytes(2 << 20))
        (point / "text.txt").write_text("a line of an ordinary text file\n" * 20000)
        loops.umount(point)
        image = work / "pristine.zst"
        jobs.backup(dev, str(image), options=jobs.ImagingOptions(chunk_size=CHUNK))
        with open(dev, "rb") as f:
            volume = f.read()
    finally:
        loops.cleanup()
    data = image.read_bytes()
    with ImageReader(str(image)) as reader:
        n = reader.chunk_count
        frames = list(zip(reader.chunk_offsets, reader.chunk_frame_sizes))
        zero = zero_frame(CHUNK, reader.header.level)
        trailer_start = frames[-1][0] + frames[-1][1]
        table_start = len(data) - (8 + (n + 2) * 8 + 9)
        regions = {
            "header": [(0, len(reader.header_frame))],
            "chunk": [(o, o + s) for o, s in frames if data[o:o + s] != zero],
            "zero chunk": [(o, o + s) for o, s in frames if data[o:o + s] == zero],
            "trailer": [(trailer_start, table_start)],
            "seek table": [(table_start, len(data))],
        }
    assert all(regions.values()), {k: len(v) for k, v in regions.items()}
    return Pristine(data, volume, regions, frames)


def _damage(p: Pristine, rng: random.Random) -> tuple[str, bytes]:
    """One seeded random damage: (what was done, the damaged image's bytes)."""
    kind = rng.choice(("flip", "flip", "flip", "truncate", "append", "zero", "swap"))
    data = bytearray(p.data)
    if kind == "flip":
        where = rng.choice(sorted(p.regions))
        start, end = rng.choice(p.regions[where])
        pos = rng.randrange(start, end)
        data[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        return f"flip in {where}", bytes(data)
    if kind == "truncate":
        return "truncate", bytes(data[:rng.randrange(len(data))])
    if kind == "append":
        return "append", bytes(data) + rng.randbytes(rng.choice((1, 3, 8, 9, 100, 4096)))
    if kind == "zero":
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randrange(1, 4096))
        data[start:end] = bytes(end - start)
        return "zero range", bytes(data)
    i, j = sorted(rng.sample(range(len(p.chunk_frames)), 2))
    (oi, si), (oj, sj) = p.chunk_frames[i], p.chunk_frames[j]
    swapped = data[:oi] + data[oj:oj + sj] + data[oi + si:oj] + data[oi:oi + si] + data[oj + sj:]
    return "swap chunk frames", bytes(swapped)


def _damaged_images(p: Pristine, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    cases = []
    while len(cases) < count:
        what, data = _damage(p, rng)
        if data != p.data:  # zeroing zeros or swapping two zero frames leaves the image whole
            cases.append((what, data))
    return cases


@contextmanager
def _address_space_capped(headroom: int):
    """Turn any large allocation into a MemoryError: a damaged size field must never be
    believed, and without a cap an allocation that fits in RAM would pass unnoticed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _one_line(e: ImagerError) -> str:
    message = str(e)
    assert message and "\n" not in message, repr(message)
    return message


def _check_reported(image: Path, target: Path, volume: bytes) -> None:
    """Verify of the file and of the stream report the damage; restore fails in one line and
    leaves nothing, or (were the damage harmless) gives back exactly the volume."""
    try:
        result = jobs.verify(str(image), workers=2)
        assert not result.ok, "verify passed a damaged image"
    except ImageFormatError as e:
        _one_line(e)
    with open(image, "rb") as stream:
        with pytest.raises(ImageFormatError) as caught:
            jobs.verify_feed(StreamFeed(stream, "standard input"), workers=2)
        _one_line(caught.value)
    try:
        jobs.restore(str(image), str(target), workers=2)
    except ImagerError as e:
        _one_line(e)
        assert not target.exists(), "a failed restore left a file behind"
        return
    assert target.read_bytes() == volume, "restore wrote wrong bytes without an error"
    target.unlink()


@pytest.mark.sweep
def test_every_damage_is_reported_and_nothing_wrong_restored(pristine, tmp_path):
    cases = _damaged_images(pristine, sweep_size(1500, 150))
    image = tmp_path / "damaged.zst"
    target = tmp_path / "restored.raw"
    kinds: collections.Counter = collections.Counter()
    # The pristine image first: it passes, and the thread pools exist before the cap.
    image.write_bytes(pristine.data)
    assert jobs.verify(str(image), workers=2).ok
    with _address_space_capped(1 << 30):
        for what, data in cases:
            image.write_bytes(data)
            try:
                _check_reported(image, target, pristine.volume)
            except AssertionError as e:
                raise AssertionError(f"{what} (case {sum(kinds.values())}): {e}") from None
            kinds[what] += 1
    print(f"\n{sum(kinds.values())} damaged images, every one reported: "
          + ", ".join(f"{n} {what}" for what, n in sorted(kinds.items())))


def _cli_fails_in_one_line(*args: str, **kw) -> str:
    r = imager(*args, **kw)
    assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imager: error: "), (args, r.stderr)
    return lines[0]


def test_cli_reports_damage_in_one_line(pristine, tmp_path):
    """Through the CLI as a user runs it: file and standard input, verify, restore and info."""
    p = pristine
    header_end = p.regions["header"][0][1]
    chunk_start, chunk_end = p.regions["chunk"][0]
    table_start = p.regions["seek table"][0][0]
    trailer_start = p.regions["trailer"][0][0]

    def flipped(pos: int) -> bytes:
        data = bytearray(p.data)
        data[pos] ^= 0x10
        return bytes(data)

    # (name, bytes, whether `imager info` on the file reads the damaged part)
    cases = [
        ("header", flipped(header_end - 5), True),
        ("chunk", flipped((chunk_start + chunk_end) // 2), False),
        ("trailer", flipped(trailer_start + 60), True),
        ("seek table", flipped(table_start + 20), True),
        ("truncated", p.data[:(chunk_start + chunk_end) // 2], True),
        ("garbage", p.data + b"\0garbage\n" * 7, True),
    ]
    for name, data, info_sees_it in cases:
        image = tmp_path / f"{name}.zst"
        image.write_bytes(data)
        target = tmp_path / f"{name}.raw"
        _cli_fails_in_one_line("verify", str(image))
        _cli_fails_in_one_line("restore", str(image), str(target))
        assert not target.exists()
        for command in (("verify", "-"), ("info", "-")):
            with open(image, "rb") as stdin:
                _cli_fails_in_one_line(*command, stdin=stdin)
        if info_sees_it:
            _cli_fails_in_one_line("info", str(image))


def _with(p: Pristine, tmp_path: Path, changes: dict[int, int] = {}, data: bytes | None = None) -> Path:
    """The pristine image with bytes XORed (position -> mask), or other bytes altogether."""
    damaged = bytearray(p.data if data is None else data)
    for pos, mask in changes.items():
        damaged[pos] ^= mask
    image = tmp_path / "damaged.zst"
    image.write_bytes(damaged)
    return image


def _reported(image: Path, match: str) -> None:
    """Verify of the file and of the stream both fail, in one line matching `match`."""
    with pytest.raises(ImageFormatError, match=match) as caught:
        jobs.verify(str(image), workers=2)
    _one_line(caught.value)
    with open(image, "rb") as stream, pytest.raises(ImageFormatError, match=match) as caught:
        jobs.verify_feed(StreamFeed(stream, "stdin"), workers=2)
    _one_line(caught.value)


def test_a_zero_frame_claiming_a_huge_size_is_refused_unallocated(pristine, tmp_path):
    start, _ = pristine.regions["zero chunk"][0]
    index = [o for o, _ in pristine.chunk_frames].index(start)
    # The frame header: magic, descriptor (single segment, 4-byte content size), content size.
    assert pristine.data[start + 4] == 0xA4
    image = _with(pristine, tmp_path, {start + 8: 0xFF})  # claims ~4 GiB
    with _address_space_capped(1 << 30):
        _reported(image, rf"chunk {index} .*claims 4278452224 bytes, the chunk holds {CHUNK}")


def test_a_flip_that_decodes_to_the_same_bytes_is_found_by_the_stream_digest(pristine, tmp_path):
    """Bit 4 of a zstd frame header descriptor is unused: zstd decodes the frame the same.
    verify reports it; restore, which checks every chunk's contents, gives back the volume."""
    for region in ("chunk", "zero chunk"):
        start, _ = pristine.regions[region][0]
        image = _with(pristine, tmp_path, {start + 4: 0x10})
        _reported(image, "stream checksum mismatch")
        restored = tmp_path / f"restored-{region.replace(' ', '-')}.raw"
        jobs.restore(str(image), str(restored))
        assert restored.read_bytes() == pristine.volume


def test_header_and_trailer_metadata_are_checksummed(pristine, tmp_path):
    header_end = pristine.regions["header"][0][1]
    volume_size = pristine.data.index(b'"volume_size": ', 0, header_end) + len(b'"volume_size": ')
    _reported(_with(pristine, tmp_path, {volume_size: 0x01}), r"image header is corrupted \(its checksum")
    trailer_start = pristine.regions["trailer"][0][0]
    totals = pristine.data.index(b'"zero_chunks": ', trailer_start) + len(b'"zero_chunks": ')
    _reported(_with(pristine, tmp_path, {totals: 0x01}), r"image trailer is corrupted \(its checksum")


def test_a_header_from_another_image_does_not_pass(pristine, tmp_path):
    header_end = pristine.regions["header"][0][1]
    header = decode_header(pristine.data[8:header_end])
    other = encode_header(dataclasses.replace(header, image_id=uuid.uuid4().hex))
    assert len(other) == header_end
    image = _with(pristine, tmp_path, data=other + pristine.data[header_end:])
    with pytest.raises(ImageFormatError, match="header does not belong to this image"):
        jobs.info(str(image))
    _reported(image, "header does not belong to this image")


def test_garbage_after_the_seek_table_is_named_as_such(pristine, tmp_path):
    for garbage in (b"\0", b"not an image" * 100, pristine.data[-9:]):
        image = _with(pristine, tmp_path, data=pristine.data + garbage)
        _reported(image, rf"{len(garbage)} bytes of garbage after the end of the image \(offset {len(pristine.data)}\)")


def test_seek_table_descriptor_bits_are_checked(pristine, tmp_path):
    descriptor = len(pristine.data) - 5
    for bit in range(8):
        _reported(_with(pristine, tmp_path, {descriptor: 1 << bit}), "seek table")


def test_a_version_1_image_is_refused_by_version(pristine, tmp_path):
    header_end = pristine.regions["header"][0][1]
    meta = dict(decode_header(pristine.data[8:header_end]).to_dict(), format=1)
    v1 = skippable_frame(HEADER_MAGIC, HEADER_TAG + json.dumps(meta).encode())
    image = _with(pristine, tmp_path, data=v1 + pristine.data[header_end:])
    _reported(image, "image format version 1 is not supported")


@dataclass
class PristineChain:
    """A full image and a digest incremental of the same small ext4 volume, the volume's bytes
    at the incremental's point, and where the incremental's block frames lie."""

    full: bytes
    incremental: bytes
    volume: bytes
    block_frames: list[tuple[int, int]]


@pytest.fixture(scope="module")
def pristine_chain(tmp_path_factory) -> PristineChain:
    work = tmp_path_factory.mktemp("pristine-chain")
    loops = LoopFactory(work)
    rng = random.Random(SEED)
    try:
        dev = loops.create(16 << 20, fs="ext4")
        point = loops.mount(dev)
        (point / "random.bin").write_bytes(rng.randbytes(2 << 20))
        (point / "text.txt").write_text("a line of an ordinary text file\n" * 20000)
        loops.umount(point)
        options = jobs.ImagingOptions(chunk_size=CHUNK)
        jobs.backup(dev, str(work / "full.zst"), options=options)
        point = loops.mount(dev)
        with open(point / "random.bin", "r+b") as f:
            for _ in range(12):
                f.seek(rng.randrange(2 << 20))
                f.write(rng.randbytes(rng.randrange(4096, 65536)))
        with open(point / "text.txt", "a") as f:
            f.write("appended after the full\n" * 3000)
        loops.umount(point)
        result = jobs.backup(dev, str(work / "incremental.zst"),
                             options=dataclasses.replace(options, incremental=True, parent=str(work / "full.zst")))
        assert result.kind == "incremental" and result.method == "digest", result.reason
        with open(dev, "rb") as f:
            volume = f.read()
    finally:
        loops.cleanup()
    with ImageReader(str(work / "incremental.zst")) as reader:
        zero = zero_frame(reader.header.chunk_size, reader.header.level)
        data = (work / "incremental.zst").read_bytes()
        frames = [(o, o + s) for o, s in zip(reader.chunk_offsets, reader.chunk_frame_sizes) if data[o:o + s] != zero]
    assert len(frames) >= 8, len(frames)
    return PristineChain((work / "full.zst").read_bytes(), data, volume, frames)


def test_a_damaged_incremental_fails_restore_verify_and_consolidate(pristine_chain, tmp_path):
    """A byte flipped in one of an incremental's blocks: restore, verify and consolidate of that
    chain point each fail in one line naming the chunk and leave nothing behind (or, were the
    flip harmless, give exactly the volume); never a wrong volume, never a wrong synthetic full."""
    p = pristine_chain
    (tmp_path / "full.zst").write_bytes(p.full)
    image, target, synthetic = tmp_path / "incremental.zst", tmp_path / "restored.raw", tmp_path / "synthetic.zst"
    image.write_bytes(p.incremental)
    assert jobs.verify(str(image), workers=2).ok
    rng = random.Random(SEED)
    # Two blocks of random bytes compress to frames of one size: swapped, each is a whole zstd
    # frame with a right content checksum, in the other's place. Only the digests can tell.
    sizes = collections.defaultdict(list)
    for start, end in p.block_frames:
        sizes[end - start].append(start)
    alike = [starts for starts in sizes.values() if len(starts) > 1]
    assert alike, "no two block frames of one size to swap"
    for case in range(sweep_size(200, 24)):
        damaged = bytearray(p.incremental)
        if case % 3 == 0:
            a, b = rng.sample(rng.choice(alike), 2)
            size = next(end - start for start, end in p.block_frames if start == a)
            if damaged[a:a + size] == damaged[b:b + size]:
                continue                    # two blocks of the same bytes: swapped, nothing changes
            damaged[a:a + size], damaged[b:b + size] = damaged[b:b + size], damaged[a:a + size]
            where = f"case {case}, frames at {a} and {b} swapped"
        else:
            start, end = rng.choice(p.block_frames)
            pos = rng.randrange(start, end)
            damaged[pos] ^= rng.randrange(1, 256)
            where = f"case {case}, byte at image offset {pos} changed"
        image.write_bytes(damaged)
        try:
            result = jobs.verify(str(image), workers=2)
            assert not result.ok, f"verify passed a damaged incremental ({where})"
        except ImageFormatError as e:
            assert "chunk" in _one_line(e), (where, str(e))
        try:
            jobs.restore(str(image), str(target), workers=2)
        except ImagerError as e:
            assert "chunk" in _one_line(e), (where, str(e))
            assert not target.exists(), f"a failed restore left a file behind ({where})"
        else:
            assert target.read_bytes() == p.volume, f"restore wrote wrong bytes without an error ({where})"
            target.unlink()
        try:
            jobs.consolidate(str(image), jobs.Destination(output=str(synthetic), force=True), workers=2)
        except ImagerError as e:
            assert "chunk" in _one_line(e), (where, str(e))
            assert not synthetic.exists(), f"a failed consolidate left an image behind ({where})"
        else:
            restored = tmp_path / "synthetic.raw"
            jobs.restore(str(synthetic), str(restored), workers=2)
            assert restored.read_bytes() == p.volume, f"consolidate wrote a wrong full without an error ({where})"
            restored.unlink()
            synthetic.unlink()
