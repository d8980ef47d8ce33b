"""Acceptance tests of used-block imaging, run as a user runs it: the `imager` CLI on real loop
devices holding aged ext4 and xfs volumes, a whole GPT disk, damaged or unknown contents, and
--exclude / --all-blocks. Each test checks what the user gets back after a restore (fsck, the
files, the bytes), and that free space really was left out of the image."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from devices import loop
from imager.plan.planner import plan_device, plan_disk

from conftest import (LoopFactory, device_size, file_checksums, fsck_clean, imager, populate_sample, run,
                      same_bytes)

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.access("/dev/loop-control", os.W_OK),
                                reason="needs root and /dev/loop-control")


# --- helpers ----------------------------------------------------------------------------------

def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def image_info(image: Path) -> dict:
    return json.loads(ok(imager("info", str(image), "--json")).stdout)


def backup_json(source: str, image: Path, *extra: str) -> tuple[dict, str]:
    r = ok(imager("backup", source, "-o", str(image), "--json", *extra))
    (summary,) = json.loads(r.stdout)["images"]
    return summary, r.stderr


def restore(image: Path, target: str) -> None:
    ok(imager("restore", str(image), target))


def fill_with_random(path: str | Path, start: int, end: int) -> None:
    """Random bytes over [start, end) of a file or device, written through and synced."""
    piece = os.urandom(4 * MiB)
    with open(path, "r+b") as f:
        f.seek(start)
        while start < end:
            n = min(end - start, len(piece))
            piece = piece[4093:] + piece[:4093]  # no two blocks alike
            f.write(piece[:n])
            start += n
        f.flush()
        os.fsync(f.fileno())


def age(point: Path) -> None:
    """Age a fresh filesystem: fill all its free space with random data, then delete it. Free
    blocks then hold random bytes, as on a volume that has been in use for a while."""
    path = point / "aging.bin"
    piece = os.urandom(4 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            # a different 4 MiB each time, so no two free blocks are alike (cheaper than urandom)
            piece = piece[4093:] + piece[:4093]
            try:
                written = os.write(fd, piece)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
            if written < len(piece):
                break
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    os.sync()


def aged_volume(loops: LoopFactory, fs: str, size: int = 512 * MiB) -> tuple[str, dict[str, str]]:
    """An unmounted, aged `fs` volume with real files on it; returns (device, checksums)."""
    dev = loops.create(size, fs=fs)
    point = loops.mount(dev)
    age(point)
    populate_sample(point)
    sums = file_checksums(point)
    assert len(sums) > 100
    loops.umount(point)
    return dev, sums


def free_ranges(plan, size: int) -> list[tuple[int, int]]:
    """The byte ranges a plan leaves out."""
    gaps, at = [], 0
    for start, end in plan.ranges:
        if start > at:
            gaps.append((at, start))
        at = end
    if at < size:
        gaps.append((at, size))
    return gaps


def nonzero_bytes(path: str, ranges: list[tuple[int, int]]) -> int:
    """How many bytes in `ranges` of `path` are not zero."""
    count = 0
    with open(path, "rb", buffering=0) as f:
        for start, end in ranges:
            at = start
            while at < end:
                data = os.pread(f.fileno(), min(end - at, 16 * MiB), at)
                assert data, f"{path}: short read at {at}"
                count += int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8)))
                at += len(data)
    return count


def range_bytes(path: str, start: int, end: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), end - start, start)


def files_on(loops: LoopFactory, device: str, fs: str) -> dict[str, str]:
    """fsck `device` read-only, then mount it read-only and checksum every file."""
    check = fsck_clean(device, fs)
    assert check.returncode == 0, f"fsck of {device} ({fs}) failed:\n{check.stdout}\n{check.stderr}"
    point = loops.mount(device, "ro")
    try:
        return file_checksums(point)
    finally:
        loops.umount(point)


def attach(loops: LoopFactory, path: str, **kw) -> str:
    """A loop device over `path` (or a byte range of it), detached by the loops fixture."""
    dev = loop.attach(path, **kw)
    loops.devices.append(dev)
    return dev


# --- 1. aged ext4 and xfs: only used blocks are read, free space comes back as zeros ----------

@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_aged_volume_images_only_used_blocks_and_restores_files(loops, tmp_path, fs):
    size = 512 * MiB
    dev, sums = aged_volume(loops, fs, size)
    plan = plan_device(dev)
    assert plan.mode == "used-blocks", plan
    free = free_ranges(plan, size)
    free_bytes = sum(e - s for s, e in free)
    # the source's free space holds the aging data: most of it is not zero
    source_nonzero = nonzero_bytes(dev, free)
    assert source_nonzero > free_bytes * 0.8 and free_bytes > size // 3, (source_nonzero, free_bytes)

    image = tmp_path / "used.zst"
    result, _ = backup_json(dev, image)
    header = image_info(image)["header"]
    assert header["plan"]["mode"] == "used-blocks"
    assert header["plan"]["fs_type"] == fs
    assert header["plan"]["used_bytes"] == plan.used_bytes
    assert header["plan"]["used_bytes"] < size // 2
    assert result["bytes_read"] == plan.used_bytes  # free blocks were not even read

    whole = tmp_path / "all.zst"
    backup_json(dev, whole, "--all-blocks")
    assert image.stat().st_size < whole.stat().st_size * 0.6, (image.stat().st_size, whole.stat().st_size)

    target = loops.create(size)
    restore(image, target)
    # what was free on the source is zeros on the restored volume: free space was not copied
    assert nonzero_bytes(target, free) == 0
    # and the used ranges came back byte for byte (metadata, journal, data); compared before
    # any mount, as even a read-only xfs mount rewrites the superblock's log sequence number
    for start, end in plan.ranges:
        assert range_bytes(target, start, end) == range_bytes(dev, start, end), f"used {start}-{end} differs"
    assert files_on(loops, target, fs) == sums


# --- 2. a whole GPT disk: planned partition by partition -------------------------------------

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
DISK_SIZE = 600 * MiB
DISK_SCRIPT = f"""label: gpt
start=2048, size=64MiB, type={ESP_TYPE}, name="EFI system"
start=66MiB, size=200MiB, type={LINUX_FS}, name="root"
start=270MiB, size=320MiB, type={LINUX_FS}, name="data"
"""
GPT_END = 34 * 512              # protective MBR, primary header, 128 entries of 128 bytes
BACKUP_GPT = DISK_SIZE - 33 * 512


def sfdisk_dump(device: str) -> list[str]:
    """`sfdisk -d` without the device line and with partitions named by number only."""
    out = run("sfdisk", "-d", device).stdout
    lines = []
    for line in out.splitlines():
        if line.startswith("device:"):
            continue
        if line.startswith(device):
            line = re.sub(r"^" + re.escape(device) + r"p?(\d+)\s*:", r"\1 :", line)
        lines.append(line)
    return lines


def _need_mtools() -> None:
    if shutil.which("mcopy") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "mtools"], capture_output=True)
    if shutil.which("mcopy") is None:
        pytest.skip("mtools (mcopy) is not installed and could not be installed")


def test_whole_gpt_disk_is_planned_per_partition_and_restores_onto_a_larger_disk(loops, tmp_path):
    _need_mtools()
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    subprocess.run(["sfdisk", "-q", str(disk)], input=DISK_SCRIPT, text=True, check=True, capture_output=True)
    # Everything between the GPTs holds old data: the boot loader area after the primary GPT,
    # the gaps, the space before the backup GPT (data no filesystem knows about), and the
    # partitions' free space (mkfs told not to discard it).
    fill_with_random(disk, GPT_END, BACKUP_GPT)
    outside = [(GPT_END, 1 * MiB), (65 * MiB, 66 * MiB), (266 * MiB, 270 * MiB), (590 * MiB, BACKUP_GPT)]

    esp_file = tmp_path / "BOOTX64.EFI"
    esp_file.write_bytes(os.urandom(300 * 1024))
    esp = attach(loops, str(disk), offset=1 * MiB, size_limit=64 * MiB)
    run("mkfs.vfat", "-n", "ESP", esp)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run("mmd", "-i", esp, "::/EFI", env=env)
    run("mcopy", "-i", esp, str(esp_file), "::/EFI/BOOTX64.EFI", env=env)

    filesystems = ((2, 66 * MiB, 200 * MiB, "ext4"), (3, 270 * MiB, 320 * MiB, "xfs"))
    expected = {}
    for number, start, length, fs in filesystems:
        part = attach(loops, str(disk), offset=start, size_limit=length)
        run(*(["mkfs.ext4", "-q", "-F", "-E", "nodiscard"] if fs == "ext4" else ["mkfs.xfs", "-q", "-f", "-K"]),
            part)
        point = loops.mount(part)
        if fs == "ext4":
            populate_sample(point)
        else:
            shutil.copytree("/usr/lib/python3.11/email", point / "email")
            (point / "data.bin").write_bytes(os.urandom(12 * MiB))
            os.sync()
        expected[number] = file_checksums(point)
        loops.umount(point)
    # the partitions are written; image the disk through a loop device over all of it
    source = attach(loops, str(disk))
    assert device_size(source) == DISK_SIZE
    plan = plan_disk(source)
    free = free_ranges(plan, DISK_SIZE)
    free_bytes = sum(e - s for s, e in free)
    assert free_bytes > 200 * MiB
    assert all(66 * MiB <= s and e <= 266 * MiB or 270 * MiB <= s and e <= 590 * MiB for s, e in free), \
        "only the ext4 and xfs partitions have free space to leave out"
    assert nonzero_bytes(source, free) > free_bytes * 0.9

    image = tmp_path / "disk.zst"
    result, _ = backup_json(source, image)
    assert result["bytes_read"] == plan.used_bytes  # the filesystems' free space was not read

    text = ok(imager("info", str(image))).stdout
    assert "gpt table, 3 partitions" in text, text
    esp_lines = [line for line in text.splitlines() if "(EFI system)" in line]
    assert len(esp_lines) == 1 and "EFI System" in esp_lines[0] and re.match(r"\s*1\s", esp_lines[0]), text
    header = image_info(image)["header"]
    table = header["partitions"]
    assert table["scheme"] == "gpt" and len(table["partitions"]) == 3
    assert [p["is_esp"] for p in table["partitions"]] == [True, False, False]
    assert header["plan"]["mode"] == "used-blocks" and header["plan"]["used_bytes"] == plan.used_bytes
    parts = {p["number"]: p for p in header["plan"]["parts"]}
    assert (parts[1]["mode"], parts[1]["fs_type"]) == ("all-blocks", "vfat")
    assert "EFI system partition" in parts[1]["reason"]
    assert (parts[2]["mode"], parts[2]["fs_type"]) == ("used-blocks", "ext4")
    assert (parts[3]["mode"], parts[3]["fs_type"]) == ("used-blocks", "xfs")

    # The target had partitions of its own, given devices by hand (this kernel scans no tables):
    # after the restore the kernel's partitions are the restored table's, and the larger disk's
    # misplaced GPT backup header is said.
    target = loops.create(DISK_SIZE + 100 * MiB)
    subprocess.run(["sfdisk", "-q", target], input="label: dos\nstart=2048, size=409600, type=83\n"
                   "start=411648, size=20480, type=83\n", text=True, check=True, capture_output=True)
    run("partx", "-a", target)
    try:
        done = ok(imager("restore", str(image), target, "--force"))
        assert f"sgdisk -e {target}" in done.stderr, done.stderr
        name = os.path.basename(target)
        kernel = {}
        for entry in os.listdir(f"/sys/class/block/{name}"):
            if os.path.exists(f"/sys/class/block/{name}/{entry}/partition"):
                read = lambda field: int(open(f"/sys/class/block/{name}/{entry}/{field}").read())
                kernel[read("partition")] = (read("start") * 512, read("size") * 512)
        assert kernel == {p["number"]: (p["start_byte"], p["size_bytes"]) for p in table["partitions"]}, kernel
    finally:
        run("partx", "-d", target, check=False)

    assert sfdisk_dump(target) == sfdisk_dump(source)
    # the table, the gaps, the ESP (imaged whole, free clusters and all) and the backup GPT
    for start, end in [(0, 1 * MiB), (1 * MiB, 65 * MiB)] + outside + [(BACKUP_GPT, DISK_SIZE)]:
        assert range_bytes(target, start, end) == range_bytes(source, start, end), f"bytes {start}-{end} differ"
    # the filesystems' free space was not copied
    assert nonzero_bytes(target, free) == 0
    restored_esp = attach(loops, target, offset=1 * MiB, size_limit=64 * MiB)
    assert run("fsck.vfat", "-n", restored_esp, check=False).returncode == 0
    got = subprocess.run(["mtype", "-i", restored_esp, "::/EFI/BOOTX64.EFI"], env=env, check=True,
                         capture_output=True).stdout
    assert got == esp_file.read_bytes()
    for number, start, length, fs in filesystems:
        part = attach(loops, target, offset=start, size_limit=length)
        assert files_on(loops, part, fs) == expected[number], f"partition {number} ({fs})"


# --- 3. unknown or damaged contents are imaged whole, with the reason -------------------------

def _random_device(loops: LoopFactory) -> str:
    return loops.create(64 * MiB, fill=lambda path: fill_with_random(path, 0, 64 * MiB))


def _ext4_with_files(loops: LoopFactory) -> str:
    dev = loops.create(128 * MiB, fs="ext4")
    point = loops.mount(dev)
    (point / "a.bin").write_bytes(os.urandom(6 * MiB))
    shutil.copytree("/usr/lib/python3.11/json", point / "json")
    loops.umount(point)
    return dev


def _ext4_superblock_zeroed(loops: LoopFactory) -> str:
    dev = _ext4_with_files(loops)
    with open(dev, "r+b") as f:
        f.seek(1024)
        f.write(bytes(1024))
        f.flush()
        os.fsync(f.fileno())
    return dev


def _ext4_with_recorded_errors(loops: LoopFactory) -> str:
    dev = _ext4_with_files(loops)
    run("tune2fs", "-E", "force_fsck", dev)  # sets the "errors" state, as the kernel does on damage
    return dev


def _xfs_with_a_dirty_log(loops: LoopFactory) -> str:
    """An xfs shut down with transactions in its log (as by a crash), then unmounted."""
    dev = loops.create(320 * MiB, fs="xfs")
    point = loops.mount(dev)
    shutil.copytree("/usr/lib/python3.11/json", point / "json")
    (point / "a.bin").write_bytes(os.urandom(4 * MiB))
    os.sync()
    (point / "late").mkdir()  # logged, not yet written back
    run("xfs_io", "-x", "-c", "shutdown", str(point))  # without -f: the log is not flushed
    loops.umount(point)
    return dev


@pytest.mark.parametrize("make, reason_pattern", [
    (_random_device, "unknown filesystem"),
    (_ext4_superblock_zeroed, "unknown filesystem|damaged"),
    (_ext4_with_recorded_errors, "damaged filesystem: the superblock records errors"),
    (_xfs_with_a_dirty_log, "xfs log needs recovery"),
], ids=["random-bytes", "ext4-superblock-zeroed", "ext4-errors-recorded", "xfs-dirty-log"])
def test_unknown_or_damaged_volume_is_imaged_whole_with_the_reason(loops, tmp_path, make, reason_pattern):
    dev = make(loops)
    size = device_size(dev)
    image = tmp_path / "whole.zst"
    result, stderr = backup_json(dev, image)
    plan = image_info(image)["header"]["plan"]
    assert plan["mode"] == "all-blocks"
    reason = plan.get("reason") or ""
    assert re.search(reason_pattern, reason), plan
    assert "imaging all blocks" in stderr and reason in stderr, stderr
    assert result["bytes_read"] == size
    restored = tmp_path / "restored.raw"
    restore(image, str(restored))
    assert restored.stat().st_size == size
    assert same_bytes(dev, str(restored), size)


# --- 4. --exclude ----------------------------------------------------------------------------

@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_exclude_leaves_a_mounted_files_data_out(loops, tmp_path, fs):
    dev = loops.create(320 * MiB, fs=fs)
    point = loops.mount(dev)
    big = point / "db" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(48 * MiB))
    cache = point / "cache"  # a directory: all files under it are left out
    (cache / "sub").mkdir(parents=True)
    (cache / "a.bin").write_bytes(os.urandom(3 * MiB))
    (cache / "sub" / "b.bin").write_bytes(os.urandom(2 * MiB))
    kept = point / "kept.bin"
    kept.write_bytes(os.urandom(5 * MiB))
    (point / "notes.txt").write_text("keep me\n" * 1000)
    os.sync()
    sums = file_checksums(point)
    excluded = {"db/big.bin": 48 * MiB, "cache/a.bin": 3 * MiB, "cache/sub/b.bin": 2 * MiB}
    # mounted, and unchanged while the backup runs
    run("mount", "-o", "remount,ro", str(point))

    image = tmp_path / "excl.zst"
    result, _ = backup_json(dev, image, "--exclude", str(big), "--exclude", str(cache))
    plan = image_info(image)["header"]["plan"]
    assert plan["mode"] == "used-blocks"
    assert plan["excludes"] == [str(big), str(cache)]
    assert plan["excluded_bytes"] >= sum(excluded.values())
    assert plan["excluded_bytes"] < sum(excluded.values()) + 4 * MiB
    assert result["bytes_read"] == plan["used_bytes"]  # the excluded files' blocks were not read

    target = loops.create(320 * MiB)
    restore(image, target)
    check = fsck_clean(target, fs)
    assert check.returncode == 0, check.stdout + check.stderr
    # the source is still mounted: an xfs copy has its UUID, which xfs refuses to mount twice
    restored = loops.mount(target, "ro", *(["nouuid"] if fs == "xfs" else []))
    try:
        for name, size in excluded.items():
            path = restored / name
            assert path.stat().st_size == size, name
            with open(path, "rb") as f:
                while data := f.read(8 * MiB):
                    assert not any(data), f"the excluded {name}'s data is in the image"
        got = file_checksums(restored)
    finally:
        loops.umount(restored)
    for name in excluded:
        del got[name], sums[name]
    assert got == sums and "kept.bin" in got


def _assert_refused(result: subprocess.CompletedProcess, outdir: Path, pattern: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imager: error:"), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert list(outdir.iterdir()) == [], "an image (or a temporary file) was left behind"


def _exclude_cases(dev: str, point: Path, unmounted: str) -> list[tuple[str, list[str], str]]:
    return [
        (dev, ["--exclude", str(point / "no-such-file")], "no such file"),
        (dev, ["--exclude", "/etc/hostname"], "not on the filesystem"),
        (unmounted, ["--exclude", "file.bin"], "mounted"),
        (dev, ["--exclude", str(point / "file.bin"), "--all-blocks"], "all-blocks"),
    ]


def _mounted_ext4_with_a_file(loops: LoopFactory) -> tuple[str, Path]:
    dev = loops.create(128 * MiB, fs="ext4")
    point = loops.mount(dev)
    (point / "file.bin").write_bytes(os.urandom(MiB))
    os.sync()
    return dev, point


def test_exclude_errors_are_one_line_and_leave_no_image(loops, tmp_path):
    dev, point = _mounted_ext4_with_a_file(loops)
    run("mount", "-o", "remount,ro", str(point))
    unmounted = loops.create(64 * MiB, fs="ext4")
    for n, (source, args, pattern) in enumerate(_exclude_cases(dev, point, unmounted)):
        outdir = tmp_path / f"out{n}"
        outdir.mkdir()
        _assert_refused(imager("backup", source, "-o", str(outdir / "img.zst"), *args), outdir, pattern)


def test_exclude_errors_on_a_read_write_mount_are_one_line_too(loops, tmp_path):
    """A job refused before it starts says only why: no "mounted read-write, crash-consistent"
    notice about an image that is never made."""
    dev, point = _mounted_ext4_with_a_file(loops)
    for n, (source, args, pattern) in enumerate(_exclude_cases(dev, point, dev)[:2] +
                                                _exclude_cases(dev, point, dev)[3:]):
        outdir = tmp_path / f"out{n}"
        outdir.mkdir()
        _assert_refused(imager("backup", source, "-o", str(outdir / "img.zst"), *args), outdir, pattern)


# --- 5. --all-blocks: every byte, readable by stock zstd --------------------------------------

@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_all_blocks_image_is_the_device_byte_for_byte_with_stock_zstd(loops, tmp_path, fs):
    size = 320 * MiB  # xfs wants 300 MiB at least
    dev, _ = aged_volume(loops, fs, size)
    image = tmp_path / "all.zst"
    result, _ = backup_json(dev, image, "--all-blocks")
    assert result["bytes_read"] == size
    plan = image_info(image)["header"]["plan"]
    assert plan["mode"] == "all-blocks" and plan["reason"] == "--all-blocks"
    raw = tmp_path / "all.raw"
    ok(run("zstd", "-q", "-d", str(image), "-o", str(raw), check=False))
    assert raw.stat().st_size == size
    assert same_bytes(dev, str(raw), size)
