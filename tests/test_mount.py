"""imager mount / umount / mounts / ls / extract, end to end as a user runs them: real images of
real ext4 and xfs volumes, a whole GPT disk with a vfat ESP, a chain point, a damaged chunk, an
image read back from a virtual tape; real loop devices, real FUSE, as root. Every test ends with
nothing of it left: no mount, no loop device, no daemon, no run directory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import pytest

from devices import loop
from devices.fs import drop_cached, file_extents, mounts
from imager import api
from imager.format import ImageReader
from imager.mount import registry
from imager.mount.volume import CachedVolume, open_chain_files
from imager.spawn import exit_watch, has_exited

from conftest import REPO_ROOT, LoopFactory, imager, run
from lab import DAEMON_TESTS, cached_bytes, damage_chunk, kill_and_wait, one_line_error, wait_for

pytestmark = DAEMON_TESTS

MiB = 1 << 20
WAIT = 30.0
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
KEY_TIME_NS = 1_000_000_000_123_456_789


# -- the source trees and their images -----------------------------------------------------------

def fill_tree(root: Path) -> None:
    """Real files, incompressible data, symlinks (relative and absolute), a hard link, other
    owners, odd modes, fixed times and an extended attribute."""
    for src in ("/usr/lib/python3.11/email", "/usr/lib/python3.11/json"):
        shutil.copytree(src, root / Path(src).name, symlinks=True)
    (root / "random.bin").write_bytes(os.urandom(12 * MiB))
    (root / "small.txt").write_text("hello imager\n" * 100)
    os.link(root / "small.txt", root / "hard.txt")
    os.setxattr(root / "small.txt", "user.imager", b"kept")
    os.symlink("small.txt", root / "rel-link")
    os.symlink("/etc/passwd", root / "abs-link")
    # Names as they come from other systems: Latin-1 bytes that are not UTF-8, a newline.
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")
    (root / "two\nlines").write_bytes(b"newline name")
    secret = root / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"k" * 100)
    os.chmod(secret / "key", 0o640)
    os.chmod(secret, 0o750)
    for path in (secret, secret / "key"):
        os.chown(path, 1234, 5678)
        os.utime(path, ns=(KEY_TIME_NS, KEY_TIME_NS))
    os.sync()


def tree_of(root) -> dict[str, tuple]:
    """Everything a copy must keep of each entry under `root` (the root itself as "."): type
    and mode, owner, size, modification time, contents or link target, user xattrs, links."""
    root = str(root)
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in ["."] if directory == root else []:
            found["."] = _entry(root)
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = _entry(path)
    return found


def _entry(path: str) -> tuple:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    else:
        content = None
    xattrs = {} if stat.S_ISLNK(st.st_mode) else {
        n: os.getxattr(path, n) for n in os.listxattr(path) if n.startswith("user.")}
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
    return (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, st.st_nlink if not stat.S_ISDIR(st.st_mode)
            else None, content, tuple(sorted(xattrs.items())))


def checksums(tree: dict) -> dict:
    return {k: v[6] for k, v in tree.items() if stat.S_ISREG(v[0])}


class Built:
    """A volume with fill_tree() on it, its image, and what the tree held."""

    def __init__(self, raw: str, image: str, tree: dict, extents: dict[str, list[tuple[int, int]]]):
        self.raw = raw              # the volume's file (a raw image of it)
        self.image = image
        self.tree = tree
        self.extents = extents      # file -> physical byte ranges on the volume


def build(factory: LoopFactory, directory: Path, fs: str, size: int, name: str) -> Built:
    device = factory.create(size, fs=fs, label=name)
    point = factory.mount(device)
    fill_tree(point)
    tree = tree_of(point)
    extents = {rel: file_extents(str(point / rel), exclusive_only=False)
               for rel, e in tree.items() if stat.S_ISREG(e[0])}
    factory.umount(point)
    image = str(directory / f"{name}.zst")
    api.backup(device, image, catalog=False)
    return Built(loop.info(device).backing_file, image, tree, extents)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The ext4 and xfs images, built once for the module."""
    directory = tmp_path_factory.mktemp("images")
    factory = LoopFactory(directory)
    cache: dict[str, Built] = {}

    def get(fs: str) -> Built:
        if fs not in cache:
            cache[fs] = build(factory, directory, fs, 64 * MiB if fs == "ext4" else 320 * MiB, fs)
        return cache[fs]
    try:
        yield get
    finally:
        factory.cleanup()


# -- what every test leaves behind: nothing ---------------------------------------------------------

@pytest.fixture
def run_dir(monkeypatch):
    """A run directory of the test's own; at teardown every daemon of it is killed and what it
    made cleared, and the test fails if anything was left."""
    directory = tempfile.mkdtemp(prefix="imgr-mnt-", dir="/tmp")
    monkeypatch.setenv("IMAGER_RUN_DIR", directory)
    try:
        yield directory
    finally:
        leftover = [r["dir"] for r in registry.records()]
        for record in registry.records():
            registry.kill_daemon(record)
            try:
                registry.teardown(record)
            except Exception:
                for m in reversed(registry.filesystem_mounts(record)):
                    subprocess.run(["umount", "-l", m.mount_point])
                registry.teardown(record)
        assert wait_for(lambda: not ours_left(directory), WAIT), ours_left(directory)
        shutil.rmtree(directory, ignore_errors=True)
        assert not leftover, f"mounts the test did not undo: {leftover}"


