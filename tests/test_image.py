"""Backup to a seekable zstd image, restore, verify, random access: on real loop devices and ext4."""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imager import jobs
from imager.errors import UsageError
from imager.format import SEEK_TABLE_MAGIC, ImageReader

from devices import loop

from conftest import device_size, file_checksums, fsck_clean, imager, run, same_bytes
from lab import cached_bytes


@pytest.fixture
def imaged(ext4_volume, tmp_path):
    dev, sums = ext4_volume
    image = tmp_path / "vol.zst"
    result = imager("backup", dev, "-o", str(image), "--json", "--chunk-size", "1M")
    assert result.returncode == 0, result.stderr
    return dev, sums, image, json.loads(result.stdout)["images"][0]


def test_stock_zstd_decompresses_image_to_the_device_bytes(imaged, tmp_path):
    dev, _, image, summary = imaged
    assert run("zstd", "-t", "-q", str(image), check=False).returncode == 0
    raw = tmp_path / "raw"
    run("zstd", "-d", "-q", str(image), "-o", str(raw))
    assert raw.stat().st_size == device_size(dev)
    assert same_bytes(str(raw), dev, device_size(dev))
    assert summary["volume_size"] == device_size(dev)
    assert summary["image_bytes"] == image.stat().st_size
    assert summary["zero_chunks"] > 0


def test_image_is_a_seekable_zstd_file_with_its_seek_table_last(imaged):
    _, _, image, summary = imaged
    data = image.read_bytes()
    count, descriptor, magic = struct.unpack("<IBI", data[-9:])
    assert magic == 0x8F92EAB1
    table_size = count * 8 + 9
    assert struct.unpack("<II", data[-table_size - 8:-table_size]) == (SEEK_TABLE_MAGIC, table_size)
    assert count == summary["chunks"] + 2  # header, chunks, trailer
    # every chunk frame carries zstd's content checksum (frame header descriptor bit 2)
    with ImageReader(str(image)) as reader:
        for i in range(reader.chunk_count):
            frame = reader.frame(i)
            assert frame[4] & 0x04, f"chunk {i} has no content checksum"


def _fill_with_garbage(path) -> None:
    """Old data on a restore target: the zero chunks of the image must overwrite it."""
    with open(path, "r+b") as f:
        block = os.urandom(1 << 20)
        for _ in range(os.path.getsize(path) >> 20):
            f.write(block)


@pytest.mark.parametrize("extra", [0, 64 << 20], ids=["same-size", "larger"])
def test_restore_onto_loop_device_gives_same_bytes_and_files(imaged, loops, extra):
    dev, sums, image, _ = imaged
    size = device_size(dev)
    target = loops.create(size + extra, fill=_fill_with_garbage)
    result = imager("restore", str(image), target, "--verify")
    assert result.returncode == 0, result.stderr
    assert same_bytes(dev, target, size)
    assert fsck_clean(target).returncode == 0
    point = loops.mount(target, "ro")
    assert file_checksums(point) == sums


def test_restore_to_file_leaves_holes_for_zero_chunks(imaged, tmp_path):
    dev, _, image, summary = imaged
    out = tmp_path / "restored.raw"
    assert imager("restore", str(image), str(out)).returncode == 0
    assert same_bytes(dev, str(out), device_size(dev))
    allocated = out.stat().st_blocks * 512
    # the filesystem holding the file may add a few blocks of its own (extent tree)
    assert allocated <= device_size(dev) - summary["zero_chunks"] * summary["chunk_size"] + (1 << 20)


def test_a_restore_leaves_the_target_out_of_the_page_cache(imaged, loops, tmp_path):
    """A restore writes with O_DIRECT: restoring a volume must not push the machine's cached data
    out (nor pay a copy into the page cache per byte), onto a device or into a new file."""
    dev, _, image, summary = imaged
    size = device_size(dev)
    written = (summary["chunks"] - summary["zero_chunks"]) * summary["chunk_size"]
    bound = 4 << 20
    assert written >= 4 * bound, written
    target = loops.create(size)
    with open(target, "rb"):       # held open: the last close would drop the device's cache itself
        result = imager("restore", str(image), target)
        assert result.returncode == 0, result.stderr
        assert cached_bytes(target) < bound
    assert same_bytes(dev, target, size)
    out = tmp_path / "restored.raw"
    result = imager("restore", str(image), str(out))
    assert result.returncode == 0, result.stderr
    assert cached_bytes(str(out)) < bound
    assert same_bytes(dev, str(out), size)


