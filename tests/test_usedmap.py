"""Used-block plans: the UsedMap algebra against a byte-mask model, and GETFSMAP / read-only
mount / FIEMAP plans of aged ext4 and xfs volumes on real loop devices, checked against FIEMAP
of every file and against the filesystems' own tools (dumpe2fs, xfs_db)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import freeze as fsfreeze, fs as block, loop
from devices.fs import file_extents
from imager.errors import ImagerError
from imager.plan.planner import plan_device, plan_excludes, plan_mounted
from imager.plan.usedmap import ALL_BLOCKS, USED_BLOCKS, UsedMap

from conftest import LoopFactory, populate_sample, run

MiB = 1 << 20

needs_loop = pytest.mark.skipif(not os.access("/dev/loop-control", os.W_OK),
                                reason="needs root and /dev/loop-control")


# --- the UsedMap algebra, against a byte mask ------------------------------------------------

def mask_of(size: int, ranges) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    for s, e in ranges:
        mask[max(s, 0):max(min(e, size), 0)] = True
    return mask


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


sizes = st.integers(1, 600)
raw_ranges = st.lists(st.tuples(st.integers(-20, 620), st.integers(-20, 620)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(size=sizes, ranges=raw_ranges, excluded=raw_ranges, offset=st.integers(0, 620),
       length=st.integers(0, 300))
def test_usedmap_matches_a_byte_mask(size, ranges, excluded, offset, length):
    m = UsedMap.from_ranges(size, ranges)
    mask = mask_of(size, ranges)
    assert m.ranges == runs_of(mask)  # sorted, merged (touching ranges too), clipped
    assert m.used_bytes == mask.sum()
    window = mask[offset:offset + length]
    assert m.ranges_in(offset, length) == runs_of(window)  # relative to offset
    assert m.covers(offset, offset + length) == (offset + length <= size and bool(window.all()) or length == 0)
    assert m.overlaps(offset, offset + length) == bool(window.any())
    less = m.minus(excluded)
    assert less.ranges == runs_of(mask & ~mask_of(size, excluded))
    assert less.excluded_bytes == m.used_bytes - less.used_bytes
    other = UsedMap.from_ranges(size, excluded)
    assert m.union(other).ranges == runs_of(mask | mask_of(size, excluded))


@settings(max_examples=200, deadline=None)
@given(size=sizes, ranges=raw_ranges, granularity=st.sampled_from([1, 2, 8, 512]))
def test_aligned_only_widens_to_the_granularity(size, ranges, granularity):
    m = UsedMap.from_ranges(size, ranges)
    wide = m.aligned(granularity)
    assert not (mask_of(size, m.ranges) & ~mask_of(size, wide.ranges)).any()
    for s, e in wide.ranges:
        assert s % granularity == 0 and (e % granularity == 0 or e == size)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.tuples(st.integers(0, 100), st.integers(1, 100), raw_ranges), max_size=4))
def test_compose_places_each_region_and_counts_everything_outside_as_used(parts):
    disk = 1000
    regions, expected = [], np.ones(disk, dtype=bool)
    cursor = 0
    for gap, size, ranges in parts:  # non-overlapping regions, like partitions
        start = cursor + gap
        cursor = start + size
        regions.append((start, UsedMap.from_ranges(size, ranges)))
        expected[start:start + size] = mask_of(size, ranges)
    composed = UsedMap.compose(disk, regions)
    assert composed.ranges == runs_of(expected)
    for start, region in regions:
        assert region.shifted(start, disk).ranges == runs_of(mask_of(disk, [(s + start, e + start)
                                                                            for s, e in region.ranges]))


def test_all_blocks_and_modes():
    m = UsedMap.all_blocks(10 * MiB, "unknown filesystem")
    assert m.mode == ALL_BLOCKS and m.reason == "unknown filesystem"
    assert m.ranges == [(0, 10 * MiB)] and m.used_bytes == 10 * MiB
    assert m.ranges_in(4 * MiB, 4 * MiB) == [(0, 4 * MiB)]
    assert m.ranges_in(8 * MiB, 4 * MiB) == [(0, 2 * MiB)]  # the last, short chunk
    assert m.to_dict() == {"mode": ALL_BLOCKS, "fs_type": None, "volume_size": 10 * MiB,
                           "used_bytes": 10 * MiB, "ranges": 1, "reason": "unknown filesystem"}
    empty = UsedMap.from_ranges(MiB, [])
    assert empty.mode == USED_BLOCKS and empty.ranges_in(0, MiB) == [] and empty.used_bytes == 0
    assert UsedMap.compose(4 * MiB, [(MiB, UsedMap.all_blocks(MiB, "x"))]).mode == ALL_BLOCKS


def test_ranges_in_is_cheap_per_chunk_of_a_huge_fragmented_volume():
    """A 64 TiB volume with two million used ranges, asked once per 4 MiB chunk."""
    size = 64 << 40
    rng = np.random.default_rng(7)
    starts = np.sort(rng.choice(size // 4096, 2_000_000, replace=False)) * 4096
    ends = starts + 4096 * rng.integers(1, 64, starts.size)
    m = UsedMap(size, starts, ends)
    chunk = 4 * MiB
    offsets = rng.integers(0, size // chunk, 50_000) * chunk
    started = time.perf_counter()
    for offset in offsets.tolist():
        m.ranges_in(offset, chunk)
    per_call = (time.perf_counter() - started) / offsets.size
    assert per_call < 100e-6, f"{per_call * 1e6:.1f} µs per chunk"


# --- aged ext4 and xfs volumes ------------------------------------------------------------------

FILLER_BLOCK = os.urandom(4 * MiB)
VOLUME_SIZE = 512 * MiB
FILESYSTEMS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "rmapbt=0"],         # free space from the bnobt
    "xfs-rmapbt": ["mkfs.xfs", "-q", "-f", "-m", "rmapbt=1"],  # from the reverse-mapping btree
}


def regular_files(point: Path) -> list[Path]:
    return [p for p in point.rglob("*") if p.is_file() and not p.is_symlink()]


def extents_of_every_file(point: Path) -> dict[str, list[tuple[int, int]]]:
    return {str(p.relative_to(point)): file_extents(str(p), exclusive_only=False)
            for p in regular_files(point)}


def age(point: Path) -> list[tuple[int, int]]:
    """Real files, then every free block written with random data and freed again, then
    small files written and every other one deleted so free space is fragmented. Returns
    where the filler was: free space now, holding old data."""
    populate_sample(point)
    filler: list[tuple[int, int]] = []
    try:
        for n in range(10_000):
            with open(point / f"filler{n}", "wb") as f:
                for _ in range(4):
                    f.write(FILLER_BLOCK)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    os.sync()
    for path in point.glob("filler*"):
        filler += file_extents(str(path), exclusive_only=False)
        path.unlink()
    for n in range(64):
        (point / f"small{n}").write_bytes(os.urandom((n + 1) * 37 * 1024))
    for n in range(0, 64, 2):
        (point / f"small{n}").unlink()
    os.sync()
    return filler


class AgedVolume:
    def __init__(self, factory: LoopFactory, kind: str):
        self.factory = factory
        self.kind = kind
        self.fs_type = kind.split("-")[0]
        self.device = factory.create(VOLUME_SIZE)
        run(*FILESYSTEMS[kind], self.device)
        self.point = factory.mount(self.device)
        self.filler = age(self.point)

    def unmount(self) -> None:
        self.factory.umount(self.point)

    def mount(self) -> None:
        self.point = self.factory.mount(self.device)


@pytest.fixture(scope="module", params=sorted(FILESYSTEMS))
def aged(request, tmp_path_factory):
    """An aged volume, mounted, shared by the tests of one filesystem kind; torn down after."""
    if not os.access("/dev/loop-control", os.W_OK):
        pytest.skip("needs root and /dev/loop-control")
    factory = LoopFactory(tmp_path_factory.mktemp(request.param))
    try:
        yield AgedVolume(factory, request.param)
    finally:
        factory.cleanup()


def assert_covers_every_extent(plan: UsedMap, extents: dict[str, list[tuple[int, int]]]) -> None:
    assert extents
    for name, ranges in extents.items():
        for start, end in ranges:
            assert plan.covers(start, end), f"{name}: extent {start}-{end} is not in the plan"


def assert_metadata_is_used(plan: UsedMap, fs_type: str) -> None:
    if fs_type == "ext4":
        assert plan.covers(1024, 2048)  # the superblock
    else:
        assert plan.covers(0, 512)      # the xfs superblock, sector 0 of AG 0


def leftovers(target: str) -> list:
    """Loop devices over `target` and mounts of them: what plan_device must never leave."""
    target = os.path.realpath(target)
    attached = [info for info in loop.list_attached() if info.backing_file == target]
    numbers = {os.stat(info.device).st_rdev for info in attached}
    return attached + [m for m in block.mounts() if m.device_number in numbers]


@needs_loop
def test_mounted_plan_covers_every_file_and_the_metadata_and_leaves_free_space_out(aged):
    plan = plan_mounted(aged.device, str(aged.point))
    assert plan.mode == USED_BLOCKS and plan.fs_type == aged.fs_type and plan.size == VOLUME_SIZE
    extents = extents_of_every_file(aged.point)
    assert_covers_every_extent(plan, extents)
    assert_metadata_is_used(plan, aged.fs_type)
    data = sum(p.stat().st_size for p in regular_files(aged.point))
    assert data <= plan.used_bytes < VOLUME_SIZE // 2
    filler = UsedMap.from_ranges(VOLUME_SIZE, aged.filler)
    assert filler.used_bytes > VOLUME_SIZE // 3
    # Where the filler was is free again, except where later files went (xfs reuses it)
    # and what metadata took.
    free = UsedMap.all_blocks(VOLUME_SIZE, "").minus(plan.ranges)
    filler_still_used = filler.minus(free.ranges).minus(r for rs in extents.values() for r in rs)
    assert filler_still_used.used_bytes < filler.used_bytes // 20


@needs_loop
def test_queries_in_small_batches_give_the_same_answers(aged, monkeypatch):
    """The GETFSMAP loop (last record becomes the low key) and the FIEMAP loop (continue after
    the last extent) over many calls agree with one call."""
    whole = plan_mounted(aged.device, str(aged.point))
    fragmented = [str(aged.point / f"small{n}") for n in range(1, 64, 2)] + [str(aged.point / "random.bin")]
    extents = {path: file_extents(path) for path in fragmented}
    monkeypatch.setattr(block, "_FSMAP_RECORDS_PER_CALL", 3)
    monkeypatch.setattr(block, "_FIEMAP_EXTENTS_PER_CALL", 1)
    assert plan_mounted(aged.device, str(aged.point)).ranges == whole.ranges
    assert {path: file_extents(path) for path in fragmented} == extents


@needs_loop
def test_plan_inside_the_freeze_window(aged):
    os.sync()
    before = plan_mounted(aged.device, str(aged.point))
    excluded_before = plan_excludes(str(aged.point), ["random.bin"], aged.device)
    fsfreeze.freeze(str(aged.point))
    try:
        frozen = plan_mounted(aged.device, str(aged.point))
        excluded_frozen = plan_excludes(str(aged.point), ["random.bin"], aged.device)
    finally:
        fsfreeze.thaw(str(aged.point))
    assert frozen.ranges == before.ranges
    assert excluded_frozen == excluded_before


@needs_loop
def test_unmounted_plan_agrees_with_the_mounted_one(aged):
    extents = extents_of_every_file(aged.point)
    mounted = plan_mounted(aged.device, str(aged.point))
    aged.unmount()
    try:
        unmounted = plan_device(aged.device)
        assert leftovers(aged.device) == []
        tool_free = free_space_by_tools(aged.device, aged.fs_type)
    finally:
        aged.mount()
    assert unmounted.mode == USED_BLOCKS and unmounted.fs_type == aged.fs_type
    assert_covers_every_extent(unmounted, extents)
    assert_metadata_is_used(unmounted, aged.fs_type)
    # a mounted filesystem may hold preallocations it lets go of on unmount; little else differs
    assert mounted.minus(unmounted.ranges).used_bytes < 8 * MiB
    assert unmounted.minus(mounted.ranges).used_bytes < 8 * MiB
    # the filesystem's own tools see the same free space
    ours = UsedMap.all_blocks(VOLUME_SIZE, "").minus(unmounted.ranges)
    theirs = UsedMap.from_ranges(VOLUME_SIZE, tool_free)
    assert not ours.minus(theirs.ranges).used_bytes, "plan calls bytes free that the tools call used"
    assert theirs.minus(ours.ranges).used_bytes < MiB, "plan keeps bytes the tools call free"


def free_space_by_tools(device: str, fs_type: str) -> list[tuple[int, int]]:
    """Free byte ranges by dumpe2fs (ext4's block bitmaps) or xfs_db (xfs's free space btrees
    and free lists: a free list block is free to xfs_db but held by the filesystem)."""
    if fs_type == "ext4":
        text = run("dumpe2fs", device).stdout
        block_size = int(re.search(r"^Block size:\s+(\d+)", text, re.M).group(1))
        free = []
        for listing in re.findall(r"^\s+Free blocks: (.+)$", text, re.M):
            for item in listing.split(", "):
                first, _, last = item.partition("-")
                free.append((int(first) * block_size, (int(last or first) + 1) * block_size))
        return free
    geometry = run("xfs_db", "-r", "-c", "sb 0", "-c", "p blocksize agblocks", device).stdout
    block_size = int(re.search(r"blocksize = (\d+)", geometry).group(1))
    ag_blocks = int(re.search(r"agblocks = (\d+)", geometry).group(1))
    free = []
    for line in run("xfs_db", "-r", "-c", "freesp -d", device).stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            ag, ag_block, length = map(int, fields)
            start = (ag * ag_blocks + ag_block) * block_size
            free.append((start, start + length * block_size))
    return free


@needs_loop
def test_excluded_files_are_left_out_and_everything_else_stays(aged):
    plan = plan_mounted(aged.device, str(aged.point))
    excluded = plan_excludes(str(aged.point), ["random.bin", str(aged.point / "email")], aged.device)
    excluded_files = [aged.point / "random.bin"] + regular_files(aged.point / "email")
    expected = [r for p in excluded_files for r in file_extents(str(p))]
    assert sorted(excluded) == sorted(expected)
    assert sum(e - s for s, e in excluded) >= (aged.point / "random.bin").stat().st_size
    less = plan.minus(excluded)
    for start, end in excluded:
        assert not less.overlaps(start, end)
    assert less.excluded_bytes == plan.used_bytes - less.used_bytes > 8 * MiB - 1
    kept = {name: ranges for name, ranges in extents_of_every_file(aged.point).items()
            if name != "random.bin" and not name.startswith("email/")}
    assert_covers_every_extent(less, kept)
    assert_metadata_is_used(less, aged.fs_type)


@needs_loop
def test_exclude_errors(aged, tmp_path):
    with pytest.raises(ImagerError, match="no-such-file: no such file"):
        plan_excludes(str(aged.point), ["no-such-file"], aged.device)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not on the volume")
    with pytest.raises(ImagerError, match="not on the filesystem of"):
        plan_excludes(str(aged.point), [str(outside)], aged.device)
    with pytest.raises(ImagerError, match="is not mounted at"):
        plan_excludes(str(tmp_path), ["x"], aged.device)
    with pytest.raises(ImagerError, match="is not mounted at"):
        plan_mounted(aged.device, str(tmp_path))


@needs_loop
def test_exclude_on_an_unmounted_device_is_an_error(loops, tmp_path):
    device = loops.create(64 * MiB, fs="ext4")
    with pytest.raises(ImagerError, match="is not mounted at"):
        plan_excludes(str(tmp_path), ["x"], device)


# --- snapshots, damage, and what is imaged whole ----------------------------------------------

def backing_file(device: str) -> str:
    return loop.info(device).backing_file


@needs_loop
@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_copy_taken_inside_the_freeze_window(loops, tmp_path, fs):
    """A snapshot of a frozen volume: ext4's freeze leaves a clean journal, so the snapshot
    plans the same as GETFSMAP in the window; xfs leaves its log to be recovered, so only the
    in-window plan is precise and plan_device says why it images the copy whole."""
    device = loops.create(VOLUME_SIZE if fs == "xfs" else 128 * MiB, fs=fs)
    point = loops.mount(device)
    (point / "data.bin").write_bytes(os.urandom(4 * MiB))
    snapshot = tmp_path / "snapshot.img"
    fsfreeze.freeze(str(point))
    try:
        in_window = plan_mounted(device, str(point))
        shutil.copyfile(backing_file(device), snapshot)
    finally:
        fsfreeze.thaw(str(point))
    (point / "after.bin").write_bytes(os.urandom(4 * MiB))  # changes after the instant
    planned = plan_device(str(snapshot))
    assert leftovers(str(snapshot)) == []
    if fs == "ext4":
        assert planned.mode == USED_BLOCKS and planned.ranges == in_window.ranges
    else:
        assert planned.mode == ALL_BLOCKS and "log needs recovery" in planned.reason


@needs_loop
@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_crash_copy_with_a_journal_to_replay_is_imaged_whole(loops, tmp_path, fs):
    device = loops.create(VOLUME_SIZE if fs == "xfs" else 128 * MiB, fs=fs)
    point = loops.mount(device)
    (point / "data.bin").write_bytes(os.urandom(4 * MiB))
    os.sync()
    crash_copy = tmp_path / "crash.img"
    shutil.copyfile(backing_file(device), crash_copy)  # while mounted, not frozen
    plan = plan_device(str(crash_copy))
    assert plan.mode == ALL_BLOCKS and plan.fs_type == fs and plan.used_bytes == plan.size
    assert re.search("journal needs recovery" if fs == "ext4" else "log needs recovery", plan.reason)
    assert leftovers(str(crash_copy)) == []


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_loop
def test_unknown_and_damaged_filesystems_are_imaged_whole(loops):
    random_device = loops.create(16 * MiB, fill=lambda p: p.write_bytes(os.urandom(16 * MiB)))
    zeroed_ext4 = loops.create(64 * MiB, fs="ext4")
    write_at(zeroed_ext4, 1024, bytes(1024))
    zeroed_xfs = loops.create(VOLUME_SIZE, fs="xfs")
    write_at(zeroed_xfs, 0, bytes(512))
    for device in (random_device, zeroed_ext4, zeroed_xfs):
        plan = plan_device(device)
        assert (plan.mode, plan.reason, plan.used_bytes) == (ALL_BLOCKS, "unknown filesystem (no signature found)",
                                                             plan.size)
    # a superblock that is fine over group descriptors that are not: the kernel refuses it
    broken_groups = loops.create(64 * MiB)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", broken_groups)
    write_at(broken_groups, 4096, bytes(4096))
    plan = plan_device(broken_groups)
    assert plan.mode == ALL_BLOCKS and plan.reason.startswith("damaged filesystem: the kernel refuses")
    assert leftovers(broken_groups) == []
    # xfs that mounts but whose free space btree root (AGF) is gone: GETFSMAP cannot answer
    broken_agf = loops.create(VOLUME_SIZE, fs="xfs")
    write_at(broken_agf, 512, bytes(512))
    plan = plan_device(broken_agf)
    assert plan.mode == ALL_BLOCKS and plan.reason.startswith("damaged filesystem")
    assert leftovers(broken_agf) == []
    # ext4 that recorded errors of its own
    marked = loops.create(64 * MiB, fs="ext4")
    run("debugfs", "-w", "-R", "ssv state 2", marked)
    plan = plan_device(marked)
    assert plan.mode == ALL_BLOCKS and "records errors" in plan.reason


@needs_loop
def test_vfat_is_imaged_whole(loops):
    device = loops.create(64 * MiB)
    run("mkfs.vfat", device)
    plan = plan_device(device)
    assert (plan.mode, plan.fs_type, plan.reason) == (ALL_BLOCKS, "vfat", "FAT filesystem: imaged whole")


@needs_loop
def test_btrfs_has_no_getfsmap_and_is_imaged_whole(loops):
    device = loops.create(256 * MiB)
    run("mkfs.btrfs", "-q", "-f", device)
    plan = plan_device(device)
    assert (plan.mode, plan.reason) == (ALL_BLOCKS, "unsupported filesystem btrfs: imaged whole")
    point = loops.mount(device)
    plan = plan_mounted(device, str(point))
    assert (plan.mode, plan.fs_type) == (ALL_BLOCKS, "btrfs") and "no GETFSMAP" in plan.reason
    (point / "cache.bin").write_bytes(b"x" * 65536)
    with pytest.raises(ImagerError, match="--exclude works on ext2, ext3, ext4, xfs only"):
        plan_excludes(str(point), ["cache.bin"], device)


@needs_loop
def test_ext2_without_a_journal_is_planned_through_the_ext4_driver(loops):
    device = loops.create(64 * MiB)
    run("mkfs.ext2", "-q", "-F", device)
    point = loops.mount(device)
    (point / "data.bin").write_bytes(os.urandom(4 * MiB))
    extents = file_extents(str(point / "data.bin"))
    loops.umount(point)
    plan = plan_device(device)
    assert (plan.mode, plan.fs_type) == (USED_BLOCKS, "ext2")
    assert plan.covers(1024, 2048) and all(plan.covers(s, e) for s, e in extents)
    assert plan.used_bytes < 16 * MiB


@needs_loop
def test_plan_device_of_a_mounted_device_asks_the_mounted_filesystem(loops):
    device = loops.create(64 * MiB, fs="ext4")
    point = loops.mount(device)
    (point / "fresh.bin").write_bytes(os.urandom(2 * MiB))  # maybe not on disk yet
    plan = plan_device(device)
    assert plan.mode == USED_BLOCKS
    for start, end in file_extents(str(point / "fresh.bin")):
        assert plan.covers(start, end)