def ours_left(run_dir: str) -> list[str]:
    """Loop devices on files served from `run_dir` (or from a private view's /dev/shm), and
    mounts of them or under the run directory."""
    devices = [i for i in loop.list_attached()
               if i.backing_file.startswith(run_dir + "/") or i.backing_file.startswith("/dev/shm/fs/")]
    names = {i.device for i in devices}
    found = [f"loop {i.device} on {i.backing_file}" for i in devices]
    found += [f"mount {m.mount_point}" for m in mounts() if m.source in names or m.mount_point.startswith(run_dir)]
    return found


def wait_for_exit(pid: int, timeout: float = WAIT) -> None:
    with exit_watch(pid) as watch:
        assert has_exited(watch, timeout), f"process {pid} did not exit"


def mount_json(image: str, directory, *extra: str, env: dict | None = None) -> dict:
    done = imager("mount", image, str(directory), "--json", *extra, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def umount(directory) -> dict:
    done = imager("umount", str(directory), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_cleared(directory, run_dir: str) -> None:
    assert not os.path.ismount(directory)
    assert os.listdir(directory) == []
    assert not ours_left(run_dir)
    assert registry.records() == []
    assert os.listdir(registry.base()) == []


def mount_options(point) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(point):
                return fields[5].split(",")
    raise AssertionError(f"{point} is not mounted")


# -- mounting ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fs", ["ext4", "xfs", "btrfs"])
def test_mount_gives_every_file_of_the_image_read_only(built, run_dir, tmp_path, fs):
    b = built(fs)
    point = tmp_path / "mnt"
    point.mkdir()
    info = mount_json(b.image, point)
    assert info["directory"] == str(point) and info["state"] == "mounted"
    [entry] = info["entries"]
    assert (entry["how"], entry["fstype"], entry["path"]) == ("mounted", fs, str(point))
    assert loop.info(entry["device"]).read_only
    mounted = tree_of(point)
    assert len(mounted) == len(b.tree)                          # find | wc -l
    assert checksums(mounted) == checksums(b.tree)              # every file's bytes
    assert mounted == b.tree                                    # and modes, owners, times, links, xattrs
    assert "ro" in mount_options(point)
    with pytest.raises(OSError) as refused:
        open(point / "new.txt", "w")
    assert refused.value.errno == errno.EROFS
    listed = json.loads(imager("mounts", "--json").stdout)["mounts"]
    assert [m["directory"] for m in listed] == [str(point)]
    assert umount(point)["log_path"] == ""                      # nothing went wrong: no log kept
    assert_cleared(point, run_dir)


def fill_partition(disk: Path, part: dict, tmp_path: Path, fs: str | bytes, label: str, text: str) -> None:
    """Make filesystem `fs` labelled `label` on partition `part` (an entry of sfdisk --json) of
    the disk image and leave `text` in it as <fs>.txt; "vfat": an empty one; bytes: written raw."""
    device = loop.attach(str(disk), offset=part["start"] * 512, size_limit=part["size"] * 512)
    try:
        if isinstance(fs, bytes):
            with open(device, "r+b") as f:
                f.write(fs)
            return
        if fs == "vfat":
            run("mkfs.vfat", device)
            return
        run(f"mkfs.{fs}", "-q", "-L", label, device)
        mnt = tmp_path / "fill"
        mnt.mkdir(exist_ok=True)
        run("mount", device, str(mnt))
        (mnt / f"{fs}.txt").write_text(text)
        run("umount", str(mnt))
    finally:
        loop.detach(device)


def image_and_mount(disk: Path, tmp_path: Path, point: Path) -> tuple[str, dict]:
    """The disk imaged by the command line, and that image mounted at `point`: (image, --json)."""
    image = str(tmp_path / f"{disk.stem}.zst")
    assert imager("backup", str(disk), "-o", image, "-q").returncode == 0
    return image, mount_json(image, point)


def test_whole_gpt_disk_mounts_each_partition_and_shows_the_esp_as_its_bytes(run_dir, tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(480 * MiB)
    table = f"label: gpt\nsize=32MiB, type={ESP_TYPE}\nsize=100MiB, type={LINUX_TYPE}\ntype={LINUX_TYPE}\n"
    run("sfdisk", "-q", str(disk), input=table)
    parts = json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]["partitions"]
    for part, fs, label in zip(parts, ["vfat", "ext4", "xfs"], ["", "root", "data"]):
        fill_partition(disk, part, tmp_path, fs, label, f"on {fs}\n")
    point = tmp_path / "mnt"
    point.mkdir()
    image, info = image_and_mount(disk, tmp_path, point)
    by_name = {e["name"]: e for e in info["entries"]}
    assert sorted(by_name) == ["1-vfat", "2-root", "3-data"]
    assert [by_name[n]["how"] for n in ("1-vfat", "2-root", "3-data")] == ["file", "mounted", "mounted"]
    assert "vfat" in by_name["1-vfat"]["reason"]
    assert (point / "2-root" / "ext4.txt").read_text() == "on ext4\n"
    assert (point / "3-data" / "xfs.txt").read_text() == "on xfs\n"
    esp = parts[0]
    with open(disk, "rb") as f:
        f.seek(esp["start"] * 512)
        expected = f.read(esp["size"] * 512)
    assert (point / "1-vfat").read_bytes() == expected           # the ESP, byte for byte
    top = {e["name"]: e for e in json.loads(imager("ls", image, "--json").stdout)["entries"]}
    assert sorted(top) == ["1-vfat", "2-root", "3-data"] and top["1-vfat"]["size"] == len(expected)
    listed = json.loads(imager("ls", image, "3-data", "--json").stdout)["entries"]
    assert [e["name"] for e in listed] == ["xfs.txt"]
    one_line_error(imager("ls", image, "3-data/nope"), "^imager: error: 3-data/nope: no such file", code=2)

    # In use (a file of one partition's filesystem, the ESP's bytes, a mount inside): umount
    # refuses and changes nothing
    def everything_there() -> bool:
        return (os.path.ismount(point / "2-root") and os.path.ismount(point / "3-data")
                and (point / "1-vfat").read_bytes()[:512] == expected[:512]
                and len(registry.loop_devices(registry.records()[0])) == 2)
    for held in (point / "2-root" / "ext4.txt", point / "1-vfat"):
        with open(held, "rb"):
            refused = imager("umount", str(point))
            one_line_error(refused, "is in use by python", str(os.getpid()), code=2)
            assert everything_there()
    inner = point / "2-root" / "lost+found"
    run("mount", "-t", "tmpfs", "tmpfs", str(inner))
    try:
        one_line_error(imager("umount", str(point)), "lost\\+found is mounted inside", code=2)
        assert everything_there()
    finally:
        run("umount", str(inner))
    umount(point)
    assert_cleared(point, run_dir)


def test_a_damaged_chunk_at_the_end_of_a_partition_does_not_hide_its_filesystem(run_dir, tmp_path):
    """blkid's probes for RAID members read the end of a partition: a damaged chunk there must
    not turn an intact ext4 into an unknown partition."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(160 * MiB)
    run("sfdisk", "-q", str(disk), input=f"label: gpt\nsize=64MiB, type={LINUX_TYPE}\ntype={LINUX_TYPE}\n")
    parts = json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]["partitions"]
    fill_partition(disk, parts[0], tmp_path, "ext4", "root", "on ext4\n")
    end = (parts[0]["start"] + parts[0]["size"]) * 512
    with open(disk, "r+b") as f:                  # bytes in the last MiB (free in the ext4)
        f.seek(end - MiB)
        f.write(os.urandom(MiB))
    image = str(tmp_path / "disk.zst")
    assert imager("backup", str(disk), "-o", image, "-q", "--all-blocks", "--chunk-size", "1M").returncode == 0
    damage_chunk(image, (end - 1) // MiB)
    point = tmp_path / "mnt"
    point.mkdir()
    info = mount_json(image, point)
    by_name = {e["name"]: e for e in info["entries"]}
    assert "1-root" in by_name and by_name["1-root"]["how"] == "mounted", info["entries"]
    assert (point / "1-root" / "ext4.txt").read_text() == "on ext4\n"
    log = Path(info["log_path"]).read_text()
    assert "ext4 found in part1 past 1 damaged chunk" in log, log
    umount(point)
    assert_cleared(point, run_dir)


def test_whole_mbr_disk_mounts_primary_and_logical_partitions_and_shows_a_raw_one(run_dir, tmp_path):
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(500 * MiB)
    # 1 primary ext4; 2 extended holding 5 (xfs) and 6 (no filesystem: random bytes)
    table = "label: dos\nsize=64MiB, type=83\ntype=5\nsize=340MiB, type=83\nsize=16MiB, type=83\n"
    run("sfdisk", "-q", str(disk), input=table)
    parts = {int(p["node"].rsplit("mbr.img", 1)[1]): p
             for p in json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]["partitions"]}
    assert sorted(parts) == [1, 2, 5, 6]
    raw = os.urandom(parts[6]["size"] * 512)
    for number, fs in ((1, "ext4"), (5, "xfs"), (6, raw)):
        fill_partition(disk, parts[number], tmp_path, fs, f"mbr-{fs}", f"on {fs} in partition {number}\n")
    point = tmp_path / "mnt"
    point.mkdir()
    by_name = {e["name"]: e for e in image_and_mount(disk, tmp_path, point)[1]["entries"]}
    assert sorted(by_name) == ["1-mbr-ext4", "5-mbr-xfs", "6-unknown"]     # never the extended container
    assert [by_name[n]["how"] for n in sorted(by_name)] == ["mounted", "mounted", "file"]
    assert (point / "1-mbr-ext4" / "ext4.txt").read_text() == "on ext4 in partition 1\n"
    assert (point / "5-mbr-xfs" / "xfs.txt").read_text() == "on xfs in partition 5\n"
    assert (point / "6-unknown").read_bytes() == raw
    umount(point)
    assert_cleared(point, run_dir)


def test_chain_point_shows_the_files_as_they_were_at_that_point(run_dir, loops, tmp_path):
    device = loops.create(64 * MiB, fs="ext4")
    source = loops.mount(device)
    fill_tree(source)
    at_full = tree_of(source)
    loops.umount(source)
    full, incremental = str(tmp_path / "full.zst"), str(tmp_path / "mon.zst")
    assert imager("backup", device, "-o", full, "-q").returncode == 0
    source = loops.mount(device)
    (source / "small.txt").write_text("changed on monday\n")
    (source / "new.txt").write_text("new on monday\n")
    shutil.rmtree(source / "email")
    os.sync()
    at_point = tree_of(source)
    loops.umount(source)
    done = imager("backup", device, "-o", incremental, "--incremental", "--parent", full, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"][0]["kind"] == "incremental"
    source = loops.mount(device)                     # the volume moves on after the point
    (source / "new.txt").write_text("changed on tuesday\n")
    loops.umount(source)
    at_mon, at_sun = tmp_path / "mon", tmp_path / "sun"
    at_mon.mkdir()
    at_sun.mkdir()
    info = mount_json(incremental, at_mon)
    assert info["images"] == [incremental, full]
    mount_json(full, at_sun)                         # two mounts at once
    assert tree_of(at_mon) == at_point
    assert tree_of(at_sun) == at_full
    assert len(json.loads(imager("mounts", "--json").stdout)["mounts"]) == 2
    umount(at_mon)
    umount(at_sun)
    assert_cleared(at_mon, run_dir)


def test_every_point_of_a_longer_chain_mounts_as_it_was(run_dir, loops, tmp_path):
    device = loops.create(64 * MiB, fs="ext4")
    source = loops.mount(device)
    fill_tree(source)
    trees = [tree_of(source)]
    loops.umount(source)
    images = [str(tmp_path / "0-full.zst")]
    assert imager("backup", device, "-o", images[0], "-q").returncode == 0
    for night in range(1, 4):
        source = loops.mount(device)
        (source / "small.txt").write_text(f"night {night}\n")
        with open(source / "random.bin", "r+b") as f:          # rewritten in place
            f.seek(night * MiB)
            f.write(os.urandom(256 * 1024))
        (source / f"night-{night}.bin").write_bytes(os.urandom(MiB))
        if night == 2:
            shutil.rmtree(source / "json")
        os.sync()
        trees.append(tree_of(source))
        loops.umount(source)
        images.append(str(tmp_path / f"{night}-inc.zst"))
        done = imager("backup", device, "-o", images[-1], "--incremental", "--parent", images[-2], "-q")
        assert done.returncode == 0, done.stderr
    points = []
    for night in (3, 2, 1, 0):                           # all four at once
        point = tmp_path / f"at-{night}"
        point.mkdir()
        info = mount_json(images[night], point)
        assert info["images"] == images[night::-1]
        points.append((night, point))
    for night, point in points:
        assert tree_of(point) == trees[night], f"night {night}"
    for _, point in points:
        umount(point)
    assert_cleared(points[-1][1], run_dir)


@pytest.mark.parametrize("cached", [True, False], ids=["image-in-page-cache", "image-read-with-o-direct"])
def test_a_damaged_chunk_fails_its_reads_with_eio_and_one_log_line(built, run_dir, tmp_path, cached):
    b = built("ext4")
    damaged = str(tmp_path / "damaged.zst")
    shutil.copy(b.image, damaged)
    with ImageReader(damaged) as reader:
        chunk_size = reader.header.chunk_size
        overlap: dict[int, int] = {}                      # the chunk holding most of random.bin's data
        for start, end in b.extents["random.bin"]:
            for c in range(start // chunk_size, (end - 1) // chunk_size + 1):
                overlap[c] = overlap.get(c, 0) + min(end, (c + 1) * chunk_size) - max(start, c * chunk_size)
        chunk = max(overlap, key=overlap.__getitem__)
    damage_chunk(damaged, chunk)
    if not cached:
        drop_cached(damaged)
    span = (chunk * chunk_size, (chunk + 1) * chunk_size)
    outside = [rel for rel, ranges in b.extents.items()
               if not any(s < span[1] and e > span[0] for s, e in ranges)]
    assert "random.bin" not in outside and len(outside) > 50
    point = tmp_path / "mnt"
    point.mkdir()
    info = mount_json(damaged, point)
    for rel in outside:                                       # everything else reads fine
        assert hashlib.sha256((point / rel).read_bytes()).hexdigest() == b.tree[rel][6], rel
    for _ in range(2):
        with pytest.raises(OSError) as failed:
            (point / "random.bin").read_bytes()
        assert failed.value.errno == errno.EIO
    log = Path(info["log_path"]).read_text().splitlines()
    naming = [line for line in log if f"chunk {chunk} " in line]
    assert len(naming) == 1, log
    assert f"volume offset {span[0]}" in naming[0] and "EIO" in naming[0]
    if not cached:                                            # the frames came past the page cache
        assert cached_bytes(damaged) < os.path.getsize(damaged) // 2
    [listed] = json.loads(imager("mounts", "--json").stdout)["mounts"]
    assert f"chunk {chunk} " in listed["problem"], listed       # imager mounts tells of it too
    kept = umount(point)["log_path"]                            # the evidence outlives the mount
    assert naming[0] in Path(kept).read_text().splitlines()
    assert_cleared(point, run_dir)

    # extract goes on past a path it cannot copy, as cp does, and leaves no directory private
    deep = next(rel for rel in sorted(outside) if rel.count("/") == 1 and stat.S_ISREG(b.tree[rel][0]))
    into = tmp_path / "into"
    into.mkdir()
    one_line_error(imager("extract", damaged, "random.bin", deep, "-C", str(into)),
                   "random.bin: copying failed: .*Input/output error", "1 other path copied")
    got = tree_of(into)
    assert got[deep] == b.tree[deep] and got[deep.split("/")[0]] == b.tree[deep.split("/")[0]]


def test_damage_where_the_filesystem_starts_is_said_not_a_bare_io_error(built, run_dir, tmp_path):
    b = built("ext4")
    damaged = str(tmp_path / "damaged.zst")
    shutil.copy(b.image, damaged)
    damage_chunk(damaged, 0)
    point = tmp_path / "mnt"
    point.mkdir()
    for command in (["mount", damaged, str(point)], ["ls", damaged], ["extract", damaged, "small.txt", "-C",
                                                                      str(tmp_path)]):
        line = one_line_error(imager(*command), "1 damaged chunk", "volume bytes 0-", "imager verify")
        assert "Input/output error" not in line.split("(")[0], line
    assert_cleared(point, run_dir)


@pytest.mark.parametrize("refused", [None, "image.direct-open=EINVAL", "image.direct-read=EINVAL"],
                         ids=["o-direct", "open-refused", "read-refused"])
def test_reading_a_mount_keeps_the_image_out_of_the_page_cache_where_the_kernel_lets_it(built, run_dir, tmp_path,
                                                                                         refused):
    """The daemon keeps decoded chunks itself: a full image's frames are read past the page
    cache, so reading a mounted image does not push the machine's cached data out with a second
    copy of the image. Where the image's filesystem refuses O_DIRECT (at open or at a read), the
    frames come through the page cache and every file still reads right."""
    b = built("ext4")
    image = tmp_path / "copy.zst"
    shutil.copy(b.image, image)
    drop_cached(image)
    point = tmp_path / "mnt"
    point.mkdir()
    env = dict(os.environ, IMAGER_FAILPOINTS=refused) if refused else None
    mount_json(str(image), point, env=env)
    assert checksums(tree_of(point)) == checksums(b.tree)
    size = image.stat().st_size
    cached = cached_bytes(str(image))
    umount(point)
    assert_cleared(point, run_dir)
    with ImageReader(str(image)) as reader:
        frames = sum(reader.chunk_frame_sizes)
    if refused:
        assert cached >= frames // 2, (cached, frames)
    else:
        assert cached <= size - frames // 2, (cached, size, frames)


def test_frames_already_in_the_page_cache_are_read_from_it_and_the_others_past_it(built, tmp_path):
    """An image just written is in the page cache: reading it from there costs no disk read. A
    cold one is read with O_DIRECT and left out of the cache. Either way the volume reads right."""
    b = built("ext4")
    source = Path(b.raw).read_bytes()
    image = tmp_path / "copy.zst"
    shutil.copy(b.image, image)                 # written just now: wholly in the page cache
    direct_reads = {}
    for state in ("written just now", "dropped from the page cache"):
        if state != "written just now":
            drop_cached(image)
        with ExitStack() as stack:
            chain = open_chain_files([str(image)], stack)
            volume = CachedVolume(chain)
            stack.callback(volume.close)
            assert volume.read(0, volume.size) == source, state
            direct_reads[state] = chain.base.direct_reads
    with ImageReader(str(image)) as reader:
        # Small frames share pages with their neighbours, which the reads of others bring in.
        large = sum(1 for size in reader.chunk_frame_sizes if size >= MiB)
    assert direct_reads["written just now"] == 0
    assert large >= 2 and direct_reads["dropped from the page cache"] >= large, (direct_reads, large)


# -- ending a mount ------------------------------------------------------------------------------

def test_umount_after_the_daemon_was_killed_leaves_nothing(built, run_dir, tmp_path):
    b = built("ext4")
    point = tmp_path / "mnt"
    point.mkdir()
    info = mount_json(b.image, point)
    kill_and_wait(info["pid"], signal.SIGKILL)
    listed = json.loads(imager("mounts", "--json").stdout)["mounts"]
    assert [(m["directory"], m["state"]) for m in listed] == [(str(point), "failed")]
    assert "imager umount" in listed[0]["problem"]
    umount(point)
    assert_cleared(point, run_dir)


def test_sigterm_ends_the_daemon_and_clears_everything_but_not_while_in_use(built, run_dir, tmp_path):
    b = built("ext4")
    point = tmp_path / "mnt"
    point.mkdir()
    info = mount_json(b.image, point)
    user = subprocess.Popen(["sleep", "600"], cwd=point / "email")      # a shell sitting in the mount
    try:
        one_line_error(imager("umount", str(point)), "in use", code=2)
        assert (point / "small.txt").read_text().startswith("hello imager")     # still served
        os.kill(info["pid"], signal.SIGTERM)                                    # refused too: it goes on
        assert wait_for(lambda: "not stopping" in Path(info["log_path"]).read_text(), WAIT)
        assert (point / "small.txt").read_text().startswith("hello imager")
    finally:
        user.kill()
        user.wait()
    os.kill(info["pid"], signal.SIGTERM)
    wait_for_exit(info["pid"])
    assert_cleared(point, run_dir)


def test_reads_from_many_threads_through_a_small_cache_give_the_volume_and_stay_bounded(built):
    """The served volume's bytes, whatever the readers do at once: regions are decoded into
    buffers that are reused once evicted and no longer being sent, so a reply must never see a
    buffer decoded into again under it; and the buffers made stay within the cache's bound."""
    b = built("ext4")
    source = Path(b.raw).read_bytes()
    readers, rounds = 4, 150
    with ExitStack() as stack:
        volume = CachedVolume(open_chain_files([b.image], stack), cache_bytes=4 * 4 * MiB, readahead=2)
        stack.callback(volume.close)
        region = volume.region_size
        wrong: list[str] = []
        quick: list[int] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            for n in range(rounds):
                if n % 3 == 0:          # runs of sequential reads, which start read-ahead
                    offset = rng.randrange(0, volume.size - 8 * MiB) // 4096 * 4096
                    for step in range(6):
                        got = volume.read(offset + step * MiB, MiB)
                        if got != source[offset + step * MiB:offset + (step + 1) * MiB]:
                            wrong.append(f"sequential read at {offset + step * MiB}")
                    continue
                offset = rng.randrange(0, volume.size - 1)
                length = rng.choice([1, 4096, region // 2, region + 4096])
                # Every other read as the FUSE server's thread asks first: at hand, or None.
                at_hand = volume.cached_views(offset, length) if n % 2 else None
                if at_hand is not None:
                    quick.append(sum(len(v) for v in at_hand[0]))
                views, release = at_hand or volume.read_views(offset, length)
                try:
                    time.sleep(0)       # let the others evict and decode meanwhile
                    if b"".join(views) != source[offset:offset + length]:
                        wrong.append(f"views of {length} bytes at {offset}")
                finally:
                    release()
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not wrong, wrong[:5]
        assert quick and max(quick) <= region      # warm reads were answered at hand, none across regions
        stats = volume.stats()
        assert stats.cached_bytes <= stats.capacity
        # Cached, being decoded (read-ahead plus one miss per reader), or being sent (a read
        # spans at most two regions), never more.
        assert volume.slabs_made <= stats.capacity // region + volume.readahead + 3 * readers
        assert stats.decoded > volume.region_count      # the cache did evict and decode again


def test_a_region_being_sent_keeps_its_bytes_when_read_ahead_evicts_it(built):
    """A full cache, every other region still decoding, and a sequential read of a decoded
    region: making room for its read-ahead evicts that very region while its bytes are being
    sent. Its buffer must not be decoded into (the next region) until the reply is done."""
    b = built("ext4")
    source = Path(b.raw).read_bytes()
    with ExitStack() as stack:
        volume = CachedVolume(open_chain_files([b.image], stack), cache_bytes=4 * 4 * MiB, readahead=2, workers=8)
        stack.callback(volume.close)
        size = volume.region_size

        def data(r: int) -> bytes:
            return source[r * size:(r + 1) * size]
        # A region to read, and the one after it, with bytes in them; three others to keep waiting.
        here = next(r for r in range(2, volume.region_count - 3) if any(data(r)) and any(data(r + 1)))
        others = [r for r in range(volume.region_count) if r < here - 2 or r > here + 3]
        waiting = [others[0], next(r for r in others if r > others[0] + 1), here - 1]   # none read after the other
        gate = threading.Event()
        decode = volume.chain.region_into

        def gated(region, dst):
            if region in waiting:
                gate.wait(WAIT)
            return decode(region, dst)
        volume.chain.region_into = gated
        stack.callback(gate.set)
        assert volume.read(here * size, 4096) == data(here)[:4096]
        readers = []
        for r in waiting:                       # the last one makes the next read sequential
            readers.append(threading.Thread(target=volume.read, args=(r * size, 4096)))
            readers[-1].start()
            assert wait_for(lambda: r in volume._cache, WAIT)
        views, release = volume.read_views(here * size, size)
        try:
            assert wait_for(lambda: volume.is_cached((here + 1) * size, 1), WAIT)    # read ahead, decoded
            assert b"".join(views) == data(here)
        finally:
            release()
            gate.set()
            for t in readers:
                t.join()
        assert volume.read((here + 1) * size, size) == data(here + 1)


def test_a_threaded_program_mounts_through_the_python_api(built, run_dir, tmp_path):
    """A program with threads of its own is not forked: its daemon is a new interpreter."""
    b = built("ext4")
    point = tmp_path / "mnt"
    point.mkdir()
    done = threading.Event()
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        info = api.mount(b.image, str(point), catalog=False)
    finally:
        done.set()
        other.join()
    assert info.state == "mounted" and info.entries[0].how == "mounted"
    assert (point / "small.txt").read_text().startswith("hello imager")
    assert [m.directory for m in api.mounts()] == [str(point)]
    assert api.umount(str(point)).state == "unmounted"
    assert_cleared(point, run_dir)


def test_a_failure_halfway_leaves_nothing(built, run_dir, tmp_path):
    """The second filesystem of a disk fails to attach after the first was mounted: the mount
    fails in one line and nothing of it is left."""
    b = built("ext4")
    point = tmp_path / "mnt"
    point.mkdir()
    env = dict(os.environ, IMAGER_FAILPOINTS="mount.attach=EIO@0+1")
    one_line_error(imager("mount", b.image, str(point), env=env), "injected at mount.attach", code=1)
    assert_cleared(point, run_dir)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(160 * MiB)
    run("sfdisk", "-q", str(disk), input=f"label: gpt\nsize=64MiB, type={LINUX_TYPE}\ntype={LINUX_TYPE}\n")
    for part in json.loads(run("sfdisk", "--json", str(disk)).stdout)["partitiontable"]["partitions"]:
        device = loop.attach(str(disk), offset=part["start"] * 512, size_limit=part["size"] * 512)
        try:
            run("mkfs.ext4", "-q", device)
        finally:
            loop.detach(device)
    image = str(tmp_path / "disk.zst")
    assert imager("backup", str(disk), "-o", image, "-q").returncode == 0
    env = dict(os.environ, IMAGER_FAILPOINTS="mount.attach=EIO@2+1")
    one_line_error(imager("mount", image, str(point), env=env), "injected at mount.attach", code=1)
    assert_cleared(point, run_dir)
    info = mount_json(image, point)                   # and then it mounts
    assert [e["how"] for e in info["entries"]] == ["mounted", "mounted"]
    umount(point)
    assert_cleared(point, run_dir)


def test_refusals_are_one_line_and_start_nothing(built, run_dir, tmp_path):
    b = built("ext4")
    point = tmp_path / "mnt"
    point.mkdir()
    one_line_error(imager("mount", str(tmp_path / "missing.zst"), str(point)), "no such image file", code=2)
    one_line_error(imager("mount", b.image, str(tmp_path / "nowhere")), "no such directory", code=2)
    one_line_error(imager("mount", b.image, b.image), "not a directory", code=2)
    (point / "file").write_text("x")
    one_line_error(imager("mount", b.image, str(point)), "not empty", code=2)
    (point / "file").unlink()
    run("mount", "-t", "tmpfs", "imager-test", str(point))
    try:
        one_line_error(imager("mount", b.image, str(point)), "already a mount point", code=2)
        one_line_error(imager("umount", str(point)), "not an image mounted by imager", code=2)
    finally:
        run("umount", str(point))
    one_line_error(imager("umount", str(point)), "no image is mounted there", code=2)
    bad_header = str(tmp_path / "bad-header.zst")
    shutil.copy(b.image, bad_header)
    with open(bad_header, "r+b") as f:
        f.seek(40)
        byte = f.read(1)[0]
        f.seek(40)
        f.write(bytes([byte ^ 0x01]))
    one_line_error(imager("mount", bad_header, str(point)), "header", code=1)
    one_line_error(imager("extract", b.image, "small.txt", "-C", "/dev/shm"), "under /dev", code=2)
    bad_spin = dict(os.environ, IMAGER_FUSE_SPIN="fast")
    one_line_error(imager("mount", b.image, str(point), env=bad_spin), "IMAGER_FUSE_SPIN", code=2)
    one_line_error(imager("ls", b.image, env=bad_spin), "IMAGER_FUSE_SPIN", code=2)
    info = mount_json(b.image, point)
    one_line_error(imager("mount", b.image, str(point)), "mounted there already", code=2)
    umount(point)
    assert info["entries"][0]["how"] == "mounted"
    assert_cleared(point, run_dir)


# -- without a visible mount ---------------------------------------------------------------------

def iso_ns(text: str) -> int:
    """`ls --json`'s mtime (ISO 8601, nanoseconds, UTC) as nanoseconds since the epoch."""
    whole = datetime.fromisoformat(text[:19] + "+00:00")
    assert text[19] == "." and text[29:] == "+00:00", text
    return int(whole.timestamp()) * 1_000_000_000 + int(text[20:29])


def exact_name(entry: dict) -> str:
    """An `ls --json` entry's name as the filesystem has it (its bytes, when it is not UTF-8)."""
    return os.fsdecode(bytes.fromhex(entry["name_bytes"])) if entry["name_bytes"] else entry["name"]


def test_ls_and_extract_give_the_same_bytes_modes_owners_and_times(built, run_dir, tmp_path):
    b = built("ext4")
    listed = json.loads(imager("ls", b.image, "--json").stdout)["entries"]
    top = {rel: e for rel, e in b.tree.items() if rel != "." and "/" not in rel}
    assert sorted(exact_name(e) for e in listed) == sorted(top)
    for e in listed:
        mode, uid, gid, size, mtime, *_ = top[exact_name(e)]
        assert (e["mode"], e["uid"], e["gid"], iso_ns(e["mtime"])) == (mode, uid, gid, mtime), e
        assert size is None or e["size"] == size
    [key] = json.loads(imager("ls", b.image, "secret/key", "--json").stdout)["entries"]
    assert (key["name"], key["mode"], key["uid"], iso_ns(key["mtime"])) == ("key", stat.S_IFREG | 0o640, 1234,
                                                                         KEY_TIME_NS)
    lines = imager("ls", b.image, "secret").stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("-rw-r----- ") and lines[0].endswith(" key")

    # A name that is not UTF-8 or holds a newline: one escaped line as `ls -b` shows it, JSON
    # that is strict UTF-8 without lone surrogates, and the name's exact bytes beside it.
    raw = subprocess.run([sys.executable, "-m", "imager.cli", "ls", b.image, "--json"], capture_output=True,
                         cwd=REPO_ROOT, check=True).stdout
    assert b"\\udc" not in raw
    named = {e["name"]: e for e in json.loads(raw.decode("utf-8", "strict"))["entries"]}
    assert named["caf\\xe9.txt"]["name_bytes"] == b"caf\xe9.txt".hex()
    assert named["two\\nlines"]["name_bytes"] == b"two\nlines".hex()
    assert named["small.txt"]["name_bytes"] is None and named["rel-link"]["target"] == "small.txt"
    text = imager("ls", b.image).stdout.splitlines()
    assert any(line.endswith(" caf\\xe9.txt") for line in text)
    assert any(line.endswith(" two\\nlines") for line in text)

    whole = tmp_path / "whole"
    whole.mkdir()
    done = imager("extract", b.image, ".", "-C", str(whole), "--json")
    assert done.returncode == 0, done.stderr
    assert tree_of(whole) == b.tree                   # bytes, modes, owners, times, links, xattrs

    # A whole tree into a directory that holds some of its names: nothing overwritten without
    # --force, and with it nothing written through a symlink found there.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    into = tmp_path / "into"
    into.mkdir()
    os.symlink(victim, into / "small.txt")
    (into / "json").mkdir()
    (into / "json" / "decoder.py").write_bytes(b"mine")
    one_line_error(imager("extract", b.image, "/", "-C", str(into)), "decoder.py: already exists", "1 more", code=2)
    assert victim.read_bytes() == b"precious" and (into / "json" / "decoder.py").read_bytes() == b"mine"
    done = imager("extract", b.image, "/", "-C", str(into), "--force")
    assert done.returncode == 0, done.stderr
    assert victim.read_bytes() == b"precious"
    assert tree_of(into) == b.tree

    some = tmp_path / "some"
    some.mkdir()
    done = imager("extract", b.image, "secret/key", "rel-link", "abs-link", "json", "-C", str(some), "--json")
    assert done.returncode == 0, done.stderr
    got = tree_of(some)
    for rel in ("secret", "secret/key", "rel-link", "abs-link", "json", "json/decoder.py"):
        assert got[rel] == b.tree[rel], rel
    assert json.loads(done.stdout)["entries"] == len(got) - 2          # all but "." and the parent "secret"
    odd = tmp_path / "odd"
    odd.mkdir()
    raw = subprocess.run([sys.executable, "-m", "imager.cli", "extract", b.image, b"caf\xe9.txt", "-C", str(odd),
                          "--json"], capture_output=True, cwd=REPO_ROOT, check=True).stdout
    [copied] = json.loads(raw.decode("utf-8", "strict"))["copied"]
    assert copied["path"] == "caf\\xe9.txt" and copied["path_bytes"] == b"caf\xe9.txt".hex()
    assert (odd / os.fsdecode(b"caf\xe9.txt")).read_bytes() == b"latin-1 name"
    linked = tmp_path / "linked"
    linked.mkdir()
    assert imager("extract", b.image, "small.txt", "hard.txt", "-C", str(linked)).returncode == 0
    assert os.stat(linked / "small.txt").st_ino == os.stat(linked / "hard.txt").st_ino     # as one cp -a
    one_line_error(imager("extract", b.image, "secret/key", "-C", str(some)), "already exists", code=2)
    assert imager("extract", b.image, "secret/key", "-C", str(some), "--force").returncode == 0
    one_line_error(imager("extract", b.image, "../etc", "-C", str(some)), r"'\.\.'", code=2)
    elsewhere, through = tmp_path / "elsewhere", tmp_path / "through"
    elsewhere.mkdir()
    through.mkdir()
    os.symlink(elsewhere, through / "secret")
    one_line_error(imager("extract", b.image, "secret/key", "-C", str(through), "--force"), "is a symlink", code=2)
    assert os.listdir(elsewhere) == []
    one_line_error(imager("extract", b.image, "nothing-here", "-C", str(some)), "no such file", code=2)
    one_line_error(imager("ls", b.image, "abs-link/"), "the symlink abs-link leads to /etc/passwd, which is not in "
                   "the image", code=2)
    assert not ours_left(run_dir)
    assert registry.records() == []


def test_an_image_read_back_from_tape_is_an_image_file_mount_info_and_verify_take(built, run_dir, tmp_path):
    b = built("ext4")
    tape = str(tmp_path / "vault.tap")
    assert imager("tape", "label", "T1", "--tape", tape, "-q").returncode == 0
    assert imager("backup", b.raw, "--tape", tape, "-q").returncode == 0
    raw = tmp_path / "tapefile.bin"
    with open(raw, "wb") as f:
        subprocess.run([sys.executable, "-m", "imager.cli", "tape", "read", "--file", "1", "--tape", tape],
                       stdout=f, check=True, cwd=REPO_ROOT)
    assert imager("info", str(raw)).returncode != 0           # a tape file is more than the image
    image = str(tmp_path / "from-tape.zst")
    done = imager("tape", "read", "--file", "1", "--image-only", "-o", image, "--tape", tape, "--json")
    assert done.returncode == 0, done.stderr
    assert imager("info", image).returncode == 0
    assert imager("verify", image).returncode == 0
    for image_only in (["--image-only"], []):                  # past the last file: said, nothing made
        one_line_error(imager("tape", "read", "--file", "2", *image_only, "-o", str(tmp_path / "x.zst"),
                              "--tape", tape), "no tape file 2", code=1)
        assert not (tmp_path / "x.zst").exists()
    point = tmp_path / "mnt"
    point.mkdir()
    mount_json(image, point)
    assert checksums(tree_of(point)) == checksums(b.tree)
    umount(point)
    assert_cleared(point, run_dir)