def test_a_restore_onto_a_target_that_refuses_o_direct_goes_through_the_page_cache(tmp_path):
    """A last chunk shorter than the target's 4096-byte sectors is refused by O_DIRECT midway:
    the restore goes on through the page cache and gives the same bytes."""
    source = tmp_path / "odd.raw"
    source.write_bytes(os.urandom((8 << 20) + 512))
    image = tmp_path / "odd.zst"
    result = imager("backup", str(source), "-o", str(image), "--chunk-size", "1M")
    assert result.returncode == 0, result.stderr
    backing = tmp_path / "sectors4k.img"
    with open(backing, "wb") as f:
        f.truncate(12 << 20)
    target = loop.attach(str(backing), block_size=4096)
    try:
        result = imager("restore", str(image), target, "-v")
        assert result.returncode == 0, result.stderr
        assert "O_DIRECT write refused; using buffered I/O" in result.stderr
        assert same_bytes(str(source), target, (8 << 20) + 512)
    finally:
        loop.detach(target)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_access_reads_equal_the_device(imaged, data):
    dev, _, image, _ = imaged
    size = device_size(dev)
    with ImageReader(str(image)) as reader, open(dev, "rb") as f:
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(0, min(size - offset, 3 << 20)))
        f.seek(offset)
        assert reader.read(offset, length) == f.read(length)


def test_read_clips_at_the_end_of_the_volume(imaged):
    dev, _, image, _ = imaged
    size = device_size(dev)
    with ImageReader(str(image)) as reader, open(dev, "rb") as f:
        f.seek(size - 100)
        assert reader.read(size - 100, 1000) == f.read()


def _first_data_chunk(image) -> tuple[int, int, int]:
    with ImageReader(str(image)) as reader:
        for i in range(reader.chunk_count):
            if reader.decode(i, reader.frame(i)) is not None:
                return i, reader.chunk_offsets[i], reader.chunk_frame_sizes[i]
    raise AssertionError("no data chunk")


def test_flipped_byte_in_a_chunk_is_named_by_verify_and_restore(imaged, tmp_path):
    _, _, image, _ = imaged
    index, offset, size = _first_data_chunk(image)
    with open(image, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    v = imager("verify", str(image))
    assert v.returncode == 1
    assert f"chunk {index} (image offset {offset}" in v.stderr
    assert "Traceback" not in v.stderr and len(v.stderr.strip().splitlines()) == 1
    out = tmp_path / "restored.raw"
    r = imager("restore", str(image), str(out))
    assert r.returncode == 1 and f"chunk {index}" in r.stderr
    assert not out.exists(), "a failed restore to a file must not leave a partial file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored.raw")]


def test_truncated_image_is_reported_with_the_chunk_it_cuts(imaged, tmp_path):
    _, _, image, _ = imaged
    index, offset, size = _first_data_chunk(image)
    os.truncate(image, offset + size // 2)
    for cmd in (["verify", str(image)], ["restore", str(image), str(tmp_path / "r.raw")], ["info", str(image)]):
        r = imager(*cmd)
        assert r.returncode == 1, cmd
        assert "truncated" in r.stderr and f"chunk {index} " in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "r.raw").exists()


def test_removed_seek_table_is_reported(imaged):
    _, _, image, summary = imaged
    data = image.read_bytes()
    count = struct.unpack("<I", data[-9:-5])[0]
    os.truncate(image, len(data) - (8 + count * 8 + 9))
    r = imager("verify", str(image))
    assert r.returncode == 1
    assert "seek table" in r.stderr and "missing" in r.stderr
    assert f"all {summary['chunks']} chunks present" in r.stderr


def test_corrupted_header_is_not_an_image(tmp_path):
    bogus = tmp_path / "bogus.zst"
    bogus.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    r = imager("info", str(bogus))
    assert r.returncode == 2 and "not an imager image" in r.stderr     # the wrong file given


def test_backup_bad_inputs_give_one_line_errors(tmp_path, ext4_volume):
    dev, _ = ext4_volume
    existing = tmp_path / "exists.zst"
    existing.write_bytes(b"keep me")
    cases = [
        (["backup", str(tmp_path / "missing"), "-o", str(tmp_path / "a.zst")], "no such device or file"),
        (["backup", str(tmp_path), "-o", str(tmp_path / "a.zst")], "is a directory"),
        (["backup", dev, "-o", str(existing)], "already exists"),
        (["backup", dev, "-o", str(tmp_path / "nodir" / "a.zst")], "no such directory"),
        (["backup", dev, "-o", str(tmp_path / "a.zst"), "--level", "40"], "out of range"),
    ]
    for args, message in cases:
        r = imager(*args)
        assert r.returncode == 2, args
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "a.zst").exists()


def test_backup_with_force_replaces_existing_image(tmp_path, ext4_volume):
    dev, _ = ext4_volume
    image = tmp_path / "vol.zst"
    image.write_bytes(b"old")
    assert imager("backup", dev, "-o", str(image), "--force", "-q").returncode == 0
    assert jobs.verify(str(image)).ok


def test_restore_refuses_too_small_mounted_and_existing_targets(imaged, loops, tmp_path):
    dev, _, image, _ = imaged
    small = loops.create(device_size(dev) // 2)
    r = imager("restore", str(image), small)
    assert r.returncode == 2 and "too small" in r.stderr

    mounted = loops.create(device_size(dev), fs="ext4")
    point = loops.mount(mounted)
    (point / "precious").write_text("do not lose")
    r = imager("restore", str(image), mounted)
    assert r.returncode == 2 and "mounted" in r.stderr
    assert (point / "precious").read_text() == "do not lose"

    # Mounted through a loop device on it, or a loop device with an offset (a partition mapped
    # by hand): refused, also with --force, naming the mount.
    under = loops.create(device_size(dev))
    for offset in (0, 1 << 20):
        above = loop.attach(under, offset=offset)
        try:
            run("mkfs.ext4", "-q", "-F", above)
            point = loops.mount(above)
            (point / "precious").write_text("do not lose")
            r = imager("restore", str(image), under, "--force")
            assert r.returncode == 2 and f"is mounted through {above} at {point}" in r.stderr, r.stderr
            assert (point / "precious").read_text() == "do not lose"
            loops.umount(point)
            run("e2fsck", "-fn", above)
        finally:
            loop.detach(above)

    existing = tmp_path / "exists.raw"
    existing.write_bytes(b"keep")
    r = imager("restore", str(image), str(existing))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert existing.read_bytes() == b"keep"
    assert imager("restore", str(image), str(existing), "--force").returncode == 0
    assert same_bytes(dev, str(existing), device_size(dev))

    r = imager("restore", str(tmp_path / "nope.zst"), str(tmp_path / "x"))
    assert r.returncode == 2 and "no such image" in r.stderr
    for res in (r,):
        assert "Traceback" not in res.stderr


def test_api_backup_restore_verify_round_trip(ext4_volume, tmp_path):
    dev, _ = ext4_volume
    image = str(tmp_path / "api.zst")
    seen = []
    result = jobs.backup(dev, image, options=jobs.ImagingOptions(level=1, chunk_size=2 << 20), progress=seen.append)
    assert sum(seen) == result.volume_size == device_size(dev)
    assert result.bytes_written == os.path.getsize(image)
    assert jobs.verify(image).chunks == result.chunks
    with pytest.raises(UsageError):
        jobs.backup(dev, image)
    out = str(tmp_path / "out.raw")
    jobs.restore(image, out, verify=True)
    assert same_bytes(dev, out, result.volume_size)
    info = jobs.info(image)
    assert info.header.source["fs_type"] == "ext4"
    assert info.header.level == 1 and info.totals["complete"]


def test_verify_after_restore_catches_a_target_that_lost_writes(imaged, tmp_path):
    """--verify must compare what is on the medium, not what the restore meant to write."""
    dev, _, image, _ = imaged
    out = tmp_path / "out.raw"
    jobs.restore(str(image), str(out))
    index, _, _ = _first_data_chunk(image)
    with ImageReader(str(image)) as reader:
        with open(out, "r+b") as f:
            f.seek(index * reader.header.chunk_size + 4096)
            f.write(b"\xff" * 16)
        with pytest.raises(Exception, match=f"chunk {index}"):
            jobs.compare_with_digests(str(out), reader.header.volume_size, reader.header.chunk_size,
                                      reader.header.block_size, reader.trailer.digests)


def test_info_and_verify_json(imaged):
    _, _, image, summary = imaged
    info = json.loads(imager("info", str(image), "--json").stdout)
    assert info["header"]["volume_size"] == summary["volume_size"]
    assert info["header"]["source"]["fs_type"] == "ext4"
    assert info["totals"]["complete"] is True and info["image_bytes"] == image.stat().st_size
    assert info["image_id"] == summary["image_id"] and info["totals"]["image_digest"] == summary["content_digest"]
    v = json.loads(imager("verify", str(image), "--json").stdout)
    assert v["ok"] is True and v["images"][0]["chunks"] == summary["chunks"]


def test_image_reader_rejects_what_is_not_an_image(tmp_path):
    with pytest.raises(UsageError, match="no such image"):
        ImageReader(str(tmp_path / "missing.zst"))
    with pytest.raises(UsageError, match="is a directory"):
        ImageReader(str(tmp_path))


# tests/data/format-v2.img: a 3 MiB + 4 KiB file volume (text, zeros, repeated random bytes, a
# tail of 0xa5) imaged by imager 3c62780, the last to write format version 2; this is the
# SHA-256 of that volume.
V2_VOLUME_SHA256 = "01f789574ba54b6e8e21a3370f3d851d9ca07fc136ef5af364f37a9128df5936"
V2_IMAGE = os.path.join(os.path.dirname(__file__), "data", "format-v2.img")


def test_an_image_of_format_version_2_still_verifies_and_restores(tmp_path):
    import hashlib
    info = json.loads(imager("info", "--json", V2_IMAGE, check=True).stdout)
    assert info["header"]["format"] == 2 and info["header"]["volume_size"] == 3 * (1 << 20) + 4096
    imager("verify", V2_IMAGE, check=True)
    target = tmp_path / "restored.img"
    imager("restore", V2_IMAGE, str(target), check=True)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == V2_VOLUME_SHA256
    # A damaged version 2 image is still caught by its chunk digests.
    damaged = tmp_path / "damaged.img"
    data = bytearray(open(V2_IMAGE, "rb").read())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(data)
    assert imager("verify", str(damaged)).returncode != 0
